"""The training run's per-atom force-error log for LTAU-FF: created for the training set, reopened on resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import atomuq
from atomuq.core.io import atomic_path
from atomuq.workflows.error_log import ErrorLogWriter
from atomuq.workflows.train.config import TrainConfig
from atomuq.workflows.train.data import LabelledData
from atomuq.workflows.train.layout import ERROR_LOG_DIR, STRUCTURE_FRAMES


def create_error_log(run_dir: Path, run_id: str, config: TrainConfig, train_data: LabelledData) -> ErrorLogWriter:
    """A new log for config.epochs epochs over the training atoms (reference force norms in eV/Å), with
    structure_frames.npy saying which frame of which training file each logged structure is."""
    directory = run_dir / ERROR_LOG_DIR
    writer = ErrorLogWriter.create(
        directory, run_id=run_id, n_epochs=config.epochs, structure_offsets=train_data.offsets,
        numbers=train_data.numbers, reference_force_norms=np.linalg.norm(train_data.forces, axis=1),
        training_files=train_data.files, training_data_hash=train_data.data_hash,
        extra={"seed": config.seed, "atomuq_version": atomuq.__version__,
               "init_from": str(config.init_from) if config.init_from else None, "structure_frames": STRUCTURE_FRAMES},
    )
    with atomic_path(directory / STRUCTURE_FRAMES) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, train_data.frames())
    return writer


def reopen_error_log(run_dir: Path, run_id: str, epochs_completed: int) -> ErrorLogWriter:
    """The log of a resumed run, its rows after epochs_completed to be rewritten."""
    return ErrorLogWriter.reopen(run_dir / ERROR_LOG_DIR, run_id=run_id, epochs_completed=epochs_completed)
