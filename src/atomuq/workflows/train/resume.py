"""Starting or resuming a run: the run folder checked before any work, the saved state loaded, changes refused.

A run resumes when its folder holds train_state.pt, with the same configuration (the device and
the folders of the run and of its input files may change: files are compared by name, their
contents by SHA-256) and the same training data. A folder left by a start that completed no epoch
(Ctrl-C or a failure in epoch 1) and made with the same configuration is started over; other
leftovers are refused rather than overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from atomuq.core.io import file_sha256
from atomuq.core.paths import check_output_dir
from atomuq.workflows.toml_config import ConfigError, differences, field_defaults
from atomuq.workflows.train.checkpoint import load_state
from atomuq.workflows.train.config import TrainConfig
from atomuq.workflows.train.data import LabelledData
from atomuq.workflows.train.layout import BEST_FILE, CONFIG_RESOLVED, LAST_FILE, METRICS_FILE, RUN_OUTPUTS, STATE_FILE


def _name(path: Any) -> Any:
    return None if path is None else Path(path).name


def comparable(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The part of TrainConfig.to_dict() that must not change on resume: without device and run_dir, input files
    by name (their contents are compared by hash)."""
    out = {k: v for k, v in config_dict.items() if k not in ("device", "run_dir")}
    if isinstance(out.get("data"), dict):
        data = dict(out["data"])
        for key in ("train", "validation"):
            if isinstance(data.get(key), list):
                data[key] = [_name(p) for p in data[key]]
        if "atom_weights" in data:
            data["atom_weights"] = _name(data["atom_weights"])
        out["data"] = data
    if "init_from" in out:
        out["init_from"] = _name(out["init_from"])
    return out


def config_changes(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """'key: saved -> now' for every setting that differs from the saved run's (keys added to TrainConfig since
    the run was saved count as their defaults there)."""
    return differences(comparable(saved), comparable(config.to_dict()), defaults=field_defaults(TrainConfig))


def input_hashes(config: TrainConfig) -> dict[str, str | None]:
    """SHA-256 of the validation files and of the atom-weights file (None where not given)."""
    data = config.data
    return {"validation": file_sha256(list(data.validation))[0] if data.validation else None,
            "atom_weights": file_sha256([data.atom_weights])[0] if data.atom_weights is not None else None}


def open_run(config: TrainConfig, resume: bool | None) -> dict[str, Any] | None:
    """Check the run folder before any work and return the saved state to resume from, or None for a fresh start.

    resume: None resumes when run_dir holds train_state.pt; True requires it; False refuses an existing run.
    """
    where = str(config.source or "config")
    run_dir = Path(config.run_dir)
    check_output_dir(run_dir, f"{where}: run_dir")
    state_path = run_dir / STATE_FILE
    if state_path.exists():
        if resume is False:
            raise ConfigError("a run already exists here; resume it or choose a new run_dir", source=state_path)
        state = load_state(state_path, run_dir)
        changes = config_changes(state["config"], config)
        if changes:
            raise ConfigError(f"differs from the run being resumed in {run_dir} ({'; '.join(changes)}); "
                              "restore those values or use a new run_dir", source=where)
        return state
    unfinished = _unfinished_start(run_dir, config)
    if resume is True:
        detail = " (the run there completed no epoch)" if unfinished else ""
        raise ConfigError(f"no training state to resume{detail}; run without --resume to start a new run",
                          source=state_path)
    if unfinished:
        for name in (BEST_FILE, LAST_FILE, METRICS_FILE):  # of the attempt that completed no epoch
            (run_dir / name).unlink(missing_ok=True)
        return None
    leftovers = [n for n in RUN_OUTPUTS if (run_dir / n).exists()]
    if leftovers:
        raise ConfigError(f"holds {', '.join(leftovers)} from another run but no {STATE_FILE}; "
                          "choose a new run_dir or delete that folder", source=run_dir)
    return None


def _unfinished_start(run_dir: Path, config: TrainConfig) -> bool:
    """True when run_dir holds what a start with this configuration writes before its first checkpoint."""
    try:
        saved = json.loads((run_dir / CONFIG_RESOLVED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and not config_changes(saved, config)


def check_inputs(state: dict[str, Any], config: TrainConfig, train_data: LabelledData) -> None:
    """Refuse to resume on other training data, validation files or atom weights than the run began with."""
    where = str(config.source or "config")
    run_dir = Path(config.run_dir)
    if state["training_data_hash"] != train_data.data_hash:
        raise ConfigError(f"the training files changed since the run in {run_dir} began "
                          f"(sha256 {train_data.data_hash[:12]} vs {state['training_data_hash'][:12]}); use a new run_dir",
                          source=where)
    saved = state.get("input_hashes")  # absent in states of atomuq before the train package
    if not isinstance(saved, dict):
        return
    now = input_hashes(config)
    for key, label in (("validation", "data.validation files"), ("atom_weights", "data.atom_weights file")):
        if saved.get(key) != now[key]:
            raise ConfigError(f"the {label} changed since the run in {run_dir} began; restore them or use a new run_dir",
                              source=where, field=f"data.{key}")

