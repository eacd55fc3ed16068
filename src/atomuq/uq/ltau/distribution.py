"""Per-atom training-error distributions for LTAU-FF (methods.md section 4): exact confidences and histograms.

An error trajectory is the (E, N) array of ε_i^e = ‖F̂_i^e − F_ref,i‖₂ (eV/Å) logged over E epochs for N
training atoms. The confidence of atom i at tolerance t_i = atol + rtol·‖F_ref,i‖ is
p_i = (1/E) Σ_e 1[ε_i^e ≤ t_i] (the convention is `≤`); LTAU's uncertainty is 1 − p_i.
Over M training runs on the same atoms: μ_M(p_i) (mean over runs) and σ_M(p_i) (population standard
deviation over runs, ddof = 0).

So that atol can change after fitting, every atom's errors are also kept as counts on fixed
log-spaced bins (`HistogramBins`): column 0 counts ε ≤ edges[0], column j counts
edges[j−1] < ε ≤ edges[j], the last column ε > edges[-1]. The CDF read from a histogram is exact at
every bin edge and interpolated linearly in log ε inside a bin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from atomuq.core.errors import InputError

#: default bin edges (eV/Å): 96 log-spaced bins from 1e-4 to 1e2, each 15.5 % wide
DEFAULT_EDGES = np.geomspace(1e-4, 1e2, 97)
#: atoms processed at once when streaming a memory-mapped trajectory (bounds memory to ~E·CHUNK floats)
CHUNK = 65536


@dataclass(frozen=True)
class HistogramBins:
    """Bin edges (eV/Å, strictly increasing, positive) with an underflow and an overflow column."""

    edges: np.ndarray

    def __post_init__(self) -> None:
        edges = np.asarray(self.edges, dtype=np.float64)
        if edges.ndim != 1 or len(edges) < 2 or (edges <= 0).any() or (np.diff(edges) <= 0).any():
            raise ValueError("histogram edges must be a 1-D, positive, strictly increasing array of at least 2 values")
        object.__setattr__(self, "edges", edges)

    @property
    def n_columns(self) -> int:
        """Number of histogram columns: len(edges) + 1 (underflow, bins, overflow)."""
        return len(self.edges) + 1

    @property
    def centres(self) -> np.ndarray:
        """Representative error of each column (eV/Å): geometric bin centres; edges[0] and edges[-1] at the ends."""
        inner = np.sqrt(self.edges[:-1] * self.edges[1:])
        return np.concatenate([[self.edges[0]], inner, [self.edges[-1]]])

    @property
    def resolution(self) -> float:
        """Largest ratio between neighbouring edges (the relative resolution of a histogram read-out)."""
        return float(np.max(self.edges[1:] / self.edges[:-1]))

    def column(self, errors: np.ndarray) -> np.ndarray:
        """Column index of each error (eV/Å) under the `≤` convention."""
        return np.searchsorted(self.edges, errors, side="left")


def thresholds(atol: float, rtol: float, reference_norms: np.ndarray | None, n_atoms: int) -> np.ndarray:
    """Per-atom tolerance atol + rtol·‖F_ref,i‖ (eV/Å), shape (n_atoms,)."""
    if not np.isfinite(atol) or atol < 0 or not np.isfinite(rtol) or rtol < 0:
        raise InputError(f"atol and rtol must be finite and >= 0, got atol={atol}, rtol={rtol}")
    if rtol == 0:
        return np.full(n_atoms, float(atol))
    if reference_norms is None or len(reference_norms) != n_atoms:
        raise InputError("rtol > 0 needs the reference force norm of every training atom")
    return float(atol) + float(rtol) * np.asarray(reference_norms, dtype=np.float64)


def _chunks(n: int, size: int = CHUNK) -> Iterable[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def sample_confidence(errors: np.ndarray, atol: float, rtol: float = 0.0,
                      reference_norms: np.ndarray | None = None) -> np.ndarray:
    """Exact p_i = fraction of epochs with ε_i^e ≤ atol + rtol·‖F_ref,i‖, from an (E, N) trajectory in eV/Å."""
    errors = _check_trajectory(errors)
    tol = thresholds(atol, rtol, reference_norms, errors.shape[1])
    out = np.empty(errors.shape[1])
    for sl in _chunks(errors.shape[1]):
        out[sl] = (np.asarray(errors[:, sl]) <= tol[sl]).mean(axis=0)
    return out


def mean_error(errors: np.ndarray) -> np.ndarray:
    """Exact mean of each atom's logged errors over epochs (eV/Å), from an (E, N) trajectory."""
    errors = _check_trajectory(errors)
    out = np.empty(errors.shape[1])
    for sl in _chunks(errors.shape[1]):
        out[sl] = np.asarray(errors[:, sl], dtype=np.float64).mean(axis=0)
    return out


def error_histogram(errors: np.ndarray, bins: HistogramBins, out: np.ndarray | None = None) -> np.ndarray:
    """Counts (N, n_columns) of an (E, N) trajectory in eV/Å on the bins, added to out when given."""
    errors = _check_trajectory(errors)
    n_epochs, n_atoms = errors.shape
    if out is None:
        out = np.zeros((n_atoms, bins.n_columns), dtype=np.uint32)
    if out.shape != (n_atoms, bins.n_columns):
        raise ValueError(f"histogram of shape {out.shape} does not fit {n_atoms} atoms x {bins.n_columns} columns")
    for sl in _chunks(n_atoms):
        cols = bins.column(np.asarray(errors[:, sl]))  # (E, n)
        atoms = np.broadcast_to(np.arange(sl.stop - sl.start), cols.shape)
        flat = np.bincount((atoms * bins.n_columns + cols).ravel(), minlength=(sl.stop - sl.start) * bins.n_columns)
        out[sl] += flat.reshape(-1, bins.n_columns).astype(out.dtype)
    return out


def normalise(histogram: np.ndarray) -> np.ndarray:
    """Rows of a count histogram divided by their totals (probabilities per column)."""
    totals = histogram.sum(axis=1, keepdims=True, dtype=np.float64)
    if (totals <= 0).any():
        raise InputError("a histogram row has no counts: some atom has no logged errors")
    return histogram / totals


def cdf_at(probabilities: np.ndarray, bins: HistogramBins, threshold: np.ndarray | float) -> np.ndarray:
    """P(ε ≤ threshold) per row of column probabilities (N, n_columns); threshold in eV/Å, scalar or (N,).

    Exact at every bin edge; inside a bin its mass is spread uniformly in log ε. Below edges[0] the
    result is 0 (the underflow column's mass is placed at edges[0]); above edges[-1] the overflow column
    never counts.
    """
    probabilities = np.atleast_2d(probabilities)
    n = probabilities.shape[0]
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (n,))
    edges = bins.edges
    last = len(edges) - 1
    cumulative = np.cumsum(probabilities[:, : last + 1], axis=1)  # [:, j] = P(ε ≤ edges[j])
    rows = np.arange(n)
    j = np.clip(bins.column(t), 1, last)  # edges[j-1] < t <= edges[j] for t inside the edges
    frac = np.clip(np.log(t / edges[j - 1]) / np.log(edges[j] / edges[j - 1]), 0.0, 1.0)
    result = cumulative[rows, j - 1] + frac * probabilities[rows, j]
    result = np.where(t < edges[0], 0.0, result)
    result = np.where(t >= edges[-1], cumulative[:, last], result)
    return np.clip(result, 0.0, 1.0)


def histogram_mean(probabilities: np.ndarray, bins: HistogramBins) -> np.ndarray:
    """Expected error (eV/Å) per row of column probabilities, each column at its geometric centre."""
    return np.atleast_2d(probabilities) @ bins.centres


@dataclass
class RunConfidences:
    """Exact per-run confidences (M, N) at one tolerance and their mean μ_M and spread σ_M over runs."""

    per_run: np.ndarray
    atol: float
    rtol: float

    @property
    def mean(self) -> np.ndarray:
        """μ_M(p_i), (N,)."""
        return self.per_run.mean(axis=0)

    @property
    def spread(self) -> np.ndarray:
        """σ_M(p_i), (N,), ddof = 0 (0 for a single run)."""
        return self.per_run.std(axis=0)


def run_confidences(trajectories: Sequence[np.ndarray], atol: float, rtol: float = 0.0,
                    reference_norms: np.ndarray | None = None) -> RunConfidences:
    """p_i of every run (each an (E_m, N) trajectory in eV/Å over the same N atoms) at one tolerance."""
    if not trajectories:
        raise InputError("no error trajectories given")
    n_atoms = {t.shape[1] for t in trajectories}
    if len(n_atoms) != 1:
        raise InputError(f"the runs log different numbers of atoms ({sorted(n_atoms)}); "
                         "LTAU needs every run on the same training atoms")
    per_run = np.stack([sample_confidence(t, atol, rtol, reference_norms) for t in trajectories])
    return RunConfidences(per_run=per_run, atol=float(atol), rtol=float(rtol))


def _check_trajectory(errors: np.ndarray) -> np.ndarray:
    if errors.ndim != 2 or errors.shape[0] < 1 or errors.shape[1] < 1:
        raise InputError(f"an error trajectory must be (epochs, atoms) with at least one of each, got {errors.shape}")
    return errors
