"""Nearest-neighbour search in descriptor space with FAISS: exact by default, HNSW or IVF for large sets.

FAISS L2 indexes return squared distances; everything here returns the L2 distance itself
(in descriptor units). Approximate indexes are checked against exact search on a sample of the
indexed vectors (recall@k), and the measured recall travels with the index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from atomuq.core.errors import InputError

KINDS = ("flat", "hnsw", "ivf")
#: defaults for approximate indexes (HNSW values as used in the LTAU-FF paper, appendix A.2)
DEFAULT_PARAMETERS: dict[str, dict[str, int]] = {
    "flat": {},
    "hnsw": {"M": 32, "ef_construction": 40, "ef_search": 16},
    "ivf": {"nlist": 0, "nprobe": 8},  # nlist 0: about 4·sqrt(N)
}


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a core dependency
        raise InputError("LTAU needs FAISS: pip install faiss-cpu (or faiss-gpu with CUDA)") from exc
    return faiss


@dataclass
class NeighbourIndex:
    """A FAISS index over N descriptors of width d, with its kind, parameters and measured recall."""

    index: Any
    kind: str
    parameters: dict[str, int] = field(default_factory=dict)
    recall: float | None = None
    recall_k: int | None = None
    recall_queries: int | None = None

    @property
    def dimension(self) -> int:
        """Descriptor width d."""
        return int(self.index.d)

    @property
    def size(self) -> int:
        """Number of indexed vectors N."""
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances (Q, k) in descriptor units, ids (Q, k)) of the k nearest indexed vectors."""
        queries = _as_float32(queries, "query descriptors")
        if queries.shape[1] != self.dimension:
            raise InputError(f"descriptors of width {queries.shape[1]} cannot be searched in an index of width "
                             f"{self.dimension}: they come from another model or layer")
        if not 1 <= k <= self.size:
            raise InputError(f"k = {k} neighbours asked of an index of {self.size} vectors; use 1 <= k <= {self.size}")
        squared, ids = self.index.search(queries, k)
        if (ids < 0).any():
            raise InputError(f"the {self.kind} index found fewer than k = {k} neighbours for some queries; "
                             "raise ef_search / nprobe or use the exact index")
        return np.sqrt(np.maximum(squared, 0.0)), ids

    def to_bytes(self) -> np.ndarray:
        """The index serialised by FAISS (uint8 array)."""
        return np.asarray(_faiss().serialize_index(self.index))

    @classmethod
    def from_bytes(cls, data: np.ndarray, kind: str, parameters: dict[str, int], **recall: Any) -> "NeighbourIndex":
        """Rebuild an index written by to_bytes."""
        index = _faiss().deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
        _apply_search_parameters(index, kind, parameters)
        return cls(index=index, kind=kind, parameters=dict(parameters), **recall)


def _as_float32(array: np.ndarray, what: str) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] < 1:
        raise InputError(f"{what} must be a non-empty (n, d) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(f"{what} hold NaN or infinite values; the model output is broken")
    return array


def _apply_search_parameters(index: Any, kind: str, parameters: dict[str, int]) -> None:
    if kind == "hnsw":
        index.hnsw.efSearch = int(parameters["ef_search"])
    elif kind == "ivf":
        index.nprobe = int(parameters["nprobe"])


def build_index(descriptors: np.ndarray, kind: str = "flat", parameters: dict[str, int] | None = None,
                recall_queries: int = 1000, recall_k: int = 10, seed: int = 0) -> NeighbourIndex:
    """Index (N, d) descriptors; for approximate kinds, measure recall@recall_k against exact search."""
    faiss = _faiss()
    if kind not in KINDS:
        raise InputError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    data = _as_float32(descriptors, "training descriptors")
    n, d = data.shape
    params = {**DEFAULT_PARAMETERS[kind], **(parameters or {})}
    unknown = set(params) - set(DEFAULT_PARAMETERS[kind])
    if unknown:
        raise InputError(f"unknown {kind} index parameters {sorted(unknown)}; "
                         f"known: {sorted(DEFAULT_PARAMETERS[kind]) or 'none'}")
    if kind == "flat":
        index = faiss.IndexFlatL2(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(params["M"]))
        index.hnsw.efConstruction = int(params["ef_construction"])
    else:
        nlist = int(params["nlist"]) or max(1, int(4 * np.sqrt(n)))
        if nlist > n:
            raise InputError(f"an IVF index with nlist = {nlist} needs at least that many vectors, got {n}")
        params["nlist"] = nlist
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        index.train(data)
    index.add(data)
    _apply_search_parameters(index, kind, params)
    result = NeighbourIndex(index=index, kind=kind, parameters=params)
    if kind != "flat":
        result.recall_k = min(recall_k, n)
        sample = np.random.default_rng(seed).choice(n, size=min(recall_queries, n), replace=False)
        result.recall = measure_recall(result, data, data[sample], result.recall_k)
        result.recall_queries = len(sample)
    return result


def measure_recall(index: NeighbourIndex, data: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Mean fraction of the exact k nearest neighbours (from brute force over data) that index finds."""
    faiss = _faiss()
    exact = faiss.IndexFlatL2(data.shape[1])
    exact.add(_as_float32(data, "descriptors"))
    _, true_ids = exact.search(_as_float32(queries, "queries"), k)
    _, found = index.search(queries, k)
    hits = (found[:, :, None] == true_ids[:, None, :]).any(axis=2).sum()
    return float(hits / true_ids.size)
