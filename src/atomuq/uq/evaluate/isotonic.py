"""A monotone map from a raw UQ score (e.g. the Force Delta U_Δ, which ranks but is not calibrated) to
the expected error, by isotonic regression; fit / predict / save / load as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import isotonic_regression

from atomuq.core.errors import InputError

from .inputs import as_pair, as_vector
from .jsonio import check_format, read_json, write_json

FORMAT = "atomuq.isotonic_map"
VERSION = 1


class IsotonicMap:
    """Non-decreasing map g(score) ≈ expected error, fitted by isotonic regression (pool adjacent violators).

    statistic "rms": g(s) = sqrt(E[error² | s]) (an RMS error, the σ that RMSE-vs-RMV, ENCE and ZMS test);
    statistic "mean": g(s) = E[|error| | s]. Equal scores are pooled (weighted by count) before the fit.
    Between fitted scores g is linearly interpolated (in error² for "rms"); beyond them it is held constant
    at the end values. Units: those of the error (eV/Å for ε_nc).
    """

    def __init__(self, statistic: Literal["rms", "mean"] = "rms") -> None:
        if statistic not in ("rms", "mean"):
            raise InputError(
                f"IsotonicMap statistic must be 'rms' or 'mean', got {statistic!r}"
            )
        self.statistic = statistic
        self.knots: np.ndarray | None = None  # distinct fitted scores, increasing
        self.values: np.ndarray | None = (
            None  # fitted E[error²] ("rms") or E[|error|] ("mean") at the knots
        )
        self.n_fit = 0

    def fit(self, score: ArrayLike, error: ArrayLike) -> IsotonicMap:
        """Fit on paired (score, error) of a calibration set (error in its unit; its sign is ignored)."""
        s, e = as_pair("score", score, "error", error)
        target = e**2 if self.statistic == "rms" else np.abs(e)
        knots, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
        if len(knots) < 2:
            raise InputError(
                f"IsotonicMap.fit: the score takes a single value ({knots[0]:g}); nothing to map"
            )
        means = np.bincount(inverse, weights=target) / counts
        self.knots = knots
        self.values = isotonic_regression(
            means, weights=counts.astype(np.float64), increasing=True
        ).x
        self.n_fit = len(s)
        return self

    def predict(self, score: ArrayLike) -> np.ndarray:
        """Expected error g(score) (error units) for new scores; non-decreasing in the score."""
        if self.knots is None or self.values is None:
            raise InputError(
                "IsotonicMap.predict: the map is not fitted; call fit(score, error) or load(path) first"
            )
        s = as_vector("score", score, min_len=1)
        fitted = np.interp(s, self.knots, self.values)
        return np.sqrt(fitted) if self.statistic == "rms" else fitted

    __call__ = predict

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description of the fitted map."""
        if self.knots is None or self.values is None:
            raise InputError("IsotonicMap: nothing to save, the map is not fitted")
        return {
            "format": FORMAT,
            "version": VERSION,
            "statistic": self.statistic,
            "n_fit": self.n_fit,
            "knots": self.knots.tolist(),
            "values": self.values.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "map") -> IsotonicMap:
        """The map described by to_dict(); InputError naming `where` if the description is not one."""
        check_format(data, FORMAT, VERSION, where)
        out = cls(data["statistic"])
        knots = as_vector(f"{where}: knots", data["knots"])
        values = as_vector(f"{where}: values", data["values"])
        if (
            len(knots) != len(values)
            or np.any(np.diff(knots) <= 0)
            or np.any(np.diff(values) < 0)
        ):
            raise InputError(
                f"{where}: knots must increase and values must not decrease, with equal lengths"
            )
        out.knots, out.values, out.n_fit = knots, values, int(data.get("n_fit", 0))
        return out

    def save(self, path: str | Path) -> Path:
        """Write the fitted map to a JSON file (atomically)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> IsotonicMap:
        """Read a map written by save()."""
        return cls.from_dict(read_json(path, FORMAT, VERSION), where=str(path))
