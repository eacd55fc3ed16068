"""The training loop: optimiser steps over shuffled, rotated batches, then each epoch's evaluation and checkpoint.

The pieces it calls: resume.open_run (run folder checked, state loaded, changes refused),
data (structures and labels), scales (reference energies), error_logging (the per-atom log),
checkpoint (best/last, metrics.csv, train_state.pt written atomically after every epoch).
A resumed run repeats the uninterrupted one bit for bit: the data order and rotations come from
one generator whose state is saved with the weights, optimiser and scheduler.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atomuq.core.device import resolve_device
from atomuq.core.errors import AtomuqError, InputError
from atomuq.core.rotations import random_rotations
from atomuq.models.checkpoint import load_model, weights_fingerprint
from atomuq.models.derivatives import evaluate
from atomuq.models.native import NativeConfig, NativeModel
from atomuq.workflows.error_log import LogWriter
from atomuq.workflows.losses import TERMS, compute_losses
from atomuq.workflows.toml_config import ConfigError
from atomuq.workflows.train.augment import rotate
from atomuq.workflows.train.checkpoint import (Progress, Trainables, restore, save_models, save_state, write_config_copies,
                                               write_metrics)
from atomuq.workflows.train.config import BEST_BY, OptimizerConfig, TrainConfig
from atomuq.workflows.train.data import LabelledData, Sets, load_sets
from atomuq.workflows.train.error_logging import create_error_log, reopen_error_log
from atomuq.workflows.train.evaluation import evaluate_set
from atomuq.workflows.train.layout import STATE_FILE
from atomuq.workflows.train.resume import check_inputs, input_hashes, open_run
from atomuq.workflows.train.scales import set_scales


class TrainingError(AtomuqError):
    """Training stopped (NaN loss, diverged gradients); the message says at which epoch and batch."""


class TrainCallback:
    """Hooks the training loop calls (progress bars, tests); every method is optional."""

    def on_start(self, info: dict[str, Any]) -> None:
        """Called once with run_dir, n_train, n_val, n_atoms, epochs, start_epoch, resumed."""

    def on_epoch_start(self, epoch: int, n_batches: int) -> None:
        """Called before the first batch of epoch (1-based)."""

    def on_batch_end(self, epoch: int, batch: int, n_batches: int, loss: float) -> None:
        """Called after each optimiser step (batch 1-based)."""

    def on_epoch_end(self, epoch: int, row: dict[str, Any], model: NativeModel, improved: bool) -> None:
        """Called after the epoch's evaluation and files are written (row: the metrics.csv row)."""


@dataclass
class TrainResult:
    """Outcome of a training run: final model (eval mode), epochs done, best epoch and metric, metrics history."""

    run_dir: Path
    model: NativeModel
    epochs_completed: int
    start_epoch: int
    best_epoch: int
    best_metric: float
    best_metric_name: str
    history: list[dict[str, Any]]
    wall_time_s: float
    training_data_hash: str


def _device(name: str, where: str) -> torch.device:
    try:
        return resolve_device(name)
    except InputError as exc:
        raise ConfigError(str(exc), source=where, field="device") from exc


def _scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig, epochs: int) -> Any:
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=config.min_lr)
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=config.plateau_factor,
                                                          patience=config.plateau_patience, min_lr=config.min_lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _step_batches(model: NativeModel, parts: Trainables, config: TrainConfig, data: LabelledData, epoch: int,
                  device: torch.device, dtype: torch.dtype, callback: TrainCallback) -> dict[str, float]:
    """One epoch of optimiser steps; the summed loss and terms over its batches."""
    loss_config = config.loss
    edges = model.confidence_bin_edges if model.has_confidence else None
    max_error = float(model.config.confidence_max_error)
    needs_graph = loss_config.needs_conservative or loss_config.needs_virial or loss_config.needs_rotational
    n_batches = math.ceil(len(data) / config.batch_size)
    stop = f"{config.run_dir} still holds epoch {epoch - 1}"
    model.train()
    order = torch.randperm(len(data), generator=parts.generator).tolist()
    totals: dict[str, float] = {}
    for b, start in enumerate(range(0, len(data), config.batch_size), 1):
        idx = order[start:start + config.batch_size]
        batch, targets = data.batch(idx, device, dtype)
        if config.augment_rotations:
            batch, targets = rotate(batch, targets, random_rotations(len(idx), parts.generator))
        pred = evaluate(model, batch, conservative=loss_config.needs_conservative, stress=loss_config.needs_virial,
                        rotational=loss_config.needs_rotational, create_graph=needs_graph)
        loss, terms = compute_losses(pred, targets, loss_config, edges, max_error)
        if not bool(torch.isfinite(loss)):
            detail = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in terms.items())
            raise TrainingError(f"loss became {float(loss.detach())} at epoch {epoch}, batch {b} of {n_batches} "
                                f"({detail}); lower optimizer.lr or check the labels; {stop}")
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optimizer.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip)
            if not bool(torch.isfinite(norm)):
                raise TrainingError(f"gradient norm became {float(norm)} at epoch {epoch}, batch {b} of "
                                    f"{n_batches}; lower optimizer.lr; {stop}")
        parts.optimizer.step()
        totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach())
        callback.on_batch_end(epoch, b, n_batches, float(loss.detach()))
    return totals


def _evaluate_epoch(model: NativeModel, config: TrainConfig, sets: Sets, epoch: int,
                    writer: LogWriter) -> tuple[dict[str, float], dict[str, float], str]:
    """Training metrics (their per-atom errors into the log's row of this epoch), validation metrics, fingerprint."""
    writer.begin_epoch(epoch - 1)
    train_metrics = evaluate_set(model, sets.train, config.batch_size_eval, writer)
    fingerprint = weights_fingerprint(model)
    try:
        writer.end_epoch(fingerprint)
    except FloatingPointError as exc:
        raise TrainingError(f"epoch {epoch}: {exc}; lower optimizer.lr; {config.run_dir} still holds epoch "
                            f"{epoch - 1}") from exc
    val_metrics = evaluate_set(model, sets.val, config.batch_size_eval) if sets.val is not None else {}
    return train_metrics, val_metrics, fingerprint


def _metadata(config: TrainConfig, sets: Sets, progress: Progress, row: dict[str, Any], metric_name: str,
              wall_time_s: float) -> dict[str, Any]:
    """What best.pt / last.pt carry besides the weights (losses, MAEs in eV/atom and eV/Å, wall time in s)."""
    train = sets.train
    return {
        "run_id": progress.run_id, "epoch": row["epoch"], "epochs_planned": config.epochs, "seed": config.seed,
        "trained_on": ", ".join(Path(f["path"]).name for f in train.files),
        "training_files": train.files, "losses": {k: v for k, v in row.items() if k.startswith("train_loss")},
        "metrics": {k: v for k, v in row.items() if v is not None and k not in ("fingerprint",)},
        "best_epoch": progress.best_epoch, "best_metric": metric_name, "wall_time_s": wall_time_s,
        "config": config.to_dict(), "init_from": str(config.init_from) if config.init_from else None,
        "scales": progress.scale_info,
    }


def train_model(config: TrainConfig, resume: bool | None = None, callback: TrainCallback | None = None) -> TrainResult:
    """Train or fine-tune a native model as configured (energies eV, forces eV/Å); returns the final model.

    resume: None resumes when run_dir holds train_state.pt and starts fresh otherwise; True
    requires the state file; False refuses to touch an existing run.
    """
    callback = callback or TrainCallback()
    where = str(config.source or "config")
    run_dir = Path(config.run_dir)
    state = open_run(config, resume)
    device = _device(config.device, where)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32

    # model (fresh, fine-tuned or resumed) and the data it is trained on
    init_model: NativeModel | None = None
    if state is not None:
        model_config: NativeConfig | None = NativeConfig.from_dict(state["model_config"])
    elif config.init_from is not None:
        init_model = load_model(config.init_from)
        model_config = init_model.config
    else:
        model_config = None
    sets, model_config = load_sets(config, model_config)
    if state is not None:
        check_inputs(state, config, sets.train)

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = NativeModel(model_config)
    if init_model is not None:
        model.load_state_dict(init_model.state_dict())
    fit = config.fit_reference_energies if config.fit_reference_energies is not None else config.init_from is None
    if fit and sets.train.energy is None and config.fit_reference_energies:
        raise ConfigError("needs reference energies in the training files", source=where,
                          field="fit_reference_energies", separator=" = true ")
    scale_info = set_scales(model, sets.train, fit) if state is None else {}
    model = model.to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr, weight_decay=config.optimizer.weight_decay)
    parts = Trainables(model, optimizer, _scheduler(optimizer, config.optimizer, config.epochs), generator)

    if state is not None:
        progress = restore(state, parts)
        writer = reopen_error_log(run_dir, progress.run_id, progress.epoch)
    else:
        progress = Progress(scale_info=scale_info)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config_copies(run_dir, config)
        writer = create_error_log(run_dir, progress.run_id, config, sets.train)
    hashes = input_hashes(config)

    metric_key = BEST_BY[config.select_best_by]
    metric_stage = "val" if sets.val is not None else "train"
    metric_name = f"{metric_stage}_{metric_key}"
    n_batches = math.ceil(len(sets.train) / config.batch_size)
    start_epoch = progress.epoch
    callback.on_start({"run_dir": run_dir, "n_train": len(sets.train), "n_val": len(sets.val) if sets.val else 0,
                       "n_atoms": sets.train.n_atoms, "epochs": config.epochs, "start_epoch": start_epoch,
                       "resumed": state is not None, "elements": sets.elements, "scales": progress.scale_info,
                       "parameters": sum(p.numel() for p in model.parameters())})
    t0 = time.perf_counter()

    def wall_time() -> float:
        return progress.wall_time_before_s + time.perf_counter() - t0

    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            callback.on_epoch_start(epoch, n_batches)
            totals = _step_batches(model, parts, config, sets.train, epoch, device, dtype, callback)
            train_metrics, val_metrics, fingerprint = _evaluate_epoch(model, config, sets, epoch, writer)
            score = (val_metrics if sets.val is not None else train_metrics).get(metric_key)
            if score is None or not math.isfinite(score):
                raise TrainingError(f"epoch {epoch}: selection metric {metric_name} is {score}")
            lr = optimizer.param_groups[0]["lr"]
            if config.optimizer.schedule == "plateau":
                parts.scheduler.step(score)
            else:
                parts.scheduler.step()
            improved = score < progress.best_metric
            if improved:
                progress.best_metric, progress.best_epoch = score, epoch
            row: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": totals["loss"] / n_batches}
            row.update({f"train_loss_{k}": totals[k] / n_batches for k in TERMS if k in totals})
            row.update({f"train_{k}": v for k, v in train_metrics.items()})
            row.update({f"val_{k}": v for k, v in val_metrics.items()})
            row.update(best=int(improved), wall_time_s=wall_time(), fingerprint=fingerprint)
            progress.history.append(row)
            progress.epoch = epoch
            save_models(model, run_dir, sets.train.data_hash,
                        _metadata(config, sets, progress, row, metric_name, wall_time()), improved)
            write_metrics(run_dir, progress.history)
            save_state(run_dir / STATE_FILE, config, parts, progress, row["wall_time_s"], sets.train.data_hash, hashes)
            callback.on_epoch_end(epoch, row, model, improved)
    finally:
        writer.close()
    model.eval()
    return TrainResult(run_dir=run_dir, model=model, epochs_completed=len(progress.history), start_epoch=start_epoch,
                       best_epoch=progress.best_epoch, best_metric=progress.best_metric, best_metric_name=metric_name,
                       history=progress.history, wall_time_s=wall_time(), training_data_hash=sets.train.data_hash)
