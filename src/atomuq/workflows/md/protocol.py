"""The Force Delta paper's MD protocol (methods.md section 7): relax, NVT equilibration, NVE velocity Verlet."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.optimize import BFGS

from atomuq.core.batch import Batch
from atomuq.core.errors import InputError
from atomuq.core.io import read_structures, reference_forces, write_structures
from atomuq.core.validate import check_structure
from atomuq.models.derivatives import evaluate
from atomuq.models.protocol import AtomisticModel
from atomuq.uq.force_delta import force_delta
from atomuq.uq.ltau.estimator import LTAUEstimator
from atomuq.workflows.md.driver import MDRun, RunResult
from atomuq.workflows.md.drift import load_md_frames
from atomuq.workflows.md.integrators import make_calculator
from atomuq.workflows.md.monitor_plan import MonitorPlan, log_monitors, resolve_plan, safe_monitors
from atomuq.workflows.md.monitors import Monitor
from atomuq.workflows.md.settings import MDSettings, SettingError


def relax(
    atoms: Atoms, model: AtomisticModel, fmax: float = 0.05, max_steps: int = 1000, forces: str = "direct"
) -> Atoms:
    """Relax with BFGS to fmax (eV/Å) on the model's forces; InputError if it does not converge."""
    atoms = atoms.copy()
    use_direct = forces != "conservative" and model.has_direct_forces
    atoms.calc = make_calculator(model, "direct" if use_direct else "conservative")
    opt = BFGS(atoms, logfile=None)
    if not opt.run(fmax=fmax, steps=max_steps):
        fnow = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
        raise InputError(
            f"relaxation did not reach fmax {fmax} eV/Å in {max_steps} steps (max force {fnow:.3f} eV/Å)"
        )
    atoms.calc = None
    return atoms


def relax_with_fallback(
    atoms: Atoms, model: AtomisticModel, fmax: float = 0.05, where: str = "the structure",
    say: Callable[[str], None] = print,
) -> tuple[Atoms, str]:
    """Relax to fmax (eV/Å) on the direct forces, or on the conservative ones where BFGS does not converge on the
    direct (non-conservative) field; (relaxed structure, the forces used)."""
    try:
        return relax(atoms, model, fmax), "direct"
    except InputError as exc:
        say(f"{where}: direct-force relaxation failed ({exc}); relaxing on conservative forces")
        return relax(atoms, model, fmax, forces="conservative"), "conservative"


@dataclass
class PaperPreset:
    """The Force Delta paper's protocol (methods.md section 7): relax, NVT equilibration, NVE velocity Verlet."""

    fmax: float = 0.05  # eV/Å
    temperature_K: float = 300.0
    tdamp_fs: float = 10.0  # Nosé–Hoover chain time constant (paper: ttime 10 fs)
    equilibration_steps: int = 2000  # of 0.5 fs
    timestep_fs: float = 0.5
    steps: int = 20000  # 10 ps NVE
    equilibration_forces: str | None = None  # None: the run's forces (conservative for MTS)


def equilibration_plan(plan: MonitorPlan, settings: MDSettings, has_direct_forces: bool) -> MonitorPlan:
    """The NVT stage's monitors: log only or none when the run opted out of the safe defaults, else the safe defaults."""
    if plan.choice == "log":
        return MonitorPlan("log", log_monitors(has_direct_forces))
    if plan.choice == "none":
        return MonitorPlan("none", [])
    return MonitorPlan("safe", safe_monitors(settings, has_direct_forces))


def run_paper_protocol(
    atoms: Atoms,
    model: AtomisticModel,
    settings: MDSettings,
    trajectory: str | Path,
    monitors: MonitorPlan | Sequence[Monitor] | None = None,
    preset: PaperPreset | None = None,
    resume: bool = False,
    say: Callable[[str], None] = print,
    progress: Callable[[str, float, float], None] | None = None,
    ltau: LTAUEstimator | None = None,
    ltau_k: int = 1,
    *,
    where: str = "the starting structure",
    model_name: str | None = None,
) -> RunResult:
    """Relax to fmax, equilibrate NVT (Nosé–Hoover chain) and run NVE; each stage is resumable.

    Writes TRAJ.relaxed.extxyz, TRAJ.equil.extxyz (+ .log, .run.json) and TRAJ (+ .log, .run.json);
    the NVE stage uses settings.forces (direct, conservative or MTS) and the monitors;
    equilibration uses preset.equilibration_forces, by default the same forces (conservative
    for MTS, which Nosé–Hoover cannot wrap here), and the safe default monitors unless the run
    opted out (equilibration_plan). A stopped equilibration stops the protocol (its result is returned).
    """
    preset = preset or PaperPreset()
    settings.validate()
    check_structure(atoms, where, model.elements)
    path = Path(trajectory)
    relaxed_path = path.with_name(path.name + ".relaxed.extxyz")
    equil_path = path.with_name(path.name + ".equil.extxyz")
    eq_forces = preset.equilibration_forces or ("conservative" if settings.forces == "mts" else settings.forces)
    if eq_forces not in ("direct", "conservative"):
        raise SettingError(f"equilibration forces must be direct or conservative, got {eq_forces!r}")
    equil = MDSettings(
        ensemble="nvt", forces=eq_forces, timestep_fs=preset.timestep_fs, steps=preset.equilibration_steps,
        temperature_K=preset.temperature_K, tdamp_fs=preset.tdamp_fs, seed=settings.seed, traj_every=settings.traj_every,
    )
    equil.validate()
    nve = MDSettings(**{**settings.as_dict(), "ensemble": "nve", "timestep_fs": preset.timestep_fs})
    nve.validate()
    direct = model.has_direct_forces
    plan = resolve_plan(monitors, nve, direct)
    if resume and relaxed_path.exists():
        relaxed = read_structures([relaxed_path])[0].atoms
        say(f"--resume: using the relaxed structure in {relaxed_path}")
    else:
        say(f"relaxing to fmax {preset.fmax} eV/Å")
        relaxed = relax(atoms, model, preset.fmax, forces=settings.forces)
        write_structures(relaxed_path, [relaxed])
    relaxed.calc = None
    relaxed.set_momenta(np.zeros((len(relaxed), 3)))
    step_progress = (lambda t: progress("NVT equilibration", t, equil.target_fs())) if progress else None
    eq_run = MDRun(relaxed, model, equil, equil_path, equilibration_plan(plan, equil, direct), resume=resume, say=say,
                   where=f"{relaxed_path} structure 0", model_name=model_name)
    eq_result = eq_run.run(step_progress)
    if eq_result.status != "completed":
        return eq_result
    frames, _ = load_md_frames(equil_path)
    start = frames[-1]
    start.calc = None
    step_progress = (lambda t: progress("NVE", t, nve.target_fs())) if progress else None
    return MDRun(start, model, nve, path, plan, resume=resume, say=say, ltau=ltau, ltau_k=ltau_k,
                 where=f"{equil_path} last frame", model_name=model_name).run(step_progress)


def errors_along(model: AtomisticModel, path: Path, n: int, method: str = "gfn2-xtb",
                 options: dict | None = None) -> dict:
    """Mean ε_nc, ε_c and U_Δ (eV/Å) of the model on n frames spread over an MD trajectory, labelled with the
    reference method (options: its calculator's) into PATH.xtb.extxyz (kept: a rerun labels nothing again); frames
    with overlapping atoms (a blown-up run) are skipped."""
    from atomuq.workflows.label import label_structures

    frames = load_md_frames(path)[0]
    pick = np.unique(np.linspace(0, len(frames) - 1, n).round().astype(int))
    sub = []
    for i in pick:
        a = frames[i].copy()
        a.calc = None
        a.info = {"time_fs": frames[i].info["time_fs"]}
        try:
            check_structure(a, f"{path} frame {i}")
        except InputError:
            continue
        sub.append(a)
    out = path.with_name(path.name + ".xtb.extxyz")
    if not out.exists():
        label_structures(sub, method, out, workers=1, options=options)
    labelled = [r.atoms for r in read_structures([out])]
    batch = Batch.from_atoms(labelled, dtype=model.dtype)
    ref = torch.tensor(np.concatenate([reference_forces(a) for a in labelled]), dtype=model.dtype)
    res = force_delta(evaluate(model, batch).detach(), batch, reference_forces=ref)
    ps = {k: v.detach().numpy() for k, v in res.per_structure.items()}
    return {"eps_nc_mean": float(ps["eps_nc"].mean()), "eps_c_mean": float(ps["eps_c"].mean()),
            "force_delta_labelled_mean": float(ps["force_delta"].mean()), "labelled_frames": len(labelled)}
