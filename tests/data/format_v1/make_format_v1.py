"""Record the format-v1 fixture: a model file and an interrupted training run, written by the code of the time.

Run once (it was, at commit dcdf378, before workflows/train.py was split), from the repository root:

    PYTHONPATH=src:tests OMP_NUM_THREADS=1 python tests/data/format_v1/make_format_v1.py

It writes, next to this file: tiny_train.extxyz / tiny_val.extxyz (EMT labels), train.toml (the tiny
config of configs/train_tiny.toml with run_dir = "run"), run/ (the run folder of `atomuq train
train.toml` stopped by Ctrl-C in epoch 3 of 4: train_state.pt, best.pt, last.pt, metrics.csv,
config.toml, config_resolved.json, error_log/) and predictions.json (what run/best.pt predicts on
tiny_val.extxyz). tests/test_formats.py checks that these keep loading and resuming. Do not rerun it
to "refresh" the files: their point is to be old.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from ase.io import read, write
from conftest import emt_structures

from atomuq.core.batch import Batch
from atomuq.models.checkpoint import load_model
from atomuq.models.derivatives import evaluate
from atomuq.workflows.train import TrainCallback, TrainConfig, train_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


class StopInEpoch3(TrainCallback):
    """Ctrl-C after the first optimiser step of epoch 3: the state on disk is that of epoch 2."""

    def on_batch_end(self, epoch: int, batch: int, n_batches: int, loss: float) -> None:
        if (epoch, batch) == (3, 1):
            raise KeyboardInterrupt


def main() -> None:
    torch.set_num_threads(1)
    write(HERE / "tiny_train.extxyz", emt_structures(0, n_cells=3, n_molecules=3))
    write(HERE / "tiny_val.extxyz", emt_structures(1, n_cells=1, n_molecules=1))
    text = (ROOT / "configs" / "train_tiny.toml").read_text().replace('run_dir = "tiny_run"', 'run_dir = "run"')
    (HERE / "train.toml").write_text(text)
    shutil.rmtree(HERE / "run", ignore_errors=True)
    config = TrainConfig.from_toml(HERE / "train.toml")
    try:
        train_model(config, callback=StopInEpoch3())
    except KeyboardInterrupt:
        pass
    model = load_model(HERE / "run" / "best.pt")
    structures = read(HERE / "tiny_val.extxyz", ":")
    pred = evaluate(model, Batch.from_atoms(structures), conservative=True, stress=True)
    record = {
        "model": "run/best.pt", "structures": "tiny_val.extxyz", "dtype": "float32",
        "units": {"energy": "eV", "forces_direct": "eV/Å", "forces_conservative": "eV/Å", "stress_virial": "eV/Å³"},
        "energy": pred.energy.tolist(),
        "forces_direct": pred.forces_direct.tolist(),
        "forces_conservative": pred.forces_conservative.tolist(),
        "stress_virial": pred.stress_virial.tolist(),
        "confidence_logits": pred.confidence_logits.tolist(),
    }
    (HERE / "predictions.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
