"""The MD loop: ASE dynamics with monitors, snapshots, rollback and crash-safe resume.

A run appends frames to TRAJ (extended XYZ or ASE .traj, see trajectory.py), readable monitor
lines to TRAJ.log and JSON records to TRAJ.log.jsonl (runlog.py), snapshots to
TRAJ.snapshots.extxyz, and what it was made with to TRAJ.run.json (run_record.py); all are
fsynced as they are written. Everything is checked before the first file is created (settings,
output paths, the starting structure against the model's elements, the monitors' result keys,
finite energy and forces at the start); a start that fails leaves no file behind.

`resume=True` continues from the last complete frame with its positions, momenta, step
counter, time, thermostat state (Nosé–Hoover chain variables, the random stream of Langevin
and MTS-Langevin) and monitor state, so a killed and resumed run follows the same path as an
uninterrupted one; settings that differ from the run record are refused (only the number of
steps may change), and log lines written after that frame are cut so no reading repeats.
A run that a monitor stopped is not continued by resume.

Rollback: the driver keeps the last state at which every thresholded monitor that ran was under
its limit ("trusted"); on a breach with action=rollback it restores that state, switches to the
fallback forces (conservative, or MTS) and continues; frames already written stay in the file
(analysis follows the final branch: a frame whose time is not after the previous one starts a
new branch). After max_rollbacks rollbacks a further breach stops the run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError

from atomuq.core.errors import AtomuqError, BlownUp, InputError
from atomuq.core.schema import NonFiniteResult, prepare_results
from atomuq.core.paths import check_output_file
from atomuq.core.validate import DEFAULT_MIN_DISTANCE, check_structure
from atomuq.models.protocol import AtomisticModel
from atomuq.models.provenance import model_provenance
from atomuq.uq.ltau.estimator import LTAUEstimator
from atomuq.workflows.md.integrators import (
    dynamics_state,
    init_velocities,
    make_calculator,
    make_dynamics,
    restore_dynamics_state,
)
from atomuq.workflows.md.monitor_plan import MonitorPlan, check_plan_for_model, resolve_plan
from atomuq.workflows.md.monitors import Monitor, Reading, ResultKey, missing_result_error
from atomuq.workflows.md.run_record import build_record, check_resume, load_record, record_path, write_record
from atomuq.workflows.md.runlog import LineLog, json_twin, truncate_logs
from atomuq.workflows.md.settings import MDSettings, SettingError
from atomuq.workflows.md.trajectory import (
    FrameWriter,
    TrajectoryScan,
    cut_partial_frame,
    decode_state,
    encode_state,
    open_frame_writer,
    scan_trajectory,
    trajectory_format,
)

_SEVERITY = {a: i for i, a in enumerate(("log", "snapshot", "rollback", "stop"))}


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
    """How a run ended; reason says why it stopped (the breach), monitoring how its monitors were chosen."""

    status: str  # completed | stopped | interrupted
    step: int
    time_fs: float
    frames_written: int
    rollbacks: int
    mode: str
    messages: list[str] = field(default_factory=list)
    reason: str | None = None
    monitoring: str = "custom"
    trajectory: str = ""


@dataclass
class RunFiles:
    """The files of one run beside its trajectory."""

    trajectory: Path

    @property
    def log(self) -> Path:
        """TRAJ.log (and TRAJ.log.jsonl beside it)."""
        return self.trajectory.with_name(self.trajectory.name + ".log")

    @property
    def snapshots(self) -> Path:
        """TRAJ.snapshots.extxyz (frames written by action=snapshot)."""
        return self.trajectory.with_name(self.trajectory.name + ".snapshots.extxyz")

    @property
    def record(self) -> Path:
        """TRAJ.run.json (run_record.py)."""
        return record_path(self.trajectory)

    def all(self) -> list[Path]:
        """Every file a run writes."""
        return [self.trajectory, self.log, json_twin(self.log), self.snapshots, self.record]


def _check_outputs(files: RunFiles) -> None:
    """Output checks before any work, naming {trajectory}."""
    try:
        for path in files.all():
            check_output_file(path, "{trajectory}")
        trajectory_format(files.trajectory)
    except SettingError:
        raise
    except InputError as exc:
        raise SettingError(str(exc) if "{trajectory}" in str(exc) else "{trajectory} " + str(exc)) from None


class MDRun:
    """One monitored, crash-safe MD run writing TRAJ, TRAJ.log(.jsonl), TRAJ.run.json and TRAJ.snapshots.extxyz.

    monitors: None gives the safe defaults (monitor_plan.py: stop when trust is lost); a list gives
    exactly those monitors (an empty list: none); a MonitorPlan says also how they were chosen.
    where: how messages name the starting structure (file and index); model_name: the name recorded.
    """

    def __init__(
        self,
        atoms: Atoms,
        model: AtomisticModel,
        settings: MDSettings,
        trajectory: str | Path,
        monitors: MonitorPlan | Sequence[Monitor] | None = None,
        resume: bool = False,
        say: Callable[[str], None] = print,
        ltau: LTAUEstimator | None = None,
        ltau_k: int = 1,
        *,
        where: str = "the starting structure",
        model_name: str | None = None,
        min_distance: float = DEFAULT_MIN_DISTANCE,
    ) -> None:
        settings.validate()
        self.settings, self.model, self.say = settings, model, say
        self.ltau, self.ltau_k = ltau, ltau_k
        self.where = where
        self.path = Path(trajectory)
        self.files = RunFiles(self.path)
        _check_outputs(self.files)
        check_structure(atoms, where, model.elements, min_distance)
        direct = model.has_direct_forces
        if settings.fallback == "mts" and not direct:
            raise SettingError("{fallback} mts needs a model with a direct force head; this one is conservative-only")
        self.plan = resolve_plan(monitors, settings, direct)
        self.monitors = self.plan.monitors
        check_plan_for_model(self.plan, direct)
        self.record = build_record(settings, self.plan, model, model_name, where, ltau, ltau_k)
        self.provenance = model_provenance(model, model_name)
        self.atoms = atoms.copy()
        self.atoms.calc = None
        self.step, self.time_fs = 0, 0.0
        self.mode = settings.forces
        self.rollbacks = 0
        self.trusted: Trusted | None = None
        self.frames_written = 0
        self.reason: str | None = None
        self._last_values: dict[str, float] = {}
        self._trusted_now = False
        self._resumed = False
        self._resume_state: dict | None = None
        self._scan: TrajectoryScan | None = None
        self._previous_result: dict | None = None
        self._stopped_frame = False
        self.writer = None
        self.log: LineLog | None = None
        self._snapshots: FrameWriter | None = None
        if resume and self.path.exists():
            self._load_resume_point()
        if not self._resumed:
            if resume:
                say(f"--resume: {self.path} has no complete frame yet; starting a new run")
            self._prepare_fresh()
        self.atoms.calc = make_calculator(model, self.mode, ltau, ltau_k)
        self.dyn = make_dynamics(self.atoms, settings, self.mode)
        if self._resume_state is not None:
            restore_dynamics_state(self.dyn, self._resume_state.get("dynamics", {}))

    # -- setup --------------------------------------------------------------------------------

    def _prepare_fresh(self) -> None:
        p = self.atoms.get_momenta()
        if not np.isfinite(p).all():
            raise InputError(f"{self.where}: momenta are NaN or infinite")
        if not np.any(p):
            if self.settings.temperature_K is None:
                raise SettingError(
                    f"{self.where} has no momenta: give {{temperature_K}} K to draw Maxwell-Boltzmann velocities"
                )
            init_velocities(self.atoms, self.settings.temperature_K, self.settings.seed)

    def _load_resume_point(self) -> None:
        """Read (without changing anything) the last complete frame and check this call against the run record."""
        scan = scan_trajectory(self.path)
        if not scan.frames:
            return  # a run killed before its first frame: start afresh
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
        old = load_record(self.files.record)
        if old is None:
            self.say(f"note: {self.files.record} is missing (a run of an older atomuq): settings not checked")
        else:
            check_resume(old, self.record, self.path)
            self.record = {
                **old, "compare": self.record["compare"], "atomuq_version": self.record["atomuq_version"], "result": None,
                "resumes": [*old.get("resumes", []), {"step": int(last.info["step"]), "previous": old.get("result")}],
            }
            self._previous_result = old.get("result")
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
                t.get_positions(), t.get_momenta(), int(t.info["step"]), float(t.info["time_fs"]),
                decode_state(t.info["md_state"]),
            )
        self.frames_written = len(frames)
        self._resume_state = state
        self._scan = scan
        self._stopped_frame = last.info.get("event") == "stop"
        self._resumed = True

    # -- files --------------------------------------------------------------------------------

    def _open_files(self) -> list[str]:
        """Create (fresh) or reopen (resume) the run's files; returns messages about what a resume cut."""
        messages = []
        if self._resumed:
            message = cut_partial_frame(self.path, self._scan)
            if message:
                messages.append(message)
            sizes = self._resume_state.get("log_sizes")
            if sizes:
                cut = truncate_logs(self.files.log, sizes)
                if cut:
                    messages.append(f"{self.files.log}: dropped {cut} bytes logged after the frame of step {self.step}")
            snapshot_bytes = self._resume_state.get("snapshot_bytes")
            if snapshot_bytes is not None and self.files.snapshots.is_file():
                if self.files.snapshots.stat().st_size > snapshot_bytes:
                    with open(self.files.snapshots, "r+b") as fh:
                        fh.truncate(snapshot_bytes)
        else:
            self.files.snapshots.unlink(missing_ok=True)
        write_record(self.files.record, self.record)
        self.log = LineLog(self.files.log, append=self._resumed)
        self.writer = open_frame_writer(self.path, append=self._resumed)
        return messages

    def _close(self) -> None:
        for handle in (self.writer, self.log, self._snapshots):
            if handle is not None:
                handle.close()
        self.writer = self.log = self._snapshots = None

    def _remove_files(self) -> None:
        for path in self.files.all():
            path.unlink(missing_ok=True)

    # -- state --------------------------------------------------------------------------------

    def _state(self) -> dict:
        monitors = [{"name": m.name, **m.get_state()} for m in self.monitors]
        return {"mode": self.mode, "rollbacks": self.rollbacks, "dynamics": dynamics_state(self.dyn), "monitors": monitors}

    def _write_frame(self, trusted: bool = False, event: str | None = None, snapshot: bool = False) -> None:
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
            **self._last_values,
            "trusted": trusted,
        }
        if event:
            info["event"] = event
        state = self._state()
        if not snapshot:  # where the logs stood when this frame was written: a resume from it cuts them back here
            state["log_sizes"] = self.log.sizes()
            if self.files.snapshots.is_file():
                state["snapshot_bytes"] = self.files.snapshots.stat().st_size
        info["md_state"] = encode_state(state)
        try:  # one writer of result keys (core.schema): registered names, finite values, provenance
            prepared = prepare_results({"energy": epot, "forces": r["forces"], **info}, self.provenance, len(atoms))
        except NonFiniteResult as exc:
            raise AtomuqError(f"{self.where}: step {self.step}: {exc}; the run is stopped (frames so far are kept)") from None
        writer = self._snapshot_writer() if snapshot else self.writer
        writer.write(atoms, prepared.info, forces=prepared.calculator["forces"], energy=epot)
        self.log.sync()
        if not snapshot:
            self.frames_written += 1

    def _log(self, line: str, record: dict | None = None) -> None:
        self.log.write(line, record)

    # -- monitoring ---------------------------------------------------------------------------

    def _check_monitors(self) -> tuple[str | None, list[Reading]]:
        """Run the due monitors; returns the most severe action of a breach (or None) and the readings."""
        self._last_values = {}
        worst, ran_thresholded, readings = None, False, []
        for m in self.monitors:
            if not m.due(self.step):
                continue
            reading = m.check(self.atoms, self.step, self.time_fs)
            readings.append(reading)
            if reading.value is not None:
                self._last_values[m.name] = reading.value
            ran_thresholded |= m.threshold is not None and reading.value is not None
            if reading.breached and (worst is None or _SEVERITY[reading.action] > _SEVERITY[worst]):
                worst = reading.action
        if worst is None and ran_thresholded:
            self.trusted = Trusted(
                self.atoms.get_positions(), self.atoms.get_momenta(), self.step, self.time_fs,
                copy.deepcopy(self._state()),
            )
            self._trusted_now = True
        breaches = [r for r in readings if r.breached and r.action in ("stop", "rollback")]
        if breaches:
            self.reason = "; ".join(r.reason() for r in breaches)
        return worst, readings

    def _log_readings(self, readings: list[Reading]) -> None:
        for r in readings:
            event = "breach" if r.breached else "reading"
            self.log.write(r.line(), {"event": event, **r.__dict__}, sync=r.breached)

    def _check_result_keys(self) -> None:
        """SettingError for a key:RESULT monitor whose result this run's calculator does not give."""
        calc = self.atoms.calc
        available = sorted(calc.results)
        for m in self.monitors:
            q = m.quantity
            if not isinstance(q, ResultKey) or q.key in calc.results:
                continue
            try:
                calc.get_property(q.key, self.atoms)
            except PropertyNotImplementedError:
                raise missing_result_error(q.key, available) from None

    def _check_start_values(self) -> None:
        r = self.atoms.calc.results
        if not (np.isfinite(r["energy"]) and np.isfinite(r["forces"]).all()):
            raise InputError(f"{self.where}: the model gives a non-finite energy or forces at the start")

    def _rollback(self) -> bool:
        """Restore the trusted state and switch to the fallback forces; False if that is not possible."""
        limit = self.settings.max_rollbacks
        if self.trusted is None:
            self._log(f"step {self.step:>8d}  rollback impossible: no trusted frame yet; stopping")
            self.reason = f"{self.reason}; no trusted frame to roll back to"
            return False
        if self.rollbacks >= limit:
            self._log(f"step {self.step:>8d}  rollback limit ({limit}) reached; stopping")
            self.reason = f"{self.reason}; rollback limit ({limit}) reached"
            return False
        t = self.trusted
        old_mode, old_step = self.mode, self.step
        self.rollbacks += 1
        self.mode = self.settings.fallback_forces
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
            f"at most {limit}"
        )
        self._log(line, {"event": "rollback", "from_step": old_step, "to_step": t.step, "to_time_fs": t.time_fs,
                         "mode": self.mode, "previous_mode": old_mode})
        self.say(line.strip())
        self._write_frame(trusted=True, event="rollback")
        self.reason = None
        return True

    # -- main loop ----------------------------------------------------------------------------

    def run(self, progress: Callable[[float], None] | None = None) -> RunResult:
        """Integrate until steps x (the first integrator's step) of simulated time; returns how it ended."""
        target_fs = self.settings.target_fs()
        if self._resumed:
            if self._stopped_frame:
                self.reason = (self._previous_result or {}).get("reason") or "a monitor stopped it"
                self.say(f"{self.path}: the run stopped at step {self.step} ({self.reason}); nothing to resume")
                return self._result("stopped")
            if self.time_fs >= target_fs - 1e-9:
                self.say(f"{self.path}: already at t = {self.time_fs:g} fs of {target_fs:g}; nothing to resume")
                return self._result("completed")
            self._resume_files(target_fs)
            # evaluate the resume point as the killed run did at this step: with the backward pass only where a
            # monitor due now asked for it (the fused backward's direct forces differ from a plain forward's in the
            # last bits, so asking for more here would change the trajectory)
            self._prepare_next_for(self.step)
            self.atoms.get_forces()
        elif self._start(target_fs):
            return self._finish("stopped")
        status = "completed"
        try:
            while self.time_fs < target_fs - 1e-9:
                status = self._segment(target_fs, progress)
                if status != "rollback":
                    break
        except KeyboardInterrupt:
            status = "interrupted"
            self._log(f"step {self.step:>8d}  interrupted; every frame up to here is on disk (use --resume)",
                      {"event": "interrupted", "step": self.step})
        except BlownUp as exc:
            message = (f"{self.where}: after step {self.step} (t = {self.time_fs:g} fs, {self.mode} forces): {exc}; "
                       "the run is stopped (the frames written so far are kept)")
            self._log(f"step {self.step:>8d}  BLOWN UP: {exc}", {"event": "blown_up", "step": self.step,
                                                                 "time_fs": self.time_fs, "reason": str(exc)})
            self._close()
            raise AtomuqError(message) from None
        except BaseException:
            self._close()
            raise
        return self._finish("completed" if status == "rollback" else status)

    def _resume_files(self, target_fs: float) -> None:
        messages = self._open_files()
        for msg in messages:
            self.say(msg)
            self._log(msg, {"event": "resume_cut", "message": msg})
        previous = (self._previous_result or {}).get("status", "killed")
        self.say(f"resuming {self.path} from step {self.step} (t = {self.time_fs:g} fs, {self.mode} forces)")
        self._log(
            f"RESUME at step {self.step} (t = {self.time_fs:g} fs) with {self.mode} forces, target {target_fs:g} fs "
            f"(the previous process: {previous})",
            {"event": "resume", "step": self.step, "time_fs": self.time_fs, "mode": self.mode, "previous": previous},
        )

    def _start(self, target_fs: float) -> bool:
        """Evaluate and check the start, then create the files and write frame 0; True if the start breaches.

        Nothing is written before every check has passed; if writing the start fails, the files are removed.
        """
        self.atoms.calc.request_conservative()  # every result at the start, for the checks below
        self.atoms.get_forces()
        self._check_start_values()
        self._check_result_keys()
        action, readings = self._check_monitors()
        stop = action in ("stop", "rollback")
        try:
            self._open_files()
            self._log_header(target_fs)
            self._log_readings(readings)
            self._write_frame(trusted=self._trusted_now, event="stop" if stop else None)
        except BaseException:
            self._close()
            self._remove_files()
            raise
        if stop:
            self._log(f"step {self.step:>8d}  the start already breaches a threshold ({self.reason}); stopping",
                      {"event": "stop", "reason": self.reason})
            return True
        return False

    def _log_header(self, target_fs: float) -> None:
        s, rec = self.settings, self.record
        inner = f" (MTS inner {s.mts_inner})" if self.mode == "mts" else ""
        self._log(
            f"START {s.ensemble}, {self.mode} forces, step {s.step_fs(self.mode):g} fs{inner}, target {target_fs:g} fs; "
            f"monitors: {self.plan.describe()}",
            {"event": "start", "settings": s.as_dict(), "monitoring": self.plan.choice, "monitors": self.plan.specs()},
        )
        self._log(
            f"model {rec['model']['name']} (weights fingerprint {rec['model']['fingerprint']}), "
            f"atomuq {rec['atomuq_version']}, start {self.where}",
            {"event": "provenance", "model": rec["model"], "atomuq_version": rec["atomuq_version"], "structure": self.where},
        )

    def _prepare_next_for(self, step: int) -> None:
        """Ask the calculator for the backward pass in the next evaluation if a monitor needing it is due at `step`."""
        direct = self.mode != "mts" and self.atoms.calc.force_mode == "direct"
        if direct and any(m.quantity.needs_conservative and m.due(step) for m in self.monitors):
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
            action, readings = self._check_monitors()
            self._log_readings(readings)
            if action == "snapshot":
                self._write_frame(trusted=False, event="snapshot", snapshot=True)
                self._log(f"step {self.step:>8d}  snapshot written to {self.files.snapshots}",
                          {"event": "snapshot", "step": self.step})
            if action == "rollback" and self._rollback():
                return "rollback"
            if action in ("stop", "rollback"):
                self._write_frame(event="stop")
                self._log(f"step {self.step:>8d}  STOP (t = {self.time_fs:g} fs): {self.reason}; the last frame is written",
                          {"event": "stop", "step": self.step, "time_fs": self.time_fs, "reason": self.reason})
                return "stopped"
            last = self.time_fs >= target_fs - 1e-9
            if self.step % self.settings.traj_every == 0 or last:
                self._write_frame(trusted=self._trusted_now)
            self._prepare_next_for(self.step + 1)
        return "completed"

    def _snapshot_writer(self) -> FrameWriter:
        if self._snapshots is None:
            self._snapshots = FrameWriter(self.files.snapshots, append=True)
        return self._snapshots

    def _result(self, status: str) -> RunResult:
        return RunResult(status, self.step, self.time_fs, self.frames_written, self.rollbacks, self.mode,
                         reason=self.reason if status == "stopped" else None, monitoring=self.plan.choice,
                         trajectory=str(self.path))

    def _finish(self, status: str) -> RunResult:
        result = self._result(status)
        self._log(
            f"END {status} at step {self.step} (t = {self.time_fs:g} fs), {self.mode} forces, {self.rollbacks} rollback(s)",
            {"event": "end", "status": status, "step": self.step, "time_fs": self.time_fs, "mode": self.mode,
             "reason": result.reason},
        )
        self._close()
        self.record["result"] = {"status": status, "step": self.step, "time_fs": self.time_fs, "mode": self.mode,
                                 "rollbacks": self.rollbacks, "frames": self.frames_written, "reason": result.reason}
        write_record(self.files.record, self.record)
        return result
