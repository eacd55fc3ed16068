"""The run's log: an append-only text file (one readable line per reading and action) and its JSON-lines twin.

Each frame records the byte sizes of both files when it was written (LineLog.sizes); a resumed
run cuts the logs back to the sizes of the frame it resumes from (truncate_logs), so readings
made after that frame by the killed process are not repeated when the resumed run makes them again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def json_twin(path: str | Path) -> Path:
    """PATH.jsonl beside the text log PATH."""
    path = Path(path)
    return path.with_name(path.name + ".jsonl")


class LineLog:
    """An append-only text log and its JSON-lines twin (PATH.jsonl), flushed per entry."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if append else "w"
        self._text = open(self.path, mode, encoding="utf-8")  # noqa: SIM115 (kept open for appends)
        self._json = open(json_twin(self.path), mode, encoding="utf-8")  # noqa: SIM115

    def write(self, line: str, record: dict | None = None, sync: bool = True) -> None:
        """Append one human-readable line (and its JSON record); flushed, and fsynced if sync."""
        self._text.write(line.rstrip("\n") + "\n")
        if record is not None:
            self._json.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        self._text.flush()
        self._json.flush()
        if sync:
            self.sync()

    def sizes(self) -> list[int]:
        """Bytes written so far to the text log and the JSON log."""
        return [self._text.tell(), self._json.tell()]

    def sync(self) -> None:
        """fsync both files (flushed lines survive a killed process; fsync also a power cut)."""
        os.fsync(self._text.fileno())
        os.fsync(self._json.fileno())

    def close(self) -> None:
        """Close both files."""
        self._text.close()
        self._json.close()


def truncate_logs(path: str | Path, sizes: list[int]) -> int:
    """Cut the text log PATH and PATH.jsonl back to `sizes` (bytes) where they are longer; returns the bytes cut."""
    cut = 0
    for file, size in zip((Path(path), json_twin(path)), sizes):
        if file.is_file() and file.stat().st_size > size:
            cut += file.stat().st_size - size
            with open(file, "r+b") as fh:
                fh.truncate(size)
                fh.flush()
                os.fsync(fh.fileno())
    return cut
