"""`atomuq improve CONFIG`: search -> select -> label -> fine-tune -> evaluate, generation after generation."""

from __future__ import annotations

import dataclasses
import json

from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import Progress
from rich.table import Table

from atomuq.cli.common import cell, check_device, console, output_folder, progress_bar, say, user_errors
from atomuq.cli.train_commands import RichTrainCallback
from atomuq.core.errors import InputError
from atomuq.core.io import read_structures
from atomuq.core.validate import check_records
from atomuq.models.checkpoint import load_model
from atomuq.workflows.improve import STAGES, STATE_FILE, ImproveCallback, run_improve
from atomuq.workflows.improve_config import ImproveConfig

_SHOWN = {
    "search": ("starts", "frames", "failed"),
    "select": ("selected",),
    "label": ("labelled", "failed", "resumed"),
    "finetune": ("mode", "new", "replay", "epochs", "best_epoch"),
    "md starts": ("starts",),
}


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


class RichImproveCallback(ImproveCallback):
    """One progress bar per stage, a line per finished stage and the comparison table per evaluation."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.task: Any = None
        self.train_callback = RichTrainCallback(bar)

    def on_stage_start(self, generation: int, stage: str, total: int | None) -> None:
        """Start a bar for the stage."""
        self.task = self.bar.add_task(f"gen {generation} {stage}", total=total)

    def advance(self, n: int) -> None:
        """Advance the stage's bar."""
        if self.task is not None:
            self.bar.advance(self.task, n)

    def on_stage_end(self, generation: int, stage: str, info: dict[str, Any]) -> None:
        """One line per stage; the evaluation's comparison table."""
        if self.task is not None:
            total = next(t.total for t in self.bar.tasks if t.id == self.task) or 1
            self.bar.update(self.task, completed=total, total=total)
            self.task = None
        done = "done earlier" if info.get("skipped") else "done"
        details = ", ".join(f"{k} {_num(info[k])}" for k in _SHOWN.get(stage, ()) if k in info)
        say(f"generation {generation} {stage}: {done}" + (f" ({details})" if details else ""), out=self.bar.console)
        if stage == "evaluate" and "file" in info:
            self.bar.console.print(comparison_table(generation, Path(info["file"])))

    def log(self, message: str) -> None:
        """Print a note."""
        say(message, out=self.bar.console)


def comparison_table(generation: int, path: Path) -> Table:
    """Every metric of an evaluation.json with generation 0's and the previous generation's value and the change;
    worse ones (than the previous generation or than generation 0, beyond the tolerance) in red."""
    rows = json.loads(path.read_text())["comparison"]
    table = Table(title=cell(f"generation {generation} evaluation ({path})"))
    for name in ("metric", "generation 0", "previous", "value", "change", ""):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for r in rows:
        flags = ["worse" if r["worse"] else "", "worse than gen 0" if r.get("worse_than_start") else ""]
        flag = ", ".join(f for f in flags if f)
        change = "-" if r["change"] is None else f"{r['change']:+.4g}"
        table.add_row(
            cell(r["metric"]), _num(r.get("start")), _num(r["previous"]), _num(r["value"]), change, f"[red]{flag}[/red]" if flag else ""
        )
    return table


def summary_table(evaluations: list[dict[str, Any]], state: dict[str, Any]) -> Table:
    """One row per generation: structures found / selected / labelled, mean test force MAEs, U_Δ, MD."""
    table = Table(title="atomuq improve: summary per generation (forces MAE: mean over the test files, eV/Å)")
    for name in (
        "gen",
        "frames found",
        "selected",
        "labelled",
        "forces MAE direct",
        "forces MAE conservative",
        "fresh U_Δ eV/Å",
        "NVE median |drift| meV/atom/ps",
        "NVE lasted ps",
        "worse than before / gen 0",
    ):
        table.add_column(name, justify="right")
    for ev in evaluations:
        g = ev["generation"]
        info = {stage: state.get(f"gen_{g:03d}/{stage}", {}) for stage in STAGES}
        h = info["evaluate"]
        table.add_row(
            str(g),
            _num(info["search"].get("frames")),
            _num(info["select"].get("selected")),
            _num(info["label"].get("labelled")),
            _num(h.get("forces_mae_mean")),
            _num(h.get("conservative_forces_mae_mean")),
            _num(h.get("fresh_force_delta")),
            _num(h.get("drift")),
            _num(h.get("survived_ps")),
            f"{len(h['worse'])} / {len(h.get('worse_than_start', []))}" if "worse" in h else "-",
        )
    return table


def input_files(config: ImproveConfig) -> dict[str, tuple[Path, ...]]:
    """The structure files a loop reads, by config key (replay only when replay_fraction > 0)."""
    files = {
        "search.starts": config.search.starts,
        "evaluate.test": config.evaluate.test,
        "evaluate.fresh_starts": config.evaluate.fresh_starts,
        "evaluate.md_starts": config.evaluate.md_starts,
    }
    if config.finetune.replay_fraction > 0:
        files["finetune.replay"] = config.finetune.replay
    return {key: tuple(paths) for key, paths in files.items() if paths}


def check_inputs(config: ImproveConfig) -> None:
    """Read and check every input structure of the loop (core.validate.check_records against the starting model's
    elements) and the run folder, before any work; errors name the config key, the file and the structure."""
    where = config.source or "config"
    output_folder(Path(config.run_dir), f"{where}: run_dir", resume=True)
    elements = load_model(config.model_file).elements
    for key, paths in input_files(config).items():
        try:
            check_records(read_structures(list(paths)), elements)
        except InputError as exc:
            raise InputError(f"{where}: {key}: {exc}") from None


def improve(
    config: Path = typer.Argument(..., help="TOML file (see configs/improve_molecular.toml)."),
    device: Optional[str] = typer.Option(None, "--device", help="Override the config's device (cpu, cuda)."),
    generations: Optional[int] = typer.Option(None, "--generations", min=1, help="Override the number of generations."),
) -> None:
    """Closing the loop (methods.md 8): adversarial search -> selection -> reference labels -> fine-tuning -> evaluation,
    per generation, resumable (rerun the same command after an interruption)."""
    with user_errors():
        cfg = ImproveConfig.from_toml(config)
        if device is not None:
            cfg = dataclasses.replace(cfg, device=check_device(device))
        if generations is not None:
            cfg = dataclasses.replace(cfg, generations=generations)
        check_inputs(cfg)
        with progress_bar() as bar:
            evaluations = run_improve(cfg, RichImproveCallback(bar))
        state = json.loads((cfg.run_dir / STATE_FILE).read_text())["done"]
    console.print(summary_table(evaluations, state))
    say(
        f"run folder {cfg.run_dir}: gen_000 (starting model) .. gen_{cfg.generations:03d}; "
        f"model of the last generation: {cfg.run_dir / f'gen_{cfg.generations:03d}' / 'finetune' / 'best.pt'}"
    )
