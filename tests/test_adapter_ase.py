"""Any ASE calculator as an atomuq model: its energies, forces and stress come back through
atomuq.models.derivatives; the Force Delta and second derivatives are refused clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from atomuq.core.batch import Batch
from atomuq.core.errors import InputError, ModelFileError
from atomuq.core.io import Record
from atomuq.models.adapters.ase_calculator import CalculatorModel
from atomuq.models.derivatives import evaluate
from atomuq.models.registry import resolve_model
from atomuq.uq.force_delta import force_delta
from atomuq.workflows.score import score_records


class Harmonic(Calculator):
    """Energy sum_i |r_i - r0_i|^2 with r0 the first positions seen: forces only, no stress, not invariant."""

    implemented_properties = ("energy", "forces")

    def __init__(self, anchor: np.ndarray) -> None:
        super().__init__()
        self.anchor = anchor

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        d = self.atoms.positions - self.anchor
        self.results = {"energy": float((d**2).sum()), "forces": -2 * d}


def copper():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=0)
    atoms.set_cell(
        atoms.cell.array
        @ np.array([[1.0, 0.02, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.01]]),
        scale_atoms=True,
    )
    return atoms


def test_emt_energy_forces_stress_come_back_unchanged():
    model = resolve_model("ase:ase.calculators.emt:EMT")
    atoms = [copper(), molecule("CH3CH2OH")]
    atoms[1].rattle(0.05, seed=1)
    batch = Batch.from_atoms(atoms, dtype=model.dtype)
    pred = evaluate(model, batch, conservative=True, stress=True, rotational=True)
    for k, a in enumerate(atoms):
        a.calc = EMT()
        assert float(pred.energy[k]) == pytest.approx(
            a.get_potential_energy(), abs=1e-10
        )
        np.testing.assert_allclose(
            batch.split(pred.forces_conservative)[k].numpy(), a.get_forces(), atol=1e-10
        )
    np.testing.assert_allclose(
        pred.stress_virial[0].numpy(), atoms[0].get_stress(), atol=1e-10
    )
    assert pred.forces_direct is None and not model.has_direct_forces


def test_rotational_gradient_of_a_molecule_is_the_net_torque():
    mol = molecule("H2O")
    anchor = mol.positions + np.array(
        [[0.1, 0.0, 0.0], [0.0, -0.2, 0.0], [0.0, 0.0, 0.3]]
    )
    model = CalculatorModel(Harmonic(anchor))
    batch = Batch.from_atoms([mol], dtype=torch.float64)
    pred = evaluate(model, batch, conservative=True, rotational=True)
    forces = -2 * (mol.positions - anchor)
    # dE/dG at G = 0 for R = exp(G - G^T): W - W^T with W_ab = -sum_i r_ia F_ib
    w = -mol.positions.T @ forces
    np.testing.assert_allclose(pred.rotational_gradient[0].numpy(), w - w.T, atol=1e-12)


def test_force_delta_and_second_derivatives_are_refused_clearly():
    model = resolve_model("ase:ase.calculators.emt:EMT")
    batch = Batch.from_atoms([copper()], dtype=torch.float64)
    with pytest.raises(ValueError, match="conservative-only"):
        force_delta(evaluate(model, batch), batch)
    with pytest.raises(ValueError, match="no second derivatives"):
        evaluate(model, batch, create_graph=True)
    with pytest.raises(InputError, match="direct force head"):
        score_records([Record(copper(), "cu.extxyz", 0)], model)


def test_periodic_stress_needs_a_calculator_with_stress():
    atoms = copper()
    model = CalculatorModel(Harmonic(atoms.positions.copy()))
    batch = Batch.from_atoms([atoms], dtype=torch.float64)
    assert evaluate(model, batch).forces_conservative.shape == (32, 3)
    with pytest.raises(ValueError, match="gives no stress"):
        evaluate(model, batch, stress=True)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("ase:", "expected ase:MODULE:CLASS"),
        ("ase:ase.calculators.emt:Nope", "module ase.calculators.emt has no attribute Nope"),
        ("ase:no_such_module:X", "cannot import module no_such_module"),
        ("ase:collections:OrderedDict", "OrderedDict is not an ASE calculator"),
        ("ase:ase.calculators.singlepoint:SinglePointCalculator", r"SinglePointCalculator\(\) failed"),
        ("ase:ase.calculators:emt", "is not a class; an ASE calculator class is written MODULE:CLASS"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ModelFileError, match=match):
        resolve_model(spec)


def test_old_dotted_spelling_is_read_with_a_deprecation_warning():
    with pytest.warns(FutureWarning, match="write ase:ase.calculators.emt:EMT"):
        model = resolve_model("ase:ase.calculators.emt.EMT")
    assert isinstance(model, CalculatorModel) and isinstance(model.calculator, EMT)
    assert model.source == "ase:ase.calculators.emt:EMT"


def test_a_failing_calculator_is_named_with_the_structure():
    class Broken(Calculator):
        implemented_properties = ("energy", "forces")

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            raise RuntimeError("no convergence")

    model = CalculatorModel(Broken(), name="ase:tests:Broken")
    batch = Batch.from_atoms([molecule("H2O"), molecule("CH4")], dtype=torch.float64)
    with pytest.raises(InputError, match=r"ase:tests:Broken failed on structure 0 of the batch \(H2O\): RuntimeError: no convergence"):
        evaluate(model, batch)


def test_md_through_the_adapter_follows_the_calculators_own_trajectory():
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from atomuq.calculator import AtomuqCalculator

    trajectories = []
    for calc in (EMT(), AtomuqCalculator(CalculatorModel(EMT()))):
        atoms = copper()
        atoms.calc = calc
        VelocityVerlet(atoms, timestep=2 * units.fs).run(10)
        trajectories.append(atoms.positions.copy())
    np.testing.assert_allclose(trajectories[1], trajectories[0], atol=1e-9)


def test_a_missing_adapter_package_names_the_extra_to_install():
    from atomuq.core.errors import AtomuqError
    from atomuq.models.adapters import require

    with pytest.raises(AtomuqError, match=r"pip install 'atomuq\[orb\]'"):
        require("no_such_package_for_atomuq", "orb")
