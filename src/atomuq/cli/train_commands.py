"""`atomuq train CONFIG`: train or fine-tune the native model from a TOML file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Optional

import typer
from ase.data import chemical_symbols
from rich.progress import Progress

from atomuq.cli.common import EXIT_INTERRUPTED, check_device, console, fail, progress_bar, user_errors
from atomuq.core.errors import AtomuqError, InputError
from atomuq.core.paths import check_output_dir
from atomuq.models.native import NativeModel
from atomuq.workflows.train import STATE_FILE, ConfigError, TrainCallback, TrainConfig, train_model
from atomuq.workflows.train.checkpoint import load_state


def _fmt(value: Any, scale: float = 1.0, digits: int = 4) -> str:
    return "-" if value is None or value == "" else f"{float(value) * scale:.{digits}g}"


class RichTrainCallback(TrainCallback):
    """Epoch and batch progress bars plus one summary line per epoch."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.epochs_task: Any = None
        self.batch_task: Any = None

    def on_start(self, info: dict[str, Any]) -> None:
        """Print what is being trained and create the bars."""
        what = "resuming" if info["resumed"] else "training"
        elements = " ".join(chemical_symbols[z] for z in info["elements"])
        self.bar.console.print(
            f"{what} in {info['run_dir']}: {info['n_train']} training structures ({info['n_atoms']} atoms), "
            f"{info['n_val']} validation, elements {elements}, {info['parameters']:,} parameters")
        if info["scales"].get("fitted"):
            s = info["scales"]
            refs = ", ".join(f"{k} {v:.4f}" for k, v in s.get("reference_energies", {}).items())
            self.bar.console.print(f"energy scale {s['energy_scale']:.4g} eV, force scale {s['force_scale']:.4g} eV/Å"
                                   + (f"; reference energies (eV) {refs} (rank {s['rank']}), residual std "
                                      f"{s['residual_std_per_atom']:.4g} eV/atom" if refs else ""))
        self.epochs_task = self.bar.add_task("epochs", total=info["epochs"], completed=info["start_epoch"])

    def on_epoch_start(self, epoch: int, n_batches: int) -> None:
        """Reset the batch bar."""
        if self.batch_task is None:
            self.batch_task = self.bar.add_task(f"epoch {epoch}", total=n_batches)
        else:
            self.bar.reset(self.batch_task, total=n_batches, description=f"epoch {epoch}")

    def on_batch_end(self, epoch: int, batch: int, n_batches: int, loss: float) -> None:
        """Advance the batch bar."""
        self.bar.advance(self.batch_task)

    def on_epoch_end(self, epoch: int, row: dict[str, Any], model: NativeModel, improved: bool) -> None:
        """Print the epoch's losses and errors (meV/atom, eV/Å)."""
        stage = "val" if row.get("val_forces_mae") is not None else "train"
        self.bar.console.print(
            f"epoch {epoch:>4}  loss {_fmt(row['train_loss'])}  {stage}: "
            f"E {_fmt(row.get(f'{stage}_energy_mae_per_atom'), 1000)} meV/atom  "
            f"F {_fmt(row.get(f'{stage}_forces_mae'))}  F_c {_fmt(row.get(f'{stage}_conservative_forces_mae'))} eV/Å  "
            f"|Δrot| {_fmt(row.get(f'{stage}_rotational_gradient'))} eV  lr {row['lr']:.3g}"
            + ("  [best]" if improved else ""), highlight=False)
        self.bar.advance(self.epochs_task)


#: TrainConfig keys the command's options override, and the option that sets each
_FLAGS = {"device": "--device", "seed": "--seed", "run_dir": "--run-dir", "epochs": "--epochs"}


def _flagged(exc: ConfigError, given: dict[str, Any]) -> AtomuqError:
    """A configuration error about a key an option set, reworded to name the option."""
    if exc.field in given:
        return InputError(f"{_FLAGS[exc.field]} {given[exc.field]}: {exc.reason}")
    return exc


def parse_settings(settings: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE options as dotted overrides; VALUE is read as a TOML value (64, 2e-3, true, "text", [1, 2]),
    else taken as a plain string."""
    out: dict[str, Any] = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
            raise InputError(f"--set {item}: give KEY=VALUE with a dotted config key, e.g. --set model.latent=64")
        try:
            out[key] = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            out[key] = text.strip()
    return out


def _interrupted(run_dir: Path) -> str:
    """What Ctrl-C left: the last completed epoch and how to resume, or that no epoch was completed."""
    state = run_dir / STATE_FILE
    try:
        done = load_state(state, run_dir)["epoch"] if state.is_file() else 0
    except AtomuqError:
        done = 0
    if done:
        return f"interrupted; {state} holds epoch {done}: run the same command again to resume from there"
    return "interrupted before the first epoch completed; run the same command again to start over"


def train(
    config: Path = typer.Argument(..., help="TOML training configuration (paths in it are relative to its folder)."),
    resume: bool = typer.Option(False, "--resume", help=f"Require an existing run to resume (a run resumes "
                                                         f"automatically anyway when its run_dir holds {STATE_FILE})."),
    device: Optional[str] = typer.Option(None, "--device", help="Override the config's device: cpu, cuda or cuda:N."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Override the config's seed (ensemble members)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Override the config's run_dir."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Override the config's number of epochs."),
    settings: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                       help="Override any key of the config, dotted, the value in TOML syntax (repeat: "
                                            "--set model.latent=64 --set 'error_log.form=\"histogram\"'; smaller "
                                            "ensemble members)."),
) -> None:
    """Train or fine-tune the native model (energies eV, forces eV/Å); writes best.pt, last.pt, metrics.csv and the per-atom error log."""
    given = {k: v for k, v in {"device": device, "seed": seed, "run_dir": run_dir, "epochs": epochs}.items()
             if v is not None}
    with user_errors():
        if device is not None:
            check_device(device)
        if run_dir is not None:  # checked before the config, under the option's name
            check_output_dir(run_dir, "--run-dir")
        overrides = {**parse_settings(settings), **given,
                     **({"run_dir": str(run_dir.resolve())} if run_dir is not None else {})}
        try:
            cfg = TrainConfig.from_toml(config, overrides=overrides)
        except ConfigError as exc:
            raise _flagged(exc, given) from None
        with progress_bar() as bar:
            try:
                result = train_model(cfg, resume=True if resume else None, callback=RichTrainCallback(bar))
            except ConfigError as exc:
                raise _flagged(exc, given) from None
            except KeyboardInterrupt:
                fail(_interrupted(cfg.run_dir), code=EXIT_INTERRUPTED)
    if result.epochs_completed == result.start_epoch:
        console.print(f"{cfg.run_dir}: already complete ({result.epochs_completed} of {cfg.epochs} epochs)")
    console.print(f"best epoch {result.best_epoch} ({result.best_metric_name} {result.best_metric:.4g}); "
                  f"wall time {result.wall_time_s:.1f} s; wrote {cfg.run_dir}/best.pt, last.pt, metrics.csv, error_log/")
