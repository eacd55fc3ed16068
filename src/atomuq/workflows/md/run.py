"""The MD driver: ASE dynamics with direct, conservative or MTS forces, monitors, rollback and resume.

A run appends frames to TRAJ (extxyz, see trajectory.py), human-readable monitor lines to
TRAJ.log (and JSON records to TRAJ.log.jsonl), and snapshots to TRAJ.snapshots.extxyz; all
are fsynced as they are written. `resume=True` continues from the last complete frame with
its positions, momenta, step counter, time, thermostat state (Nosé–Hoover chain variables, the
random stream of Langevin and MTS-Langevin) and monitor state, so a killed and resumed run
follows the same path as an uninterrupted one.

Rollback: the driver keeps the last state at which every thresholded monitor that ran was under
its limit ("trusted"); on a breach with action=rollback it restores that state, switches to the
fallback forces (conservative, or MTS) and continues; frames already written stay in the file
(analysis follows the final branch: a frame whose time is not after the previous one starts a
new branch). After max_rollbacks rollbacks a further breach stops the run.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.io import read
from ase.md.langevin import Langevin
from ase.md.md import MolecularDynamics
from ase.md.nose_hoover_chain import NoseHooverChainNVT
from ase.md.velocitydistribution import (
    MaxwellBoltzmannDistribution,
    Stationary,
    ZeroRotation,
)
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from atomuq.uq.ltau.estimator import LTAUEstimator
from atomuq.calculator import AtomuqCalculator
from atomuq.core.errors import InputError
from atomuq.core.io import write_structures
from atomuq.models.protocol import AtomisticModel
from atomuq.workflows.md.drift import load_md_frames
from atomuq.workflows.md.monitors import Monitor
from atomuq.workflows.md.mts import MultipleTimeStepping
from atomuq.workflows.md.trajectory import (
    FrameWriter,
    LineLog,
    cut_partial_frame,
    decode_state,
    encode_state,
    scan_trajectory,
)

ENSEMBLES = ("nve", "nvt", "langevin")
FORCE_MODES = ("direct", "conservative", "mts")
FALLBACKS = ("conservative", "mts")


@dataclass
class MDSettings:
    """What to integrate and how. Times in fs, temperatures in K, friction in 1/fs."""

    ensemble: str = "nve"
    forces: str = "direct"
    timestep_fs: float = 0.5
    steps: int = 1000
    temperature_K: float | None = None
    mts_outer_fs: float | None = None
    mts_inner: int = 4  # 2 fs outer at 0.5 fs: the paper's 4 fs / M = 8 is unstable with H for our model
    tdamp_fs: float = 10.0
    friction_per_fs: float = 0.01
    seed: int = 0
    traj_every: int = 10
    fallback: str = "conservative"
    max_rollbacks: int = 1

    def validate(self) -> None:
        """InputError naming the option for anything inconsistent."""
        if self.ensemble not in ENSEMBLES:
            raise InputError(
                f"--ensemble must be one of {', '.join(ENSEMBLES)}, got {self.ensemble!r}"
            )
        if self.forces not in FORCE_MODES:
            raise InputError(
                f"--forces must be one of {', '.join(FORCE_MODES)}, got {self.forces!r}"
            )
        if not (self.timestep_fs > 0 and math.isfinite(self.timestep_fs)):
            raise InputError(
                f"--timestep must be a positive number of fs, got {self.timestep_fs!r}"
            )
        if self.timestep_fs > 10:
            raise InputError(
                f"--timestep {self.timestep_fs} fs is far too long for atomistic MD (use <= 10 fs; 0.5 fs is the paper's)"
            )
        if self.steps < 0:
            raise InputError(f"--steps must be >= 0, got {self.steps}")
        if self.mts_inner < 1:
            raise InputError(
                f"--mts-inner must be a positive integer, got {self.mts_inner}"
            )
        if self.mts_outer_fs is not None and not self.mts_outer_fs > 0:
            raise InputError(
                f"--mts-outer must be a positive number of fs, got {self.mts_outer_fs}"
            )
        if self.ensemble in ("nvt", "langevin") and self.temperature_K is None:
            raise InputError(f"--ensemble {self.ensemble} needs --temperature K")
        if self.temperature_K is not None and not self.temperature_K >= 0:
            raise InputError(f"--temperature must be >= 0 K, got {self.temperature_K}")
        if self.fallback not in FALLBACKS:
            raise InputError(
                f"--fallback must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}"
            )
        if "mts" in (self.forces, self.fallback) and self.ensemble == "nvt":
            which = "--forces mts" if self.forces == "mts" else "--fallback mts"
            raise InputError(
                f"{which} works with --ensemble nve or langevin (its thermostat); not with nvt (Nosé–Hoover)"
            )
        if self.traj_every < 1:
            raise InputError(
                f"--traj-every must be a positive integer, got {self.traj_every}"
            )

    def step_fs(self, mode: str) -> float:
        """Length of one integrator step (fs) in force mode `mode` (the outer step for MTS)."""
        if mode == "mts":
            return (
                self.mts_outer_fs
                if self.mts_outer_fs is not None
                else self.timestep_fs * self.mts_inner
            )
        return self.timestep_fs


@dataclass
class Trusted:
    """A state to roll back to."""

    positions: np.ndarray
    momenta: np.ndarray
    step: int
    time_fs: float
    state: dict


@dataclass
class RunResult:
    """How a run ended."""

    status: str  # completed | stopped | interrupted
    step: int
    time_fs: float
    frames_written: int
    rollbacks: int
    mode: str
    messages: list[str] = field(default_factory=list)


def make_calculator(model: AtomisticModel, mode: str, ltau: LTAUEstimator | None = None, ltau_k: int = 1
                    ) -> AtomuqCalculator:
    """Calculator for a force mode; the backward pass runs only where needed (direct and MTS).

    With an LTAU estimator the calculator also gives ltau_* results (for `key:ltau_uncertainty` monitors).
    """
    forces = (
        "conservative"
        if mode == "conservative" or not model.has_direct_forces
        else "direct"
    )
    if mode in ("direct", "mts") and not model.has_direct_forces:
        raise InputError(
            f"--forces {mode} needs a model with a direct force head; this one is conservative-only"
        )
    return AtomuqCalculator(model, forces=forces, conservative="on_demand", ltau=ltau, ltau_k=ltau_k)


def init_velocities(atoms: Atoms, temperature_K: float, seed: int) -> None:
    """Maxwell-Boltzmann momenta at temperature_K (K), no centre-of-mass motion or rotation (molecules)."""
    with (
        warnings.catch_warnings()
    ):  # ASE 3.29 renames it thermalize_momenta; older ASE lacks that name
        warnings.simplefilter("ignore", DeprecationWarning)
        MaxwellBoltzmannDistribution(
            atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed)
        )
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)


def dynamics_state(dyn: MolecularDynamics) -> dict:
    """Integrator state beyond positions and momenta (JSON-able)."""
    if isinstance(dyn, NoseHooverChainNVT):
        th = dyn._thermostat
        return {"nhc_eta": th._eta.tolist(), "nhc_p_eta": th._p_eta.tolist()}
    if isinstance(dyn, Langevin):
        return {"rng": dyn.rng.bit_generator.state}
    if isinstance(dyn, MultipleTimeStepping):
        return dyn.get_state()
    return {}


def restore_dynamics_state(dyn: MolecularDynamics, state: dict) -> None:
    """Inverse of dynamics_state."""
    if isinstance(dyn, NoseHooverChainNVT) and "nhc_eta" in state:
        dyn._thermostat._eta[:] = state["nhc_eta"]
        dyn._thermostat._p_eta[:] = state["nhc_p_eta"]
    elif isinstance(dyn, Langevin) and "rng" in state:
        dyn.rng.bit_generator.state = state["rng"]
    elif isinstance(dyn, MultipleTimeStepping):
        dyn.set_state(state)


def make_dynamics(atoms: Atoms, settings: MDSettings, mode: str) -> MolecularDynamics:
    """The ASE integrator for an ensemble and force mode (atoms must carry the calculator)."""
    dt = settings.step_fs(mode) * units.fs
    rng = np.random.default_rng(settings.seed + 1)
    friction = settings.friction_per_fs / units.fs
    if mode == "mts":
        inner = settings.mts_inner
        if settings.ensemble == "langevin":
            return MultipleTimeStepping(
                atoms,
                dt,
                inner,
                thermostat="langevin",
                temperature_K=settings.temperature_K,
                friction=friction,
                rng=rng,
            )
        return MultipleTimeStepping(atoms, dt, inner)
    if settings.ensemble == "nve":
        return VelocityVerlet(atoms, dt)
    if settings.ensemble == "nvt":
        return NoseHooverChainNVT(
            atoms,
            dt,
            temperature_K=settings.temperature_K,
            tdamp=settings.tdamp_fs * units.fs,
        )
    return Langevin(
        atoms,
        dt,
        temperature_K=settings.temperature_K,
        friction=friction,
        fixcm=False,
        rng=rng,
    )


class MDRun:
    """One monitored, crash-safe MD run writing TRAJ, TRAJ.log(.jsonl) and TRAJ.snapshots.extxyz."""

    def __init__(
        self,
        atoms: Atoms,
        model: AtomisticModel,
        settings: MDSettings,
        trajectory: str | Path,
        monitors: list[Monitor] | None = None,
        resume: bool = False,
        say: Callable[[str], None] = print,
        ltau: LTAUEstimator | None = None,
        ltau_k: int = 1,
    ) -> None:
        settings.validate()
        self.ltau, self.ltau_k = ltau, ltau_k
        self.settings = settings
        self.model = model
        self.monitors = [m for m in (monitors or [])]
        self.path = Path(trajectory)
        self.say = say
        self.atoms = atoms.copy()
        self.step = 0
        self.time_fs = 0.0
        self.mode = settings.forces
        self.rollbacks = 0
        self.trusted: Trusted | None = None
        self.frames_written = 0
        self._last_values: dict[str, float] = {}
        self._resumed = False
        self._trusted_now = False
        self._pending_messages: list[str] = []
        self._resume_state: dict | None = None
        for m in self.monitors:
            if m.quantity.name == "force_delta" and not model.has_direct_forces:
                raise InputError(
                    "the force_delta monitor needs a model with a direct force head; this one is conservative-only"
                )
        if resume and self.path.exists():
            self._load_resume_point()
        else:
            if resume:
                say(f"--resume: {self.path} does not exist yet; starting a new run")
            self._prepare_fresh()
        self.snapshots_path = self.path.with_name(self.path.name + ".snapshots.extxyz")
        if not self._resumed:
            self.snapshots_path.unlink(missing_ok=True)
        self.log = LineLog(
            self.path.with_name(self.path.name + ".log"), append=self._resumed
        )
        self.writer = FrameWriter(self.path, append=self._resumed)
        self.atoms.calc = make_calculator(model, self.mode, self.ltau, self.ltau_k)
        self.dyn = make_dynamics(self.atoms, settings, self.mode)
        if self._resume_state is not None:
            restore_dynamics_state(self.dyn, self._resume_state.get("dynamics", {}))

    # -- setup --------------------------------------------------------------------------------

    def _prepare_fresh(self) -> None:
        p = self.atoms.get_momenta()
        if not np.any(p):
            if self.settings.temperature_K is None:
                raise InputError(
                    "the input structure has no momenta: give --temperature K to draw Maxwell-Boltzmann velocities"
                )
            init_velocities(self.atoms, self.settings.temperature_K, self.settings.seed)

    def _load_resume_point(self) -> None:
        scan = scan_trajectory(self.path)
        message = cut_partial_frame(self.path, scan)
        if message:
            self.say(message)
        self._pending_messages = [message] if message else []
        frames = [f for f in scan.frames if "md_state" in f.info]
        if not frames:
            raise InputError(
                f"{self.path}: no complete frame written by `atomuq md` to resume from; delete it or drop --resume"
            )
        last = frames[-1]
        if len(last) != len(self.atoms) or (last.numbers != self.atoms.numbers).any():
            raise InputError(
                f"{self.path}: its frames are not the input structure (different atoms); wrong file for --resume?"
            )
        state = decode_state(last.info["md_state"])
        self.atoms.set_positions(last.get_positions())
        self.atoms.set_momenta(last.get_momenta(), apply_constraint=False)
        self.atoms.set_cell(last.cell)
        self.step, self.time_fs = int(last.info["step"]), float(last.info["time_fs"])
        self.mode, self.rollbacks = state["mode"], int(state["rollbacks"])
        for m, ms in zip(self.monitors, state.get("monitors", [])):
            if ms.get("name") == m.name:
                m.set_state(ms)
        trusted = [f for f in frames if f.info.get("trusted", False)]
        if trusted:
            t = trusted[-1]
            self.trusted = Trusted(
                t.get_positions(),
                t.get_momenta(),
                int(t.info["step"]),
                float(t.info["time_fs"]),
                decode_state(t.info["md_state"]),
            )
        self.frames_written = len(frames)
        self._resume_state = state
        self._resumed = True
        self.say(
            f"resuming {self.path} from step {self.step} (t = {self.time_fs:g} fs, {self.mode} forces)"
        )

    # -- state --------------------------------------------------------------------------------

    def _state(self) -> dict:
        monitors = [{"name": m.name, **m.get_state()} for m in self.monitors]
        return {
            "mode": self.mode,
            "rollbacks": self.rollbacks,
            "dynamics": dynamics_state(self.dyn),
            "monitors": monitors,
        }

    def _write_frame(
        self,
        trusted: bool = False,
        event: str | None = None,
        writer: FrameWriter | None = None,
    ) -> None:
        atoms = self.atoms
        r = atoms.calc.results
        epot, ekin = float(r["energy"]), float(atoms.get_kinetic_energy())
        info = {
            "step": self.step,
            "time_fs": round(self.time_fs, 9),
            "force_mode": self.mode,
            "epot": epot,
            "ekin": ekin,
            "etot": epot + ekin,
            "temperature": float(atoms.get_temperature()),
        }
        for name, value in self._last_values.items():
            info[name] = value
        info["trusted"] = trusted
        if event:
            info["event"] = event
        info["md_state"] = encode_state(self._state())
        (writer or self.writer).write(atoms, info, forces=r["forces"])
        self.log.sync()
        if writer is None:
            self.frames_written += 1

    def _log(self, line: str, record: dict | None = None) -> None:
        self.log.write(line, record)

    # -- monitoring ---------------------------------------------------------------------------

    def _check_monitors(self) -> str | None:
        """Run the due monitors; returns the most severe action of a breach (or None)."""
        self._last_values = {}
        worst, ran_thresholded = None, False
        order = {a: i for i, a in enumerate(("log", "snapshot", "rollback", "stop"))}
        for m in self.monitors:
            if not m.due(self.step):
                continue
            reading = m.check(self.atoms, self.step, self.time_fs)
            if reading.value is not None:
                self._last_values[m.name] = reading.value
            ran_thresholded |= m.threshold is not None and reading.value is not None
            if reading.breached:
                self._log(reading.line(), {"event": "breach", **reading.__dict__})
                if worst is None or order[reading.action] > order[worst]:
                    worst = reading.action
            else:
                self.log.write(
                    reading.line(), {"event": "reading", **reading.__dict__}, sync=False
                )
        if worst is None and ran_thresholded:
            self.trusted = Trusted(
                self.atoms.get_positions(),
                self.atoms.get_momenta(),
                self.step,
                self.time_fs,
                copy.deepcopy(self._state()),
            )
            self._trusted_now = True
        return worst

    def _rollback(self) -> bool:
        """Restore the trusted state and switch to the fallback forces; False if that is not possible."""
        if self.trusted is None:
            self._log(
                f"step {self.step:>8d}  rollback impossible: no trusted frame yet; stopping"
            )
            return False
        if self.rollbacks >= self.settings.max_rollbacks:
            self._log(
                f"step {self.step:>8d}  rollback limit ({self.settings.max_rollbacks}) reached; stopping"
            )
            return False
        t = self.trusted
        old_mode, old_step = self.mode, self.step
        self.rollbacks += 1
        self.mode = self.settings.fallback
        self.atoms.set_positions(t.positions)
        self.atoms.set_momenta(t.momenta, apply_constraint=False)
        self.step, self.time_fs = t.step, t.time_fs
        for m, ms in zip(self.monitors, t.state["monitors"]):
            m.set_state(ms)
        self.atoms.calc = make_calculator(self.model, self.mode, self.ltau, self.ltau_k)
        self.dyn = make_dynamics(self.atoms, self.settings, self.mode)
        if old_mode == self.mode:
            restore_dynamics_state(self.dyn, t.state.get("dynamics", {}))
        self.atoms.get_forces()
        self._last_values = {}
        line = (
            f"step {old_step:>8d}  ROLLBACK to step {t.step} (t = {t.time_fs:g} fs, the last frame under every "
            f"threshold); continuing with {self.mode} forces (was {old_mode}); rollback {self.rollbacks} of "
            f"at most {self.settings.max_rollbacks}"
        )
        self._log(
            line,
            {
                "event": "rollback",
                "from_step": old_step,
                "to_step": t.step,
                "to_time_fs": t.time_fs,
                "mode": self.mode,
                "previous_mode": old_mode,
            },
        )
        self.say(line.strip())
        self._write_frame(trusted=True, event="rollback")
        return True

    # -- main loop ----------------------------------------------------------------------------

    def run(self, progress: Callable[[float], None] | None = None) -> RunResult:
        """Integrate until steps x (the first integrator's step) of simulated time; returns how it ended."""
        s = self.settings
        target_fs = s.steps * s.step_fs(s.forces)
        if self._resumed:
            for msg in self._pending_messages:
                self._log(msg, {"event": "dropped_partial_frame", "message": msg})
            self._log(
                f"RESUME at step {self.step} (t = {self.time_fs:g} fs) with {self.mode} forces, target {target_fs:g} fs",
                {
                    "event": "resume",
                    "step": self.step,
                    "time_fs": self.time_fs,
                    "mode": self.mode,
                },
            )
        else:
            monitors = (
                ", ".join(
                    f"{m.name} every {m.every}"
                    + (
                        f" max {m.threshold.describe()} -> {m.action}"
                        if m.threshold
                        else ""
                    )
                    for m in self.monitors
                )
                or "none"
            )
            inner = f" (MTS inner {s.mts_inner})" if self.mode == "mts" else ""
            self._log(
                f"START {s.ensemble}, {self.mode} forces, step {s.step_fs(self.mode):g} fs{inner}, "
                f"target {target_fs:g} fs; monitors: {monitors}",
                {"event": "start", "settings": dict(s.__dict__)},
            )
            self._prepare_next_for(0)
            self.atoms.get_forces()
            action = self._check_monitors()
            self._write_frame(trusted=self._trusted_now)
            if action in ("stop", "rollback"):
                self._log(
                    f"step {self.step:>8d}  the start already breaches a threshold; stopping",
                    {"event": "stop"},
                )
                return self._finish("stopped")
        status = "completed"
        try:
            while self.time_fs < target_fs - 1e-9:
                status = self._segment(target_fs, progress)
                if status != "rollback":
                    break
        except KeyboardInterrupt:
            status = "interrupted"
            self._log(
                f"step {self.step:>8d}  interrupted; every frame up to here is on disk (use --resume)",
                {"event": "interrupted", "step": self.step},
            )
        return self._finish("completed" if status == "rollback" else status)

    def _prepare_next_for(self, step: int) -> None:
        """Ask the calculator for the backward pass in the next evaluation if a monitor needing it is due at `step`."""
        direct = self.mode != "mts" and self.atoms.calc.force_mode == "direct"
        if direct and any(
            m.quantity.needs_conservative and m.due(step) for m in self.monitors
        ):
            self.atoms.calc.request_conservative()

    def _segment(self, target_fs: float, progress) -> str:
        """Run with the current integrator until the target time, a stop, or a rollback."""
        dt_fs = self.settings.step_fs(self.mode)
        n = max(0, round((target_fs - self.time_fs) / dt_fs))
        self.dyn.nsteps = self.step
        start_step, start_time = self.step, self.time_fs
        self._prepare_next_for(self.step + 1)
        for _ in self.dyn.irun(n):
            if self.dyn.nsteps == start_step:
                continue
            self.step = self.dyn.nsteps
            self.time_fs = start_time + (self.step - start_step) * dt_fs
            if progress:
                progress(self.time_fs)
            self._trusted_now = False
            action = self._check_monitors()
            if action == "snapshot":
                self._write_frame(
                    trusted=False, event="snapshot", writer=self._snapshot_writer()
                )
                self._log(
                    f"step {self.step:>8d}  snapshot written to {self.snapshots_path}",
                    {"event": "snapshot", "step": self.step},
                )
            if action == "rollback" and self._rollback():
                return "rollback"
            if action in ("stop", "rollback"):
                self._write_frame(event="stop")
                self._log(
                    f"step {self.step:>8d}  STOP (t = {self.time_fs:g} fs); the last frame is written",
                    {"event": "stop", "step": self.step, "time_fs": self.time_fs},
                )
                return "stopped"
            last = self.time_fs >= target_fs - 1e-9
            if self.step % self.settings.traj_every == 0 or last:
                self._write_frame(trusted=self._trusted_now)
            self._prepare_next_for(self.step + 1)
        return "completed"

    def _snapshot_writer(self) -> FrameWriter:
        if not hasattr(self, "_snapshots"):
            self._snapshots = FrameWriter(self.snapshots_path, append=True)
        return self._snapshots

    def _finish(self, status: str) -> RunResult:
        self._log(
            f"END {status} at step {self.step} (t = {self.time_fs:g} fs), {self.mode} forces, "
            f"{self.rollbacks} rollback(s)",
            {
                "event": "end",
                "status": status,
                "step": self.step,
                "time_fs": self.time_fs,
                "mode": self.mode,
            },
        )
        self.writer.close()
        self.log.close()
        if hasattr(self, "_snapshots"):
            self._snapshots.close()
        return RunResult(
            status,
            self.step,
            self.time_fs,
            self.frames_written,
            self.rollbacks,
            self.mode,
        )


def relax(
    atoms: Atoms,
    model: AtomisticModel,
    fmax: float = 0.05,
    max_steps: int = 1000,
    forces: str = "direct",
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


@dataclass
class PaperPreset:
    """The Force Delta paper's protocol (methods.md section 7): relax, NVT equilibration, NVE velocity Verlet."""

    fmax: float = 0.05  # eV/Å
    temperature_K: float = 300.0
    tdamp_fs: float = 10.0  # Nosé–Hoover chain time constant (paper: ttime 10 fs)
    equilibration_steps: int = 2000  # of 0.5 fs
    timestep_fs: float = 0.5
    steps: int = 20000  # 10 ps NVE
    equilibration_forces: str | None = (
        None  # None: the run's forces (conservative for MTS)
    )


def run_paper_protocol(
    atoms: Atoms,
    model: AtomisticModel,
    settings: MDSettings,
    trajectory: str | Path,
    monitors: list[Monitor] | None = None,
    preset: PaperPreset | None = None,
    resume: bool = False,
    say: Callable[[str], None] = print,
    progress: Callable[[str, float, float], None] | None = None,
    ltau: LTAUEstimator | None = None,
    ltau_k: int = 1,
) -> RunResult:
    """Relax to fmax, equilibrate NVT (Nosé–Hoover chain) and run NVE; each stage is resumable.

    Writes TRAJ.relaxed.extxyz, TRAJ.equil.extxyz (+ .log) and TRAJ (+ .log); the NVE stage
    uses settings.forces (direct, conservative or MTS) and the monitors; equilibration uses
    preset.equilibration_forces, by default the same forces (conservative for MTS, which
    Nosé–Hoover cannot wrap here).
    """
    preset = preset or PaperPreset()
    path = Path(trajectory)
    relaxed_path = path.with_name(path.name + ".relaxed.extxyz")
    equil_path = path.with_name(path.name + ".equil.extxyz")
    if resume and relaxed_path.exists():
        relaxed = read(relaxed_path)
        say(f"--resume: using the relaxed structure in {relaxed_path}")
    else:
        say(f"relaxing to fmax {preset.fmax} eV/Å")
        relaxed = relax(atoms, model, preset.fmax, forces=settings.forces)
        write_structures(relaxed_path, [relaxed])
    relaxed.calc = None
    eq_forces = preset.equilibration_forces or (
        "conservative" if settings.forces == "mts" else settings.forces
    )
    if eq_forces not in ("direct", "conservative"):
        raise InputError(
            f"equilibration forces must be direct or conservative, got {eq_forces!r}"
        )
    equil = MDSettings(
        ensemble="nvt",
        forces=eq_forces,
        timestep_fs=preset.timestep_fs,
        steps=preset.equilibration_steps,
        temperature_K=preset.temperature_K,
        tdamp_fs=preset.tdamp_fs,
        seed=settings.seed,
        traj_every=settings.traj_every,
    )
    relaxed.set_momenta(np.zeros((len(relaxed), 3)))
    step_progress = (
        (lambda t: progress("NVT equilibration", t, equil.steps * equil.timestep_fs))
        if progress
        else None
    )
    MDRun(relaxed, model, equil, equil_path, resume=resume, say=say).run(step_progress)
    frames, _ = load_md_frames(equil_path)
    start = frames[-1]
    start.calc = None
    nve = MDSettings(
        **{**settings.__dict__, "ensemble": "nve", "timestep_fs": preset.timestep_fs}
    )
    total = nve.steps * nve.step_fs(nve.forces)
    step_progress = (lambda t: progress("NVE", t, total)) if progress else None
    return MDRun(start, model, nve, path, monitors, resume=resume, say=say, ltau=ltau, ltau_k=ltau_k).run(
        step_progress
    )
