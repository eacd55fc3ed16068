"""A small PET (metatrain) with an energy and a non-conservative force head, exported and loaded
through the metatomic adapter, against metatomic's own ASE calculator.

The protocol checks (finite differences of forces and stress, batching, node features, the
round trip export -> load) are in test_conformance.py."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from ase.build import molecule

pytest.importorskip(
    "metatomic.torch",
    reason="metatomic-torch is not installed (pip install 'atomuq[metatomic]')",
)
pytest.importorskip(
    "metatrain.pet",
    reason="metatrain is not installed (pip install 'atomuq[metatomic]')",
)

from metatomic_ase import MetatomicCalculator

from atomuq.core.batch import Batch
from atomuq.core.errors import ModelFileError
from atomuq.models.adapters.metatomic import load_metatomic
from atomuq.models.derivatives import evaluate
from atomuq.models.registry import resolve_model
from atomuq.uq.force_delta import force_delta
from model_kinds import export_pet



@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    return export_pet(tmp_path_factory.mktemp("pet") / "pet-small.pt")


@pytest.fixture(scope="module")
def model(model_file):
    return resolve_model(f"metatomic:{model_file}")


def structures():
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.05, seed=1)
    box = molecule("CH3CH2OH")
    box.rattle(0.1, seed=2)
    box.set_cell([6.0, 6.0, 6.0])
    box.pbc = True
    box.center()
    return [ethanol, box]


def calculator_forces(model_file, atoms, non_conservative):
    atoms = atoms.copy()
    atoms.calc = MetatomicCalculator(model_file, non_conservative=non_conservative)
    return atoms.get_potential_energy(), atoms.get_forces()


def test_outputs_equal_metatomics_calculator(model, model_file):
    assert (
        model.has_direct_forces
        and model.dtype == torch.float64
        and model.elements == [1, 6, 7, 8]
    )
    atoms = structures()
    batch = Batch.from_atoms(atoms, dtype=torch.float64)
    pred = evaluate(model, batch, conservative=True).detach()
    for k, a in enumerate(atoms):
        energy, f_nc = calculator_forces(model_file, a, "forces")
        _, f_c = calculator_forces(model_file, a, False)
        assert float(pred.energy[k]) == pytest.approx(energy, abs=1e-8)
        np.testing.assert_allclose(
            batch.split(pred.forces_direct)[k].numpy(), f_nc, atol=1e-8
        )
        np.testing.assert_allclose(
            batch.split(pred.forces_conservative)[k].numpy(), f_c, atol=1e-8
        )
        u = np.linalg.norm(
            f_nc - f_c, axis=1
        )  # the Force Delta from metatomic's two force modes
        result = force_delta(pred, batch)
        np.testing.assert_allclose(
            batch.split(result.per_atom["force_delta"])[k].numpy(), u, atol=1e-8
        )
        assert float(result.per_structure["force_delta"][k]) == pytest.approx(
            np.sqrt((u**2).sum() / (3 * len(a)))
        )


def test_bad_files(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        resolve_model(f"metatomic:{tmp_path / 'missing.pt'}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not a loadable metatomic model"):
        load_metatomic(junk)
