"""Split-conformal error bars: turn any UQ score into an upper bound on the error with a stated coverage."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from atomuq.core.errors import InputError

from .inputs import as_pair, as_vector, check_level, check_positive
from .isotonic import IsotonicMap
from .jsonio import check_format, read_json, write_json

FORMAT = "atomuq.conformal"
VERSION = 1

#: how the nonconformity |error| / g(score) is normalised: a fitted monotone map, the score itself, or g = 1
Scale = IsotonicMap | Literal["score", "none"]


#: slack of the rank ⌈(n+1)·level⌉ against round-off ((n+1)·0.9 is 9.000000000000002 at n = 9)
_RANK_SLACK = 1e-12


def conformal_rank(n: int, level: float) -> int:
    """The rank k = ⌈(n+1)·level⌉ of q̂ among n sorted calibration residuals (k > n: the bound is infinite)."""
    return int(np.ceil((n + 1) * level - _RANK_SLACK))


def min_calibration_size(level: float) -> int:
    """The fewest calibration structures n whose bound at coverage `level` is finite (conformal_rank(n) ≤ n)."""
    level = check_level(level)
    n = max(1, int(np.floor(level / (1 - level))) - 1)  # within one or two of the answer; step up to it exactly
    while conformal_rank(n, level) > n:
        n += 1
    return n


@dataclass(frozen=True)
class Coverage:
    """Empirical coverage of conformal bounds on a test set.

    level: requested coverage; coverage: fraction of test errors with |error| ≤ bound; n: test size;
    stderr: binomial standard error sqrt(level(1−level)/n) of the coverage; mean_bound: mean bound
    (error units, the sharpness of the bars); quantile: the calibrated multiplier q̂ (bound = q̂·g(score)).
    """

    level: float
    coverage: float
    n: int
    stderr: float
    mean_bound: float
    quantile: float

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON."""
        return asdict(self)


class ConformalCalibrator:
    """Split-conformal calibration (Vovk et al. 2005; Angelopoulos & Bates 2021) of |error| from a score.

    fit(score, error) on a calibration set stores the normalised nonconformity r_i = |error_i| / g(score_i)
    with g = scale (a fitted IsotonicMap, "score": g(s) = s, or "none": g = 1). For a level 1−α the multiplier
    q̂ is the ⌈(n+1)(1−α)⌉-th smallest r_i (the finite-sample correction), and the bound for a new score s is
    q̂·g(s). If calibration and test structures are exchangeable (and g was fitted on other data),
    P(|error| ≤ bound) ≥ 1−α, and below 1−α + 1/(n+1) when the r_i have no ties.
    """

    def __init__(self, scale: Scale = "score") -> None:
        if not isinstance(scale, IsotonicMap) and scale not in ("score", "none"):
            raise InputError(
                f"scale must be a fitted IsotonicMap, 'score' or 'none', got {scale!r}"
            )
        self.scale = scale
        self.residuals: np.ndarray | None = (
            None  # sorted normalised nonconformity scores
        )

    def normaliser(self, score: ArrayLike) -> np.ndarray:
        """g(score) (error units for an IsotonicMap, score units for "score", 1 for "none"), checked positive."""
        s = as_vector("score", score, min_len=1)
        if isinstance(self.scale, IsotonicMap):
            return check_positive(
                "g(score) from the isotonic map", self.scale.predict(s)
            )
        if self.scale == "score":
            return check_positive("score (used as the normaliser g)", s)
        return np.ones_like(s)

    def fit(self, score: ArrayLike, error: ArrayLike) -> ConformalCalibrator:
        """Calibrate on paired (score, error) of a calibration set not used to fit the scale map."""
        s, e = as_pair("score", score, "error", error)
        self.residuals = np.sort(np.abs(e) / self.normaliser(s))
        return self

    def quantile(self, level: float) -> float:
        """The multiplier q̂ for coverage `level`: the ⌈(n+1)·level⌉-th smallest calibration residual."""
        if self.residuals is None:
            raise InputError(
                "ConformalCalibrator: not fitted; call fit(score, error) or load(path) first"
            )
        level = check_level(level)
        n = len(self.residuals)
        k = conformal_rank(n, level)
        if k > n:
            raise InputError(
                f"coverage {level} needs at least {min_calibration_size(level)} calibration "
                f"structures (the bound would be infinite); got {n}"
            )
        return float(self.residuals[k - 1])

    def predict(self, score: ArrayLike, level: float) -> np.ndarray:
        """Upper bound on |error| (error units) for each new score at coverage `level`."""
        return self.quantile(level) * self.normaliser(score)

    def coverage(self, score: ArrayLike, error: ArrayLike, level: float) -> Coverage:
        """Empirical coverage of the bounds at `level` on a separate test set of (score, error)."""
        s, e = as_pair("score", score, "error", error, min_len=1)
        bound = self.predict(s, level)
        return Coverage(
            level=float(level),
            coverage=float(np.mean(np.abs(e) <= bound)),
            n=len(e),
            stderr=float(np.sqrt(level * (1 - level) / len(e))),
            mean_bound=float(bound.mean()),
            quantile=self.quantile(level),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the calibration residuals and the scale)."""
        if self.residuals is None:
            raise InputError("ConformalCalibrator: nothing to save, not fitted")
        scale = (
            self.scale.to_dict() if isinstance(self.scale, IsotonicMap) else self.scale
        )
        return {
            "format": FORMAT,
            "version": VERSION,
            "scale": scale,
            "residuals": self.residuals.tolist(),
        }

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], where: str = "conformal"
    ) -> ConformalCalibrator:
        """The calibrator described by to_dict(); InputError naming `where` if it is not one."""
        check_format(data, FORMAT, VERSION, where)
        scale = data["scale"]
        out = cls(
            IsotonicMap.from_dict(scale, where) if isinstance(scale, dict) else scale
        )
        out.residuals = np.sort(
            as_vector(f"{where}: residuals", data["residuals"], min_len=1)
        )
        return out

    def save(self, path: str | Path) -> Path:
        """Write the calibration to a JSON file (atomically)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ConformalCalibrator:
        """Read a calibration written by save()."""
        return cls.from_dict(read_json(path, FORMAT, VERSION), where=str(path))
