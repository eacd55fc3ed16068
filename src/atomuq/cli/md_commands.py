"""`atomuq md` (monitored, crash-safe molecular dynamics) and `atomuq drift` (its analysis)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from atomuq.uq.ltau.estimator import LTAUEstimator
from atomuq.cli.common import check_device, console, fail, progress_bar, user_errors
from atomuq.core.errors import InputError
from atomuq.core.io import read_structures
from atomuq.models.registry import DEFAULT_MODEL, resolve_model
from atomuq.workflows.md.drift import analyse, plot_drift
from atomuq.workflows.md.monitors import parse_monitor
from atomuq.workflows.md.run import MDRun, MDSettings, PaperPreset, run_paper_protocol

DEFAULT_MONITORS = ("force_delta,every=10", "energy_drift,every=10", "temperature,every=10")
MONITOR_HELP = (
    "NAME[,every=N][,max=X|Xxstart|Xxmedian][,window=W][,action=log|snapshot|stop|rollback]; NAME is force_delta, "
    "temperature, energy_drift or key:RESULT[,reduce=max|mean|rms] (any calculator result, e.g. "
    "key:confidence_error, the confidence head's per-atom error, or key:ltau_uncertainty with --ltau). Repeatable. "
    f"Default: {'; '.join(DEFAULT_MONITORS)} (log only). 'none' turns monitoring off."
)


def md(
    input: Path = typer.Argument(..., help="Starting structure (any ASE-readable file; the first frame, or --index)."),
    output: Path = typer.Option(..., "-o", "--output", help="Trajectory to write (extended XYZ, appended frame by frame)."),
    ensemble: str | None = typer.Option(None, "--ensemble", help="nve, nvt (Nosé–Hoover chain) or langevin. Default nve."),
    forces: str = typer.Option("direct", "--forces", help="direct, conservative or mts (multiple time stepping)."),
    timestep: float | None = typer.Option(None, "--timestep", help=(
        "Time step in fs (default 0.5; with mts: the inner step unless --mts-outer is given)."
    )),
    steps: int | None = typer.Option(None, "--steps", help="Integrator steps (MTS: outer steps). Default 1000 (paper preset: 20000)."),
    temperature: float | None = typer.Option(None, "--temperature", help=(
        "K: thermostat target and initial velocities if INPUT has no momenta."
    )),
    mts_outer: float | None = typer.Option(None, "--mts-outer", help="MTS outer step in fs (default timestep x inner)."),
    mts_inner: int | None = typer.Option(None, "--mts-inner", help=(
        "MTS inner steps per outer step M (default 4, i.e. 2 fs outer at 0.5 fs; the paper's 4 fs / "
        "M = 8 is unstable for molecules with hydrogen with the bundled model)."
    )),
    tdamp: float = typer.Option(10.0, "--tdamp", help="Nosé–Hoover time constant in fs."),
    friction: float = typer.Option(0.01, "--friction", help="Langevin friction in 1/fs."),
    monitor: list[str] | None = typer.Option(None, "--monitor", help=MONITOR_HELP),
    ltau: Path | None = typer.Option(None, "--ltau", help="LTAU estimator (atomuq ltau fit) for key:ltau_uncertainty monitors."),
    ltau_k: int = typer.Option(1, "--ltau-k", min=1, help="Neighbours averaged by the LTAU estimator."),
    fallback: str = typer.Option("conservative", "--fallback", help="Forces after a rollback: conservative or mts."),
    max_rollbacks: int = typer.Option(1, "--max-rollbacks", help="Rollbacks allowed before a further breach stops the run."),
    traj_every: int = typer.Option(10, "--traj-every", help="Write a frame every this many steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of initial velocities and thermostat noise."),
    preset: str | None = typer.Option(None, "--preset", help=(
        "paper: relax to fmax 0.05 eV/Å, NVT 300 K (Nosé–Hoover, 10 fs) for 1 ps, then NVE velocity "
        "Verlet at 0.5 fs."
    )),
    resume: bool = typer.Option(False, "--resume", help=(
        "Continue from the last complete frame of OUTPUT (same velocities, step, thermostat state)."
    )),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUTPUT instead of refusing."),
    equilibration_steps: int = typer.Option(2000, "--equilibration-steps", help="NVT steps of 0.5 fs in --preset paper."),
    equilibration_forces: str | None = typer.Option(
        None, "--equilibration-forces",
        help="direct or conservative forces for the NVT stage of --preset paper (default: as --forces; conservative for mts).",
    ),
    index: int = typer.Option(0, "--index", help="Which frame of INPUT to start from."),
    model: str | None = typer.Option(None, "--model", "-m", help=f"Bundled model name or model file (default {DEFAULT_MODEL})."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Molecular dynamics that watches itself: Force Delta and drift monitors, rollback, MTS, crash-safe resume."""
    device = check_device(device)
    if output.exists() and not (resume or overwrite):
        fail(f"{output} exists: add --resume to continue it or --overwrite to replace it")
    if resume and overwrite:
        fail("--resume and --overwrite exclude each other")
    if "mts" not in (forces, fallback) and (mts_outer is not None or mts_inner is not None):
        fail("--mts-outer/--mts-inner only apply with --forces mts or --fallback mts")
    if equilibration_forces is not None and preset != "paper":
        fail("--equilibration-forces applies only with --preset paper")
    if preset not in (None, "paper"):
        fail(f"--preset must be 'paper', got {preset!r}")
    if preset == "paper" and (ensemble not in (None, "nve") or timestep not in (None, 0.5)):
        fail("--preset paper fixes NVE at 0.5 fs after NVT equilibration; drop --ensemble/--timestep")
    for name, value in (("--traj-every", traj_every), ("--max-rollbacks", max_rollbacks + 1)):
        if value < 1:
            fail(f"{name} must be positive, got {value}")
    with user_errors():
        specs = list(monitor) if monitor else list(DEFAULT_MONITORS)
        monitors = [] if specs == ["none"] else [parse_monitor(s) for s in specs]
        settings = MDSettings(
            ensemble=ensemble or "nve", forces=forces, timestep_fs=timestep or 0.5,
            steps=steps if steps is not None else (PaperPreset().steps if preset else 1000),
            temperature_K=temperature, mts_outer_fs=mts_outer, mts_inner=mts_inner or 4,
            tdamp_fs=tdamp, friction_per_fs=friction, seed=seed, traj_every=traj_every,
            fallback=fallback, max_rollbacks=max_rollbacks,
        )
        settings.validate()
        records = read_structures([input])
        if not 0 <= index < len(records):
            raise InputError(f"{input}: --index {index} out of range (the file has {len(records)} structures)")
        atoms = records[index].atoms
        net = resolve_model(model, device=device)
        estimator = LTAUEstimator.load(ltau) if ltau is not None else None

        def say(msg: str) -> None:
            console.print(msg, highlight=False)

        with progress_bar() as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, t_fs: float, total_fs: float) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(f"{stage} (fs)", total=round(total_fs))
                bar.update(tasks[stage], completed=round(t_fs))

            if preset == "paper":
                preset_cfg = PaperPreset(temperature_K=temperature or 300.0, equilibration_steps=equilibration_steps,
                    equilibration_forces=equilibration_forces)
                settings.temperature_K = preset_cfg.temperature_K
                result = run_paper_protocol(atoms, net, settings, output, monitors, preset_cfg, resume, say, progress,
                                            ltau=estimator, ltau_k=ltau_k)
            else:
                total = settings.steps * settings.step_fs(settings.forces)
                run = MDRun(atoms, net, settings, output, monitors, resume=resume, say=say, ltau=estimator, ltau_k=ltau_k)
                result = run.run(lambda t: progress(f"{settings.ensemble} {forces}", t, total))
    console.print(
        f"{result.status}: step {result.step}, t = {result.time_fs:g} fs, {result.frames_written} frames in {output}, "
        f"{result.rollbacks} rollback(s), final forces {result.mode}; log {output}.log", highlight=False,
    )
    if result.status == "stopped":
        raise typer.Exit(3)


def drift(
    trajectories: list[Path] = typer.Argument(..., help="Trajectories written by `atomuq md`."),
    plot: Path | None = typer.Option(None, "--plot", help="PNG of total energy, U_Δ and temperature against time."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the statistics as JSON."),
) -> None:
    """Energy drift (meV/atom/ps), temperature statistics and U_Δ of MD trajectories."""
    with user_errors():
        reports = [analyse(p) for p in trajectories]
        if plot is not None:
            plot_drift(trajectories, plot)
    table = Table(title="MD drift and stability")
    cols = ("trajectory", "forces", "frames", "ps", "drift meV/atom/ps", "ΔE meV/atom", "max |ΔE| meV/atom",
            "T mean K", "T std K", "U_Δ mean eV/Å", "U_Δ max eV/Å", "restarts")
    for c in cols:
        table.add_column(c, justify="left" if c in ("trajectory", "forces") else "right")
    def fmt(x: float | None, d: int = 3) -> str:
        return "-" if x is None else f"{x:.{d}f}"

    for r in reports:
        table.add_row(Path(r.path).name, r.modes, str(r.frames), fmt(r.duration_ps), fmt(r.drift_meV_atom_ps),
                      fmt(r.total_change_meV_atom), fmt(r.max_deviation_meV_atom), fmt(r.temperature_mean_K, 1),
                      fmt(r.temperature_std_K, 1), fmt(r.force_delta_mean, 4), fmt(r.force_delta_max, 4), str(r.restarts))
    console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps([r.as_dict() for r in reports], indent=2))
        console.print(f"wrote {json_out}")
    if plot is not None:
        console.print(f"wrote {plot}")
