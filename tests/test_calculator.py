"""The ASE calculator exposes every result and agrees with the library and with ASE's numerics."""

import numpy as np
import pytest
import torch
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import FiniteDifferenceCalculator

from atomuq.calculator import EXTRA_RESULTS, AtomuqCalculator
from atomuq.core.batch import Batch
from atomuq.core.io import Record, reference_energy, reference_forces
from atomuq.core.schema import REGISTRY, SCHEMA_VERSION
from atomuq.models.checkpoint import weights_fingerprint
from atomuq.models.derivatives import evaluate
from atomuq.workflows.score import score_records
from conftest import copper_cell, ethanol, triclinic_alcu


def test_direct_forces_by_default_and_all_results(native_model):
    atoms = ethanol()
    atoms.calc = AtomuqCalculator(native_model)
    forces = atoms.get_forces()
    r = atoms.calc.results
    assert np.allclose(forces, r["forces_direct"])
    pred = evaluate(native_model, Batch.from_atoms([atoms], dtype=torch.float64))
    assert atoms.get_potential_energy() == pytest.approx(pred.energy.item())
    assert np.allclose(r["forces_conservative"], pred.forces_conservative.detach().numpy())
    u = np.linalg.norm(r["forces_direct"] - r["forces_conservative"], axis=1)
    assert np.allclose(r["force_delta_atoms"], u)
    assert r["force_delta"] == pytest.approx(np.sqrt((u**2).sum() / (3 * len(atoms))))
    assert r["force_delta_max"] == pytest.approx(u.max())
    assert r["confidence_error_atoms"].shape == (len(atoms),) and np.all(r["confidence_error_atoms"] >= 0)
    assert r["confidence_error"] == pytest.approx(r["confidence_error_atoms"].mean())
    assert r["model_energy"] == r["energy"] == r["free_energy"]
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()
    with pytest.raises(PropertyNotImplementedError, match="rotational_gradient=True"):
        atoms.calc.get_property("rotational_gradient", atoms)


def test_conservative_mode_and_numerical_stress(native_model):
    atoms = triclinic_alcu()
    atoms.calc = AtomuqCalculator(native_model, forces="conservative")
    assert np.allclose(atoms.get_forces(), atoms.calc.results["forces_conservative"])
    numerical = FiniteDifferenceCalculator(atoms.calc, eps_strain=1e-5).get_stress(atoms)
    assert np.allclose(atoms.get_stress(), numerical, atol=1e-6)
    assert atoms.get_stress().shape == (6,)


def test_direct_stress_head_is_used_in_direct_mode(native_stress_model):
    atoms = copper_cell()
    atoms.calc = AtomuqCalculator(native_stress_model)
    stress = atoms.get_stress()
    assert np.allclose(stress, atoms.calc.results["stress_direct"])
    assert not np.allclose(stress, atoms.calc.results["stress_virial"])


def test_rotational_gradient_on_request(native_model):
    atoms = ethanol()
    atoms.calc = AtomuqCalculator(native_model, rotational_gradient=True)
    delta = atoms.calc.get_property("rotational_gradient", atoms)
    assert delta.shape == (3, 3) and np.allclose(delta, -delta.T)
    assert atoms.calc.get_property("rotational_gradient_norm", atoms) == pytest.approx(np.linalg.norm(delta))


def test_results_follow_the_structure(native_model):
    atoms = ethanol()
    atoms.calc = AtomuqCalculator(native_model)
    e0 = atoms.get_potential_energy()
    atoms.positions[0] += 0.1
    assert atoms.get_potential_energy() != pytest.approx(e0)


def test_bad_force_mode(native_model):
    with pytest.raises(ValueError, match="'direct' or 'conservative'"):
        AtomuqCalculator(native_model, forces="both")


def test_results_not_in_ase_survive_ase_io_write(native_model, tmp_path):
    from ase.io import read, write

    atoms = ethanol()
    atoms.calc = AtomuqCalculator(native_model, rotational_gradient=True)
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    results = dict(atoms.calc.results)
    write(tmp_path / "e.extxyz", atoms)
    back = read(tmp_path / "e.extxyz")
    assert back.get_potential_energy() == pytest.approx(energy, abs=1e-12)
    assert np.allclose(back.get_forces(), forces, atol=1e-7)
    written = [name for name in EXTRA_RESULTS if name in results]
    assert {"force_delta", "force_delta_atoms", "forces_conservative", "confidence_error_atoms",
            "rotational_gradient", "model_energy"} <= set(written)
    for name in written:
        value = back.arrays[name] if REGISTRY[name].level == "atom" else back.info[name]
        assert np.allclose(value, results[name], atol=1e-7), name
    assert back.info["atomuq_model_fingerprint"] == weights_fingerprint(native_model)
    assert back.info["atomuq_schema_version"] == SCHEMA_VERSION and "atomuq_version" in back.info
    # the model's own predictions never read back as reference labels
    assert reference_forces(back) is None and reference_energy(back) is None
    assert reference_forces(atoms) is None and reference_energy(atoms) is None


def test_get_property_without_atoms_follows_the_moved_structure(native_model):
    atoms = ethanol()
    atoms.calc = AtomuqCalculator(native_model)
    before = atoms.calc.get_property("force_delta", atoms)
    atoms.positions[0] += 0.2
    after = atoms.calc.get_property("force_delta")
    fresh = ethanol()
    fresh.positions[0] += 0.2
    fresh.calc = AtomuqCalculator(native_model)
    assert after != pytest.approx(before) and after == pytest.approx(fresh.calc.get_property("force_delta", fresh))
    assert atoms.info["force_delta"] == pytest.approx(after)  # the values on the atoms follow too


def test_calculator_and_score_agree_on_every_shared_key(native_model):
    atoms = ethanol()
    (scored,), _ = score_records([Record(atoms, "e.extxyz", 0)], native_model)
    atoms.calc = AtomuqCalculator(native_model)
    atoms.get_forces()
    shared = 0
    for name, value in atoms.calc.results.items():
        if name in scored.info or name in scored.arrays:
            stored = scored.info[name] if name in scored.info else scored.arrays[name]
            assert np.allclose(stored, value, atol=1e-10), name
            shared += 1
    assert shared >= 8
    assert np.allclose(scored.get_forces(), atoms.get_forces()) and scored.get_potential_energy() == pytest.approx(
        atoms.get_potential_energy())
