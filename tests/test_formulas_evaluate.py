"""Evaluation formulas on tiny hand-computed inputs: rank correlation, ROC-AUC, binned calibration,
interval coverage, split-conformal quantiles and the percentile bootstrap (written to kill the mutants
that survived the rest of the suite, see docs/mutation_testing.md)."""

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from atomuq.core.errors import InputError
from atomuq.uq.evaluate import IsotonicMap, bootstrap, bootstrap_ci, calibration, conformal, ranking
from atomuq.uq.evaluate.calibration import calibration_curve, ence, expected_proportions, miscalibration_area, rmse_vs_rmv, zms
from atomuq.uq.evaluate.conformal import ConformalCalibrator
from atomuq.uq.evaluate.ranking import roc_auc, roc_auc_rows, spearman, spearman_rows

# --- ranking ---------------------------------------------------------------------------------------------


def test_pearson_rows_by_hand_per_row():
    x = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    y = np.array([[2.0, 4.0, 7.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    r = ranking._pearson_rows(x, y)
    # row 0: dx = (-1, 0, 1), dy = (-7/3, -1/3, 8/3): r = 5 / sqrt(2 · 114/9)
    assert r[0] == pytest.approx(5.0 / math.sqrt(2.0 * 114.0 / 9.0))
    assert r[1] == pytest.approx(-1.0)
    assert math.isnan(r[2])  # a constant row has no correlation


def test_pearson_rows_stay_within_minus_one_and_one_despite_rounding():
    # both pairs are exactly linear; without the clip the sums give 1.0000000000000002 and -1.0000000000000002
    x = np.array([[-0.01, -0.56, -0.87, 3.07, -0.08, -2.02, -0.65], [-0.74, -0.16, -0.48, 0.6, 0.04, -0.29, -0.78]])
    y = x * np.array([[0.1], [-0.3]])
    dx, dy = x - x.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
    raw = (dx * dy).sum(axis=1) / np.sqrt((dx * dx).sum(axis=1) * (dy * dy).sum(axis=1))
    assert raw[0] > 1.0 and raw[1] < -1.0
    assert ranking._pearson_rows(x, y).tolist() == [1.0, -1.0]


def test_spearman_rows_use_average_ranks_of_ties():
    score = np.array([[1.0, 2.0, 2.0, 5.0, 3.0], [4.0, 3.0, 2.0, 1.0, 0.0]])
    error = np.array([[0.1, 0.3, 0.2, 0.9, 0.4], [1.0, 2.0, 3.0, 4.0, 5.0]])
    r = spearman_rows(score, error)
    assert r[0] == pytest.approx(spearmanr(score[0], error[0]).statistic)
    assert r[1] == pytest.approx(-1.0)
    assert spearman(score[0], error[0]) == pytest.approx(r[0])


def test_spearman_refuses_a_constant_input_naming_it():
    with pytest.raises(InputError, match="spearman: error is constant"):
        spearman([1.0, 2.0, 3.0], [0.5, 0.5, 0.5])
    with pytest.raises(InputError, match="spearman: score is constant"):
        spearman([2.0, 2.0, 2.0], [0.1, 0.5, 0.3])


def test_roc_auc_by_hand():
    # positives (error > 0.5): scores 1 and 3; negatives: 2 and 4; of the 4 pairs only (3, 2) is ordered
    result = roc_auc([1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 1.0, 0.0], threshold=0.5)
    assert result.auc == pytest.approx(0.25)
    assert (result.base_rate, result.n_positive, result.n, result.threshold) == (0.5, 2, 4, 0.5)
    assert result.value == result.auc and result.to_dict()["auc"] == result.auc
    # a tie between a positive and a negative counts 1/2; an error equal to the threshold is negative
    tied = roc_auc([1.0, 1.0, 2.0], [0.7, 0.5, 0.1], threshold=0.5)
    assert tied.auc == pytest.approx(0.25)
    assert tied.n_positive == 1 and tied.base_rate == pytest.approx(1.0 / 3.0)


def test_roc_auc_rows_per_row_and_nan_for_an_empty_class():
    score = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    error = np.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    auc = roc_auc_rows(score, error, 0.5)
    assert auc[:2].tolist() == pytest.approx([1.0, 0.0])
    assert math.isnan(auc[2])
    one_positive = roc_auc_rows(np.array([[3.0, 1.0, 2.0]]), np.array([[1.0, 0.0, 0.0]]), 0.5)
    assert one_positive.tolist() == pytest.approx([1.0])
    one_negative = roc_auc_rows(np.array([[3.0, 1.0, 2.0]]), np.array([[1.0, 0.0, 1.0]]), 0.5)
    assert one_negative.tolist() == pytest.approx([1.0])


def test_roc_auc_refuses_an_empty_class_and_a_bad_threshold():
    with pytest.raises(InputError, match="no error is above the threshold 2"):
        roc_auc([1.0, 2.0], [0.5, 1.0], threshold=2.0)
    with pytest.raises(InputError, match="no error is at or below the threshold 0.1"):
        roc_auc([1.0, 2.0], [0.5, 1.0], threshold=0.1)
    with pytest.raises(InputError, match="threshold must be a finite number"):
        roc_auc([1.0, 2.0], [0.5, 1.0], threshold=float("nan"))


# --- calibration of σ ------------------------------------------------------------------------------------


def test_bin_starts_spread_the_remainder_over_the_first_bins():
    assert calibration._bin_starts(7, 3).tolist() == [0, 3, 5]
    assert calibration._bin_starts(6, 3).tolist() == [0, 2, 4]
    assert calibration._bin_starts(4, 4).tolist() == [0, 1, 2, 3]
    assert calibration._bin_starts(4, 1).tolist() == [0]
    for n_bins in (0, 5):
        with pytest.raises(InputError, match="between 1 and the number of values \\(4\\)"):
            calibration._bin_starts(4, n_bins)


def test_rmse_vs_rmv_by_hand_on_unsorted_sigma():
    sigma = np.array([3.0, 1.0, 5.0, 2.0, 4.0])
    error = np.array([-3.0, 2.0, 1.0, 0.0, -5.0])
    # sorted by σ: (1, 2), (2, 0), (3, -3), (4, -5), (5, 1); bins of 2, 2, 1
    binned = rmse_vs_rmv(sigma, error, n_bins=3)
    assert binned.counts.tolist() == [2, 2, 1]
    assert binned.rmv.tolist() == pytest.approx([math.sqrt(2.5), math.sqrt(12.5), 5.0])
    assert binned.rmse.tolist() == pytest.approx([math.sqrt(2.0), math.sqrt(17.0), 1.0])
    assert binned.sigma_low.tolist() == [1.0, 3.0, 5.0]
    assert binned.sigma_high.tolist() == [2.0, 4.0, 5.0]
    assert binned.to_dict()["counts"] == [2, 2, 1]
    want = np.mean(np.abs(np.array([math.sqrt(2.5), math.sqrt(12.5), 5.0]) - [math.sqrt(2.0), math.sqrt(17.0), 1.0])
                   / [math.sqrt(2.5), math.sqrt(12.5), 5.0])
    assert ence(sigma, error, n_bins=3) == pytest.approx(want)


def test_ence_of_a_twice_too_small_sigma_is_one():
    sigma = np.array([1.0, 1.0, 2.0, 2.0])
    assert ence(sigma, 2 * sigma, n_bins=2) == pytest.approx(1.0)
    assert ence(sigma, sigma / 2, n_bins=2) == pytest.approx(0.5)


def test_zms_by_hand():
    assert zms([1.0, 2.0, 4.0], [1.0, -1.0, 2.0]) == pytest.approx((1.0 + 0.25 + 0.25) / 3)


def test_expected_proportions_grid():
    assert expected_proportions(3).tolist() == [0.0, 0.5, 1.0]
    assert expected_proportions(2).tolist() == [0.0, 1.0]
    with pytest.raises(InputError, match="n_grid must be at least 2"):
        expected_proportions(1)


def test_calibration_curve_and_area_by_hand():
    # σ = 1; |error|/σ = 0, 0.5, 1, 2; central intervals: p = 0 -> |z| ≤ 0, p = 0.5 -> |z| ≤ 0.674, p = 1 -> all
    sigma = np.ones(4)
    error = np.array([0.0, -0.5, 1.0, 2.0])
    p, observed = calibration_curve(sigma, error, n_grid=3)
    assert p.tolist() == [0.0, 0.5, 1.0]
    assert observed.tolist() == [0.25, 0.5, 1.0]  # an error of exactly 0 is inside the zero-width interval
    # |obs - p| = 0.25, 0, 0: trapezoids (0.25 + 0)/2 · 0.5 + 0
    assert miscalibration_area(sigma, error, n_grid=3) == pytest.approx(0.0625)
    # σ twice as large moves z = 1 inside the p = 0.5 interval: obs = 0.25, 0.75, 1
    assert calibration_curve(2 * sigma, error, n_grid=3)[1].tolist() == [0.25, 0.75, 1.0]
    assert miscalibration_area(2 * sigma, error, n_grid=3) == pytest.approx((0.25 + 0.25) / 2 * 0.5 + 0.25 / 2 * 0.5)


def test_observed_rows_are_computed_per_row():
    sigma = np.ones((2, 3))
    error = np.array([[0.0, 0.1, 3.0], [3.0, 3.0, 3.0]])
    obs = calibration._observed_rows(sigma, error, np.array([0.0, 0.5, 1.0]))
    assert np.allclose(obs, [[1 / 3, 2 / 3, 1.0], [0.0, 0.0, 1.0]])
    area = calibration.miscalibration_area_rows(sigma, error, n_grid=3)
    assert area.tolist() == pytest.approx([(1 / 3 + 1 / 6) / 2 * 0.5 + 1 / 24, 0.5 / 2 * 0.5 + 0.5 / 2 * 0.5])


def test_row_kernels_equal_the_one_dimensional_statistics_row_by_row():
    rng = np.random.default_rng(5)
    sigma = rng.uniform(0.5, 2.0, size=(2, 6))
    error = rng.normal(size=(2, 6)) * sigma
    rmv, rmse, counts = calibration._binned_rows(sigma, error, 3)
    assert counts.tolist() == [[2, 2, 2], [2, 2, 2]]
    for row in range(2):
        binned = rmse_vs_rmv(sigma[row], error[row], n_bins=3)
        assert np.allclose(rmv[row], binned.rmv) and np.allclose(rmse[row], binned.rmse)
    assert np.allclose(calibration.ence_rows(sigma, error, 3), [ence(sigma[r], error[r], n_bins=3) for r in range(2)])
    assert np.allclose(calibration.zms_rows(sigma, error), [zms(sigma[r], error[r]) for r in range(2)])
    assert np.allclose(calibration.miscalibration_area_rows(sigma, error, 11),
                       [miscalibration_area(sigma[r], error[r], n_grid=11) for r in range(2)])


# --- split conformal -------------------------------------------------------------------------------------


def test_conformal_quantile_is_the_finite_sample_order_statistic():
    cal = ConformalCalibrator(scale="score").fit([1.0, 2.0, 4.0, 0.5], [0.5, 3.0, 1.0, 0.2])
    # residuals |e|/s = 0.5, 1.5, 0.25, 0.4 -> sorted 0.25, 0.4, 0.5, 1.5
    assert cal.residuals.tolist() == [0.25, 0.4, 0.5, 1.5]
    assert cal.quantile(0.5) == 0.5  # k = ceil(5 · 0.5) = 3
    assert cal.quantile(0.4) == 0.4  # k = ceil(2) = 2: an exact integer is not rounded up
    assert cal.quantile(0.8) == 1.5  # k = ceil(4) = 4
    assert cal.quantile(0.1) == 0.25  # k = 1
    with pytest.raises(InputError, match="coverage 0.85 needs at least 6 calibration structures"):
        cal.quantile(0.85)  # k = ceil(4.25) = 5 > 4
    assert cal.predict([2.0, 10.0], 0.5).tolist() == [1.0, 5.0]
    many = ConformalCalibrator(scale="none").fit(np.ones(99), np.arange(1.0, 100.0))
    assert many.quantile(0.07) == 7.0  # (n + 1)·level = 7.000000000000001 in floating point: still k = 7


def test_conformal_normalisers():
    assert ConformalCalibrator(scale="none").fit([1.0, 2.0], [0.5, -3.0]).residuals.tolist() == [0.5, 3.0]
    assert ConformalCalibrator(scale="none").normaliser([5.0, -1.0]).tolist() == [1.0, 1.0]
    iso = IsotonicMap(statistic="mean").fit([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    cal = ConformalCalibrator(scale=iso)
    assert cal.normaliser([2.0, 3.0]).tolist() == pytest.approx(iso.predict(np.array([2.0, 3.0])).tolist())
    with pytest.raises(InputError, match="score \\(used as the normaliser g\\)"):
        ConformalCalibrator(scale="score").fit([1.0, 0.0], [0.1, 0.1])
    with pytest.raises(InputError, match="scale must be a fitted IsotonicMap"):
        ConformalCalibrator(scale="sigma")
    with pytest.raises(InputError, match="not fitted"):
        ConformalCalibrator().quantile(0.5)


def test_conformal_coverage_by_hand():
    cal = ConformalCalibrator(scale="none").fit([1.0, 1.0, 1.0], [0.1, 0.2, 0.3])
    cov = cal.coverage([1.0, 2.0, 3.0, 4.0], [0.05, -0.2, 0.25, -0.35], level=0.5)  # k = 2: q = 0.2
    assert cov.quantile == 0.2 and cov.mean_bound == pytest.approx(0.2)
    assert cov.coverage == 0.5  # |error| ≤ 0.2: 0.05 and 0.2
    assert cov.stderr == pytest.approx(math.sqrt(0.25 / 4))
    assert (cov.level, cov.n) == (0.5, 4)


def test_conformal_accepts_one_value_and_refuses_none():
    cal = ConformalCalibrator(scale="score").fit([1.0, 2.0, 4.0], [0.5, 3.0, 1.0])
    assert cal.predict([2.0], 0.5).tolist() == [2.0 * cal.quantile(0.5)]
    assert cal.coverage([2.0], [0.1], 0.5).n == 1
    one = ConformalCalibrator.from_dict({**cal.to_dict(), "residuals": [0.5]})
    assert one.residuals.tolist() == [0.5]
    for call in (lambda: cal.predict([], 0.5), lambda: cal.coverage([], [], 0.5),
                 lambda: ConformalCalibrator.from_dict({**cal.to_dict(), "residuals": []})):
        with pytest.raises(InputError, match="need at least 1 values, got 0"):
            call()


def test_conformal_round_trip_keeps_residuals_and_scale():
    cal = ConformalCalibrator(scale="score").fit([1.0, 2.0, 4.0], [0.5, 3.0, 1.0])
    back = ConformalCalibrator.from_dict(cal.to_dict())
    assert back.scale == "score" and back.residuals.tolist() == cal.residuals.tolist()
    assert conformal.ConformalCalibrator.from_dict(cal.to_dict()).quantile(0.5) == cal.quantile(0.5)


# --- bootstrap -------------------------------------------------------------------------------------------


def mean_statistic(x):
    return float(np.mean(x))


def test_bootstrap_percentiles_by_hand_with_the_same_generator():
    x = np.array([0.0, 1.0, 2.0, 10.0])
    ci = bootstrap_ci(mean_statistic, x, n_boot=50, level=0.8, seed=3)
    index = np.random.default_rng(3).integers(0, 4, size=(50, 4))
    means = x[index].mean(axis=1)
    assert ci.estimate == pytest.approx(3.25)
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(means, [0.1, 0.9])))
    assert (ci.level, ci.n, ci.n_boot, ci.n_undefined) == (0.8, 4, 50, 0)
    assert str(ci) == f"{ci.estimate:.3g} [{ci.low:.3g}, {ci.high:.3g}]"
    calls = []
    bootstrap_ci(lambda v: calls.append(len(v)) or 0.0, x, n_boot=50)
    assert calls == [4] * 51  # the data once, then each resample once


def test_bootstrap_one_resample_per_chunk_when_a_resample_fills_the_chunk(monkeypatch):
    x = np.array([0.0, 1.0, 2.0, 10.0, 4.0, 5.0])
    monkeypatch.setattr(bootstrap, "CHUNK_VALUES", 3)  # fewer values than one resample: one resample at a time
    ci = bootstrap_ci(mean_statistic, x, n_boot=20, level=0.9, seed=7)
    rng = np.random.default_rng(7)
    means = np.array([x[rng.integers(0, 6, size=(1, 6))[0]].mean() for _ in range(20)])
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(means, [0.05, 0.95])))


def test_bootstrap_chunks_and_the_rows_kernel_give_the_loop_result(monkeypatch):
    score = np.array([0.1, 0.5, 0.2, 0.9, 0.4, 0.3])
    error = np.array([0.2, 0.4, 0.1, 1.0, 0.6, 0.3])
    monkeypatch.setattr(bootstrap, "CHUNK_VALUES", 6 * 7)  # 7 resamples per chunk: 6 chunks, the last of 5
    chunked = bootstrap_ci(spearman, score, error, n_boot=40, seed=1)
    rng = np.random.default_rng(1)
    index = np.concatenate([rng.integers(0, 6, size=(m, 6)) for m in (7, 7, 7, 7, 7, 5)])
    values = np.array([spearmanr(score[i], error[i]).statistic for i in index])  # NaN for a constant resample
    defined = values[np.isfinite(values)]
    assert chunked.n_undefined == len(values) - len(defined)
    assert (chunked.low, chunked.high) == pytest.approx(tuple(np.quantile(defined, [0.025, 0.975])))
    # without the rows kernel: one call per resample, the same draws, the same interval
    whole = bootstrap_ci(spearman, score, error, n_boot=40, seed=1)
    monkeypatch.undo()
    plain = bootstrap_ci(lambda s, e: spearman(s, e), score, error, n_boot=40, seed=1)
    vector = bootstrap_ci(spearman, score, error, n_boot=40, seed=1)
    assert (plain.low, plain.high, plain.n_undefined) == pytest.approx((vector.low, vector.high, vector.n_undefined))
    assert whole.estimate == plain.estimate == pytest.approx(spearmanr(score, error).statistic)


def test_bootstrap_counts_undefined_resamples_and_refuses_all_undefined():
    def not_constant(v):
        if v.min() == v.max():
            raise InputError("undefined on a constant resample")
        return float(v.mean())

    x = np.array([0.0, 1.0, 2.0])
    ci = bootstrap_ci(not_constant, x, n_boot=50)
    index = np.random.default_rng(0).integers(0, 3, size=(50, 3))
    constant = int((x[index].min(axis=1) == x[index].max(axis=1)).sum())
    assert constant > 0 and ci.n_undefined == constant
    with pytest.raises(InputError, match="undefined on all 10 resamples of 2 rows"):
        bootstrap._interval(np.full(10, np.nan), 0.0, 0.9, 2, 10)


def test_bootstrap_input_checks():
    with pytest.raises(InputError, match="at least one data array"):
        bootstrap_ci(mean_statistic)
    with pytest.raises(InputError, match=r"equal lengths, got \[3, 2\]"):
        bootstrap_ci(lambda a, b: 0.0, [1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(InputError, match="n_boot must be at least 10, got 9"):
        bootstrap_ci(mean_statistic, [1.0, 2.0], n_boot=9)
    assert bootstrap_ci(mean_statistic, [1.0, 2.0], n_boot=10).n_boot == 10


def test_group_bootstrap_draws_whole_groups():
    labels = np.array([7, 3, 3, 7, 5, 3, 5, 5, 5])  # group sizes: 3 -> 3, 5 -> 4, 7 -> 2
    values = labels.astype(float)
    sizes = {3: 3, 5: 4, 7: 2}
    seen = []

    def whole_groups(v):
        seen.append(v.copy())
        return float(v.mean())

    ci = bootstrap_ci(whole_groups, values, n_boot=30, seed=2, groups=labels)
    assert ci.n == 3 and ci.n_boot == 30
    assert ci.estimate == pytest.approx(values.mean())
    for v in seen[1:]:
        counts = {int(k): int(c) for k, c in zip(*np.unique(v, return_counts=True))}
        assert all(c % sizes[k] == 0 for k, c in counts.items())  # only whole groups
        assert sum(c // sizes[k] for k, c in counts.items()) == 3  # as many groups as there are
    assert any(len(v) != len(values) for v in seen[1:])  # resamples of other sizes occur
    # the same draws by hand: n_groups group indices per resample, groups in sorted label order
    rng = np.random.default_rng(2)
    groups = [values[labels == label] for label in (3, 5, 7)]
    for v in seen[1:]:
        chosen = rng.integers(0, 3, size=3)
        assert sorted(v.tolist()) == sorted(np.concatenate([groups[c] for c in chosen]).tolist())
    assert bootstrap_ci(whole_groups, values, n_boot=10, groups=np.where(labels == 3, 0, 1)).n == 2  # two groups suffice
    with pytest.raises(InputError, match="one label per row \\(9\\)"):
        bootstrap_ci(whole_groups, values, n_boot=10, groups=labels[:-1])
    with pytest.raises(InputError, match="at least 2 groups"):
        bootstrap_ci(whole_groups, values, n_boot=10, groups=np.zeros(9))
