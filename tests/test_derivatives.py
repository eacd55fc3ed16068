"""Conservative forces, virial stress and the rotational gradient against finite differences,
supercells, translation, batching, and the Force Delta on a synthetic model with a known answer."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from scipy.linalg import expm

from atomuq.core.batch import Batch, scatter_sum
from atomuq.core.errors import ModelError
from atomuq.models.derivatives import evaluate, rotational_gradient_norm
from atomuq.models.protocol import AtomisticModel, ModelOutput
from atomuq.uq.force_delta import force_delta
from conftest import copper_cell, ethanol, make_native, triclinic_alcu


def energy_of(model, atoms: Atoms) -> float:
    pred = evaluate(model, Batch.from_atoms([atoms], dtype=torch.float64), conservative=False)
    return float(pred.energy.detach()[0])


@pytest.mark.parametrize("make", [ethanol, copper_cell, triclinic_alcu])
def test_conservative_forces_match_finite_differences(native_model, make):
    atoms = make()
    pred = evaluate(native_model, Batch.from_atoms([atoms], dtype=torch.float64))
    h = 1e-5
    rng = np.random.default_rng(0)
    for a in rng.choice(len(atoms), size=min(4, len(atoms)), replace=False):
        for c in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[a, c] += h
            minus.positions[a, c] -= h
            fd = -(energy_of(native_model, plus) - energy_of(native_model, minus)) / (2 * h)
            assert pred.forces_conservative[a, c].item() == pytest.approx(fd, abs=1e-6)


@pytest.mark.parametrize("make", [copper_cell, triclinic_alcu])
def test_virial_stress_matches_finite_difference_strain(native_model, make):
    atoms = make()
    pred = evaluate(native_model, Batch.from_atoms([atoms], dtype=torch.float64), stress=True)
    volume = atoms.get_volume()
    h = 1e-6
    voigt = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    for k, (a, b) in enumerate(voigt):
        values = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[a, b] += sign * h / (1 if a == b else 2)
            strain[b, a] += 0 if a == b else sign * h / 2
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            values.append(energy_of(native_model, strained))
        fd = (values[0] - values[1]) / (2 * h) / volume
        assert pred.stress_virial[0, k].item() == pytest.approx(fd, abs=1e-7)


def test_stress_is_zero_for_non_periodic(native_model):
    pred = evaluate(native_model, Batch.from_atoms([ethanol()], dtype=torch.float64), stress=True)
    assert torch.all(pred.stress_virial == 0) and not bool(pred.periodic[0])


def test_supercell_scales_energy_and_keeps_per_atom_quantities(native_model):
    atoms = triclinic_alcu()
    big = atoms * (2, 2, 2)
    small_pred = evaluate(native_model, Batch.from_atoms([atoms], dtype=torch.float64))
    big_batch = Batch.from_atoms([big], dtype=torch.float64)
    big_pred = evaluate(native_model, big_batch)
    assert big_pred.energy.item() == pytest.approx(8 * small_pred.energy.item(), rel=1e-10)
    tiled = lambda t: t.repeat(8, 1)  # ase repeats the whole cell block by block  # noqa: E731
    assert torch.allclose(big_pred.forces_conservative, tiled(small_pred.forces_conservative), atol=1e-9)
    assert torch.allclose(big_pred.forces_direct, tiled(small_pred.forces_direct), atol=1e-9)
    fd_small = force_delta(small_pred, Batch.from_atoms([atoms], dtype=torch.float64))
    fd_big = force_delta(big_pred, big_batch)
    assert fd_big.per_structure["force_delta"].item() == pytest.approx(fd_small.per_structure["force_delta"].item(), rel=1e-9)
    assert torch.allclose(fd_big.per_atom["force_delta"], fd_small.per_atom["force_delta"].repeat(8), atol=1e-9)


@pytest.mark.parametrize("make", [ethanol, triclinic_alcu])
def test_translation_invariance(native_model, make):
    atoms = make()
    moved = atoms.copy()
    moved.positions += np.array([0.37, -1.3, 2.9])
    p0 = evaluate(native_model, Batch.from_atoms([atoms], dtype=torch.float64))
    p1 = evaluate(native_model, Batch.from_atoms([moved], dtype=torch.float64))
    assert p1.energy.item() == pytest.approx(p0.energy.item(), abs=1e-10)
    assert torch.allclose(p0.forces_direct, p1.forces_direct, atol=1e-10)
    assert torch.allclose(p0.forces_conservative, p1.forces_conservative, atol=1e-10)


def test_batched_equals_one_by_one(native_stress_model):
    structures = [ethanol(), copper_cell(), molecule("H2O"), triclinic_alcu()]
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    together = evaluate(native_stress_model, batch, stress=True, rotational=True)
    fd_together = force_delta(together, batch)
    for b, atoms in enumerate(structures):
        single_batch = Batch.from_atoms([atoms], dtype=torch.float64)
        single = evaluate(native_stress_model, single_batch, stress=True, rotational=True)
        sl = slice(int(batch.ptr[b]), int(batch.ptr[b + 1]))
        assert together.energy[b].item() == pytest.approx(single.energy.item(), abs=1e-10)
        for name in ("forces_direct", "forces_conservative", "node_features", "confidence_logits"):
            assert torch.allclose(getattr(together, name)[sl], getattr(single, name), atol=1e-10), name
        for name in ("stress_virial", "stress_direct", "rotational_gradient"):
            assert torch.allclose(getattr(together, name)[b], getattr(single, name)[0], atol=1e-10), name
        fd_single = force_delta(single, single_batch)
        assert fd_together.per_structure["force_delta"][b].item() == pytest.approx(
            fd_single.per_structure["force_delta"].item(), rel=1e-10)


def test_direct_forces_have_no_net_force(native_model):
    pred = evaluate(native_model, Batch.from_atoms([ethanol(), copper_cell()], dtype=torch.float64))
    assert torch.allclose(pred.forces_direct[:9].sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(pred.forces_direct[9:].sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-10)


def test_force_delta_known_answer_on_synthetic_model(pair_model):
    structures = [ethanol(), copper_cell()]
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    pred = evaluate(pair_model, batch)
    # the direct head is the analytic gradient plus a known field, so u_i = |field_i|
    field = pair_model.field(batch.positions)
    expected_atoms = torch.linalg.norm(field, dim=1)
    result = force_delta(pred, batch)
    assert torch.allclose(result.per_atom["force_delta"], expected_atoms, atol=1e-10)
    for b in range(2):
        sl = slice(int(batch.ptr[b]), int(batch.ptr[b + 1]))
        expected = torch.sqrt((field[sl] ** 2).sum() / (3 * len(structures[b])))
        assert result.per_structure["force_delta"][b].item() == pytest.approx(expected.item(), rel=1e-10)
    # errors against a reference equal to the analytic forces: eps_c = 0, eps_nc = U_Delta
    reference = pred.forces_conservative.detach()
    with_ref = force_delta(pred, batch, reference)
    assert torch.allclose(with_ref.per_structure["eps_c"], torch.zeros(2, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(with_ref.per_structure["eps_nc"], result.per_structure["force_delta"], atol=1e-10)


def test_force_delta_excludes_fixed_atoms(pair_model):
    from ase.constraints import FixAtoms

    atoms = ethanol()
    atoms.set_constraint(FixAtoms(indices=[0, 1, 2]))
    batch = Batch.from_atoms([atoms], dtype=torch.float64)
    assert batch.fixed.tolist()[:4] == [True, True, True, False]
    pred = evaluate(pair_model, batch)
    u = force_delta(pred, batch, exclude_fixed=False).per_atom["force_delta"]
    free = torch.sqrt((u[3:] ** 2).sum() / (3 * (len(atoms) - 3)))
    assert force_delta(pred, batch).per_structure["force_delta"].item() == pytest.approx(free.item(), rel=1e-12)


def test_force_delta_needs_a_direct_head(native_model):
    batch = Batch.from_atoms([ethanol()], dtype=torch.float64)
    pred = evaluate(native_model, batch)
    pred.forces_direct = None
    with pytest.raises(ValueError, match="direct force head"):
        force_delta(pred, batch)


def test_rotational_gradient_vanishes_for_invariant_model(pair_model):
    batch = Batch.from_atoms([ethanol(), triclinic_alcu()], dtype=torch.float64)
    pred = evaluate(pair_model, batch, rotational=True)
    assert torch.allclose(rotational_gradient_norm(pred), torch.zeros(2, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("make", [ethanol, triclinic_alcu])
def test_rotational_gradient_matches_finite_rotation(native_model, make):
    atoms = make()
    pred = evaluate(native_model, Batch.from_atoms([atoms], dtype=torch.float64), rotational=True)
    delta = pred.rotational_gradient[0].numpy()
    assert np.abs(delta).max() > 1e-6  # the native model is not invariant by construction
    h = 1e-5
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        generator = np.zeros((3, 3))
        generator[a, b], generator[b, a] = 1.0, -1.0
        values = []
        for sign in (1, -1):
            rot = expm(sign * h * generator)
            rotated = atoms.copy()
            rotated.positions = atoms.positions @ rot
            rotated.cell = atoms.cell.array @ rot
            values.append(energy_of(native_model, rotated))
        assert delta[a, b] == pytest.approx((values[0] - values[1]) / (2 * h), abs=1e-7)
    assert np.allclose(delta, -delta.T)


def test_models_with_different_seeds_differ():
    a, b = make_native(seed=0), make_native(seed=5)
    batch = Batch.from_atoms([ethanol()], dtype=torch.float64)
    assert not torch.allclose(evaluate(a, batch).energy, evaluate(b, batch).energy)


def test_energy_spread_under_rotations(native_model, pair_model):
    from atomuq.core.rotations import random_rotations
    from atomuq.uq.equigrad import energy_spread_under_rotations

    rots = random_rotations(8, torch.Generator().manual_seed(1)).numpy()
    assert np.allclose(np.einsum("nij,nkj->nik", rots, rots), np.eye(3)) and np.allclose(np.linalg.det(rots), 1)
    assert energy_spread_under_rotations(pair_model, ethanol(), 8) < 1e-10
    assert energy_spread_under_rotations(native_model, ethanol(), 8) > 1e-6


def test_batch_names_its_atom_counts_and_atom_to_structure_index():
    structures = [ethanol(), molecule("H2O"), triclinic_alcu()]
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    sizes = [len(a) for a in structures]
    assert batch.atoms_per_structure.tolist() == sizes
    assert batch.structure_index.tolist() == [b for b, n in enumerate(sizes) for _ in range(n)]
    assert batch.ptr.tolist() == [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    assert not hasattr(batch, "n_atoms") and not hasattr(batch, "batch")  # one name each (renamed in this version)
    sub = batch.select(torch.tensor([2, 0]))
    assert sub.atoms_per_structure.tolist() == [sizes[2], sizes[0]]
    assert sub.structure_index.tolist() == [0] * sizes[2] + [1] * sizes[0]
    assert torch.equal(sub.positions[: sizes[2]], batch.positions[-sizes[2]:])


class DetachedModel(AtomisticModel):
    """A model that computes its energy from the positions outside autograd (and has no parameters)."""

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64

    def forward(self, batch: Batch) -> ModelOutput:
        r = batch.positions.detach()
        return ModelOutput(energy=scatter_sum((r**2).sum(1), batch.structure_index, batch.num_structures))


def test_an_energy_without_autograd_graph_is_refused_with_a_message_not_a_runtime_error(pair_model):
    from atomuq.calculator import AtomuqCalculator

    batch = Batch.from_atoms([molecule("H2O")], dtype=torch.float64)
    model = DetachedModel()
    assert evaluate(model, batch, conservative=False).energy.item() > 0  # the energy alone needs no graph
    for options in ({}, {"conservative": False, "stress": True}, {"conservative": False, "rotational": True}):
        with pytest.raises(ModelError, match=r"DetachedModel: its energy has no autograd graph.*batch\.positions"):
            evaluate(model, batch, **options)
    atoms = molecule("H2O")
    atoms.calc = AtomuqCalculator(model, conservative="always")
    with pytest.raises(ModelError, match="no autograd graph"):
        atoms.get_forces()
    lone = Batch.from_atoms([Atoms("H", positions=[[0.0, 0.0, 0.0]])], dtype=torch.float64)
    assert torch.equal(evaluate(pair_model, lone).forces_conservative, torch.zeros(1, 3, dtype=torch.float64))  # no edges
