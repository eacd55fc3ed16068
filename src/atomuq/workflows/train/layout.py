"""The files of a training run folder (one name each, shared by the pieces that write and read them).

run_dir/best.pt, last.pt      atomuq model files (models/checkpoint.py) of the best and the last epoch
run_dir/train_state.pt        the resumable training state, written atomically after every epoch
run_dir/metrics.csv           one row per epoch (METRIC_COLUMNS)
run_dir/config.toml           copy of the config file; config_resolved.json: the configuration as used
run_dir/error_log/            per-atom force errors of every epoch (workflows/error_log.py) and
                              structure_frames.npy: (structures, 2) training-file number, frame in that file
"""

from __future__ import annotations

from atomuq.workflows.losses import TERMS

STATE_FILE = "train_state.pt"
BEST_FILE = "best.pt"
LAST_FILE = "last.pt"
METRICS_FILE = "metrics.csv"
CONFIG_COPY = "config.toml"
CONFIG_RESOLVED = "config_resolved.json"
ERROR_LOG_DIR = "error_log"
STRUCTURE_FRAMES = "structure_frames.npy"
#: files a run writes besides its state: their presence without train_state.pt is a run that did not finish an epoch
RUN_OUTPUTS = (BEST_FILE, LAST_FILE, METRICS_FILE, ERROR_LOG_DIR)
#: metrics.csv columns, in order (units: losses as in losses.py, MAEs in eV/atom and eV/Å, Δ_rot in eV, time in s)
METRIC_COLUMNS = (
    ["epoch", "lr", "train_loss"] + [f"train_loss_{t}" for t in TERMS]
    + [f"{s}_{m}" for s in ("train", "val") for m in ("energy_mae_per_atom", "forces_mae", "conservative_forces_mae",
                                                     "rotational_gradient")]
    + ["best", "wall_time_s", "fingerprint"]
)
