"""Error logs counted while training (error_log.form = "histogram"): the same counts as compacting the full log,
exact after a kill at any point, a few MB to carry between sessions, read by LTAU like a compacted log."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import write
from conftest import emt_structures
from single_thread import one_thread  # noqa: F401  (one torch thread in this module)
from test_compact_error_log import synthetic_errors, write_full_log

from atomuq.core.errors import InputError
from atomuq.uq.ltau.distribution import HistogramBins, log_edges
from atomuq.workflows.error_log import HISTOGRAMS, HistogramLogWriter, compact_error_log, load_error_log
from atomuq.workflows.train import ConfigError, TrainCallback, TrainConfig, train_model
from atomuq.workflows.train.config import ErrorLogConfig

ROOT = Path(__file__).resolve().parents[1]
GRID = HistogramBins(log_edges(10))


def histogram_writer(folder: Path, n_epochs: int, n_atoms: int, skip: int) -> HistogramLogWriter:
    rng = np.random.default_rng(0)  # the same atoms as write_full_log(seed=0)
    offsets = np.array([0, 30, 55, n_atoms])
    return HistogramLogWriter.create(
        folder, run_id="run0", n_epochs=n_epochs, skip_epochs=skip, per_decade=10, structure_offsets=offsets,
        numbers=rng.choice([1, 6, 8], size=n_atoms), reference_force_norms=rng.uniform(0.1, 5.0, n_atoms),
        training_files=[{"path": "train.extxyz", "sha256": "abc"}], training_data_hash="abc")


def feed(writer: HistogramLogWriter, errors: dict[str, np.ndarray], epochs: range) -> None:
    for epoch in epochs:
        writer.begin_epoch(epoch)
        half = errors["direct"].shape[1] // 2  # two chunks, as evaluate_set writes batches
        for sl in (slice(0, half), slice(half, None)):
            writer.write(sl.start or 0, errors["direct"][epoch, sl], errors["conservative"][epoch, sl])
        writer.end_epoch(f"fp{epoch}")


def test_counts_while_training_equal_the_compacted_full_log(tmp_path):
    errors = synthetic_errors(n_epochs=12, n_atoms=90)
    full = write_full_log(tmp_path / "full", errors, [30, 25, 35])
    compact = compact_error_log(full, tmp_path / "compact", skip_epochs=3)
    writer = histogram_writer(tmp_path / "online", 12, 90, skip=3)
    feed(writer, errors, range(12))
    online = load_error_log(tmp_path / "online")
    assert online.form == "histogram" and online.epochs == compact.epochs == (4, 12)
    for kind in ("direct", "conservative"):
        a, b = online.distribution(kind), compact.distribution(kind)
        assert np.array_equal(a.histogram(GRID), b.histogram(GRID))  # compact has one extra edge: merge onto the grid
        assert a.final_mean_error == pytest.approx(b.final_mean_error, rel=1e-6)
        assert np.array_equal(a.confidence(0.1), b.confidence(0.1))  # 0.1 eV/Å is an edge of both: exact
    assert online.metadata["model_fingerprints"] == [f"fp{e}" for e in range(12)]
    assert np.array_equal(online.atom_numbers, load_error_log(full).atom_numbers)


def test_a_kill_between_the_log_and_the_state_rolls_the_extra_epoch_back(tmp_path):
    errors = synthetic_errors(n_epochs=8, n_atoms=90)
    whole = histogram_writer(tmp_path / "whole", 8, 90, skip=2)
    feed(whole, errors, range(8))
    cut = histogram_writer(tmp_path / "cut", 8, 90, skip=2)
    feed(cut, errors, range(6))  # the log counted epoch 6, the training state (killed) holds 5
    again = HistogramLogWriter.reopen(tmp_path / "cut", run_id="run0", epochs_completed=5)
    assert json.loads((tmp_path / "cut" / "error_log.json").read_text())["epochs_held"] == [3, 5]
    feed(again, errors, range(5, 8))
    a, b = (np.load(tmp_path / name / HISTOGRAMS) for name in ("whole", "cut"))
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        assert np.array_equal(a[key], b[key]), key
    with pytest.raises(InputError, match="counts up to epoch 8 but the training state has 5"):
        HistogramLogWriter.reopen(tmp_path / "cut", run_id="run0", epochs_completed=5)
    with pytest.raises(InputError, match="belongs to run 'run0'"):
        HistogramLogWriter.reopen(tmp_path / "cut", run_id="other", epochs_completed=8)


def test_a_log_before_its_first_counted_epoch_is_refused_with_the_epoch(tmp_path):
    errors = synthetic_errors(n_epochs=6, n_atoms=90)
    writer = histogram_writer(tmp_path / "log", 6, 90, skip=3)
    feed(writer, errors, range(2))
    with pytest.raises(InputError, match="holds no epoch yet .2 trained; it counts from epoch 4"):
        load_error_log(tmp_path / "log")
    with pytest.raises(InputError, match="counted them while training"):
        feed(writer, errors, range(2, 6)) or load_error_log(tmp_path / "log").errors_direct


def test_non_finite_errors_stop_the_epoch_naming_the_atoms(tmp_path):
    errors = synthetic_errors(n_epochs=3, n_atoms=90)
    errors["conservative"][1, 7] = np.nan
    writer = histogram_writer(tmp_path / "log", 3, 90, skip=0)
    with pytest.raises(FloatingPointError, match=r"epoch 2 has non-finite conservative errors for atoms \[7\]"):
        feed(writer, errors, range(3))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    write(folder / "tiny_train.extxyz", emt_structures(0, n_cells=6, n_molecules=6))
    write(folder / "tiny_val.extxyz", emt_structures(1, n_cells=3, n_molecules=3))
    shutil.copy(ROOT / "configs" / "train_tiny.toml", folder / "tiny.toml")
    return folder


def histogram_config(data_dir: Path, run: str) -> TrainConfig:
    config = TrainConfig.from_toml(data_dir / "tiny.toml")
    return dataclasses.replace(config, run_dir=data_dir / run, epochs=4,
                               error_log=ErrorLogConfig(form="histogram", last_epochs=3))


class KillAfterEpoch(TrainCallback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch, row, model, improved):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_training_counts_histograms_and_resumes_to_the_same_counts_and_weights(data_dir):
    whole = train_model(histogram_config(data_dir, "whole"))
    config = histogram_config(data_dir, "cut")
    with pytest.raises(KeyboardInterrupt):
        train_model(config, callback=KillAfterEpoch(2))
    assert not (config.run_dir / "error_log" / "errors_direct.npy").exists()  # no float32 rows
    resumed = train_model(config)
    assert resumed.start_epoch == 2 and resumed.epochs_completed == 4
    a, b = load_error_log(whole.run_dir / "error_log"), load_error_log(config.run_dir / "error_log")
    assert a.epochs == b.epochs == (2, 4)
    for kind in ("direct", "conservative"):
        assert np.array_equal(a.distribution(kind).counts, b.distribution(kind).counts)
        assert a.distribution(kind).n_epochs == 3
    for name, tensor in torch.load(whole.run_dir / "last.pt", weights_only=True)["state_dict"].items():
        assert torch.equal(tensor, torch.load(config.run_dir / "last.pt", weights_only=True)["state_dict"][name]), name


def test_last_epochs_counts_the_last_ones_and_a_shorter_run_counts_all():
    config = ErrorLogConfig(form="histogram", last_epochs=20)
    assert config.skip_epochs(40) == 20 and config.skip_epochs(20) == 0 and config.skip_epochs(12) == 0
    assert ErrorLogConfig(form="histogram").skip_epochs(40) == 0


def test_error_log_settings_are_checked_naming_the_key(data_dir):
    text = (data_dir / "tiny.toml").read_text()
    for table, message in (('[error_log]\nform = "float16"\n', "error_log.form"),
                           ('[error_log]\nlast_epochs = 2\n', "applies to form"),
                           ('[error_log]\nform = "histogram"\nlast_epochs = -1\n', "last_epochs"),
                           ('[error_log]\nform = "histogram"\nbins_per_decade = 0\n', "bins_per_decade")):
        path = data_dir / "bad.toml"
        path.write_text(text + "\n" + table)
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_toml(path)
