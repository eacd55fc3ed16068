"""Resume refuses changed settings, never repeats log readings, and works for extxyz and ASE .traj;
frames read back the ASE way; Ctrl-C exits 130 keeping what was written; a failed start leaves nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import read, write
from typer.testing import CliRunner

from atomuq.cli.main import app
from atomuq.models.registry import resolve_model
from atomuq.workflows.md.monitors import Temperature, parse_monitor
from atomuq.workflows.md.run import MDRun, MDSettings, init_velocities
from atomuq.workflows.md.trajectory import scan_trajectory

runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    return resolve_model(None).to(torch.float64)


def ethanol(seed: int = 0):
    atoms = molecule("CH3CH2OH")
    init_velocities(atoms, 300.0, seed)
    return atoms


class Killed(Exception):
    pass


def killer(after_fs: float):
    def progress(t_fs: float) -> None:
        if t_fs > after_fs:
            raise Killed

    return progress


def base_args(start, out, *extra):
    return ["md", str(start), "-o", str(out), "--steps", "4", "--temperature", "300", "--traj-every", "2", *extra]


@pytest.mark.parametrize(
    "first,changed,shown",
    [
        ([], ["--timestep", "1.0"], "--timestep 0.5 (was) -> 1.0 (now)"),
        ([], ["--ensemble", "langevin"], "--ensemble 'nve' (was) -> 'langevin' (now)"),
        ([], ["--forces", "conservative"], "--forces 'direct' (was) -> 'conservative' (now)"),
        ([], ["--temperature", "400"], "--temperature 300.0 (was) -> 400.0 (now)"),
        (["--ensemble", "langevin"], ["--ensemble", "langevin", "--friction", "0.05"], "--friction 0.01 (was) -> 0.05 (now)"),
        (["--ensemble", "nvt"], ["--ensemble", "nvt", "--tdamp", "20"], "--tdamp 10.0 (was) -> 20.0 (now)"),
        ([], ["--seed", "4"], "--seed 0 (was) -> 4 (now)"),
        ([], ["--traj-every", "1"], "--traj-every 2 (was) -> 1 (now)"),
        ([], ["--fallback", "mts"], "--fallback not set (was) -> 'mts' (now)"),
        ([], ["--monitor", "log"], "--monitor [force_delta,every=10,max=5xstart"),
        ([], ["--model", "molecular-small-seed1"], "--model weights"),
    ],
)
def test_resume_refuses_each_changed_setting_naming_both_values(tmp_path, first, changed, shown):
    start = tmp_path / "w.extxyz"
    write(start, molecule("H2O"))
    out = tmp_path / "run.extxyz"
    assert runner.invoke(app, base_args(start, out, *first)).exit_code == 0
    before = out.read_bytes()
    res = runner.invoke(app, base_args(start, out, "--resume", "--steps", "8", *changed))
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    text = " ".join(res.output.split())
    assert "cannot resume with changed settings" in text and shown in text, res.output
    assert "only --steps may change" in text
    assert out.read_bytes() == before  # nothing touched
    res = runner.invoke(app, base_args(start, out, "--resume", *first, "--steps", "8"))  # only --steps changed
    assert res.exit_code == 0, res.output
    assert scan_trajectory(out).frames[-1].info["step"] == 8


def test_resume_lists_every_change_at_once(model, tmp_path):
    path = tmp_path / "r.extxyz"
    MDRun(ethanol(), model, MDSettings(steps=4, traj_every=2), path, [], say=lambda m: None).run()
    from atomuq.workflows.md.run import SettingError

    with pytest.raises(SettingError) as info:
        MDRun(ethanol(), model, MDSettings(steps=8, traj_every=2, timestep_fs=0.25, forces="mts"), path, [],
              resume=True)
    message = str(info.value)
    assert "timestep_fs 0.5 (was) -> 0.25 (now)" in message and "forces 'direct' (was) -> 'mts' (now)" in message


def reading_lines(path):
    return [line for line in path.read_text().splitlines() if line.startswith("step") and line.endswith(" ok")]


@pytest.mark.parametrize("suffix", [".extxyz", ".traj"])
def test_kill_and_resume_gives_the_same_frames_and_no_repeated_readings(model, tmp_path, suffix):
    settings = dict(steps=40, traj_every=10, ensemble="langevin", temperature_K=300.0)

    def monitors():  # readings between frames: the killed process logs some after its last frame
        return [parse_monitor("force_delta,every=3"), parse_monitor("temperature,every=2")]

    full, cut = tmp_path / f"full{suffix}", tmp_path / f"cut{suffix}"
    MDRun(ethanol(), model, MDSettings(**settings), full, monitors(), say=lambda m: None).run()
    with pytest.raises(Killed):
        MDRun(ethanol(), model, MDSettings(**settings), cut, monitors(), say=lambda m: None).run(killer(13.4))
    logged = reading_lines(cut.with_name(cut.name + ".log"))
    assert logged[-1].split()[1] == "26"  # readings of steps 21..26 were logged after the frame of step 20
    with open(cut, "ab") as fh:  # a frame half-written when the process died
        fh.write(b"\x00" * 333 if suffix == ".traj" else b"9\nProperties=species:S:1:pos:R:3 step=99\nC 0.1")
    said = []
    with pytest.raises(Killed):  # killed a second time, after frames written by the resumed process
        MDRun(ethanol(seed=9), model, MDSettings(**settings), cut, monitors(), resume=True, say=said.append).run(
            killer(16.4))
    assert any("dropped" in m and "logged after the frame of step 20" in m for m in said)
    said = []
    MDRun(ethanol(seed=9), model, MDSettings(**settings), cut, monitors(), resume=True, say=said.append).run()
    assert any("dropped" in m and "logged after the frame of step 30" in m for m in said)
    a, b = read(full, ":"), read(cut, ":")
    assert [f.info["step"] for f in b] == [f.info["step"] for f in a] == [0, 10, 20, 30, 40]
    for x, y in zip(a, b):
        assert np.array_equal(x.positions, y.positions) and np.array_equal(x.get_momenta(), y.get_momenta())
        assert x.get_potential_energy() == y.get_potential_energy() == x.info["epot"]
    full_log, cut_log = (reading_lines(p.with_name(p.name + ".log")) for p in (full, cut))
    assert cut_log == full_log  # every reading once, in order
    jsonl = [json.loads(line) for line in cut.with_name(cut.name + ".log.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["monitor"]) for r in jsonl if r["event"] == "reading"]
    assert len(steps) == len(set(steps))


def test_frames_read_back_the_ase_way(model, tmp_path):
    for name in ("run.extxyz", "run.traj"):
        path = tmp_path / name
        MDRun(ethanol(), model, MDSettings(steps=6, traj_every=3), path, [parse_monitor("force_delta,every=3")],
              say=lambda m: None).run()
        frames = read(path, ":")
        assert len(frames) == 3
        last = frames[-1]
        assert last.get_potential_energy() == pytest.approx(last.info["epot"], abs=1e-12)
        assert last.get_forces().shape == (9, 3) and np.isfinite(last.get_forces()).all()
        assert {"epot", "etot", "temperature", "force_delta", "step", "time_fs"} <= set(last.info)
        assert read(path).get_potential_energy() == pytest.approx(last.get_potential_energy())  # last frame by default
    direct = read(tmp_path / "run.extxyz", ":")
    binary = read(tmp_path / "run.traj", ":")
    for x, y in zip(direct, binary):
        assert np.allclose(x.positions, y.positions, atol=1e-12)
        assert x.get_potential_energy() == pytest.approx(y.get_potential_energy(), abs=1e-10)


def test_the_run_record_holds_model_versions_settings_and_the_result(tmp_path):
    start = tmp_path / "w.extxyz"
    write(start, molecule("H2O"))
    out = tmp_path / "run.traj"
    assert runner.invoke(app, base_args(start, out)).exit_code == 0
    from atomuq.models.checkpoint import weights_fingerprint

    record = json.loads((tmp_path / "run.traj.run.json").read_text())
    assert record["model"] == {"name": "molecular-small", "fingerprint": weights_fingerprint(resolve_model(None))}
    assert record["atomuq_version"] and record["monitoring"] == "safe"
    assert record["compare"]["timestep_fs"] == 0.5 and record["result"]["status"] == "completed"
    header = (tmp_path / "run.traj.log").read_text().splitlines()[:2]
    assert "monitors: safe defaults" in header[0] and "weights fingerprint" in header[1] and "atomuq" in header[1]
    js = tmp_path / "drift.json"
    res = runner.invoke(app, ["drift", str(out), "--json", str(js)])  # the analysis reads .traj too
    assert res.exit_code == 0, res.output
    assert json.loads(js.read_text())[0]["frames"] == 3
    res = runner.invoke(app, ["drift", str(out), "--json", str(tmp_path)])
    assert res.exit_code == 1 and "--json" in res.output and "is a directory" in res.output


def test_a_stopped_run_is_not_continued_by_resume(tmp_path):
    start = tmp_path / "w.extxyz"
    write(start, molecule("H2O"))
    out = tmp_path / "run.extxyz"
    args = base_args(start, out, "--monitor", "temperature,every=2,max=1,action=stop")
    res = runner.invoke(app, args)
    assert res.exit_code == 3 and "stopped because temperature" in " ".join(res.output.split())
    before = out.read_bytes()
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 3 and "nothing to resume" in res.output
    assert out.read_bytes() == before


def test_a_run_written_without_a_record_still_resumes(model, tmp_path):
    path = tmp_path / "old.extxyz"
    mons = [parse_monitor("temperature,every=2")]
    MDRun(ethanol(), model, MDSettings(steps=4, traj_every=2), path, mons, say=lambda m: None).run()
    (tmp_path / "old.extxyz.run.json").unlink()  # as written by atomuq before run records
    said = []
    result = MDRun(ethanol(), model, MDSettings(steps=8, traj_every=2), path, mons, resume=True, say=said.append).run()
    assert result.status == "completed" and result.step == 8
    assert any("settings not checked" in m for m in said)


def test_ctrl_c_exits_130_keeping_the_frames_and_resume_finishes(tmp_path, monkeypatch):
    start = tmp_path / "w.extxyz"
    write(start, molecule("H2O"))
    out = tmp_path / "run.extxyz"
    original = Temperature.__call__

    def interrupt_late(self, atoms, time_fs):
        if time_fs > 1.2:
            raise KeyboardInterrupt
        return original(self, atoms, time_fs)

    monkeypatch.setattr(Temperature, "__call__", interrupt_late)
    args = base_args(start, out, "--steps", "8", "--traj-every", "1", "--monitor", "temperature,every=1")
    res = runner.invoke(app, args)
    assert res.exit_code == 130, res.output
    assert "interrupted" in res.output and "--resume" in res.output
    assert [f.info["step"] for f in scan_trajectory(out).frames] == [0, 1, 2]
    monkeypatch.setattr(Temperature, "__call__", original)
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert [f.info["step"] for f in scan_trajectory(out).frames] == list(range(9))


def test_ctrl_c_or_a_failure_during_the_start_leaves_nothing(tmp_path, monkeypatch):
    start = tmp_path / "w.extxyz"
    write(start, molecule("H2O"))
    out = tmp_path / "run.extxyz"

    def interrupt(self, atoms, time_fs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Temperature, "__call__", interrupt)
    res = runner.invoke(app, base_args(start, out, "--monitor", "temperature"))
    assert res.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.extxyz"]
    monkeypatch.undo()

    def broken_frame(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(MDRun, "_write_frame", broken_frame)
    with pytest.raises(OSError):
        MDRun(ethanol(), resolve_model(None), MDSettings(steps=2), out, [], say=lambda m: None).run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.extxyz"]
    monkeypatch.undo()
    assert runner.invoke(app, base_args(start, out)).exit_code == 0  # the rerun needs no --resume


def test_an_empty_trajectory_left_by_a_killed_start_is_started_afresh(model, tmp_path):
    path = tmp_path / "r.traj"
    path.write_bytes(b"")
    said = []
    result = MDRun(ethanol(), model, MDSettings(steps=2, traj_every=1), path, [], resume=True, say=said.append).run()
    assert result.status == "completed" and len(read(path, ":")) == 3
    assert any("no complete frame" in m for m in said)
