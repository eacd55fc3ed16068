"""Nearest-neighbour search in descriptor space with FAISS: exact by default, graph, inverted-file or compressed.

Kinds (one name each, chosen by `atomuq ltau fit --index`):

- flat: exact search (IndexFlatL2), 4·d bytes per vector;
- hnsw: an HNSW graph over the full vectors (the LTAU-FF paper's choice);
- ivf: inverted lists over a flat coarse quantizer (nlist = 4·√N), full vectors;
- ivfsq: compressed, for 10^6–10^8 reference atoms: inverted lists over an HNSW coarse quantizer
  (nlist = min(16·√N, N/40)), each vector stored as 8-bit scalar codes (d bytes: a quarter of the
  float32 size, distances within ~1 % of the exact ones);
- ivfpq: the same with product-quantisation codes of m bytes per vector (16× smaller than float32
  at d = 64 and m = 16; coarser distances and lower recall than ivfsq).

The inverted-list kinds are trained on a random sample of the descriptors (`train` rows, by default
40 per list) and then filled shard by shard (SHARD_ROWS at a time), so the descriptors may be a
memory-mapped .npy file far larger than the memory at hand; adding in shards gives exactly the codes
of adding everything at once. The same pieces (trained_index, encode_shard, merge_shard) let
engines.ray_index encode the shards on other machines.

FAISS L2 indexes return squared distances; everything here returns the L2 distance itself
(in descriptor units). Approximate indexes are checked against exact search on a sample of the
indexed vectors (recall@k), and the measured recall travels with the index. An index read from an
estimator file views the file's pages (memory-mapped) instead of copying them (faiss >= 1.11).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from atomuq.core.errors import InputError

KINDS = ("flat", "hnsw", "ivf", "ivfsq", "ivfpq")
#: kinds made of inverted lists over a trained coarse quantizer: trained on a sample, mergeable shard by shard
IVF_KINDS = ("ivf", "ivfsq", "ivfpq")
#: defaults (HNSW values as used in the LTAU-FF paper, appendix A.2); nlist 0 and train 0: chosen from N
DEFAULT_PARAMETERS: dict[str, dict[str, int]] = {
    "flat": {},
    "hnsw": {"M": 32, "ef_construction": 40, "ef_search": 16},
    "ivf": {"nlist": 0, "nprobe": 8, "train": 0},  # nlist 0: about 4·sqrt(N)
    "ivfsq": {"nlist": 0, "nprobe": 4, "quantizer_ef": 8, "train": 0},  # nlist 0: min(16·sqrt(N), N/40)
    "ivfpq": {"nlist": 0, "nprobe": 4, "quantizer_ef": 8, "train": 0, "m": 16},
}
#: parameters that only steer a search (NeighbourIndex.tune); the others fix how the index is built
SEARCH_PARAMETERS = frozenset({"ef_search", "nprobe", "quantizer_ef"})
#: descriptors read, checked and added at a time (64 MiB of float32 at d = 64)
SHARD_ROWS = 1 << 18
#: training rows per inverted list when `train` is 0 (FAISS asks for at least 39), and at least this many in all
TRAIN_PER_LIST = 40
MIN_TRAIN = 10_000
#: links per node of the HNSW coarse quantizer of ivfsq / ivfpq, and k-means iterations of their training
QUANTIZER_M = 16
KMEANS_ITERATIONS = 10
#: product-quantisation codes: bits per sub-vector (m bytes per vector)
PQ_BITS = 8


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

    @property
    def memory_mapped(self) -> bool:
        """Whether the index views the pages of a memory-mapped file instead of owning copies."""
        return any(isinstance(obj, np.memmap) for obj in getattr(self.index, "referenced_objects", None) or ())

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances (Q, k) in descriptor units, ids (Q, k)) of the k nearest indexed vectors."""
        queries = _as_float32(queries, "query descriptors")
        if queries.shape[1] != self.dimension:
            raise InputError(f"descriptors of width {queries.shape[1]} cannot be searched in an index of width "
                             f"{self.dimension}: they come from another model or layer")
        if not 1 <= k <= self.size:
            raise InputError(f"k = {k} neighbours asked of an index of {self.size} vectors; use 1 <= k <= {self.size}")
        squared, ids = self.index.search(queries, k)
        missing = np.flatnonzero((ids < 0).any(axis=1))
        wider = dict(self.parameters)
        try:  # queries whose probed lists (or graph walk) held fewer than k vectors: again with twice the probes
            while missing.size and _widen(self.kind, wider, self.size):
                _apply_search_parameters(self.index, self.kind, wider)
                squared[missing], ids[missing] = self.index.search(queries[missing], k)
                missing = missing[(ids[missing] < 0).any(axis=1)]
        finally:
            _apply_search_parameters(self.index, self.kind, self.parameters)
        if missing.size:
            raise InputError(f"the {self.kind} index found fewer than k = {k} neighbours for some queries; "
                             "use the exact index")
        return np.sqrt(np.maximum(squared, 0.0)), ids

    def tune(self, **search: int) -> "NeighbourIndex":
        """Change search-time parameters in place (ef_search, nprobe, quantizer_ef: those of this kind) and return self."""
        allowed = set(DEFAULT_PARAMETERS[self.kind]) & SEARCH_PARAMETERS
        unknown = sorted(set(search) - allowed)
        if unknown:
            raise InputError(f"{unknown}: not search parameters of this {self.kind} index; it has {sorted(allowed) or 'none'}")
        bad = sorted(key for key, value in search.items() if int(value) < 1)
        if bad:
            raise InputError(f"{self.kind} index parameters {bad} must be >= 1")
        self.parameters.update({key: int(value) for key, value in search.items()})
        _apply_search_parameters(self.index, self.kind, self.parameters)
        return self

    def write(self, path: str | Path) -> Path:
        """Write the index in FAISS's file format (streamed: no second copy in memory)."""
        _faiss().write_index(self.index, str(path))
        return Path(path)

    @classmethod
    def from_bytes(cls, data: np.ndarray, kind: str, parameters: dict[str, int], **recall: Any) -> "NeighbourIndex":
        """Rebuild an index from its FAISS serialisation (uint8 array); a memory map of a file is viewed, not copied
        (where FAISS has zero-copy reading), so only the pages a search touches become resident."""
        faiss = _faiss()
        if kind not in KINDS:
            raise InputError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
        flags = faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE  # ivfpq: no table in memory (see _empty_index)
        if isinstance(data, np.memmap) and hasattr(faiss, "ZeroCopyIOReader"):
            index = faiss.read_index(faiss.ZeroCopyIOReader(faiss.swig_ptr(data), data.size), flags)
            index.referenced_objects = [data]  # its arrays view these pages: keep them mapped while the index lives
        else:
            reader = faiss.VectorIOReader()
            faiss.copy_array_to_vector(np.ascontiguousarray(data, dtype=np.uint8).ravel(), reader.data)
            index = faiss.read_index(reader, flags)
        _apply_search_parameters(index, kind, parameters)
        return cls(index=index, kind=kind, parameters=dict(parameters), **recall)


def _as_float32(array: np.ndarray, what: str, first_row: int = 0) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in "fiu":
        raise InputError(f"{what} must be real numbers, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise InputError(f"{what} must be a non-empty (n, d) array, got shape {array.shape}")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        row = first_row + int(np.argmin(finite))
        raise InputError(f"{what} hold NaN or infinite values (first in row {row}); the model output is broken")
    return array


class DescriptorFiles:
    """The rows of several .npy files of descriptors (each (n_i, d), memory-mapped), in order, read as one (N, d)
    array: len, shape, dtype, and rows by slice or by a sorted array of row numbers (only those rows are read)."""

    ndim = 2

    def __init__(self, paths: Sequence[str | Path], what: str = "training descriptors") -> None:
        self.paths = [Path(p) for p in paths]
        self.parts = [descriptor_array(p, what) for p in self.paths]
        widths = {part.shape[1] for part in self.parts}
        if len(widths) > 1:
            raise InputError(f"descriptor files of different widths {sorted(widths)}: "
                             + ", ".join(f"{p} ({a.shape[1]})" for p, a in zip(self.paths, self.parts)))
        self.offsets = np.cumsum([0] + [len(part) for part in self.parts])
        self.shape = (int(self.offsets[-1]), widths.pop())
        self.dtype = np.result_type(*self.parts)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step != 1:
                raise InputError("DescriptorFiles: slices must have step 1")
            rows = np.arange(start, stop)
        rows = np.asarray(rows, dtype=np.int64)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        bounds = np.searchsorted(part, np.arange(len(self.parts) + 1))  # rows are sorted: one run per part
        pieces = [self.parts[i][rows[bounds[i] : bounds[i + 1]] - self.offsets[i]]
                  for i in range(len(self.parts)) if bounds[i + 1] > bounds[i]]
        return np.concatenate(pieces) if pieces else np.zeros((0, self.shape[1]), dtype=self.dtype)


Descriptors = np.ndarray | DescriptorFiles


def descriptor_array(descriptors: np.ndarray | str | Path | Sequence[str | Path],
                     what: str = "training descriptors") -> Descriptors:
    """(N, d) descriptors as given, or .npy file(s) opened memory-mapped (read shard by shard, never all at once;
    several files: their rows in order)."""
    if isinstance(descriptors, DescriptorFiles):
        return descriptors
    if isinstance(descriptors, (list, tuple)):
        return DescriptorFiles(descriptors, what) if len(descriptors) != 1 else descriptor_array(descriptors[0], what)
    if isinstance(descriptors, (str, Path)):
        path = Path(descriptors)
        if not path.is_file():
            raise InputError(f"{path}: descriptor file not found")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a .npy array of descriptors ({exc})") from exc
        what = f"{path}: {what}"
    else:
        array = descriptors if isinstance(descriptors, np.ndarray) else np.asarray(descriptors)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise InputError(f"{what} must be a non-empty (n, d) array, got shape {array.shape}")
    if array.dtype.kind not in "fiu":
        raise InputError(f"{what} must be real numbers, got dtype {array.dtype}")
    return array


def shards(data: Descriptors, rows: int = SHARD_ROWS, what: str = "training descriptors"
           ) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 rows) of data, rows at a time, each checked for NaN / infinity."""
    if rows < 1:
        raise InputError(f"shard size must be >= 1 rows, got {rows}")
    for start in range(0, len(data), rows):
        yield start, _as_float32(data[start : start + rows], what, start)


def resolve_parameters(kind: str, parameters: dict[str, int] | None, n: int, d: int) -> dict[str, int]:
    """The kind's parameters for N vectors of width d: defaults filled in, nlist and train chosen when 0, checked."""
    if kind not in KINDS:
        raise InputError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    params = {**DEFAULT_PARAMETERS[kind], **(parameters or {})}
    unknown = set(params) - set(DEFAULT_PARAMETERS[kind])
    if unknown:
        raise InputError(f"unknown {kind} index parameters {sorted(unknown)}; "
                         f"known: {sorted(DEFAULT_PARAMETERS[kind]) or 'none'}")
    negative = sorted(key for key, value in params.items() if int(value) < 0)
    if negative:
        raise InputError(f"{kind} index parameters {negative} must be >= 0")
    for key in ("M", "ef_construction", "ef_search", "nprobe", "quantizer_ef", "m"):
        if key in params and int(params[key]) < 1:
            raise InputError(f"{kind} index parameter {key} must be >= 1, got {params[key]}")
    if kind not in IVF_KINDS:
        return params
    if not params["nlist"]:
        auto = 4 * np.sqrt(n) if kind == "ivf" else min(16 * np.sqrt(n), n / TRAIN_PER_LIST)
        params["nlist"] = max(1, int(auto))
    if params["nlist"] > n:
        raise InputError(f"an {kind} index with nlist = {params['nlist']} needs at least that many vectors, got {n}")
    if kind == "ivfpq":
        if d % params["m"]:
            raise InputError(f"ivfpq: m = {params['m']} sub-vectors must divide the descriptor width {d}; "
                             f"use one of {[m for m in range(1, d + 1) if d % m == 0]}")
        if n < 1 << PQ_BITS:
            raise InputError(f"ivfpq needs at least {1 << PQ_BITS} vectors to train its codebooks, got {n}; "
                             "use flat or ivfsq for so few")
    params["train"] = min(n, params["train"] or max(TRAIN_PER_LIST * params["nlist"], MIN_TRAIN))
    if params["train"] < params["nlist"]:
        raise InputError(f"{kind}: train = {params['train']} rows cannot train nlist = {params['nlist']} lists")
    return params


def _empty_index(kind: str, d: int, params: dict[str, int]) -> Any:
    faiss = _faiss()
    if kind == "flat":
        return faiss.IndexFlatL2(d)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(params["M"]))
        index.hnsw.efConstruction = int(params["ef_construction"])
        return index
    nlist = int(params["nlist"])
    if kind == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
    quantizer = faiss.IndexHNSWFlat(d, QUANTIZER_M)
    if kind == "ivfsq":
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, nlist, int(params["m"]), PQ_BITS)
        index.pq.cp.niter = KMEANS_ITERATIONS
        index.use_precomputed_table = -1  # no nlist·m·1 KiB table in memory: look-up tables are made per probed list
    index.cp.niter = KMEANS_ITERATIONS
    return index


def training_sample(data: Descriptors, rows: int, seed: int = 0) -> np.ndarray:
    """rows distinct random rows of data in file order (float32, checked); only those rows are read."""
    n = len(data)
    chosen = np.arange(n) if rows >= n else np.sort(np.random.default_rng(seed).choice(n, size=rows, replace=False))
    return _as_float32(data[chosen], "training descriptors (training sample)")


def trained_index(data: Descriptors, kind: str = "flat", parameters: dict[str, int] | None = None, seed: int = 0
                  ) -> tuple[Any, dict[str, int]]:
    """(empty FAISS index of kind, trained on a sample of data where it needs training; its resolved parameters)."""
    n, d = data.shape
    params = resolve_parameters(kind, parameters, n, d)
    index = _empty_index(kind, d, params)
    if kind in IVF_KINDS:
        sample = training_sample(data, params["train"], seed)
        index.cp.seed = seed
        index.train(sample)
    return index, params


def encode_shard(trained: Any, shard: np.ndarray) -> Any:
    """A copy of the trained, empty index (flat or IVF) holding only shard's vectors (local ids 0..len-1), for
    merge_shard."""
    faiss = _faiss()
    part = faiss.clone_index(trained)
    if part.ntotal:
        raise InputError("encode_shard needs the trained index before any vectors are added")
    part.add(_as_float32(shard, "training descriptors (shard)"))
    return part


def merge_shard(index: Any, part: Any, first_id: int) -> None:
    """Move the vectors of an encode_shard part into index, their ids shifted by first_id (the shard's first row)."""
    faiss = _faiss()
    if int(first_id) != index.ntotal:
        raise InputError(f"shard starting at row {first_id} merged out of order: the index holds {index.ntotal} rows; "
                         "merge the shards in row order")
    if isinstance(faiss.downcast_index(index), faiss.IndexFlatCodes):
        index.merge_from(part, 0)  # a flat index numbers its rows in order: appended at first_id = ntotal
    else:
        faiss.extract_index_ivf(index).merge_from(faiss.extract_index_ivf(part), int(first_id))


def _widen(kind: str, parameters: dict[str, int], size: int) -> bool:
    """Double the search effort in parameters (nprobe up to nlist, HNSW ef_search up to size); False at the limit."""
    key, limit = ("nprobe", parameters.get("nlist", 0)) if kind in IVF_KINDS else ("ef_search", size)
    if key not in parameters or parameters[key] >= limit:
        return False
    parameters[key] = min(2 * parameters[key], limit)
    return True


def _apply_search_parameters(index: Any, kind: str, parameters: dict[str, int]) -> None:
    faiss = _faiss()
    if kind == "hnsw":
        index.hnsw.efSearch = int(parameters["ef_search"])
    elif kind in IVF_KINDS:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = int(parameters["nprobe"])
        if "quantizer_ef" in parameters:
            faiss.downcast_index(ivf.quantizer).hnsw.efSearch = int(parameters["quantizer_ef"])


def finish_index(index: Any, kind: str, params: dict[str, int], data: Descriptors, recall_queries: int = 1000,
                 recall_k: int = 10, seed: int = 0, exact: np.ndarray | None = None) -> NeighbourIndex:
    """The filled FAISS index as a NeighbourIndex with its search parameters set and, for approximate kinds,
    recall@recall_k measured on recall_queries rows of data (exact: their exact neighbours, when known)."""
    _apply_search_parameters(index, kind, params)
    result = NeighbourIndex(index=index, kind=kind, parameters=params)
    if kind != "flat":
        rows = recall_rows(len(data), recall_queries, seed)
        result.recall_k = min(recall_k, len(data))
        queries = _as_float32(data[rows], "training descriptors (recall sample)")
        result.recall = measure_recall(result, data, queries, result.recall_k, exact)
        result.recall_queries = len(rows)
    return result


def build_index(descriptors: np.ndarray | str | Path | Sequence[str | Path], kind: str = "flat", parameters: dict[str, int] | None = None,
                recall_queries: int = 1000, recall_k: int = 10, seed: int = 0, shard_rows: int = SHARD_ROWS
                ) -> NeighbourIndex:
    """Index (N, d) descriptors (an array or a memory-mapped .npy file, read shard_rows at a time); for approximate
    kinds, measure recall@recall_k against exact search on recall_queries of the indexed vectors."""
    data = descriptor_array(descriptors)
    index, params = trained_index(data, kind, parameters, seed)
    for _, shard in shards(data, shard_rows):
        index.add(shard)
    return finish_index(index, kind, params, data, recall_queries, recall_k, seed)


def recall_rows(n: int, queries: int, seed: int = 0) -> np.ndarray:
    """The rows (sorted) whose exact neighbours the recall is measured on: min(queries, n) distinct random rows."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))


def shard_neighbours(queries: np.ndarray, shard: np.ndarray, first_id: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(squared distances, ids) of the exact k nearest rows of one shard (ids shifted by first_id; -1 beyond it)."""
    faiss = _faiss()
    squared, ids = faiss.knn(queries, shard, min(k, len(shard)))
    pad = k - ids.shape[1]
    if pad:
        squared = np.pad(squared, ((0, 0), (0, pad)), constant_values=np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return squared, np.where(ids >= 0, ids + int(first_id), -1)


def merge_neighbours(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two (squared distances, ids) results for the same queries (ties: the lower id first)."""
    k = a[0].shape[1]
    squared, ids = np.concatenate([a[0], b[0]], axis=1), np.concatenate([a[1], b[1]], axis=1)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), squared), axis=1)[:, :k]
    return np.take_along_axis(squared, order, axis=1), np.take_along_axis(ids, order, axis=1)


def exact_neighbours(data: Descriptors, queries: np.ndarray, k: int, shard_rows: int = SHARD_ROWS) -> np.ndarray:
    """Ids (Q, k) of the exact k nearest rows of data, found by brute force shard by shard (data never copied whole)."""
    queries = _as_float32(queries, "queries")
    best = (np.full((len(queries), k), np.inf, dtype=np.float32), np.full((len(queries), k), -1, dtype=np.int64))
    for start, shard in shards(data, shard_rows, "descriptors"):
        best = merge_neighbours(best, shard_neighbours(queries, shard, start, k))
    return best[1]


def measure_recall(index: NeighbourIndex, data: Descriptors, queries: np.ndarray, k: int,
                   exact: np.ndarray | None = None) -> float:
    """Mean fraction of the exact k nearest neighbours (brute force over data, or the ids exact) that index finds."""
    true_ids = exact_neighbours(data, queries, k) if exact is None else exact
    _, found = index.search(queries, k)
    hits = (found[:, :, None] == true_ids[:, None, :]).any(axis=2).sum()
    return float(hits / true_ids.size)
