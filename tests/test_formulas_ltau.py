"""LTAU-FF formulas on tiny hand-computed inputs: per-atom confidences, error histograms and their CDF,
reliability curves, the Brier score and the fitted scale (written to kill the mutants that survived the
rest of the suite, see docs/mutation_testing.md)."""

import math

import numpy as np
import pytest

from atomuq.core.errors import InputError
from atomuq.uq.ltau import distribution
from atomuq.uq.ltau.calibration import ReliabilityCurve, brier_score, fit_scale, reliability_curve
from atomuq.uq.ltau.distribution import (
    DEFAULT_EDGES,
    HistogramBins,
    RunConfidences,
    cdf_at,
    error_histogram,
    histogram_mean,
    mean_error,
    normalise,
    run_confidences,
    sample_confidence,
    thresholds,
)

BINS = HistogramBins(np.array([1.0, 2.0, 4.0]))  # columns: ε ≤ 1, (1, 2], (2, 4], > 4


@pytest.fixture()
def small_chunks(monkeypatch):
    """Stream trajectories two atoms at a time, so that the chunked loops run more than once."""
    monkeypatch.setattr(distribution._chunks, "__defaults__", (2,))


# --- histogram bins --------------------------------------------------------------------------------------


def test_histogram_bins_columns_centres_and_resolution():
    assert BINS.n_columns == 4
    assert BINS.centres.tolist() == pytest.approx([1.0, math.sqrt(2.0), math.sqrt(8.0), 4.0])
    assert HistogramBins(np.array([1.0, 2.0, 6.0, 9.0])).resolution == pytest.approx(3.0)
    # the `≤` convention: an error equal to an edge belongs to the column below it
    errors = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0])
    assert BINS.column(errors).tolist() == [0, 0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("edges", [[1.0], [[1.0, 2.0]], [0.0, 1.0], [-1.0, 1.0], [1.0, 1.0, 2.0], [2.0, 1.0]])
def test_histogram_bins_refuse_bad_edges(edges):
    with pytest.raises(ValueError, match="strictly increasing"):
        HistogramBins(np.array(edges))


def test_histogram_bins_accept_two_edges():
    assert HistogramBins(np.array([0.5, 1.0])).n_columns == 3


# --- thresholds and exact confidences ---------------------------------------------------------------------


def test_thresholds_by_hand():
    assert thresholds(0.5, 0.0, None, 3).tolist() == [0.5, 0.5, 0.5]
    assert thresholds(0.0, 0.0, None, 2).tolist() == [0.0, 0.0]
    assert thresholds(0.5, 0.1, np.array([0.0, 10.0]), 2).tolist() == pytest.approx([0.5, 1.5])
    assert thresholds(0.0, 0.1, np.array([0.0, 10.0]), 2).tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("atol, rtol", [(-0.1, 0.0), (0.1, -0.1), (float("nan"), 0.0), (0.1, float("inf"))])
def test_thresholds_refuse_negative_or_non_finite(atol, rtol):
    with pytest.raises(InputError, match="finite and >= 0"):
        thresholds(atol, rtol, np.ones(2), 2)


def test_thresholds_with_rtol_need_every_reference_norm():
    for norms in (None, np.ones(3)):
        with pytest.raises(InputError, match="reference force norm"):
            thresholds(0.1, 0.2, norms, 2)


def test_sample_confidence_counts_less_or_equal(small_chunks):
    # 4 epochs x 3 atoms; tolerance 0.2 eV/Å
    errors = np.array([[0.1, 0.3, 0.2], [0.2, 0.3, 0.5], [0.3, 0.1, 0.5], [0.0, 0.3, 0.5]])
    assert sample_confidence(errors, 0.2).tolist() == [0.75, 0.25, 0.25]
    # rtol: atom i's tolerance 0.1 + 0.5·|F_ref,i| = 0.1, 0.2, 0.35
    assert sample_confidence(errors, 0.1, 0.5, np.array([0.0, 0.2, 0.5])).tolist() == [0.5, 0.25, 0.25]
    assert mean_error(errors).tolist() == pytest.approx([0.15, 0.25, 0.425])


@pytest.mark.parametrize("shape", [(3,), (0, 2), (2, 0)])
def test_trajectories_must_be_two_dimensional_and_non_empty(shape):
    with pytest.raises(InputError, match="must be \\(epochs, atoms\\)"):
        sample_confidence(np.zeros(shape), 0.1)


def test_a_single_atom_or_a_single_epoch_is_a_trajectory():
    assert sample_confidence(np.array([[0.1], [0.3]]), 0.2).tolist() == [0.5]
    assert sample_confidence(np.array([[0.1, 0.3]]), 0.2).tolist() == [1.0, 0.0]


def test_chunks_cover_every_atom_once():
    assert [(s.start, s.stop) for s in distribution._chunks(5, 2)] == [(0, 2), (2, 4), (4, 5)]
    assert [(s.start, s.stop) for s in distribution._chunks(4, 2)] == [(0, 2), (2, 4)]


def test_run_confidences_mean_and_population_spread():
    runs = [np.array([[0.1, 0.3, 0.0], [0.1, 0.1, 0.0]]), np.array([[0.3, 0.3, 0.0], [0.3, 0.3, 0.0], [0.1, 0.3, 0.0]])]
    result = run_confidences(runs, atol=0.2)
    assert np.allclose(result.per_run, [[1.0, 0.5, 1.0], [1.0 / 3.0, 0.0, 1.0]])
    assert result.mean.tolist() == pytest.approx([2.0 / 3.0, 0.25, 1.0])
    assert result.spread.tolist() == pytest.approx([1.0 / 3.0, 0.25, 0.0])  # ddof = 0
    assert (result.atol, result.rtol) == (0.2, 0.0)
    single = RunConfidences(per_run=np.array([[0.5, 1.0]]), atol=0.1, rtol=0.0)
    assert single.spread.tolist() == [0.0, 0.0]


def test_run_confidences_refuse_no_runs_and_different_atoms():
    with pytest.raises(InputError, match="no error trajectories"):
        run_confidences([], atol=0.1)
    with pytest.raises(InputError, match=r"different numbers of atoms \(\[2, 3\]\)"):
        run_confidences([np.zeros((2, 3)), np.zeros((2, 2))], atol=0.1)


# --- histograms and their read-out ------------------------------------------------------------------------


def test_error_histogram_counts_by_hand_and_accumulates(small_chunks):
    # 3 epochs x 3 atoms
    errors = np.array([[0.5, 2.0, 9.0], [1.5, 3.0, 4.0], [1.0, 2.5, 4.5]])
    counts = error_histogram(errors, BINS)
    assert counts.dtype == np.uint32
    assert counts.tolist() == [[2, 1, 0, 0], [0, 1, 2, 0], [0, 0, 1, 2]]
    again = error_histogram(errors[:1], BINS, out=counts)
    assert again is counts
    assert counts.tolist() == [[3, 1, 0, 0], [0, 2, 2, 0], [0, 0, 1, 3]]
    with pytest.raises(ValueError, match="does not fit 3 atoms x 4 columns"):
        error_histogram(errors, BINS, out=np.zeros((3, 3), dtype=np.uint32))


def test_normalise_rows_and_refuse_empty_rows():
    rows = np.array([[1, 3, 0, 0], [0, 0, 2, 2], [0, 1, 0, 0]])  # the last row has a single count
    assert normalise(rows).tolist() == [[0.25, 0.75, 0, 0], [0, 0, 0.5, 0.5], [0, 1, 0, 0]]
    with pytest.raises(InputError, match="no counts"):
        normalise(np.array([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_cdf_is_exact_at_edges_and_log_linear_inside_a_bin():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    cases = {0.5: 0.0, 1.0: 0.1, math.sqrt(2.0): 0.2, 2.0: 0.3, math.sqrt(8.0): 0.45, 4.0: 0.6, 100.0: 0.6}
    for t, want in cases.items():
        assert cdf_at(p, BINS, t).tolist() == pytest.approx([want]), t
    # one threshold per row
    rows = np.array([[0.1, 0.2, 0.3, 0.4], [0.0, 1.0, 0.0, 0.0]])
    assert cdf_at(rows, BINS, np.array([2.0, 2.0 ** 0.25])).tolist() == pytest.approx([0.3, 0.25])


def test_cdf_never_exceeds_one_when_the_probabilities_round_above_it():
    p = np.array([0.33, 0.56, 0.11, 0.0])  # np.cumsum gives 1.0000000000000002
    assert np.cumsum(p)[-1] > 1.0
    assert cdf_at(p, BINS, 4.0).tolist() == [1.0] and cdf_at(p, BINS, 50.0).tolist() == [1.0]


def test_histogram_mean_puts_each_column_at_its_geometric_centre():
    p = np.array([[0.5, 0.0, 0.5, 0.0], [0.0, 0.25, 0.0, 0.75]])
    want = [0.5 * 1.0 + 0.5 * math.sqrt(8.0), 0.25 * math.sqrt(2.0) + 0.75 * 4.0]
    assert histogram_mean(p, BINS).tolist() == pytest.approx(want)


# --- on larger random data: counts by brute force, the CDF at edges, chunked accumulation -------------------


def test_confidence_is_the_direct_count_with_less_or_equal():
    errors = np.array([[0.1, 0.5, 0.2],
                       [0.2, 0.1, 0.2],
                       [0.3, 0.1, 0.25],
                       [0.1, 0.4, 0.2]])
    # atom 0: 0.1, 0.2, 0.3, 0.1 -> three of four <= 0.2 (0.2 itself counts)
    assert np.allclose(sample_confidence(errors, 0.2), [3 / 4, 2 / 4, 3 / 4])
    assert np.allclose(sample_confidence(errors, 0.1), [2 / 4, 2 / 4, 0.0])
    norms = np.array([0.0, 1.0, 0.5])  # relative form: atol + rtol·|F_ref|
    assert np.allclose(sample_confidence(errors, 0.1, rtol=0.3, reference_norms=norms), [2 / 4, 3 / 4, 1.0])
    brute = [[np.mean([e <= 0.15 for e in errors[:, i]])] for i in range(3)]
    assert np.allclose(sample_confidence(errors, 0.15), np.ravel(brute))


def test_mean_and_spread_over_runs():
    rng = np.random.default_rng(0)
    runs = [rng.lognormal(-2, 0.7, (e, 50)) for e in (20, 30, 40)]
    conf = run_confidences(runs, 0.12)
    per_run = np.array([[np.sum(r[:, i] <= 0.12) / len(r) for i in range(50)] for r in runs])
    assert np.allclose(conf.mean, per_run.mean(axis=0))
    assert np.allclose(conf.spread, per_run.std(axis=0))
    with pytest.raises(InputError, match="different numbers of atoms"):
        run_confidences([runs[0], runs[1][:, :10]], 0.1)


def test_histogram_cdf_is_exact_at_edges_and_mean_within_bin_resolution():
    rng = np.random.default_rng(1)
    errors = rng.lognormal(-3, 1.0, (60, 300)).astype(np.float32)
    errors[5, :10] = DEFAULT_EDGES[40]  # values exactly on an edge count as <= that edge
    bins = HistogramBins(DEFAULT_EDGES)
    probs = normalise(error_histogram(errors, bins))
    for edge in DEFAULT_EDGES[[20, 40, 41, 60]]:
        assert np.allclose(cdf_at(probs, bins, edge), sample_confidence(errors, edge), atol=1e-12)
    between = np.sqrt(DEFAULT_EDGES[45] * DEFAULT_EDGES[46])
    lo, hi = cdf_at(probs, bins, DEFAULT_EDGES[45]), cdf_at(probs, bins, DEFAULT_EDGES[46])
    mid = cdf_at(probs, bins, between)
    assert np.all(mid >= lo - 1e-12) and np.all(mid <= hi + 1e-12)
    exact = mean_error(errors)
    approx = histogram_mean(probs, bins)
    assert np.all(np.abs(approx / exact - 1) <= bins.resolution - 1)
    # chunked accumulation gives the same counts as one pass
    twice = error_histogram(errors[30:], bins, out=error_histogram(errors[:30], bins))
    assert np.array_equal(twice, error_histogram(errors, bins))


# --- calibration of the probabilities ---------------------------------------------------------------------


def test_reliability_curve_by_hand_drops_empty_bins():
    p = np.array([0.1, 0.4, 0.6, 1.0])
    hits = np.array([0, 1, 1, 1])
    two = reliability_curve(p, hits, n_bins=2)  # bins [0, 0.5), [0.5, 1]
    assert two.predicted.tolist() == pytest.approx([0.25, 0.8])
    assert two.observed.tolist() == pytest.approx([0.5, 1.0])
    assert two.counts.tolist() == [2, 2]
    assert two.miscalibration_area == pytest.approx((2 * 0.25 + 2 * 0.2) / 4)
    five = reliability_curve(p, hits, n_bins=5)  # p·5 = 0.5, 2, 3, 5: bins 0, 2, 3, 4 (1.0 joins the last)
    assert five.counts.tolist() == [1, 1, 1, 1]
    assert five.predicted.tolist() == pytest.approx(p.tolist())
    assert five.observed.tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0])


def test_miscalibration_area_weights_bins_by_count():
    curve = ReliabilityCurve(predicted=np.array([0.2, 0.9]), observed=np.array([0.5, 0.8]), counts=np.array([3, 1]))
    assert curve.miscalibration_area == pytest.approx((3 * 0.3 + 1 * 0.1) / 4)


def test_brier_score_by_hand():
    assert brier_score(np.array([0.1, 0.4, 0.6, 1.0]), np.array([0, 1, 1, 1])) == pytest.approx(
        (0.01 + 0.36 + 0.16 + 0.0) / 4)


@pytest.mark.parametrize("p, hits, message", [
    ([0.5, 0.5], [1], "2 probabilities but 1 outcomes"),
    ([], [], "at least one atom"),
    ([0.5, float("nan")], [1, 0], "finite and within"),
    ([-0.1, 0.5], [1, 0], "finite and within"),
    ([0.5, 1.1], [1, 0], "finite and within"),
])
def test_calibration_inputs_are_checked(p, hits, message):
    with pytest.raises(InputError, match=message):
        brier_score(np.array(p), np.array(hits))


def test_probability_bounds_are_allowed():
    assert brier_score(np.array([0.0, 1.0]), np.array([0, 1])) == 0.0


def test_fit_scale_finds_the_scale_that_puts_half_the_errors_below():
    # p = 0.5 everywhere: calibrated exactly when half of the errors are ≤ s·atol (the median is 1 eV/Å)
    errors = np.geomspace(0.1, 10.0, 100)
    fit = fit_scale(np.full(100, 0.5), errors, atol=0.5)
    assert errors[49] <= fit.scale * 0.5 < errors[50]
    assert fit.area_after == 0.0
    assert fit.area_before == pytest.approx(0.15)  # 35 of 100 errors are ≤ 0.5
    assert fit.brier_before == fit.brier_after == 0.25
    assert fit.n_atoms == 100
    d = fit.as_dict()
    assert isinstance(d["n_atoms"], int) and d["scale"] == fit.scale


def test_fit_scale_refines_between_grid_points():
    # p = 0.3: calibrated where 30 % of the errors (log-uniform on [1, 10]) are ≤ s, at s = 10**0.3;
    # the grid 0.1, 1, 10, 100 has no point near it, so the bounded search between 0.1 and 10 must find it
    errors = np.geomspace(1.0, 10.0, 1000)
    fit = fit_scale(np.full(1000, 0.3), errors, atol=1.0, n_grid=4)
    assert fit.scale == pytest.approx(10 ** 0.3, rel=0.01)
    assert fit.area_after < 0.005
    assert fit.area_before == pytest.approx(0.299)  # only the first error is ≤ 1


def test_fit_scale_refuses_bad_errors_and_atol():
    with pytest.raises(InputError, match="NaN or infinite"):
        fit_scale(np.full(2, 0.5), np.array([0.1, float("inf")]), atol=0.1)
    with pytest.raises(InputError, match="atol must be > 0"):
        fit_scale(np.full(2, 0.5), np.array([0.1, 0.2]), atol=0.0)


def test_fit_scale_breaks_area_ties_by_the_brier_score_and_keeps_grid_points():
    # p = 0.75 for 4 atoms; grid s = 1, 2, 4 (atol 0.5, thresholds 0.5, 1, 2): hit fractions 0, 1/2, 1 -> areas
    # 0.75, 0.25, 0.25; Brier 0.5625 - f/2: 0.3125 at s = 2, 0.0625 at s = 4, so s = 4 (errors equal to 2 are hits)
    p = np.full(4, 0.75)
    errors = np.array([0.75, 0.75, 2.0, 2.0])
    fit = fit_scale(p, errors, atol=0.5, bounds=(1.0, 4.0), n_grid=3)
    assert fit.scale == 4.0  # no refinement beats a tie: the grid point is kept
    assert (fit.area_before, fit.area_after) == pytest.approx((0.75, 0.25))
    assert (fit.brier_before, fit.brier_after) == pytest.approx((0.5625, 0.0625))


def test_fit_scale_brier_scores_before_and_after_by_hand():
    # atol 0.5, grid s = 1, 2, 4: thresholds 0.5, 1, 2; group A (p = 0.9) and group B (p = 0.1), 10 atoms each;
    # errors equal to a threshold count as hits (B's 0.5 at 0.5, A's 1.0 at 1)
    p = np.array([0.9] * 10 + [0.1] * 10)
    errors = np.array([0.7] * 8 + [1.0, 1.5] + [0.5] + [1.5] * 9)
    fit = fit_scale(p, errors, atol=0.5, bounds=(1.0, 4.0), n_grid=3)
    # threshold 1 (s = 2): A has 9 hits, B 1: calibrated; threshold 0.5: A 0, B 1; threshold 2: all hits
    assert fit.scale == 2.0 and fit.area_after == pytest.approx(0.0, abs=1e-12)
    assert fit.area_before == pytest.approx(10 * 0.9 / 20)
    assert fit.brier_before == pytest.approx((10 * 0.81 + 0.81 + 9 * 0.01) / 20)
    assert fit.brier_after == pytest.approx((9 * 0.01 + 0.81 + 0.81 + 9 * 0.01) / 20)


@pytest.mark.parametrize("bounds", [(0.5, 12.5), (1.5, 150.0), (0.1, 10.0)])
def test_fit_scale_refines_on_both_sides_of_the_best_grid_point(bounds):
    # optimum s = 10**0.3 = 1.995; grids 0.5, 2.5, 12.5 (best 2.5, optimum below it), 1.5, 15, 150 (best is the
    # first point), 0.1, 1, 10 (best 1, optimum above it): the refinement brackets the neighbours of the best point
    errors = np.geomspace(1.0, 10.0, 1000)
    fit = fit_scale(np.full(1000, 0.3), errors, atol=1.0, bounds=bounds, n_grid=3)
    assert fit.scale == pytest.approx(10 ** 0.3, rel=0.01)
    assert fit.area_after < 0.005
