"""Safe MD defaults: with no monitors given, a run that loses trust stops (or rolls back with a fallback);
`--monitor log` opts out; the choice is recorded."""

from __future__ import annotations

import json

import pytest
from ase.build import molecule
from ase.io import write
from typer.testing import CliRunner

from atomuq.cli.main import app
from atomuq.models.registry import resolve_model
from atomuq.workflows.md import monitor_plan
from atomuq.workflows.md.monitor_plan import MonitorPlan, log_monitors, plan_from_specs, safe_monitors
from atomuq.workflows.md.monitors import Threshold
from atomuq.workflows.md.run import MDRun, MDSettings, SettingError, init_velocities

runner = CliRunner()
HOT = 3000.0  # K: ethanol this hot leaves the bundled model's domain within ~10 fs


@pytest.fixture(scope="module")
def model():
    return resolve_model(None)


def hot_ethanol():
    atoms = molecule("CH3CH2OH")
    init_velocities(atoms, HOT, 0)
    return atoms


def test_the_safe_defaults_stop_a_run_that_blows_up_and_say_why(model, tmp_path):
    settings = MDSettings(steps=200, traj_every=10, temperature_K=HOT)
    result = MDRun(hot_ethanol(), model, settings, tmp_path / "hot.extxyz", say=lambda m: None).run()
    assert result.status == "stopped" and result.step < 100 and result.monitoring == "safe"
    assert "force_delta" in result.reason and "above its limit" in result.reason
    log = (tmp_path / "hot.extxyz.log").read_text()
    assert "monitors: safe defaults (stop when trust is lost)" in log and "BREACH -> stop" in log
    record = json.loads((tmp_path / "hot.extxyz.run.json").read_text())
    assert record["monitoring"] == "safe" and record["result"]["status"] == "stopped"


def test_log_only_monitors_let_the_same_run_drift(model, tmp_path):
    settings = MDSettings(steps=200, traj_every=50, temperature_K=HOT)
    plan = MonitorPlan("log", log_monitors(model.has_direct_forces))
    result = MDRun(hot_ethanol(), model, settings, tmp_path / "hot.extxyz", plan, say=lambda m: None).run()
    assert result.status == "completed" and result.step == 200
    assert "log only (opted out of the safe defaults)" in (tmp_path / "hot.extxyz.log").read_text()


def test_cli_default_stops_with_the_way_out_and_monitor_log_opts_out(tmp_path):
    start = tmp_path / "hot.extxyz"
    write(start, hot_ethanol())  # momenta are kept: the run starts hot
    args = ["md", str(start), "--steps", "120", "--traj-every", "20"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "a.extxyz")])
    text = " ".join(res.output.split())
    assert res.exit_code == 3, res.output
    assert "stopped because force_delta" in text and "--monitor log" in text and "--fallback conservative" in text
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "b.extxyz"), "--monitor", "log"])
    assert res.exit_code == 0 and "completed: step 120" in res.output, res.output
    record = json.loads((tmp_path / "b.extxyz.run.json").read_text())
    assert record["monitoring"] == "log" and record["compare"]["monitors"][0] == "force_delta,every=10,action=log"


def test_with_a_fallback_the_safe_defaults_roll_back_instead(model, tmp_path):
    settings = MDSettings(steps=60, traj_every=10, temperature_K=HOT, fallback="conservative", max_rollbacks=1)
    plan = plan_from_specs(None, settings, model.has_direct_forces)
    assert {m.action for m in plan.monitors if m.threshold} == {"rollback"}
    result = MDRun(hot_ethanol(), model, settings, tmp_path / "rb.extxyz", plan, say=lambda m: None).run()
    assert result.rollbacks == 1 and result.mode == "conservative"
    assert "ROLLBACK to step" in (tmp_path / "rb.extxyz.log").read_text()


def test_safe_limits_come_from_the_constants():
    settings = MDSettings(temperature_K=400.0)
    fd, temp, drift = safe_monitors(settings, has_direct_forces=True)
    assert (fd.name, temp.name, drift.name) == ("force_delta", "temperature", "energy_drift")
    assert {fd.every, temp.every, drift.every} == {monitor_plan.SAFE_EVERY}
    assert fd.threshold == Threshold(monitor_plan.FORCE_DELTA_FACTOR, "start", floor=monitor_plan.FORCE_DELTA_FLOOR,
                                     cap=monitor_plan.FORCE_DELTA_CAP)
    assert temp.threshold.value == monitor_plan.TEMPERATURE_FACTOR * 400.0 and drift.threshold is None
    no_target = safe_monitors(MDSettings(), has_direct_forces=False)
    assert [m.name for m in no_target] == ["temperature", "energy_drift"]  # no U_Δ without a direct head
    assert no_target[0].threshold.mode == "start" and no_target[0].threshold.floor == monitor_plan.TEMPERATURE_FLOOR_K
    assert safe_monitors(MDSettings(forces="conservative", fallback="conservative"), True)[0].action == "stop"


def test_plan_words_and_specs():
    settings = MDSettings()
    assert plan_from_specs([], settings, True).choice == "safe"
    assert plan_from_specs(["log"], settings, True).choice == "log"
    assert plan_from_specs(["none"], settings, True).monitors == []
    custom = plan_from_specs(["force_delta,every=5,max=1.5xmedian,window=9,action=rollback"], settings, True)
    assert custom.choice == "custom" and custom.specs() == ["force_delta,every=5,max=1.5xmedian,window=9,action=rollback"]
    with pytest.raises(SettingError, match="monitors none stands alone"):
        plan_from_specs(["none", "temperature"], settings, True)
    with pytest.raises(SettingError, match="reduce applies to key:RESULT"):
        plan_from_specs(["temperature,reduce=mean"], settings, True)


def test_paper_preset_equilibration_follows_the_opt_out(tmp_path):
    start = tmp_path / "water.extxyz"
    write(start, molecule("H2O"))
    common = ["md", str(start), "--preset", "paper", "--steps", "4", "--equilibration-steps", "4", "--traj-every", "2"]
    res = runner.invoke(app, [*common, "-o", str(tmp_path / "log.extxyz"), "--monitor", "log"])
    assert res.exit_code == 0, res.output
    assert "log only" in (tmp_path / "log.extxyz.equil.extxyz.log").read_text().splitlines()[0]
    res = runner.invoke(app, [*common, "-o", str(tmp_path / "safe.extxyz")])
    assert res.exit_code == 0, res.output
    assert "safe defaults" in (tmp_path / "safe.extxyz.equil.extxyz.log").read_text().splitlines()[0]
    assert "safe defaults" in (tmp_path / "safe.extxyz.log").read_text().splitlines()[0]


def test_an_explicit_empty_list_means_no_monitors(model, tmp_path):
    atoms = molecule("H2O")
    init_velocities(atoms, 300.0, 0)
    run = MDRun(atoms, model, MDSettings(steps=2), tmp_path / "n.extxyz", [], say=lambda m: None)
    assert run.plan.choice == "none" and run.run().status == "completed"
