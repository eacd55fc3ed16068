"""CHGNet and SevenNet-0 (weights shipped in their wheels) through the short specs `chgnet` and `sevennet-0`.

Checked against each package's own predictions (CHGNet.predict_structure, SevenNetCalculator): energies,
conservative forces and stress; conservative only (the Force Delta refused with a message naming the direct
head); ensemble members on materials; node features as LTAU descriptors. The protocol checks (finite
differences, translation, batching) are in test_conformance.py. Runs in a venv with chgnet and sevenn
(pip install 'atomuq[pretrained]'); each model's tests skip where its package is absent.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.io import read, write
from typer.testing import CliRunner

from atomuq.cli.main import app
from atomuq.core.batch import Batch
from atomuq.core.errors import InputError, ModelFileError
from atomuq.models.derivatives import evaluate
from atomuq.models.registry import SHORT_NAMES, resolve_model, spec_help
from atomuq.uq.ensemble import ensemble_uncertainty, evaluate_ensemble
from atomuq.uq.force_delta import force_delta

PACKAGES = {"chgnet": "chgnet", "sevennet-0": "sevenn"}
FEATURES = {"chgnet": 64, "sevennet-0": 128}


def materials():
    """Rattled fcc Cu, diamond Si and rocksalt MgO cells."""
    cells = [bulk("Cu", "fcc", a=3.61, cubic=True), bulk("Si", "diamond", a=5.43, cubic=True),
             bulk("MgO", "rocksalt", a=4.21, cubic=True)]
    for seed, atoms in enumerate(cells):
        atoms.rattle(0.05, seed=seed)
    return cells


def _model(name):
    pytest.importorskip(PACKAGES[name], reason=f"{PACKAGES[name]} is not installed (pip install 'atomuq[pretrained]')")
    return resolve_model(name)


@pytest.fixture(scope="module", params=list(PACKAGES))
def named(request):
    return request.param, _model(request.param)


def own_predictions(name, model, atoms):
    """(energy eV, forces eV/Å, stress eV/Å³ Voigt) from the package's own code path."""
    if name == "chgnet":
        from pymatgen.io.ase import AseAtomsAdaptor

        out = model.chgnet.predict_structure(AseAtomsAdaptor.get_structure(atoms))
        s = out["s"] / 160.21766208  # GPa -> eV/Å³
        return float(out["e"]) * len(atoms), out["f"], np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
    from sevenn.calculator import SevenNetCalculator

    atoms = atoms.copy()
    atoms.calc = SevenNetCalculator("7net-0", device="cpu")
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()


def test_short_specs_are_registered_with_their_extra():
    assert {"chgnet", "sevennet-0"} <= set(SHORT_NAMES)
    text = spec_help()
    assert "chgnet" in text and "sevennet-0" in text and "atomuq[pretrained]" in text


def test_energy_forces_stress_equal_the_packages_own(named):
    name, model = named
    assert not model.has_direct_forces and model.has_node_features and model.source == name
    atoms = materials()
    batch = Batch.from_atoms(atoms)
    pred = evaluate(model, batch, conservative=True, stress=True)
    for k, a in enumerate(atoms):
        energy, forces, stress = own_predictions(name, model, a)
        assert float(pred.energy[k]) == pytest.approx(energy, abs=1e-4)
        np.testing.assert_allclose(batch.split(pred.forces_conservative)[k].detach().numpy(), forces, atol=5e-5)
        np.testing.assert_allclose(pred.stress_virial[k].detach().numpy(), stress, atol=5e-6)
    assert pred.node_features.shape == (batch.num_atoms, FEATURES[name])


def test_force_delta_is_refused_naming_the_direct_head(named, tmp_path):
    name, model = named
    batch = Batch.from_atoms(materials()[:1])
    with pytest.raises(ValueError, match="needs a direct force head"):
        force_delta(evaluate(model, batch), batch)
    src = tmp_path / "in.extxyz"
    write(src, materials()[:1])
    result = CliRunner().invoke(app, ["score", str(src), "-o", str(tmp_path / "out.extxyz"), "--model", name])
    assert result.exit_code != 0
    assert "direct force head" in result.output and "--ensemble-forces conservative" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out.extxyz").exists()


def test_ensemble_of_the_two_public_models_on_materials(tmp_path):
    members = [_model("chgnet"), _model("sevennet-0")]
    atoms = materials()
    batch = Batch.from_atoms(atoms)
    with pytest.raises(InputError, match="no direct force head"):
        evaluate_ensemble(members, batch, "direct", ["chgnet", "sevennet-0"])
    ens = evaluate_ensemble(members, batch, "conservative", ["chgnet", "sevennet-0"])
    forces = np.stack([evaluate(m, batch).forces_conservative.detach().numpy() for m in members])
    std = ensemble_uncertainty(ens, batch).per_atom["ensemble_std"].numpy()
    np.testing.assert_allclose(std, np.sqrt(forces.var(axis=0).sum(-1) / 3.0), atol=1e-5)
    assert bool((std > 0).all())  # two independently trained models never agree exactly
    # through the CLI, with a small random direct native model scoring the Force Delta
    from atomuq.models.checkpoint import save_model
    from conftest import make_native

    model = save_model(make_native(seed=1, elements=(8, 12, 14, 29)), tmp_path / "native.pt")
    src, out = tmp_path / "in.extxyz", tmp_path / "out.extxyz"
    write(src, atoms)
    result = CliRunner().invoke(app, ["score", str(src), "-o", str(out), "--model", str(model),
                                      "--ensemble", "chgnet,sevennet-0", "--ensemble-forces", "conservative"])
    assert result.exit_code == 0, result.output
    scored = read(out, ":")
    np.testing.assert_allclose([a.info["ensemble_std"] for a in scored],
                               ensemble_uncertainty(ens, batch).per_structure["ensemble_std"].numpy(), atol=1e-5)


def test_node_features_drive_ltau(named):
    from atomuq.models.checkpoint import weights_fingerprint
    from atomuq.uq.ltau.estimator import fit_estimator
    from atomuq.uq.ltau.index import build_index
    from atomuq.workflows.ltau import compute_descriptors

    name, model = named
    atoms = materials()
    descriptors = compute_descriptors(model, atoms)
    n = sum(len(a) for a in atoms)
    assert descriptors.shape == (n, FEATURES[name])
    errors = np.random.default_rng(0).lognormal(-2, 0.5, (10, n))
    numbers = np.concatenate([a.numbers for a in atoms])
    est = fit_estimator([errors], numbers, np.ones(n), build_index(descriptors), atol=0.15,
                        metadata={"model_fingerprint": weights_fingerprint(model)})
    pred = est.predict(descriptors, k=1)
    assert np.allclose(pred.confidence, (errors <= 0.15).mean(axis=0))  # a training atom finds itself (rattled cells)


def test_molecules_and_unknown_elements(named):
    name, model = named
    water = molecule("H2O")
    pred = evaluate(model, Batch.from_atoms([water]))
    assert bool(torch.isfinite(pred.forces_conservative).all())
    with pytest.raises(InputError, match="does not know element"):
        model(Batch.from_atoms([bulk("Og", "fcc", a=5.0)]))


def test_sevennet_names_that_would_download_are_refused():
    pytest.importorskip("sevenn", reason="sevenn is not installed (pip install 'atomuq[pretrained]')")
    from atomuq.models.adapters.pretrained import load_sevennet

    with pytest.raises(ModelFileError, match="never does"):
        load_sevennet("sevennet-omat")
