"""Sampling by Langevin molecular dynamics driven by a reference method: labelled frames at chosen temperatures.

Each input structure is run at each temperature T (K) as one trajectory: velocities drawn from the
Maxwell-Boltzmann distribution at T, `burn_in` steps, then `steps` steps of which every `interval`-th
is written with its reference labels (energy eV, forces eV/Å, stress eV/Å³ for periodic cells, all
already computed by the integrator, so labelling costs nothing extra). The trajectory's random
numbers come from (seed, structure position, T), so a run is reproducible and one trajectory does
not depend on which others were asked for.

Frames get info 'temperature' (the target, K), 'source' (input file:index), 'md_trajectory',
'md_frame', 'md_step', 'md_time_fs', 'md_seed', 'kinetic_temperature' (K) and 'label_method'.
Finished frames go to OUTPUT.partial at once; a rerun keeps the finished trajectories and runs the
unfinished ones again from their start (same seed, so the same frames). The final file is written
atomically. A trajectory whose calculation fails keeps the frames it produced; the failure (file,
index, temperature, step) goes to OUTPUT.failures.jsonl. Inputs and output paths are checked before
any MD step (atomuq.workflows.label.check_run); worker processes (atomuq.core.workers) run whole
trajectories, stream their frames back as they come and die with the sampling process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from ase import Atoms, units
from ase.constraints import FixCom
from ase.md import velocitydistribution
from ase.md.langevin import Langevin

from atomuq.core.errors import InputError
from atomuq.core.io import Record, write_structures
from atomuq.core.validate import DEFAULT_MIN_DISTANCE
from atomuq.core.workers import WorkerDied, run_tasks, send
from atomuq.reference import ReferenceMethod, get_method
from atomuq.reference.files import PartialFrames, failures_path, partial_path, structure_hash, write_failures
from atomuq.reference.labels import attach_labels, compute_labels, error_text
from atomuq.workflows.label import LabellingError, as_records, check_run, worker_died

#: info keys of every sampled frame, with units
FRAME_INFO = {
    "temperature": "K (thermostat target)", "source": "input file:index", "md_trajectory": "trajectory number",
    "md_frame": "frame number within the trajectory", "md_step": "MD step, burn-in included",
    "md_time_fs": "fs since the start of the trajectory", "md_seed": "seed of the run",
    "kinetic_temperature": "K (instantaneous)", "label_method": "reference method",
}
_PARTIAL_ONLY = ("sample_key",)


@dataclass(frozen=True)
class SampleSettings:
    """Langevin settings: temperatures in K, timestep in fs, friction in 1/fs, step counts."""

    temperatures: tuple[float, ...]
    steps: int  # MD steps per trajectory after the burn-in
    interval: int  # write every interval-th step
    timestep: float = 0.5  # fs
    friction: float = 0.01  # 1/fs
    burn_in: int = 0  # steps before the first counted step
    seed: int = 0

    @property
    def n_frames(self) -> int:
        """Frames written per trajectory."""
        return self.steps // self.interval

    @property
    def steps_per_trajectory(self) -> int:
        """MD steps run per trajectory, burn-in included."""
        return self.burn_in + self.n_frames * self.interval

    def check(self) -> None:
        """Raise InputError for settings that cannot work."""
        if not self.temperatures:
            raise InputError("give at least one --temperature")
        if any(not np.isfinite(t) or t <= 0 for t in self.temperatures):
            raise InputError(f"temperatures must be positive (K), got {list(self.temperatures)}")
        if self.interval < 1 or self.steps < self.interval:
            raise InputError(f"--steps ({self.steps}) must be at least --interval ({self.interval}) and --interval at least 1")
        if self.burn_in < 0:
            raise InputError(f"--burn-in must be zero or more, got {self.burn_in}")
        if not 0 < self.timestep <= 10:
            raise InputError(f"--timestep must be in (0, 10] fs, got {self.timestep}")
        if self.friction < 0:
            raise InputError(f"--friction must be zero or more (1/fs), got {self.friction}")


@dataclass(frozen=True)
class TrajectorySpec:
    """One (structure, temperature) run."""

    id: int
    position: int  # structure position in the whole input
    temperature: float  # K
    key: str  # fingerprint of input structure, temperature, settings and method


@dataclass
class SampleFailure:
    """A trajectory stopped by a failed calculation."""

    source: str
    index: int
    position: int
    temperature: float
    step: int
    method: str
    error: str

    @property
    def where(self) -> str:
        """Human-readable location: file, structure index, temperature and step."""
        return f"{self.source} structure {self.index} at {self.temperature:g} K, step {self.step}"


@dataclass
class SampleReport:
    """What a sampling run did."""

    output: Path
    n_trajectories: int
    n_frames: int
    n_resumed: int  # trajectories taken from OUTPUT.partial
    failures: list[SampleFailure]
    seconds: float  # wall time of this call
    md_steps: int  # MD steps run in this call
    failures_log: Path | None = None

    @property
    def seconds_per_step(self) -> float:
        """Wall seconds per MD step in this call (calculator and integrator)."""
        return self.seconds / self.md_steps if self.md_steps else float("nan")


class _TrajectoryFailed(Exception):
    def __init__(self, step: int, error: str) -> None:
        super().__init__(error)
        self.step = step
        self.error = error


def _thermalize(atoms: Atoms, temperature: float, rng: np.random.Generator) -> None:
    fn = getattr(velocitydistribution, "thermalize_momenta", None)  # ASE >= 3.29
    if fn is not None:
        fn(atoms, temperature, rng=rng)
    else:  # pragma: no cover - older ASE
        velocitydistribution.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)


def trajectory_rng(seed: int, position: int, temperature: float) -> np.random.Generator:
    """The random generator of one trajectory, fixed by (seed, structure position, temperature in mK)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(position), int(round(temperature * 1000))]))


def run_trajectory(
    record: Record,
    spec: TrajectorySpec,
    method: ReferenceMethod,
    settings: SampleSettings,
    emit: Callable[[int, Atoms], None],
    advance: Callable[[int], None] | None = None,
) -> None:
    """Run one Langevin trajectory; emit(k, frame) for each labelled frame, advance(n) per n MD steps.

    Raises _TrajectoryFailed (with the step) when the calculator fails or returns non-finite values.
    """
    atoms = record.atoms.copy()
    original_constraints = [c.copy() for c in atoms.constraints]
    rng = trajectory_rng(settings.seed, spec.position, spec.temperature)
    _thermalize(atoms, spec.temperature, rng)
    velocitydistribution.Stationary(atoms)
    if not atoms.pbc.any():
        velocitydistribution.ZeroRotation(atoms)
    atoms.set_constraint(original_constraints + [FixCom()])
    step = 0
    try:
        atoms.calc = method.make_calculator()
        dyn = Langevin(atoms, settings.timestep * units.fs, temperature_K=spec.temperature,
                       friction=settings.friction / units.fs, fixcm=False, rng=rng)
        for chunk in _chunks(settings.burn_in, settings.interval):
            dyn.run(chunk)
            step += chunk
            if advance:
                advance(chunk)
        for k in range(settings.n_frames):
            dyn.run(settings.interval)
            step += settings.interval
            if not np.isfinite(atoms.positions).all():
                raise _TrajectoryFailed(step, "positions became NaN or infinite")
            results = compute_labels(atoms, atoms.calc)  # cached by the calculator: no new calculation
            frame = atoms.copy()
            frame.set_constraint([c.copy() for c in original_constraints])
            frame.arrays.pop("momenta", None)
            frame = attach_labels(frame, results, method.name)
            frame.info.update(
                temperature=float(spec.temperature), source=f"{record.source}:{record.index}",
                md_trajectory=spec.id, md_frame=k, md_step=step, md_time_fs=step * settings.timestep,
                md_seed=int(settings.seed), kinetic_temperature=float(atoms.get_temperature()),
                sample_key=spec.key,
            )
            emit(k, frame)
            if advance:
                advance(settings.interval)
    except _TrajectoryFailed:
        raise
    except Exception as exc:  # a calculator failure ends this trajectory, recorded by the caller
        raise _TrajectoryFailed(step, error_text(exc)) from exc


def _chunks(total: int, size: int) -> list[int]:
    return [size] * (total // size) + ([total % size] if total % size else [])


# --------------------------------------------------------------------------------------------
# one trajectory as a task of atomuq.core.workers.run_tasks: frames and progress are sent as they come


def _trajectory_task(record: Record, spec: TrajectorySpec, method: ReferenceMethod,
                     settings: SampleSettings) -> tuple[int | None, str | None]:
    """(None, None), or (failed step, error); sends ('frame', trajectory id, k, frame) and ('steps', n)."""
    try:
        run_trajectory(record, spec, method, settings, lambda k, frame: send(("frame", spec.id, k, frame)),
                       lambda n: send(("steps", n)))
    except _TrajectoryFailed as exc:
        return exc.step, exc.error
    return None, None


# --------------------------------------------------------------------------------------------


def sample_structures(
    structures: Sequence[Record] | Sequence[Atoms],
    method: str | ReferenceMethod,
    output: str | Path,
    settings: SampleSettings,
    *,
    workers: int = 1,
    options: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    on_failure: Callable[[SampleFailure], None] | None = None,
    log: Callable[[str], None] | None = None,
    min_distance: float = DEFAULT_MIN_DISTANCE,
) -> SampleReport:
    """Langevin MD (temperatures K, timestep fs) of every structure at every temperature; labelled frames to `output`.

    progress(n) is called per n MD steps (steps of resumed trajectories first). workers <= 1 runs in
    this process; workers >= 2 runs trajectories in that many fresh single-thread processes.
    """
    t_start = time.perf_counter()
    settings.check()
    records = as_records(structures)
    if not records:
        raise InputError("no structures to sample from")
    ref = get_method(method, options, log)
    output = Path(output)
    check_run(records, ref, output, min_distance)
    settings_repr = dataclasses.astuple(dataclasses.replace(settings, temperatures=()))
    specs: list[TrajectorySpec] = []
    for pos, rec in enumerate(records):
        h = structure_hash(rec.atoms)
        for temperature in settings.temperatures:
            key = structure_hash(rec.atoms, h, pos, float(temperature), settings_repr, ref.name, sorted(ref.options.items()))
            specs.append(TrajectorySpec(len(specs), pos, float(temperature), key))

    # resume: keep complete trajectories, drop frames of unfinished ones (they are run again)
    partial = PartialFrames(partial_path(output))
    by_traj: dict[int, dict[int, Atoms]] = defaultdict(dict)
    for k, frame in enumerate(partial.load(log)):
        tid = frame.info.get("md_trajectory")
        if not isinstance(tid, (int, np.integer)) or not 0 <= tid < len(specs) or frame.info.get("sample_key") != specs[tid].key:
            raise InputError(f"{partial.path}: frame {k} does not belong to this run (the input, method or settings "
                             f"changed since the interrupted run); repeat the same command or delete {partial.path}")
        by_traj[int(tid)].setdefault(int(frame.info["md_frame"]), frame)
    n_frames = settings.n_frames
    finished = {t: frames for t, frames in by_traj.items() if len(frames) == n_frames}
    dropped = sum(len(f) for t, f in by_traj.items() if t not in finished)
    if dropped:
        partial.rewrite([f for t in sorted(finished) for _, f in sorted(finished[t].items())])
        if log:
            log(f"{partial.path}: {dropped} frames of unfinished trajectories dropped; those trajectories run again")
    if finished:
        if log:
            log(f"resuming: {len(finished)} of {len(specs)} trajectories already done in {partial.path}")
        if progress:
            progress(len(finished) * settings.steps_per_trajectory)

    frames_by_traj: dict[int, dict[int, Atoms]] = {t: dict(f) for t, f in finished.items()}
    failures: list[SampleFailure] = []
    todo = [s for s in specs if s.id not in finished]
    steps_done = [0]

    def advance(n: int) -> None:
        steps_done[0] += n
        if progress:
            progress(n)

    def keep(tid: int, k: int, frame: Atoms) -> None:
        partial.append(frame)
        frames_by_traj.setdefault(tid, {})[k] = frame

    def failed(spec: TrajectorySpec, step: int, error: str) -> None:
        rec = records[spec.position]
        failure = SampleFailure(rec.source, rec.index, spec.position, spec.temperature, step, ref.name, error)
        failures.append(failure)
        if on_failure:
            on_failure(failure)
        if progress:  # the rest of this trajectory will not run
            progress(settings.steps_per_trajectory - step)

    def handle(message: tuple) -> None:
        if message[0] == "frame":
            keep(*message[1:])
        else:
            advance(message[1])

    try:
        tasks = [(records[s.position], s, ref, settings) for s in todo]
        with contextlib.closing(run_tasks(_trajectory_task, tasks, workers, on_message=handle)) as outcomes:
            for k, (step, error) in outcomes:
                if error is not None:
                    failed(todo[k], step, error)
    except WorkerDied as exc:
        raise worker_died(exc, "finished trajectories") from exc
    finally:
        partial.close()
        failures.sort(key=lambda f: (f.position, f.temperature))
        flog = write_failures(failures_path(output), failures) if failures else None

    frames = []
    for tid in sorted(frames_by_traj):
        for _, frame in sorted(frames_by_traj[tid].items()):
            for key in _PARTIAL_ONLY:
                frame.info.pop(key, None)
            frames.append(frame)
    if not frames:
        partial.remove()
        raise LabellingError(f"no frame could be sampled with {ref.name}; see {flog} for the errors")
    write_structures(output, frames)
    partial.remove()
    if not failures:
        write_failures(failures_path(output), [])
    return SampleReport(output, len(specs), len(frames), len(finished), failures,
                        time.perf_counter() - t_start, steps_done[0], flog)

