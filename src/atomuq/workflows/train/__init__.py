"""Training and fine-tuning the native model (`atomuq train CONFIG`).

Losses (workflows/losses.py): Huber on energy per atom, direct forces, conservative forces,
stress (direct head and virial), the equigrad term λ‖Δ_rot‖² and the confidence head's
cross-entropy against the model's own binned direct-force errors (Orb-v3). Random-rotation
augmentation, per-element reference energies by least squares, AdamW with a cosine or
plateau schedule, validation each epoch, best/last checkpoints, a resumable training state
written atomically each epoch, and the per-atom force-error log of LTAU-FF
(workflows/error_log.py).

Modules, one job each: config (the TOML file's dataclasses), data (files, validation split,
labels, batches, the sets of a config), scales (reference energies), augment (rotations), evaluation (errors on a
set), layout (the run folder's file names), checkpoint (state, best/last, metrics.csv),
error_logging (the per-atom log), resume (start or resume, changes refused), loop (the loop).
The names below are the package's public face; import them from here.
"""

from atomuq.core.rotations import random_rotations
from atomuq.workflows.losses import compute_losses
from atomuq.workflows.toml_config import ConfigError, FieldError, differences, read_toml
from atomuq.workflows.train.augment import rotate, voigt_to_matrix
from atomuq.workflows.train.checkpoint import STATE_FORMAT
from atomuq.workflows.train.config import BEST_BY, SCHEDULES, DataConfig, OptimizerConfig, TrainConfig, native_config
from atomuq.workflows.train.data import (FileRecords, LabelledData, Sets, labelled, load_atom_weights, load_labelled,
                                         load_sets, read_files, read_sets, split_validation)
from atomuq.workflows.train.evaluation import evaluate_set
from atomuq.workflows.train.layout import (BEST_FILE, CONFIG_COPY, CONFIG_RESOLVED, ERROR_LOG_DIR, LAST_FILE,
                                           METRIC_COLUMNS, METRICS_FILE, STATE_FILE, STRUCTURE_FRAMES)
from atomuq.workflows.train.loop import TrainCallback, TrainingError, TrainResult, train_model
from atomuq.workflows.train.resume import config_changes
from atomuq.workflows.train.scales import composition_matrix, fit_reference_energies

#: the name workflows/improve.py imports (nested 'key: old -> new' differences of two dicts)
_config_differences = differences

__all__ = [
    "BEST_BY", "BEST_FILE", "CONFIG_COPY", "CONFIG_RESOLVED", "ERROR_LOG_DIR", "LAST_FILE", "METRICS_FILE",
    "METRIC_COLUMNS", "SCHEDULES", "STATE_FILE", "STATE_FORMAT", "STRUCTURE_FRAMES", "ConfigError", "DataConfig",
    "FieldError", "FileRecords", "LabelledData", "OptimizerConfig", "Sets", "TrainCallback", "TrainConfig", "TrainResult",
    "TrainingError", "composition_matrix", "compute_losses", "config_changes", "evaluate_set", "fit_reference_energies",
    "labelled", "load_atom_weights", "load_labelled", "load_sets", "native_config", "random_rotations", "read_files",
    "read_sets", "read_toml", "rotate", "split_validation", "train_model", "voigt_to_matrix",
]
