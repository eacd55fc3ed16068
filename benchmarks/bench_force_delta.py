"""Cost of the Force Delta: time and peak memory of the native model against a direct-only pass and the conservative
forces alone, and against the plain autograd path it replaces.

Models: every shipped model (`atomuq models`) and, with --models config:small config:default, randomly initialised
native configs. Structures: periodic water boxes at 1 g/cm³, by default 1,000, 10,000 and 100,000 atoms. Each
(model, size) row runs in a fresh subprocess (address space capped at --limit-gib as a safety net): its peak
resident memory (ru_maxrss) is read before and after a first direct pass and a first Force Delta evaluation (page
faults of fresh memory included in that first time), then the modes are timed interleaved, minimum over repeats:

- direct: forward under inference_mode (energy, direct forces, confidence; the chunked forward);
- conservative: the energy and its exact backward without the direct head (fused_evaluate(direct=False)): what the
  conservative forces alone cost, the floor of the Force Delta;
- force delta: evaluate(conservative=True) and force_delta (u_i, U_Δ): one shared forward, one backward;
- autograd direct / autograd force delta: the plain graph and autograd (own_derivatives=False), up to
  --autograd-max atoms (at 10^5 atoms it needs more memory than this machine has).

Times are the thread's CPU time (time.thread_time; wall time is in the JSON too): on a machine shared with other
jobs the time spent waiting for a core is not counted, and with one thread it equals wall time on an idle machine.
The neighbour list is part of every mode. As in atomuq's CLI, glibc is asked to keep freed memory
(atomuq.core.memory.reuse_freed_memory).

Run: OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_force_delta.py [--sizes 1000 10000 100000]
     [--models molecular-small ...] [--repeats 5]
Writes benchmarks/results/force_delta.json and .md, or STEM.* with --stem (after every row: a long run keeps what
it measured).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from timing import interleaved_minima, paired_median_ratio

from atomuq.core.batch import Batch
from atomuq.core.memory import reuse_freed_memory
from atomuq.core.neighbors import build_graph
from atomuq.models.derivatives import evaluate
from atomuq.models.native import NativeConfig, NativeModel
from atomuq.models.native.config import PRESETS
from atomuq.models.native.fused import fused_evaluate
from atomuq.models.registry import DEFAULT_MODEL, bundled_models, resolve_model
from atomuq.uq.force_delta import force_delta

RESULTS = Path(__file__).resolve().parent / "results"


def water_box(n_atoms: int, seed: int = 0) -> Atoms:
    """Periodic box of randomly oriented water molecules at 1 g/cm³ (n_atoms rounded to a multiple of 3)."""
    rng = np.random.default_rng(seed)
    n_mol = max(1, n_atoms // 3)
    side = (n_mol * 18.015 / 0.6022) ** (1 / 3)  # Å, for 1 g/cm³
    per_axis = int(np.ceil(n_mol ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(per_axis)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n_mol]
    centres = (grid + 0.5) * side / per_axis
    template = np.array([[0.0, 0.0, 0.0], [0.757, 0.586, 0.0], [-0.757, 0.586, 0.0]])
    q = rng.normal(size=(n_mol, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    rot = np.stack([
        np.stack([1 - 2 * (y**2 + z**2), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x**2 + z**2), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x**2 + y**2)], -1),
    ], 1)
    positions = (centres[:, None, :] + np.einsum("kj,mij->mki", template, rot)).reshape(-1, 3)
    return Atoms("OH2" * n_mol, positions=positions, cell=[side] * 3, pbc=True)


def build_model(name: str) -> NativeModel:
    """A shipped model by name, or config:PRESET (random weights, elements H and O)."""
    if name.startswith("config:"):
        torch.manual_seed(0)
        model = NativeModel(NativeConfig(elements=(1, 8), **PRESETS[name.split(":", 1)[1]])).eval()
    else:
        model = resolve_model(name).eval()
    model.own_derivatives = True  # the fused path is what this benchmark times (plain() switches it off)
    return model


def peak_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(name: str, n_atoms: int, repeats: int, autograd_max: int) -> dict:
    """Memory and times of one (model, size) in this process (see the module docstring)."""
    reuse_freed_memory()
    model = build_model(name)
    atoms = water_box(n_atoms)
    batch = Batch.from_atoms([atoms], dtype=model.dtype)
    n_edges = build_graph(batch, model.cutoff, model.config.max_neighbors).num_edges

    def direct() -> None:
        with torch.inference_mode():
            model(batch)

    def conservative() -> None:
        fused_evaluate(model, batch, gradient=True, direct=False)

    def with_force_delta() -> None:
        force_delta(evaluate(model, batch, conservative=True).detach(), batch)

    def plain(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            model.own_derivatives = False
            try:
                fn()
            finally:
                model.own_derivatives = True
        return run

    base = peak_mib()
    start = time.thread_time()
    direct()
    first_direct = time.thread_time() - start
    direct_peak = peak_mib()
    start = time.thread_time()
    with_force_delta()
    first_delta = time.thread_time() - start
    delta_peak = peak_mib()
    functions = {"direct": direct, "conservative": conservative, "force_delta": with_force_delta}
    row = {"model": name, "n_atoms": len(atoms), "n_edges": n_edges, "parameters": sum(p.numel() for p in
           model.parameters()), "fused_mode": fused_evaluate_mode(model, batch),
           "first_direct_s": first_direct, "first_force_delta_s": first_delta,
           "direct_mib": direct_peak - base, "force_delta_mib": delta_peak - base, "base_mib": base}
    if len(atoms) <= autograd_max:
        functions["autograd_direct"] = plain(direct)
        functions["autograd_force_delta"] = plain(functions["force_delta"])
        functions["autograd_force_delta"]()
        row["autograd_force_delta_mib"] = peak_mib() - base  # plain autograd after the fused runs: its own peak
    best = interleaved_minima(functions, repeats)
    for mode, times in best.items():
        row[f"{mode}_s"], row[f"{mode}_wall_s"] = times["cpu"], times["wall"]
    samples = {mode: times["samples"] for mode, times in best.items()}
    row["delta_over_direct_paired"] = paired_median_ratio(samples["force_delta"], samples["direct"])
    row["delta_over_conservative_paired"] = paired_median_ratio(samples["force_delta"], samples["conservative"])
    return row


def fused_evaluate_mode(model: NativeModel, batch: Batch) -> str:
    """The memory mode the fused backward picks for this batch here (models.native.fused.choose_mode)."""
    from atomuq.models.native.fused import choose_mode

    edges = build_graph(batch, model.cutoff, model.config.max_neighbors).num_edges
    return choose_mode(model, batch, edges, gradient=True)


def ratios(row: dict) -> dict:
    """The ratios of a row: Force Delta over direct and over conservative, the same for autograd, and speed-ups."""
    out = {"delta_over_direct": row["force_delta_s"] / row["direct_s"],
           "delta_over_conservative": row["force_delta_s"] / row["conservative_s"]}
    if "autograd_force_delta_s" in row:
        out["autograd_delta_over_direct"] = row["autograd_force_delta_s"] / row["autograd_direct_s"]
        out["delta_speedup"] = row["autograd_force_delta_s"] / row["force_delta_s"]
        out["direct_speedup"] = row["autograd_direct_s"] / row["direct_s"]
    return out


def write_results(rows: list[dict], meta: dict, stem: str = "force_delta") -> None:
    """results/STEM.json and .md from the rows so far."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    fmt = lambda r, k, spec=".3f": "-" if k not in r else format(r[k], spec)  # noqa: E731
    lines = ["Times (s, CPU of one thread, minimum over repeats); ratios of the minima, and in brackets the median of "
             "the ratios paired within each repeat:", "",
             "| model | atoms | edges | direct | conservative | Force Delta | FD / direct | FD / conservative | "
             "autograd direct | autograd FD | autograd FD / direct | FD speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['n_atoms']:,} | {r['n_edges']:,} | {fmt(r, 'direct_s')} | "
                     f"{fmt(r, 'conservative_s')} | {fmt(r, 'force_delta_s')} | {fmt(r, 'delta_over_direct', '.2f')} "
                     f"({fmt(r, 'delta_over_direct_paired', '.2f')}) | {fmt(r, 'delta_over_conservative', '.3f')} "
                     f"({fmt(r, 'delta_over_conservative_paired', '.3f')}) | {fmt(r, 'autograd_direct_s')} | "
                     f"{fmt(r, 'autograd_force_delta_s')} | {fmt(r, 'autograd_delta_over_direct', '.2f')} | "
                     f"{fmt(r, 'delta_speedup', '.2f')} |")
    lines += ["", "Memory (peak resident MiB above the process before the evaluation; first call, page faults "
              "included):", "",
              "| model | atoms | memory mode | direct MiB | Force Delta MiB | KiB per atom | first Force Delta s | "
              "autograd FD MiB |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['n_atoms']:,} | {r['fused_mode']} | {r['direct_mib']:.0f} | "
                     f"{r['force_delta_mib']:.0f} | {1024 * r['force_delta_mib'] / r['n_atoms']:.0f} | "
                     f"{r['first_force_delta_s']:.2f} | {fmt(r, 'autograd_force_delta_mib', '.0f')} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + f"\n\n{meta}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--models", nargs="+", default=None, help="shipped names or config:PRESET (default: shipped)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large-repeats", type=int, default=3, help="repeats at 10^5 atoms and more")
    parser.add_argument("--autograd-max", type=int, default=20000, help="largest size timed on the autograd path")
    parser.add_argument("--limit-gib", type=float, default=22.0, help="address-space cap of each row's process")
    parser.add_argument("--stem", default="force_delta", help="results/STEM.json and .md")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one row, printed as JSON
        limit = int(args.limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        name, n = args.case
        print(json.dumps(run_case(name, int(n), args.repeats, args.autograd_max)))
        return
    models = args.models or sorted(bundled_models(), key=lambda name: (name != DEFAULT_MODEL, name))
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "large_repeats": args.large_repeats, "time": "thread CPU time (s)",
            "machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    rows = []
    for n in args.sizes:
        for name in models:
            repeats = args.large_repeats if n >= 100000 else args.repeats
            out = subprocess.run([sys.executable, __file__, "--case", name, str(n), "--repeats", str(repeats),
                                  "--autograd-max", str(args.autograd_max), "--limit-gib", str(args.limit_gib)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{name} {n} atoms failed:\n{out.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row.update(ratios(row))
            rows.append(row)
            print(f"{name:24s} {row['n_atoms']:7d} atoms  direct {row['direct_s']:.3f} s  conservative "
                  f"{row['conservative_s']:.3f} s  Force Delta {row['force_delta_s']:.3f} s  FD/direct "
                  f"{row['delta_over_direct']:.2f}  FD/conservative {row['delta_over_conservative']:.3f}  "
                  f"peak {row['force_delta_mib']:.0f} MiB ({row['fused_mode']})", flush=True)
            write_results(rows, meta, args.stem)
    print((RESULTS / f"{args.stem}.md").read_text())


if __name__ == "__main__":
    main()
