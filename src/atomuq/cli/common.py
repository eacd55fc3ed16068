"""Shared CLI helpers: error reporting, device choice, progress bars."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from atomuq.core.device import resolve_device
from atomuq.core.errors import AtomuqError

# rich falls back to 80 columns when not on a terminal, which wraps the tables badly in logs
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


#: exit status of a run stopped by Ctrl-C / SIGINT (128 + 2, the shell convention)
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = 1) -> None:
    """Print one clear error line (user text escaped, so '[...]' survives) and exit non-zero."""
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def note(message: str) -> None:
    """Print one informational line on stderr (user text escaped)."""
    err_console.print(f"[dim]note:[/dim] {escape(message)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn atomuq's own errors into one-line messages (exit 1) and Ctrl-C into exit 130."""
    try:
        yield
    except AtomuqError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", code=EXIT_INTERRUPTED)


def check_device(device: str) -> str:
    """Validate a --device value ('cpu', 'cuda' or 'cuda:N'); one-line error and exit otherwise."""
    try:
        resolve_device(device)
    except AtomuqError as exc:
        fail(f"--device: {exc}")
    return device


def progress_bar() -> Progress:
    """A rich progress bar with counts, elapsed and remaining time (drawn on stderr)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False,
    )
