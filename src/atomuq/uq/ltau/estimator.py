"""The fitted LTAU-FF estimator: training-atom confidences, error distributions and a descriptor index.

Inference (methods.md section 4, the paper's Algorithm 2): for a test atom j with descriptor d_j,
find its k nearest training atoms N_j in descriptor space and report

- ltau_confidence  p_j = (1/k) Σ_{i∈N_j} μ_M(p_i): the probability that the atom's force error is
  ≤ s·atol (s = the calibrated scale, 1 until `calibrate` sets it); dimensionless, higher = more trusted;
- ltau_uncertainty 1 − p_j (the paper's Algorithm 1 output); higher = less trusted;
- ltau_expected_error s·(1/k) Σ_{i∈N_j} mean(ε_i) in eV/Å, the mean of the neighbour-averaged training
  error distribution, read from the histograms (within one bin's resolution of the exact mean);
- ltau_distance the mean L2 distance to the k neighbours (descriptor units); an out-of-distribution score.

`predict` returns these as a UQResult (per_atom; written as ltau_confidence_atoms, ...), and given
the structures' atom boundaries also per structure: ltau_uncertainty (mean of 1 − p_j),
ltau_uncertainty_max, ltau_expected_error (mean), ltau_distance_max and ltau_threshold (s·atol).

One estimator file (.npz, no pickles) holds everything; it loads without the training data and
refuses a model whose weights fingerprint differs from the one it was fitted with. Its arrays are
stored uncompressed and memory-mapped on load, the FAISS index included (index.py): an estimator of
10^7 training atoms opens in a moment and only the pages that searches touch become resident.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from atomuq.core.errors import InputError
from atomuq.core.io import atomic_path, npz_member_memmap
from atomuq.uq.ltau.distribution import (
    CHUNK,
    ErrorDistribution,
    HistogramBins,
    as_distribution,
    cdf_at,
    common_bins,
    count_dtype,
    histogram_mean,
    normalise,
    run_confidences,
)
from atomuq.uq.ltau.index import NeighbourIndex
from atomuq.uq.result import UQResult

FORMAT = "atomuq-ltau-estimator"
FORMAT_VERSION = 1
ARRAYS = ("index", "confidence", "spread", "histogram", "edges", "atom_numbers", "reference_force_norms")

#: per-atom quantities (UQResult names; written as <name>_atoms)
ATOM_KEYS = ("ltau_confidence", "ltau_uncertainty", "ltau_expected_error", "ltau_distance")
#: per-structure quantities, given the structures' atom boundaries
STRUCTURE_KEYS = ("ltau_uncertainty", "ltau_uncertainty_max", "ltau_expected_error", "ltau_distance_max", "ltau_threshold")


@dataclass
class LTAUPrediction(UQResult):
    """LTAU outputs for Q query atoms as a UQResult (per_atom: ATOM_KEYS; per_structure: STRUCTURE_KEYS when the
    structures' atom boundaries were given), with the neighbour ids (Q, k) and the tolerance s·atol (eV/Å)."""

    neighbours: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), dtype=np.int64))
    threshold: float = float("nan")

    @property
    def confidence(self) -> np.ndarray:
        """p_j per atom (dimensionless, higher = more trusted)."""
        return self.per_atom["ltau_confidence"]

    @property
    def uncertainty(self) -> np.ndarray:
        """1 − p_j per atom."""
        return self.per_atom["ltau_uncertainty"]

    @property
    def expected_error(self) -> np.ndarray:
        """Expected force error per atom, eV/Å."""
        return self.per_atom["ltau_expected_error"]

    @property
    def distance(self) -> np.ndarray:
        """Mean descriptor distance to the k neighbours, per atom."""
        return self.per_atom["ltau_distance"]


def structure_reductions(confidence: np.ndarray, expected_error: np.ndarray, distance: np.ndarray,
                         ptr: Sequence[int], threshold: float) -> dict[str, np.ndarray]:
    """Per-structure LTAU values (STRUCTURE_KEYS) of per-atom values over structures with atoms ptr[b]:ptr[b+1]."""
    bounds = np.asarray(ptr, dtype=np.int64)
    counts = np.diff(bounds)
    if len(bounds) < 2 or bounds[-1] != len(confidence) or (counts <= 0).any():
        raise InputError(f"structure boundaries {bounds.tolist()[:6]}... do not split {len(confidence)} atoms into "
                         "non-empty structures")
    starts = bounds[:-1]
    uncertainty = 1.0 - confidence
    return {
        "ltau_uncertainty": np.add.reduceat(uncertainty, starts) / counts,
        "ltau_uncertainty_max": np.maximum.reduceat(uncertainty, starts),
        "ltau_expected_error": np.add.reduceat(expected_error, starts) / counts,
        "ltau_distance_max": np.maximum.reduceat(distance, starts),
        "ltau_threshold": np.full(len(counts), float(threshold)),
    }


@dataclass
class LTAUEstimator:
    """Everything LTAU-FF needs at inference, for N training atoms."""

    index: NeighbourIndex
    confidence: np.ndarray  # μ_M(p_i) at (atol, rtol): exact, or log-linear inside a bin of a compact log
    spread: np.ndarray  # σ_M(p_i), exact
    histogram: np.ndarray  # (N, C) counts of logged errors, all runs pooled
    bins: HistogramBins
    atom_numbers: np.ndarray
    reference_force_norms: np.ndarray
    atol: float
    rtol: float = 0.0
    scale: float = 1.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.index.size
        for name in ("confidence", "spread", "atom_numbers", "reference_force_norms"):
            if len(getattr(self, name)) != n:
                raise InputError(f"LTAU estimator: {name} has {len(getattr(self, name))} entries for {n} indexed atoms")
        if self.histogram.shape != (n, self.bins.n_columns):
            raise InputError(f"LTAU estimator: histogram of shape {self.histogram.shape}, "
                             f"expected ({n}, {self.bins.n_columns})")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise InputError(f"LTAU estimator: calibration scale must be finite and > 0, got {self.scale}")
        self._elements: list[int] | None = None

    @property
    def n_atoms(self) -> int:
        """Number of training atoms indexed."""
        return self.index.size

    @property
    def elements(self) -> list[int]:
        """Atomic numbers present in the training set."""
        if self._elements is None:
            self._elements = sorted(int(z) for z in np.unique(self.atom_numbers))
        return self._elements

    @property
    def threshold(self) -> float:
        """The error tolerance p_j refers to: s·atol (eV/Å)."""
        return self.scale * self.atol

    def mean_errors(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Mean logged error (eV/Å) of the training atoms rows (default all), from their histograms (CHUNK at a time)."""
        if rows is not None:
            return histogram_mean(normalise(self.histogram[rows]), self.bins)
        return np.concatenate([histogram_mean(normalise(self.histogram[start : start + CHUNK]), self.bins)
                               for start in range(0, len(self.histogram), CHUNK)])

    def training_confidence(self, atol: float | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """p_i of the training atoms rows (default all): exact μ_M at the fitted atol, else read from the histograms
        at atol (eV/Å)."""
        if atol is None or atol == self.atol:
            return self.confidence if rows is None else self.confidence[rows]
        if self.rtol:
            raise InputError("changing atol of an estimator fitted with rtol > 0 is not supported; refit it")
        histogram = self.histogram if rows is None else self.histogram[rows]
        return cdf_at(normalise(histogram), self.bins, atol)

    def check_elements(self, numbers: np.ndarray, where: str) -> None:
        """Raise InputError naming where when numbers holds an element the training set never had."""
        unknown = sorted(set(int(z) for z in np.unique(numbers)) - set(self.elements))
        if unknown:
            raise InputError(f"{where}: elements {unknown} never occur in the LTAU training set (elements "
                             f"{self.elements}); their neighbours would be atoms of other elements")

    def predict(self, descriptors: np.ndarray, k: int = 1, atol: float | None = None,
                ptr: Sequence[int] | None = None) -> LTAUPrediction:
        """LTAU outputs for query descriptors (Q, d): per atom, and per structure when ptr gives the structures'
        atom boundaries (structure b: atoms ptr[b]:ptr[b+1]); atol (eV/Å) overrides the fitted one."""
        width = np.shape(descriptors)[-1]
        if width != self.index.dimension:
            raise InputError(f"{self.metadata.get('path', 'LTAU estimator')}: fitted on descriptors of width "
                             f"{self.index.dimension}, got width {width}; they come from another model or layer")
        distance, ids = self.index.search(descriptors, k)
        rows, where = np.unique(ids, return_inverse=True)  # read only the neighbours' rows (memory-mapped arrays)
        where = where.reshape(ids.shape)
        threshold = self.scale * (self.atol if atol is None else float(atol))
        confidence = self.training_confidence(atol, rows)[where].mean(axis=1)
        expected_error = self.scale * self.mean_errors(rows)[where].mean(axis=1)
        mean_distance = distance.mean(axis=1)
        per_atom = {"ltau_confidence": confidence, "ltau_uncertainty": 1.0 - confidence,
                    "ltau_expected_error": expected_error, "ltau_distance": mean_distance}
        per_structure = ({} if ptr is None else
                         structure_reductions(confidence, expected_error, mean_distance, ptr, threshold))
        return LTAUPrediction(per_atom=per_atom, per_structure=per_structure, neighbours=ids, threshold=threshold)

    def check_model(self, fingerprint: str, name: str) -> None:
        """Raise InputError unless the model's weights fingerprint is the one the estimator was fitted with."""
        fitted = self.metadata.get("model_fingerprint")
        if fitted != fingerprint:
            raise InputError(f"{self.metadata.get('path', 'LTAU estimator')}: fitted with model "
                             f"{self.metadata.get('model', '?')} (weights fingerprint {fitted}), but {name} has "
                             f"fingerprint {fingerprint}; descriptors of another model are meaningless here: "
                             "refit with `atomuq ltau fit` for this model")

    @property
    def calibrated(self) -> bool:
        """True once `atomuq ltau calibrate` fitted a scale, whatever its value (s = 1 included)."""
        return "calibration" in self.metadata

    def with_scale(self, scale: float, calibration: dict[str, Any]) -> "LTAUEstimator":
        """A copy with calibration scale s and a record of how it was fitted."""
        meta = {**self.metadata, "calibration": calibration}
        return LTAUEstimator(self.index, self.confidence, self.spread, self.histogram, self.bins, self.atom_numbers,
                             self.reference_force_norms, self.atol, self.rtol, float(scale), meta)

    def save(self, path: str | Path) -> Path:
        """Write the estimator atomically to one .npz file."""
        path = Path(path)
        meta = {**self.metadata, "format": FORMAT, "format_version": FORMAT_VERSION, "atol": self.atol,
                "rtol": self.rtol, "scale": self.scale, "index_kind": self.index.kind,
                "index_parameters": self.index.parameters, "index_recall": self.index.recall,
                "index_recall_k": self.index.recall_k, "index_recall_queries": self.index.recall_queries,
                "n_atoms": self.n_atoms, "descriptor_width": self.index.dimension}
        meta.pop("path", None)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, index_file = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".faiss.tmp")
        os.close(fd)
        try:
            self.index.write(index_file)  # streamed from the file into the archive: no in-memory copy of the index
            self._write(path, meta, np.memmap(index_file, dtype=np.uint8, mode="r"))
        finally:
            os.unlink(index_file)
        return path

    def _write(self, path: Path, meta: dict[str, Any], index: np.ndarray) -> None:
        arrays = {
            "metadata": np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), dtype=np.uint8),
            "index": index,
            "confidence": self.confidence.astype(np.float64, copy=False),
            "spread": self.spread.astype(np.float64, copy=False),
            "histogram": self.histogram,
            "edges": self.bins.edges,
            "atom_numbers": self.atom_numbers.astype(np.int32, copy=False),
            "reference_force_norms": self.reference_force_norms.astype(np.float32, copy=False),
        }
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)  # uncompressed: load memory-maps the members

    @classmethod
    def load(cls, path: str | Path) -> "LTAUEstimator":
        """Read an estimator file, checking format, completeness and consistency; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: LTAU estimator file not found; create one with `atomuq ltau fit`")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [key for key in ("metadata", *ARRAYS) if key not in data.files]
                if missing:
                    raise InputError(f"{path}: not a complete LTAU estimator (missing {', '.join(missing)})")
                arrays = {key: _member(path, key, data) for key in ("metadata", *ARRAYS)}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(f"{path}: unreadable LTAU estimator, truncated or not an .npz file ({exc})") from exc
        try:
            meta = json.loads(arrays.pop("metadata").tobytes().decode())
        except (UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"{path}: LTAU estimator metadata is damaged ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise InputError(f"{path}: not an atomuq LTAU estimator (format {meta.get('format')!r})")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise InputError(f"{path}: estimator format version {meta['format_version']} is newer than this atomuq "
                             f"reads ({FORMAT_VERSION}); upgrade atomuq")
        try:
            index = NeighbourIndex.from_bytes(arrays["index"], meta["index_kind"], meta["index_parameters"],
                                              recall=meta.get("index_recall"), recall_k=meta.get("index_recall_k"),
                                              recall_queries=meta.get("index_recall_queries"))
        except (RuntimeError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: the FAISS index inside the estimator cannot be read ({exc})") from exc
        if index.size != meta.get("n_atoms") or index.dimension != meta.get("descriptor_width"):
            raise InputError(f"{path}: index holds {index.size} vectors of width {index.dimension}, metadata says "
                             f"{meta.get('n_atoms')} of width {meta.get('descriptor_width')}; the file is damaged")
        meta["path"] = str(path)
        try:
            return cls(index=index, confidence=arrays["confidence"], spread=arrays["spread"],
                       histogram=arrays["histogram"], bins=HistogramBins(arrays["edges"]),
                       atom_numbers=arrays["atom_numbers"], reference_force_norms=arrays["reference_force_norms"],
                       atol=float(meta["atol"]), rtol=float(meta["rtol"]), scale=float(meta["scale"]), metadata=meta)
        except (ValueError, KeyError) as exc:
            raise InputError(f"{path}: inconsistent LTAU estimator ({exc})") from exc


def _member(path: Path, key: str, archive: Any) -> np.ndarray:
    """Array key of an open .npz archive, memory-mapped where it is stored uncompressed (estimators atomuq writes)."""
    if key != "metadata":
        mapped = npz_member_memmap(path, key)
        if mapped is not None:
            return mapped
    return archive[key]


def fit_estimator(
    trajectories: Sequence[ErrorDistribution | np.ndarray],
    atom_numbers: np.ndarray,
    reference_force_norms: np.ndarray,
    index: NeighbourIndex,
    atol: float | None = None,
    rtol: float = 0.0,
    bins: HistogramBins | None = None,
    metadata: dict[str, Any] | None = None,
) -> LTAUEstimator:
    """Estimator from M runs' error distributions over the N indexed atoms (each an ErrorDistribution, e.g. a
    loaded error log of either form, or an (E_m, N) array of errors in eV/Å).

    atol defaults to the mean final-epoch error norm of the first run (the paper's "MAE of the
    final model", taken over per-atom force-error norms to match what p_i thresholds). p_i is exact for
    exact trajectories; from a compact (histogram) log it is exact at its bin edges (the default atol is one)
    and log-linear inside a bin. bins default to the edges the binned runs share (DEFAULT_EDGES when none is).
    """
    if not trajectories:
        raise InputError("no error trajectories given")
    runs = [as_distribution(t) for t in trajectories]
    n = runs[0].n_atoms
    if index.size != n:
        raise InputError(f"the descriptor index holds {index.size} atoms but the error logs cover {n}")
    if atol is None:
        atol = runs[0].final_mean_error
    bins = bins or common_bins(runs)
    confidences = run_confidences(runs, atol, rtol, reference_force_norms)
    total = sum(run.n_epochs for run in runs)
    histogram = np.zeros((n, bins.n_columns), dtype=count_dtype(total))  # no cell exceeds total: no overflow
    for run in runs:
        run.histogram(bins, out=histogram)
    return LTAUEstimator(index=index, confidence=confidences.mean, spread=confidences.spread, histogram=histogram,
                         bins=bins, atom_numbers=np.asarray(atom_numbers), reference_force_norms=np.asarray(
                             reference_force_norms, dtype=np.float32), atol=float(atol), rtol=float(rtol),
                         metadata={**(metadata or {}), "n_runs": len(runs),
                                   "epochs_per_run": [run.n_epochs for run in runs]})
