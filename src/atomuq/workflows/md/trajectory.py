"""Crash-safe MD trajectories, frames appended and fsynced one at a time: extended XYZ or ASE .traj.

Each frame holds positions (Å), momenta (amu Å / ASE time unit, so resuming restores the
velocities exactly), the forces that moved the atoms (eV/Å) and the potential energy (eV) the
ASE way (`ase.io.read(frame).get_potential_energy()` and `.get_forces()` work), and in its info
the step, time (fs), energies epot/ekin/etot (eV), temperature (K), the monitored UQ values and
a base64 JSON `md_state` with what the integrator needs beyond positions and momenta
(thermostat variables, random stream, force mode after a rollback).

Extended XYZ (.extxyz, .xyz): numbers with 17 significant digits, so a resumed run starts from
bit-identical positions and momenta. A frame is complete when all its N + 2 lines end in a
newline; a half-written last frame (a run killed while writing) is detected and cut off on
--resume. ASE trajectory (.traj, ase.io.Trajectory appended): binary doubles; a frame counts
once ASE's item counter is updated, which is written last, so a half-written frame is never read.
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
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import Trajectory, read

from atomuq.core.errors import InputError

#: output name endings and the trajectory format each one writes
TRAJECTORY_SUFFIXES = {".extxyz": "extxyz", ".xyz": "extxyz", ".traj": "traj"}


def trajectory_format(path: str | Path, strict: bool = True) -> str:
    """'extxyz' or 'traj' from the file name; InputError for another ending when strict (else extxyz)."""
    path = Path(path)
    fmt = TRAJECTORY_SUFFIXES.get(path.suffix.lower())
    if fmt is None and strict:
        raise InputError(
            f"{path}: MD trajectories are written as extended XYZ (.extxyz, .xyz) or ASE trajectories (.traj), "
            f"appended frame by frame; {path.suffix or 'a name without an ending'} is neither"
            + (" (compressed files cannot be appended)" if path.suffix.lower() in (".gz", ".xz", ".bz2") else "")
        )
    return fmt or "extxyz"


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
    if "\n" in text:
        raise ValueError(f"info value {text!r} spans lines; extended XYZ cannot hold it")
    if text and not any(c in text for c in ' ="\\'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'  # extended XYZ quoting


def frame_text(atoms: Atoms, info: dict, forces: np.ndarray | None = None, energy: float | None = None) -> str:
    """One extended XYZ frame (positions, momenta, forces) with `info` (and energy, eV, read by ASE into its
    SinglePointCalculator) in the comment line, full precision."""
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
    if energy is not None:
        header.append(f"energy={_value(float(energy))}")
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

    def write(self, atoms: Atoms, info: dict, forces: np.ndarray | None = None, energy: float | None = None) -> None:
        """Append one frame (forces eV/Å, energy eV) and make it durable."""
        self._file.write(frame_text(atoms, info, forces, energy))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file (frames are already on disk)."""
        self._file.close()


class TrajFrameWriter:
    """Appends frames to an ASE trajectory (ase.io.Trajectory); every frame is fsynced before write() returns."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._traj = Trajectory(str(self.path), "a" if append else "w")

    def write(self, atoms: Atoms, info: dict, forces: np.ndarray | None = None, energy: float | None = None) -> None:
        """Append one frame: positions, momenta, cell, info, and energy (eV) / forces (eV/Å) as calculator results."""
        frame = atoms.copy()
        frame.info = dict(info)
        results = {k: v for k, v in (("energy", energy), ("forces", forces)) if v is not None}
        frame.calc = SinglePointCalculator(frame, **results) if results else None
        self._traj.write(frame)
        fd = self._traj.backend.fd
        fd.flush()
        os.fsync(fd.fileno())

    def close(self) -> None:
        """Close the file (frames are already on disk)."""
        self._traj.close()


def open_frame_writer(path: str | Path, append: bool = False) -> FrameWriter | TrajFrameWriter:
    """The writer for the trajectory format the name asks for (trajectory_format)."""
    return TrajFrameWriter(path, append) if trajectory_format(path) == "traj" else FrameWriter(path, append)


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
    """Read every complete frame of an MD trajectory (.traj: ASE trajectory; else extended XYZ);
    a half-written last frame is reported, not read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: trajectory not found")
    if trajectory_format(path, strict=False) == "traj":
        return _scan_traj(path)
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
    try:
        text = raw[:end].decode("utf-8")
        frames = read(io.StringIO(text), index=":", format="extxyz") if text else []
    except Exception as exc:  # ase.io raises many exception types for malformed files
        raise InputError(f"{path}: not a readable extended XYZ trajectory ({type(exc).__name__}: {exc})") from exc
    return TrajectoryScan(
        frames=frames, complete_bytes=end, dropped_lines=dropped, total_bytes=len(raw)
    )


#: bytes of an ASE trajectory file before its first frame (ULM header)
_TRAJ_HEADER_BYTES = 48


def _scan_traj(path: Path) -> TrajectoryScan:
    """The frames of an ASE trajectory; an empty or header-only file (a run killed at once) has none."""
    size = path.stat().st_size
    try:
        with Trajectory(str(path)) as traj:
            frames = [traj[i] for i in range(len(traj))]
    except Exception as exc:  # ase.io.ulm raises several types on damaged files
        if size <= _TRAJ_HEADER_BYTES:
            frames = []
        else:
            raise InputError(f"{path}: cannot read as an ASE trajectory ({type(exc).__name__}: {exc})") from exc
    return TrajectoryScan(frames=frames, complete_bytes=size, dropped_lines=0, total_bytes=size)


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
