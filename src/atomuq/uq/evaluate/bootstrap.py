"""Percentile bootstrap confidence intervals for any statistic of paired arrays (score, error, ...)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from atomuq.core.errors import InputError

from .inputs import as_vector, check_level

#: largest number of resampled values (rows × length) held in memory at once
CHUNK_VALUES = 4_000_000


@dataclass(frozen=True)
class BootstrapCI:
    """A statistic on the full sample with its percentile bootstrap interval.

    estimate: the statistic on the data as given; low, high: the (1−level)/2 and (1+level)/2 percentiles of
    the statistic over n_boot resamples (rows, or groups of rows, drawn with replacement); n: rows (or groups); n_undefined:
    resamples on which the statistic was undefined (e.g. AUC with one class empty), left out of the percentiles.
    """

    estimate: float
    low: float
    high: float
    level: float
    n: int
    n_boot: int
    n_undefined: int = 0

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON."""
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}]"


def batched(rows: Callable[..., np.ndarray]) -> Callable[[Callable], Callable]:
    """Decorator: attach `rows`, the same statistic on (m, n) arrays (one resample per row, NaN where undefined).

    bootstrap_ci then evaluates all resamples of a chunk in one vectorised call instead of a Python loop.
    """

    def attach(func: Callable) -> Callable:
        func.rows = rows  # type: ignore[attr-defined]
        return func

    return attach


def bootstrap_ci(
    statistic: Callable[..., Any],
    *arrays: ArrayLike,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int | np.random.Generator = 0,
    groups: ArrayLike | None = None,
    **kwargs: Any,
) -> BootstrapCI:
    """Percentile bootstrap CI of statistic(*arrays, **kwargs) (same units as the statistic), resampling rows.

    All arrays are paired (one row per structure or atom) and resampled with the same indices (seeded
    numpy Generator). The statistic returns a float or a result object whose `.value` is the headline number
    (e.g. RocAuc.value is the AUC). Statistics with a `rows` kernel (see `batched`: every statistic in this
    package) are evaluated on a whole chunk of resamples at once; any other callable is called once per
    resample, and resamples on which it raises InputError count as undefined.
    groups (one label per row, optional): resample whole groups instead of rows (a cluster bootstrap), e.g.
    the 3N force components of each structure, which are not independent; n is then the number of groups
    and every resample is evaluated on its own (rows differ in count).
    Raises InputError if the statistic is undefined on every resample.
    """
    if not arrays:
        raise InputError("bootstrap_ci needs at least one data array")
    data = [as_vector(f"array {i}", a) for i, a in enumerate(arrays)]
    n = len(data[0])
    if any(len(d) != n for d in data):
        raise InputError(
            f"bootstrap_ci: arrays must have equal lengths, got {[len(d) for d in data]}"
        )
    if int(n_boot) < 10:
        raise InputError(f"n_boot must be at least 10, got {n_boot}")
    level = check_level(level)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    estimate = _as_float(statistic(*data, **kwargs))
    if groups is not None:
        return _group_bootstrap(
            statistic, data, groups, estimate, int(n_boot), level, rng, kwargs
        )
    rows = getattr(statistic, "rows", None)
    values = np.empty(int(n_boot))
    chunk = max(1, CHUNK_VALUES // n)
    for start in range(0, int(n_boot), chunk):
        m = min(chunk, int(n_boot) - start)
        index = rng.integers(0, n, size=(m, n))
        if rows is not None:
            values[start : start + m] = rows(*(d[index] for d in data), **kwargs)
        else:
            values[start : start + m] = [
                _as_float_or_nan(statistic, [d[i] for d in data], kwargs) for i in index
            ]
    return _interval(values, estimate, level, n, int(n_boot))


def _group_bootstrap(
    statistic: Callable[..., Any],
    data: list[np.ndarray],
    groups: ArrayLike,
    estimate: float,
    n_boot: int,
    level: float,
    rng: np.random.Generator,
    kwargs: dict[str, Any],
) -> BootstrapCI:
    """bootstrap_ci resampling whole groups of rows (see bootstrap_ci)."""
    labels = np.asarray(groups)
    if labels.shape != data[0].shape:
        raise InputError(
            f"bootstrap_ci: groups needs one label per row ({len(data[0])}), got shape {labels.shape}"
        )
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    n_groups = len(starts)
    if n_groups < 2:
        raise InputError("bootstrap_ci: need at least 2 groups to resample")
    values = np.empty(n_boot)
    for b in range(n_boot):
        chosen = rng.integers(0, n_groups, size=n_groups)
        lengths = counts[chosen]
        first = np.repeat(starts[chosen] - np.cumsum(lengths) + lengths, lengths)
        index = order[first + np.arange(lengths.sum())]
        values[b] = _as_float_or_nan(statistic, [d[index] for d in data], kwargs)
    return _interval(values, estimate, level, n_groups, n_boot)


def _interval(
    values: np.ndarray, estimate: float, level: float, n: int, n_boot: int
) -> BootstrapCI:
    """Percentile interval of the defined resampled values."""
    defined = values[np.isfinite(values)]
    if len(defined) == 0:
        raise InputError(
            f"bootstrap_ci: the statistic was undefined on all {n_boot} resamples of {n} rows"
        )
    low, high = np.quantile(defined, [(1 - level) / 2, (1 + level) / 2])
    return BootstrapCI(
        estimate, float(low), float(high), level, n, n_boot, n_boot - len(defined)
    )


def _as_float(value: Any) -> float:
    """The headline number of a statistic's result: the float itself or the result's `value` field."""
    return float(getattr(value, "value", value))


def _as_float_or_nan(
    statistic: Callable[..., Any], data: list[np.ndarray], kwargs: dict[str, Any]
) -> float:
    """statistic on one resample; NaN where it raises InputError (undefined on that resample)."""
    try:
        return _as_float(statistic(*data, **kwargs))
    except InputError:
        return float("nan")
