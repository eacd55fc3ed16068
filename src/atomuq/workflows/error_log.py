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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from atomuq.core.errors import InputError
from atomuq.core.io import atomic_path

FORMAT = "atomuq-error-log"
FORMAT_VERSION = 1
METADATA = "error_log.json"
DIRECT = "errors_direct.npy"
CONSERVATIVE = "errors_conservative.npy"
NUMBERS = "atom_numbers.npy"
REFERENCE_NORMS = "reference_force_norms.npy"
OFFSETS = "structure_offsets.npy"


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
        if metadata.get("run_id") != run_id:
            raise InputError(f"{directory / METADATA}: belongs to run {metadata.get('run_id')!r}, not {run_id!r}; "
                             "the run folder was mixed up: use a new run_dir")
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
        if self._epoch is None:
            raise RuntimeError("call begin_epoch before write")
        if start != self._filled:
            raise ValueError(f"atoms must be written in order: expected start {self._filled}, got {start}")
        stop = start + len(direct)
        if len(conservative) != len(direct) or stop > self.n_atoms:
            raise ValueError(f"chunk [{start}, {stop}) does not fit the log's {self.n_atoms} atoms")
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


@dataclass
class ErrorLog:
    """A read-only error log: completed epoch rows only (eV/Å), atom metadata and the JSON metadata."""

    directory: Path
    errors_direct: np.ndarray
    errors_conservative: np.ndarray
    atom_numbers: np.ndarray
    reference_force_norms: np.ndarray
    structure_offsets: np.ndarray
    metadata: dict[str, Any]

    @property
    def n_epochs(self) -> int:
        """Number of completed (logged) epochs."""
        return int(self.errors_direct.shape[0])

    @property
    def n_atoms(self) -> int:
        """Number of training atoms."""
        return int(self.errors_direct.shape[1])

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


def load_error_log(directory: str | Path, check_finite: bool = True) -> ErrorLog:
    """Open an error log read-only (errors in eV/Å, memory-mapped), validating every file's shape.

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
    if done == 0:
        raise InputError(f"{directory / DIRECT}: the error log is empty (0 of {planned} epochs logged); "
                         "train for at least one epoch first")
    direct = _load_array(directory / DIRECT, (planned, n_atoms), "direct-force errors", mmap=True)
    conservative = _load_array(directory / CONSERVATIVE, (planned, n_atoms), "conservative-force errors", mmap=True)
    numbers = _load_array(directory / NUMBERS, (n_atoms,), "atomic numbers", mmap=False)
    norms = _load_array(directory / REFERENCE_NORMS, (n_atoms,), "reference force norms", mmap=False)
    offsets = _load_array(directory / OFFSETS, (n_structures + 1,), "structure offsets", mmap=False)
    if offsets[0] != 0 or offsets[-1] != n_atoms or (np.diff(offsets) <= 0).any():
        raise InputError(f"{directory / OFFSETS}: offsets must rise from 0 to n_atoms = {n_atoms}")
    direct, conservative = direct[:done], conservative[:done]
    if check_finite:
        for name, array in ((DIRECT, direct), (CONSERVATIVE, conservative)):
            finite = np.isfinite(array).all(axis=1)
            if not finite.all():
                epoch = int(np.flatnonzero(~finite)[0]) + 1
                raise InputError(f"{directory / name}: epoch {epoch} of {done} logged epochs holds NaN or infinite "
                                 "values; the file was damaged or the run was interrupted while writing it")
    return ErrorLog(directory, direct, conservative, numbers, norms, offsets, meta)
