"""Batched torch-sim MD against one-by-one ASE MD: steps per second on 32 small molecules, same bundled model.

One process, one thread, the bundled model (molecular-small, float32 as shipped) on 32 systems: the 30 frames of the
shipped src/atomuq/data/structures/molecular_demo.extxyz and again its first two (20 to 87 atoms). Every system starts
from the same velocities in every case (Maxwell-Boltzmann at 300 K, atomuq md's init_velocities with seed = index)
and runs Langevin at 300 K, 0.5 fs, on direct forces. Cases, timed interleaved over repeats (minimum taken):

- ase:               each system in turn through atomuq's ASE calculator (AtomuqCalculator) and ASE's Langevin
- torch-sim:         all 32 at once through atomuq.engines.torchsim.BatchedMD (TorchSimModel, torch-sim nvt_langevin)
- ase + monitors:    each system in turn through `atomuq md`'s MDRun with the log-only monitors (U_Δ, energy drift,
                     temperature every 10 steps; one frame written at the end)
- torch-sim + monitors: BatchedMD with the same log-only monitors, checked per system

Steps per second count system-steps (one system advanced by one step). Ratios: torch-sim over ASE, with and without
monitors, measured in one run.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_torchsim.py [--steps 100] [--repeats 2]
Writes benchmarks/results/torchsim.json and torchsim.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.io import read
from ase.md.langevin import Langevin

from atomuq.calculator import AtomuqCalculator
from atomuq.engines.torchsim import BatchedMD
from atomuq.models.registry import resolve_model
from atomuq.workflows.md.integrators import init_velocities
from atomuq.workflows.md.monitor_plan import plan_from_specs
from atomuq.workflows.md.run import MDRun, MDSettings
from timing import write_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEMO = ROOT / "src" / "atomuq" / "data" / "structures" / "molecular_demo.extxyz"
SYSTEMS = 32


def systems() -> list:
    """32 molecules from the shipped demo file (cycled), each with its Maxwell-Boltzmann start at 300 K."""
    frames = read(DEMO, ":")
    out = []
    for k in range(SYSTEMS):
        atoms = frames[k % len(frames)].copy()
        atoms.calc = None
        init_velocities(atoms, 300.0, k)
        out.append(atoms)
    return out


def settings(steps: int) -> MDSettings:
    return MDSettings(ensemble="langevin", forces="direct", temperature_K=300.0, timestep_fs=0.5, steps=steps,
                      traj_every=steps)


def run_ase(model, starts, steps: int) -> dict:
    """Each system in turn: AtomuqCalculator + ASE Langevin (as atomuq md builds it), no monitors."""
    s = settings(steps)
    temperatures = []
    for k, start in enumerate(starts):
        atoms = start.copy()
        atoms.calc = AtomuqCalculator(model, forces="direct", conservative="on_demand")
        dyn = Langevin(atoms, s.timestep_fs * units.fs, temperature_K=s.temperature_K,
                       friction=s.friction_per_fs / units.fs, fixcm=False, rng=np.random.default_rng(k + 1))
        dyn.run(steps)
        temperatures.append(atoms.get_temperature())
    return {"completed": len(starts), "mean_final_temperature_K": float(np.mean(temperatures))}


def run_ase_monitored(model, starts, steps: int, workdir: Path) -> dict:
    """Each system in turn through MDRun (atomuq md) with the log-only monitors."""
    s = settings(steps)
    completed = 0
    for k, start in enumerate(starts):
        plan = plan_from_specs(["log"], s, model.has_direct_forces)
        result = MDRun(start, model, s, workdir / f"ase_{k}.extxyz", plan, say=lambda m: None).run()
        completed += result.status == "completed"
    return {"completed": completed}


def run_torchsim(model, starts, steps: int, monitored: bool) -> dict:
    """All systems at once through BatchedMD (no monitors, or the log-only monitors)."""
    s = settings(steps)
    plan = plan_from_specs(["log"] if monitored else ["none"], s, model.has_direct_forces)
    results = BatchedMD(starts, model, s, plan, say=lambda m: None).run()
    return {"completed": sum(r.status == "completed" for r in results),
            "mean_final_temperature_K": float(np.mean([r.atoms.info["temperature"] for r in results]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="MD steps of 0.5 fs per system and case")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = resolve_model(None)
    starts = systems()
    atoms_total = sum(len(a) for a in starts)
    with tempfile.TemporaryDirectory() as tmp:
        cases = {
            "ase": lambda: run_ase(model, starts, args.steps),
            "torch-sim": lambda: run_torchsim(model, starts, args.steps, monitored=False),
            "ase + monitors": lambda: run_ase_monitored(model, starts, args.steps, Path(tmp)),
            "torch-sim + monitors": lambda: run_torchsim(model, starts, args.steps, monitored=True),
        }
        run_ase(model, starts[:2], 5)  # warm-up
        run_torchsim(model, starts[:2], 5, monitored=True)
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        outcome: dict[str, dict] = {}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                outcome[name] = fn()
                seconds[name].append(time.perf_counter() - t0)
    best = {name: min(v) for name, v in seconds.items()}
    steps_per_s = {name: SYSTEMS * args.steps / t for name, t in best.items()}
    ratios = {
        "torch-sim / ase (system-steps per second)": steps_per_s["torch-sim"] / steps_per_s["ase"],
        "torch-sim + monitors / ase + monitors": steps_per_s["torch-sim + monitors"] / steps_per_s["ase + monitors"],
        "torch-sim + monitors / torch-sim (monitoring cost)": steps_per_s["torch-sim + monitors"] / steps_per_s["torch-sim"],
    }
    env = {
        "systems": SYSTEMS,
        "atoms": atoms_total,
        "atoms_per_system": f"{min(len(a) for a in starts)}-{max(len(a) for a in starts)}",
        "steps": args.steps,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "torch_sim": metadata.version("torch-sim-atomistic"),
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "model": "molecular-small (float32; torch-sim state float64)",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "torchsim.json").write_text(json.dumps(
        {"env": env, "seconds": seconds, "system_steps_per_s": steps_per_s, "ratios": ratios, "outcome": outcome},
        indent=2) + "\n")
    command = (f"OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_torchsim.py --steps {args.steps} "
               f"--repeats {args.repeats}")
    lines = [
        "# Batched torch-sim MD against one-by-one ASE MD",
        "",
        f"`{command}`; {SYSTEMS} molecules from the shipped demo file ({env['atoms_per_system']} atoms, "
        f"{atoms_total} in all), Langevin 300 K, {args.steps} x 0.5 fs each, direct forces, the bundled model, "
        "one CPU thread; minimum over repeats, cases interleaved.",
        "",
        "| case | system-steps per second | wall s (best) | systems completed |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {steps_per_s[name]:.1f} | {best[name]:.2f} | {outcome[name]['completed']} |" for name in cases]
    write_report(RESULTS / "torchsim.md", lines, ratios, env)


if __name__ == "__main__":
    main()
