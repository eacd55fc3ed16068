"""The local engine: input records in shards -> validated results -> the schema writer, resumable by shard.

The output OUT is written through a work folder beside it, OUT.shards/: a manifest (the task, its
settings, the shard size and the SHA-256 of every shard's input structures) and one extended XYZ
file per finished shard, each written atomically. A rerun after a kill skips the finished shards
and refuses changed settings or inputs, naming them; when every shard is done the shard files are
concatenated, in input order, into OUT (atomically) and the work folder is removed. So an
interrupted run and an uninterrupted one give byte-identical files.

The pieces the Ray engine (engines.ray) reuses: `execute_shards` with its own executor (checks, manifest,
resume, the shard store and the output), `check_score` / `score_settings_record` / `score_run`, and the work
function itself (`workflows.score.score_shard(records, settings, model, ...) -> list[Atoms]`, what one actor
runs on one shard). Instead of one file, `as_folder` leaves the finished work folder (manifest and shards,
in order by name) as the output, for runs too large for one file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, Sequence, TypeVar

from ase import Atoms
from ase.io import read

from atomuq.core.errors import InputError
from atomuq.core.io import Record, atomic_path, concatenate_files, records_sha256, write_structures
from atomuq.core.paths import check_output_dir, check_output_file
from atomuq.core.schema import SCHEMA_VERSION
from atomuq.core.validate import DEFAULT_MIN_DISTANCE, check_records
from atomuq.models.protocol import AtomisticModel
from atomuq.models.provenance import model_provenance
from atomuq.uq.ensemble import Member
from atomuq.workflows.score import (
    ScoreRow,
    ScoreSettings,
    check_direct_head,
    ensemble_provenance,
    score_row,
    score_shard,
)

FORMAT = "atomuq-shards"
FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 256
Summary = TypeVar("Summary")


def work_folder(output: str | Path) -> Path:
    """The work folder of an output file: OUT.shards beside it."""
    output = Path(output)
    return output.with_name(output.name + ".shards")


def plan_shards(n_records: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) record ranges of consecutive shards of at most shard_size records."""
    if shard_size < 1:
        raise InputError(f"shard size must be at least 1, got {shard_size}")
    return [(start, min(start + shard_size, n_records)) for start in range(0, n_records, shard_size)]


def _describe(records: Sequence[Record]) -> str:
    first, last = records[0], records[-1]
    if first.source == last.source:
        return f"{first.source} structures {first.index}-{last.index}"
    return f"{first.where} to {last.where}"


class ShardStore:
    """The work folder of one output: manifest, finished shards, and the final ordered file."""

    def __init__(self, output: str | Path) -> None:
        self.output = Path(output)
        self.folder = work_folder(self.output)
        self.manifest_path = self.folder / "manifest.json"

    def shard_path(self, k: int) -> Path:
        """Where shard k is kept."""
        return self.folder / f"shard-{k:06d}.extxyz"

    def finished(self, n_shards: int) -> list[int]:
        """Indices of the shards already written."""
        return [k for k in range(n_shards) if self.shard_path(k).is_file()]

    def open(self, manifest: dict[str, Any], describe: Sequence[str]) -> list[int]:
        """Start or resume: the finished shards. A folder with finished shards but another task, settings or inputs
        is refused with an InputError naming what changed (describe[k] names shard k's structures)."""
        n_shards = len(manifest["shards"])
        if self.manifest_path.is_file():
            try:
                old = json.loads(self.manifest_path.read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"{self.manifest_path}: unreadable resume manifest ({exc}); remove {self.folder} "
                                 "to start over") from exc
            done = self.finished(len(old.get("shards", [])))
            if done:
                self._check_same(old, manifest, describe)
                return done
        elif self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"{self.folder}: is a file; atomuq keeps the shards of {self.output} there, remove it")
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob("shard-*.extxyz"):  # of a run that never finished a shard under this manifest
            stale.unlink()
        with atomic_path(self.manifest_path) as tmp:
            Path(tmp).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return self.finished(n_shards)

    def _check_same(self, old: dict[str, Any], new: dict[str, Any], describe: Sequence[str]) -> None:
        hint = f"rerun with the same inputs and settings to resume, or remove {self.folder} to start over"
        if old.get("format") != FORMAT or old.get("task") != new["task"]:
            raise InputError(f"{self.folder}: holds shards of {old.get('task', 'another task')!r}, not of "
                             f"{new['task']!r}; {hint}")
        changed = [f"{name} {old['settings'].get(name)!r} -> {new['settings'].get(name)!r}"
                   for name in sorted(set(old.get("settings", {})) | set(new["settings"]))
                   if old.get("settings", {}).get(name) != new["settings"].get(name)]
        for name in ("shard_size", "n_records"):
            if old.get(name) != new[name]:
                changed.append(f"{name} {old.get(name)!r} -> {new[name]!r}")
        if changed:
            raise InputError(f"{self.output}: an interrupted run with other settings is in {self.folder} "
                             f"({'; '.join(changed)}); {hint}")
        differ = [describe[k] for k, (a, b) in enumerate(zip(old["shards"], new["shards"])) if a != b]
        if differ:
            shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
            raise InputError(f"{self.output}: the input structures changed since the interrupted run in "
                             f"{self.folder} ({shown}); {hint}")

    def save(self, k: int, structures: Sequence[Atoms]) -> None:
        """Write shard k atomically."""
        write_structures(self.shard_path(k), structures)

    def load(self, k: int) -> list[Atoms]:
        """The structures of finished shard k."""
        try:
            return read(self.shard_path(k), index=":", format="extxyz")
        except Exception as exc:  # a damaged shard file, named
            raise InputError(f"{self.shard_path(k)}: unreadable shard ({type(exc).__name__}: {exc}); remove it to "
                             "recompute that shard") from exc

    def finish(self, n_shards: int) -> Path:
        """Concatenate the shards in order into the output (atomically) and remove the work folder."""
        concatenate_files(self.output, [self.shard_path(k) for k in range(n_shards)])
        shutil.rmtree(self.folder)
        return self.output

    def finish_folder(self) -> Path:
        """Make the work folder (manifest and every shard, in order by name) the output folder, by one rename."""
        if self.output.is_dir():
            self.output.rmdir()  # empty (check_shard_output): os.replace onto a folder needs it gone on some systems
        os.replace(self.folder, self.output)
        return self.output


@dataclass
class ShardRun(Generic[Summary]):
    """What a sharded run did: per-shard summaries in input order, shards resumed from disk and their number."""

    summaries: list[list[Summary]]
    resumed: int
    n_shards: int
    output: Path


#: runs the unfinished shards [(k, records of shard k)], yielding (k, structures of shard k) in any order
Executor = Callable[[Sequence[tuple[int, Sequence[Record]]]], Iterable[tuple[int, list[Atoms]]]]


def in_order(work: Callable[[Sequence[Record]], list[Atoms]]) -> Executor:
    """The local executor: work(shard) on each shard in turn, in this process."""

    def execute(todo: Sequence[tuple[int, Sequence[Record]]]) -> Iterator[tuple[int, list[Atoms]]]:
        for k, shard in todo:
            yield k, work(shard)

    return execute


def check_shard_output(output: str | Path, as_folder: bool = False) -> Path:
    """Refuse an output (file, or folder of shards when as_folder) and its work folder that cannot be written,
    before any work."""
    output = Path(output)
    if as_folder:
        check_output_dir(output, "--output")
        if output.is_dir() and any(output.iterdir()):
            raise InputError(f"--output {output}: exists and is not empty; a folder of shards is written to a new "
                             "or empty folder, remove it or choose another name")
    else:
        if output.suffix == ".traj":
            raise InputError(f"{output}: results are written as extended XYZ; name the file .extxyz (ASE would read "
                             "a .traj name as an ASE trajectory)")
        check_output_file(output)
    check_output_dir(work_folder(output), "work folder")
    return output


def run_shards(
    records: Sequence[Record],
    work: Callable[[Sequence[Record]], list[Atoms]],
    output: str | Path,
    task: str,
    settings: dict[str, Any],
    summarize: Callable[[list[Atoms]], list[Summary]],
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: Callable[[int], None] | None = None,
) -> ShardRun[Summary]:
    """Run work(shard) -> structures over the records shard by shard into output, resuming finished shards.

    settings (JSON-able) are every choice that changes the output; summarize(structures) gives what the caller
    keeps of each shard (e.g. summary rows), computed from the written structures for resumed shards.
    """
    return execute_shards(records, in_order(work), output, task, settings, summarize, shard_size, progress)


def execute_shards(
    records: Sequence[Record],
    execute: Executor,
    output: str | Path,
    task: str,
    settings: dict[str, Any],
    summarize: Callable[[list[Atoms]], list[Summary]],
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: Callable[[int], None] | None = None,
    as_folder: bool = False,
) -> ShardRun[Summary]:
    """run_shards with any executor (local: in_order; engines.ray: actors): each shard it yields is written to the
    store as it comes, so a kill loses only the shards in flight; then the ordered output file (or, as_folder,
    the folder of shards with its manifest) is made."""
    if not records:
        raise InputError("no structures to work on")
    output = check_shard_output(output, as_folder)
    store = ShardStore(output)
    ranges = plan_shards(len(records), shard_size)
    shards = [records[a:b] for a, b in ranges]
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "task": task, "settings": settings,
                "shard_size": shard_size, "n_records": len(records), "shards": [records_sha256(s) for s in shards]}
    done = set(store.open(manifest, [_describe(s) for s in shards]))
    if progress is not None and done:
        progress(sum(len(shards[k]) for k in done))
    summaries = {k: summarize(store.load(k)) for k in sorted(done)}
    produced = execute([(k, shard) for k, shard in enumerate(shards) if k not in done])
    try:
        for k, structures in produced:
            if len(structures) != len(shards[k]):
                raise RuntimeError(f"shard {k}: {len(structures)} results for {len(shards[k])} structures")
            store.save(k, structures)
            summaries[k] = summarize(structures)
    finally:
        close = getattr(produced, "close", None)  # stop an executor's workers when the run stops early
        if close is not None:
            close()
    missing = [k for k in range(len(shards)) if k not in summaries]
    if missing:
        raise RuntimeError(f"the executor returned no results for shards {missing[:5]}")
    if as_folder:
        store.finish_folder()
    else:
        store.finish(len(shards))
    return ShardRun([summaries[k] for k in range(len(shards))], len(done), len(shards), output)


def score_settings_record(settings: ScoreSettings, model: AtomisticModel, ensemble: Sequence[Member] | None,
                          ensemble_names: Sequence[str] | None) -> dict[str, Any]:
    """Everything that changes score's output, as the resume manifest keeps it."""
    provenance = model_provenance(model)
    return {**settings.as_dict(), "model": provenance.model, "model_fingerprint": provenance.model_fingerprint,
            "ensemble": ensemble_provenance(ensemble, ensemble_names), "device": str(model.device),
            "dtype": str(model.dtype), "atomuq_version": provenance.atomuq_version, "schema_version": SCHEMA_VERSION}


@dataclass
class ScoreRun:
    """Summary rows of every structure (input order), and how many shards were resumed of how many."""

    rows: list[ScoreRow]
    resumed: int
    n_shards: int
    output: Path


def check_score(records: Sequence[Record], model: AtomisticModel, settings: ScoreSettings | None,
                min_distance: float, shard_size: int | None) -> tuple[ScoreSettings, int]:
    """What every engine checks before scoring (model heads, every structure) and the defaults: (settings,
    shard size: DEFAULT_SHARD_SIZE rounded up to a multiple of the batch size unless given)."""
    settings = settings or ScoreSettings()
    check_direct_head(model)
    check_records(records, model.elements, min_distance)
    size = settings.batch_size
    return settings, shard_size or -(-DEFAULT_SHARD_SIZE // size) * size


def score_run(records: Sequence[Record], execute: Executor, output: str | Path, settings_record: dict[str, Any],
              shard_size: int, progress: Callable[[int], None] | None = None, as_folder: bool = False) -> ScoreRun:
    """Score's sharded run with any executor: task 'score', summary rows from the written structures."""
    run = execute_shards(records, execute, output, "score", settings_record,
                         lambda frames: [score_row(a) for a in frames], shard_size, progress, as_folder)
    return ScoreRun([row for rows in run.summaries for row in rows], run.resumed, run.n_shards, run.output)


def score_file(
    records: Sequence[Record],
    model: AtomisticModel,
    output: str | Path,
    settings: ScoreSettings | None = None,
    ensemble: Sequence[Member] | None = None,
    ensemble_names: Sequence[str] | None = None,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    shard_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> ScoreRun:
    """`atomuq score`: check every structure, then score shard by shard into output (resumable, see the module doc).

    shard_size defaults to DEFAULT_SHARD_SIZE rounded up to a multiple of the batch size.
    """
    settings, shard_size = check_score(records, model, settings, min_distance, shard_size)
    provenance = model_provenance(model)

    def work(shard: Sequence[Record]) -> list[Atoms]:
        return score_shard(shard, settings, model, ensemble, ensemble_names, provenance, progress)

    return score_run(records, in_order(work), output, score_settings_record(settings, model, ensemble, ensemble_names),
                     shard_size, progress)
