"""Per-atom force-error log for LTAU-FF (methods.md section 4): one row per epoch, one column per training atom.

Layout of an error-log folder (all written by `ErrorLogWriter`):

- errors_direct.npy        float32 (n_epochs_planned, n_atoms), ‖F_nc,i − F_ref,i‖₂ in eV/Å
- errors_conservative.npy  float32 (n_epochs_planned, n_atoms), ‖F_c,i − F_ref,i‖₂ in eV/Å
- atom_numbers.npy         int32 (n_atoms,), atomic number of each atom
- reference_force_norms.npy float32 (n_atoms,), ‖F_ref,i‖₂ in eV/Å (for LTAU's relative tolerance)
- structure_offsets.npy    int64 (n_structures + 1,), global id of each structure's first atom
- error_log.json           metadata: run id, files and hashes, sizes, epochs planned/completed,
                           model fingerprint of each logged epoch

Global atom id = structure_offsets[structure] + atom index, structures in training-set order
(files in config order, frames in file order). Rows not yet logged are unspecified (the file is created
sparse, zeros); readers see only the completed rows (n_epochs_completed in the metadata). The two
large arrays are memory maps (np.lib.format.open_memmap), written in place one epoch row at a time;
a resumed run continues writing the same arrays.

The compact (histogram) form of a finished log, written by `compact_error_log` (`atomuq ltau compact`),
is a folder with two files: error_log.json (the same metadata, with form = "histogram", the epochs it
holds and each kind's mean final-epoch error) and error_histograms.npz (bzip2-compressed .npy members):

- atom_numbers, reference_force_norms (float16: 5e-4 relative, enough for rtol), structure_offsets, and
  structure_frames when the run had them;
- per kind (direct, conservative): counts_<kind> (n_atoms, n_edges + 1) in the smallest unsigned dtype, and
  edges_<kind> (eV/Å): EDGES_PER_DECADE fixed log-spaced edges per decade from 1e-3 to 1e2 eV/Å, plus that
  kind's mean final-epoch error (the default atol of `ltau fit`, so p_i at it is exact). Column 0 counts
  ε ≤ edges[0], column j edges[j-1] < ε ≤ edges[j], the last ε > edges[-1].

p_i read from counts is exact at every edge and log-linear inside a bin (uq.ltau.distribution.BinnedErrors).
`ErrorLog.distribution` hands either form to LTAU through one interface (uq.ltau.distribution.ErrorDistribution).
"""

from __future__ import annotations

import datetime as _dt
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import atomuq
from atomuq.core.errors import InputError
from atomuq.core.io import atomic_path
from atomuq.uq.ltau.distribution import (
    BinnedErrors,
    ErrorDistribution,
    ErrorTrajectory,
    HistogramBins,
    count_dtype,
    log_edges,
    with_edges,
)

FORMAT = "atomuq-error-log"
FORMAT_VERSION = 1
METADATA = "error_log.json"
DIRECT = "errors_direct.npy"
CONSERVATIVE = "errors_conservative.npy"
NUMBERS = "atom_numbers.npy"
REFERENCE_NORMS = "reference_force_norms.npy"
OFFSETS = "structure_offsets.npy"
FRAMES = "structure_frames.npy"
HISTOGRAMS = "error_histograms.npz"
#: the two logged error kinds: direct (non-conservative) and conservative forces
FORCE_KINDS = ("direct", "conservative")
FULL, HISTOGRAM = "full", "histogram"
#: fixed edges of a compact log: EDGES_PER_DECADE per decade over HISTOGRAM_RANGE (eV/Å)
EDGES_PER_DECADE = 10
HISTOGRAM_RANGE = (1e-3, 1e2)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _create_memmap(path: Path, shape: tuple[int, int]) -> None:
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        array.flush()
        del array


def _chunk_stop(epoch: int | None, filled: int, n_atoms: int, start: int, n_direct: int, n_conservative: int) -> int:
    """End of a chunk of errors written at start (either writer): in order, inside the log, both kinds alike."""
    if epoch is None:
        raise RuntimeError("call begin_epoch before write")
    if start != filled:
        raise ValueError(f"atoms must be written in order: expected start {filled}, got {start}")
    stop = start + n_direct
    if n_conservative != n_direct or stop > n_atoms:
        raise ValueError(f"chunk [{start}, {stop}) does not fit the log's {n_atoms} atoms")
    return stop


def _check_run(directory: Path, metadata: dict[str, Any], run_id: str) -> None:
    """Refuse to reopen a log written by another run."""
    if metadata.get("run_id") != run_id:
        raise InputError(f"{directory / METADATA}: belongs to run {metadata.get('run_id')!r}, not {run_id!r}; "
                         "the run folder was mixed up: use a new run_dir")


class ErrorLogWriter:
    """Writes per-atom force-error norms (eV/Å), one epoch row at a time, into memory-mapped .npy arrays."""

    def __init__(self, directory: Path, metadata: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.metadata = metadata
        self.n_atoms = int(metadata["n_atoms"])
        self.n_epochs = int(metadata["n_epochs_planned"])
        self._direct = self._open(DIRECT)
        self._conservative = self._open(CONSERVATIVE)
        self._epoch: int | None = None
        self._filled = 0

    def _open(self, name: str) -> np.memmap:
        path = self.directory / name
        try:
            array = np.lib.format.open_memmap(path, mode="r+")
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot open the error log for writing ({exc}); "
                             "it may be truncated: delete the run folder and start again") from exc
        if array.shape != (self.n_epochs, self.n_atoms) or array.dtype != np.float32:
            raise InputError(f"{path}: shape {array.shape} {array.dtype}, expected ({self.n_epochs}, {self.n_atoms}) "
                             "float32 as in error_log.json; the run folder belongs to another run: use a new run_dir")
        return array

    @classmethod
    def create(
        cls,
        directory: str | Path,
        *,
        run_id: str,
        n_epochs: int,
        structure_offsets: np.ndarray,
        numbers: np.ndarray,
        reference_force_norms: np.ndarray,
        training_files: list[dict[str, Any]],
        training_data_hash: str,
        extra: dict[str, Any] | None = None,
    ) -> "ErrorLogWriter":
        """Create a new error log for n_epochs epochs over the atoms described (norms in eV/Å)."""
        directory = Path(directory)
        offsets = np.asarray(structure_offsets, dtype=np.int64)
        n_atoms = int(offsets[-1])
        if len(numbers) != n_atoms or len(reference_force_norms) != n_atoms:
            raise ValueError(f"numbers ({len(numbers)}) and reference_force_norms ({len(reference_force_norms)}) "
                             f"must have one entry per atom ({n_atoms})")
        if n_epochs < 1 or n_atoms < 1:
            raise ValueError(f"an error log needs at least one epoch and one atom, got {n_epochs} and {n_atoms}")
        directory.mkdir(parents=True, exist_ok=True)
        _save_npy(directory / NUMBERS, np.asarray(numbers, dtype=np.int32))
        _save_npy(directory / REFERENCE_NORMS, np.asarray(reference_force_norms, dtype=np.float32))
        _save_npy(directory / OFFSETS, offsets)
        _create_memmap(directory / DIRECT, (n_epochs, n_atoms))
        _create_memmap(directory / CONSERVATIVE, (n_epochs, n_atoms))
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "run_id": run_id,
            "units": "eV/Å",
            "definition": "||F_pred,i - F_ref,i||_2 per training atom, model in eval mode without augmentation, "
                          "after each epoch's updates; global id = structure_offsets[structure] + atom index",
            "arrays": {"direct": DIRECT, "conservative": CONSERVATIVE, "atom_numbers": NUMBERS,
                       "reference_force_norms": REFERENCE_NORMS, "structure_offsets": OFFSETS},
            "training_files": training_files,
            "training_data_hash": training_data_hash,
            "n_atoms": n_atoms,
            "n_structures": int(len(offsets) - 1),
            "n_epochs_planned": int(n_epochs),
            "n_epochs_completed": 0,
            "model_fingerprints": [],
            **(extra or {}),
        }
        _write_json(directory / METADATA, metadata)
        return cls(directory, metadata)

    @classmethod
    def reopen(cls, directory: str | Path, *, run_id: str, epochs_completed: int) -> "ErrorLogWriter":
        """Reopen the log of a resumed run; the first epochs_completed rows are kept, later ones will be rewritten."""
        directory = Path(directory)
        metadata = _read_metadata(directory)
        _check_run(directory, metadata, run_id)
        logged = int(metadata.get("n_epochs_completed", 0))
        if logged < epochs_completed:
            raise InputError(f"{directory / METADATA}: only {logged} epochs logged but the training state has "
                             f"{epochs_completed}; the error log is behind the checkpoint: start a new run")
        writer = cls(directory, metadata)
        metadata["n_epochs_completed"] = epochs_completed
        metadata["model_fingerprints"] = list(metadata.get("model_fingerprints", []))[:epochs_completed]
        _write_json(directory / METADATA, metadata)
        return writer

    def begin_epoch(self, epoch_index: int) -> None:
        """Start writing row epoch_index (0-based)."""
        if not 0 <= epoch_index < self.n_epochs:
            raise ValueError(f"epoch index {epoch_index} outside the log's {self.n_epochs} planned epochs")
        self._epoch = epoch_index
        self._filled = 0

    def write(self, start: int, direct: np.ndarray, conservative: np.ndarray) -> None:
        """Write errors (eV/Å) of consecutive global atom ids start, start+1, ... into the current row."""
        stop = _chunk_stop(self._epoch, self._filled, self.n_atoms, start, len(direct), len(conservative))
        self._direct[self._epoch, start:stop] = direct
        self._conservative[self._epoch, start:stop] = conservative
        self._filled = stop

    def end_epoch(self, fingerprint: str) -> None:
        """Check that the row is complete and finite, flush it and record the epoch in the metadata."""
        if self._epoch is None:
            raise RuntimeError("call begin_epoch before end_epoch")
        if self._filled != self.n_atoms:
            raise ValueError(f"epoch {self._epoch + 1}: only {self._filled} of {self.n_atoms} atoms were written")
        for name, array in ((DIRECT, self._direct), (CONSERVATIVE, self._conservative)):
            bad = np.flatnonzero(~np.isfinite(array[self._epoch]))
            if len(bad):
                raise FloatingPointError(f"{self.directory / name}: epoch {self._epoch + 1} has non-finite errors "
                                         f"for atoms {bad[:10].tolist()}; the model diverged")
        self._flush()
        self.metadata["n_epochs_completed"] = self._epoch + 1
        self.metadata["model_fingerprints"] = list(self.metadata["model_fingerprints"])[: self._epoch] + [fingerprint]
        _write_json(self.directory / METADATA, self.metadata)
        self._epoch = None

    def _flush(self) -> None:
        self._direct.flush()
        self._conservative.flush()

    def close(self) -> None:
        """Flush and release the memory maps."""
        self._flush()
        del self._direct, self._conservative


class HistogramLogWriter:
    """Accumulates the compact (histogram) form of the log while training, one epoch at a time: per-atom counts of
    direct and conservative error norms (eV/Å) on fixed log-spaced bins, from epoch first_epoch on.

    After every epoch the folder holds a complete compact log of the epochs so far (error_histograms.npz written
    atomically, then error_log.json), so a run continued in another session carries a few MB, not a row per epoch.
    The .npz also keeps each atom's column of the last epoch (last_columns_<kind>) and that epoch's number
    (counted_epochs): a run killed between the log and its training state rolls the extra epoch back exactly.
    """

    def __init__(self, directory: Path, metadata: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.directory = Path(directory)
        self.metadata = metadata
        self.n_atoms = int(metadata["n_atoms"])
        self.n_epochs = int(metadata["n_epochs_planned"])
        self.first_epoch = int(metadata["histogram"]["first_epoch"])
        self.bins = HistogramBins(arrays["edges"])
        self._atom_arrays = {k: arrays[k] for k in ("atom_numbers", "reference_force_norms", "structure_offsets")}
        if "structure_frames" in arrays:
            self._atom_arrays["structure_frames"] = arrays["structure_frames"]
        self.counts = {kind: arrays[f"counts_{kind}"].astype(np.uint32) for kind in FORCE_KINDS}
        self.last = {kind: arrays[f"last_columns_{kind}"].astype(np.uint8) for kind in FORCE_KINDS}
        self._sums = {kind: 0.0 for kind in FORCE_KINDS}
        self._epoch: int | None = None
        self._filled = 0

    @classmethod
    def create(cls, directory: str | Path, *, run_id: str, n_epochs: int, skip_epochs: int, per_decade: int,
               structure_offsets: np.ndarray, numbers: np.ndarray, reference_force_norms: np.ndarray,
               training_files: list[dict[str, Any]], training_data_hash: str, structure_frames: np.ndarray | None = None,
               extra: dict[str, Any] | None = None) -> "HistogramLogWriter":
        """A new histogram log for n_epochs planned epochs, counting those after the first skip_epochs."""
        directory = Path(directory)
        offsets = np.asarray(structure_offsets, dtype=np.int64)
        n_atoms = int(offsets[-1])
        if len(numbers) != n_atoms or len(reference_force_norms) != n_atoms:
            raise ValueError(f"numbers ({len(numbers)}) and reference_force_norms ({len(reference_force_norms)}) "
                             f"must have one entry per atom ({n_atoms})")
        if not 0 <= skip_epochs < n_epochs or n_atoms < 1:
            raise ValueError(f"a histogram log needs 0 <= skip_epochs < n_epochs and atoms, got {skip_epochs}, "
                             f"{n_epochs}, {n_atoms}")
        bins = HistogramBins(log_edges(per_decade, *HISTOGRAM_RANGE))
        if bins.n_columns > 256:
            raise ValueError(f"{bins.n_columns} histogram columns do not fit the uint8 column of the last epoch")
        arrays: dict[str, np.ndarray] = {
            "atom_numbers": np.asarray(numbers, dtype=count_dtype(int(np.max(numbers)))),
            "reference_force_norms": _half(reference_force_norms),
            "structure_offsets": offsets, "edges": bins.edges,
        }
        if structure_frames is not None:
            arrays["structure_frames"] = np.asarray(structure_frames)
        for kind in FORCE_KINDS:
            arrays[f"counts_{kind}"] = np.zeros((n_atoms, bins.n_columns), dtype=np.uint32)
            arrays[f"last_columns_{kind}"] = np.zeros(n_atoms, dtype=np.uint8)
        metadata = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "form": HISTOGRAM, "run_id": run_id, "units": "eV/Å",
            "definition": "||F_pred,i - F_ref,i||_2 per training atom, model in eval mode without augmentation, "
                          "after each epoch's updates, counted per atom on log-spaced bins while training; global id "
                          "= structure_offsets[structure] + atom index",
            "arrays": {"histograms": HISTOGRAMS}, "training_files": training_files,
            "training_data_hash": training_data_hash, "n_atoms": n_atoms, "n_structures": int(len(offsets) - 1),
            "n_epochs_planned": int(n_epochs), "n_epochs_completed": 0, "model_fingerprints": [],
            "epochs_held": None, "final_epoch_mean_error": None,
            "histogram": {"edges_per_decade": per_decade, "range": list(HISTOGRAM_RANGE), "first_epoch": skip_epochs + 1,
                          "columns": "column 0: eps <= edges[0]; column j: edges[j-1] < eps <= edges[j]; last: eps > "
                                     "edges[-1]", "read_out": "p_i exact at every edge, log-linear inside a bin",
                          "written": "while training (error_log.form = histogram)"},
            **(extra or {}),
        }
        directory.mkdir(parents=True, exist_ok=True)
        writer = cls(directory, metadata, arrays)
        writer._save(0)
        return writer

    @classmethod
    def reopen(cls, directory: str | Path, *, run_id: str, epochs_completed: int) -> "HistogramLogWriter":
        """Reopen the log of a resumed run at epochs_completed (an epoch counted beyond it is rolled back)."""
        directory = Path(directory)
        metadata = _read_metadata(directory)
        _check_run(directory, metadata, run_id)
        path = directory / HISTOGRAMS
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
            counted = int(arrays["counted_epochs"])
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            raise InputError(f"{path}: unreadable histogram log ({exc}); the run cannot continue: start a new run") from exc
        first = int(metadata["histogram"]["first_epoch"])
        if not epochs_completed <= counted <= epochs_completed + 1:
            raise InputError(f"{path}: counts up to epoch {counted} but the training state has {epochs_completed}; "
                             "the error log does not belong to this state: start a new run")
        writer = cls(directory, metadata, arrays)
        if counted == epochs_completed + 1 and counted >= first:  # killed after the log, before the state: undo
            rows = np.arange(writer.n_atoms)
            for kind in FORCE_KINDS:
                writer.counts[kind][rows, writer.last[kind]] -= 1
        metadata["model_fingerprints"] = list(metadata.get("model_fingerprints", []))[:epochs_completed]
        writer._save(epochs_completed)
        return writer

    def begin_epoch(self, epoch_index: int) -> None:
        """Start counting epoch epoch_index (0-based); before first_epoch its errors are not counted."""
        if not 0 <= epoch_index < self.n_epochs:
            raise ValueError(f"epoch index {epoch_index} outside the log's {self.n_epochs} planned epochs")
        self._epoch, self._filled = epoch_index, 0
        self._sums = {kind: 0.0 for kind in FORCE_KINDS}

    def write(self, start: int, direct: np.ndarray, conservative: np.ndarray) -> None:
        """Count errors (eV/Å) of consecutive global atom ids start, start+1, ... for the current epoch."""
        stop = _chunk_stop(self._epoch, self._filled, self.n_atoms, start, len(direct), len(conservative))
        for kind, values in (("direct", direct), ("conservative", conservative)):
            values = np.asarray(values, dtype=np.float32)
            bad = np.flatnonzero(~np.isfinite(values))
            if len(bad):
                raise FloatingPointError(f"{self.directory / HISTOGRAMS}: epoch {self._epoch + 1} has non-finite "
                                         f"{kind} errors for atoms {(start + bad[:10]).tolist()}; the model diverged")
            self._sums[kind] += float(values.sum(dtype=np.float64))
            if self._epoch + 1 >= self.first_epoch:
                columns = self.bins.column(values)
                self.counts[kind][np.arange(start, stop), columns] += 1
                self.last[kind][start:stop] = columns
        self._filled = stop

    def end_epoch(self, fingerprint: str) -> None:
        """Check that the epoch is complete, save the counts and record the epoch in the metadata."""
        if self._epoch is None:
            raise RuntimeError("call begin_epoch before end_epoch")
        if self._filled != self.n_atoms:
            raise ValueError(f"epoch {self._epoch + 1}: only {self._filled} of {self.n_atoms} atoms were written")
        done = self._epoch + 1
        self.metadata["model_fingerprints"] = list(self.metadata["model_fingerprints"])[: self._epoch] + [fingerprint]
        if done >= self.first_epoch:
            self.metadata["final_epoch_mean_error"] = {k: self._sums[k] / self.n_atoms for k in FORCE_KINDS}
        self._save(done)
        self._epoch = None

    def _save(self, done: int) -> None:
        counted = max(0, done - self.first_epoch + 1)
        arrays = dict(self._atom_arrays)
        for kind in FORCE_KINDS:
            arrays[f"counts_{kind}"] = self.counts[kind].astype(count_dtype(max(counted, 1)))
            arrays[f"edges_{kind}"] = self.bins.edges
            arrays[f"last_columns_{kind}"] = self.last[kind]
        arrays["edges"] = self.bins.edges
        arrays["counted_epochs"] = np.asarray(done)
        _save_npz(self.directory / HISTOGRAMS, arrays)
        self.metadata["n_epochs_completed"] = done
        self.metadata["epochs_held"] = [self.first_epoch, done] if counted else None
        _write_json(self.directory / METADATA, self.metadata)

    def close(self) -> None:
        """Nothing to release (the counts are saved after every epoch)."""


#: what a training run writes its per-atom errors into (the full or the histogram form)
LogWriter = ErrorLogWriter | HistogramLogWriter


def reopen_log_writer(directory: str | Path, *, run_id: str, epochs_completed: int) -> LogWriter:
    """The writer of an existing log, of the form it was created in, continuing after epochs_completed."""
    kind = HistogramLogWriter if _read_metadata(Path(directory)).get("form") == HISTOGRAM else ErrorLogWriter
    return kind.reopen(directory, run_id=run_id, epochs_completed=epochs_completed)


@dataclass
class ErrorLog:
    """A read-only error log of either form: atom metadata, the JSON metadata and, per kind, the completed epoch
    rows (full form, eV/Å, memory-mapped) or the per-atom counts on log-spaced bins (histogram form)."""

    directory: Path
    atom_numbers: np.ndarray
    reference_force_norms: np.ndarray
    structure_offsets: np.ndarray
    metadata: dict[str, Any]
    trajectories: dict[str, np.ndarray] = field(default_factory=dict)
    binned: dict[str, BinnedErrors] = field(default_factory=dict)
    structure_frames: np.ndarray | None = None  # (n_structures, 2) training-file number and frame, when recorded
    first_epoch: int = 1  # training epoch (1-based) of the first epoch held

    @property
    def form(self) -> str:
        """'full' (every epoch's errors) or 'histogram' (per-atom counts)."""
        return HISTOGRAM if self.binned else FULL

    @property
    def n_epochs(self) -> int:
        """Number of epochs held (completed epochs for a full log)."""
        held = self.binned or self.trajectories
        run = next(iter(held.values()))
        return int(run.n_epochs if isinstance(run, BinnedErrors) else run.shape[0])

    @property
    def n_atoms(self) -> int:
        """Number of training atoms."""
        return int(len(self.atom_numbers))

    @property
    def epochs(self) -> tuple[int, int]:
        """First and last training epoch held (1-based, inclusive)."""
        return self.first_epoch, self.first_epoch + self.n_epochs - 1

    @property
    def errors_direct(self) -> np.ndarray:
        """Direct-force error norms (completed epochs, atoms) in eV/Å; full form only."""
        return self._exact("direct")

    @property
    def errors_conservative(self) -> np.ndarray:
        """Conservative-force error norms (completed epochs, atoms) in eV/Å; full form only."""
        return self._exact("conservative")

    def _exact(self, kind: str) -> np.ndarray:
        if kind not in self.trajectories:
            source = self.metadata.get("compacted_from")
            raise InputError(f"{self.directory}: a compact (histogram) error log holds per-atom counts, not every "
                             "epoch's errors; " + (f"use the full log it was made from ({source})" if source else
                                                    "the run counted them while training (error_log.form = histogram)"))
        return self.trajectories[kind]

    def distribution(self, kind: str, skip_epochs: int | None = None) -> ErrorDistribution:
        """The errors of one kind (direct or conservative) over the epochs after the first skip_epochs training
        epochs (None: every epoch held), for LTAU. A compact log gives only the epochs it holds."""
        if kind not in FORCE_KINDS:
            raise InputError(f"unknown error kind {kind!r}; use direct or conservative")
        first, last = self.epochs
        if self.form == HISTOGRAM:
            if skip_epochs is not None and skip_epochs != first - 1:
                raise InputError(
                    f"{self.directory}: a compact error log holding epochs {first}-{last} only (counts, not single "
                    f"epochs), so it cannot give the epochs after {skip_epochs} (--skip-epochs {skip_epochs}); omit "
                    f"--skip-epochs or give --skip-epochs {first - 1}, or use the full log it was made from")
            return self.binned[kind]
        skip = skip_epochs or 0
        if skip >= self.n_epochs:
            raise InputError(f"{self.directory}: skip_epochs = {skip} leaves none of its {self.n_epochs} epochs")
        return ErrorTrajectory(self.trajectories[kind][skip:])

    def global_ids(self, structure: int | np.ndarray, atom: int | np.ndarray) -> np.ndarray:
        """Global atom ids of (structure index, atom index) pairs in training-set order."""
        return self.structure_offsets[np.asarray(structure)] + np.asarray(atom)


def _read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / METADATA
    if not path.is_file():
        raise InputError(f"{path}: not found; {directory} is not an error-log folder (it is <run_dir>/error_log)")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable error-log metadata ({exc}); the file is damaged") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise InputError(f"{path}: not an atomuq error-log metadata file (format {metadata.get('format')!r})")
    if int(metadata.get("format_version", 1)) > FORMAT_VERSION or metadata.get("form", FULL) not in (FULL, HISTOGRAM):
        raise InputError(f"{path}: error-log format version {metadata.get('format_version')}, form "
                         f"{metadata.get('form')!r} is newer than this atomuq reads; upgrade atomuq")
    return metadata


def _load_array(path: Path, shape: tuple[int, ...], what: str, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path}: missing ({what}); the error log is incomplete")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: truncated or corrupt ({what}, expected shape {shape}): {exc}") from exc
    if array.shape != shape:
        raise InputError(f"{path}: shape {array.shape}, expected {shape} from {METADATA} ({what}); "
                         "the file is truncated or from another run")
    return array


def _check_offsets(where: Path, offsets: np.ndarray, n_atoms: int) -> None:
    if offsets[0] != 0 or offsets[-1] != n_atoms or (np.diff(offsets) <= 0).any():
        raise InputError(f"{where}: offsets must rise from 0 to n_atoms = {n_atoms}")


def load_error_log(directory: str | Path, check_finite: bool = True) -> ErrorLog:
    """Open an error log of either form read-only (errors in eV/Å; a full log memory-mapped), validating every
    file's shape.

    Raises InputError naming the file when a file is missing, truncated or of the wrong shape,
    when no epoch has been logged yet, or (check_finite) when a completed row holds NaN.
    """
    directory = Path(directory)
    meta = _read_metadata(directory)
    try:
        n_atoms, planned, done = int(meta["n_atoms"]), int(meta["n_epochs_planned"]), int(meta["n_epochs_completed"])
        n_structures = int(meta["n_structures"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{directory / METADATA}: missing or invalid size field ({exc})") from exc
    if not 0 <= done <= planned:
        raise InputError(f"{directory / METADATA}: n_epochs_completed = {done} outside 0..{planned}")
    if meta.get("form", FULL) == HISTOGRAM:
        return _load_histogram_log(directory, meta, n_atoms, n_structures, done)
    if done == 0:
        raise InputError(f"{directory / DIRECT}: the error log is empty (0 of {planned} epochs logged); "
                         "train for at least one epoch first")
    direct = _load_array(directory / DIRECT, (planned, n_atoms), "direct-force errors", mmap=True)
    conservative = _load_array(directory / CONSERVATIVE, (planned, n_atoms), "conservative-force errors", mmap=True)
    numbers = _load_array(directory / NUMBERS, (n_atoms,), "atomic numbers", mmap=False)
    norms = _load_array(directory / REFERENCE_NORMS, (n_atoms,), "reference force norms", mmap=False)
    offsets = _load_array(directory / OFFSETS, (n_structures + 1,), "structure offsets", mmap=False)
    _check_offsets(directory / OFFSETS, offsets, n_atoms)
    direct, conservative = direct[:done], conservative[:done]
    if check_finite:
        for name, array in ((DIRECT, direct), (CONSERVATIVE, conservative)):
            finite = np.isfinite(array).all(axis=1)
            if not finite.all():
                epoch = int(np.flatnonzero(~finite)[0]) + 1
                raise InputError(f"{directory / name}: epoch {epoch} of {done} logged epochs holds NaN or infinite "
                                 "values; the file was damaged or the run was interrupted while writing it")
    frames_file = directory / str(meta.get("structure_frames", FRAMES))
    frames = _load_array(frames_file, (n_structures, 2), "structure frames", mmap=False) if frames_file.is_file() else None
    return ErrorLog(directory, numbers, norms, offsets, meta, trajectories={"direct": direct, "conservative": conservative},
                    structure_frames=frames)


def _load_histogram_log(directory: Path, meta: dict[str, Any], n_atoms: int, n_structures: int, done: int) -> ErrorLog:
    """The histogram form (error_histograms.npz), every array checked against the metadata."""
    path = directory / str((meta.get("arrays") or {}).get("histograms", HISTOGRAMS))
    if not path.is_file():
        raise InputError(f"{path}: missing (per-atom error histograms); the compact error log is incomplete")
    if meta.get("epochs_held", ()) is None:
        first = (meta.get("histogram") or {}).get("first_epoch")
        raise InputError(f"{directory / METADATA}: the error log holds no epoch yet ({done} trained; it counts from "
                         f"epoch {first}); train further first")
    try:
        first, last = (int(e) for e in meta["epochs_held"])
        finals = {kind: float(meta["final_epoch_mean_error"][kind]) for kind in FORCE_KINDS}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{directory / METADATA}: missing or invalid compact-log field ({exc})") from exc
    if not 1 <= first <= last == done:
        raise InputError(f"{directory / METADATA}: epochs_held {first}-{last} must end at the last completed epoch "
                         f"{done}; the file is damaged")
    shapes = {"atom_numbers": (n_atoms,), "reference_force_norms": (n_atoms,), "structure_offsets": (n_structures + 1,)}
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in (*shapes, *(f"{p}_{k}" for k in FORCE_KINDS for p in ("counts", "edges")))
                       if k not in data.files]
            if missing:
                raise InputError(f"{path}: not a complete compact error log (missing {', '.join(missing)})")
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: unreadable compact error log, truncated or not an .npz file ({exc})") from exc
    for key, shape in shapes.items():
        if arrays[key].shape != shape:
            raise InputError(f"{path}: {key} of shape {arrays[key].shape}, expected {shape} from {METADATA}; "
                             "the file is from another run")
    _check_offsets(path, arrays["structure_offsets"], n_atoms)
    binned = {}
    for kind in FORCE_KINDS:
        try:
            bins = HistogramBins(arrays[f"edges_{kind}"])
            if arrays[f"counts_{kind}"].shape[0] != n_atoms:
                raise ValueError(f"{arrays[f'counts_{kind}'].shape[0]} rows of counts for {n_atoms} atoms")
            binned[kind] = BinnedErrors(arrays[f"counts_{kind}"], bins, finals[kind])
        except ValueError as exc:
            raise InputError(f"{path}: {kind} histograms are inconsistent ({exc}); the file is damaged") from exc
        if binned[kind].n_epochs != last - first + 1:
            raise InputError(f"{path}: {kind} histograms count {binned[kind].n_epochs} epochs per atom, the metadata "
                             f"says epochs {first}-{last}; the file is damaged")
    frames = arrays.get("structure_frames")
    if frames is not None and frames.shape != (n_structures, 2):
        raise InputError(f"{path}: structure_frames of shape {frames.shape}, expected ({n_structures}, 2)")
    return ErrorLog(directory, arrays["atom_numbers"].astype(np.int32), arrays["reference_force_norms"].astype(np.float32),
                    arrays["structure_offsets"], meta, binned=binned, structure_frames=frames, first_epoch=first)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays atomically as an .npz with bzip2-compressed members (np.load reads it; ~30 % smaller than
    np.savez_compressed's deflate on histogram counts)."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_BZIP2, compresslevel=9) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def _half(values: np.ndarray) -> np.ndarray:
    """float16 (relative precision 5e-4, half the bytes) where every value fits, else float32."""
    values = np.asarray(values, dtype=np.float32)
    return values.astype(np.float16) if np.isfinite(values).all() and np.abs(values).max() < 6e4 else values


def compact_error_log(source: str | Path, output: str | Path, *, skip_epochs: int = 0,
                      per_decade: int = EDGES_PER_DECADE) -> ErrorLog:
    """Write the compact (histogram) form of a full error log into the folder output and return it loaded.

    It holds the epochs after the first skip_epochs, as per-atom counts (direct and conservative errors) on
    per_decade log-spaced edges per decade from 1e-3 to 1e2 eV/Å plus each kind's mean final-epoch error.
    """
    log = load_error_log(source)
    output = Path(output)
    if log.form != FULL:
        raise InputError(f"{log.directory}: already a compact (histogram) error log; compact the full log "
                         f"({log.metadata.get('compacted_from')})")
    if output.resolve() == log.directory.resolve() or (output / DIRECT).exists() or (output / CONSERVATIVE).exists():
        raise InputError(f"-o {output}: holds a full error log, which the compact one would replace; "
                         "choose another folder")
    if not 1 <= per_decade <= 100:
        raise InputError(f"--bins-per-decade {per_decade}: give 1 to 100 edges per decade (10: 26 % wide bins)")
    runs = {kind: log.distribution(kind, skip_epochs) for kind in FORCE_KINDS}
    grid = HistogramBins(log_edges(per_decade, *HISTOGRAM_RANGE))
    arrays: dict[str, np.ndarray] = {
        "atom_numbers": log.atom_numbers.astype(count_dtype(int(log.atom_numbers.max()))),
        "reference_force_norms": _half(log.reference_force_norms),
        "structure_offsets": np.asarray(log.structure_offsets, dtype=np.int64),
    }
    if log.structure_frames is not None:
        arrays["structure_frames"] = log.structure_frames
    finals = {}
    for kind, run in runs.items():
        finals[kind] = run.final_mean_error
        bins = with_edges(grid, [finals[kind]])
        arrays[f"counts_{kind}"] = run.histogram(
            bins, out=np.zeros((log.n_atoms, bins.n_columns), dtype=count_dtype(run.n_epochs)))
        arrays[f"edges_{kind}"] = bins.edges
    first, last = skip_epochs + 1, log.n_epochs
    meta = {key: value for key, value in log.metadata.items() if key not in ("arrays", "structure_frames")}
    meta.update(
        form=HISTOGRAM, arrays={"histograms": HISTOGRAMS}, epochs_held=[first, last],
        final_epoch_mean_error=finals,
        histogram={"edges_per_decade": per_decade, "range": list(HISTOGRAM_RANGE),
                   "columns": "column 0: eps <= edges[0]; column j: edges[j-1] < eps <= edges[j]; last: eps > "
                              "edges[-1]; each kind's edges also hold its final_epoch_mean_error (the default atol)",
                   "read_out": "p_i exact at every edge, log-linear inside a bin"},
        compacted_from=str(log.directory),
        compacted=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        compacted_by=f"atomuq {atomuq.__version__}",
    )
    output.mkdir(parents=True, exist_ok=True)
    _save_npz(output / HISTOGRAMS, arrays)
    _write_json(output / METADATA, meta)
    return load_error_log(output)
