"""Derivative formulas against an analytic model whose forces, strain derivative, virial stress and
rotational gradient are known in closed form (written to kill the mutants that survived the rest of
the suite, see docs/mutation_testing.md).

The model: E_b = Σ_i (a·r_i + k/2 |r_i|²) + p·V_b over the atoms i of structure b, so that
F_i = −(a + k r_i), and for r' = r (I + g), h' = h (I + g): W = dE/dg = Σ_i r_i ⊗ (a + k r_i) + p V I,
σ = sym(W) / V, Δ_rot = W − Wᵀ = Σ_i (r_i ⊗ a − a ⊗ r_i).
"""

import math

import numpy as np
import pytest
import torch
from ase import Atoms

from atomuq.core.batch import Batch, scatter_sum
from atomuq.core.rotations import random_rotations
from atomuq.models.derivatives import Prediction, evaluate, rotational_gradient_norm, to_voigt
from atomuq.models.protocol import AtomisticModel, ModelOutput
from atomuq.uq.equigrad import energy_spread_under_rotations, rotational_gradient

A = np.array([0.3, -0.2, 0.5])
K = 0.7
P = 0.05


class FieldModel(AtomisticModel):
    """The analytic model above, with a constant direct force and direct stress head."""

    dtype = torch.float64
    has_direct_forces = True

    def __init__(self, differentiable: bool = True) -> None:
        super().__init__()
        self.differentiable = differentiable

    def forward(self, batch: Batch) -> ModelOutput:
        r = batch.positions
        a = torch.as_tensor(A, dtype=r.dtype)
        per_atom = r @ a + 0.5 * K * (r * r).sum(-1)
        energy = scatter_sum(per_atom, batch.structure_index, batch.num_structures) + P * torch.linalg.det(batch.cell).abs()
        return ModelOutput(energy=energy, forces=torch.ones_like(r), stress=torch.full((batch.num_structures, 6), 2.0,
                                                                                       dtype=r.dtype))


def structures() -> tuple[list[Atoms], Batch]:
    box = Atoms("H2", positions=[[0.1, 0.2, 0.3], [1.0, -0.5, 0.4]], cell=[[3.0, 0.0, 0.0], [0.5, 2.0, 0.0], [0.0, 0.3, 4.0]],
                pbc=True)
    mol = Atoms("HHO", positions=[[0.0, 0.0, 0.0], [0.7, 0.1, -0.2], [-0.3, 0.6, 0.2]])
    return [box, mol], Batch.from_atoms([box, mol], dtype=torch.float64)


def strain_derivative(atoms: Atoms) -> np.ndarray:
    """W = Σ_i r_i ⊗ (a + k r_i) + p V I, by hand."""
    r = atoms.positions
    w = sum(np.outer(ri, A + K * ri) for ri in r)
    return w + P * abs(np.linalg.det(atoms.cell.array)) * np.eye(3)


def voigt(m: np.ndarray) -> list[float]:
    s = 0.5 * (m + m.T)
    return [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]


def test_to_voigt_symmetrises_in_voigt_order():
    m = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]])
    assert to_voigt(m).tolist() == [[1.0, 5.0, 9.0, 7.0, 5.0, 3.0], [0.0, 0.0, 0.0, 0.0, 1.0, 0.5]]


def test_conservative_forces_strain_derivative_stress_and_rotational_gradient_by_hand():
    atoms, batch = structures()
    pred = evaluate(FieldModel(), batch, stress=True, rotational=True)
    assert np.allclose(pred.forces_conservative.numpy(), -(A + K * batch.positions.numpy()))
    assert pred.forces_direct.tolist() == [[1.0] * 3] * 5 and pred.stress_direct.tolist() == [[2.0] * 6] * 2
    assert pred.periodic.tolist() == [True, False]
    for b, a in enumerate(atoms):
        w = strain_derivative(a)
        assert np.allclose(pred.strain_derivative[b].numpy(), w)
        assert np.allclose(pred.rotational_gradient[b].numpy(), w - w.T)
        rot = sum(np.outer(ri, A) - np.outer(A, ri) for ri in a.positions)
        assert np.allclose(pred.rotational_gradient[b].numpy(), rot)
    volume = abs(np.linalg.det(atoms[0].cell.array))
    assert np.allclose(pred.stress_virial[0].numpy(), np.array(voigt(strain_derivative(atoms[0]))) / volume)
    assert pred.stress_virial[1].tolist() == [0.0] * 6  # non-periodic: no stress, no NaN
    norms = rotational_gradient_norm(pred)
    assert norms.tolist() == pytest.approx([float(np.linalg.norm(pred.rotational_gradient[b].numpy())) for b in range(2)])
    result = rotational_gradient(pred)
    assert result.per_structure["rotational_gradient_norm"].tolist() == norms.tolist()
    assert result.per_structure["rotational_gradient"].tolist() == pred.rotational_gradient.tolist()
    assert result.units["rotational_gradient_norm"] == "eV"


def test_requested_quantities_only():
    _, batch = structures()
    plain = evaluate(FieldModel(), batch, conservative=False)
    assert plain.forces_conservative is None and plain.strain_derivative is None and plain.stress_virial is None
    assert not plain.energy.requires_grad
    stress_only = evaluate(FieldModel(), batch, conservative=False, stress=True)
    assert stress_only.forces_conservative is None and stress_only.rotational_gradient is None
    assert stress_only.stress_virial is not None and stress_only.strain_derivative is not None
    rotational_only = evaluate(FieldModel(), batch, rotational=True)
    assert rotational_only.stress_virial is None and rotational_only.rotational_gradient is not None
    forces_only = evaluate(FieldModel(), batch)
    assert forces_only.strain_derivative is None and forces_only.stress_virial is None
    with pytest.raises(ValueError, match="rotational gradient was not computed"):
        rotational_gradient_norm(forces_only)


def test_energy_matches_the_closed_form():
    atoms, batch = structures()
    pred = evaluate(FieldModel(), batch, stress=True)
    for b, a in enumerate(atoms):
        r = a.positions
        want = float((r @ A).sum() + 0.5 * K * (r * r).sum() + P * abs(np.linalg.det(a.cell.array)))
        assert float(pred.energy[b].detach()) == pytest.approx(want)


def test_second_derivatives_flow_to_positions_that_require_grad():
    _, batch = structures()
    positions = batch.positions.clone().requires_grad_(True)
    pred = evaluate(FieldModel(), batch.replace(positions=positions), create_graph=True)
    assert pred.forces_conservative.requires_grad
    (grad,) = torch.autograd.grad(pred.forces_conservative.sum(), positions)
    assert torch.allclose(grad, torch.full_like(grad, -K))  # dF_ic/dr_ic = -k
    detached = pred.detach()
    assert not detached.forces_conservative.requires_grad and detached.periodic.tolist() == [True, False]
    assert torch.equal(detached.forces_conservative, pred.forces_conservative.detach())
    without = evaluate(FieldModel(), batch)
    assert not without.forces_conservative.requires_grad


def test_create_graph_needs_a_differentiable_model():
    _, batch = structures()
    with pytest.raises(ValueError, match="no second derivatives"):
        evaluate(FieldModel(differentiable=False), batch, create_graph=True)
    assert evaluate(FieldModel(differentiable=False), batch).forces_conservative is not None


def test_prediction_detach_keeps_every_field():
    pred = Prediction(energy=torch.ones(2, requires_grad=True) * 2.0, periodic=torch.tensor([True, False]))
    out = pred.detach()
    assert out.energy.tolist() == [2.0, 2.0] and not out.energy.requires_grad
    assert out.forces_direct is None and out.periodic.tolist() == [True, False]


def test_energy_spread_under_rotations_by_hand():
    # E(R) = a·R Σ r_i + rotation-invariant terms: its sample standard deviation over the same rotations
    mol = Atoms("HHO", positions=[[0.0, 0.0, 0.0], [0.7, 0.1, -0.2], [-0.3, 0.6, 0.2]])
    rotations = random_rotations(5, torch.Generator().manual_seed(4)).numpy()
    energies = [A @ (rot @ mol.positions.sum(axis=0)) for rot in rotations]
    want = float(np.std(energies, ddof=1))
    assert energy_spread_under_rotations(FieldModel(), mol, n_rotations=5, seed=4) == pytest.approx(want)
    assert energy_spread_under_rotations(FieldModel(), mol, n_rotations=5, seed=4, batch_size=2) == pytest.approx(want)
    assert want > 0.01 and not math.isnan(want)


class ElementModel(AtomisticModel):
    """Energy from per-element reference energies alone (trainable, like the native model's): independent of
    positions and cell, so autograd reports those inputs as unused."""

    dtype = torch.float64

    def __init__(self) -> None:
        super().__init__()
        self.reference = torch.nn.Parameter(torch.tensor(-0.5, dtype=torch.float64))

    def forward(self, batch: Batch) -> ModelOutput:
        per_atom = batch.numbers.to(torch.float64) * self.reference
        return ModelOutput(energy=scatter_sum(per_atom, batch.structure_index, batch.num_structures))


def test_a_model_independent_of_positions_has_zero_forces_stress_and_rotational_gradient():
    atoms, batch = structures()
    pred = evaluate(ElementModel(), batch, stress=True, rotational=True)
    assert pred.energy.detach().tolist() == [-1.0, -5.0]
    assert pred.forces_conservative.tolist() == [[0.0] * 3] * 5
    assert pred.stress_virial.tolist() == [[0.0] * 6] * 2 and pred.rotational_gradient.abs().sum() == 0


def test_stress_needs_periodicity_along_all_three_axes():
    slab = Atoms("H2", positions=[[0.1, 0.2, 0.3], [1.0, -0.5, 0.4]], cell=[3.0, 2.0, 10.0], pbc=[True, True, False])
    bulk = slab.copy()
    bulk.pbc = True
    pred = evaluate(FieldModel(), Batch.from_atoms([slab, bulk], dtype=torch.float64), stress=True)
    assert pred.periodic.tolist() == [False, True]
    assert pred.stress_virial[0].tolist() == [0.0] * 6
    assert np.allclose(pred.stress_virial[1].numpy(), np.array(voigt(strain_derivative(bulk))) / 60.0)


def test_derivatives_are_taken_even_under_no_grad():
    atoms, batch = structures()
    with torch.no_grad():  # as in energy_spread_under_rotations and inference loops
        stress_only = evaluate(FieldModel(), batch, conservative=False, stress=True)
        forces = evaluate(FieldModel(), batch)
    volume = abs(np.linalg.det(atoms[0].cell.array))
    assert np.allclose(stress_only.stress_virial[0].numpy(), np.array(voigt(strain_derivative(atoms[0]))) / volume)
    assert np.allclose(forces.forces_conservative.numpy(), -(A + K * batch.positions.numpy()))
