"""Formats frozen: a model file and an interrupted training run written by an earlier atomuq keep working.

tests/data/format_v1/ was written by tests/data/format_v1/make_format_v1.py with the code of commit
dcdf378 (before workflows/train.py was split): run/ is `atomuq train train.toml` stopped by Ctrl-C in
epoch 3 of 4, predictions.json what run/best.pt predicted on tiny_val.extxyz. The files are never
regenerated; a change that stops them loading or resuming breaks users' models and long trainings.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read
from single_thread import one_thread  # noqa: F401  (one torch thread in this module)

from atomuq.core.batch import Batch
from atomuq.models.checkpoint import load_model, weights_fingerprint
from atomuq.models.derivatives import evaluate
from atomuq.workflows.error_log import load_error_log
from atomuq.workflows.train import TrainCallback, TrainConfig, config_changes, train_model

FIXTURE = Path(__file__).resolve().parent / "data" / "format_v1"
EPOCHS_DONE, EPOCHS = 2, 4


@pytest.fixture()
def copy(tmp_path) -> Path:
    """The fixture folder copied elsewhere (the recorded run holds other absolute paths, as a moved run would)."""
    target = tmp_path / "format_v1"
    shutil.copytree(FIXTURE, target, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return target


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_v1_model_files_load_and_predict_as_recorded(name):
    model = load_model(FIXTURE / "run" / name)
    recorded = json.loads((FIXTURE / "predictions.json").read_text())
    assert model.metadata["epoch"] == (model.metadata["best_epoch"] if name == "best.pt" else EPOCHS_DONE)
    assert model.metadata["kind"] == name.removesuffix(".pt") and model.metadata["epochs_planned"] == EPOCHS
    pred = evaluate(model, Batch.from_atoms(read(FIXTURE / "tiny_val.extxyz", ":")), conservative=True, stress=True)
    if name != "best.pt":  # predictions.json belongs to best.pt; last.pt only has to load and give finite output
        assert torch.isfinite(pred.energy).all() and torch.isfinite(pred.forces_direct).all()
        return
    for key in ("energy", "forces_direct", "forces_conservative", "stress_virial", "confidence_logits"):
        expected = torch.tensor(recorded[key], dtype=torch.float32)
        assert torch.allclose(getattr(pred, key).detach(), expected, rtol=1e-4, atol=1e-5), key


def test_v1_error_log_reads_the_two_completed_epochs():
    log = load_error_log(FIXTURE / "run" / "error_log")
    assert log.n_epochs == EPOCHS_DONE and log.metadata["n_epochs_planned"] == EPOCHS
    assert log.n_atoms == sum(len(a) for a in read(FIXTURE / "tiny_train.extxyz", ":"))
    assert np.isfinite(log.errors_direct).all() and (log.errors_direct > 0).all()
    last = load_model(FIXTURE / "run" / "last.pt")
    assert log.metadata["model_fingerprints"][-1] == weights_fingerprint(last)


class Fingerprints(TrainCallback):
    """The weights' fingerprint at the end of every epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, str] = {}

    def on_epoch_end(self, epoch, row, model, improved):
        self.by_epoch[epoch] = weights_fingerprint(model)


def test_v1_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_run(copy):
    config = TrainConfig.from_toml(copy / "train.toml")
    assert config.run_dir == copy / "run"
    resumed = train_model(config)  # the run folder holds train_state.pt: it resumes
    assert resumed.start_epoch == EPOCHS_DONE and resumed.epochs_completed == EPOCHS
    assert [row["epoch"] for row in resumed.history] == list(range(1, EPOCHS + 1))
    assert all(np.isfinite(row["train_loss"]) and np.isfinite(row["val_forces_mae"]) for row in resumed.history)
    log = load_error_log(copy / "run" / "error_log")
    assert log.n_epochs == EPOCHS and np.isfinite(log.errors_direct).all()
    assert log.metadata["model_fingerprints"][-1] == weights_fingerprint(load_model(copy / "run" / "last.pt"))

    # the same config run without interruption by this code
    fresh_config = TrainConfig.from_dict({**_toml(copy / "train.toml"), "run_dir": str(copy / "fresh")},
                                     base_dir=copy, source=copy / "train.toml")
    seen = Fingerprints()
    fresh = train_model(fresh_config, callback=seen)
    a = torch.load(copy / "run" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(copy / "fresh" / "last.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    recorded_epoch2 = resumed.history[EPOCHS_DONE - 1]["fingerprint"]
    if seen.by_epoch[EPOCHS_DONE] == recorded_epoch2:
        # this machine reproduces the recorded first epochs bit for bit, so resuming must be bit-identical too
        for name in a:
            assert torch.equal(a[name], b[name]), name
        keys = [k for k in fresh.history[0] if k != "wall_time_s"]
        assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in fresh.history]
    else:  # other floating-point kernels: the same run up to rounding
        for name in a:
            assert torch.allclose(a[name].double(), b[name].double(), rtol=1e-3, atol=1e-5), name


def _toml(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())


def test_a_state_without_a_key_added_later_counts_as_its_default(copy):
    state = torch.load(copy / "run" / "train_state.pt", weights_only=True)
    config = TrainConfig.from_toml(copy / "train.toml")
    assert config_changes(state["config"], config) == []
    older = {k: v for k, v in state["config"].items() if k != "select_best_by"}
    older["loss"] = {k: v for k, v in older["loss"].items() if k != "equigrad"}
    assert config_changes(older, config) == []  # both at their defaults
    changed = dataclasses.replace(config, select_best_by="energy")
    assert config_changes(older, changed) == ["select_best_by: 'forces' -> 'energy'"]
