"""MD trajectory files, drift analysis and the `atomuq md` / `atomuq drift` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import molecule
from ase.io import write
from typer.testing import CliRunner

from atomuq.cli.main import app
from atomuq.core.errors import InputError
from atomuq.workflows.md.drift import analyse, final_branch
from atomuq.workflows.md.monitors import EnergyDrift, Monitor, Threshold, drift_slope
from atomuq.workflows.md.trajectory import (
    FrameWriter,
    cut_partial_frame,
    decode_state,
    encode_state,
    scan_trajectory,
)

runner = CliRunner()


def frame(t_fs: float, etot: float, seed: int = 0):
    atoms = molecule("H2O")
    atoms.set_momenta(np.random.default_rng(seed).normal(size=(3, 3)) / 3.0)
    return atoms, {
        "step": int(t_fs),
        "time_fs": t_fs,
        "epot": etot,
        "ekin": 0.0,
        "etot": etot,
        "temperature": 300.0 + t_fs,
        "force_delta": 0.1 * t_fs,
    }


def test_frames_round_trip_exactly_and_a_half_written_frame_is_cut(tmp_path):
    path = tmp_path / "t.extxyz"
    writer = FrameWriter(path)
    atoms, info = frame(0.0, -1.0)
    atoms.positions += 1e-13  # digits beyond %.8f must survive
    info["md_state"] = encode_state({"rng": {"state": 2**100 + 7}, "mode": "mts"})
    writer.write(atoms, info, forces=atoms.positions * 0.5)
    writer.close()
    size = path.stat().st_size
    text = path.read_text()
    for cut in (
        size - 1,
        size - 30,
        len(text.split("\n")[0]) + 5,
    ):  # cut inside the only frame: nothing complete
        path.write_text(text + text[:cut])
        scan = scan_trajectory(path)
        assert len(scan.frames) == 1 and scan.truncated
        assert "dropped a half-written last frame" in cut_partial_frame(path, scan)
        assert path.read_text() == text
    got = scan_trajectory(path).frames[0]
    assert np.array_equal(got.positions, atoms.positions)
    assert np.array_equal(got.get_momenta(), atoms.get_momenta())
    assert decode_state(got.info["md_state"]) == {
        "rng": {"state": 2**100 + 7},
        "mode": "mts",
    }


def test_drift_slope_and_statistics_on_a_known_trajectory(tmp_path):
    path = tmp_path / "lin.extxyz"
    writer = FrameWriter(path)
    for t in np.arange(
        0.0, 1001.0, 10.0
    ):  # E_tot = -3 eV + 0.6 meV/ps * 3 atoms ... per atom slope 0.2 meV/atom/ps
        atoms, info = frame(t, -3.0 + 3 * 0.2e-3 * t / 1000.0)
        writer.write(atoms, info)
    writer.close()
    rep = analyse(path)
    assert rep.drift_meV_atom_ps == pytest.approx(0.2, rel=1e-6)
    assert rep.total_change_meV_atom == pytest.approx(0.2, rel=1e-6)
    assert rep.duration_ps == pytest.approx(1.0)
    temps = 300.0 + np.arange(0.0, 1001.0, 10.0)
    assert rep.temperature_mean_K == pytest.approx(
        temps.mean()
    ) and rep.temperature_std_K == pytest.approx(temps.std())
    assert rep.force_delta_max == pytest.approx(100.0)
    assert drift_slope(np.array([0.0, 1000.0]), np.array([0.0, 1e-3])) == pytest.approx(
        1.0
    )


def test_final_branch_follows_the_path_after_a_rollback():
    times = [0, 10, 20, 30, 40, 20, 30, 40, 50]
    frames = []
    for k, t in enumerate(times):
        atoms, info = frame(float(t), 0.0)
        atoms.info.update(info, branch=int(k >= 5))
        frames.append(atoms)
    kept, restarts = final_branch(frames)
    assert restarts == 1
    assert [f.info["time_fs"] for f in kept] == [0, 10, 20, 30, 40, 50]
    assert [f.info["branch"] for f in kept] == [0, 0, 1, 1, 1, 1]


class Sequence:
    """A monitored quantity returning the given values in turn."""

    name, unit, needs_conservative = "seq", "", False

    def __init__(self, values):
        self.values = iter(values)

    def __call__(self, atoms, time_fs):
        return next(self.values)


def test_relative_thresholds_use_the_start_and_the_running_median():
    start = Monitor(
        Sequence([1.0, 1.5, 2.5, 1.2]),
        every=1,
        threshold=Threshold(2.0, "start"),
        action="stop",
    )
    readings = [start.check(None, k, float(k)) for k in range(4)]
    assert [r.breached for r in readings] == [False, False, True, False]
    assert readings[2].limit == pytest.approx(2.0)
    med = Monitor(
        Sequence([1.0, 3.0, 1.0, 2.5]),
        every=1,
        threshold=Threshold(2.0, "median", window=5),
    )
    readings = [med.check(None, k, float(k)) for k in range(4)]
    assert [r.breached for r in readings] == [
        False,
        True,
        False,
        True,
    ]  # median of accepted values stays 1.0


@pytest.mark.parametrize(
    "values,breached",
    [
        ([0.01, 0.3, 0.49, 0.51], [False, False, False, True]),  # tiny start: the floor 0.5 holds
        ([0.2, 0.9, 1.01], [False, False, True]),  # 5 x start = 1.0
        ([1.0, 1.9, 2.1], [False, False, True]),  # 5 x start = 5, capped at 2
        ([2.5], [True]),  # the cap holds at the first reading
    ],
)
def test_relative_limits_are_kept_within_floor_and_cap(values, breached):
    mon = Monitor(Sequence(values), every=1, threshold=Threshold(5.0, "start", floor=0.5, cap=2.0), action="stop")
    assert [mon.check(None, k, float(k)).breached for k in range(len(values))] == breached


def test_energy_drift_quantity_fits_the_window():
    q = EnergyDrift(window=3)

    class FakeAtoms:
        def __init__(self, e):
            self.e = e

        def get_potential_energy(self):
            return self.e

        def get_kinetic_energy(self):
            return 0.0

        def __len__(self):
            return 1

    assert q(FakeAtoms(0.0), 0.0) is None
    assert q(FakeAtoms(5.0), 1000.0) is None
    q(FakeAtoms(1e-3), 2000.0)  # window now 0, 1000, 2000 fs
    assert q(FakeAtoms(2e-3), 3000.0) == pytest.approx(
        abs(drift_slope([1000, 2000, 3000], [5.0, 1e-3, 2e-3]))
    )


def md_args(start, out, steps: int, *extra: str) -> list[str]:
    monitors = ["--monitor", "force_delta,every=5", "--monitor", "temperature,every=5"]
    return [
        "md",
        str(start),
        "-o",
        str(out),
        "--steps",
        str(steps),
        "--temperature",
        "300",
        "--traj-every",
        "5",
        *monitors,
        *extra,
    ]


def test_md_and_drift_commands(tmp_path):
    start = tmp_path / "ethanol.extxyz"
    write(start, molecule("CH3CH2OH"))
    out = tmp_path / "run.extxyz"
    res = runner.invoke(app, md_args(start, out, 20))
    assert res.exit_code == 0, res.output
    assert "completed: step 20" in res.output
    assert len(scan_trajectory(out).frames) == 5
    res = runner.invoke(app, md_args(start, out, 20))
    assert res.exit_code == 1 and "exists: add --resume" in res.output
    res = runner.invoke(app, md_args(start, out, 30, "--resume"))
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output and "step 30" in res.output
    png, js = tmp_path / "d.png", tmp_path / "d.json"
    res = runner.invoke(app, ["drift", str(out), "--plot", str(png), "--json", str(js)])
    assert res.exit_code == 0, res.output
    assert png.stat().st_size > 1000
    rep = json.loads(js.read_text())[0]
    assert (
        rep["frames"] == 7
        and rep["force_delta_frames"] == 7
        and rep["duration_ps"] == pytest.approx(0.015)
    )


def paper_preset(start: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """Arguments of `atomuq md START -o OUT --preset paper` with `steps` steps of equilibration and of NVE."""
    return ["md", str(start), "-o", str(out), "--preset", "paper", "--steps", str(steps),
            "--equilibration-steps", str(steps), *extra]


def test_md_preset_paper_runs_its_three_stages(tmp_path):
    start = tmp_path / "water.extxyz"
    write(start, molecule("H2O"))
    out = tmp_path / "nve.extxyz"
    res = runner.invoke(app, paper_preset(start, out, 10, "--traj-every", "5"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "nve.extxyz.relaxed.extxyz").exists()
    eq = scan_trajectory(tmp_path / "nve.extxyz.equil.extxyz").frames
    assert eq[-1].info["time_fs"] == pytest.approx(5.0)
    nve = scan_trajectory(out).frames
    assert nve[-1].info["time_fs"] == pytest.approx(5.0) and np.allclose(
        nve[0].get_momenta(), eq[-1].get_momenta()
    )
    assert "START nvt" in (tmp_path / "nve.extxyz.equil.extxyz.log").read_text()
    assert "START nve" in (tmp_path / "nve.extxyz.log").read_text()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--forces", "direct", "--mts-inner", "4"], "only apply with --forces mts"),
        (["--ensemble", "nvt"], "needs --temperature"),
        (["--monitor", "force_delta,max=0.1,action=teleport"], "action must be one of"),
        (["--preset", "fast"], "--preset must be 'paper'"),
        (["--preset", "paper", "--ensemble", "langevin"], "drop --ensemble"),
        (["--resume", "--overwrite"], "exclude each other"),
        (["--index", "3"], "out of range"),
        (
            ["--forces", "mts", "--ensemble", "nvt", "--temperature", "300"],
            "not with nvt",
        ),
    ],
)
def test_md_bad_options_give_one_line_errors(tmp_path, extra, message):
    start = tmp_path / "w.extxyz"
    write(start, molecule("H2O"))
    res = runner.invoke(
        app,
        ["md", str(start), "-o", str(tmp_path / "o.extxyz"), "--steps", "2", *extra],
    )
    assert res.exit_code == 1
    assert message in res.output


def test_resume_refuses_a_trajectory_of_other_atoms(tmp_path):
    from atomuq.models.registry import resolve_model
    from atomuq.workflows.md.run import MDRun, MDSettings

    model = resolve_model(None)
    a = molecule("H2O")
    MDRun(
        a,
        model,
        MDSettings(steps=2, temperature_K=100),
        tmp_path / "r.extxyz",
        say=lambda m: None,
    ).run()
    with pytest.raises(InputError, match="not the input structure"):
        MDRun(
            molecule("NH3"),
            model,
            MDSettings(steps=4, temperature_K=100),
            tmp_path / "r.extxyz",
            resume=True,
        )


def test_any_calculator_result_can_be_monitored_with_a_reduction(tmp_path):
    from atomuq.models.registry import resolve_model
    from atomuq.workflows.md.monitors import parse_monitor
    from atomuq.workflows.md.run import MDRun, MDSettings

    mon = parse_monitor("key:confidence_error,every=2,reduce=mean")
    assert mon.name == "confidence_error_mean"
    run = MDRun(
        molecule("H2O"),
        resolve_model(None),
        MDSettings(steps=4, temperature_K=100, traj_every=2),
        tmp_path / "c.extxyz",
        [mon],
        say=lambda m: None,
    )
    run.run()
    frames = scan_trajectory(tmp_path / "c.extxyz").frames
    per_atom = run.atoms.calc.results["confidence_error_atoms"]
    assert frames[-1].info["confidence_error_mean"] == pytest.approx(per_atom.mean())
    with pytest.raises(InputError, match="reduce must be one of"):
        parse_monitor("key:confidence_error,reduce=median")


def test_preset_paper_can_equilibrate_on_conservative_forces(tmp_path):
    start = tmp_path / "water.extxyz"
    write(start, molecule("H2O"))
    out = tmp_path / "nve.extxyz"
    res = runner.invoke(app, paper_preset(start, out, 4, "--equilibration-forces", "conservative"))
    assert res.exit_code == 0, res.output
    assert {
        f.info["force_mode"]
        for f in scan_trajectory(tmp_path / "nve.extxyz.equil.extxyz").frames
    } == {"conservative"}
    assert {f.info["force_mode"] for f in scan_trajectory(out).frames} == {"direct"}
    res = runner.invoke(
        app,
        [
            "md",
            str(start),
            "-o",
            str(tmp_path / "x.extxyz"),
            "--equilibration-forces",
            "direct",
        ],
    )
    assert res.exit_code == 1 and "only with --preset paper" in res.output


def test_md_frames_carry_provenance_through_the_schema_and_read_back_the_ase_way(tmp_path):
    """Frames are written through core.schema: model name (a path with spaces survives), fingerprint, versions."""
    from ase.io import read

    from atomuq.core.schema import SCHEMA_VERSION
    from atomuq.models.checkpoint import weights_fingerprint
    from atomuq.models.registry import resolve_model
    from atomuq.workflows.md.run import MDRun, MDSettings

    model = resolve_model(None)
    out = tmp_path / "with space" / "r.extxyz"
    MDRun(molecule("H2O"), model, MDSettings(steps=4, temperature_K=100, traj_every=2), out,
          say=lambda m: None, model_name="my models/a model.pt").run()
    frames = read(out, ":")
    assert len(frames) == 3
    for frame in frames:
        assert frame.info["atomuq_model"] == "my models/a model.pt"
        assert frame.info["atomuq_model_fingerprint"] == weights_fingerprint(model)
        assert frame.info["atomuq_schema_version"] == SCHEMA_VERSION
        assert frame.get_potential_energy() == pytest.approx(frame.info["epot"])
        assert frame.info["model_energy"] == pytest.approx(frame.info["epot"])
        assert frame.get_forces().shape == (3, 3)
    assert len(scan_trajectory(out).frames) == 3  # atomuq's own reader agrees


def test_a_run_whose_positions_turn_nan_stops_with_one_error_and_keeps_its_frames(tmp_path, monkeypatch):
    """An integrator that blows up (here: positions set to NaN in step 12) ends the run with one `error:` line naming
    the file, the step and the cause, no traceback, and the frames written before it left readable."""
    from ase.md.verlet import VelocityVerlet

    original = VelocityVerlet.step

    def step(self, forces=None):
        if self.nsteps == 12:
            positions = self.atoms.get_positions()
            positions[2, 1] = np.nan
            self.atoms.set_positions(positions)
        return original(self, forces)

    monkeypatch.setattr(VelocityVerlet, "step", step)
    start = tmp_path / "ethanol.extxyz"
    write(start, molecule("CH3CH2OH"))
    out = tmp_path / "run.extxyz"
    res = runner.invoke(app, md_args(start, out, 20))
    assert res.exit_code == 1 and "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    assert str(start) in errors[0] and "after step 12" in errors[0] and "NaN or infinite positions" in res.output
    frames = scan_trajectory(out).frames
    assert [f.info["step"] for f in frames] == [0, 5, 10]
    assert "BLOWN UP" in (tmp_path / "run.extxyz.log").read_text()
