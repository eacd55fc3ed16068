"""atomuq train: losses, error log, checkpoints, resume, equigrad, reference energies, config errors.

Tiny EMT-labelled data (rattled Cu/Al fcc cells with stress, a few small molecules) and the
tiny model of configs/train_tiny.toml keep the whole file to seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.io import read, write
from conftest import emt_structures
from single_thread import one_thread  # noqa: F401  (one torch thread in this module)
from typer.testing import CliRunner

from atomuq.cli.main import app
from atomuq.core.batch import Batch
from atomuq.core.errors import InputError
from atomuq.models.checkpoint import load_model, weights_fingerprint
from atomuq.models.derivatives import evaluate, rotational_gradient_norm
from atomuq.workflows import train as train_module
from atomuq.workflows.train import loop as train_loop
from atomuq.workflows.error_log import load_error_log
from atomuq.workflows.train import (
    ConfigError,
    TrainCallback,
    TrainConfig,
    TrainingError,
    composition_matrix,
    fit_reference_energies,
    random_rotations,
    rotate,
    split_validation,
    train_model,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "train_tiny.toml"
EPOCHS = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    write(folder / "tiny_train.extxyz", emt_structures(0, n_cells=6, n_molecules=6))
    write(folder / "tiny_val.extxyz", emt_structures(1, n_cells=3, n_molecules=3))
    shutil.copy(TINY_CONFIG, folder / "tiny.toml")
    return folder


def _config(data_dir: Path, run: str, **changes) -> TrainConfig:
    config = TrainConfig.from_toml(data_dir / "tiny.toml")
    loss = changes.pop("loss", None)
    if loss:
        changes["loss"] = dataclasses.replace(config.loss, **loss)
    return dataclasses.replace(config, run_dir=data_dir / run, **changes)


class Recorder(TrainCallback):
    """Keeps the model's predictions on the validation structures at the end of every epoch."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.predictions: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def on_epoch_end(self, epoch, row, model, improved):
        p = evaluate(model, self.batch)
        self.predictions[epoch] = (p.energy.detach().clone(), p.forces_direct.detach().clone(),
                                   p.forces_conservative.detach().clone())


@pytest.fixture(scope="module")
def baseline(data_dir):
    """One uninterrupted run of the tiny config; the reference for several tests."""
    config = _config(data_dir, "baseline")
    recorder = Recorder(Batch.from_atoms(read(data_dir / "tiny_val.extxyz", ":")))
    result = train_model(config, callback=recorder)
    return config, result, recorder


def test_config_file_parses_and_short_run_lowers_training_loss(baseline):
    config, result, _ = baseline
    assert config.epochs == EPOCHS and result.epochs_completed == EPOCHS
    history = result.history
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["train_loss_forces"] < history[0]["train_loss_forces"]
    # every configured term was computed and logged
    for term in ("energy", "forces", "conservative_forces", "conservative_stress", "confidence"):
        assert np.isfinite(history[-1][f"train_loss_{term}"])
    run = config.run_dir
    for name in ("best.pt", "last.pt", "train_state.pt", "metrics.csv", "config.toml", "config_resolved.json"):
        assert (run / name).is_file(), name
    lines = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == EPOCHS + 1 and lines[0].startswith("epoch,lr,train_loss")


def test_error_log_has_one_value_per_atom_per_epoch_matching_the_saved_model(baseline, data_dir):
    config, result, _ = baseline
    log = load_error_log(config.run_dir / "error_log")
    structures = read(data_dir / "tiny_train.extxyz", ":")
    sizes = np.array([len(a) for a in structures])
    n_atoms = int(sizes.sum())
    assert log.errors_direct.shape == (EPOCHS, n_atoms) == log.errors_conservative.shape
    assert np.isfinite(log.errors_direct).all() and np.isfinite(log.errors_conservative).all()
    assert np.array_equal(log.structure_offsets, np.concatenate([[0], np.cumsum(sizes)]))
    assert np.array_equal(log.atom_numbers, np.concatenate([a.numbers for a in structures]))
    reference = np.concatenate([a.get_forces() for a in structures])
    assert np.allclose(log.reference_force_norms, np.linalg.norm(reference, axis=1), rtol=1e-6)
    meta = log.metadata
    assert meta["n_epochs_completed"] == meta["n_epochs_planned"] == EPOCHS
    assert meta["training_data_hash"] == hashlib.sha256((data_dir / "tiny_train.extxyz").read_bytes()).hexdigest()
    last = load_model(config.run_dir / "last.pt")
    assert meta["model_fingerprints"][-1] == weights_fingerprint(last) == result.history[-1]["fingerprint"]
    assert len(set(meta["model_fingerprints"])) == EPOCHS  # the weights changed every epoch
    # recompute the last epoch's errors one structure at a time from the saved model
    for s, atoms in enumerate(structures):
        pred = evaluate(last, Batch.from_atoms([atoms]))
        ref = torch.as_tensor(atoms.get_forces(), dtype=torch.float32)
        direct = torch.linalg.vector_norm(pred.forces_direct.detach() - ref, dim=1).numpy()
        conservative = torch.linalg.vector_norm(pred.forces_conservative.detach() - ref, dim=1).numpy()
        ids = log.global_ids(s, np.arange(len(atoms)))
        assert np.allclose(log.errors_direct[-1, ids], direct, rtol=1e-5, atol=1e-5)
        assert np.allclose(log.errors_conservative[-1, ids], conservative, rtol=1e-5, atol=1e-5)
    # the logged errors changed from the first to the last epoch (the log is not one row repeated)
    assert not np.allclose(log.errors_direct[0], log.errors_direct[-1])


def test_best_checkpoint_reloads_to_identical_predictions(baseline, data_dir):
    config, result, recorder = baseline
    best = load_model(config.run_dir / "best.pt")
    assert best.metadata["epoch"] == result.best_epoch
    assert best.metadata["seed"] == config.seed and best.metadata["wall_time_s"] > 0
    assert set(best.metadata["losses"]) >= {"train_loss", "train_loss_forces"}
    assert best.training_data_hash == result.training_data_hash
    val_mae = [row["val_forces_mae"] for row in result.history]
    assert result.best_epoch == int(np.argmin(val_mae)) + 1
    energy, forces, conservative = recorder.predictions[result.best_epoch]
    p = evaluate(best, recorder.batch)
    assert torch.allclose(p.energy, energy, rtol=0, atol=1e-6)
    assert torch.allclose(p.forces_direct, forces, rtol=0, atol=1e-6)
    assert torch.allclose(p.forces_conservative, conservative, rtol=0, atol=1e-6)


class InterruptAt(TrainCallback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_batch_end(self, epoch, batch, n_batches, loss):
        if (epoch, batch) == (self.epoch, self.batch):
            raise KeyboardInterrupt


def test_resume_after_interruption_gives_the_uninterrupted_weights(baseline, data_dir):
    base_config, base_result, _ = baseline
    config = _config(data_dir, "interrupted")
    with pytest.raises(KeyboardInterrupt):
        train_model(config, callback=InterruptAt(epoch=3, batch=2))
    state = torch.load(config.run_dir / "train_state.pt", weights_only=True)
    assert state["epoch"] == 2
    assert json.loads((config.run_dir / "error_log" / "error_log.json").read_text())["n_epochs_completed"] == 2
    result = train_model(config)  # resumes automatically: the state file exists
    assert result.start_epoch == 2 and result.epochs_completed == EPOCHS
    resumed = torch.load(config.run_dir / "last.pt", weights_only=True)["state_dict"]
    reference = torch.load(base_config.run_dir / "last.pt", weights_only=True)["state_dict"]
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    a, b = load_error_log(config.run_dir / "error_log"), load_error_log(base_config.run_dir / "error_log")
    assert np.array_equal(a.errors_direct, b.errors_direct)
    assert np.array_equal(a.errors_conservative, b.errors_conservative)
    keys = [k for k in base_result.history[0] if k != "wall_time_s"]
    assert [[r[k] for k in keys] for r in result.history] == [[r[k] for k in keys] for r in base_result.history]
    # a completed run is left alone when started again
    again = train_model(config)
    assert again.start_epoch == again.epochs_completed == EPOCHS


def test_equigrad_term_lowers_the_rotational_gradient(baseline, data_dir):
    base_config, base_result, _ = baseline
    config = _config(data_dir, "equigrad", loss={"equigrad": 1e6})
    result = train_model(config)
    batch = Batch.from_atoms(read(data_dir / "tiny_train.extxyz", ":"))

    def mean_rot(model):
        return float(rotational_gradient_norm(evaluate(model, batch, rotational=True)).mean())

    without, with_equigrad = mean_rot(base_result.model), mean_rot(result.model)
    assert with_equigrad < 0.5 * without
    assert result.history[-1]["train_rotational_gradient"] < 0.5 * base_result.history[-1]["train_rotational_gradient"]


def test_reference_energies_by_least_squares_recover_known_values():
    rng = np.random.default_rng(3)
    elements = [1, 6, 8, 29]
    truth = np.array([-13.6, -1030.2, -2040.7, -0.35])
    sizes = rng.integers(3, 12, size=25)
    numbers = rng.choice(elements, size=int(sizes.sum()))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    counts = composition_matrix(numbers, offsets, elements)
    assert counts.sum() == len(numbers) and np.array_equal(counts.sum(axis=1), sizes)
    energies = counts @ truth + rng.normal(scale=1e-4, size=len(sizes))
    fitted, rank = fit_reference_energies(numbers, offsets, energies, elements)
    assert rank == 4
    assert np.allclose(fitted, truth, atol=1e-3)
    # one composition only: rank 1, the totals are still reproduced
    same = np.tile([1, 1, 8], 5)
    offsets1 = np.arange(0, len(same) + 1, 3)
    fitted1, rank1 = fit_reference_energies(same, offsets1, np.full(5, -2067.9), [1, 8])
    assert rank1 == 1 and np.allclose(composition_matrix(same, offsets1, [1, 8]) @ fitted1, -2067.9)


def test_training_sets_reference_energies_and_scales_from_the_training_set(baseline, data_dir):
    _, result, _ = baseline
    structures = read(data_dir / "tiny_train.extxyz", ":")
    numbers = np.concatenate([a.numbers for a in structures])
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in structures])])
    energies = np.array([a.get_potential_energy() for a in structures])
    model = result.model
    fitted, _ = fit_reference_energies(numbers, offsets, energies, model.elements)
    assert np.allclose(model.reference_energies.double().numpy(), fitted, atol=1e-5)
    forces = np.concatenate([a.get_forces() for a in structures])
    rms = np.sqrt(np.mean(forces ** 2))
    assert float(model.force_scale) == pytest.approx(rms, rel=1e-6)
    assert float(model.energy_scale) == pytest.approx(rms, rel=1e-6)


def test_rotation_augmentation_matches_rotated_reference_labels(data_dir):
    structures = read(data_dir / "tiny_train.extxyz", ":")[:3]  # periodic cells with stress
    config = _config(data_dir, "unused")
    data = train_module.load_labelled(config.data.train, config.data, None, True, "training")
    batch, targets = data.batch([0, 1, 2], "cpu", torch.float64)
    rotations = random_rotations(3, torch.Generator().manual_seed(5))
    assert torch.allclose(rotations @ rotations.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(3, 3, 3))
    assert torch.allclose(torch.linalg.det(rotations), torch.ones(3, dtype=torch.float64))
    rotated, new_targets = rotate(batch, targets, rotations)
    for k, atoms in enumerate(structures):
        turned = atoms.copy()
        R = rotations[k].numpy()
        turned.set_cell(atoms.cell.array @ R.T, scale_atoms=False)
        turned.positions = atoms.positions @ R.T
        turned.calc = EMT()
        sl = slice(k * 4, (k + 1) * 4)
        assert np.allclose(rotated.positions[sl].numpy(), turned.positions)
        assert np.allclose(rotated.cell[k].numpy(), turned.cell.array)
        assert np.allclose(new_targets.forces[sl].numpy(), turned.get_forces(), atol=1e-8)
        assert np.allclose(new_targets.stress[k].numpy(), turned.get_stress(), atol=1e-9)
        assert turned.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=1e-7)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_config_keys_give_clear_errors(tmp_path):
    good = TINY_CONFIG.read_text()
    cases = {
        "typo": (good.replace("conservative_stress = 1.0", "conservative_stres = 1.0"),
                 ["loss.conservative_stres", "did you mean 'loss.conservative_stress'"]),
        "top": (good.replace("seed = 0", "sed = 0"), ["unknown key 'sed'", "did you mean 'seed'"]),
        "type": (good.replace("lr = 3e-3", 'lr = "fast"'), ["optimizer.lr: expected float, got 'fast'"]),
        "int": (good.replace("epochs = 4", 'epochs = "ten"'), ["epochs: expected int, got 'ten'"]),
        "float int": (good.replace("epochs = 4", "epochs = 4.5"), ["epochs: expected int, got 4.5"]),
        "bool": (good.replace("augment_rotations = true", "augment_rotations = 1"),
                 ["augment_rotations: expected true or false, got 1"]),
        "paths": (good.replace('train = ["tiny_train.extxyz"]', "train = 3"), ["data.train: expected a list of paths"]),
        "model type": (good.replace("latent = 16", 'latent = "16"'), ["model.latent: expected int, got '16'"]),
        "element": (good.replace("latent = 16", 'latent = 16\nelements = ["Cu", "Xx"]'),
                    ["model.elements: 'Xx' is not an element symbol"]),
        "nan": (good.replace("lr = 3e-3", "lr = nan"), ["optimizer.lr: must be finite"]),
        "lr": (good.replace("lr = 3e-3", "lr = -1.0"), ["optimizer.lr must be positive, got -1.0"]),
        "table": ("optimizer = 3\n" + good.split("[optimizer]")[0], ["optimizer: expected a table, got 3"]),
        "model": (good.replace("latent = 16", "latnt = 16"), ["model.latnt", "did you mean 'model.latent'"]),
        "missing": (good.replace('train = ["tiny_train.extxyz"]', ""), ["missing required key data.train"]),
        "value": (good.replace("epochs = 4", "epochs = 0"), ["epochs must be >= 1"]),
        "schedule": (good.replace('schedule = "cosine"', 'schedule = "linear"'), ["optimizer.schedule"]),
        "weight": (good.replace("energy = 1.0", "energy = -1.0"), ["loss.energy"]),
        "toml": (good + "\n[loss\n", ["not valid TOML"]),
        "finetune": ('init_from = "x.pt"\n' + good, ["init_from", "remove the [model] table"]),
    }
    for name, (text, expected) in cases.items():
        path = _write(tmp_path / f"{name}.toml", text)
        with pytest.raises(ConfigError) as info:
            TrainConfig.from_toml(path)
        message = str(info.value)
        assert str(path) in message, name
        for fragment in expected:
            assert fragment in message, (name, message)
    with pytest.raises(ConfigError, match="config file not found"):
        TrainConfig.from_toml(tmp_path / "nothing.toml")


def test_error_log_reader_names_truncated_and_empty_files(baseline, tmp_path):
    config, _, _ = baseline
    folder = tmp_path / "error_log"
    shutil.copytree(config.run_dir / "error_log", folder)
    direct = folder / "errors_direct.npy"
    direct.write_bytes(direct.read_bytes()[:-40])
    with pytest.raises(InputError, match="errors_direct.npy") as info:
        load_error_log(folder)
    assert "truncated" in str(info.value)
    shutil.copy(config.run_dir / "error_log" / "errors_direct.npy", direct)
    meta = json.loads((folder / "error_log.json").read_text())
    meta["n_epochs_completed"] = 0
    (folder / "error_log.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="empty"):
        load_error_log(folder)
    with pytest.raises(InputError, match="error_log.json"):
        load_error_log(tmp_path)


def test_nan_loss_stops_naming_epoch_and_batch(data_dir, monkeypatch):
    real = train_loop.compute_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        total, terms = real(*args, **kwargs)
        calls["n"] += 1
        return (total * float("nan"), terms) if calls["n"] == 2 else (total, terms)

    monkeypatch.setattr(train_loop, "compute_losses", poisoned)
    config = _config(data_dir, "nan", epochs=1)
    with pytest.raises(TrainingError, match="epoch 1, batch 2 of 3"):
        train_model(config)
    assert not (config.run_dir / "train_state.pt").exists()


def test_fine_tuning_starts_from_the_checkpoint(baseline, data_dir):
    base_config, _, _ = baseline
    start = load_model(base_config.run_dir / "best.pt")
    config = dataclasses.replace(_config(data_dir, "finetune", epochs=1, model={}),
                                 init_from=base_config.run_dir / "best.pt",
                                 loss=dataclasses.replace(base_config.loss, conservative_forces=1.0))

    class FirstBatch(TrainCallback):
        def on_start(self, info):
            self.scales = info["scales"]

    hook = FirstBatch()
    result = train_model(config, callback=hook)
    assert hook.scales == {"fitted": False}  # reference energies and scales kept from the checkpoint
    assert torch.equal(result.model.reference_energies, start.reference_energies)
    assert torch.equal(result.model.force_scale, start.force_scale)
    assert weights_fingerprint(result.model) != weights_fingerprint(start)
    assert load_model(config.run_dir / "last.pt").metadata["init_from"] == str(base_config.run_dir / "best.pt")


def test_cli_trains_resumes_and_reports_errors(data_dir):
    text = (data_dir / "tiny.toml").read_text().replace("epochs = 4", "epochs = 1").replace('"tiny_run"', '"cli_run"')
    path = _write(data_dir / "cli.toml", text)
    runner = CliRunner()
    first = runner.invoke(app, ["train", str(path)])
    assert first.exit_code == 0, first.output
    assert "best epoch 1" in first.output
    assert (data_dir / "cli_run" / "best.pt").is_file()
    again = runner.invoke(app, ["train", str(path), "--resume"])
    assert again.exit_code == 0 and "already complete" in again.output
    missing = runner.invoke(app, ["train", str(_write(data_dir / "cli2.toml", text.replace("cli_run", "cli_new"))),
                                  "--resume"])
    assert missing.exit_code == 1 and "no training state to resume" in missing.output
    member = runner.invoke(app, ["train", str(path), "--seed", "7", "--run-dir", str(data_dir / "cli_seed7")])
    assert member.exit_code == 0, member.output
    metadata = load_model(data_dir / "cli_seed7" / "best.pt").metadata
    assert metadata["seed"] == 7 and metadata["config"]["seed"] == 7
    assert weights_fingerprint(load_model(data_dir / "cli_seed7" / "best.pt")) != \
        weights_fingerprint(load_model(data_dir / "cli_run" / "best.pt"))


def test_validation_fraction_holds_out_a_fixed_subset(data_dir, tmp_path):
    from atomuq.core.io import read_structures

    records = read_structures([data_dir / "tiny_train.extxyz"])
    train_a, val_a = split_validation(records, 0.25, seed=0)
    train_b, val_b = split_validation(records, 0.25, seed=0)
    assert [r.index for r in val_a] == [r.index for r in val_b] and len(val_a) == 3
    assert sorted(r.index for r in train_a + val_a) == list(range(len(records)))
    assert [r.index for r in train_a] == sorted(r.index for r in train_a)
    with pytest.raises(ConfigError, match="empty split"):
        split_validation(records, 0.01, seed=0)
    text = (data_dir / "tiny.toml").read_text().replace('validation = ["tiny_val.extxyz"]', "validation_fraction = 0.25")
    (data_dir / "fraction.toml").write_text(text)
    config = TrainConfig.from_toml(data_dir / "fraction.toml")
    assert config.data.validation_fraction == 0.25 and config.data.validation == ()
    # a one-epoch run logs exactly the training frames, and says which frame each logged structure is
    seed = next(s for s in range(100) if 0 in [r.index for r in split_validation(records, 0.25, s)[1]])
    run = dataclasses.replace(config, epochs=1, run_dir=tmp_path / "fraction_run",
                              data=dataclasses.replace(config.data, validation_seed=seed))
    train_model(run)
    frames = np.load(tmp_path / "fraction_run" / "error_log" / "structure_frames.npy")
    kept = [r.index for r in split_validation(records, 0.25, seed)[0]]
    assert frames[:, 0].tolist() == [0] * len(kept) and frames[:, 1].tolist() == kept and 0 not in kept
    bad = text.replace("validation_fraction = 0.25", 'validation_fraction = 0.25\nvalidation = ["tiny_val.extxyz"]')
    (data_dir / "both.toml").write_text(bad)
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig.from_toml(data_dir / "both.toml")


def _held_out_seed(records, fraction, in_validation: bool, index: int) -> int:
    """A validation_seed that puts records[index] into the validation split (or keeps it for training)."""
    return next(s for s in range(200)
                if (records[index] in split_validation(records, fraction, s)[1]) == in_validation)


@pytest.mark.parametrize("small_file_held_out", [True, False])
def test_two_training_files_when_one_has_no_structure_in_a_split(data_dir, tmp_path, small_file_held_out):
    """Issue 12 item 2: a file with no structure in the training (or the validation) split used to crash the run
    ('records of 1 files for 2 paths'); per-file counts, the error log and the frame map must allow empty files."""
    from atomuq.core.io import read_structures
    from atomuq.workflows.ltau import training_records

    big, small = tmp_path / "big.extxyz", tmp_path / "small.extxyz"
    shutil.copy(data_dir / "tiny_train.extxyz", big)
    write(small, read(data_dir / "tiny_val.extxyz", "0"))  # one structure
    paths = [big, small]
    records = read_structures(paths)
    seed = _held_out_seed(records, 0.25, small_file_held_out, len(records) - 1)
    base = _config(data_dir, "unused")
    data = dataclasses.replace(base.data, train=tuple(paths), validation=(), validation_fraction=0.25,
                               validation_seed=seed)
    config = dataclasses.replace(base, run_dir=tmp_path / "run", data=data, epochs=1)
    result = train_model(config)
    assert result.epochs_completed == 1 and np.isfinite(result.history[0]["val_forces_mae"])
    log = load_error_log(tmp_path / "run" / "error_log")
    files = log.metadata["training_files"]
    kept = [r for r in split_validation(records, 0.25, seed)[0]]
    assert [f["path"] for f in files] == [str(big), str(small)]
    assert [f["n_structures"] for f in files] == [sum(r.source == str(p) for r in kept) for p in paths]
    assert files[1]["n_structures"] == (0 if small_file_held_out else 1)
    assert sum(f["n_atoms"] for f in files) == log.n_atoms
    # LTAU finds the logged structures again from the files
    again = training_records(log, paths)
    assert [(r.source, r.index) for r in again] == [(r.source, r.index) for r in kept]
    # the same through the CLI
    toml = tmp_path / "two.toml"
    toml.write_text((data_dir / "tiny.toml").read_text()
                    .replace('train = ["tiny_train.extxyz"]', f'train = ["{big}", "{small}"]')
                    .replace('validation = ["tiny_val.extxyz"]', f"validation_fraction = 0.25\nvalidation_seed = {seed}")
                    .replace("epochs = 4", "epochs = 1").replace('"tiny_run"', f'"{tmp_path / "cli_run"}"'))
    out = CliRunner().invoke(app, ["train", str(toml)])
    assert out.exit_code == 0, out.output
