"""Formulas of the UQ read-outs on tiny hand-computed inputs: the confidence head, the Force Delta, the
ensemble disagreement (written to kill the mutants that survived the rest of the suite, see
docs/mutation_testing.md)."""

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.constraints import FixAtoms

from atomuq.core.batch import Batch
from atomuq.core.errors import InputError
from atomuq.models.derivatives import Prediction
from atomuq.uq.confidence import bin_centres, confidence, error_bins
from atomuq.uq.ensemble import EnsemblePrediction, ensemble_uncertainty
from atomuq.uq.force_delta import force_delta, structure_rms


def two_structures(fixed: tuple[int, ...] = ()) -> Batch:
    """Structure 0 with atoms 0 and 1, structure 1 with atom 2; `fixed` are global indices held by FixAtoms."""
    a = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.8]])
    b = Atoms("O", positions=[[0, 0, 0]])
    for atoms, offset in ((a, 0), (b, 2)):
        own = [i - offset for i in fixed if offset <= i < offset + len(atoms)]
        if own:
            atoms.set_constraint(FixAtoms(indices=own))
    return Batch.from_atoms([a, b], dtype=torch.float64)


# --- confidence head -------------------------------------------------------------------------------------

EDGES = torch.tensor([0.0, 0.1, 0.3, 1.0], dtype=torch.float64)


def test_bin_centres_are_midpoints_of_the_edges():
    assert torch.allclose(bin_centres(EDGES), torch.tensor([0.05, 0.2, 0.65], dtype=torch.float64))


def test_confidence_expected_error_uses_bin_centres():
    # atom 0: p = (0.2, 0.3, 0.5); atom 1: p = (0.7, 0.2, 0.1); atom 2 (structure 1): p = (0.1, 0.1, 0.8)
    p = torch.tensor([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    logits = torch.log(p) + torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)  # softmax ignores a row shift
    result = confidence(logits, EDGES, two_structures())
    # by hand, with centres 0.05, 0.2, 0.65 eV/Å (upper edges 0.1, 0.3, 1.0 would give 0.61, 0.23, 0.84)
    expected = [0.2 * 0.05 + 0.3 * 0.2 + 0.5 * 0.65, 0.7 * 0.05 + 0.2 * 0.2 + 0.1 * 0.65, 0.1 * 0.05 + 0.1 * 0.2 + 0.8 * 0.65]
    assert expected == pytest.approx([0.395, 0.14, 0.545])
    assert result.per_atom["confidence_error"].tolist() == pytest.approx(expected, abs=1e-12)
    # per structure: the mean over its atoms, not the sum
    assert result.per_structure["confidence_error"].tolist() == pytest.approx([(0.395 + 0.14) / 2, 0.545], abs=1e-12)
    assert result.units["confidence_error"] == "eV/Å"


def test_error_bins_follow_half_open_bins_and_clip_to_the_ends():
    errors = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.3, 0.99, 5.0], dtype=torch.float64)
    bins = error_bins(errors, EDGES)
    # [0, 0.1) -> 0, [0.1, 0.3) -> 1, [0.3, inf) -> 2: the same convention as numpy.digitize
    assert bins.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert bins.tolist() == (np.digitize(errors.numpy(), EDGES.numpy()[1:-1])).tolist()


# --- Force Delta -----------------------------------------------------------------------------------------


def test_structure_rms_by_hand_and_with_a_mask():
    batch = two_structures()
    sq = torch.tensor([3.0, 12.0, 27.0], dtype=torch.float64)
    assert structure_rms(sq, batch).tolist() == pytest.approx([math.sqrt(15.0 / 6.0), 3.0])
    mask = torch.tensor([True, False, True])
    assert structure_rms(sq, batch, mask).tolist() == pytest.approx([1.0, 3.0])


def test_structure_rms_refuses_a_structure_with_no_counted_atoms():
    sq = torch.tensor([3.0, 12.0, 27.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"structures \[1\] have no counted atoms"):
        structure_rms(sq, two_structures(), torch.tensor([True, True, False]))


def prediction(stress: bool = True) -> Prediction:
    direct = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 4.0]], dtype=torch.float64)
    conservative = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    out = Prediction(energy=torch.zeros(2, dtype=torch.float64), forces_direct=direct, forces_conservative=conservative)
    if stress:
        out.stress_direct = torch.tensor([[1.0, 0, 0, 0, 0, 0], [2.0, 2, 2, 2, 2, 2]], dtype=torch.float64)
        out.stress_virial = torch.tensor([[0.0, 0, 0, 0, 0, 0], [1.0, 3, 2, 2, 2, 0]], dtype=torch.float64)
    return out


def test_force_delta_by_hand():
    # u = |F_nc - F_c| = |(0,2,2)|, |(0,-3,0)|, |(3,0,4)| = sqrt 8, 3, 5
    result = force_delta(prediction(), two_structures())
    assert result.per_atom["force_delta"].tolist() == pytest.approx([math.sqrt(8.0), 3.0, 5.0])
    assert result.per_structure["force_delta"].tolist() == pytest.approx([math.sqrt(17.0 / 6.0), 5.0 / math.sqrt(3.0)])
    # stress delta: RMS over the 6 Voigt components: sqrt(1/6) and sqrt((1 + 1 + 4)/6) = 1
    assert result.per_structure["force_delta_stress"].tolist() == pytest.approx([math.sqrt(1.0 / 6.0), 1.0])
    assert result.units["force_delta"] == "eV/Å" and result.units["force_delta_stress"] == "eV/Å³"
    assert "force_delta_stress" not in force_delta(prediction(stress=False), two_structures()).per_structure
    # a direct stress head evaluated without the virial (stress=False): no stress delta, no failure
    direct_only = prediction()
    direct_only.stress_virial = None
    assert "force_delta_stress" not in force_delta(direct_only, two_structures()).per_structure


def test_force_delta_errors_against_reference_forces_by_hand():
    reference = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    result = force_delta(prediction(), two_structures(), reference_forces=reference)
    # direct - ref: (0,0,2), (0,0,-1), (0,0,4); conservative - ref: (0,-2,0), (0,3,-1), (-3,0,0)
    assert result.per_atom["eps_nc"].tolist() == pytest.approx([2.0, 1.0, 4.0])
    assert result.per_structure["eps_nc"].tolist() == pytest.approx([math.sqrt(5.0 / 6.0), 4.0 / math.sqrt(3.0)])
    assert result.per_atom["eps_c"].tolist() == pytest.approx([2.0, math.sqrt(10.0), 3.0])
    assert result.per_structure["eps_c"].tolist() == pytest.approx([math.sqrt(14.0 / 6.0), math.sqrt(3.0)])


def test_force_delta_leaves_out_fixed_atoms_only_when_asked():
    batch = two_structures(fixed=(1,))
    kept = force_delta(prediction(), batch)
    assert kept.per_structure["force_delta"].tolist() == pytest.approx([math.sqrt(8.0 / 3.0), 5.0 / math.sqrt(3.0)])
    assert kept.per_atom["force_delta"].tolist() == pytest.approx([math.sqrt(8.0), 3.0, 5.0])  # per atom: all kept
    everything = force_delta(prediction(), batch, exclude_fixed=False)
    assert everything.per_structure["force_delta"].tolist() == pytest.approx([math.sqrt(17.0 / 6.0), 5.0 / math.sqrt(3.0)])


def test_force_delta_needs_both_force_kinds():
    with pytest.raises(ValueError, match="direct force head"):
        force_delta(Prediction(energy=torch.zeros(2), forces_conservative=torch.zeros(3, 3)), two_structures())
    with pytest.raises(ValueError, match="conservative forces"):
        force_delta(Prediction(energy=torch.zeros(2), forces_direct=torch.zeros(3, 3)), two_structures())


# --- ensemble --------------------------------------------------------------------------------------------


def ensemble_prediction() -> EnsemblePrediction:
    """Three members, three atoms (structures of 2 and 1 atoms): member m's force on atom i is base_i + m * step_i."""
    base = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    step = torch.tensor([[1.0, 1.0, 1.0], [0.0, 3.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    forces = torch.stack([base + m * step for m in (-1.0, 0.0, 1.0)])  # member offsets -1, 0, 1
    energy = torch.tensor([[1.0, 10.0], [2.0, 10.0], [6.0, 13.0]], dtype=torch.float64)
    return EnsemblePrediction(energy=energy, forces=forces)


def test_ensemble_means_by_hand():
    pred = ensemble_prediction()
    assert torch.allclose(pred.mean_forces, torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 2]], dtype=torch.float64))
    assert pred.mean_energy.tolist() == pytest.approx([3.0, 11.0])


@pytest.mark.parametrize("ddof", [0, 1])
def test_ensemble_std_by_hand(ddof):
    # offsets -1, 0, 1: Var_m of a component with step s is s^2 * 2/(3 - ddof)
    v = 2.0 / (3 - ddof)
    sums = [3.0 * v, 9.0 * v, 4.0 * v]  # Σ_c Var_m per atom
    result = ensemble_uncertainty(ensemble_prediction(), two_structures(), ddof=ddof)
    assert result.per_atom["ensemble_std"].tolist() == pytest.approx([math.sqrt(s / 3.0) for s in sums])
    assert result.per_structure["ensemble_std"].tolist() == pytest.approx(
        [math.sqrt((sums[0] + sums[1]) / 6.0), math.sqrt(sums[2] / 3.0)])
    # energies (1, 2, 6) and (10, 10, 13): squared deviations sum to 14 and 6
    assert result.per_structure["ensemble_energy_std"].tolist() == pytest.approx(
        [math.sqrt(14.0 / (3 - ddof)), math.sqrt(6.0 / (3 - ddof))])


def test_ensemble_error_of_the_mean_force_and_fixed_atoms():
    reference = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 3.0, 2.0]], dtype=torch.float64)
    result = ensemble_uncertainty(ensemble_prediction(), two_structures(), reference_forces=reference)
    assert result.per_atom["eps_ensemble"].tolist() == pytest.approx([1.0, 0.0, 3.0])
    assert result.per_structure["eps_ensemble"].tolist() == pytest.approx([math.sqrt(1.0 / 6.0), math.sqrt(3.0)])
    fixed = ensemble_uncertainty(ensemble_prediction(), two_structures(fixed=(1,)), reference_forces=reference)
    assert fixed.per_structure["eps_ensemble"].tolist() == pytest.approx([math.sqrt(1.0 / 3.0), math.sqrt(3.0)])
    assert fixed.per_structure["ensemble_std"].tolist() == pytest.approx([math.sqrt(2.0 / 3.0), math.sqrt(8.0 / 9.0)])
    kept = ensemble_uncertainty(ensemble_prediction(), two_structures(fixed=(1,)), exclude_fixed=False)
    assert kept.per_structure["ensemble_std"].tolist() == pytest.approx([math.sqrt(8.0 / 6.0), math.sqrt(8.0 / 9.0)])


def test_ensemble_ddof_needs_enough_members():
    two = EnsemblePrediction(energy=torch.zeros(2, 2, dtype=torch.float64), forces=torch.zeros(2, 3, 3, dtype=torch.float64))
    assert ensemble_uncertainty(two, two_structures(), ddof=1).per_structure["ensemble_std"].tolist() == [0.0, 0.0]
    with pytest.raises(InputError, match="ddof=2 needs more than 2 members, got 2"):
        ensemble_uncertainty(two, two_structures(), ddof=2)
