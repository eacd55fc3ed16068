"""fairchem-core 2.x eSEN / UMA direct-force models through the fairchem adapter, against fairchem's own forward.

fairchem's reference: the same HydraModel (same weights) run by fairchem on its own AtomicData.from_ase with its
own on-the-fly graph generation. The protocol checks (finite differences, translation, batching, round trip) are
in test_conformance.py. Runs in a venv with fairchem-core (pip install 'atomuq[fairchem]'); skips elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.io import read, write
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

pytest.importorskip("fairchem.core", reason="fairchem-core is not installed (pip install 'atomuq[fairchem]')")

from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch

from atomuq.cli.main import app
from atomuq.core.batch import Batch
from atomuq.core.errors import InputError, ModelFileError
from atomuq.models.adapters.fairchem import build_hydra, check_config, fairchem_config, load_fairchem, save_fairchem
from atomuq.models.derivatives import evaluate
from atomuq.models.registry import resolve_model
from atomuq.uq.force_delta import force_delta
from model_kinds import FAIRCHEM_SMALL, molecule_and_silicon, small_fairchem

ARCHITECTURES = ["esen-direct", "uma-direct"]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model(request):
    return small_fairchem(request.param, seed=0)


def fairchem_own(model, atoms):
    """(energy eV, direct forces eV/Å) of fairchem running the same weights on its own graph (otf_graph=True)."""
    reference = build_hydra(model.config)  # otf_graph=True, as configured
    reference.load_state_dict(model.hydra.state_dict())
    data = atomicdata_list_to_batch([AtomicData.from_ase(atoms, task_name=model.task)])
    out = reference(data)

    def value(head, key):
        v = out[head]
        v = v.get(f"{model.task}_{key}", v.get(key)) if isinstance(v, dict) else v
        return (v[key] if isinstance(v, dict) else v).detach()

    return float(value("energy", "energy")), value("forces", "forces").numpy()


def test_energy_and_direct_forces_equal_fairchems_own_forward(model):
    atoms = molecule_and_silicon()
    batch = Batch.from_atoms(atoms)
    pred = evaluate(model, batch, conservative=False)
    assert model.hydra.backbone.otf_graph is False  # atomuq's edges, fairchem's edge vectors from positions and cell
    for k, a in enumerate(atoms):
        energy, forces = fairchem_own(model, a)
        assert float(pred.energy[k]) == pytest.approx(energy, abs=1e-5)
        np.testing.assert_allclose(batch.split(pred.forces_direct)[k].detach().numpy(), forces, atol=1e-5)


def test_force_delta_and_node_features(model):
    atoms = molecule_and_silicon()
    batch = Batch.from_atoms(atoms)
    pred = evaluate(model, batch, conservative=True)
    result = force_delta(pred, batch)
    u = torch.linalg.norm(pred.forces_direct - pred.forces_conservative, dim=-1)
    torch.testing.assert_close(result.per_atom["force_delta"], u)
    assert bool((result.per_structure["force_delta"] > 0).all())  # random weights: direct and conservative differ
    assert pred.node_features.shape == (batch.num_atoms, FAIRCHEM_SMALL["sphere_channels"])
    # the l = 0 channels are rotation invariant
    rotation = torch.tensor(Rotation.from_euler("xyz", [0.3, -1.1, 0.7]).as_matrix(), dtype=batch.dtype)
    rotated = batch.replace(positions=batch.positions @ rotation.T, cell=batch.cell @ rotation.T)
    torch.testing.assert_close(model(rotated).node_features, pred.node_features, atol=2e-4, rtol=1e-3)  # float32


def test_save_load_round_trip_and_spec(model, tmp_path):
    batch = Batch.from_atoms(molecule_and_silicon())
    before = evaluate(model, batch, conservative=True)
    path = save_fairchem(model, tmp_path / "small.pt")
    loaded = resolve_model(f"fairchem:{path}")
    assert loaded.source == f"fairchem:{path}" and loaded.architecture == model.architecture
    after = evaluate(loaded, batch, conservative=True)
    # float32 round-off only (the float64 round trip is exact: test_conformance)
    torch.testing.assert_close(after.forces_direct, before.forces_direct, rtol=0, atol=1e-6)
    torch.testing.assert_close(after.forces_conservative, before.forces_conservative, rtol=0, atol=1e-6)


def test_model_file_errors(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        resolve_model(f"fairchem:{tmp_path / 'missing.pt'}")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ModelFileError, match="not an atomuq-fairchem file"):
        load_fairchem(other)
    conservative = fairchem_config("esen-direct")
    conservative["heads"] = {"efs": {"module": "fairchem.core.models.uma.escn_md.MLP_EFS_Head"}}
    with pytest.raises(ModelFileError, match="direct force head"):
        check_config(conservative, "efs model")
    with pytest.raises(ValueError, match="unknown fairchem architecture"):
        fairchem_config("equiformer-v2")


def test_uma_task_is_checked_and_changes_the_prediction():
    uma = small_fairchem("uma-direct", seed=0)
    batch = Batch.from_atoms(molecule_and_silicon()[1:])
    omat = float(uma(batch).energy[0])
    uma.task = "omol"
    assert float(uma(batch).energy[0]) != pytest.approx(omat, abs=1e-6)  # per-task experts and dataset embedding
    from atomuq.models.adapters.fairchem import FairchemModel

    with pytest.raises(ModelFileError, match="task 'qm9'"):
        FairchemModel(uma.hydra, uma.config, "uma-direct", task="qm9")


def test_partially_periodic_structure_is_refused():
    slab = bulk("Si", "diamond", a=5.43, cubic=True)
    slab.pbc = (True, True, False)
    with pytest.raises(InputError, match="periodic along some axes"):
        small_fairchem()(Batch.from_atoms([slab]))


def test_cli_score_with_a_fairchem_spec(tmp_path):
    path = save_fairchem(small_fairchem("esen-direct", seed=1), tmp_path / "esen.pt")
    src, out = tmp_path / "in.extxyz", tmp_path / "out.extxyz"
    write(src, molecule_and_silicon())
    result = CliRunner().invoke(app, ["score", str(src), "-o", str(out), "--model", f"fairchem:{path}"])
    assert result.exit_code == 0, result.output
    scored = read(out, ":")
    assert len(scored) == 2 and all(a.info["force_delta"] > 0 for a in scored)
