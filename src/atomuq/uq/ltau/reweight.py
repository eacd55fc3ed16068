"""Training-set re-weighting from LTAU confidences (LTAU-FF section 5.1 and appendix E)."""

from __future__ import annotations

import numpy as np

from atomuq.core.errors import InputError

SCHEMES = ("easy", "hard")


def loss_weights(mean: np.ndarray, spread: np.ndarray, scheme: str, lam: float) -> np.ndarray:
    """Per-atom loss weights, normalised to mean 1, from μ_M(p_i) and σ_M(p_i) (dimensionless).

    up-weight hard: w_i ∝ exp[λ(1 − μ_M(p_i) + σ_M(p_i))]; up-weight easy: w_i ∝ exp[λ(μ_M(p_i) + σ_M(p_i))].
    """
    if scheme not in SCHEMES:
        raise InputError(f"unknown re-weighting scheme {scheme!r}; use easy or hard")
    if not np.isfinite(lam) or lam < 0:
        raise InputError(f"λ must be finite and >= 0, got {lam}")
    mean, spread = np.asarray(mean, dtype=np.float64), np.asarray(spread, dtype=np.float64)
    if mean.shape != spread.shape:
        raise InputError(f"μ_M has shape {mean.shape} but σ_M {spread.shape}")
    exponent = lam * ((1.0 - mean if scheme == "hard" else mean) + spread)
    weights = np.exp(exponent - exponent.max())
    return weights / weights.mean()
