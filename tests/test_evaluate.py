"""UQ evaluation library: known answers, agreement with scipy and brute force, synthetic calibration, round trips."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy.stats import norm, spearmanr

from atomuq.core.errors import InputError
from atomuq.uq.evaluate import (
    ConformalCalibrator,
    IsotonicMap,
    bootstrap_ci,
    calibration_curve,
    ence,
    min_calibration_size,
    miscalibration_area,
    plots,
    rmse_vs_rmv,
    roc_auc,
    spearman,
    zms,
)


def gaussian_errors(
    n: int, seed: int, factor: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted σ (lognormal) and errors drawn from N(0, (factor·σ)²): calibrated when factor = 1."""
    rng = np.random.default_rng(seed)
    sigma = rng.lognormal(mean=-2.0, sigma=0.7, size=n)
    return sigma, rng.normal(0.0, factor * sigma)


# ---------------------------------------------------------------- ranking


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    score = rng.integers(0, 6, size=200).astype(float)  # many ties
    error = np.round(score + rng.normal(0, 2, size=200))  # ties too
    assert spearman(score, error) == pytest.approx(
        spearmanr(score, error).statistic, abs=1e-12
    )
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_hand_computed():
    # ranks x: 1, 2.5, 2.5, 4 (centred -1.5, 0, 0, 1.5); y: 2, 1, 3, 4 (centred -0.5, -1.5, 0.5, 1.5)
    # -> Pearson of ranks = (0.75 + 2.25) / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [2, 1, 3, 4]) == pytest.approx(
        3.0 / np.sqrt(4.5 * 5.0)
    )


def brute_force_auc(score, error, threshold):
    pos = [s for s, e in zip(score, error) if e > threshold]
    neg = [s for s, e in zip(score, error) if e <= threshold]
    wins = sum(
        1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg)
    )
    return wins / (len(pos) * len(neg))


def test_roc_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(2)
    score = rng.integers(0, 8, size=120).astype(float)
    error = score * 0.1 + rng.exponential(0.3, size=120)
    result = roc_auc(score, error, threshold=0.6)
    assert result.auc == pytest.approx(brute_force_auc(score, error, 0.6), abs=1e-12)
    assert result.base_rate == pytest.approx(np.mean(error > 0.6))
    assert (
        result.n_positive == int(np.sum(error > 0.6))
        and result.n == 120
        and result.threshold == 0.6
    )


def test_roc_auc_hand_computed():
    # positives (error > 1): scores 3, 1; negatives: 2, 1 -> pairs 3>2, 3>1, 1<2, 1=1 -> (1 + 1 + 0 + 0.5) / 4
    result = roc_auc([3, 1, 2, 1], [2.0, 1.5, 0.5, 0.2], threshold=1.0)
    assert result.auc == pytest.approx(0.625)
    assert result.base_rate == 0.5


def test_roc_auc_empty_class_is_a_clear_error():
    with pytest.raises(InputError, match="one class is empty"):
        roc_auc([1, 2, 3], [0.1, 0.2, 0.3], threshold=1.0)
    with pytest.raises(InputError, match="at or below"):
        roc_auc([1, 2, 3], [0.1, 0.2, 0.3], threshold=0.0)


# ---------------------------------------------------------------- bootstrap


def correlated_sample(n: int, rho: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return x, rho * x + np.sqrt(1 - rho**2) * rng.normal(size=n)


def test_bootstrap_ci_contains_truth_and_shrinks_with_data():
    rho = 0.6
    truth = 6 / np.pi * np.arcsin(rho / 2)  # Spearman of a bivariate normal
    large = bootstrap_ci(spearman, *correlated_sample(4000, rho, 3), n_boot=500, seed=0)
    small = bootstrap_ci(spearman, *correlated_sample(400, rho, 4), n_boot=500, seed=0)
    assert large.low < truth < large.high
    assert large.low < large.estimate < large.high
    assert large.high - large.low < 0.5 * (
        small.high - small.low
    )  # width ~ 1/sqrt(n): ratio about 0.32
    assert (large.n, large.n_boot, large.level, large.n_undefined) == (
        4000,
        500,
        0.95,
        0,
    )


def test_bootstrap_vectorised_equals_loop_and_is_seeded():
    score, error = correlated_sample(60, 0.5, 5)
    fast = bootstrap_ci(roc_auc, score, error, threshold=0.5, n_boot=200, seed=7)
    slow = bootstrap_ci(
        lambda s, e: roc_auc(s, e, threshold=0.5).auc, score, error, n_boot=200, seed=7
    )
    assert (fast.low, fast.high) == pytest.approx((slow.low, slow.high), abs=1e-12)
    assert fast == bootstrap_ci(
        roc_auc, score, error, threshold=0.5, n_boot=200, seed=7
    )
    sigma, err = gaussian_errors(50, 6)
    for metric in (ence, zms, miscalibration_area):
        a = bootstrap_ci(metric, sigma, err, n_boot=50, seed=1)
        b = bootstrap_ci(lambda s, e: metric(s, e), sigma, err, n_boot=50, seed=1)  # noqa: B023
        assert (a.low, a.high) == pytest.approx((b.low, b.high), abs=1e-12)


def test_bootstrap_counts_undefined_resamples():
    # one positive in 30: many resamples miss it, the AUC is undefined there and they are counted, not hidden
    score = np.arange(30.0)
    error = np.where(score == 29, 1.0, 0.0)
    result = bootstrap_ci(roc_auc, score, error, threshold=0.5, n_boot=400, seed=0)
    assert 0.2 * 400 < result.n_undefined < 0.5 * 400  # P(miss) = (29/30)^30 = 0.36
    assert result.estimate == 1.0


def test_group_bootstrap_resamples_whole_structures():
    # every structure contributes 3 identical rows (like correlated force components): resampling rows
    # pretends there are 3x as many independent values; resampling groups recovers the structure-level width
    sigma, error = gaussian_errors(600, 15)
    per_structure = bootstrap_ci(zms, sigma, error, n_boot=400, seed=2)
    tripled = (np.repeat(sigma, 3), np.repeat(error, 3))
    naive = bootstrap_ci(zms, *tripled, n_boot=400, seed=2)
    grouped = bootstrap_ci(
        zms, *tripled, n_boot=400, seed=2, groups=np.repeat(np.arange(600), 3)
    )
    def width(ci):
        return ci.high - ci.low

    assert grouped.n == 600 and grouped.estimate == pytest.approx(
        per_structure.estimate
    )
    assert width(grouped) == pytest.approx(width(per_structure), rel=0.2)
    assert width(naive) < 0.75 * width(grouped)  # about 1/sqrt(3)
    with pytest.raises(InputError, match="one label per row"):
        bootstrap_ci(zms, sigma, error, groups=[0, 1])


# ---------------------------------------------------------------- calibration


def test_calibration_metrics_hand_computed():
    sigma = [1.0, 2.0, 1.0, 2.0]
    error = [
        1.0,
        1.0,
        -1.0,
        3.0,
    ]  # bins by σ: {1, 1} -> RMSE 1; {2, 2} -> RMSE sqrt((1 + 9) / 2)
    binned = rmse_vs_rmv(sigma, error, n_bins=2)
    np.testing.assert_allclose(binned.rmv, [1.0, 2.0])
    np.testing.assert_allclose(binned.rmse, [1.0, np.sqrt(5.0)])
    np.testing.assert_array_equal(binned.counts, [2, 2])
    np.testing.assert_allclose(binned.sigma_low, [1.0, 2.0])
    assert ence(sigma, error, n_bins=2) == pytest.approx(
        (0 + (np.sqrt(5.0) - 2) / 2) / 2
    )
    assert zms(sigma, error) == pytest.approx((1 + 0.25 + 1 + 2.25) / 4)


def test_miscalibration_area_hand_computed():
    # grid p = 0, 0.5, 1; the central 50 % interval is ±0.6745σ; |z| = 0.1, 0.2 are both inside it
    p, observed = calibration_curve([1.0, 1.0], [0.1, -0.2], n_grid=3)
    np.testing.assert_allclose(p, [0, 0.5, 1])
    np.testing.assert_allclose(observed, [0, 1, 1])
    assert miscalibration_area([1.0, 1.0], [0.1, -0.2], n_grid=3) == pytest.approx(0.25)
    # |z| = 0.5 inside, 1.0 outside the 50 % interval: observed follows the diagonal at the grid points
    assert miscalibration_area([1.0, 2.0], [0.5, 2.0], n_grid=3) == pytest.approx(0.0)
    # observed proportions at p are the fraction inside norm.ppf((1 + p) / 2)
    sigma, error = gaussian_errors(300, 7)
    p, observed = calibration_curve(sigma, error, n_grid=11)
    z = np.abs(error) / sigma
    np.testing.assert_allclose(
        observed, [(z <= norm.ppf((1 + q) / 2)).mean() for q in p]
    )


def test_calibrated_gaussian_errors_score_as_calibrated():
    sigma, error = gaussian_errors(20000, 8)
    binned = rmse_vs_rmv(sigma, error, n_bins=10)
    np.testing.assert_allclose(
        binned.rmse / binned.rmv, 1.0, atol=0.08
    )  # per-bin noise 1/sqrt(2·2000) = 1.6 %
    assert ence(sigma, error) < 0.04
    assert zms(sigma, error) == pytest.approx(1.0, abs=0.04)
    assert miscalibration_area(sigma, error) < 0.015


@pytest.mark.parametrize(
    "factor, zms_expected, ence_expected", [(2.0, 4.0, 1.0), (0.5, 0.25, 0.5)]
)
def test_over_and_under_confident_sigma_are_flagged(
    factor, zms_expected, ence_expected
):
    # factor 2: true errors twice σ (over-confident); factor 0.5: σ twice the errors (under-confident)
    sigma, error = gaussian_errors(20000, 9, factor=factor)
    assert zms(sigma, error) == pytest.approx(zms_expected, rel=0.05)
    assert ence(sigma, error) == pytest.approx(ence_expected, abs=0.05)
    assert miscalibration_area(sigma, error) > 0.1
    p, observed = calibration_curve(sigma, error)
    middle = (p > 0.2) & (p < 0.8)
    assert (
        np.all(observed[middle] < p[middle])
        if factor > 1
        else np.all(observed[middle] > p[middle])
    )


# ---------------------------------------------------------------- isotonic map


def test_isotonic_map_is_monotone_and_recovers_a_known_function():
    rng = np.random.default_rng(10)
    score = rng.uniform(0.0, 1.0, size=5000)
    def truth(s):
        return 0.05 + 0.3 * s**2

    error = rng.normal(0.0, truth(score))
    fitted = IsotonicMap("rms").fit(score, error)
    grid = np.linspace(0.05, 0.95, 50)
    prediction = fitted.predict(grid)
    assert np.all(np.diff(prediction) >= 0)
    np.testing.assert_allclose(prediction, truth(grid), rtol=0.15)
    mean_map = IsotonicMap("mean").fit(score, error)  # E|N(0, σ²)| = σ sqrt(2/π)
    np.testing.assert_allclose(
        mean_map.predict(grid), truth(grid) * np.sqrt(2 / np.pi), rtol=0.15
    )
    # constant beyond the fitted range
    assert fitted.predict([-5.0])[0] == pytest.approx(fitted.predict([score.min()])[0])


def test_isotonic_map_hand_computed_pooling():
    # targets (|error|) 1, 3, 2, 4 at scores 1..4: PAV pools 3 and 2 into 2.5
    m = IsotonicMap("mean").fit([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    np.testing.assert_allclose(m.predict([1, 2, 3, 4, 1.5]), [1.0, 2.5, 2.5, 4.0, 1.75])


def test_isotonic_map_round_trip(tmp_path):
    m = IsotonicMap("rms").fit([0.1, 0.2, 0.3, 0.5], [0.02, 0.01, 0.05, 0.04])
    path = m.save(tmp_path / "map.json")
    loaded = IsotonicMap.load(path)
    new = [0.0, 0.15, 0.25, 0.4, 1.0]
    np.testing.assert_array_equal(loaded.predict(new), m.predict(new))
    assert loaded.statistic == "rms" and loaded.n_fit == 4


# ---------------------------------------------------------------- conformal


def heteroscedastic(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Exchangeable (score, |error|): the RMS error is 0.5 × score, errors Gaussian."""
    score = rng.lognormal(-2.0, 0.8, size=n)
    return score, np.abs(rng.normal(0.0, 0.5 * score))


@pytest.mark.parametrize("scale", ["map", "score", "none"])
def test_conformal_reaches_requested_coverage(scale):
    rng = np.random.default_rng(11)
    fit_set, cal_set, test_set = (heteroscedastic(n, rng) for n in (2000, 2000, 20000))
    normaliser = IsotonicMap().fit(*fit_set) if scale == "map" else scale
    conformal = ConformalCalibrator(normaliser).fit(*cal_set)
    for level in (0.5, 0.8, 0.9, 0.95, 0.99):
        result = conformal.coverage(*test_set, level)
        # calibration noise sqrt(l(1-l)/2000) plus test noise: 4 combined standard errors
        assert abs(result.coverage - level) < 4 * np.sqrt(
            level * (1 - level) * (1 / 2000 + 1 / 20000)
        )
        assert result.n == 20000 and result.mean_bound > 0


def test_conformal_finite_sample_correction_gives_at_least_the_level():
    # with 19 calibration points and level 0.9 the bound is the 18th smallest residual: coverage 18/20 on average,
    # while the uncorrected empirical 90 % quantile of 19 points covers only about 17.1/20
    rng = np.random.default_rng(12)
    covered = []
    for _ in range(400):
        conformal = ConformalCalibrator("score").fit(*heteroscedastic(19, rng))
        covered.append(conformal.coverage(*heteroscedastic(200, rng), 0.9).coverage)
    assert np.mean(covered) >= 0.9 - 3 * np.std(covered) / np.sqrt(len(covered))
    assert np.mean(covered) == pytest.approx(18 / 20, abs=0.01)


def test_conformal_hand_computed_quantile():
    # residuals |e| / score = 1, 2, ..., 9; level 0.8 -> ceil(10 · 0.8) = 8th smallest = 8
    conformal = ConformalCalibrator("score").fit(np.ones(9), np.arange(1.0, 10.0))
    assert conformal.quantile(0.8) == 8.0
    np.testing.assert_allclose(conformal.predict([0.5, 2.0], 0.8), [4.0, 16.0])
    with pytest.raises(InputError, match="needs at least 19 calibration"):
        conformal.quantile(0.95)  # ceil(10 · 0.95) = 10 > 9


@pytest.mark.parametrize("level", [0.7, 0.8, 0.9, 0.95, 0.99])
def test_conformal_minimum_size_is_the_smallest_that_gives_a_finite_bound(level):
    """The count the message names is exact: n = min_calibration_size works, n - 1 does not (0.9: 9, not 10)."""
    n = min_calibration_size(level)
    assert ConformalCalibrator("score").fit(np.ones(n), np.arange(1.0, n + 1)).quantile(level) == n  # the largest
    with pytest.raises(InputError, match=f"coverage {level} needs at least {n} calibration structures.*got {n - 1}"):
        ConformalCalibrator("score").fit(np.ones(n - 1), np.arange(1.0, n)).quantile(level)
    assert min_calibration_size(0.9) == 9 and min_calibration_size(0.8) == 4


def test_conformal_round_trip(tmp_path):
    rng = np.random.default_rng(13)
    scale = IsotonicMap().fit(*heteroscedastic(300, rng))
    conformal = ConformalCalibrator(scale).fit(*heteroscedastic(300, rng))
    loaded = ConformalCalibrator.load(conformal.save(tmp_path / "conformal.json"))
    new = rng.lognormal(-2.0, 0.8, size=50)
    np.testing.assert_array_equal(loaded.predict(new, 0.9), conformal.predict(new, 0.9))
    for scale_name in ("score", "none"):
        plain = ConformalCalibrator(scale_name).fit(*heteroscedastic(30, rng))
        again = ConformalCalibrator.load(plain.save(tmp_path / f"{scale_name}.json"))
        assert again.quantile(0.8) == plain.quantile(0.8) and again.scale == scale_name


# ---------------------------------------------------------------- bad input and files


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: spearman([1, 2, 3], [1, 2]), "paired one to one"),
        (lambda: spearman([1.0], [2.0]), "at least 2"),
        (lambda: spearman([1, np.nan, np.inf], [1, 2, 3]), r"score: 2 of 3 values are NaN or infinite \(first at index 1: nan\)"),
        (lambda: spearman([1, 1, 1], [1, 2, 3]), "constant"),
        (lambda: spearman([[1, 2], [3, 4]], [[1, 2], [3, 4]]), "1-D"),
        (lambda: roc_auc([1, 2], [1, 2], threshold=np.inf), "finite"),
        (lambda: zms([1.0, 0.0], [1.0, 1.0]), "not positive"),
        (lambda: ence([1.0, -1.0], [1.0, 1.0]), r"1 of 2 values are not positive \(first at index 1: -1.0\); an uncertainty"),
        (lambda: ence([1.0, 2.0], [1.0, 1.0], n_bins=3), "n_bins"),
        (lambda: miscalibration_area([1.0, 2.0], [np.inf, 1.0]), "NaN or infinite"),
        (lambda: miscalibration_area([1.0, 2.0], [1.0, 1.0], n_grid=1), "n_grid"),
        (lambda: rmse_vs_rmv(["a", "b"], [1.0, 1.0]), "cannot be read"),
        (lambda: bootstrap_ci(spearman, [1, 2, 3], [1, 2]), "equal lengths"),
        (lambda: bootstrap_ci(spearman, [1, 2, 3], [1, 2, 3], level=1.5), "level"),
        (lambda: IsotonicMap().predict([1.0]), "not fitted"),
        (lambda: IsotonicMap("median"), "'rms' or 'mean'"),
        (lambda: IsotonicMap().fit([1.0, 1.0], [1.0, 2.0]), "single value"),
        (
            lambda: ConformalCalibrator("score").fit([1.0, -1.0], [1.0, 1.0]),
            "not positive",
        ),
        (lambda: ConformalCalibrator("score").quantile(0.9), "not fitted"),
        (lambda: ConformalCalibrator("sigma"), "scale must be"),
    ],
)
def test_bad_input_raises_input_error(call, message):
    with pytest.raises(InputError, match=message):
        call()


def test_bad_files_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        IsotonicMap.load(tmp_path / "missing.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        ConformalCalibrator.load(tmp_path / "garbage.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(InputError, match="atomuq.isotonic_map"):
        IsotonicMap.load(tmp_path / "other.json")


def test_plots_write_png_files(tmp_path):
    sigma, error = gaussian_errors(400, 14)
    conformal = ConformalCalibrator("score").fit(sigma[:200], error[:200])
    coverage = [
        conformal.coverage(sigma[200:], error[200:], level)
        for level in (0.8, 0.9, 0.95)
    ]
    axes = [
        plots.plot_rmse_vs_rmv({"synthetic": rmse_vs_rmv(sigma, error)}),
        plots.plot_calibration_curve({"synthetic": calibration_curve(sigma, error)}),
        plots.plot_coverage({"synthetic": coverage}),
        plots.plot_score_vs_error(
            {"synthetic": (sigma, np.abs(error))}, curve=(sigma, sigma)
        ),
    ]
    for k, ax in enumerate(axes):
        path = plots.save_figure(ax, tmp_path / f"plot{k}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_max_score_scales_each_score_to_the_error_and_takes_the_larger():
    from atomuq.uq.evaluate import MaxScore

    scores = np.array([[1.0, 10.0], [2.0, 10.0], [4.0, 30.0]])
    error = np.array([1.0, 2.0, 2.0])
    fitted = MaxScore(("U", "sigma")).fit(scores, error)
    rms = np.sqrt(np.mean(error**2))
    # each scaled score has the error's RMS on the fit data
    assert np.allclose(np.sqrt(np.mean((scores * fitted.weights_) ** 2, axis=0)), rms)
    g = fitted.predict(scores)
    assert np.allclose(g, (scores * fitted.weights_).max(axis=1))
    assert np.all(g[:, None] >= scores * fitted.weights_ - 1e-12)
    assert fitted.which(scores).tolist() == np.argmax(scores * fitted.weights_, axis=1).tolist()
    assert fitted.to_dict()["weights"] == pytest.approx(fitted.weights_.tolist())


def test_max_score_keeps_coverage_when_one_score_misses_a_shift():
    """Two scores each proportional to the error in domain; under a shift one of them drops 3x. The bound on the
    larger scaled score keeps its coverage; the bound on the score that missed the shift loses it."""
    from atomuq.uq.evaluate import ConformalCalibrator, MaxScore

    rng = np.random.default_rng(0)

    def sample(n, miss):
        scale = rng.lognormal(size=n)
        error = scale * np.abs(rng.normal(size=n))
        a = scale * rng.lognormal(sigma=0.1, size=n)
        b = scale * rng.lognormal(sigma=0.1, size=n) / (3.0 if miss else 1.0)
        return np.stack([a, b], axis=1), error

    fit_s, fit_e = sample(2000, False)
    cal_s, cal_e = sample(2000, False)
    test_s, test_e = sample(4000, True)
    combined = MaxScore().fit(fit_s, fit_e)
    bound = ConformalCalibrator("score").fit(combined.predict(cal_s), cal_e).predict(combined.predict(test_s), 0.9)
    only_b = ConformalCalibrator("score").fit(cal_s[:, 1], cal_e).predict(test_s[:, 1], 0.9)
    assert abs(np.mean(test_e <= bound) - 0.9) < 0.03
    assert np.mean(test_e <= only_b) < 0.7


@pytest.mark.parametrize("scores, error, message", [
    (np.ones(3), np.ones(3), "array"),
    (np.array([[1.0, -1.0], [1.0, 1.0]]), np.ones(2), "sigma"),
    (np.ones((3, 2)), np.ones(2), "paired"),
    (np.ones((3, 2)), np.zeros(3), "zero"),
])
def test_max_score_bad_input_is_a_clear_error(scores, error, message):
    from atomuq.uq.evaluate import MaxScore

    with pytest.raises(InputError, match=message):
        MaxScore(("U", "sigma")).fit(scores, error)
    with pytest.raises(InputError, match="not fitted"):
        MaxScore().predict(np.ones((2, 2)))
