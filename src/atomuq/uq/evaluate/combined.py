"""The larger of several UQ scores, each scaled to the error: a normaliser for conformal bounds under shift.

Different scores miss different shifts: the Force Delta U_Δ stays proportional to the error on hot and
adversarial frames but underestimates it on new chemistry (both heads wrong together), an ensemble's spread
σ_ens follows new chemistry but misses adversarial frames (members agree, all wrong). MaxScore scales each
score to the error on in-domain data (w_j = RMS(error) / RMS(score_j)) and takes the largest scaled score per
structure, so a bound q̂·max_j w_j·s_j stays wide wherever any one of the scores sees the shift.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from atomuq.core.errors import InputError

from .inputs import as_vector, check_positive

FORMAT = "atomuq.max_score"
VERSION = 1


def _columns(scores: ArrayLike, names: tuple[str, ...] | None = None) -> np.ndarray:
    """(n, m) float array of m scores per structure, checked finite and positive."""
    matrix = np.asarray(scores, dtype=float)
    if matrix.ndim != 2 or matrix.shape[1] < 1 or matrix.shape[0] < 1:
        raise InputError(f"scores must be an (n structures, m scores) array, got shape {matrix.shape}")
    for j in range(matrix.shape[1]):
        name = names[j] if names is not None and j < len(names) else f"score {j}"
        check_positive(name, as_vector(name, matrix[:, j], min_len=1))
    return matrix


class MaxScore:
    """g(s) = max_j w_j·s_j with w_j = RMS(error) / RMS(s_j) fitted on calibration data (error units).

    fit(scores, error) stores weights_ (one per score, error units per score unit); predict(scores) gives g.
    Use it on a fit half of the in-domain data and calibrate the conformal multiplier on the other half
    (ConformalCalibrator(scale="score").fit(max_score.predict(s), error)).
    """

    def __init__(self, names: tuple[str, ...] | None = None) -> None:
        self.names = names
        self.weights_: np.ndarray | None = None

    def fit(self, scores: ArrayLike, error: ArrayLike) -> MaxScore:
        """Scale each score so that its RMS equals the RMS of |error| on these structures."""
        matrix = _columns(scores, self.names)
        e = as_vector("error", error, min_len=1)
        if len(e) != len(matrix):
            raise InputError(f"scores ({len(matrix)} structures) and error ({len(e)}) must be paired")
        rms_error = float(np.sqrt(np.mean(e**2)))
        if rms_error == 0.0:
            raise InputError("every error is zero: nothing to scale the scores to")
        self.weights_ = rms_error / np.sqrt(np.mean(matrix**2, axis=0))
        return self

    def predict(self, scores: ArrayLike) -> np.ndarray:
        """The largest scaled score of each structure (error units)."""
        if self.weights_ is None:
            raise InputError("MaxScore: not fitted; call fit(scores, error) first")
        matrix = _columns(scores, self.names)
        if matrix.shape[1] != len(self.weights_):
            raise InputError(f"fitted on {len(self.weights_)} scores, got {matrix.shape[1]}")
        return (matrix * self.weights_).max(axis=1)

    def which(self, scores: ArrayLike) -> np.ndarray:
        """Index of the score that sets g for each structure."""
        if self.weights_ is None:
            raise InputError("MaxScore: not fitted; call fit(scores, error) first")
        return np.argmax(_columns(scores, self.names) * self.weights_, axis=1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        if self.weights_ is None:
            raise InputError("MaxScore: nothing to save, not fitted")
        return {"format": FORMAT, "version": VERSION, "names": list(self.names or ()), "weights": self.weights_.tolist()}
