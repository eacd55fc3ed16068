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
from ase import Atoms

from atomuq.core.errors import InputError
from atomuq.core.io import Record, write_structures
from atomuq.core.validate import DEFAULT_MIN_DISTANCE
from atomuq.core.workers import WorkerDied, run_tasks
from atomuq.reference import ReferenceMethod, get_method
from atomuq.reference.files import PartialFrames, failures_path, partial_path, structure_hash, write_failures
from atomuq.workflows.label import LabellingError, as_records, check_run, worker_died
from atomuq.workflows.sample_trajectory import SampleSettings, TrajectorySpec, trajectory_task

__all__ = ["FRAME_INFO", "SampleFailure", "SampleReport", "SampleSettings", "sample_structures"]

#: info keys of every sampled frame, with units
FRAME_INFO = {
    "temperature": "K (thermostat target)", "source": "input file:index", "md_trajectory": "trajectory number",
    "md_frame": "frame number within the trajectory", "md_step": "MD step, burn-in included",
    "md_time_fs": "fs since the start of the trajectory", "md_seed": "seed of the run",
    "kinetic_temperature": "K (instantaneous)", "label_method": "reference method",
}
_PARTIAL_ONLY = ("sample_key",)


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
        with contextlib.closing(run_tasks(trajectory_task, tasks, workers, on_message=handle)) as outcomes:
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

