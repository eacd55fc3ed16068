"""`atomuq attack`: adversarial search for structures with a high Force Delta at low predicted energy."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from atomuq.cli.ensemble_options import load_model_option
from atomuq.cli.common import EXIT_INTERRUPTED, cell, check_device, console, model_help, output_file, progress_bar, say, user_errors
from atomuq.core.io import read_structures, write_structures
from atomuq.core.paths import check_distinct_outputs
from atomuq.core.validate import DEFAULT_MIN_DISTANCE, check_records
from atomuq.workflows.attack import OBJECTIVES, AttackResult, AttackSettings, attack as run_attack
from atomuq.workflows.selection import SelectionSettings, select, threshold
from atomuq.workflows.score import structure_tag

COMPRESSED = (".gz", ".xz", ".bz2")


def selected_path(output: Path) -> Path:
    """OUTPUT with '.selected' before its extension: run.extxyz -> run.selected.extxyz (run.extxyz.gz too)."""
    name, packed = output.name, ""
    for suffix in COMPRESSED:
        if name.endswith(suffix):
            name, packed = name[: -len(suffix)], suffix
    stem, dot, ext = name.rpartition(".")
    base = f"{stem}.selected.{ext}" if dot and stem else f"{name}.selected"
    return output.with_name(base + packed)


def outcome_table(result: AttackResult, records, top: int) -> Table:
    """One row per starting structure: U_Δ at the start and best within the energy budget, why it stopped."""
    table = Table(
        title=f"adversarial search ({result.settings.objective}), largest gain first "
        f"({min(top, len(result.outcomes))} of {len(result.outcomes)})"
    )
    for name in ("input", "file:index", "structure", "formula", "U_Δ start", "U_Δ best", "Ē best eV/atom", "best step", "stopped"):
        table.add_column(name, justify="left" if name in ("file:index", "structure", "formula", "stopped") else "right")
    gain = lambda o: (o.best_force_delta / o.force_delta_start) if o.force_delta_start > 0 else 0.0  # noqa: E731
    ordered = sorted(result.outcomes, key=lambda o: (o.failed, -(gain(o) if gain(o) == gain(o) else 0.0)))
    for o in ordered[:top]:
        rec = records[o.index]
        table.add_row(
            str(o.index),
            cell(f"{Path(rec.source).name}:{rec.index}"),
            cell(structure_tag(rec.atoms)),
            rec.atoms.get_chemical_formula(),
            f"{o.force_delta_start:.4f}",
            f"{o.best_force_delta:.4f}",
            f"{o.best_energy_per_atom_rel:+.4f}",
            str(o.best_step),
            ("[red]" if o.failed else "") + cell(o.stop_reason),
        )
    return table


def attack(
    inputs: List[Path] = typer.Argument(..., help="Starting structures (any file ASE reads)."),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Trajectory: every recorded frame of every structure (extxyz; .gz compresses)."
    ),
    selected: Optional[Path] = typer.Option(
        None, "--selected", help="Selected frames (default: OUTPUT with .selected before the extension)."
    ),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=model_help()),
    objective: str = typer.Option(
        "delta-boltzmann", "--objective", help=f"{' or '.join(OBJECTIVES)}: maximise U_Δ − β·Ē, or U_Δ²·exp(−Ē/kT)."
    ),
    kT: float = typer.Option(
        0.05, "--kT", help="Energy scale kT in eV per atom (Boltzmann form; also sets the default β and the energy budget)."
    ),
    energy_weight: Optional[float] = typer.Option(
        None, "--energy-weight", help="β of the delta objective, (eV/Å)/(eV/atom) (default U_Δ,start/(2 kT))."
    ),
    min_contact_ratio: float = typer.Option(
        0.7, "--min-contact-ratio", help="A structure stops (frame not kept) when two atoms come closer than this "
        "fraction of their covalent radii' sum (catches a strained bond a per-atom energy budget hides)."
    ),
    budget_kT: float = typer.Option(
        3.0, "--budget-kT", help="A structure stops once its energy per atom rises more than this many kT above the start."
    ),
    steps: int = typer.Option(200, "--steps", min=0, help="Step budget per structure."),
    lr: float = typer.Option(0.01, "--lr", help="Adam step size, Å."),
    init_scale: float = typer.Option(0.01, "--init-scale", help="Std of the starting random displacement, Å."),
    max_displacement: float = typer.Option(1.0, "--max-displacement", help="Clamp of each displacement component, Å."),
    patience: int = typer.Option(
        50, "--patience", min=0, help="Stop a structure after this many steps without a rise of the objective (0: never)."
    ),
    write_every: int = typer.Option(1, "--write-every", min=1, help="Record every n-th step (the last one always)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the starting displacements."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Structures searched together in one batch."),
    percentile: float = typer.Option(90.0, "--percentile", help="Selection: U_Δ above this percentile of the starting U_Δ."),
    rmsd: float = typer.Option(0.1, "--rmsd", help="Selection: drop frames within this RMSD (Å) of a kept one."),
    max_selected: int = typer.Option(100, "--max-selected", min=1, help="Selection: at most this many frames."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    min_distance: float = typer.Option(
        DEFAULT_MIN_DISTANCE, "--min-distance", help="Starting atoms closer than this (Å) are rejected as overlapping."
    ),
    strict: bool = typer.Option(False, "--strict", help="Exit with code 2 when the search of any structure failed (NaN or model error)."),
    top: int = typer.Option(20, "--top", min=1, help="Rows in the summary table."),
) -> None:
    """Raise the Force Delta at low predicted energy (methods.md 2); write the trajectory and a selection."""
    device = check_device(device)
    settings = AttackSettings(
        objective=objective,
        kT=kT,
        energy_weight=energy_weight,
        budget_kT=budget_kT,
        min_contact_ratio=min_contact_ratio,
        steps=steps,
        lr=lr,
        init_scale=init_scale,
        max_displacement=max_displacement,
        patience=patience or None,
        record_every=write_every,
        seed=seed,
    )
    choose = SelectionSettings(
        percentile=percentile, rmsd_threshold=rmsd, max_selected=max_selected, max_energy_per_atom=settings.energy_budget
    )
    selected = selected or selected_path(output)
    with user_errors():
        settings.check()
        choose.check()
        check_distinct_outputs({"--output": output, "--selected": selected})
        output_file(output)
        output_file(selected, "--selected")
        records = read_structures(inputs)
        net = load_model_option(model, device, records)
        check_records(records, net.elements, min_distance)
        structures = [r.atoms for r in records]
        rounds = -(-len(structures) // batch_size)
        with progress_bar() as bar:
            task = bar.add_task(f"attack ({objective})", total=rounds * (steps + 1))
            result = run_attack(net, structures, settings, batch_size, progress=lambda n: bar.advance(task, n))
            bar.update(task, completed=rounds * (steps + 1))
        frames = result.to_atoms(structures, [r.source for r in records])
        starts = [o.force_delta_start for o in result.outcomes]
        chosen = select(frames, starts, choose)
        write_structures(output, frames)
        write_structures(selected, [frames[k] for k in chosen])
        cut = threshold(starts, percentile)
    console.print(outcome_table(result, records, top))
    failed = [o for o in result.outcomes if o.failed]
    for o in failed:
        say(f"input {o.index} ({records[o.index].where}) at step {o.failed_step}: {o.stop_reason}; its frames up to "
            "then are kept", label="[red]failed:[/red]")
    if result.interrupted:
        cut_short = len(records) - len(result.outcomes) + sum(o.stop_reason.startswith("interrupted") for o in result.outcomes)
        say(f"{cut_short} of {len(records)} structures not searched to the end; the frames found before are written",
            label="[yellow]interrupted:[/yellow]")
    say(
        f"model {getattr(net, 'source', model)}; wrote {len(frames)} frames to {output}; selected "
        f"{len(chosen)} (U_Δ > {cut:.4f} eV/Å, the {percentile:g}th percentile of the start; Ē ≤ "
        f"{settings.energy_budget:.3g} eV/atom; RMSD ≥ {rmsd:g} Å; at most {max_selected}) to {selected}"
    )
    if result.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if strict and failed:
        raise typer.Exit(2)
