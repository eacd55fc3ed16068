"""`atomuq bench`: rank correlation, flagging, calibration and conformal coverage of UQ scores on labelled structures."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from atomuq.cli.common import cell, ensemble_help, check_device, console, model_help, output_folder, progress_bar, say, user_errors
from atomuq.cli.ensemble_options import chosen_spec, load_model_option, resolve_members, split_specs
from atomuq.core.io import read_structures
from atomuq.workflows.bench import BenchSettings, bench_files
from atomuq.workflows.bench_report import ci_text, pair_label, write_report


def summary(report: dict) -> Table:
    """Per system: n and the r_s of every pair, with bootstrap intervals."""
    keys = list(report["all"]["spearman"])
    table = Table(title=f"Spearman r_s per system, 95 % bootstrap interval ({report['n_structures']} structures)")
    for name in ("system", "n", *(f"r_s({pair_label(k)})" for k in keys)):
        table.add_column(name, justify="left" if name == "system" else "right")
    for name, g in {**report["systems"], "all (pooled)": report["all"]}.items():
        table.add_row(cell(name), str(g["n"]), *(ci_text(g["spearman"].get(k)) for k in keys))
    return table


def bench(
    inputs: List[Path] = typer.Argument(..., help="Labelled structure files (reference forces required)."),
    output: Path = typer.Option(..., "-o", "--output", help="Report directory: bench.json, bench.md, PNG figures."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=model_help()),
    ensemble: Optional[List[str]] = typer.Option(
        None, "--ensemble", help=ensemble_help()
    ),
    group_key: str = typer.Option("molecule", "--group-key", help="Info key naming each structure's system (else: its file)."),
    cluster_key: Optional[str] = typer.Option(
        None, "--cluster-key", help="Info key naming groups of correlated structures (e.g. source_index: one attack search); "
        "the bootstrap resamples whole groups."
    ),
    calibrate_on: Optional[Path] = typer.Option(
        None, "--calibrate-on", help="Labelled file: thirds fit the U_Δ → error map, the conformal bounds, and test their coverage."
    ),
    levels: List[float] = typer.Option([0.8, 0.9, 0.95], "--levels", help="Coverage levels of the conformal bounds."),
    n_boot: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the confidence intervals."),
    flag_quantile: float = typer.Option(0.9, "--flag-quantile", help="ROC-AUC positives: error above this quantile of each system."),
    flag_threshold: Optional[float] = typer.Option(None, "--flag-threshold", help="ROC-AUC positives: error above this (eV/Å)."),
    n_bins: int = typer.Option(10, "--bins", help="Equal-count bins for RMSE vs RMV and ENCE (fewer for small systems)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and of the calibration split."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Structures per batch."),
    forces_key: Optional[str] = typer.Option(None, "--forces-key", help="Reference-forces array (default: REF_forces, else calculator)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Benchmark UQ scores against true force errors: r_s, ROC-AUC, calibration, conformal coverage per system."""
    device = check_device(device)
    settings = BenchSettings(
        n_boot=n_boot, levels=tuple(levels), flag_quantile=flag_quantile, flag_threshold=flag_threshold, n_bins=n_bins, seed=seed
    )
    with user_errors():
        settings.check()
        output_folder(output)
        if model is None:  # the bundled model that knows the inputs' elements (read here for the choice only)
            model = chosen_spec(None, read_structures(inputs))
        net = load_model_option(model, device)
        names = split_specs(ensemble) or None
        members = resolve_members(names, device) if names else None
        meta = {"command": shlex.join(["atomuq", *sys.argv[1:]]), "model": model, "ensemble": names}
        with progress_bar() as bar:
            task = bar.add_task("scoring", total=None)
            data, report, calibration = bench_files(
                inputs,
                net,
                settings=settings,
                ensemble=members,
                ensemble_names=names,
                group_key=group_key,
                cluster_key=cluster_key,
                calibrate_on=calibrate_on,
                batch_size=batch_size,
                forces_key=forces_key,
                progress=lambda n: bar.advance(task, n),
                on_total=lambda n: bar.update(task, total=n),
                meta=meta,
            )
        paths = write_report(data, report, calibration, output)
    console.print(summary(report))
    if "calibration" in report:
        level = settings.levels[-1]
        say(f"coverage of the {level:g} conformal bounds ε_nc ≤ q̂·g(U_Δ) | ≤ q̂·U_Δ (fitted on {calibrate_on}):")
        for name, f in report["calibration"]["coverage"].items():
            cov = " | ".join(f"{c[-1]['coverage']:.3f}" for c in f["coverage"].values())
            tag = " (in-sample)" if f["in_sample"] else ""
            say(f"  {Path(name).name}{tag}: {cov} (n={f['n']}, ± {f['coverage']['U_Δ'][-1]['stderr']:.3f})")
    say(f"wrote {len(paths)} files to {output}/ (bench.md, bench.json, figures)")
