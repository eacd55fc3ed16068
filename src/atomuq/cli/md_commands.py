"""`atomuq md` (monitored, crash-safe molecular dynamics) and `atomuq drift` (its analysis)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from atomuq.cli.ensemble_options import chosen_spec, load_model_option
from atomuq.cli.common import model_help, EXIT_INTERRUPTED, check_device, console, fail, progress_bar, user_errors
from atomuq.core.errors import InputError
from atomuq.core.io import atomic_path, read_structures
from atomuq.core.paths import check_output_file
from atomuq.uq.ltau.estimator import LTAUEstimator
from atomuq.workflows.md.drift import analyse, plot_drift
from atomuq.workflows.md.driver import MDRun, RunResult
from atomuq.workflows.md.monitor_plan import (
    FORCE_DELTA_CAP,
    FORCE_DELTA_FACTOR,
    FORCE_DELTA_FLOOR,
    SAFE_EVERY,
    TEMPERATURE_FACTOR,
    TEMPERATURE_FLOOR_K,
    plan_from_specs,
)
from atomuq.workflows.md.protocol import PaperPreset, run_paper_protocol
from atomuq.workflows.md.settings import MDSettings, SettingError
from atomuq.workflows.md.trajectory import trajectory_format

#: MDSettings fields (and the other names library errors use) as this command's flags
FLAGS = {
    "ensemble": "--ensemble", "forces": "--forces", "timestep_fs": "--timestep", "steps": "--steps",
    "temperature_K": "--temperature", "mts_outer_fs": "--mts-outer", "mts_inner": "--mts-inner", "tdamp_fs": "--tdamp",
    "friction_per_fs": "--friction", "seed": "--seed", "traj_every": "--traj-every", "fallback": "--fallback",
    "max_rollbacks": "--max-rollbacks", "monitors": "--monitor", "trajectory": "--output", "model": "--model",
    "ltau": "--ltau", "ltau_k": "--ltau-k", "structure": "INPUT",
}

SAFE_DEFAULTS_HELP = (
    f"Default (no --monitor): the safe defaults, checked every {SAFE_EVERY} steps: the run stops when U_Δ "
    f"(force_delta) exceeds {FORCE_DELTA_FACTOR:g} x its start value (limit kept within "
    f"[{FORCE_DELTA_FLOOR:g}, {FORCE_DELTA_CAP:g}] eV/Å) or the temperature exceeds {TEMPERATURE_FACTOR:g} x "
    f"--temperature (x the start temperature without it; never below {TEMPERATURE_FLOOR_K:g} K); it rolls back "
    "instead when --fallback is given. 'log': the same quantities logged only, no limits (for studies whose runs "
    "must drift). 'none': no monitors. Any other --monitor replaces the defaults."
)
MONITOR_HELP = escape(
    "Comma-separated: NAME, then any of every=N, max=X (absolute) or max=Xxstart or max=Xxmedian (relative), "
    "floor=F and cap=C (bounds of a relative limit), window=W, action=A (log, snapshot, stop or "
    "rollback). NAME: force_delta, temperature, energy_drift, bonds (covalent bonds broken or formed since the "
    "start; max=0.5 stops at the first), or key:RESULT for any "
    "calculator result (e.g. key:confidence_error, or key:ltau_uncertainty with --ltau) with reduce=max|mean|rms. "
    f"Repeatable. {SAFE_DEFAULTS_HELP}"
)


@contextlib.contextmanager
def md_errors() -> Iterator[None]:
    """user_errors, with library setting names shown as this command's flags."""
    with user_errors():
        try:
            yield
        except SettingError as exc:
            fail(exc.render(FLAGS))


def _stop_hint(result: RunResult) -> str:
    if result.monitoring != "safe":
        return ""
    return (
        " The safe default monitors stopped it: the model is no longer trusted here. To let the run go on "
        "regardless (e.g. to study drift), run it again into a new output with --monitor log; to roll back and "
        "continue on conservative forces instead, add --fallback conservative."
    )


def md(
    input: Path = typer.Argument(..., help="Starting structure (any ASE-readable file; the first frame, or --index)."),
    output: Path = typer.Option(..., "-o", "--output", help=(
        "Trajectory to write, appended frame by frame: extended XYZ (.extxyz, .xyz) or ASE trajectory (.traj). "
        "Beside it: OUTPUT.log, OUTPUT.log.jsonl, OUTPUT.run.json (settings, model, versions, result)."
    )),
    ensemble: str | None = typer.Option(None, "--ensemble", help="nve, nvt (Nosé–Hoover chain) or langevin. Default nve."),
    forces: str = typer.Option("direct", "--forces", help="direct, conservative or mts (multiple time stepping)."),
    timestep: float | None = typer.Option(None, "--timestep", help=(
        "Time step in fs, > 0 and <= 10 (default 0.5; with mts: the inner step unless --mts-outer is given)."
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
    fallback: str | None = typer.Option(None, "--fallback", help=(
        "Forces after a rollback: conservative or mts (rollback monitors use conservative when not given). "
        "With the safe default monitors, giving it makes a loss of trust roll back instead of stop."
    )),
    max_rollbacks: int = typer.Option(1, "--max-rollbacks", help="Rollbacks allowed before a further breach stops the run."),
    traj_every: int = typer.Option(10, "--traj-every", help="Write a frame every this many steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of initial velocities and thermostat noise."),
    preset: str | None = typer.Option(None, "--preset", help=(
        "paper: relax to fmax 0.05 eV/Å, NVT 300 K (Nosé–Hoover, 10 fs) for 1 ps, then NVE velocity "
        "Verlet at 0.5 fs."
    )),
    resume: bool = typer.Option(False, "--resume", help=(
        "Continue from the last complete frame of OUTPUT (same velocities, step, thermostat state). Refused when "
        "a setting differs from the run's (only --steps may change)."
    )),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUTPUT instead of refusing."),
    equilibration_steps: int = typer.Option(2000, "--equilibration-steps", help="NVT steps of 0.5 fs in --preset paper."),
    equilibration_forces: str | None = typer.Option(
        None, "--equilibration-forces",
        help="direct or conservative forces for the NVT stage of --preset paper (default: as --forces; conservative for mts).",
    ),
    index: int = typer.Option(0, "--index", help="Which frame of INPUT to start from (negative: from the end, -1 the last)."),
    model: str | None = typer.Option(None, "--model", "-m", help=model_help()),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Molecular dynamics that watches itself: Force Delta and drift monitors, rollback, MTS, crash-safe resume."""
    device = check_device(device)
    with md_errors():
        check_output_file(output, "--output")
        trajectory_format(output)
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
    if preset == "paper" and equilibration_steps < 0:
        fail(f"--equilibration-steps must be >= 0, got {equilibration_steps}")
    with md_errors():
        settings = MDSettings(
            ensemble=ensemble or "nve", forces=forces, timestep_fs=0.5 if timestep is None else timestep,
            steps=steps if steps is not None else (PaperPreset().steps if preset else 1000),
            temperature_K=temperature, mts_outer_fs=mts_outer, mts_inner=4 if mts_inner is None else mts_inner,
            tdamp_fs=tdamp, friction_per_fs=friction, seed=seed, traj_every=traj_every,
            fallback=fallback, max_rollbacks=max_rollbacks,
        )
        preset_cfg = None
        if preset == "paper":
            preset_cfg = PaperPreset(temperature_K=temperature or 300.0, equilibration_steps=equilibration_steps,
                                     equilibration_forces=equilibration_forces)
            settings.temperature_K = preset_cfg.temperature_K
        settings.validate()
        records = read_structures([input])
        if not -len(records) <= index < len(records):
            raise InputError(f"{input}: --index {index} out of range (the file has {len(records)} structures)")
        record = records[index]
        name = chosen_spec(model, [record])
        net = load_model_option(name, device)
        plan = plan_from_specs(monitor, settings, net.has_direct_forces)
        estimator = LTAUEstimator.load(ltau) if ltau is not None else None

        def say(msg: str) -> None:
            console.print(escape(msg), highlight=False)

        with progress_bar() as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, t_fs: float, total_fs: float) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(f"{stage} (fs)", total=round(total_fs))
                bar.update(tasks[stage], completed=round(t_fs))

            if preset_cfg is not None:
                result = run_paper_protocol(record.atoms, net, settings, output, plan, preset_cfg, resume, say, progress,
                                            ltau=estimator, ltau_k=ltau_k, where=record.where, model_name=name)
            else:
                run = MDRun(record.atoms, net, settings, output, plan, resume=resume, say=say, ltau=estimator,
                            ltau_k=ltau_k, where=record.where, model_name=name)
                result = run.run(lambda t: progress(f"{settings.ensemble} {forces}", t, settings.target_fs()))
    traj = result.trajectory or str(output)
    console.print(escape(
        f"{result.status}: step {result.step}, t = {result.time_fs:g} fs, {result.frames_written} frames in {traj}, "
        f"{result.rollbacks} rollback(s), final forces {result.mode}; log {traj}.log"), highlight=False,
    )
    if result.status == "interrupted":
        fail(f"interrupted at step {result.step}; every frame up to there is in {traj}: add --resume to continue",
             code=EXIT_INTERRUPTED)
    if result.status == "stopped":
        console.print(escape(f"stopped because {result.reason}.{_stop_hint(result)}"), highlight=False)
        raise typer.Exit(3)


def drift(
    trajectories: list[Path] = typer.Argument(..., help="Trajectories written by `atomuq md`."),
    plot: Path | None = typer.Option(None, "--plot", help="PNG of total energy, U_Δ and temperature against time."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the statistics as JSON."),
) -> None:
    """Energy drift (meV/atom/ps), temperature statistics and U_Δ of MD trajectories."""
    with user_errors():
        for path, flag in ((plot, "--plot"), (json_out, "--json")):
            if path is not None:
                check_output_file(path, flag)
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
        table.add_row(escape(Path(r.path).name), r.modes, str(r.frames), fmt(r.duration_ps), fmt(r.drift_meV_atom_ps),
                      fmt(r.total_change_meV_atom), fmt(r.max_deviation_meV_atom), fmt(r.temperature_mean_K, 1),
                      fmt(r.temperature_std_K, 1), fmt(r.force_delta_mean, 4), fmt(r.force_delta_max, 4), str(r.restarts))
    console.print(table)
    if json_out is not None:
        with atomic_path(json_out) as tmp:
            Path(tmp).write_text(json.dumps([r.as_dict() for r in reports], indent=2))
        console.print(escape(f"wrote {json_out}"), highlight=False)
    if plot is not None:
        console.print(escape(f"wrote {plot}"), highlight=False)
