"""`atomuq improve CONFIG`: close the loop of methods.md section 8, generation after generation.

Each generation g = 1, 2, ... starts from the model of generation g−1 (generation 0: the
configured model, evaluated first as the baseline) and runs five stages in RUN_DIR/gen_00g/:

1. search: adversarial search (workflows/attack.py) from n_starts structures drawn afresh
   (seed + g) -> search.extxyz (every recorded frame);
2. select: percentile / RMSD / cap selection (workflows/selection.py) -> selected.extxyz;
3. label: reference labels (core/labelling.py, resumable through labelled.extxyz.partial)
   -> labelled.extxyz;
4. finetune: fine-tuning (workflows/train.py, resumable through train_state.pt) from the previous
   model on the labelled structures (plus earlier generations' with accumulate) and a replay
   subset of the original training data (replay.extxyz) -> finetune/best.pt;
5. evaluate: improve_eval.py -> evaluation.json, with every metric compared to the previous generation
   and to generation 0 (changes for the worse beyond config.tolerance flagged).

RUN_DIR/improve_state.json lists the finished stages; a rerun skips them, so an interrupted
loop resumes at the stage it was in (the evaluation keeps its finished parts in
evaluation.partial.json). The fixed MD starts are equilibrated once into RUN_DIR/md_starts.extxyz.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from atomuq.core.errors import AtomuqError
from atomuq.core.io import atomic_path, read_structures, write_structures
from atomuq.workflows.label import label_structures
from atomuq.models.checkpoint import load_model
from atomuq.models.protocol import AtomisticModel
from atomuq.workflows.attack import attack
from atomuq.workflows.improve_config import ImproveConfig
from atomuq.workflows.improve_eval import (
    compare,
    draw,
    draw_indices,
    equilibrate_starts,
    fresh_search,
    nve_runs,
    read_atoms,
    summarise_md,
    test_errors,
)
from atomuq.workflows.selection import select
from atomuq.workflows.train import BEST_FILE, ConfigError, TrainCallback, _config_differences, train_model

STATE_FILE = "improve_state.json"
STATE_FORMAT = "atomuq-improve-state"
STAGES = ("search", "select", "label", "finetune", "evaluate")
SEARCH_FILE, SELECTED_FILE, LABELLED_FILE, REPLAY_FILE = "search.extxyz", "selected.extxyz", "labelled.extxyz", "replay.extxyz"
FINETUNE_DIR, EVALUATION_FILE, MD_STARTS_FILE = "finetune", "evaluation.json", "md_starts.extxyz"


class ImproveError(AtomuqError):
    """A stage of the loop produced nothing to go on with (no structure selected or labelled)."""


class ImproveCallback:
    """Hooks the loop calls (progress display, tests); every method is optional."""

    train_callback: TrainCallback | None = None

    def on_stage_start(self, generation: int, stage: str, total: int | None) -> None:
        """A stage begins (total: units of progress, None when unknown)."""

    def advance(self, n: int) -> None:
        """n more units of the current stage are done."""

    def on_stage_end(self, generation: int, stage: str, info: dict[str, Any]) -> None:
        """A stage finished (info: what it produced); also called, with info['skipped'], for finished stages."""

    def log(self, message: str) -> None:
        """A one-line note."""


def generation_dir(run_dir: Path, generation: int) -> Path:
    """RUN_DIR/gen_00g."""
    return Path(run_dir) / f"gen_{generation:03d}"


def model_path(config: ImproveConfig, generation: int) -> Path:
    """The model file of a generation (0: the starting model; g: gen_00g/finetune/best.pt)."""
    if generation == 0:
        return config.model_file
    return generation_dir(config.run_dir, generation) / FINETUNE_DIR / BEST_FILE


class State:
    """RUN_DIR/improve_state.json: the config the run was made with and the finished stages with their info."""

    def __init__(self, config: ImproveConfig) -> None:
        self.path = Path(config.run_dir) / STATE_FILE
        self.config = config.to_dict()
        self.done: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"{self.path}: unreadable improve state ({exc}); delete {config.run_dir} to start over") from exc
            if data.get("format") != STATE_FORMAT:
                raise ConfigError(f"{self.path}: not an atomuq improve state")
            diffs = _config_differences(data["config"], self.config)
            if diffs:
                raise ConfigError(
                    f"{config.source or 'config'}: differs from the run being resumed in "
                    f"{config.run_dir} ({'; '.join(diffs)}); restore those values or use a new "
                    "run_dir (only 'generations' may change)"
                )
            self.done = data["done"]

    def key(self, generation: int, stage: str) -> str:
        """State key of a stage, e.g. gen_001/label."""
        return f"gen_{generation:03d}/{stage}"

    def finished(self, key: str) -> bool:
        """True when the stage is marked done."""
        return key in self.done

    def mark(self, key: str, info: dict[str, Any]) -> None:
        """Mark a stage done (written atomically)."""
        self.done[key] = info
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            Path(tmp).write_text(json.dumps({"format": STATE_FORMAT, "config": self.config, "done": self.done}, indent=1, default=float))


def _write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1, default=float))


# ------------------------------------------------------------------------------------------ stages


def search_stage(config: ImproveConfig, model: AtomisticModel, generation: int, folder: Path, callback: ImproveCallback) -> dict[str, Any]:
    """Adversarial search from n_starts structures drawn with seed + generation; writes search.extxyz."""
    starts = draw(read_atoms(config.search.starts), config.search.n_starts, config.search.seed + generation)
    settings = dataclasses.replace(config.attack, seed=config.attack.seed + generation)
    size = config.search.batch_size
    callback.on_stage_start(generation, "search", -(-len(starts) // size) * (settings.steps + 1))
    result = attack(model, starts, settings, size, progress=callback.advance)
    if result.interrupted:  # the stage is not finished: Ctrl-C goes on up, and a rerun repeats the search
        raise KeyboardInterrupt
    frames = result.to_atoms(starts)
    for f in frames:
        f.info["generation"] = generation
    write_structures(folder / SEARCH_FILE, frames)
    return {"starts": len(starts), "frames": len(frames), "failed": sum(o.failed for o in result.outcomes)}


def select_stage(config: ImproveConfig, generation: int, folder: Path, callback: ImproveCallback) -> dict[str, Any]:
    """Selection of search.extxyz by U_Δ above the starts' percentile, RMSD and cap; writes selected.extxyz."""
    callback.on_stage_start(generation, "select", None)
    frames = read_atoms([folder / SEARCH_FILE])
    starts = {int(f.info["source_index"]): float(f.info["force_delta_start"]) for f in frames}
    chosen = select(frames, list(starts.values()), config.select_settings)
    if not chosen:
        raise ImproveError(
            f"{folder / SEARCH_FILE}: no frame passed the selection (U_Δ above the "
            f"{config.select.percentile:g}th percentile of the starts, within the energy cap); lower "
            "select.percentile or search longer"
        )
    write_structures(folder / SELECTED_FILE, [frames[k] for k in chosen])
    return {"selected": len(chosen)}


def label_stage(config: ImproveConfig, generation: int, folder: Path, callback: ImproveCallback) -> dict[str, Any]:
    """Reference labels of selected.extxyz into labelled.extxyz (resumes through labelled.extxyz.partial)."""
    records = read_structures([folder / SELECTED_FILE])
    callback.on_stage_start(generation, "label", len(records))
    report = label_structures(
        records,
        config.label.method,
        folder / LABELLED_FILE,
        workers=config.label.workers,
        options=config.label_options,
        progress=callback.advance,
        log=callback.log,
    )
    return {"labelled": report.n_labelled, "failed": len(report.failures), "resumed": report.n_resumed, "calc_seconds": report.calc_seconds}


def replay_subset(config: ImproveConfig, n_new: int, generation: int, output: Path) -> int:
    """Write replay_fraction of the fine-tuning set drawn from the replay files (seeded by generation); count."""
    r = config.finetune.replay_fraction
    if r <= 0:
        return 0
    n = max(1, int(round(r / (1.0 - r) * n_new)))
    pool = read_atoms(config.finetune.replay)
    chosen = draw_indices(len(pool), n, config.search.seed + 7919 * generation)
    if not output.is_file():
        write_structures(output, [pool[k] for k in chosen])  # labels kept
    return len(chosen)


def finetune(
    config: ImproveConfig, folder: Path, labelled: list[Path], init_from: Path, generation: int, callback: ImproveCallback
) -> dict[str, Any]:
    """Fine-tune init_from on the labelled files plus a replay subset, in folder/finetune (resumable)."""
    callback.on_stage_start(generation, "finetune", None)
    n_new = sum(len(read_structures([p])) for p in labelled)
    n_replay = replay_subset(config, n_new, generation, folder / REPLAY_FILE)
    files = list(labelled) + ([folder / REPLAY_FILE] if n_replay else [])
    train_config = config.train_config(folder / FINETUNE_DIR, files, init_from)
    result = train_model(train_config, resume=None, callback=callback.train_callback)
    return {
        "mode": config.finetune.mode,
        "new": n_new,
        "replay": n_replay,
        "epochs": result.epochs_completed,
        "best_epoch": result.best_epoch,
        result.best_metric_name: result.best_metric,
    }


def evaluate_generation(
    config: ImproveConfig,
    model: AtomisticModel,
    generation: int,
    folder: Path,
    md_starts: list | None,
    previous: dict[str, Any] | None,
    callback: ImproveCallback,
) -> dict[str, Any]:
    """Test-set force errors, fixed adversarial search and direct-force NVE of `model`; writes evaluation.json
    (finished parts survive an interruption in evaluation.partial.json)."""
    ev = config.evaluate
    partial_path = folder / "evaluation.partial.json"
    parts: dict[str, Any] = json.loads(partial_path.read_text()) if partial_path.is_file() else {}

    def save() -> None:
        _write_json(partial_path, parts)

    n_md = len(md_starts or [])
    callback.on_stage_start(generation, "evaluate", len(ev.test) + bool(ev.fresh_starts) + n_md)
    if ev.test and "test" not in parts:
        parts["test"] = test_errors(model, ev.test, ev.batch_size)
        save()
    callback.advance(len(ev.test))
    if ev.fresh_starts and "fresh" not in parts:
        starts = draw(read_atoms(ev.fresh_starts), ev.fresh_n, ev.fresh_seed)
        settings = dataclasses.replace(config.attack, steps=ev.fresh_steps, seed=ev.fresh_seed)
        parts["fresh"] = fresh_search(model, starts, settings, config.search.batch_size, folder / "fresh_search.extxyz")
        save()
    callback.advance(int(bool(ev.fresh_starts)))
    if md_starts:
        runs = parts.setdefault("md_runs", {})
        md_folder = folder / "md"
        md_folder.mkdir(parents=True, exist_ok=True)

        def saved() -> None:
            save()
            callback.advance(1)

        nve_runs(model, md_starts, ev, md_folder, runs, saved, say=callback.log)
    evaluation: dict[str, Any] = {"generation": generation, "model": model.source or None}
    evaluation.update({k: v for k, v in parts.items() if k != "md_runs"})
    if md_starts:
        ordered = [parts["md_runs"][f"start_{k:03d}"] for k in range(n_md)]
        evaluation["md"] = summarise_md(ordered)
        evaluation["md_runs"] = ordered
    start = None
    if generation > 0 and (generation_dir(config.run_dir, 0) / EVALUATION_FILE).is_file():
        start = json.loads((generation_dir(config.run_dir, 0) / EVALUATION_FILE).read_text())
    evaluation["comparison"] = compare(previous, evaluation, config.tolerance, start)
    _write_json(folder / EVALUATION_FILE, evaluation)
    partial_path.unlink(missing_ok=True)
    return evaluation


def prepare_md_starts(config: ImproveConfig, model: AtomisticModel, callback: ImproveCallback) -> list | None:
    """The fixed NVE starts: drawn from evaluate.md_starts and equilibrated once (RUN_DIR/md_starts.extxyz)."""
    ev = config.evaluate
    if not ev.md_starts:
        return None
    path = Path(config.run_dir) / MD_STARTS_FILE
    if not path.is_file():
        callback.on_stage_start(0, "md starts", None)
        structures = draw(read_atoms(ev.md_starts), ev.md_n, ev.seed)
        folder = Path(config.run_dir) / "md_equilibration"
        folder.mkdir(parents=True, exist_ok=True)
        write_structures(path, equilibrate_starts(model, structures, ev, folder, say=callback.log))
        callback.on_stage_end(0, "md starts", {"starts": len(structures), "file": str(path)})
    return read_atoms([path])


# ------------------------------------------------------------------------------------------ the loop


def load(path: Path, device: str) -> AtomisticModel:
    """A native model file, in eval mode, with .source set to its path."""
    model = load_model(path, device=device)
    model.eval()
    model.source = str(path)
    return model


def run_improve(
    config: ImproveConfig, callback: ImproveCallback | None = None, stop_after: Callable[[int, str], bool] | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) the loop; returns the evaluation of every generation, 0 (the starting model) first.
    stop_after(generation, stage) -> True ends the run cleanly after that stage (for tests and scripts)."""
    callback = callback or ImproveCallback()
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = State(config)
    if config.source is not None and not (run_dir / "config.toml").exists():
        shutil.copyfile(config.source, run_dir / "config.toml")
    base = load(config.model_file, config.device)
    md_starts = prepare_md_starts(config, base, callback)
    evaluations = []

    def stage(generation: int, name: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        key = state.key(generation, name)
        if state.finished(key):
            info = state.done[key]
            callback.on_stage_end(generation, name, {**info, "skipped": True})
            return info
        info = work()
        state.mark(key, info)
        callback.on_stage_end(generation, name, info)
        return info

    def evaluated(generation: int, model_file: Path) -> dict[str, Any]:
        folder = generation_dir(run_dir, generation)
        folder.mkdir(parents=True, exist_ok=True)
        previous = evaluations[-1] if evaluations else None
        stage(
            generation,
            "evaluate",
            lambda: {
                "file": str(folder / EVALUATION_FILE),
                **_headline(
                    evaluate_generation(config, load(model_file, config.device), generation, folder, md_starts, previous, callback)
                ),
            },
        )
        return json.loads((folder / EVALUATION_FILE).read_text())

    evaluations.append(evaluated(0, config.model_file))
    for g in range(1, config.generations + 1):
        folder = generation_dir(run_dir, g)
        folder.mkdir(parents=True, exist_ok=True)
        for name in STAGES[:-1]:
            stage(g, name, functools.partial(_generation_stage, config, name, g, folder, callback))
            if stop_after is not None and stop_after(g, name):
                return evaluations
        evaluations.append(evaluated(g, model_path(config, g)))
        if stop_after is not None and stop_after(g, "evaluate"):
            break
    return evaluations


def _generation_stage(config: ImproveConfig, name: str, g: int, folder: Path, callback: ImproveCallback) -> dict[str, Any]:
    """Run stage `name` (search, select, label or finetune) of generation g."""
    if name == "search":
        return search_stage(config, load(model_path(config, g - 1), config.device), g, folder, callback)
    if name == "select":
        return select_stage(config, g, folder, callback)
    if name == "label":
        return label_stage(config, g, folder, callback)
    return finetune(config, folder, _training_files(config, g), model_path(config, g - 1), g, callback)


def _training_files(config: ImproveConfig, generation: int) -> list[Path]:
    """labelled.extxyz of this generation, and of the earlier ones with finetune.accumulate."""
    first = 1 if config.finetune.accumulate else generation
    return [generation_dir(config.run_dir, g) / LABELLED_FILE for g in range(first, generation + 1)]


def _headline(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of an evaluation kept in the state file."""
    out: dict[str, Any] = {}
    tests = evaluation.get("test", {})
    if tests:
        out["forces_mae_mean"] = float(np.mean([t["forces_mae"] for t in tests.values()]))
        out["conservative_forces_mae_mean"] = float(np.mean([t["conservative_forces_mae"] for t in tests.values()]))
    if "fresh" in evaluation:
        out["fresh_force_delta"] = evaluation["fresh"]["force_delta_best_mean"]
    if "md" in evaluation:
        out.update(drift=evaluation["md"]["drift_abs_median"], survived_ps=evaluation["md"]["survived_ps_mean"])
    out["worse"] = [r["metric"] for r in evaluation.get("comparison", []) if r["worse"]]
    out["worse_than_start"] = [r["metric"] for r in evaluation.get("comparison", []) if r.get("worse_than_start")]
    return out
