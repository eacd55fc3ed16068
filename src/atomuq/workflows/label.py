"""The labelling loop: reference energy (eV), forces (eV/Å) and stress (eV/Å³) for many structures, resumably.

Inputs (every structure: atoms, finite positions, a cell where periodic, no overlaps, elements the
method knows) and the output paths are checked before any calculation, so a refused start leaves
nothing behind. Labels are stored the ASE way: a SinglePointCalculator holding energy, forces and
(for cells periodic in all three directions) stress, plus ``info['label_method']``. Every finished
frame is appended to ``OUTPUT.partial`` at once; a rerun skips what is there and the final file is
written atomically in input order. Frames whose calculation fails are reported, skipped and recorded
in ``OUTPUT.failures.jsonl``. Worker processes (atomuq.core.workers) die with the labelling process.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from ase import Atoms

from atomuq.core.errors import AtomuqError, InputError
from atomuq.core.io import Record, write_structures
from atomuq.core.paths import check_output_file
from atomuq.core.validate import DEFAULT_MIN_DISTANCE, check_structure
from atomuq.core.workers import WorkerDied, run_tasks
from atomuq.reference import ReferenceMethod, get_method
from atomuq.reference.files import PartialFrames, failures_path, partial_path, structure_hash, write_failures
from atomuq.reference.labels import attach_labels, label_one, results_of


class LabellingError(AtomuqError):
    """Labelling could not go on (no frame could be labelled, a worker died); the message says what to do."""


@dataclass
class LabelFailure:
    """A structure whose reference calculation failed."""

    source: str
    index: int  # index within its file
    position: int  # position in the whole input (all files)
    method: str
    error: str

    @property
    def where(self) -> str:
        """Human-readable location: file and structure index."""
        return f"{self.source} structure {self.index}"


@dataclass
class LabelReport:
    """What a labelling run did."""

    output: Path
    n_input: int
    n_labelled: int  # frames in the output (resumed ones included)
    n_resumed: int  # frames taken from OUTPUT.partial of an earlier run
    failures: list[LabelFailure]
    complete: bool  # False when stopped by `limit`: the partial file is kept for a later run
    seconds: float  # wall time of this call
    calc_seconds: float  # summed calculator time of the frames done in this call
    failures_log: Path | None = None

    @property
    def n_new(self) -> int:
        """Frames labelled in this call."""
        return self.n_labelled - self.n_resumed


def as_records(structures: Sequence[Record] | Sequence[Atoms], source: str = "<input>") -> list[Record]:
    """Records for a list of Records or of Atoms (the latter named `source`, indexed from 0)."""
    return [s if isinstance(s, Record) else Record(s, source, k) for k, s in enumerate(structures)]


def check_run(records: Sequence[Record], method: ReferenceMethod, output: str | Path,
              min_distance: float = DEFAULT_MIN_DISTANCE, flag: str = "--output") -> None:
    """Before any work: the output, OUTPUT.partial and OUTPUT.failures.jsonl can be written, every structure
    is usable (InputError naming file and structure) and the method's calculator can be built."""
    check_output_file(output, flag)
    check_output_file(partial_path(output), flag)
    check_output_file(failures_path(output), flag)
    for rec in records:
        check_structure(rec.atoms, rec.where, None, min_distance)
        method.check(rec.atoms, rec.where)
    method.make_calculator()  # fail now, not once per frame, if the package or an option is wrong


def worker_died(exc: WorkerDied, kept: str) -> LabellingError:
    """The LabellingError for a dead worker: what is kept (e.g. 'finished frames') and how to go on."""
    return LabellingError(f"{exc}; {kept} are kept: rerun the same command to resume, or use --workers 1 to see the crash")


def label_structures(
    structures: Sequence[Record] | Sequence[Atoms],
    method: str | ReferenceMethod,
    output: str | Path,
    *,
    workers: int = 1,
    options: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    on_failure: Callable[[LabelFailure], None] | None = None,
    log: Callable[[str], None] | None = None,
    limit: int | None = None,
    min_distance: float = DEFAULT_MIN_DISTANCE,
) -> LabelReport:
    """Label structures with energy (eV), forces (eV/Å), stress (eV/Å³) and write `output` in input order, resumably.

    workers <= 1 runs in this process (one OpenMP thread unless OMP_NUM_THREADS is set); workers >= 2 starts
    that many fresh processes with one thread each (a few seconds to start; the caller needs a __main__ guard).
    progress(n) is called as n more structures are finished (resumed ones first); on_failure for each failed
    frame; log with one-line notes. limit stops after that many new frames (the partial file stays).
    """
    t_start = time.perf_counter()
    records = as_records(structures)
    ref = get_method(method, options, log)
    output = Path(output)
    if not records:
        raise InputError("no structures to label")
    check_run(records, ref, output, min_distance)
    hashes = [structure_hash(r.atoms, sorted(ref.options.items())) for r in records]  # options count too

    partial = PartialFrames(partial_path(output))
    done: dict[int, dict[str, Any]] = {}
    for k, frame in enumerate(partial.load(log)):
        pos = frame.info.get("label_position")
        if not ref.is_named(frame.info.get("label_method")):
            raise InputError(f"{partial.path}: frame {k} was labelled with {frame.info.get('label_method')!r}, not "
                             f"{ref.name!r}; rerun with that method or delete {partial.path} to start over")
        if not isinstance(pos, (int, np.integer)) or not 0 <= pos < len(records) or frame.info.get("label_hash") != hashes[pos]:
            raise InputError(f"{partial.path}: frame {k} does not match structure {pos} of the input (the input or the "
                             f"method options changed since the interrupted run); use the same input and options or "
                             f"delete {partial.path} to start over")
        done.setdefault(int(pos), results_of(frame))
    n_resumed = len(done)
    if n_resumed:
        if log:
            log(f"resuming: {n_resumed} of {len(records)} structures already labelled in {partial.path}")
        if progress:
            progress(n_resumed)

    todo = [p for p in range(len(records)) if p not in done]
    if limit is not None:
        todo = todo[: max(0, limit)]
    failures: list[LabelFailure] = []
    calc_seconds = 0.0
    try:
        tasks = [(ref, records[p].atoms) for p in todo]
        with contextlib.closing(run_tasks(label_one, tasks, workers)) as outcomes:
            for k, (results, error, seconds) in outcomes:
                pos = todo[k]
                calc_seconds += seconds
                rec = records[pos]
                if results is None:
                    failure = LabelFailure(rec.source, rec.index, pos, ref.name, error or "unknown error")
                    failures.append(failure)
                    if on_failure:
                        on_failure(failure)
                else:
                    slim = Atoms(rec.atoms.numbers, rec.atoms.positions, cell=rec.atoms.cell, pbc=rec.atoms.pbc)
                    frame = attach_labels(slim, results, ref.name)
                    frame.info.update(label_position=pos, label_hash=hashes[pos])
                    partial.append(frame)
                    done[pos] = results
                if progress:
                    progress(1)
    except WorkerDied as exc:
        raise worker_died(exc, "finished frames") from exc
    finally:
        partial.close()
        failures.sort(key=lambda f: f.position)
        flog = write_failures(failures_path(output), failures) if failures else None

    complete = len(done) + len(failures) == len(records)
    if complete:
        if not done:
            partial.remove()
            raise LabellingError(f"no structure could be labelled with {ref.name}; see {flog} for the errors")
        frames = [attach_labels(records[p].atoms, done[p], ref.name) for p in sorted(done)]
        write_structures(output, frames)
        partial.remove()
        if not failures:
            write_failures(failures_path(output), [])  # remove a stale log of an earlier run
    return LabelReport(output, len(records), len(done), n_resumed, failures, complete,
                       time.perf_counter() - t_start, calc_seconds, flog)
