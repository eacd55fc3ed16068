"""`atomuq improve`: one tiny generation end to end with EMT as the reference, resume after interruption, bad configs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from typer.testing import CliRunner

from atomuq.cli.main import app
from atomuq.reference import get_method
from atomuq.workflows.improve import EVALUATION_FILE, LABELLED_FILE, SEARCH_FILE, SELECTED_FILE, STATE_FILE, ImproveCallback, run_improve
from atomuq.workflows.improve_config import ImproveConfig
from atomuq.workflows.improve_eval import compare
from atomuq.workflows.train import ConfigError, TrainConfig, train_model

ROOT = Path(__file__).resolve().parents[1]


def cu_cells(seed: int, n: int) -> list:
    """EMT-labelled rattled 8-atom Cu fcc cells (energy eV, forces eV/Å, stress eV/Å³)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        atoms.positions += rng.normal(scale=0.06, size=atoms.positions.shape)
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "stress": atoms.get_stress()}
        atoms.calc = SinglePointCalculator(atoms, **results)
        out.append(atoms)
    return out


CONFIG = """
run_dir = "loop"
model = "model.pt"
generations = 1
tolerance = 0.05

[search]
starts = ["cu_train.extxyz"]
n_starts = 3
batch_size = 3
steps = 5
kT = 0.05
patience = 100

[select]
percentile = 0.0
rmsd_threshold = 0.001
max_selected = 4

[label]
method = "emt"

[finetune]
mode = "conservative"
replay_fraction = 0.5
replay = ["cu_train.extxyz"]
validation_fraction = 0.25
epochs = 2
batch_size = 4
augment_rotations = false

[finetune.optimizer]
lr = 1e-3

[evaluate]
test = ["cu_test.extxyz"]
fresh_starts = ["cu_test.extxyz"]
fresh_n = 2
fresh_steps = 3
md_starts = ["cu_test.extxyz"]
md_n = 1
equilibration_ps = 0.005
nve_ps = 0.01
traj_every = 5
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny native model trained 2 epochs on EMT copper, with the loop's config beside it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("improve")
    write(folder / "cu_train.extxyz", cu_cells(0, 8))
    write(folder / "cu_test.extxyz", cu_cells(1, 3))
    shutil.copy(ROOT / "configs" / "train_tiny.toml", folder / "tiny.toml")
    config = TrainConfig.from_toml(folder / "tiny.toml")
    data = dataclasses.replace(config.data, train=(folder / "cu_train.extxyz",), validation=(folder / "cu_test.extxyz",))
    train_model(dataclasses.replace(config, run_dir=folder / "base", data=data, epochs=2))
    shutil.copy(folder / "base" / "best.pt", folder / "model.pt")
    (folder / "improve.toml").write_text(CONFIG)
    yield folder
    torch.set_num_threads(threads)


class Interrupt(ImproveCallback):
    """Raises KeyboardInterrupt when `stage` of generation 1 starts; records stages started and skipped."""

    def __init__(self, stage: str | None) -> None:
        self.stage, self.started, self.skipped = stage, [], []

    def on_stage_start(self, generation, stage, total):
        self.started.append((generation, stage))
        if generation == 1 and stage == self.stage:
            raise KeyboardInterrupt

    def on_stage_end(self, generation, stage, info):
        if info.get("skipped"):
            self.skipped.append((generation, stage))


def test_one_generation_end_to_end_and_resume(folder):
    config = ImproveConfig.from_toml(folder / "improve.toml")
    gen = config.run_dir / "gen_001"
    with pytest.raises(KeyboardInterrupt):
        run_improve(config, Interrupt("label"))
    search_mtime = (gen / SEARCH_FILE).stat().st_mtime_ns
    assert (gen / SELECTED_FILE).is_file() and not (gen / LABELLED_FILE).exists()
    with pytest.raises(KeyboardInterrupt):
        run_improve(config, Interrupt("evaluate"))
    labelled_mtime = (gen / LABELLED_FILE).stat().st_mtime_ns
    assert (gen / "finetune" / "best.pt").is_file()
    resumed = Interrupt(None)
    evaluations = run_improve(config, resumed)
    # finished stages were not redone: their files are untouched, the stages were reported as skipped
    assert (gen / SEARCH_FILE).stat().st_mtime_ns == search_mtime
    assert (gen / LABELLED_FILE).stat().st_mtime_ns == labelled_mtime
    assert {(1, s) for s in ("search", "select", "label", "finetune")} <= set(resumed.skipped)
    assert (0, "evaluate") in resumed.skipped and (1, "evaluate") not in resumed.skipped
    assert resumed.started == [(1, "evaluate")]
    # every artefact
    for name in (SEARCH_FILE, SELECTED_FILE, LABELLED_FILE, "replay.extxyz", EVALUATION_FILE, "finetune/best.pt", "finetune/metrics.csv"):
        assert (gen / name).is_file(), name
    assert (config.run_dir / "gen_000" / EVALUATION_FILE).is_file() and (config.run_dir / "md_starts.extxyz").is_file()
    labelled = read(gen / LABELLED_FILE, ":")
    selected = read(gen / SELECTED_FILE, ":")
    assert len(labelled) == len(selected) >= 1
    ref = labelled[0].copy()
    ref.calc = get_method("emt").make_calculator()
    assert np.allclose(labelled[0].get_forces(), ref.get_forces())  # real EMT labels of the selected positions
    assert np.allclose(labelled[0].positions, selected[0].positions)
    # replay: half of the fine-tuning set comes from the original training file
    assert len(read(gen / "replay.extxyz", ":")) == len(labelled)
    state = json.loads((config.run_dir / STATE_FILE).read_text())
    assert set(state["done"]) == {"gen_000/evaluate"} | {f"gen_001/{s}" for s in ("search", "select", "label", "finetune", "evaluate")}
    # conservative mode trained the conservative forces too
    resolved = json.loads((gen / "finetune" / "config_resolved.json").read_text())
    assert resolved["loss"]["conservative_forces"] > 0 and resolved["init_from"] == str(folder / "model.pt")
    assert [e["generation"] for e in evaluations] == [0, 1]
    ev = evaluations[1]
    assert set(ev["test"]) == {"cu_test.extxyz"} and ev["md"]["runs"] == 1
    assert ev["fresh"]["n_structures"] == 2 and np.isfinite(ev["fresh"]["force_delta_best_mean"])
    assert {r["metric"] for r in ev["comparison"]} >= {"test/cu_test.extxyz/forces_mae", "md/drift_abs_median"}
    assert all(r["previous"] is not None for r in ev["comparison"])
    # a finished loop reruns as a no-op; more generations may be added, other changes are refused
    assert len(run_improve(config)) == 2
    changed = ImproveConfig.from_toml(folder / "improve.toml")
    with pytest.raises(ConfigError, match="differs from the run being resumed"):
        run_improve(dataclasses.replace(changed, tolerance=0.5))


def test_cli_runs_and_prints_the_summary(folder, tmp_path):
    text = CONFIG.replace('run_dir = "loop"', f'run_dir = "{tmp_path / "cli_loop"}"').replace('mode = "conservative"', 'mode = "direct"')
    for name in ("cu_train.extxyz", "cu_test.extxyz", "model.pt"):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "c.toml").write_text(text.replace("md_n = 1", "md_n = 1\nequilibration_ps = 0.0").replace("equilibration_ps = 0.005\n", ""))
    result = CliRunner().invoke(app, ["improve", str(tmp_path / "c.toml")])
    assert result.exit_code == 0, result.output
    assert "generation 1" in result.output and "forces MAE" in result.output
    resolved = json.loads((tmp_path / "cli_loop" / "gen_001" / "finetune" / "config_resolved.json").read_text())
    assert resolved["loss"]["conservative_forces"] == 0.0  # direct mode: energy + direct forces only


def test_compare_flags_metrics_that_got_worse():
    before = {
        "test": {"a": {"forces_mae": 0.10, "conservative_forces_mae": 0.20}},
        "md": {"drift_abs_median": 10.0, "survived_ps_mean": 1.0},
    }
    after = {
        "test": {"a": {"forces_mae": 0.104, "conservative_forces_mae": 0.30}},
        "md": {"drift_abs_median": 5.0, "survived_ps_mean": 0.5},
    }
    rows = {r["metric"]: r for r in compare(before, after, tolerance=0.05)}
    assert not rows["test/a/forces_mae"]["worse"]  # +4 % is within 5 %
    assert rows["test/a/conservative_forces_mae"]["worse"] and rows["test/a/conservative_forces_mae"]["change"] == pytest.approx(0.1)
    assert not rows["md/drift_abs_median"]["worse"]  # lower drift is better
    assert rows["md/survived_ps_mean"]["worse"]  # a shorter life is worse
    assert all(r["previous"] is None and not r["worse"] for r in compare(None, after, 0.05))
    # small steps that add up: each within 5 % of the previous generation, together 7 % worse than generation 0
    start = {"test": {"a": {"forces_mae": 0.100}}}
    middle = {"test": {"a": {"forces_mae": 0.104}}}
    last = {"test": {"a": {"forces_mae": 0.107}}}
    (row,) = compare(middle, last, 0.05, start)
    assert not row["worse"] and row["worse_than_start"] and row["start"] == 0.100


@pytest.mark.parametrize(
    "edits, message",
    [
        ([("[finetune]\n", "[finetune]\nrun_dir = 'x'\n")], "set by the improve loop"),
        ([('mode = "conservative"', 'mode = "both"')], "finetune.mode must be one of"),
        ([('replay = ["cu_train.extxyz"]', "")], "needs finetune.replay"),
        ([("n_starts = 3", "n_starts = 3\nstepz = 4")], "unknown key 'search.stepz'"),
        ([("[finetune.optimizer]\nlr = 1e-3", "[finetune.optimizer]\nlr = -1.0")], "optimizer.lr must be positive"),
        (
            [
                ('mode = "conservative"', 'mode = "direct"'),
                ("[finetune.optimizer]", "[finetune.loss]\nconservative_forces = 1.0\n[finetune.optimizer]"),
            ],
            "remove",
        ),
        ([("generations = 1", "generations = 0")], "generations must be >= 1"),
        ([("kT = 0.05", "kT = -1.0")], "kT must be positive"),
    ],
)
def test_bad_config_errors(folder, tmp_path, edits, message):
    path = tmp_path / "bad.toml"
    text = CONFIG
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        ImproveConfig.from_toml(path)


class StopInEvaluation(ImproveCallback):
    """Raises KeyboardInterrupt once the fixed adversarial search of generation 0's evaluation is done."""

    def __init__(self) -> None:
        self.stage, self.units = None, 0

    def on_stage_start(self, generation, stage, total):
        self.stage = (generation, stage)

    def advance(self, n):
        if self.stage == (0, "evaluate"):
            self.units += n
            if self.units >= 2:  # 1 test file + the fresh search
                raise KeyboardInterrupt


def test_evaluation_keeps_its_finished_parts(folder, tmp_path):
    config = dataclasses.replace(ImproveConfig.from_toml(folder / "improve.toml"), run_dir=tmp_path / "loop")
    gen0 = config.run_dir / "gen_000"
    with pytest.raises(KeyboardInterrupt):
        run_improve(config, StopInEvaluation())
    parts = json.loads((gen0 / "evaluation.partial.json").read_text())
    assert set(parts) == {"test", "fresh"} and not (gen0 / EVALUATION_FILE).exists()
    fresh_mtime = (gen0 / "fresh_search.extxyz").stat().st_mtime_ns
    run_improve(config, stop_after=lambda g, stage: True)  # finishes generation 0, stops after gen 1's search
    assert (gen0 / "fresh_search.extxyz").stat().st_mtime_ns == fresh_mtime  # the search was not repeated
    evaluation = json.loads((gen0 / EVALUATION_FILE).read_text())
    assert evaluation["fresh"] == parts["fresh"] and evaluation["md"]["runs"] == 1
    assert not (gen0 / "evaluation.partial.json").exists()
    assert (config.run_dir / "gen_001" / SEARCH_FILE).is_file() and not (config.run_dir / "gen_001" / SELECTED_FILE).exists()


class StopInSearch(ImproveCallback):
    """Raises KeyboardInterrupt after the first step of generation 1's adversarial search (inside the attack)."""

    def __init__(self) -> None:
        self.stage = None

    def on_stage_start(self, generation, stage, total):
        self.stage = (generation, stage)

    def advance(self, n):
        if self.stage == (1, "search"):
            raise KeyboardInterrupt


def test_an_interrupted_search_is_not_a_finished_stage(folder, tmp_path):
    config = dataclasses.replace(ImproveConfig.from_toml(folder / "improve.toml"), run_dir=tmp_path / "loop")
    with pytest.raises(KeyboardInterrupt):
        run_improve(config, StopInSearch())
    state = json.loads((config.run_dir / STATE_FILE).read_text())
    assert "gen_001/search" not in state["done"] and not (config.run_dir / "gen_001" / SEARCH_FILE).exists()


def test_finetune_on_several_small_files_with_a_validation_split(folder, tmp_path):
    """Issue 12 item 2: a later generation fine-tunes on several small labelled files (finetune.accumulate) plus the
    replay subset; a file with no structure in the validation split (or none left for training) used to crash it."""
    from atomuq.workflows.improve import finetune

    config = dataclasses.replace(ImproveConfig.from_toml(folder / "improve.toml"), run_dir=tmp_path / "loop")
    config = dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, accumulate=True))
    cells = read(folder / "cu_train.extxyz", ":")
    labelled = [tmp_path / "gen_001.extxyz", tmp_path / "gen_002.extxyz"]
    write(labelled[0], cells[:1])  # one structure: in one of the two splits only
    write(labelled[1], cells[1:4])
    info = finetune(config, tmp_path, labelled, folder / "model.pt", 2, ImproveCallback())
    assert info["epochs"] == 2 and info["new"] == 4 and info["replay"] == 4
    files = json.loads((tmp_path / "finetune" / "error_log" / "error_log.json").read_text())["training_files"]
    assert [Path(f["path"]).name for f in files] == ["gen_001.extxyz", "gen_002.extxyz", "replay.extxyz"]
    assert sum(f["n_structures"] for f in files) == 6  # 8 structures, 2 held out for validation
