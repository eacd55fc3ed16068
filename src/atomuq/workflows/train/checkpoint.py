"""Checkpointing of a training run: the resumable state (train_state.pt), best.pt / last.pt, metrics.csv, config copies.

train_state.pt (format "atomuq-train-state") is a torch dict: run_id, epoch (completed), config
(TrainConfig.to_dict()), model_config, the model's, optimiser's and scheduler's state dicts, the
data-order generator's and torch's RNG states, history (metrics.csv rows), best_epoch, best_metric,
wall_time_s, training_data_hash, scale_info; and, added with the train package (atomuq 0.1.0), input_hashes
(SHA-256 of the validation files and the atom weights). Keys are only ever added, so states of
earlier versions keep loading (tests/test_formats.py holds one).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import atomuq
from atomuq.core.io import atomic_path
from atomuq.models.checkpoint import save_model
from atomuq.models.native import NativeModel
from atomuq.workflows.toml_config import ConfigError
from atomuq.workflows.train.config import TrainConfig
from atomuq.workflows.train.layout import BEST_FILE, CONFIG_COPY, CONFIG_RESOLVED, LAST_FILE, METRIC_COLUMNS, METRICS_FILE

STATE_FORMAT = "atomuq-train-state"


@dataclass
class Progress:
    """Where a run stands: epochs completed, the metrics rows, the best epoch so far, time spent in earlier sessions."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_metric: float = math.inf
    wall_time_before_s: float = 0.0
    scale_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trainables:
    """What the optimisation changes and the state resume must restore bit for bit."""

    model: NativeModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator


def load_state(path: Path, run_dir: Path) -> dict[str, Any]:
    """The training state in path; ConfigError naming it when it is unreadable or not an atomuq training state."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise ConfigError(f"unreadable training state ({type(exc).__name__}: {exc}); "
                          f"delete {run_dir} to start over, or use a new run_dir", source=path) from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ConfigError("not an atomuq training state", source=path)
    return state


def restore(state: dict[str, Any], parts: Trainables) -> Progress:
    """Load the weights, optimiser, scheduler and RNG states of a saved state into parts; the run's progress."""
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(run_id=state["run_id"], epoch=int(state["epoch"]), history=list(state["history"]),
                    best_epoch=int(state["best_epoch"]), best_metric=float(state["best_metric"]),
                    wall_time_before_s=float(state["wall_time_s"]), scale_info=dict(state.get("scale_info", {})))


def save_state(path: Path, config: TrainConfig, parts: Trainables, progress: Progress, wall_time_s: float,
               training_data_hash: str, input_hashes: dict[str, str | None]) -> None:
    """Write the resumable state atomically (wall_time_s: all sessions so far, s)."""
    model = parts.model
    state = {
        "format": STATE_FORMAT, "atomuq_version": atomuq.__version__, "run_id": progress.run_id, "epoch": progress.epoch,
        "config": config.to_dict(), "model_config": model.config.to_dict(), "model": model.state_dict(),
        "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
        "generator": parts.generator.get_state(), "torch_rng": torch.get_rng_state(), "history": progress.history,
        "best_epoch": progress.best_epoch, "best_metric": progress.best_metric, "wall_time_s": wall_time_s,
        "training_data_hash": training_data_hash, "scale_info": progress.scale_info, "input_hashes": input_hashes,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def save_models(model: NativeModel, run_dir: Path, training_data_hash: str, metadata: dict[str, Any],
                improved: bool) -> None:
    """last.pt, and best.pt when the epoch improved the selection metric (model in eval mode while saving)."""
    was_training = model.training
    model.eval()
    save_model(model, run_dir / LAST_FILE, training_data_hash, {**metadata, "kind": "last"})
    if improved:
        save_model(model, run_dir / BEST_FILE, training_data_hash, {**metadata, "kind": "best"})
    model.train(was_training)


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """metrics.csv, atomically: one row per epoch, METRIC_COLUMNS (empty where a value does not apply)."""
    with atomic_path(run_dir / METRICS_FILE) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})


def write_config_copies(run_dir: Path, config: TrainConfig) -> None:
    """config.toml (the file as given, when there is one) and config_resolved.json (every value as used)."""
    if config.source is not None and Path(config.source).is_file():
        with atomic_path(run_dir / CONFIG_COPY) as tmp:
            shutil.copyfile(config.source, tmp)
    with atomic_path(run_dir / CONFIG_RESOLVED) as tmp:
        Path(tmp).write_text(json.dumps(config.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
