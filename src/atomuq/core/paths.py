"""Output-path checks run before any work: writable, not a directory, parent folders creatable."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from atomuq.core.errors import InputError


def _nearest_existing(path: Path) -> Path:
    """The path itself or its closest ancestor that exists."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _check_folder_writable(folder: Path, flag: str, shown: Path) -> None:
    """Raise InputError unless files can be created in `folder` (or in the folders that would be made for it)."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise InputError(f"{flag} {shown}: {existing} is a file, not a folder; choose another output location")
    try:  # a real probe: os.access says yes to root even on read-only file systems
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".atomuq-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(f"{flag} {shown}: cannot write in {existing} ({reason}); choose a writable folder") from None


def check_output_file(path: str | Path, flag: str = "--output", *, must_not_exist: bool = False) -> bool:
    """Check that `path` can be written as a file before any work starts; True when it exists and would be replaced.

    Refused (InputError naming the flag and path): an existing directory, a parent that is a file, a folder
    that cannot be written, an existing file when must_not_exist. Nothing is created.
    """
    path = Path(path)
    if str(path) == "" or path.name in ("", ".", ".."):
        raise InputError(f"{flag} {str(path)!r}: give a file name")
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a directory; give a file name inside it, e.g. {path / 'out.extxyz'}")
    exists = path.exists()
    if exists and must_not_exist:
        raise InputError(f"{flag} {path}: exists already; remove it or choose another name")
    if exists and not path.is_file():
        raise InputError(f"{flag} {path}: exists and is not a regular file")
    _check_folder_writable(path.parent if str(path.parent) else Path("."), flag, path)
    return exists


def check_output_dir(path: str | Path, flag: str = "--out") -> bool:
    """Check that `path` can be used as an output folder before any work; True when it exists already.

    Refused (InputError naming the flag and path): an existing file, a folder that cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: is a file, not a folder; choose a folder name")
    _check_folder_writable(path, flag, path)
    return path.exists()


def check_distinct_outputs(outputs: dict[str, str | Path]) -> None:
    """Refuse two output options naming the same file (flag -> path), before any work."""
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        key = Path(path).expanduser().resolve()
        if key in seen:
            raise InputError(f"{flag} {path}: the same file as {seen[key]}; give each output its own name")
        seen[key] = flag
