"""Cost of the Force Delta against a direct-only evaluation of the native model.

For the small and default native configs at 100, 1,000 and 10,000 atoms (periodic water boxes
at 1 g/cm³), times a direct-only forward pass (no autograd graph) and a Force Delta evaluation
(forward + backward for the conservative forces + u_i, U_Delta), their ratio, and the extra
peak resident memory of each (each case runs in a fresh subprocess). As in atomuq's CLI, glibc is
asked to keep freed memory (atomuq.core.memory); --no-allocator-cache measures without it. Both modes are timed
interleaved in one process (minimum over repeats); the neighbour list is included in both (it is part of every evaluation).

Run: .venv/bin/python benchmarks/bench_force_delta.py [--sizes 100 1000 10000] [--repeats 3]
Writes benchmarks/results/force_delta.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from timing import interleaved_minimum

from atomuq.core.batch import Batch
from atomuq.core.memory import reuse_freed_memory
from atomuq.models.derivatives import evaluate
from atomuq.models.native import NativeConfig, NativeModel
from atomuq.models.native.config import PRESETS
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


def run_case(preset: str, n_atoms: int, repeats: int, allocator_cache: bool = True) -> dict:
    """Time both modes of one (config, size) in this process, interleaved so that load from other
    processes hits both alike; seconds are minima, memory the extra peak RSS (MiB) of each mode."""
    if allocator_cache:
        reuse_freed_memory()
    torch.manual_seed(0)
    model = NativeModel(NativeConfig(elements=(1, 8), **PRESETS[preset])).eval()
    atoms = water_box(n_atoms)
    batch = Batch.from_atoms([atoms])

    def direct() -> None:
        with torch.inference_mode():
            model(batch)

    def with_force_delta() -> None:
        pred = evaluate(model, batch, conservative=True)
        force_delta(pred.detach(), batch)

    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    base = rss()
    direct()
    direct_peak = rss()
    with_force_delta()
    delta_peak = rss()
    best = interleaved_minimum({"direct": direct, "force_delta": with_force_delta}, repeats)
    return {"n_atoms": len(atoms), "direct_s": best["direct"], "force_delta_s": best["force_delta"],
            "direct_mib": direct_peak - base, "force_delta_mib": delta_peak - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--presets", nargs="+", default=["small", "default"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-allocator-cache", action="store_true", help="do not call reuse_freed_memory()")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one measurement, printed as JSON
        preset, n = args.case
        print(json.dumps(run_case(preset, int(n), args.repeats, not args.no_allocator_cache)))
        return
    rows = []
    for preset in args.presets:
        for n in args.sizes:
            flags = ["--no-allocator-cache"] if args.no_allocator_cache else []
            out = subprocess.run([sys.executable, __file__, "--case", preset, str(n), "--repeats", str(args.repeats), *flags],
                                 capture_output=True, text=True, check=True)
            row = {"config": preset, **json.loads(out.stdout.strip().splitlines()[-1])}
            row["ratio"] = row["force_delta_s"] / row["direct_s"]
            rows.append(row)
            print(f"{preset:8s} {row['n_atoms']:6d} atoms  direct {row['direct_s']:.4f} s  "
                  f"force delta {row['force_delta_s']:.4f} s  ratio {row['ratio']:.2f}  "
                  f"memory {row['direct_mib']:.0f} / {row['force_delta_mib']:.0f} MiB", flush=True)
    meta = {"allocator_cache": not args.no_allocator_cache, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "python": platform.python_version()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "force_delta.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| config | atoms | direct-only s | Force Delta s | ratio | direct peak MiB | Force Delta peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['n_atoms']} | {r['direct_s']:.4f} | {r['force_delta_s']:.4f} | "
                     f"{r['ratio']:.2f} | {r['direct_mib']:.0f} | {r['force_delta_mib']:.0f} |")
    (RESULTS / "force_delta.md").write_text("\n".join(lines) + f"\n\n{meta}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
