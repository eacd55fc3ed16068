"""`atomuq label` and `atomuq sample`: reference data from a real reference method (xTB, EMT, DFT)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from atomuq.cli.common import EXIT_INTERRUPTED, console, fail, note, progress_bar, user_errors
from atomuq.core.io import read_structures
from atomuq.core.paths import check_output_file
from atomuq.core.validate import DEFAULT_MIN_DISTANCE
from atomuq.reference import ReferenceMethod, available_methods, get_method
from atomuq.reference.files import partial_path
from atomuq.workflows.label import label_structures
from atomuq.workflows.sample import SampleSettings, sample_structures

_METHODS_HELP = "; ".join(f"{k}: {v}" for k, v in available_methods().items())


def parse_options(pairs: List[str] | None) -> dict[str, Any]:
    """KEY=VALUE strings to calculator options; VALUE is read as JSON when it parses (numbers, true, lists), else text."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--option {pair!r}: write KEY=VALUE, e.g. --option accuracy=0.1 or --option basis=def2-svp")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _workers(workers: Optional[int]) -> int:
    return max(1, workers if workers is not None else (os.cpu_count() or 1))


def _start(method: str, options: dict[str, Any], output: Path) -> ReferenceMethod:
    """Before reading any structure: the method resolves (notes for deprecated spellings) and `output` can be written."""
    ref = get_method(method, options, log=note)
    if check_output_file(output):
        note(f"{output} exists and will be replaced when this run finishes")
    return ref


def _echo(out: Console, text: str, style: str | None = None) -> None:
    """Print one line of user text escaped (so '[...]' in file names survives), optionally in a style."""
    line = escape(text)
    out.print(f"[{style}]{line}[/{style}]" if style else line, highlight=False, soft_wrap=True)


def label(
    inputs: List[Path] = typer.Argument(..., help="Structure files ASE can read (extxyz, xyz, cif, POSCAR, traj, ...)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output extended XYZ file (.gz/.xz/.bz2 compress)."),
    method: str = typer.Option("gfn2-xtb", "--method", help=f"Reference method. {_METHODS_HELP}."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Calculator option KEY=VALUE (repeatable), e.g. accuracy=0.1."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Processes (one thread each; default all cores)."),
    strict: bool = typer.Option(False, "--strict", help="Exit with code 2 when any structure failed."),
    min_distance: float = typer.Option(DEFAULT_MIN_DISTANCE, "--min-distance", help="Atoms closer (Å) are rejected as overlapping."),
) -> None:
    """Label structures with reference energy (eV), forces (eV/Å) and stress (eV/Å³, periodic cells); resumable."""
    options = parse_options(option)
    n_workers = _workers(workers)
    with user_errors():
        ref = _start(method, options, output)
        records = read_structures(inputs)
        with progress_bar() as bar:
            task = bar.add_task(escape(f"labelling ({ref.name})"), total=len(records))

            def on_failure(f: Any) -> None:
                _echo(bar.console, f"failed: {f.where}: {f.error} (skipped, recorded)", "yellow")

            try:
                report = label_structures(records, ref, output, workers=n_workers,
                                          progress=lambda n: bar.advance(task, n), on_failure=on_failure,
                                          log=lambda m: _echo(bar.console, m), min_distance=min_distance)
            except KeyboardInterrupt:
                bar.stop()
                fail(f"interrupted: finished structures are kept in {partial_path(output)}; rerun the same command to resume",
                     code=EXIT_INTERRUPTED)
                return
    per = report.calc_seconds / report.n_new if report.n_new else float("nan")
    _echo(console, f"labelled {report.n_labelled} of {report.n_input} structures with {ref.name} "
                   f"({report.n_resumed} resumed, {report.n_new} new, {per:.3g} s each, {n_workers} worker(s), "
                   f"{report.seconds:.1f} s wall); wrote {output}")
    if report.failures:
        _echo(console, f"{len(report.failures)} structure(s) failed and are not in the output; see {report.failures_log}",
              "yellow")
        if strict:
            raise typer.Exit(2)


def sample(
    inputs: List[Path] = typer.Argument(..., help="Starting structures (each is run at each temperature)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output extended XYZ file (.gz/.xz/.bz2 compress)."),
    method: str = typer.Option("gfn2-xtb", "--method", help=f"Reference method driving the MD. {_METHODS_HELP}."),
    temperature: List[float] = typer.Option([300.0], "--temperature", "-T", help="Temperature in K (repeatable)."),
    steps: int = typer.Option(1000, "--steps", min=1, help="MD steps per trajectory after the burn-in."),
    interval: int = typer.Option(10, "--interval", min=1, help="Write every interval-th step."),
    timestep: float = typer.Option(0.5, "--timestep", help="Time step in fs."),
    seed: int = typer.Option(0, "--seed", help="Random seed (velocities and Langevin noise)."),
    friction: float = typer.Option(0.01, "--friction", help="Langevin friction in 1/fs."),
    burn_in: int = typer.Option(0, "--burn-in", min=0, help="Steps run before the first counted step."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Calculator option KEY=VALUE (repeatable)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Processes running trajectories (default: all cores)."),
    strict: bool = typer.Option(False, "--strict", help="Exit with code 2 when any trajectory failed."),
    min_distance: float = typer.Option(DEFAULT_MIN_DISTANCE, "--min-distance", help="Atoms closer (Å) are rejected as overlapping."),
) -> None:
    """Langevin MD with a reference method at each temperature; every interval-th frame written with its labels."""
    options = parse_options(option)
    settings = SampleSettings(tuple(temperature), steps, interval, timestep, friction, burn_in, seed)
    n_workers = _workers(workers)
    with user_errors():
        settings.check()
        ref = _start(method, options, output)
        records = read_structures(inputs)
        with progress_bar() as bar:
            total = len(records) * len(temperature) * settings.steps_per_trajectory
            task = bar.add_task(escape(f"MD steps ({ref.name})"), total=total)

            def on_failure(f: Any) -> None:
                _echo(bar.console, f"trajectory failed: {f.where}: {f.error} (its earlier frames are kept; recorded)", "yellow")

            try:
                report = sample_structures(records, ref, output, settings, workers=n_workers,
                                           progress=lambda n: bar.advance(task, n), on_failure=on_failure,
                                           log=lambda m: _echo(bar.console, m), min_distance=min_distance)
            except KeyboardInterrupt:
                bar.stop()
                fail(f"interrupted: finished trajectories are kept in {partial_path(output)}; rerun the same command "
                     "to resume", code=EXIT_INTERRUPTED)
                return
    _echo(console, f"sampled {report.n_frames} frames from {report.n_trajectories} trajectories "
                   f"({report.n_resumed} resumed) with {ref.name}, {report.seconds_per_step * 1000:.3g} ms per MD step, "
                   f"{report.seconds:.1f} s wall; wrote {output}")
    if report.failures:
        _echo(console, f"{len(report.failures)} trajectory(ies) failed; see {report.failures_log}", "yellow")
        if strict:
            raise typer.Exit(2)
