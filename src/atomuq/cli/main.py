"""The `atomuq` command."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

import atomuq
from atomuq.cli.attack_commands import attack
from atomuq.cli.bench_commands import bench
from atomuq.cli.ensemble_options import load_ensemble, load_model_option
from atomuq.cli.improve_commands import improve
from atomuq.cli.common import (
    HELP_MARKUP, cell, check_device, console, ensemble_help, fail, model_help, note_earlier_results, output_file, progress_bar,
    say, user_errors,
)
from atomuq.cli.data_commands import label, sample
from atomuq.cli.ltau_commands import ltau_app
from atomuq.cli.md_commands import drift, md
from atomuq.cli.train_commands import train
from atomuq.cli.view_commands import view
from atomuq.core.io import read_structures
from atomuq.core.memory import reuse_freed_memory
from atomuq.core.schema import SCORE
from atomuq.core.validate import DEFAULT_MIN_DISTANCE, check_records, check_references
from atomuq.models.checkpoint import load_model
from atomuq.models.catalog import catalog
from atomuq.models.provenance import model_provenance
from atomuq.models.registry import DEFAULT_MODEL, bundled_dir
from atomuq.engines.local import score_file
from atomuq.engines.ray import score_file_ray  # imports ray only when used
from atomuq.workflows.score import ScoreRow, ScoreSettings, check_direct_head

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=HELP_MARKUP,
                  help="atomuq: when can a machine-learned interatomic potential be trusted?")


@app.callback()
def _main() -> None:
    """atomuq: per-structure and per-atom uncertainty for machine-learned interatomic potentials."""
    reuse_freed_memory()


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summary_table(rows: list[ScoreRow], top: int) -> Table:
    """Rich table of the worst `top` structures by Force Delta."""
    table = Table(title=f"Force Delta, worst first ({min(top, len(rows))} of {len(rows)})")
    text_columns = ("file:index", "structure", "formula")
    for name in ("rank", *text_columns, "atoms", "E/atom eV", "U_Δ eV/Å", "max u_i eV/Å", "ε_nc eV/Å", "ε_c eV/Å"):
        table.add_column(name, justify="left" if name in text_columns else "right")
    ordered = sorted(rows, key=lambda r: r.force_delta, reverse=True)[:top]
    for rank, r in enumerate(ordered, 1):
        table.add_row(str(rank), cell(f"{Path(r.source).name}:{r.index}"), cell(r.tag), r.formula, str(r.n_atoms),
                      _fmt(r.energy_per_atom, 3), _fmt(r.force_delta), _fmt(r.force_delta_max),
                      _fmt(r.eps_nc), _fmt(r.eps_c))
    return table


@app.command()
def score(
    inputs: List[Path] = typer.Argument(..., help="Structure files ASE can read (extxyz, xyz, cif, POSCAR, traj, ...)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output extended XYZ file."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=model_help()),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Structures per batch."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    rotational: bool = typer.Option(False, "--rotational", help="Also compute the rotational gradient |Δ_rot| (eV)."),
    forces_key: Optional[str] = typer.Option(None, "--forces-key", help="Reference-forces array (default: REF_forces, else calculator)."),
    min_distance: float = typer.Option(DEFAULT_MIN_DISTANCE, "--min-distance", help="Atoms closer (Å) are rejected as overlapping."),
    top: int = typer.Option(10, "--top", min=1, help="Rows in the summary table."),
    ensemble: Optional[List[str]] = typer.Option(
        None, "--ensemble", help=ensemble_help() + " Adds ensemble_std and forces_ensemble_mean."),
    ensemble_forces: str = typer.Option("direct", "--ensemble-forces", help="direct or conservative forces of atomuq members."),
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (Ray actors, one model each; "
                               "pip install 'atomuq[ray]')."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster for --engine ray (default: RAY_ADDRESS, "
                                          "else a new local one)."),
) -> None:
    """Score structures: direct and conservative forces, Force Delta, errors against reference forces."""
    device = check_device(device)
    if engine not in ("local", "ray"):
        fail(f"--engine {engine}: choose local or ray")
    if address is not None and engine != "ray":
        fail("--address: only with --engine ray")
    run_engine = score_file if engine == "local" else functools.partial(score_file_ray, address=address)
    with user_errors():
        output_file(output)
        records = read_structures(inputs)
        net = load_model_option(model, device, records)
        check_direct_head(net)
        check_records(records, net.elements, min_distance)
        check_references(records, forces_key)
        members, names = load_ensemble(ensemble, records, ensemble_forces, device)
        with progress_bar() as bar:
            task = bar.add_task("scoring", total=len(records))
            run = run_engine(records, net, output, ScoreSettings(batch_size, rotational, forces_key, ensemble_forces),
                             members, names, min_distance, progress=lambda n: bar.advance(task, n))
    rows = run.rows
    console.print(summary_table(rows, top))
    note_earlier_results([r.atoms for r in records], SCORE, model_provenance(net))
    resumed = f" (resumed {run.resumed} of {run.n_shards} shards)" if run.resumed else ""
    say(f"model {net.source or model}; wrote {len(rows)} structures to {output}{resumed}")
    if members:
        mean_std = sum(r.ensemble_std for r in rows) / len(rows)
        say(f"ensemble of {len(members)} ({ensemble_forces} forces, ddof=0): mean ensemble_std {mean_std:.4f} eV/Å")


@app.command()
def models() -> None:
    """List the bundled models: domain, elements, reference method, data, size; which one a command takes."""
    table = Table(title=f"bundled models (atomuq {atomuq.__version__})")
    for name in ("name", "domain", "elements", "reference", "trained on", "cutoff Å", "parameters"):
        table.add_column(name)
    with user_errors():
        for entry in catalog():
            m = load_model(entry.path)
            cfg = m.config
            role = f" (member of {entry.member_of})" if entry.member_of else ""
            table.add_row(
                cell(entry.name + (" (default)" if entry.name == DEFAULT_MODEL else "") + role), entry.domain,
                entry.symbols, cell(entry.reference), cell(entry.data), f"{cfg.cutoff:g}",
                f"{sum(p.numel() for p in m.parameters()):,}",
            )
    console.print(table)
    say(f"files in {bundled_dir()}; without --model, score, attack and md take the first primary model above of the "
        "input's domain (periodic: materials) that knows all its elements, and say which")


app.command()(train)
app.command()(label)
app.command()(sample)
app.command()(attack)
app.command()(bench)
app.add_typer(ltau_app, name="ltau")
app.command()(md)
app.command()(drift)
app.command()(improve)
app.command()(view)


if __name__ == "__main__":  # pragma: no cover
    app()
