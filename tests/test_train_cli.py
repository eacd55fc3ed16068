"""`atomuq train` from the outside: bad inputs refused before any work, Ctrl-C, restarts and resume checks.

Every case runs the CLI in-process; a refused start must exit non-zero with one line naming the file
(and the structure), no traceback, and leave nothing that blocks the rerun.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import write
from conftest import emt_structures
from single_thread import one_thread  # noqa: F401  (one torch thread in this module)
from typer.testing import CliRunner

from atomuq.cli import train_commands
from atomuq.cli.main import app
from atomuq.workflows.train import ConfigError, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def structures():
    return emt_structures(0, n_cells=3, n_molecules=3), emt_structures(1, n_cells=1, n_molecules=1)


@pytest.fixture()
def folder(tmp_path, structures) -> Path:
    """tiny_train.extxyz, tiny_val.extxyz and tiny.toml (configs/train_tiny.toml, 2 epochs) in a fresh folder."""
    train, val = structures
    write(tmp_path / "tiny_train.extxyz", train)
    write(tmp_path / "tiny_val.extxyz", val)
    (tmp_path / "tiny.toml").write_text((ROOT / "configs" / "train_tiny.toml").read_text().replace("epochs = 4", "epochs = 2"))
    return tmp_path


def run(*args):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def refused(result, *fragments) -> str:
    """The one-line error of a refused start."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output and text.startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


def _broken_train_file(folder: Path, change) -> Path:
    frames = emt_structures(0, n_cells=3, n_molecules=3)
    change(frames[4])
    write(folder / "tiny_train.extxyz", frames)
    return folder / "tiny_train.extxyz"


@pytest.mark.parametrize("name, change, message", [
    ("overlap", lambda a: a.positions.__setitem__(1, a.positions[0] + 0.01), "structure 4: atoms 0 and 1 overlap"),
    ("nan", lambda a: a.positions.__setitem__(0, np.nan), "structure 4: positions of atoms [0] are NaN"),
    ("no cell", lambda a: a.set_pbc(True), "structure 4: periodic along abc but the cell vector is zero"),
])
def test_bad_training_structures_are_refused_naming_file_and_structure(folder, name, change, message):
    path = _broken_train_file(folder, change)
    refused(run(folder / "tiny.toml"), str(path), message)
    assert not (folder / "tiny_run").exists()  # nothing written: the fixed file simply reruns


def test_unknown_element_is_named_by_symbol(folder):
    text = (folder / "tiny.toml").read_text().replace("latent = 16", 'latent = 16\nelements = ["H", "C", "N", "O", "Al"]')
    (folder / "tiny.toml").write_text(text)
    refused(run(folder / "tiny.toml"), "tiny_train.extxyz structure 0", "element(s) Cu not supported")


@pytest.mark.parametrize("content, message", [(b"", "Empty file"), (bytes(range(256)) * 4, "cannot read structures")])
def test_empty_and_binary_training_files(folder, content, message):
    (folder / "tiny_train.extxyz").write_bytes(content)
    refused(run(folder / "tiny.toml"), str(folder / "tiny_train.extxyz"), message)


def test_bad_config_files(folder, tmp_path):
    refused(run(folder / "nothing.toml"), "nothing.toml: config file not found")
    refused(run(folder), f"{folder}: is a folder")
    (folder / "binary.toml").write_bytes(bytes(range(256)))
    refused(run(folder / "binary.toml"), "binary.toml: not valid TOML")
    (folder / "typo.toml").write_text((folder / "tiny.toml").read_text().replace("epochs = 2", 'epochs = "two"'))
    refused(run(folder / "typo.toml"), "typo.toml: epochs: expected int, got 'two'")


def test_bad_run_folders_are_refused_before_any_work(folder):
    (folder / "afile").write_text("x")
    refused(run(folder / "tiny.toml", "--run-dir", folder / "afile"), "--run-dir", "is a file, not a folder")
    refused(run(folder / "tiny.toml", "--run-dir", folder / "afile" / "run"), "--run-dir", "is a file, not a folder")
    (folder / "tiny.toml").write_text((folder / "tiny.toml").read_text().replace('"tiny_run"', '"afile"'))
    refused(run(folder / "tiny.toml"), "tiny.toml: run_dir", "is a file, not a folder")


def test_library_errors_name_the_key_an_option_sets(folder):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(folder / "tiny.toml", overrides={"epochs": 0})
    assert info.value.field == "epochs" and info.value.reason == "must be >= 1, got 0"
    assert str(info.value) == f"{folder / 'tiny.toml'}: epochs must be >= 1, got 0"
    assert train_commands._flagged(info.value, {"epochs": 0}).args[0] == "--epochs 0: must be >= 1, got 0"
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(folder / "tiny.toml", overrides={"optimizer.lr": "x"})
    assert info.value.field == "optimizer.lr" and "expected float" in info.value.reason


def _interrupt_at(stop_epoch: int):
    """A RichTrainCallback.on_batch_end that presses Ctrl-C in the first batch of stop_epoch."""
    def on_batch_end(callback, epoch, batch, n_batches, loss):
        if epoch == stop_epoch:
            raise KeyboardInterrupt
    return on_batch_end


def test_ctrl_c_exits_130_keeps_the_checkpoint_and_the_rerun_resumes(folder, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(train_commands.RichTrainCallback, "on_batch_end", _interrupt_at(2))
        stopped = run(folder / "tiny.toml")
    assert stopped.exit_code == 130, stopped.output
    text = " ".join(stopped.output.split())
    assert "train_state.pt holds epoch 1" in text and "again to resume" in text and "Traceback" not in text
    resumed = run(folder / "tiny.toml")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming in" in resumed.output and "best epoch" in resumed.output
    assert torch.load(folder / "tiny_run" / "train_state.pt", weights_only=True)["epoch"] == 2


def test_ctrl_c_in_the_first_epoch_leaves_nothing_that_blocks_the_rerun(folder, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(train_commands.RichTrainCallback, "on_batch_end", _interrupt_at(1))
        stopped = run(folder / "tiny.toml")
    assert stopped.exit_code == 130 and "before the first epoch completed" in " ".join(stopped.output.split())
    assert (folder / "tiny_run" / "error_log").is_dir() and not (folder / "tiny_run" / "train_state.pt").exists()
    again = run(folder / "tiny.toml")
    assert again.exit_code == 0, again.output
    assert "training in" in again.output
    # a folder left by a different unfinished run is not taken over
    shutil.rmtree(folder / "tiny_run" / "error_log")
    (folder / "tiny_run" / "train_state.pt").unlink()
    other = folder / "other.toml"
    other.write_text((folder / "tiny.toml").read_text().replace("lr = 3e-3", "lr = 1e-3"))
    refused(run(other), "tiny_run: holds best.pt, last.pt, metrics.csv from another run")


def test_resume_refuses_a_changed_config_naming_the_keys(folder):
    assert run(folder / "tiny.toml").exit_code == 0
    changed = folder / "changed.toml"
    changed.write_text((folder / "tiny.toml").read_text().replace("lr = 3e-3", "lr = 1e-3")
                       .replace("energy = 1.0", "energy = 2.0"))
    refused(run(changed), "differs from the run being resumed", "optimizer.lr: 0.003 -> 0.001",
            "loss.energy: 1.0 -> 2.0")
    refused(run(folder / "tiny.toml", "--epochs", 3), "epochs: 2 -> 3")
    again = run(folder / "tiny.toml", "--device", "cpu")  # the device may change
    assert again.exit_code == 0 and "already complete" in again.output
    # so may the folders of the run and its files, not the contents of the files
    moved = folder / "moved"
    moved.mkdir()
    for name in ("tiny.toml", "tiny_train.extxyz", "tiny_val.extxyz", "tiny_run"):
        shutil.move(folder / name, moved / name)
    assert "already complete" in run(moved / "tiny.toml").output
    write(moved / "tiny_val.extxyz", emt_structures(2, n_cells=1, n_molecules=1))
    refused(run(moved / "tiny.toml"), "data.validation files changed since the run")
    write(moved / "tiny_train.extxyz", emt_structures(2, n_cells=3, n_molecules=3))
    refused(run(moved / "tiny.toml"), "the training files changed since the run")


def test_set_overrides_any_key_in_toml_syntax_and_bad_ones_are_named(folder):
    result = run(folder / "tiny.toml", "--set", "model.latent=8", "--set", "model.hidden=12", "--set", "epochs=1",
                 "--set", 'error_log.form="histogram"', "--run-dir", folder / "small")
    assert result.exit_code == 0, result.output
    resolved = json.loads((folder / "small" / "config_resolved.json").read_text())
    assert resolved["model"]["latent"] == 8 and resolved["model"]["hidden"] == 12 and resolved["epochs"] == 1
    assert (folder / "small" / "error_log" / "error_histograms.npz").is_file()
    assert train_commands.parse_settings(["optimizer.lr=2e-3", "data.train=[\"a.xyz\"]", "note=plain text"]) == {
        "optimizer.lr": 2e-3, "data.train": ["a.xyz"], "note": "plain text"}
    refused(run(folder / "tiny.toml", "--set", "model.latent"), "--set model.latent: give KEY=VALUE")
    refused(run(folder / "tiny.toml", "--set", "optimizer.lr=fast", "--run-dir", folder / "x"), "optimizer.lr")
    refused(run(folder / "tiny.toml", "--set", "nosuch=1", "--run-dir", folder / "y"), "nosuch")
