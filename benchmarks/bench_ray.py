"""Throughput of `atomuq score` (structures/s) with the Ray engine at 1 and 2 actors, against the local engine.

The structures: the 475 frames of data/molecular/test_300K (20-87 atoms, GFN2-xTB labels) taken --copies times
(as distinct records) — ~1,900 small molecules; the bundled default model, float32, batches of --batch-size,
shards of --shard-size. One local Ray cluster of --cpus CPUs is started once. Every mode scores the same records
into a fresh file (validation, Force Delta, the extxyz writer and the final ordered file included); the actors of
a Ray mode are started by an untimed warm-up run of one shard each (their start-up is reported apart: it is paid once
per Ray session). The modes are timed interleaved, --repeats times; the minimum is kept. The local engine and
each actor run one torch thread. Besides wall time, the CPU time of the driver and of the actors per structure
(not inflated by other jobs on a shared machine), and the driver's and an actor's work split into its parts: the
per-structure figures docs/scale_out.md scales to 10^8 structures.

Run: nice OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ray.py
Writes benchmarks/results/ray.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import ray
import torch

from atomuq.core.batch import Batch
from atomuq.core.io import Record, detach_reference, read_structures, records_sha256, write_structures
from atomuq.core.schema import write_results
from atomuq.core.validate import DEFAULT_MIN_DISTANCE
from atomuq.engines.local import check_score, score_file
from atomuq.engines.ray import release_workers, score_file_ray, workers
from atomuq.models.derivatives import evaluate
from atomuq.models.registry import DEFAULT_MODEL, resolve_model
from atomuq.models.provenance import model_provenance
from atomuq.workflows.score import ScoreSettings, prediction_results, score_shard

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_ms_per(n: int, fn: Callable[..., object], *fn_args: object) -> float:
    """CPU milliseconds of this process per item for fn(*fn_args) over n items (not inflated by other jobs)."""
    start = time.process_time()
    fn(*fn_args)
    return 1000 * (time.process_time() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/molecular/test_300K.extxyz.gz")
    ap.add_argument("--copies", type=int, default=6, help="times the file's frames are taken")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    frames = read_structures([args.data])
    records = [Record(r.atoms, r.source, c * len(frames) + r.index) for c in range(args.copies) for r in frames]
    n_atoms = sum(len(r.atoms) for r in records)
    model = resolve_model(None)
    settings = ScoreSettings(batch_size=args.batch_size)
    load_before = os.getloadavg()
    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    startup: dict[int, float] = {}

    cpu: dict[str, list[tuple[float, float]]] = {}

    def actor_cpu(actors: int | None) -> float:
        """CPU seconds (s) used so far by the kept actors' processes."""
        if actors is None:
            return 0.0
        pool = workers(actors, 0.0, "cpu")
        return sum(ray.get([a.__ray_call__.remote(lambda self: time.process_time()) for a in pool]))

    def run(name: str, actors: int | None) -> float:
        out = work / f"{name.replace(', ', '-').replace(' ', '_')}.extxyz"
        before = (time.process_time(), actor_cpu(actors))
        begin = time.perf_counter()
        if actors is None:
            score_file(records, model, out, settings, shard_size=args.shard_size)
        else:
            score_file_ray(records, model, out, settings, shard_size=args.shard_size, num_workers=actors)
        elapsed = time.perf_counter() - begin
        cpu.setdefault(name, []).append((time.process_time() - before[0], actor_cpu(actors) - before[1]))
        out.unlink()
        return elapsed

    times: dict[str, list[float]] = {"local": [], "ray, 1 actor": [], "ray, 2 actors": []}
    for _ in range(args.repeats):
        for name in times:
            actors = None if name == "local" else int(name.split(", ")[1].split()[0])
            if actors is not None:
                release_workers()  # a pool of exactly `actors`, started (untimed) by one shard each
                begin = time.perf_counter()
                score_file_ray(records[: actors * args.shard_size], model, work / "warm.extxyz", settings,
                               shard_size=args.shard_size, num_workers=actors)
                startup[actors] = time.perf_counter() - begin
            times[name].append(run(name, actors))
    ray.shutdown()
    # CPU time of what the driver does per structure whatever the number of actors: at 10^8 structures these
    # bound one driver
    sample = records[:256]
    driver_ms = {
        "read extxyz.gz": cpu_ms_per(len(frames), read_structures, [args.data]),
        "validate": cpu_ms_per(len(sample), check_score, sample, model, settings, DEFAULT_MIN_DISTANCE, None),
        "hash for the manifest": cpu_ms_per(len(sample), records_sha256, sample),
    }
    scored = score_shard(sample, settings, model)
    # inside an actor: the model's evaluation (what a GPU speeds up) and the host work that stays on the actor's
    # CPU core, timed directly: building the batches and writing every result into its Atoms (the schema writer)
    batches: list[Batch] = []
    actor_ms = {"score_shard": cpu_ms_per(len(sample), score_shard, sample, settings, model),
                "batching": cpu_ms_per(len(sample), lambda: batches.extend(
                    Batch.from_atoms([r.atoms for r in sample[i : i + args.batch_size]], dtype=model.dtype)
                    for i in range(0, len(sample), args.batch_size)))}
    predictions: list = []
    actor_ms["model evaluation"] = cpu_ms_per(len(sample), lambda: predictions.extend(
        (b, evaluate(model, b, conservative=True).detach()) for b in batches))
    values: list = []
    actor_ms["UQ values"] = cpu_ms_per(len(sample), lambda: values.extend(
        v for b, p in predictions for v in prediction_results(model, b, p)))
    provenance = model_provenance(model)
    actor_ms["schema writer"] = cpu_ms_per(len(sample), lambda: [
        write_results(detach_reference(r.atoms), v, provenance) for r, v in zip(sample, values)])
    actor_ms["host work"] = actor_ms["batching"] + actor_ms["schema writer"]
    driver_ms["write shard (extxyz)"] = cpu_ms_per(len(sample), write_structures, work / "w.extxyz", scored)
    bytes_per_structure = (work / "w.extxyz").stat().st_size / len(sample)
    load_after = os.getloadavg()
    best = {name: min(values) for name, values in times.items()}
    rate = {name: len(records) / t for name, t in best.items()}
    # CPU ms per structure (driver, actors) of the fastest repeat: what a free core per actor would give
    cpu_ms = {name: [1000 * c / len(records) for c in cpu[name][times[name].index(best[name])]] for name in times}
    report = {
        "structures": len(records), "atoms": n_atoms, "model": DEFAULT_MODEL, "batch_size": args.batch_size,
        "shard_size": args.shard_size, "cpus": args.cpus, "repeats": args.repeats, "seconds": times,
        "structures_per_s": rate, "ms_per_structure_one_worker": 1000 * best["ray, 1 actor"] / len(records),
        "ratio_2_over_1_actor": rate["ray, 2 actors"] / rate["ray, 1 actor"],
        "ratio_1_actor_over_local": rate["ray, 1 actor"] / rate["local"],
        "cpu_ms_per_structure_driver_actors": cpu_ms,
        "driver_ms_per_structure": driver_ms, "actor_ms_per_structure_split": actor_ms, "output_bytes_per_structure": bytes_per_structure,
        "ray_init_s": ray_start, "actor_startup_s_incl_one_shard": startup, "load_average_before": load_before,
        "load_average_after": load_after, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "torch": torch.__version__, "ray": ray.__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# Ray engine: throughput against the number of actors",
        "",
        f"`nice OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ray.py` — {len(records)} structures ({n_atoms} "
        f"atoms; the {len(frames)} frames of {args.data} × {args.copies}), model {DEFAULT_MODEL} (float32), batches "
        f"of {args.batch_size}, shards of {args.shard_size}, a local Ray cluster of {args.cpus} CPUs on a "
        f"{os.cpu_count()}-core {platform.machine()} machine shared with other jobs (load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after), minimum of {args.repeats} interleaved repeats.",
        "",
        "| engine | wall s | structures/s | × local | CPU ms/structure: driver | actors | cores obtained |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in times:
        driver, actors_ms = cpu_ms[name]
        cores = (driver + actors_ms) * len(records) / 1000 / best[name]
        lines.append(f"| {name} | {best[name]:.2f} | {rate[name]:.0f} | {rate[name] / rate['local']:.2f} | "
                     f"{driver:.2f} | {actors_ms:.2f} | {cores:.2f} |")
    lines += [
        "",
        f"- 2 actors / 1 actor: **{report['ratio_2_over_1_actor']:.2f}×** structures/s (ideal 2× on 2 free cores)",
        f"- 1 actor / local engine: {report['ratio_1_actor_over_local']:.2f}× wall (with Ray the driver's writing "
        "overlaps the actor's scoring, against the cost of shipping shards and results through the object store)",
        "- CPU time per structure (driver + actors; the local engine computes in the driver) does not depend on how "
        "many other jobs share the cores; the wall ratio is set by the cores obtained (CPU time / wall time), which "
        "on this shared machine is what the scheduler grants the whole job, not the number of actors",
        f"- per structure, one worker: {report['ms_per_structure_one_worker']:.2f} ms "
        f"({1000 * best['ray, 1 actor'] / n_atoms * 1000:.0f} µs per atom)",
        f"- paid once per session: ray.init {ray_start:.1f} s; starting the actors and their first shard "
        + ", ".join(f"{k} actor{'s' if k > 1 else ''} {v:.1f} s" for k, v in sorted(startup.items())),
    ]
    lines += ["", "Driver work per structure (CPU time of one process, any number of actors): "
              + "; ".join(f"{k} {v:.2f} ms" for k, v in driver_ms.items())
              + f"; output {bytes_per_structure / 1024:.1f} KiB per structure ({n_atoms / len(records):.0f} atoms).",
              "", "Actor work per structure (CPU time, one process): "
              + "; ".join(f"{k} {v:.2f} ms" for k, v in actor_ms.items())
              + f" (host work = batching + schema writer: {100 * actor_ms['host work'] / actor_ms['score_shard']:.0f} % of "
              "score_shard, which a GPU does not speed up; the UQ values are tensor work that runs where the model "
              "does)."]
    (RESULTS / "ray.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
