"""Files of a labelling or sampling run: OUTPUT.partial (append-only finished frames), OUTPUT.failures.jsonl.

Every finished frame is appended to OUTPUT.partial at once, in one write, so a killed run keeps all
of them (an incomplete last frame is cut off on the next load); frames carry a fingerprint of the
structure they came from (structure_hash) so a rerun only resumes work for the same input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from ase import Atoms
from ase.io import read, write

from atomuq.core.errors import InputError
from atomuq.core.io import atomic_path, write_structures


def partial_path(output: str | Path) -> Path:
    """Where unfinished work for `output` is kept: OUTPUT.partial."""
    return Path(str(output) + ".partial")


def failures_path(output: str | Path) -> Path:
    """The failure log beside `output`: OUTPUT.failures.jsonl (one JSON object per failed frame)."""
    return Path(str(output) + ".failures.jsonl")


def structure_hash(atoms: Atoms, *extra: Any) -> str:
    """A fingerprint string of numbers, positions, cell and pbc (plus `extra` values), to match resumed frames."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(atoms.numbers, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(atoms.positions, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(atoms.cell.array, dtype=np.float64).tobytes())
    h.update(np.asarray(atoms.pbc, dtype=bool).tobytes())
    for value in extra:
        h.update(repr(value).encode())
    return "h" + h.hexdigest()[:24]  # the letter keeps extxyz from reading it as a number


class PartialFrames:
    """An append-only extended XYZ file: each frame is written whole and flushed, so a killed run keeps every finished frame."""

    def __init__(self, path: str | Path, fsync_interval: float = 1.0) -> None:
        self.path = Path(path)
        self.fsync_interval = fsync_interval
        self._fh: io.TextIOBase | None = None
        self._last_sync = 0.0

    def load(self, log: Callable[[str], None] | None = None) -> list[Atoms]:
        """Every complete frame in the file; an incomplete last frame (killed while writing) is cut off."""
        if not self.path.exists():
            return []
        if not self.path.is_file():
            raise InputError(f"{self.path}: the unfinished-work file is not a regular file; remove it to start over")
        data = self.path.read_bytes()
        good = _complete_prefix(data)
        if good < len(data):
            if log:
                log(f"{self.path}: dropped an incomplete last frame ({len(data) - good} bytes, interrupted while "
                    "writing); that structure is done again")
            with open(self.path, "r+b") as fh:
                fh.truncate(good)
        if good == 0:
            return []
        try:
            frames = read(io.StringIO(data[:good].decode("utf-8")), index=":", format="extxyz")
        except Exception as exc:
            raise InputError(f"{self.path}: cannot read the unfinished-work file ({type(exc).__name__}: {exc}); "
                             "delete it to start over") from exc
        return list(frames)

    def rewrite(self, frames: Sequence[Atoms]) -> None:
        """Replace the file's content by `frames` atomically (used to drop unusable frames on resume)."""
        self.close()
        if frames:
            write_structures(self.path, frames)
        elif self.path.exists():
            self.path.unlink()

    def append(self, atoms: Atoms) -> None:
        """Append one frame in a single write and flush it (fsync at most every fsync_interval seconds)."""
        buf = io.StringIO()
        write(buf, atoms, format="extxyz")
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(buf.getvalue())
        self._fh.flush()
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_interval:
            os.fsync(self._fh.fileno())
            self._last_sync = now

    def close(self) -> None:
        """Flush, sync and close the file."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        """Close and delete the file (after the final output is in place)."""
        self.close()
        if self.path.exists():
            self.path.unlink()


def _complete_prefix(data: bytes) -> int:
    """Length in bytes of the run of complete extended XYZ frames at the start of `data`."""
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    starts = np.concatenate([[0], newlines + 1])  # start offset of every line
    line, good = 0, 0
    while line < len(newlines):
        try:
            natoms = int(data[starts[line]:newlines[line]])
        except ValueError:
            break
        last = line + natoms + 1  # the comment line, then natoms atom lines
        if last >= len(newlines):
            break
        good = int(newlines[last]) + 1
        line = last + 1
    return good


def write_failures(path: str | Path, failures: Sequence[Any]) -> Path | None:
    """Write failure records (dataclasses) as JSON lines atomically; with none, remove a stale log and return None."""
    path = Path(path)
    if not failures:
        if path.exists():
            path.unlink()
        return None
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for f in failures:
            fh.write(json.dumps(dataclasses.asdict(f)) + "\n")
    return path
