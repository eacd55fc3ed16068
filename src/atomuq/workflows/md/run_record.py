"""TRAJ.run.json: what a run was made with (settings, monitors, model, versions) and how it ended.

Written atomically when the run starts and again when it ends; `--resume` compares the
settings of the new call with it and refuses any change but RESUMABLE_CHANGES, naming each
changed setting with both values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import atomuq
from atomuq.core.errors import InputError
from atomuq.core.io import atomic_path
from atomuq.models.checkpoint import weights_fingerprint
from atomuq.models.provenance import model_name
from atomuq.models.protocol import AtomisticModel
from atomuq.uq.ltau.estimator import LTAUEstimator
from atomuq.workflows.md.monitor_plan import MonitorPlan
from atomuq.workflows.md.settings import RESUMABLE_CHANGES, MDSettings, SettingError, describe_value

RECORD_FORMAT = "atomuq-md-run"
RECORD_VERSION = 1


def record_path(trajectory: str | Path) -> Path:
    """TRAJ.run.json beside the trajectory."""
    trajectory = Path(trajectory)
    return trajectory.with_name(trajectory.name + ".run.json")


def ltau_identity(ltau: LTAUEstimator | None) -> str | None:
    """A short description that changes when another LTAU estimator is used (None without one)."""
    if ltau is None:
        return None
    return f"{ltau.n_atoms} atoms, atol {ltau.atol:g}, scale {ltau.scale:g}, fitted for {ltau.metadata.get('model_fingerprint', '?')}"


def build_record(
    settings: MDSettings,
    plan: MonitorPlan,
    model: AtomisticModel,
    name: str | None,
    structure: str,
    ltau: LTAUEstimator | None = None,
    ltau_k: int = 1,
) -> dict[str, Any]:
    """The run record of a new run (its 'compare' part is what resume checks)."""
    fingerprint = weights_fingerprint(model)
    return {
        "format": RECORD_FORMAT,
        "format_version": RECORD_VERSION,
        "atomuq_version": atomuq.__version__,
        "model": {"name": model_name(model, name), "fingerprint": fingerprint},
        "structure": structure,
        "monitoring": plan.choice,
        "compare": {
            **settings.as_dict(),
            "monitors": plan.specs(),
            "monitoring": plan.choice,
            "model": fingerprint,
            "ltau": ltau_identity(ltau),
            "ltau_k": ltau_k if ltau is not None else None,
        },
        "result": None,
    }


def write_record(path: str | Path, record: dict[str, Any]) -> None:
    """Write the record atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def load_record(path: str | Path) -> dict[str, Any] | None:
    """The record at `path`, or None when there is none (runs of older versions); InputError if unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    return load_document(path, RECORD_FORMAT, "run record", "delete it to resume without the settings check",
                         "an `atomuq md` run record")


def load_document(path: str | Path, fmt: str, what: str, fix: str, kind: str) -> dict[str, Any]:
    """The JSON object at path whose "format" is fmt; InputError naming path when it is unreadable
    ("unreadable WHAT (...); FIX") or of another format ("not KIND")."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable {what} ({exc}); {fix}") from exc
    if not isinstance(document, dict) or document.get("format") != fmt:
        raise InputError(f"{path}: not {kind}")
    return document


#: how the 'compare' entries that are not MDSettings fields are named in messages
_LABELS = {"model": "{model} weights", "monitors": "{monitors}", "monitoring": "monitor choice", "ltau": "{ltau}",
           "ltau_k": "{ltau_k}"}


def check_resume(old: dict[str, Any], new: dict[str, Any], trajectory: str | Path) -> None:
    """SettingError naming every setting that differs between the run being resumed and this call."""
    before, now = old.get("compare", {}), new["compare"]
    changes = []
    for key in now:
        if key in RESUMABLE_CHANGES or before.get(key) == now[key]:
            continue
        label = _LABELS.get(key, "{" + key + "}")
        if key == "monitors":
            was = "; ".join(before.get(key) or []) or "none"
            is_ = "; ".join(now[key]) or "none"
            changes.append(f"{label} [{was}] (was) -> [{is_}] (now)")
        else:
            changes.append(f"{label} {describe_value(before.get(key))} (was) -> {describe_value(now[key])} (now)")
    if changes:
        allowed = ", ".join("{" + k + "}" for k in RESUMABLE_CHANGES)
        raise SettingError(
            f"{trajectory}: cannot resume with changed settings: {'; '.join(changes)}. Restore them to resume, "
            f"or write a new trajectory (only {allowed} may change on resume)"
        )
