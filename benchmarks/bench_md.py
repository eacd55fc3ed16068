"""Cost of watching MD: per-step cost of direct MD, with the Force Delta monitor, and MTS against conservative MD.

One process, one thread, the bundled model on one molecule (default: aspirin, 21 atoms, a 300 K
test frame). Cases, each through `MDRun` with the same trajectory writing (a frame every 10
steps) and timed interleaved over repeats (minimum taken):

- direct:            velocity Verlet on direct forces, no monitor (one forward pass per step)
- direct+U_Δ/1:      ... with the Force Delta monitor every step (forward + backward each step)
- direct+U_Δ/10:     ... monitor every 10 steps
- conservative:      velocity Verlet on conservative forces
- mts 2 fs M=4, mts 4 fs M=8: MTS at the same simulated time as `conservative`

Ratios: monitored / direct per 0.5 fs step, MTS / conservative at equal simulated time.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_md.py [--steps 400] [--repeats 3]
Writes benchmarks/results/md.json and md.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from ase.io import read

from atomuq.models.registry import resolve_model
from atomuq.workflows.md.monitors import parse_monitor
from atomuq.workflows.md.run import MDRun, MDSettings
from timing import write_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

CASES = {
    "direct": ({"forces": "direct"}, []),
    "direct+U_Δ/1": ({"forces": "direct"}, ["force_delta,every=1"]),
    "direct+U_Δ/10": ({"forces": "direct"}, ["force_delta,every=10"]),
    "conservative": ({"forces": "conservative"}, []),
    "mts 2 fs M=4": ({"forces": "mts", "mts_inner": 4}, []),
    "mts 4 fs M=8": ({"forces": "mts", "mts_inner": 8}, []),
}


def time_case(
    model, atoms, steps: int, kw: dict, specs: list[str], workdir: Path
) -> float:
    """Wall seconds for `steps` x 0.5 fs of simulated time."""
    settings = MDSettings(timestep_fs=0.5, temperature_K=300.0, traj_every=10, **kw)
    inner = kw.get("mts_inner", 1)
    settings.steps = steps // inner if kw["forces"] == "mts" else steps
    monitors = [parse_monitor(s) for s in specs]
    run = MDRun(
        atoms, model, settings, workdir / "bench.extxyz", monitors, say=lambda m: None
    )
    t0 = time.perf_counter()
    run.run()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecule", default="aspirin")
    parser.add_argument(
        "--steps", type=int, default=400, help="0.5 fs steps of simulated time per case"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = resolve_model(None)
    frames = read(ROOT / "data/molecular/test_300K.extxyz.gz", ":")
    atoms = next(a for a in frames if a.info["molecule"] == args.molecule)
    atoms.calc = None
    times: dict[str, list[float]] = {k: [] for k in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        time_case(model, atoms, 40, {"forces": "direct"}, [], Path(tmp))  # warm-up
        for _ in range(args.repeats):
            for name, (kw, specs) in CASES.items():
                times[name].append(
                    time_case(model, atoms, args.steps, kw, specs, Path(tmp))
                )
    best = {k: min(v) for k, v in times.items()}
    per_step_ms = {k: 1000 * v / args.steps for k, v in best.items()}
    ratios = {
        "direct+U_Δ every step / direct": best["direct+U_Δ/1"] / best["direct"],
        "direct+U_Δ every 10 steps / direct": best["direct+U_Δ/10"] / best["direct"],
        "conservative / direct": best["conservative"] / best["direct"],
        "MTS 2 fs M=4 / conservative (equal simulated time)": best["mts 2 fs M=4"]
        / best["conservative"],
        "MTS 4 fs M=8 / conservative (equal simulated time)": best["mts 4 fs M=8"]
        / best["conservative"],
    }
    env = {
        "molecule": args.molecule,
        "atoms": len(atoms),
        "steps": args.steps,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "model": "molecular-small (float32)",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "md.json").write_text(
        json.dumps(
            {
                "env": env,
                "seconds": times,
                "per_step_ms": per_step_ms,
                "ratios": ratios,
            },
            indent=2,
        )
    )
    lines = [
        "# MD cost: Force Delta monitor and MTS",
        "",
        (
            f"`OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_md.py --steps {args.steps} --repeats {args.repeats}`; "
            f"{args.molecule} ({len(atoms)} atoms), {args.steps} x 0.5 fs = {args.steps * 0.5:g} fs of simulated time per case, "
            "minimum over repeats, cases interleaved, all through `MDRun` (frame every 10 steps)."
        ),
        "",
        "| case | ms per 0.5 fs of simulated time |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {v:.2f} |" for k, v in per_step_ms.items()]
    write_report(RESULTS / "md.md", lines, ratios, env)


if __name__ == "__main__":
    main()
