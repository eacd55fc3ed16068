"""Evaluation of one generation of `atomuq improve` (methods.md section 8).

Three measurements of a model, each repeatable from fixed inputs so generations compare:

- force errors on labelled test files (MAE of direct and conservative force components, eV/Å;
  energy MAE per atom, eV/atom), one entry per file;
- a fixed adversarial search (same starts, seed and settings for every generation): mean U_Δ
  (eV/Å) at the start and at the best frame within the energy budget;
- direct-force NVE from fixed starting points (positions and momenta equilibrated once, with
  conservative forces, by the starting model): energy drift (slope of E_tot per atom against
  time, meV/atom/ps) and the time the run lasted before its temperature passed the limit.

compare() lists every metric against the previous generation with its change and flags
changes for the worse beyond a relative tolerance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from ase import Atoms

from atomuq.core.io import read_structures, write_structures
from atomuq.models.protocol import AtomisticModel
from atomuq.workflows.attack import AttackSettings, attack
from atomuq.workflows.improve_config import EvaluateConfig
from atomuq.workflows.md.drift import analyse, load_md_frames
from atomuq.workflows.md.monitors import parse_monitor
from atomuq.workflows.md.run import MDRun, MDSettings, init_velocities
from atomuq.workflows.train import DataConfig, evaluate_set, load_labelled

#: metrics where a larger value is better (all others: smaller is better)
HIGHER_IS_BETTER = ("md/survived_ps_mean",)


def draw_indices(total: int, n: int, seed: int) -> list[int]:
    """n of range(total) drawn without replacement by seed, sorted (all of them when n >= total)."""
    if n >= total:
        return list(range(total))
    return sorted(int(k) for k in np.random.default_rng(seed).choice(total, size=n, replace=False))


def draw(structures: Sequence[Atoms], n: int, seed: int) -> list[Atoms]:
    """Copies (without calculator) of n structures drawn without replacement by seed."""
    return [structures[k].copy() for k in draw_indices(len(structures), n, seed)]


def read_atoms(paths: Sequence[Path]) -> list[Atoms]:
    """Every structure of the files, as ase.Atoms."""
    return [r.atoms for r in read_structures(list(paths))]


def test_errors(model: AtomisticModel, files: Sequence[Path], batch_size: int) -> dict[str, dict[str, float]]:
    """Per test file: direct / conservative force MAE (eV/Å), energy MAE (eV/atom) and structure count."""
    out = {}
    for path in files:
        data = load_labelled([Path(path)], DataConfig(train=(Path(path),)), list(model.elements), False, "test")
        errors = evaluate_set(model, data, batch_size)
        errors.pop("rotational_gradient", None)
        out[Path(path).name] = {**errors, "n_structures": len(data)}
    return out


def fresh_search(
    model: AtomisticModel, starts: Sequence[Atoms], settings: AttackSettings, batch_size: int, output: Path | None = None
) -> dict[str, float]:
    """Mean U_Δ (eV/Å) at the start and at the best in-budget frame of a fixed search; best frames to output."""
    result = attack(model, list(starts), settings, batch_size)
    if result.interrupted:  # a partial search would give wrong means: Ctrl-C goes on up
        raise KeyboardInterrupt
    frames = result.to_atoms(list(starts))
    best = {(f.info["source_index"], f.info["attack_step"]): f for f in frames}
    chosen = [best[(o.index, o.best_step)] for o in result.outcomes if (o.index, o.best_step) in best]
    if output is not None and chosen:
        write_structures(output, chosen)
    finite = [o.best_force_delta for o in result.outcomes if math.isfinite(o.best_force_delta)]
    return {
        "force_delta_start_mean": float(np.mean([o.force_delta_start for o in result.outcomes])),
        "force_delta_best_mean": float(np.mean(finite)) if finite else math.nan,
        "n_structures": len(result.outcomes),
        "n_failed": sum(o.failed for o in result.outcomes),
    }


def md_steps(ps: float, timestep_fs: float) -> int:
    """Number of steps of timestep_fs that cover ps picoseconds (at least one)."""
    return max(1, int(round(ps * 1000.0 / timestep_fs)))


def equilibrate_starts(
    model: AtomisticModel, structures: Sequence[Atoms], cfg: EvaluateConfig, folder: Path, say: Callable[[str], None] = print
) -> list[Atoms]:
    """Fixed MD starts: each structure with Maxwell–Boltzmann momenta at cfg.temperature_K, run through
    conservative-force NVT (Nosé–Hoover, equilibration_ps) with `model`; positions and momenta kept."""
    out = []
    for k, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = None
        atoms.set_momenta(np.zeros((len(atoms), 3)))
        steps = md_steps(cfg.equilibration_ps, cfg.timestep_fs) if cfg.equilibration_ps > 0 else 0
        settings = MDSettings(
            ensemble="nvt",
            forces="conservative",
            timestep_fs=cfg.timestep_fs,
            steps=steps,
            temperature_K=cfg.temperature_K,
            seed=cfg.seed + k,
            traj_every=max(1, min(cfg.traj_every, steps)) if steps else 1,
        )
        if steps == 0:
            init_velocities(atoms, cfg.temperature_K, cfg.seed + k)
            out.append(atoms)
            continue
        path = folder / f"equil_{k:03d}.extxyz"
        MDRun(atoms, model, settings, path, [], resume=path.exists(), say=say).run()  # [] : unmonitored, as before
        frame = load_md_frames(path)[0][-1]
        frame.calc = None
        frame.info = {"md_start": k}
        out.append(frame)
    return out


def nve_runs(
    model: AtomisticModel,
    starts: Sequence[Atoms],
    cfg: EvaluateConfig,
    folder: Path,
    done: dict[str, dict[str, Any]],
    save: Callable[[], None] | None = None,
    say: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Direct-force NVE (velocity Verlet) from each start for nve_ps, stopped above max_temperature_K;
    per run the drift report plus status and survived_ps. Finished runs in `done` are not repeated."""
    every = cfg.traj_every
    for k, atoms in enumerate(starts):
        key = f"start_{k:03d}"
        if key in done:
            continue
        path = folder / f"nve_{key}.extxyz"
        for stale in (path, path.with_name(path.name + ".log"), path.with_name(path.name + ".snapshots.extxyz")):
            stale.unlink(missing_ok=True)  # an interrupted run is repeated from its start
        settings = MDSettings(
            ensemble="nve",
            forces="direct",
            timestep_fs=cfg.timestep_fs,
            steps=md_steps(cfg.nve_ps, cfg.timestep_fs),
            traj_every=every,
            seed=cfg.seed,
        )
        monitors = [
            parse_monitor(f"force_delta,every={every}"),
            parse_monitor(f"temperature,every={every},max={cfg.max_temperature_K:g},action=stop"),
        ]
        result = MDRun(atoms, model, settings, path, monitors, say=say).run()
        report = analyse(path).as_dict()
        report.update(status=result.status, survived_ps=result.time_fs / 1000.0)
        done[key] = report
        if save is not None:
            save()
    return [done[f"start_{k:03d}"] for k in range(len(starts))]


def summarise_md(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Median and mean |drift| (meV/atom/ps; the median is compared: one blown-up run dominates the mean),
    mean survived time (ps) and the number of runs that lasted the window."""
    drift = [abs(r["drift_meV_atom_ps"]) for r in runs]
    return {
        "drift_abs_median": float(np.median(drift)),
        "drift_abs_mean": float(np.mean(drift)),
        "survived_ps_mean": float(np.mean([r["survived_ps"] for r in runs])),
        "completed": int(sum(r["status"] == "completed" for r in runs)),
        "runs": len(runs),
    }


def flat_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """The compared metrics of an evaluation as {name: value} (names like test/FILE/forces_mae)."""
    out: dict[str, float] = {}
    for name, errors in evaluation.get("test", {}).items():
        for key in ("forces_mae", "conservative_forces_mae", "energy_mae_per_atom"):
            if key in errors:
                out[f"test/{name}/{key}"] = float(errors[key])
    if "fresh" in evaluation:
        out["fresh/force_delta_best_mean"] = float(evaluation["fresh"]["force_delta_best_mean"])
    if "md" in evaluation:
        out["md/drift_abs_median"] = float(evaluation["md"]["drift_abs_median"])
        out["md/survived_ps_mean"] = float(evaluation["md"]["survived_ps_mean"])
    return out


def _worse(name: str, old: float | None, value: float, tolerance: float) -> bool:
    """True when value is worse than old by more than tolerance·|old| (larger, or smaller for HIGHER_IS_BETTER)."""
    if old is None or not math.isfinite(value - old):
        return False
    worse_by = old - value if name in HIGHER_IS_BETTER else value - old
    return worse_by > tolerance * abs(old)


def compare(
    previous: dict[str, Any] | None, current: dict[str, Any], tolerance: float, start: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Each metric of current with the previous generation's value, the change and whether it got worse by more
    than tolerance (relative); with `start` (generation 0) also its value there and whether it is worse than it,
    so that small steps that add up are flagged too. A metric missing before has no change."""
    before = flat_metrics(previous) if previous else {}
    first = flat_metrics(start) if start else {}
    rows = []
    for name, value in flat_metrics(current).items():
        old = before.get(name)
        rows.append(
            {
                "metric": name,
                "previous": old,
                "value": value,
                "change": None if old is None else value - old,
                "worse": _worse(name, old, value, tolerance),
                "start": first.get(name),
                "worse_than_start": _worse(name, first.get(name), value, tolerance),
            }
        )
    return rows
