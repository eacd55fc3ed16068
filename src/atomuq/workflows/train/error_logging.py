"""The training run's per-atom force-error log for LTAU-FF: created for the training set, reopened on resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import atomuq
from atomuq.core.errors import InputError
from atomuq.core.io import atomic_path
from atomuq.workflows.error_log import HISTOGRAM, METADATA, ErrorLogWriter, HistogramLogWriter, LogWriter, reopen_log_writer
from atomuq.workflows.train.config import TrainConfig
from atomuq.workflows.train.data import LabelledData
from atomuq.workflows.train.layout import ERROR_LOG_DIR, STRUCTURE_FRAMES


def create_error_log(run_dir: Path, run_id: str, config: TrainConfig,
                     train_data: LabelledData) -> LogWriter:
    """A new log (config.error_log: full rows or histogram counts) for config.epochs epochs over the training atoms
    (reference force norms in eV/Å), with the frame of each logged structure in its training file."""
    directory = run_dir / ERROR_LOG_DIR
    common = dict(
        run_id=run_id, n_epochs=config.epochs, structure_offsets=train_data.offsets, numbers=train_data.numbers,
        reference_force_norms=np.linalg.norm(train_data.forces, axis=1), training_files=train_data.files,
        training_data_hash=train_data.data_hash,
    )
    extra = {"seed": config.seed, "atomuq_version": atomuq.__version__,
             "init_from": str(config.init_from) if config.init_from else None}
    if config.error_log.form == HISTOGRAM:
        return HistogramLogWriter.create(directory, skip_epochs=config.error_log.skip_epochs(config.epochs),
                                         per_decade=config.error_log.bins_per_decade,
                                         structure_frames=train_data.frames(), extra=extra, **common)
    writer = ErrorLogWriter.create(directory, extra={**extra, "structure_frames": STRUCTURE_FRAMES}, **common)
    with atomic_path(directory / STRUCTURE_FRAMES) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, train_data.frames())
    return writer


def reopen_error_log(run_dir: Path, run_id: str, epochs_completed: int) -> LogWriter:
    """The log of a resumed run (of the form it was created in), continuing after epochs_completed."""
    directory = run_dir / ERROR_LOG_DIR
    if not (directory / METADATA).is_file():
        raise InputError(f"{directory / METADATA}: missing; the run's error log is gone, so the run cannot continue "
                         "exactly: start a new run_dir")
    return reopen_log_writer(directory, run_id=run_id, epochs_completed=epochs_completed)
