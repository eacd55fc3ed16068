"""LTAU at 10^6 and 10^7 reference atoms: compressed descriptor indexes built in shards from memory-mapped .npy files.

Query: one MD-sized frame of 1,008 atoms (the first 48 molecules of data/molecular/test_300K, 15 Å
apart, as one structure) and its descriptors from the bundled model. Model time: that frame's
forward pass with direct forces and node features (what `atomuq ltau score` and an LTAU-monitored
MD step run), timed in the same process as the searches, interleaved with them (minimum over
repeats). Share = search / (model + search). One thread for torch and FAISS.

Reference sets, written once to memory-mapped .npy files under --scratch:
- 10^6, real descriptors: the bundled model's node features of its 1,170 training molecules, each in
  24 copies with Gaussian displacements of σ = 0.05 Å per coordinate (new geometries like MD frames),
  the first 10^6 atoms;
- 10^7, synthetic: a Gaussian mixture fitted to the 10^6 real set (1,024 k-means clusters, each with
  its weight, mean and full covariance), sampled shard by shard.

For each set and index kind, in a child process each: the build (train on a sample, add shard by
shard from the .npy; time, peak resident memory: VmHWM, which counts the pages of the memory-mapped
descriptors, and the peak of anonymous memory sampled every 0.1 s), the index as stored in an
estimator (.npz member: size on disk), then in a fresh child: load (memory-mapped), the first search
(cold pages), searches at k = 1 and k = 10 for several nprobe, recall@1 and @10 of the frame against
exact search (brute force streamed over the .npy), resident memory after the searches (anonymous /
file-backed). Rows "flat" at 10^6: an exact IndexFlatL2 in memory; "exact (streamed)" at 10^7: the
brute force over the memory-mapped file that gives the ground truth.

--model materials (issue 16: every shipped model): the query is a 1,000-atom diamond Si supercell (5 × 5 × 5
cubic cells) rattled by σ = 0.05 Å, the reference set the materials model's features of its training frames
(runs/materials/error_log, out/materials/train.extxyz.gz) in rattled copies, descriptor width 96.
A kind may carry build parameters, e.g. ivfsq:nlist=4096,quantizer_ef=4 (`atomuq ltau fit --index ivfsq
--index-param nlist=4096 ...` builds the same index).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ltau_scale.py --scratch /tmp/ltau_scale
     [--model molecular-small|materials] [--sizes 1000000 10000000] [--kinds flat ivf ivfsq ivfpq
     ivfsq:nlist=4096,quantizer_ef=4] [--tag TAG] [--keep]
Writes benchmarks/results/ltau_scale[_TAG].json and .md; deletes the scratch files unless --keep.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DATA = ROOT / "data" / "molecular"
LOG = ROOT / "data" / "training" / "molecular-small" / "error_log"
#: model -> (its training error log, its training files)
TRAINING = {"molecular-small": (LOG, DATA / "train.extxyz.gz"),
            "materials": (ROOT / "runs" / "materials" / "error_log", ROOT / "out" / "materials" / "train.extxyz.gz")}
FRAME_ATOMS = 1000
RATTLE = 0.05  # Å
CLUSTERS = 1024
NPROBES = {"ivf": (1, 2, 4, 8), "ivfsq": (1, 2, 4, 8, 16), "ivfpq": (1, 2, 4, 8, 16)}
K = (1, 10)


def memory() -> dict[str, float]:
    """This process's resident memory in GiB: VmRSS, VmHWM (peak), RssAnon, RssFile."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) / 2**20
    return values


class AnonPeak:
    """Peak anonymous resident memory (GiB) of this process, sampled every 0.1 s on a thread."""

    def __enter__(self) -> "AnonPeak":
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, memory()["RssAnon"])

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, memory()["RssAnon"])


def frame_and_model(name: str = "molecular-small"):
    """(bundled model, its query frame: 1,008 atoms of molecules, or 1,000 of rattled Si) with torch on one thread."""
    import torch
    from ase import Atoms
    from ase.build import bulk

    from atomuq.core.io import read_structures
    from atomuq.models.registry import resolve_model

    torch.set_num_threads(1)
    model = resolve_model(name)
    if name == "materials":
        frame = bulk("Si", "diamond", 5.431, cubic=True).repeat((5, 5, 5))
        frame.positions += np.random.default_rng(0).normal(scale=RATTLE, size=frame.positions.shape)
        return model, frame
    molecules = [r.atoms for r in read_structures([DATA / "test_300K.extxyz.gz"])]
    frame, i = Atoms(), 0
    while len(frame) < FRAME_ATOMS:
        part = molecules[i].copy()
        part.positions += 15.0 * np.array([i % 6, i // 6 % 6, i // 36])
        frame += part
        i += 1
    return model, frame


def real_set(path: Path, size: int, name: str = "molecular-small") -> None:
    """size real descriptors: the bundled model's features of its training structures in rattled copies."""
    from atomuq.workflows.ltau import compute_descriptors, load_runs, training_records

    model, _ = frame_and_model(name)
    log, train_file = TRAINING[name]
    _, logs = load_runs([log])
    train = [r.atoms for r in training_records(logs[0], [train_file])]
    rng = np.random.default_rng(0)
    per_copy = sum(len(a) for a in train)
    out, row = None, 0
    while row < size:
        rattled = []
        for atoms in train:
            copy = atoms.copy()
            copy.positions = copy.positions + rng.normal(scale=RATTLE, size=copy.positions.shape)
            rattled.append(copy)
        block = compute_descriptors(model, rattled, batch_size=32)
        if out is None:
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(size, block.shape[1]))
        take = min(size - row, per_copy)
        out[row : row + take] = block[:take]
        row += take
    out.flush()


def synthetic_set(real: Path, path: Path, size: int, shard: int = 1 << 18) -> dict:
    """size samples of a Gaussian mixture fitted to the real descriptors (k-means clusters: weight, mean, full
    covariance), written shard by shard; returns the mixture's summary."""
    x = np.load(real, mmap_mode="r")
    d = x.shape[1]
    sample = np.ascontiguousarray(x[np.sort(np.random.default_rng(1).choice(len(x), 400_000, replace=False))])
    kmeans = faiss.Kmeans(d, CLUSTERS, niter=10, seed=1)
    kmeans.train(sample)
    _, assign = kmeans.index.search(sample, 1)
    assign = assign[:, 0]
    counts = np.bincount(assign, minlength=CLUSTERS)
    means = np.zeros((CLUSTERS, d))
    factors = np.zeros((CLUSTERS, d, d))
    for c in range(CLUSTERS):  # per cluster (1,024), not per atom
        members = sample[assign == c].astype(np.float64)
        if len(members) < 2:
            means[c], factors[c] = kmeans.centroids[c], 1e-3 * np.eye(d)
            continue
        means[c] = members.mean(axis=0)
        cov = np.cov(members, rowvar=False) + 1e-6 * np.eye(d)
        factors[c] = np.linalg.cholesky(cov)
    weights = counts / counts.sum()
    rng = np.random.default_rng(2)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(size, d))
    for start in range(0, size, shard):
        n = min(shard, size - start)
        labels = np.sort(rng.choice(CLUSTERS, size=n, p=weights))
        z = rng.standard_normal((n, d))
        block = np.empty((n, d))
        bounds = np.searchsorted(labels, np.arange(CLUSTERS + 1))
        for c in np.flatnonzero(np.diff(bounds)):
            block[bounds[c] : bounds[c + 1]] = means[c] + z[bounds[c] : bounds[c + 1]] @ factors[c].T
        out[start : start + n] = block[rng.permutation(n)]
    out.flush()
    return {"clusters": CLUSTERS, "fit_sample": len(sample), "largest_cluster_weight": float(weights.max()),
            "median_cluster_std": float(np.median(np.sqrt(np.einsum("cij,cij->c", factors, factors) / d)))}


def child_build(args: argparse.Namespace) -> dict:
    """Build one index from the .npy and store it as an estimator stores it (an uncompressed .npz member)."""
    from atomuq.uq.ltau.index import build_index

    faiss.omp_set_num_threads(1)
    with AnonPeak() as peak:
        start = time.perf_counter()
        index = build_index(args.data, args.kind, json.loads(args.params))
        build_s = time.perf_counter() - start
        tmp = Path(args.out).with_suffix(".faiss")
        index.write(tmp)
        np.savez(args.out, index=np.memmap(tmp, dtype=np.uint8, mode="r"))
        tmp.unlink()
    return {"build_s": build_s, "parameters": index.parameters, "self_recall_at_10": index.recall,
            "index_bytes": Path(args.out).stat().st_size, "build_peak_anon_gib": peak.peak,
            "build_peak_rss_gib": memory()["VmHWM"]}


def child_search(args: argparse.Namespace) -> dict:
    """Load one stored index memory-mapped, search the frame, time it against the model pass on the same frame."""
    import torch

    from atomuq.core.io import npz_member_memmap
    from atomuq.uq.ltau.index import NeighbourIndex
    from atomuq.workflows.ltau import compute_descriptors

    faiss.omp_set_num_threads(1)
    model, frame = frame_and_model(args.model)
    queries = compute_descriptors(model, [frame])
    exact = np.load(args.exact)
    before = memory()
    start = time.perf_counter()
    if args.kind == "flat-memory":  # the exact baseline: all descriptors in an IndexFlatL2
        flat = faiss.IndexFlatL2(queries.shape[1])
        flat.add(np.load(args.data))
        index = NeighbourIndex(flat, "flat")
    else:
        index = NeighbourIndex.from_bytes(npz_member_memmap(args.out, "index"), args.kind, json.loads(args.params))
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    index.search(queries, 10)
    cold_s = time.perf_counter() - start
    rows = []
    for nprobe in json.loads(args.nprobes) or [None]:
        if nprobe is not None:
            index.tune(nprobe=nprobe)
        times: dict[str, list[float]] = {"model": [], "k1": [], "k10": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                compute_descriptors(model, [frame])
            times["model"].append(time.perf_counter() - start)
            for k in K:
                start = time.perf_counter()
                _, ids = index.search(queries, k)
                times[f"k{k}"].append(time.perf_counter() - start)
        _, ids = index.search(queries, 10)
        row = {"nprobe": nprobe, "model_s": min(times["model"]),
               "recall_at_1": float((ids[:, 0] == exact[:, 0]).mean()),
               "recall_at_10": float((ids[:, :, None] == exact[:, None, :]).any(axis=2).mean())}
        for k in K:
            row[f"search_k{k}_s"] = min(times[f"k{k}"])
            row[f"share_k{k}"] = row[f"search_k{k}_s"] / (row["model_s"] + row[f"search_k{k}_s"])
        rows.append(row)
    after = memory()
    return {"load_s": load_s, "cold_search_k10_s": cold_s, "rows": rows, "query_atoms": len(queries),
            "rss_before_load_gib": before["VmRSS"], "anon_added_gib": after["RssAnon"] - before["RssAnon"],
            "file_added_gib": after["RssFile"] - before["RssFile"], "memory_mapped": index.memory_mapped}


def parse_kind(variant: str) -> tuple[str, dict[str, int]]:
    """'ivfsq:nlist=4096,quantizer_ef=4' -> ('ivfsq', {'nlist': 4096, 'quantizer_ef': 4})."""
    kind, _, rest = variant.partition(":")
    return kind, {k: int(v) for k, v in (item.split("=") for item in rest.split(",") if item)}


def run_child(mode: str, **options: object) -> dict:
    """Run this script as a child process (fresh memory counters) and return its JSON result."""
    command = [sys.executable, __file__, "--child", mode]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{mode} child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf", "ivfsq", "ivfpq"],
                        help="index kinds, each optionally KIND:param=value,... (build parameters)")
    parser.add_argument("--model", choices=list(TRAINING), default="molecular-small")
    parser.add_argument("--tag", default="", help="results go to ltau_scale_TAG.{json,md}")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/ltau_scale"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the scratch files (descriptor sets, indexes)")
    parser.add_argument("--report-from", type=Path, metavar="LOG",
                        help="write the results from the rows an earlier (interrupted) run printed to LOG; measure nothing")
    parser.add_argument("--child", choices=["build", "search"])
    for name in ("data", "kind", "params", "out", "exact", "nprobes"):  # child options
        parser.add_argument(f"--{name}")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_build(args) if args.child == "build" else child_search(args)))
        return
    from atomuq.uq.ltau.index import exact_neighbours
    from atomuq.workflows.ltau import compute_descriptors

    faiss.omp_set_num_threads(1)
    model, frame = frame_and_model(args.model)
    queries = compute_descriptors(model, [frame])
    if args.report_from is not None:
        rows = [json.loads(line) for line in args.report_from.read_text().splitlines() if line.startswith("{")]
        if not rows:
            raise SystemExit(f"{args.report_from}: no result rows (JSON lines) in this log")
        meta = {"query_atoms": len(queries), "descriptor_width": int(queries.shape[1]), "threads": 1,
                "faiss": faiss.__version__, "machine": platform.processor() or platform.machine(),
                "repeats": args.repeats, "sets": {}, "from_log": str(args.report_from)}
        args.sizes = sorted({r["reference_atoms"] for r in rows})
        args.kinds = list(dict.fromkeys(r["index"] for r in rows))
        write_results(meta, rows, args)
        return
    args.scratch.mkdir(parents=True, exist_ok=True)
    real = args.scratch / ("real_1000000.npy" if args.model == "molecular-small" else f"real_{args.model}_1000000.npy")
    meta: dict = {"query_atoms": len(queries), "descriptor_width": int(queries.shape[1]), "threads": 1,
                  "faiss": faiss.__version__, "machine": platform.processor() or platform.machine(),
                  "repeats": args.repeats, "sets": {}}
    if not real.exists():
        start = time.perf_counter()
        real_set(real, 1_000_000, args.model)
        meta["sets"]["real_1000000_s"] = time.perf_counter() - start
    rows = []
    for size in args.sizes:
        if size == 1_000_000:
            data = real
        else:
            data = args.scratch / f"synthetic_{size}.npy"
            start = time.perf_counter()
            meta["sets"][f"synthetic_{size}"] = synthetic_set(real, data, size)
            meta["sets"][f"synthetic_{size}_s"] = time.perf_counter() - start
        start = time.perf_counter()
        exact = exact_neighbours(np.load(data, mmap_mode="r"), queries, 10)
        exact_s = time.perf_counter() - start
        np.save(args.scratch / "exact.npy", exact)
        for variant in args.kinds:
            kind, params = parse_kind(variant)
            if kind == "ivf" and size > 1_000_000:  # its flat k-means over 4·sqrt(N) lists is hours at 10^7
                continue
            if kind == "flat" and size > 1_000_000:
                rows.append({"reference_atoms": size, "index": "exact (streamed)", "build_s": 0.0,
                             "synthetic": True, "rows": [{"nprobe": None, "search_k10_s": exact_s, "recall_at_1": 1.0,
                                                          "recall_at_10": 1.0}]})
                continue
            common = {"data": data, "kind": kind, "params": json.dumps(params), "out": args.scratch / f"{kind}_{size}.npz",
                      "model": args.model}
            built = ({"build_s": 0.0, "parameters": {}, "index_bytes": 4 * queries.shape[1] * size}
                     if kind == "flat" else run_child("build", **common))
            searched = run_child("search", **{**common, "kind": "flat-memory" if kind == "flat" else kind,
                                              "params": json.dumps(built["parameters"]), "exact": args.scratch / "exact.npy",
                                              "nprobes": json.dumps(list(NPROBES.get(kind, ()))),
                                              "repeats": 1 if kind == "flat" else args.repeats})
            row = {"reference_atoms": size, "index": variant, "synthetic": data != real, **built, **searched}
            rows.append(row)
            print(json.dumps(row), flush=True)
            Path(common["out"]).unlink(missing_ok=True)
        if data != real:
            data.unlink()
        write_results(meta, rows, args)  # after each size: an interrupted run keeps the sizes it finished
    if not args.keep:
        shutil.rmtree(args.scratch)


def write_results(meta: dict, rows: list[dict], args: argparse.Namespace) -> None:
    """benchmarks/results/ltau_scale.json and .md from the rows measured so far."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ltau_scale{'_' + args.tag if args.tag else ''}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    write_markdown(meta, rows, args)


def write_markdown(meta: dict, rows: list[dict], args: argparse.Namespace) -> None:
    """benchmarks/results/ltau_scale.md from the measured rows."""
    lines = [
        "# LTAU look-up at 10^6 and 10^7 reference atoms", "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ltau_scale.py --sizes "
        f"{' '.join(map(str, args.sizes))} --kinds {' '.join(args.kinds)}"
        + (f" --model {args.model}" if args.model != "molecular-small" else "")
        + (f" --tag {args.tag}" if args.tag else "") + "`"
        + (f" (rows as that run printed them to its log; written by `--report-from {meta['from_log']}`)"
           if meta.get("from_log") else ""), "",
        f"Model: {args.model}. Query: one {meta['query_atoms']:,}-atom frame ("
        + ("48 molecules of test_300K" if args.model == "molecular-small" else "diamond Si, 5 × 5 × 5 cubic cells, "
           "rattled by σ = 0.05 Å") + f"); descriptor width "
        f"{meta['descriptor_width']}; one thread; FAISS {meta['faiss']}. 10^6: real descriptors (the bundled "
        "model's features of its training structures in rattled copies, σ = 0.05 Å); 10^7: **synthetic**, a "
        f"{CLUSTERS}-cluster Gaussian mixture (weights, means, full covariances) fitted to the 10^6 real set. "
        "Share = search / (model + search), model = the frame's forward pass (direct forces + node features), "
        "timed interleaved with the searches in the same process. Recall: the frame's atoms against exact "
        "search; self recall@10: 1,000 indexed atoms, as `atomuq ltau fit` reports it.", "",
        "| reference atoms | index | nlist | nprobe | build s | build peak anon / RSS GiB | size MiB | B/atom | "
        "load s | cold search s | model ms | search k=1 ms | share k=1 | search k=10 ms | share k=10 | "
        "recall@1 | recall@10 | self recall@10 | resident added by load + searches: anon / file MiB |",
        "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        for s in r["rows"]:
            if "model_s" not in s:  # the streamed exact search at 10^7
                lines.append(f"| {r['reference_atoms']:,} synthetic | {r['index']} | – | – | – | – | – | – | – | – | – | – | – | "
                             f"{1e3 * s['search_k10_s']:.0f} | – | 1 | 1 | – | – |")
                continue
            params = r.get("parameters", {})
            peak = (f"{r['build_peak_anon_gib']:.2f} / {r['build_peak_rss_gib']:.2f}" if "build_peak_anon_gib" in r
                    else "–")
            lines.append(
                f"| {r['reference_atoms']:,}{' synthetic' if r.get('synthetic') else ''} | {r['index']} | "
                f"{params.get('nlist', '–')} | {s['nprobe'] if s['nprobe'] is not None else '–'} | {r['build_s']:.0f} | "
                f"{peak} | {r['index_bytes'] / 2**20:.0f} | {r['index_bytes'] / r['reference_atoms']:.1f} | "
                f"{r['load_s']:.3f} | {r['cold_search_k10_s']:.3f} | {1e3 * s['model_s']:.1f} | "
                f"{1e3 * s['search_k1_s']:.2f} | {s['share_k1']:.1%} | {1e3 * s['search_k10_s']:.2f} | "
                f"{s['share_k10']:.1%} | {s['recall_at_1']:.3f} | {s['recall_at_10']:.3f} | "
                f"{r['self_recall_at_10'] if r.get('self_recall_at_10') is not None else 1:.3f} | "
                f"{1024 * r['anon_added_gib']:.0f} / {1024 * r['file_added_gib']:.0f} |")
    (RESULTS / f"ltau_scale{'_' + args.tag if args.tag else ''}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
