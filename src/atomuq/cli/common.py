"""Shared CLI helpers: error reporting, device choice, progress bars."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from atomuq.core.device import resolve_device
from atomuq.core.errors import AtomuqError

# rich falls back to 80 columns when not on a terminal, which wraps the tables badly in logs
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def fail(message: str, code: int = 1) -> None:
    """Print one clear error line and exit non-zero."""
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn atomuq's own errors into one-line messages and exit code 1."""
    try:
        yield
    except AtomuqError as exc:
        fail(str(exc))


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
