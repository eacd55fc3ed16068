"""The ASE calculator exposes every result and agrees with the library and with ASE's numerics."""

import numpy as np
import pytest
import torch
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import FiniteDifferenceCalculator

from atomuq.calculator import AtomuqCalculator
from atomuq.core.batch import Batch
from atomuq.models.derivatives import evaluate
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
    assert r["confidence_error"].shape == (len(atoms),) and np.all(r["confidence_error"] >= 0)
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
