"""Calibration of LTAU probabilities (methods.md section 4): reliability curves, miscalibration, Brier score, scale s.

A predicted p_j says "the atom's error is ≤ s·atol with probability p_j". Binning atoms by p_j
(equal-width bins on [0, 1]) and plotting the observed fraction of hits (error ≤ s·atol) against
the mean p_j of each bin gives the reliability (calibration) curve; ideal is y = x.

- miscalibration area: Σ_b (n_b / n) |observed_b − mean p_b|, the count-weighted area between the
  curve and the diagonal (0 = perfectly calibrated, at most 1);
- Brier score: mean (p_j − 1[error_j ≤ s·atol])² (lower is better; it also rewards sharpness);
- the scale s: a one-dimensional search minimising the miscalibration area on held-out atoms
  (log-spaced grid, then the best grid point refined by a bounded scalar search); the Brier score
  breaks ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from atomuq.core.errors import InputError


@dataclass
class ReliabilityCurve:
    """Per-bin mean predicted probability, observed hit fraction and count (empty bins dropped)."""

    predicted: np.ndarray
    observed: np.ndarray
    counts: np.ndarray

    @property
    def miscalibration_area(self) -> float:
        """Count-weighted mean |observed − predicted| over bins."""
        return float(np.sum(self.counts * np.abs(self.observed - self.predicted)) / self.counts.sum())


def _check(p: np.ndarray, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=np.float64).ravel()
    hits = np.asarray(hits).ravel()
    if len(p) != len(hits):
        raise InputError(f"{len(p)} probabilities but {len(hits)} outcomes")
    if len(p) == 0:
        raise InputError("calibration needs at least one atom")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise InputError("predicted probabilities must be finite and within [0, 1]")
    return p, hits.astype(np.float64)


def reliability_curve(p: np.ndarray, hits: np.ndarray, n_bins: int = 10) -> ReliabilityCurve:
    """Reliability curve of probabilities p against 0/1 outcomes hits in n_bins equal-width bins."""
    p, hits = _check(p, hits)
    which = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    keep = counts > 0
    predicted = np.bincount(which, weights=p, minlength=n_bins)[keep] / counts[keep]
    observed = np.bincount(which, weights=hits, minlength=n_bins)[keep] / counts[keep]
    return ReliabilityCurve(predicted=predicted, observed=observed, counts=counts[keep])


def brier_score(p: np.ndarray, hits: np.ndarray) -> float:
    """Mean squared difference between probabilities and 0/1 outcomes."""
    p, hits = _check(p, hits)
    return float(np.mean((p - hits) ** 2))


@dataclass
class ScaleFit:
    """The fitted scale s and the miscalibration area / Brier score at s = 1 and at s."""

    scale: float
    area_before: float
    area_after: float
    brier_before: float
    brier_after: float
    n_atoms: int

    def as_dict(self) -> dict[str, float]:
        """Plain numbers for JSON."""
        return {k: (int(v) if k == "n_atoms" else float(v)) for k, v in self.__dict__.items()}


def fit_scale(p: np.ndarray, errors: np.ndarray, atol: float, n_bins: int = 10,
              bounds: tuple[float, float] = (0.1, 100.0), n_grid: int = 241) -> ScaleFit:
    """Scale s minimising the miscalibration area of p against hits error ≤ s·atol (errors, atol in eV/Å)."""
    errors = np.asarray(errors, dtype=np.float64).ravel()
    if not np.isfinite(errors).all():
        raise InputError("force errors hold NaN or infinite values")
    if not atol > 0:
        raise InputError(f"atol must be > 0 to fit a scale, got {atol}")
    p, _ = _check(p, errors)

    def area(scale: float) -> float:
        return reliability_curve(p, errors <= scale * atol, n_bins).miscalibration_area

    grid = np.geomspace(bounds[0], bounds[1], n_grid)
    areas = np.array([area(s) for s in grid])
    briers = np.array([brier_score(p, errors <= s * atol) for s in grid])
    best = int(np.lexsort((briers, areas))[0])
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, n_grid - 1)]
    refined = minimize_scalar(lambda log_s: area(float(np.exp(log_s))), bounds=(np.log(lo), np.log(hi)),
                              method="bounded", options={"xatol": 1e-4})
    scale = float(np.exp(refined.x)) if refined.fun < areas[best] else float(grid[best])
    return ScaleFit(scale=scale, area_before=area(1.0), area_after=area(scale),
                    brier_before=brier_score(p, errors <= atol), brier_after=brier_score(p, errors <= scale * atol),
                    n_atoms=len(p))
