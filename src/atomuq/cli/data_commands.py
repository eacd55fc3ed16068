"""`atomuq label` and `atomuq sample`: reference data from a real reference method (xTB, EMT, DFT)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, List, Optional

import typer

from atomuq.cli.common import console, fail, progress_bar, user_errors
from atomuq.core.io import read_structures
from atomuq.core.labelling import available_methods, get_method, label_structures, partial_path
from atomuq.core.validate import DEFAULT_MIN_DISTANCE
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
        get_method(method, options)
        records = read_structures(inputs)
        with progress_bar() as bar:
            task = bar.add_task(f"labelling ({method})", total=len(records))

            def on_failure(f: Any) -> None:
                bar.console.print(f"[yellow]failed:[/yellow] {f.where}: {f.error} (skipped, recorded)", highlight=False)

            try:
                report = label_structures(records, method, output, workers=n_workers, options=options,
                                          progress=lambda n: bar.advance(task, n), on_failure=on_failure,
                                          log=lambda m: bar.console.print(m, highlight=False), min_distance=min_distance)
            except KeyboardInterrupt:
                bar.stop()
                fail(f"interrupted: finished structures are kept in {partial_path(output)}; rerun the same command to resume",
                     code=130)
                return
    per = report.calc_seconds / report.n_new if report.n_new else float("nan")
    console.print(f"labelled {report.n_labelled} of {report.n_input} structures with {method} "
                  f"({report.n_resumed} resumed, {report.n_new} new, {per:.3g} s each, {n_workers} worker(s), "
                  f"{report.seconds:.1f} s wall); wrote {output}", highlight=False)
    if report.failures:
        console.print(f"[yellow]{len(report.failures)} structure(s) failed and are not in the output; "
                      f"see {report.failures_log}[/yellow]", highlight=False)
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
        get_method(method, options)
        records = read_structures(inputs)
        with progress_bar() as bar:
            total = len(records) * len(temperature) * settings.steps_per_trajectory
            task = bar.add_task(f"MD steps ({method})", total=total)

            def on_failure(f: Any) -> None:
                bar.console.print(f"[yellow]trajectory failed:[/yellow] {f.where}: {f.error} "
                                  "(its earlier frames are kept; recorded)", highlight=False)

            try:
                report = sample_structures(records, method, output, settings, workers=n_workers, options=options,
                                           progress=lambda n: bar.advance(task, n), on_failure=on_failure,
                                           log=lambda m: bar.console.print(m, highlight=False), min_distance=min_distance)
            except KeyboardInterrupt:
                bar.stop()
                fail(f"interrupted: finished trajectories are kept in {partial_path(output)}; rerun the same command "
                     "to resume", code=130)
                return
    console.print(f"sampled {report.n_frames} frames from {report.n_trajectories} trajectories "
                  f"({report.n_resumed} resumed) with {method}, {report.seconds_per_step * 1000:.3g} ms per MD step, "
                  f"{report.seconds:.1f} s wall; wrote {output}", highlight=False)
    if report.failures:
        console.print(f"[yellow]{len(report.failures)} trajectory(ies) failed; see {report.failures_log}[/yellow]",
                      highlight=False)
        if strict:
            raise typer.Exit(2)
