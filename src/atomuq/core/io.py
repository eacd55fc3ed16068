"""Reading and writing structures (extended XYZ through ase.io) and reference labels."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import lzma
import os
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from ase import Atoms
from ase.io import read, write

from atomuq.core.errors import InputError
from atomuq.core.schema import carries_prediction, upgrade, written_by_atomuq

REFERENCE_PREFIX = "REF_"


@dataclass
class Record:
    """One input structure and where it came from (file and 0-based index in it)."""

    atoms: Atoms
    source: str
    index: int

    @property
    def where(self) -> str:
        """Human-readable location used in every error message."""
        return f"{self.source} structure {self.index}"


_OPENERS: dict[str, Callable[[Path], Any]] = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


def _read_frames(path: Path, index: str) -> Atoms | list[Atoms]:
    """ase.io.read, with a compressed (extended) XYZ file decompressed into memory first: ASE seeks back in the
    file for every frame, and each backward seek in a compressed stream starts decompressing from the top again
    (measured: 1,122 frames of a .extxyz.gz in 54 s, 4.0 s from memory; 18,873 frames would take hours)."""
    opener = _OPENERS.get(path.suffix.lower())
    inner = Path(path.stem).suffix.lower()
    if opener is None or inner not in (".xyz", ".extxyz"):
        return read(path, index=index)
    with opener(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    return read(io.StringIO(text), index=index, format="extxyz")


def read_structures(paths: Sequence[str | Path], index: str = ":") -> list[Record]:
    """Read every structure of every file; an unreadable or empty file raises InputError naming it.

    Files written by an older atomuq are upgraded to the current result keys (core.schema.upgrade)."""
    records: list[Record] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise InputError(f"{path}: is a directory; give the structure files in it")
        if not path.is_file():
            raise InputError(f"{path}: file not found")
        try:
            frames = _read_frames(path, index)
        except Exception as exc:  # ase.io raises many exception types for bad files
            detail = " ".join(str(exc).split())  # one line, however the reader phrased it
            detail = detail if len(detail) <= 200 else detail[:200] + "…"
            raise InputError(f"{path}: cannot read structures ({type(exc).__name__}: {detail})") from exc
        if isinstance(frames, Atoms):
            frames = [frames]
        if len(frames) == 0:
            raise InputError(f"{path}: the file contains no structures")
        records.extend(Record(upgrade(a), str(path), k) for k, a in enumerate(frames))
    return records


def _label_results(atoms: Atoms) -> dict:
    """The attached calculator's results if they can be reference labels: empty when they are atomuq's own
    predictions (a structure written by atomuq, or atomuq's calculator), so predictions never become labels."""
    calc = atoms.calc
    if calc is None or carries_prediction(atoms):
        return {}
    return getattr(calc, "results", {}) or {}


def reference_forces(atoms: Atoms, key: str | None = None) -> np.ndarray | None:
    """Reference forces (N, 3) eV/Å: atoms.arrays[key] (or the calculator's result of that name) if key is given,
    else an array named REF_forces (atomuq's explicit label, so it wins), else the attached calculator's, else an
    array named forces; without a key, calculator results and forces arrays that are atomuq's own predictions are
    never taken."""
    if key is not None:
        if key in atoms.arrays:
            return np.asarray(atoms.arrays[key], dtype=float)
        results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
        return np.asarray(results[key], dtype=float) if key in results else None
    if REFERENCE_PREFIX + "forces" in atoms.arrays:
        return np.asarray(atoms.arrays[REFERENCE_PREFIX + "forces"], dtype=float)
    results = _label_results(atoms)
    if "forces" in results:
        return np.asarray(results["forces"], dtype=float)
    if "forces" in atoms.arrays and not written_by_atomuq(atoms):
        return np.asarray(atoms.arrays["forces"], dtype=float)
    return None


def reference_energy(atoms: Atoms, key: str | None = None) -> float | None:
    """Reference energy in eV, found like reference_forces (info[key], REF_energy, calculator, info energy)."""
    if key is not None:
        return float(atoms.info[key]) if key in atoms.info else None
    if REFERENCE_PREFIX + "energy" in atoms.info:
        return float(atoms.info[REFERENCE_PREFIX + "energy"])
    results = _label_results(atoms)
    if "energy" in results:
        return float(results["energy"])
    if "energy" in atoms.info and not written_by_atomuq(atoms):
        return float(atoms.info["energy"])
    return None


def reference_stress(atoms: Atoms, key: str | None = None) -> np.ndarray | None:
    """Reference stress (6,) eV/Å³ in Voigt order xx, yy, zz, yz, xz, xy (ASE sign), or None."""
    value = None
    if key is not None:
        value = atoms.info.get(key)
    elif REFERENCE_PREFIX + "stress" in atoms.info:
        value = atoms.info[REFERENCE_PREFIX + "stress"]
    else:
        value = _label_results(atoms).get("stress")
        if value is None and not written_by_atomuq(atoms):
            value = atoms.info.get("stress")
    if value is None:
        return None
    array = np.asarray(value, dtype=float)
    if array.shape == (6,):
        return array
    if array.size == 9:
        m = array.reshape(3, 3)
        return np.array([m[a, b] for a, b in ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))])
    raise ValueError(f"stress must have 6 (Voigt) or 9 components, got shape {array.shape}")


def detach_reference(atoms: Atoms) -> Atoms:
    """A copy without calculator whose reference energy/forces/stress are kept as REF_* keys (an existing REF_*
    key wins); atomuq's own predictions on the structure are dropped, never kept as references."""
    out = atoms.copy()
    labels = {"energy": reference_energy(atoms), "stress": reference_stress(atoms)}
    forces = reference_forces(atoms)
    out.calc = None
    for name, value in labels.items():
        out.info.pop(name, None)
        if value is not None:
            out.info.setdefault(REFERENCE_PREFIX + name, value)
    if forces is not None and forces.shape == (len(atoms), 3):
        out.arrays.setdefault(REFERENCE_PREFIX + "forces", np.array(forces))
    out.arrays.pop("forces", None)
    return out


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def npz_member_memmap(path: str | Path, name: str) -> np.memmap | None:
    """Read-only memory map of array name of an .npz file (np.savez), or None where it cannot be mapped: stored
    compressed, holding objects, empty, or not found whole in the file (then read it with np.load)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as handle:
            handle.seek(info.header_offset)
            local = handle.read(30)  # the member's local header: signature ... name length, extra length
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                return None
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            handle.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
            size = os.fstat(handle.fileno()).st_size
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, struct.error):
        return None
    count = int(np.prod(shape, dtype=np.int64))
    if dtype.hasobject or count == 0 or offset + count * dtype.itemsize > size:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order="F" if fortran else "C")


_COMPRESSORS: dict[str, Callable[[Any], Any]] = {
    ".gz": lambda raw: gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0),  # no name or time: reproducible
    ".xz": lambda raw: lzma.LZMAFile(raw, mode="wb"),
    ".bz2": lambda raw: bz2.BZ2File(raw, mode="wb"),
}


def write_structures(path: str | Path, structures: Iterable[Atoms], format: str = "extxyz") -> Path:
    """Write all structures to path atomically (a temporary file renamed into place only when complete);
    a .gz, .xz or .bz2 suffix compresses (reproducibly for .gz)."""
    path = Path(path)
    compressor = _COMPRESSORS.get(path.suffix)
    with atomic_path(path) as tmp:
        if compressor is None:
            write(tmp, list(structures), format=format)
        else:
            with open(tmp, "wb") as raw, compressor(raw) as packed, io.TextIOWrapper(packed, encoding="utf-8") as fh:
                write(fh, list(structures), format=format)
    return path


def file_sha256(paths: Sequence[Path]) -> tuple[str, list[str]]:
    """SHA-256 (hex) of the files' bytes in order, and each file's own SHA-256."""
    total = hashlib.sha256()
    each = []
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
                total.update(chunk)
        each.append(digest.hexdigest())
    return total.hexdigest(), each


def concatenate_files(path: str | Path, parts: Sequence[str | Path]) -> Path:
    """Write the bytes of `parts` one after the other to path, atomically (compressed as write_structures does);
    extended XYZ files concatenate to one valid file."""
    path = Path(path)
    compressor = _COMPRESSORS.get(path.suffix)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw:
            sink = compressor(raw) if compressor is not None else raw
            try:
                for part in parts:
                    with open(part, "rb") as handle:
                        for chunk in iter(lambda: handle.read(1 << 20), b""):
                            sink.write(chunk)
            finally:
                if sink is not raw:
                    sink.close()
    return path


def _digest_value(digest: Any, value: Any) -> None:
    array = np.asarray(value)
    if array.dtype.kind in "biufc":
        digest.update(str(array.dtype).encode() + str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    else:
        digest.update(repr(value).encode())


def records_sha256(records: Sequence[Record]) -> str:
    """SHA-256 (hex) of structures as atomuq reads them: where they came from, numbers, positions, cell, pbc,
    constraints, every array, info value and calculator result (so a changed label changes it)."""
    digest = hashlib.sha256()
    for rec in records:
        atoms = rec.atoms
        digest.update(f"{rec.source}\0{rec.index}\0{len(atoms)}\0".encode())
        for value in (atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc):
            _digest_value(digest, value)
        digest.update(repr([c.todict() for c in atoms.constraints]).encode())
        results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
        for group in (atoms.arrays, atoms.info, results):
            for name in sorted(group):
                digest.update(name.encode() + b"\0")
                _digest_value(digest, group[name])
    return digest.hexdigest()
