"""JSON files of fitted evaluators (isotonic maps, conformal calibrations): atomic write, checked read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from atomuq.core.errors import InputError
from atomuq.core.io import atomic_path


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write `data` as JSON to path atomically (a partly written file never replaces a good one)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1))
    return path


def read_json(path: str | Path, expected_format: str, version: int) -> dict[str, Any]:
    """Parsed JSON of a file whose "format" and "version" fields match, else InputError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    check_format(data, expected_format, version, str(path))
    return data


def check_format(data: Any, expected_format: str, version: int, where: str) -> None:
    """InputError naming `where` unless data is a dict with the expected "format" and "version"."""
    if not isinstance(data, dict) or data.get("format") != expected_format:
        raise InputError(
            f'{where}: not an {expected_format} file (its "format" field must be {expected_format!r})'
        )
    if data.get("version") != version:
        raise InputError(
            f"{where}: {expected_format} version {data.get('version')} is not supported (expected {version})"
        )
