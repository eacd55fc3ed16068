"""Does a UQ score rank errors? Spearman r_s and ROC-AUC for flagging errors above a threshold."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import rankdata

from atomuq.core.errors import InputError

from .bootstrap import batched
from .inputs import as_pair


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis; NaN where either row is constant."""
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x * y).sum(axis=-1) / np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))
    return np.clip(r, -1.0, 1.0)


def spearman_rows(score: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Spearman r_s of each row of (m, n) arrays (ties get average ranks); NaN for a constant row."""
    return _pearson_rows(rankdata(score, axis=-1), rankdata(error, axis=-1))


@batched(spearman_rows)
def spearman(score: ArrayLike, error: ArrayLike) -> float:
    """Spearman rank correlation r_s (dimensionless) of a UQ score and the true error; ties get average ranks."""
    s, e = as_pair("score", score, "error", error)
    for name, values in (("score", s), ("error", e)):
        if np.all(values == values[0]):
            raise InputError(
                f"spearman: {name} is constant ({values[0]:g}), so its ranks carry no order"
            )
    return float(spearman_rows(s, e))


@dataclass(frozen=True)
class RocAuc:
    """ROC-AUC for flagging structures whose error exceeds `threshold` (error units) by a high score.

    auc: probability that a random structure above the threshold scores higher than a random one at or below
    it (ties count 1/2); base_rate: fraction of structures above the threshold (the AUC of a random score is
    0.5 whatever the base rate); n_positive, n: counts.
    """

    auc: float
    threshold: float
    base_rate: float
    n_positive: int
    n: int

    @property
    def value(self) -> float:
        """The headline number (the AUC), used by bootstrap_ci."""
        return self.auc

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON."""
        return asdict(self)


def roc_auc_rows(score: np.ndarray, error: np.ndarray, threshold: float) -> np.ndarray:
    """ROC-AUC of each row of (m, n) arrays by the rank (Mann–Whitney U) formula; NaN where a class is empty."""
    positive = error > threshold
    n_pos = positive.sum(axis=-1)
    n_neg = positive.shape[-1] - n_pos
    rank_sum = (rankdata(score, axis=-1) * positive).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


@batched(roc_auc_rows)
def roc_auc(score: ArrayLike, error: ArrayLike, threshold: float) -> RocAuc:
    """ROC-AUC (dimensionless) of the score as a detector of error > threshold (threshold in error units)."""
    s, e = as_pair("score", score, "error", error)
    if not np.isfinite(threshold):
        raise InputError(f"roc_auc: threshold must be a finite number, got {threshold}")
    n_pos = int((e > threshold).sum())
    if n_pos == 0 or n_pos == len(e):
        side = "above" if n_pos == 0 else "at or below"
        raise InputError(
            f"roc_auc: no error is {side} the threshold {threshold:g} (errors range "
            f"{e.min():g} to {e.max():g}), so one class is empty; choose a threshold inside that range"
        )
    auc = float(roc_auc_rows(s, e, threshold))
    return RocAuc(
        auc=auc,
        threshold=float(threshold),
        base_rate=n_pos / len(e),
        n_positive=n_pos,
        n=len(e),
    )
