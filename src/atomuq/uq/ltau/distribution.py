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
from typing import Iterable, Protocol, Sequence

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


def run_confidences(trajectories: Sequence[ErrorDistribution | np.ndarray], atol: float, rtol: float = 0.0,
                    reference_norms: np.ndarray | None = None) -> RunConfidences:
    """p_i of every run (each an ErrorDistribution or (E_m, N) trajectory in eV/Å over the same N atoms) at one
    tolerance."""
    if not trajectories:
        raise InputError("no error trajectories given")
    runs = [as_distribution(t) for t in trajectories]
    n_atoms = {run.n_atoms for run in runs}
    if len(n_atoms) != 1:
        raise InputError(f"the runs log different numbers of atoms ({sorted(n_atoms)}); "
                         "LTAU needs every run on the same training atoms")
    per_run = np.stack([run.confidence(atol, rtol, reference_norms) for run in runs])
    return RunConfidences(per_run=per_run, atol=float(atol), rtol=float(rtol))


def _check_trajectory(errors: np.ndarray) -> np.ndarray:
    if errors.ndim != 2 or errors.shape[0] < 1 or errors.shape[1] < 1:
        raise InputError(f"an error trajectory must be (epochs, atoms) with at least one of each, got {errors.shape}")
    return errors


# ---------------------------------------------------------------- one run's error distribution, whatever its storage
#
# LTAU asks a run's log for p_i at a tolerance, for counts on bins and for the mean final-epoch error (the default
# atol) through `ErrorDistribution`; `ErrorTrajectory` answers from the exact (E, N) errors, `BinnedErrors` from
# per-atom counts on fixed log-spaced bins (a compact error log).


def log_edges(per_decade: int, low: float = 1e-3, high: float = 1e2) -> np.ndarray:
    """Fixed log-spaced edges (eV/Å): per_decade edges in every decade from low to high, both powers of ten.

    Every power of ten (0.01, 0.1, 1, ...) is an edge exactly; DEFAULT_EDGES is log_edges(16, 1e-4, 1e2).
    """
    first, last = np.log10(low), np.log10(high)
    if per_decade < 1 or first != round(first) or last != round(last) or last <= first:
        raise ValueError(f"log_edges needs per_decade >= 1 and powers of ten low < high, got {per_decade}, {low}, {high}")
    return 10.0 ** (np.arange(round(first) * per_decade, round(last) * per_decade + 1) / per_decade)


def with_edges(bins: HistogramBins, values: Sequence[float]) -> HistogramBins:
    """The bins with extra edges at values (eV/Å, > 0): a histogram on them is exact at those tolerances too."""
    extra = np.asarray(values, dtype=np.float64)
    if (extra <= 0).any() or not np.isfinite(extra).all():
        raise ValueError(f"extra histogram edges must be finite and > 0, got {extra.tolist()}")
    return HistogramBins(np.union1d(bins.edges, extra))


def count_dtype(max_count: int) -> type:
    """Smallest unsigned integer dtype that holds counts up to max_count."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_count <= np.iinfo(dtype).max:
            return dtype
    return np.uint64


class ErrorDistribution(Protocol):
    """One training run's per-atom force errors (eV/Å) over its logged epochs, as LTAU reads them."""

    @property
    def n_epochs(self) -> int:
        """Epochs the distribution covers."""

    @property
    def n_atoms(self) -> int:
        """Training atoms."""

    @property
    def final_mean_error(self) -> float:
        """Mean over atoms of the last epoch's error norms (eV/Å): the default atol."""

    @property
    def bins(self) -> HistogramBins | None:
        """The bins the storage holds counts on (None: exact errors, any bins)."""

    def confidence(self, atol: float, rtol: float = 0.0, reference_norms: np.ndarray | None = None) -> np.ndarray:
        """p_i = fraction of epochs with ε_i ≤ atol + rtol·‖F_ref,i‖ (eV/Å), shape (N,)."""

    def histogram(self, bins: HistogramBins, out: np.ndarray | None = None) -> np.ndarray:
        """Counts (N, bins.n_columns) of the logged errors, added to out when given."""


@dataclass(frozen=True)
class ErrorTrajectory:
    """Exact errors (E, N) in eV/Å, e.g. a memory-mapped full error log: p_i exact at every tolerance."""

    errors: np.ndarray

    def __post_init__(self) -> None:
        _check_trajectory(self.errors)

    @property
    def bins(self) -> HistogramBins | None:
        """None: exact errors give counts on any bins."""
        return None

    @property
    def n_epochs(self) -> int:
        """Epochs (rows)."""
        return int(self.errors.shape[0])

    @property
    def n_atoms(self) -> int:
        """Atoms (columns)."""
        return int(self.errors.shape[1])

    @property
    def final_mean_error(self) -> float:
        """Mean of the last row (eV/Å)."""
        return float(np.asarray(self.errors[-1], dtype=np.float64).mean())

    def confidence(self, atol: float, rtol: float = 0.0, reference_norms: np.ndarray | None = None) -> np.ndarray:
        """Exact p_i (sample_confidence)."""
        return sample_confidence(self.errors, atol, rtol, reference_norms)

    def histogram(self, bins: HistogramBins, out: np.ndarray | None = None) -> np.ndarray:
        """Counts on any bins (error_histogram)."""
        return error_histogram(self.errors, bins, out)


@dataclass(frozen=True)
class BinnedErrors:
    """Per-atom counts (N, C) of E epochs' errors on bins (C = bins.n_columns): p_i exact at every bin edge,
    log-linear inside a bin (cdf_at); counts on coarser bins whose edges are a subset of these are exact."""

    counts: np.ndarray
    bins: HistogramBins
    final_mean_error: float

    def __post_init__(self) -> None:
        if self.counts.ndim != 2 or self.counts.shape[1] != self.bins.n_columns or self.counts.shape[0] < 1:
            raise ValueError(f"counts of shape {self.counts.shape} do not fit {self.bins.n_columns} histogram columns")
        totals = self.counts.sum(axis=1, dtype=np.int64)
        differ = np.flatnonzero(totals != totals[0])
        if totals[0] < 1 or len(differ):
            bad = int(differ[0]) if len(differ) else 0
            raise ValueError(f"every atom must count the same number (>= 1) of epochs; atom {bad} counts "
                             f"{int(totals[bad])}, atom 0 counts {int(totals[0])}")

    @property
    def n_epochs(self) -> int:
        """Epochs counted per atom."""
        return int(self.counts[0].sum(dtype=np.int64))

    @property
    def n_atoms(self) -> int:
        """Atoms (rows)."""
        return int(self.counts.shape[0])

    def confidence(self, atol: float, rtol: float = 0.0, reference_norms: np.ndarray | None = None) -> np.ndarray:
        """p_i read from the counts (cdf_at): exact when the tolerance is an edge, log-linear inside a bin."""
        tol = thresholds(atol, rtol, reference_norms, self.n_atoms)
        out = np.empty(self.n_atoms)
        for sl in _chunks(self.n_atoms):
            out[sl] = cdf_at(self.counts[sl] / float(self.n_epochs), self.bins, tol[sl])
        return out

    def histogram(self, bins: HistogramBins, out: np.ndarray | None = None) -> np.ndarray:
        """Counts merged onto bins whose edges are all edges of these (exact); InputError otherwise."""
        position = np.searchsorted(self.bins.edges, bins.edges)
        inside = position < len(self.bins.edges)
        if not inside.all() or not np.array_equal(self.bins.edges[position], bins.edges):
            raise InputError(f"counts on {len(self.bins.edges)} edges cannot be re-binned onto {len(bins.edges)} "
                             "edges that are not among them; use error logs compacted with the same bins")
        starts = np.concatenate([[0], position + 1])
        merged = np.add.reduceat(self.counts, starts, axis=1, dtype=np.uint32)
        if out is None:
            return merged
        if out.shape != merged.shape:
            raise ValueError(f"histogram of shape {out.shape} does not fit {merged.shape}")
        out += merged.astype(out.dtype)
        return out


def as_distribution(run: ErrorDistribution | np.ndarray) -> ErrorDistribution:
    """An (E, N) array of errors (eV/Å) as an ErrorTrajectory; a distribution as it is."""
    return ErrorTrajectory(run) if isinstance(run, np.ndarray) else run


def common_bins(runs: Sequence[ErrorDistribution]) -> HistogramBins:
    """Bins every run can give exact counts on: the edges shared by all binned runs, DEFAULT_EDGES when none is."""
    shared: np.ndarray | None = None
    for run in runs:
        if run.bins is not None:
            shared = run.bins.edges if shared is None else np.intersect1d(shared, run.bins.edges)
    if shared is None:
        return HistogramBins(DEFAULT_EDGES)
    if len(shared) < 2:
        raise InputError("the compact error logs share fewer than two histogram edges; compact every run's log "
                         "with the same --bins-per-decade")
    return HistogramBins(shared)
