"""An LTAU descriptor index built on Ray: shards encoded by Ray tasks, merged in row order on the driver.

For descriptor sets too large for one machine's time or memory (10^8 and more training atoms). The
descriptors are .npy files (one or several, their rows in order) on a file system every node sees; each
task memory-maps its rows itself, so no descriptor passes through the driver or the object store. The
driver trains the kind's coarse quantizer and codes on a sample (uq.ltau.index.trained_index, the same
as a local build), puts the trained, empty index in the object store once, and each task encodes one
shard (encode_shard: the coarse assignment and the codes, the costly part of a build) and finds the exact
neighbours of the recall sample among its rows. The driver merges the encoded shards in row order
(merge_shard) as they arrive, at most `in_flight` at a time, and the tasks' exact neighbours into the
recall. The result is the index that uq.ltau.index.build_index makes, code for code and id for id.

Only the inverted-list kinds (ivf, ivfsq, ivfpq) and flat are made of independent shards; an HNSW graph
is not. The driver holds the encoded index (codes and ids: 72 bytes per vector for ivfsq at d = 64, 24 for
ivfpq at m = 16); docs/scale_out.md has the numbers for 10^8 and 10^9.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from atomuq.core.errors import InputError
from atomuq.engines.ray import _ray, connect
from atomuq.uq.ltau.index import (
    IVF_KINDS,
    SHARD_ROWS,
    NeighbourIndex,
    descriptor_array,
    encode_shard,
    finish_index,
    merge_neighbours,
    merge_shard,
    recall_rows,
    shard_neighbours,
    shards,
    trained_index,
)

#: kinds whose shards are independent (merged by FAISS merge_from)
RAY_KINDS = ("flat", *IVF_KINDS)


def _encode(trained: np.ndarray, source: Any, start: int, stop: int, queries: np.ndarray, k: int
            ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Ray task: rows start:stop of source (file paths, opened here, or the rows themselves) encoded with the
    trained index (FAISS serialisation), and the exact k nearest of those rows to the recall queries."""
    import faiss

    faiss.omp_set_num_threads(1)
    rows = source if isinstance(source, np.ndarray) else descriptor_array(source)[start:stop]
    (_, shard), = shards(rows, len(rows))  # checked for NaN / infinity, as float32
    part = encode_shard(faiss.deserialize_index(trained), shard)
    exact = shard_neighbours(queries, shard, start, k) if len(queries) else (np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64))
    return faiss.serialize_index(part), exact


def build_index_ray(descriptors: np.ndarray | str | Path | Sequence[str | Path], kind: str = "ivfsq",
                    parameters: dict[str, int] | None = None, recall_queries: int = 1000, recall_k: int = 10,
                    seed: int = 0, shard_rows: int = SHARD_ROWS, address: str | None = None, in_flight: int | None = None,
                    progress: Callable[[int], None] | None = None) -> NeighbourIndex:
    """build_index on a Ray cluster (address None: RAY_ADDRESS, else a local one): the same index, its shards of
    shard_rows rows encoded by Ray tasks; descriptors given as .npy path(s) are read by the tasks themselves.
    in_flight: shards queued at once (default 2 per cluster CPU); progress(rows) after each merged shard."""
    import faiss

    if kind not in RAY_KINDS:
        raise InputError(f"a {kind} index cannot be built in independent shards; on Ray use one of {', '.join(RAY_KINDS)}")
    if shard_rows < 1:
        raise InputError(f"shard size must be >= 1 rows, got {shard_rows}")
    data = descriptor_array(descriptors)
    paths = [descriptors] if isinstance(descriptors, (str, Path)) else descriptors if isinstance(descriptors, (list, tuple)) else None
    index, params = trained_index(data, kind, parameters, seed)
    k = min(recall_k, len(data)) if kind != "flat" else 0
    queries = np.ascontiguousarray(data[recall_rows(len(data), recall_queries if k else 0, seed)], dtype=np.float32)
    exact = (np.full((len(queries), k), np.inf, dtype=np.float32), np.full((len(queries), k), -1, dtype=np.int64))
    ray = _ray()
    connected = connect(address)
    try:
        task = ray.remote(num_cpus=1)(_encode)
        trained_ref, queries_ref = ray.put(faiss.serialize_index(index)), ray.put(queries)
        limit = in_flight or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending: deque[tuple[int, Any]] = deque()

        def merge_oldest() -> None:
            nonlocal exact
            first, ref = pending.popleft()
            encoded, neighbours = ray.get(ref)
            part = faiss.deserialize_index(encoded)
            rows = int(part.ntotal)
            merge_shard(index, part, first)  # moves the part's vectors: it is empty after
            exact = merge_neighbours(exact, neighbours)
            if progress is not None:
                progress(rows)

        for start in range(0, len(data), shard_rows):
            stop = min(start + shard_rows, len(data))
            rows = [str(p) for p in paths] if paths is not None else np.asarray(data[start:stop])
            pending.append((start, task.remote(trained_ref, rows, start, stop, queries_ref, k)))
            if len(pending) >= limit:
                merge_oldest()
        while pending:
            merge_oldest()
    finally:
        if connected:
            ray.shutdown()
    return finish_index(index, kind, params, data, recall_queries, recall_k, seed, exact[1] if k else None)
