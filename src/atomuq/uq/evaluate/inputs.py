"""Checks shared by every evaluation function: 1-D, finite, equal lengths, positive where needed."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from atomuq.core.errors import InputError


def as_vector(name: str, values: ArrayLike, min_len: int = 2) -> np.ndarray:
    """`values` as a finite float64 1-D array of at least `min_len` entries, else InputError naming `name`."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: cannot be read as numbers ({exc})") from None
    if array.ndim != 1:
        raise InputError(
            f"{name}: expected a 1-D array (one value per structure or atom), got shape {array.shape}"
        )
    if len(array) < min_len:
        raise InputError(f"{name}: need at least {min_len} values, got {len(array)}")
    _refuse(name, array, ~np.isfinite(array), "are NaN or infinite", "remove or fix them first")
    return array


def _refuse(name: str, values: np.ndarray, bad: np.ndarray, what: str, advice: str) -> None:
    """InputError counting the values where `bad` holds and naming the first, unless there are none."""
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(f"{name}: {int(bad.sum())} of {len(values)} values {what} "
                         f"(first at index {first}: {values[first]}); {advice}")


def as_pair(
    name_a: str, a: ArrayLike, name_b: str, b: ArrayLike, min_len: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Two finite 1-D arrays of the same length (paired values, e.g. score and error)."""
    x, y = as_vector(name_a, a, min_len), as_vector(name_b, b, min_len)
    if len(x) != len(y):
        raise InputError(
            f"{name_a} has {len(x)} values but {name_b} has {len(y)}; they must be paired one to one"
        )
    return x, y


def check_positive(name: str, values: np.ndarray) -> np.ndarray:
    """`values` unchanged if all > 0, else InputError (an uncertainty σ or a scale must be positive)."""
    _refuse(name, values, values <= 0, "are not positive", "an uncertainty must be > 0")
    return values


def check_level(level: float) -> float:
    """A coverage or confidence level strictly between 0 and 1."""
    if not 0.0 < float(level) < 1.0:
        raise InputError(f"level must be between 0 and 1 (exclusive), got {level}")
    return float(level)
