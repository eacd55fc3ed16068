"""Cost of the LTAU-FF neighbour look-up against a model evaluation, and index build times.

Queries: the 11,975 atoms of data/molecular/test_300K (325 molecules). Model evaluation: the
bundled model's forward pass with its direct forces and node features (what `atomuq ltau score`
runs), batched 16 structures. Reference sets of 10^4, 10^5 and 10^6 training descriptors: the
bundled model's real training descriptors (43,385 atoms), subsampled for 10^4 and tiled with
Gaussian noise (5 % of each dimension's spread) for 10^5 and 10^6. For each set and index kind
(exact IndexFlatL2, HNSW at the paper's M=32/efConstruction=40/efSearch=16, IVF with nlist=4√N,
nprobe=8): build time, search time for all queries at k = 1 and k = 10, recall@10 against exact
search on 1,000 queries, and the look-up's share of the LTAU wall time (search / (model + search)).
One thread for torch and FAISS.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ltau.py [--sizes 10000 100000 1000000]
Writes benchmarks/results/ltau.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import faiss
import numpy as np
import torch
from timing import timed

from atomuq.core.io import read_structures
from atomuq.core.memory import reuse_freed_memory
from atomuq.models.registry import resolve_model
from atomuq.uq.ltau.index import build_index, measure_recall
from atomuq.workflows.ltau import compute_descriptors, load_runs, training_records

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DATA = ROOT / "data" / "molecular"
LOG = ROOT / "data" / "training" / "molecular-small" / "error_log"


def reference_set(real: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """size descriptors: a subsample of the real ones, or the real ones tiled with 5 % Gaussian noise."""
    if size <= len(real):
        return real[rng.choice(len(real), size=size, replace=False)]
    tiled = real[rng.integers(0, len(real), size=size)]
    return (tiled + 0.05 * real.std(axis=0) * rng.standard_normal(tiled.shape, dtype=np.float32)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    reuse_freed_memory()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    model = resolve_model("molecular-small")
    queries_atoms = [r.atoms for r in read_structures([DATA / "test_300K.extxyz.gz"])]
    compute_descriptors(model, queries_atoms[:16])  # warm-up
    model_time, queries = timed(args.repeats, compute_descriptors, model, queries_atoms)
    _, logs = load_runs([LOG])
    train = [r.atoms for r in training_records(logs[0], [DATA / "train.extxyz.gz"])]
    real = compute_descriptors(model, train)
    rng = np.random.default_rng(0)
    rows = []
    for size in args.sizes:
        data = reference_set(real, size, rng)
        for kind in args.kinds:
            build_time, index = timed(1, build_index, data, kind, recall_queries=1, recall_k=1)
            row = {"reference_atoms": size, "index": kind, "parameters": index.parameters, "build_s": build_time}
            for k in (1, 10):
                row[f"search_k{k}_s"], _ = timed(args.repeats, index.search, queries, k)
                row[f"share_k{k}"] = row[f"search_k{k}_s"] / (model_time + row[f"search_k{k}_s"])
            row["recall_at_10"] = 1.0 if kind == "flat" else measure_recall(index, data, queries[:1000], 10)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"query_atoms": int(len(queries)), "query_structures": len(queries_atoms), "model_s": model_time,
            "descriptor_width": int(queries.shape[1]), "threads": 1, "faiss": faiss.__version__,
            "machine": platform.processor() or platform.machine(), "repeats": args.repeats}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ltau.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# LTAU neighbour look-up cost", "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ltau.py --sizes {' '.join(map(str, args.sizes))}`", "",
        f"Queries: {meta['query_atoms']:,} atoms ({meta['query_structures']} molecules of test_300K); model evaluation "
        f"(direct forces + node features, bundled model, one thread): {model_time:.2f} s. Descriptor width "
        f"{meta['descriptor_width']}. Share = search / (model + search).", "",
        "| reference atoms | index | build s | search k=1 s | share k=1 | search k=10 s | share k=10 | recall@10 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['reference_atoms']:,} | {r['index']} | {r['build_s']:.2f} | {r['search_k1_s']:.3f} | "
                     f"{r['share_k1']:.1%} | {r['search_k10_s']:.3f} | {r['share_k10']:.1%} | {r['recall_at_10']:.3f} |")
    (RESULTS / "ltau.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
