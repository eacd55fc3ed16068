"""Shared CLI helpers: error reporting, escaped output, output-path checks, device choice, help text, progress bars."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator, Sequence

import typer
from ase import Atoms
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from atomuq.core.device import resolve_device
from atomuq.core.errors import AtomuqError
from atomuq.core.paths import check_output_dir, check_output_file
from atomuq.core.schema import Provenance, earlier_results
from atomuq.models import registry

# rich falls back to 80 columns when not on a terminal, which wraps the tables badly in logs
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

#: help is plain text (click's formatter): rich's help panels cut option names and option syntax at 80 columns
HELP_MARKUP = None

#: exit status of a run stopped by Ctrl-C / SIGINT (128 + 2, the shell convention)
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = 1) -> None:
    """Print one clear error line (user text escaped, so '[...]' survives) and exit non-zero."""
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def note(message: str) -> None:
    """Print one informational line on stderr (user text escaped)."""
    err_console.print(f"[dim]note:[/dim] {escape(message)}", highlight=False, soft_wrap=True)


def say(message: str, label: str = "", out: Console | None = None) -> None:
    """Print a result line on stdout with user text escaped; label is rich markup put before it (e.g. '[red]failed:[/red]')."""
    (out or console).print(f"{label} {escape(message)}" if label else escape(message), highlight=False, soft_wrap=True)


def cell(value: object) -> str:
    """A table cell showing user text literally (file names, info values: '[run1]' stays)."""
    return escape(str(value))


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn atomuq's own errors into one-line messages (exit 1) and Ctrl-C into exit 130."""
    try:
        yield
    except AtomuqError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", code=EXIT_INTERRUPTED)


def output_file(path: Path, flag: str = "--output", *, resume: bool = False) -> Path:
    """Check an output file before any work (core.paths.check_output_file); an existing one is replaced with a note
    unless the command resumes it. Raises InputError naming the flag and path."""
    if check_output_file(path, flag) and not resume:
        note(f"{flag} {path} exists; it will be replaced")
    return path


def output_folder(path: Path, flag: str = "--output", *, resume: bool = False) -> Path:
    """Check an output folder before any work (core.paths.check_output_dir); files of an earlier run in it are
    replaced with a note unless the command resumes. Raises InputError naming the flag and path."""
    if check_output_dir(path, flag) and not resume and any(Path(path).iterdir()):
        note(f"{flag} {path} exists; the files this command writes there will be replaced")
    return path


def note_earlier_results(structures: Sequence[Atoms], writer: str, provenance: Provenance) -> None:
    """Say which atomuq results already on the input structures a `writer` run (score, ltau score) replaced,
    kept or dropped (core.schema.earlier_results)."""
    found = [earlier_results(atoms, writer, provenance) for atoms in structures]
    own = sum(e.own for e in found)
    if own:
        note(f"replaced the earlier `atomuq {writer}` results on {own} of {len(found)} structures")
    for other in sorted({c for e in found for c in e.kept}):
        count = sum(other in e.kept for e in found)
        note(f"kept the `atomuq {other}` results (same model) on {count} of {len(found)} structures")
    for model in sorted({e.dropped for e in found if e.dropped is not None}):
        count = sum(e.dropped == model for e in found)
        note(f"dropped the earlier results of another model ({model}) on {count} of {len(found)} structures: "
             "a structure carries one model's results (write to separate files to compare models)")


def check_device(device: str) -> str:
    """Validate a --device value ('cpu', 'cuda' or 'cuda:N'); one-line error and exit otherwise."""
    try:
        resolve_device(device)
    except AtomuqError as exc:
        fail(f"--device: {exc}")
    return device


#: the --model default of commands that read structures first (cli.ensemble_options.chosen_spec)
CHOSEN_MODEL = ("the bundled model that knows every element of the input (molecular for molecules, materials for "
                "periodic structures; said on stderr)")


def model_help(what: str = "Model", default: str | None = CHOSEN_MODEL) -> str:
    """Help text of a --model option (plain text), listing every spec form the resolver accepts (models.registry)."""
    tail = f" Default: {default}." if default else ""
    return f"{what}: {registry.spec_help(one_line=True)}.{tail}"


def ensemble_help() -> str:
    """Help text of an --ensemble option (plain text): members are named like --model."""
    forms = ", ".join(syntax for syntax, _ in registry.spec_forms())
    return f"Ensemble members, each named like --model ({forms}); repeat the option or separate by commas."


def progress_bar() -> Progress:
    """A rich progress bar with counts, elapsed and remaining time (drawn on stderr)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False,
    )
