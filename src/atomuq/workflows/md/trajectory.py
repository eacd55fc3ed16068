"""Crash-safe MD trajectories: extended XYZ frames appended, flushed and fsynced one at a time.

Each frame holds positions (Å), momenta (amu Å / ASE time unit, so resuming restores the
velocities exactly), the forces that moved the atoms (eV/Å) and, in the comment line, the step,
time (fs), energies (eV), temperature (K), the monitored UQ values and a base64 JSON `md_state`
with what the integrator needs beyond positions and momenta (thermostat variables, random
stream, force mode after a rollback). Numbers are written with 17 significant digits, so a
resumed run starts from bit-identical positions and momenta. A frame is complete when all its
N + 2 lines end in a newline; a half-written last frame (a run killed while writing) is
detected and cut off on --resume.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read

from atomuq.core.errors import InputError


def encode_state(state: dict) -> str:
    """A JSON-able dict as one base64 token (safe in an extxyz comment line)."""
    return (
        base64.urlsafe_b64encode(json.dumps(state, sort_keys=True).encode())
        .decode()
        .rstrip("=")
    )


def decode_state(token: str) -> dict:
    """Inverse of encode_state."""
    padded = token + "=" * (-len(token) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode()).decode())


def _value(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "T" if v else "F"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    text = str(v)
    if not text or any(c in text for c in ' ="\n'):
        raise ValueError(f"info value {text!r} cannot be written unquoted")
    return text


def frame_text(atoms: Atoms, info: dict, forces: np.ndarray | None = None) -> str:
    """One extended XYZ frame (positions, momenta, forces) with `info` in the comment line, full precision."""
    n = len(atoms)
    cols = [atoms.get_positions(), atoms.get_momenta()]
    props = "species:S:1:pos:R:3:momenta:R:3"
    if forces is not None:
        cols.append(np.asarray(forces, dtype=float))
        props += ":forces:R:3"
    header = []
    if atoms.cell.rank > 0:
        header.append(
            'Lattice="'
            + " ".join(repr(float(x)) for x in atoms.cell.array.ravel())
            + '"'
        )
    header.append(f"Properties={props}")
    header += [f"{k}={_value(v)}" for k, v in info.items()]
    header.append('pbc="' + " ".join("T" if b else "F" for b in atoms.pbc) + '"')
    data = np.hstack(cols)
    lines = [str(n), " ".join(header)]
    symbols = atoms.get_chemical_symbols()
    lines += [
        s + " " + " ".join(f"{x:.16e}" for x in row) for s, row in zip(symbols, data)
    ]
    return "\n".join(lines) + "\n"


class FrameWriter:
    """Appends frames to an extxyz file; every frame is flushed and fsynced before write() returns."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 (kept open for appends)

    def write(self, atoms: Atoms, info: dict, forces: np.ndarray | None = None) -> None:
        """Append one frame and make it durable."""
        self._file.write(frame_text(atoms, info, forces))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file (frames are already on disk)."""
        self._file.close()


@dataclass
class TrajectoryScan:
    """What scan_trajectory found: the complete frames, where they end, and what was cut off."""

    frames: list[Atoms]
    complete_bytes: int
    dropped_lines: int
    total_bytes: int

    @property
    def truncated(self) -> bool:
        """True if a half-written frame follows the complete ones."""
        return self.complete_bytes < self.total_bytes


def scan_trajectory(path: str | Path) -> TrajectoryScan:
    """Read every complete frame of an MD trajectory; a half-written last frame is reported, not read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: trajectory not found")
    raw = path.read_bytes()
    lines = raw.splitlines(keepends=True)
    pos = end = 0
    i = 0
    while i < len(lines):
        head = lines[i]
        try:
            n = int(head.strip())
        except ValueError:
            if not head.endswith(b"\n"):
                break
            raise InputError(
                f"{path}: line {i + 1} should start a frame with an atom count, got {head[:40]!r}"
            ) from None
        block = lines[i : i + n + 2]
        if len(block) < n + 2 or not block[-1].endswith(b"\n"):
            break
        pos += sum(len(x) for x in block)
        end = pos
        i += n + 2
    dropped = len(lines) - i
    text = raw[:end].decode("utf-8")
    frames = read(io.StringIO(text), index=":", format="extxyz") if text else []
    return TrajectoryScan(
        frames=frames, complete_bytes=end, dropped_lines=dropped, total_bytes=len(raw)
    )


def cut_partial_frame(path: str | Path, scan: TrajectoryScan) -> str | None:
    """Truncate a half-written last frame in place; returns a message saying what was dropped, or None."""
    if not scan.truncated:
        return None
    with open(path, "r+b") as fh:
        fh.truncate(scan.complete_bytes)
        fh.flush()
        os.fsync(fh.fileno())
    return (
        f"{path}: dropped a half-written last frame ({scan.dropped_lines} lines, "
        f"{scan.total_bytes - scan.complete_bytes} bytes) after {len(scan.frames)} complete frames"
    )


class LineLog:
    """An append-only text log and its JSON-lines twin (PATH.jsonl), flushed per entry."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._text = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 (kept open for appends)
        self._json = open(  # noqa: SIM115
            self.path.with_suffix(self.path.suffix + ".jsonl"),
            "a" if append else "w",
            encoding="utf-8",
        )

    def write(self, line: str, record: dict | None = None, sync: bool = True) -> None:
        """Append one human-readable line (and its JSON record); flushed, and fsynced if sync."""
        self._text.write(line.rstrip("\n") + "\n")
        if record is not None:
            self._json.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        self._text.flush()
        self._json.flush()
        if sync:
            self.sync()

    def sync(self) -> None:
        """fsync both files (flushed lines survive a killed process; fsync also a power cut)."""
        os.fsync(self._text.fileno())
        os.fsync(self._json.fileno())

    def close(self) -> None:
        """Close both files."""
        self._text.close()
        self._json.close()
