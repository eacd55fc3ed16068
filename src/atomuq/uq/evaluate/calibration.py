"""Is an error-unit uncertainty σ calibrated? RMSE vs RMV in bins, ENCE, ZMS, miscalibration area.

Conventions: σ is a predicted standard deviation of the error (or a predicted RMS error, e.g. of ε_nc,
in eV/Å), the error is the true error in the same unit, signed or absolute (only |error| and error² are
used). Arguments are always (sigma, error). Every metric here has a `rows` kernel for bootstrap_ci.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import ndtri

from atomuq.core.errors import InputError

from .bootstrap import batched
from .inputs import as_pair, check_positive


def _sigma_error(sigma: ArrayLike, error: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated (σ > 0, error) pair."""
    s, e = as_pair("sigma", sigma, "error", error)
    return check_positive("sigma", s), e


def _bin_starts(n: int, n_bins: int) -> np.ndarray:
    """First index of each of n_bins equal-count bins over n sorted values (sizes differ by at most 1)."""
    if not 1 <= int(n_bins) <= n:
        raise InputError(
            f"n_bins must be between 1 and the number of values ({n}), got {n_bins}"
        )
    sizes = np.full(int(n_bins), n // int(n_bins))
    sizes[: n % int(n_bins)] += 1
    return np.concatenate([[0], np.cumsum(sizes)[:-1]])


def _binned_rows(
    sigma: np.ndarray, error: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of (m, n) arrays and per equal-count σ bin: RMV, RMSE and count, each (m, n_bins)."""
    order = np.argsort(sigma, axis=-1, kind="stable")
    s2 = np.take_along_axis(sigma, order, axis=-1) ** 2
    e2 = np.take_along_axis(error, order, axis=-1) ** 2
    starts = _bin_starts(sigma.shape[-1], n_bins)
    counts = np.diff(np.append(starts, sigma.shape[-1]))
    rmv = np.sqrt(np.add.reduceat(s2, starts, axis=-1) / counts)
    rmse = np.sqrt(np.add.reduceat(e2, starts, axis=-1) / counts)
    return rmv, rmse, np.broadcast_to(counts, rmv.shape)


@dataclass(frozen=True)
class BinnedCalibration:
    """RMSE against RMV in equal-count bins of σ (Levi et al. 2022; Pernot 2023), each array (n_bins,).

    rmv: sqrt(mean σ²) per bin; rmse: sqrt(mean error²) per bin (both in the error's unit);
    counts: values per bin; sigma_low, sigma_high: the smallest and largest σ in each bin.
    Calibrated: rmse ≈ rmv in every bin.
    """

    rmv: np.ndarray
    rmse: np.ndarray
    counts: np.ndarray
    sigma_low: np.ndarray
    sigma_high: np.ndarray

    def to_dict(self) -> dict[str, list[float]]:
        """Plain dict of lists for JSON."""
        return {
            k: getattr(self, k).tolist()
            for k in ("rmv", "rmse", "counts", "sigma_low", "sigma_high")
        }


def rmse_vs_rmv(
    sigma: ArrayLike, error: ArrayLike, n_bins: int = 10
) -> BinnedCalibration:
    """RMV and RMSE (error units) in n_bins equal-count bins of σ (sorted by σ; ties keep input order)."""
    s, e = _sigma_error(sigma, error)
    rmv, rmse, counts = _binned_rows(s, e, n_bins)
    starts = _bin_starts(len(s), n_bins)
    sorted_s = np.sort(s)
    return BinnedCalibration(
        rmv=rmv,
        rmse=rmse,
        counts=np.asarray(counts).copy(),
        sigma_low=sorted_s[starts],
        sigma_high=sorted_s[np.append(starts[1:], len(s)) - 1],
    )


def ence_rows(sigma: np.ndarray, error: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """ENCE of each row of (m, n) arrays."""
    rmv, rmse, _ = _binned_rows(sigma, error, n_bins)
    return np.mean(np.abs(rmv - rmse) / rmv, axis=-1)


@batched(ence_rows)
def ence(sigma: ArrayLike, error: ArrayLike, n_bins: int = 10) -> float:
    """Expected normalised calibration error (dimensionless): mean over equal-count σ bins of |RMV−RMSE|/RMV.

    Levi et al., Sensors 22, 5540 (2022). 0 when calibrated; about 1 when σ is 2× too small (RMSE = 2 RMV),
    0.5 when σ is 2× too large. Depends on n_bins through the noise of each bin's RMSE (≈ 1/sqrt(2·count)).
    """
    s, e = _sigma_error(sigma, error)
    return float(ence_rows(s, e, n_bins))


def zms_rows(sigma: np.ndarray, error: np.ndarray) -> np.ndarray:
    """ZMS of each row of (m, n) arrays."""
    return np.mean((error / sigma) ** 2, axis=-1)


@batched(zms_rows)
def zms(sigma: ArrayLike, error: ArrayLike) -> float:
    """Mean squared z-score mean((error/σ)²) (dimensionless; Pernot 2023): 1 calibrated, > 1 σ too small."""
    s, e = _sigma_error(sigma, error)
    return float(zms_rows(s, e))


def expected_proportions(n_grid: int = 101) -> np.ndarray:
    """The grid p_k = k/(n_grid−1), k = 0..n_grid−1, of requested central-interval probabilities."""
    if int(n_grid) < 2:
        raise InputError(f"n_grid must be at least 2, got {n_grid}")
    return np.linspace(0.0, 1.0, int(n_grid))


def _observed_rows(sigma: np.ndarray, error: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Observed fraction of |error|/σ ≤ Φ⁻¹((1+p)/2) for each row of (m, n) arrays and each p: (m, len(p))."""
    half_width = ndtri((1.0 + p) / 2.0)  # 0 at p = 0, inf at p = 1
    z = np.abs(error) / sigma
    first_inside = np.searchsorted(
        half_width, z, side="left"
    )  # z ≤ half_width[k] exactly when k ≥ this
    rows = z.reshape(-1, z.shape[-1])
    k = first_inside.reshape(rows.shape) + (len(p) + 1) * np.arange(len(rows))[:, None]
    hist = np.bincount(k.ravel(), minlength=len(rows) * (len(p) + 1)).reshape(
        len(rows), len(p) + 1
    )
    observed = np.cumsum(hist, axis=-1)[:, : len(p)] / z.shape[-1]
    return observed.reshape(*z.shape[:-1], len(p))


def calibration_curve(
    sigma: ArrayLike, error: ArrayLike, n_grid: int = 101
) -> tuple[np.ndarray, np.ndarray]:
    """Expected p and observed fraction of errors inside the Gaussian central p-interval ±Φ⁻¹((1+p)/2)·σ."""
    s, e = _sigma_error(sigma, error)
    p = expected_proportions(n_grid)
    return p, _observed_rows(s, e, p)


def miscalibration_area_rows(
    sigma: np.ndarray, error: np.ndarray, n_grid: int = 101
) -> np.ndarray:
    """Miscalibration area of each row of (m, n) arrays."""
    p = expected_proportions(n_grid)
    gap = np.abs(_observed_rows(sigma, error, p) - p)
    return np.sum((gap[..., 1:] + gap[..., :-1]) / 2 * np.diff(p), axis=-1)


@batched(miscalibration_area_rows)
def miscalibration_area(sigma: ArrayLike, error: ArrayLike, n_grid: int = 101) -> float:
    """Area (dimensionless, 0 to 0.5) between the Gaussian interval calibration curve and the diagonal.

    Definition (Tran et al., Mach. Learn.: Sci. Technol. 1, 025006 (2020), the regression calibration of
    Kuleshov et al., ICML 2018, with central intervals as in uncertainty-toolbox): for p on the grid
    p_k = k/(n_grid−1), the expected proportion p is compared with the observed proportion
    obs(p) = (1/n)·#{i : |error_i| ≤ Φ⁻¹((1+p)/2)·σ_i}, the fraction of errors inside the central p-interval
    of N(0, σ_i²); the area is the trapezoid rule of |obs(p) − p| over the grid. 0 means the errors are
    distributed as N(0, σ²) as far as interval coverage sees; curves below the diagonal mean σ too small
    (over-confident), above mean σ too large. Assumes error is a signed (or absolute) Gaussian-like error with
    standard deviation σ; for an RMS over many components (like ε_nc) use the components instead.
    """
    s, e = _sigma_error(sigma, error)
    return float(miscalibration_area_rows(s, e, n_grid))
