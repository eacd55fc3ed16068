"""MD with the bundled model: energy conservation, MTS, monitors with stop and rollback, crash-safe resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import units
from ase.build import molecule
from ase.md.verlet import VelocityVerlet

from atomuq.calculator import AtomuqCalculator
from atomuq.core.errors import InputError
from atomuq.models.registry import resolve_model
from atomuq.workflows.md.drift import analyse, load_md_frames
from atomuq.workflows.md.monitors import (
    FunctionQuantity,
    Monitor,
    Threshold,
    parse_monitor,
)
from atomuq.workflows.md.mts import MultipleTimeStepping
from atomuq.workflows.md.run import MDRun, MDSettings, SettingError, init_velocities
from atomuq.workflows.md.trajectory import scan_trajectory


@pytest.fixture(scope="module")
def model():
    """The bundled model in float64 (so conservative forces are the exact gradient to round-off)."""
    return resolve_model(None).to(torch.float64)


def start(seed: int = 0):
    atoms = molecule("CH3CH2OH")
    init_velocities(atoms, 300.0, seed)
    return atoms


def run(model, tmp_path, name, monitors=None, **kw):
    settings = MDSettings(**{"steps": 60, "traj_every": 5, **kw})
    result = MDRun(
        start(), model, settings, tmp_path / name, monitors or [], say=lambda m: None
    ).run()
    return result, tmp_path / name


def test_conservative_nve_conserves_energy_far_better_than_direct(model, tmp_path):
    reports = {}
    for forces in ("direct", "conservative"):
        run(model, tmp_path, f"{forces}.extxyz", forces=forces, steps=400, traj_every=4)
        reports[forces] = analyse(tmp_path / f"{forces}.extxyz")
    direct, cons = reports["direct"], reports["conservative"]
    assert abs(cons.drift_meV_atom_ps) * 20 < abs(direct.drift_meV_atom_ps)
    assert cons.max_deviation_meV_atom * 5 < direct.max_deviation_meV_atom
    assert cons.frames == direct.frames == 101


def test_mts_with_one_inner_step_is_velocity_verlet_on_conservative_forces(model):
    a, b = start(), start()
    a.calc = AtomuqCalculator(model, forces="conservative")
    b.calc = AtomuqCalculator(model, forces="direct", conservative="on_demand")
    vv = VelocityVerlet(a, 0.5 * units.fs)
    mts = MultipleTimeStepping(b, 0.5 * units.fs, inner=1)
    for _ in range(25):
        vv.run(1)
        mts.run(1)
        assert np.allclose(a.positions, b.positions, rtol=0, atol=1e-10)
        assert np.allclose(a.get_momenta(), b.get_momenta(), rtol=0, atol=1e-10)
    assert mts.nsteps == 25 and mts.get_time() == pytest.approx(25 * 0.5 * units.fs)


def test_mts_conserves_the_model_energy_far_better_than_direct(model, tmp_path):
    run(model, tmp_path, "direct.extxyz", forces="direct", steps=400, traj_every=8)
    # 2 fs outer, 4 inner steps of 0.5 fs: 200 fs (4 fs outer steps resonate with C-H vibrations for this model)
    run(
        model,
        tmp_path,
        "mts.extxyz",
        forces="mts",
        steps=100,
        mts_inner=4,
        traj_every=2,
    )
    direct, mts = analyse(tmp_path / "direct.extxyz"), analyse(tmp_path / "mts.extxyz")
    assert mts.duration_ps == pytest.approx(
        0.2
    ) and direct.duration_ps == pytest.approx(0.2)
    assert abs(mts.drift_meV_atom_ps) * 20 < abs(direct.drift_meV_atom_ps)


def test_mts_rejects_bad_inner_and_thermostat(model):
    atoms = start()
    with pytest.raises(ValueError, match="inner"):
        MultipleTimeStepping(atoms, 1.0, inner=0)
    with pytest.raises(ValueError, match="friction"):
        MultipleTimeStepping(
            atoms, 1.0, inner=2, thermostat="langevin", temperature_K=300
        )


def test_low_force_delta_threshold_stops_and_the_log_says_so(model, tmp_path):
    mon = parse_monitor("force_delta,every=5,max=1.0xstart,action=stop")
    result, path = run(model, tmp_path, "stop.extxyz", [mon], steps=200)
    assert result.status == "stopped" and result.step < 200
    log = (tmp_path / "stop.extxyz.log").read_text()
    assert "BREACH -> stop" in log and "STOP" in log
    assert scan_trajectory(path).frames[-1].info["event"] == "stop"


def test_breach_rolls_back_to_last_trusted_frame_and_continues_conservative(
    model, tmp_path
):
    def direct_after_10fs(atoms, t):
        return 1.0 if atoms.calc.force_mode == "direct" and t > 10.0 else 0.0

    quantity = FunctionQuantity(direct_after_10fs, "trouble")
    mon = Monitor(quantity, every=4, threshold=Threshold(0.5), action="rollback")
    result, path = run(model, tmp_path, "rb.extxyz", [mon], steps=60)
    assert (
        result.status == "completed"
        and result.rollbacks == 1
        and result.mode == "conservative"
    )
    assert result.time_fs == pytest.approx(30.0)
    log = (tmp_path / "rb.extxyz.log").read_text()
    assert (
        "ROLLBACK to step 20 (t = 10 fs" in log
        and "continuing with conservative forces" in log
    )
    frames, restarts = load_md_frames(path)
    assert restarts == 1
    times = [f.info["time_fs"] for f in frames]
    assert times == sorted(times) and times[-1] == pytest.approx(30.0)
    assert {f.info["force_mode"] for f in frames if f.info["time_fs"] > 10.0} == {
        "conservative"
    }


class Killed(Exception):
    pass


@pytest.mark.parametrize(
    "ensemble,forces",
    [
        ("nve", "direct"),
        ("langevin", "direct"),
        ("nvt", "conservative"),
        ("langevin", "mts"),
    ],
)
def test_killed_and_resumed_run_gives_the_same_frames(
    model, tmp_path, ensemble, forces
):
    kw = {
        "ensemble": ensemble,
        "forces": forces,
        "temperature_K": 300.0,
        "steps": 12 if forces == "mts" else 60,
    }
    every = 1 if forces == "mts" else 5
    kw["traj_every"] = 1 if forces == "mts" else 5

    def mons():
        return [parse_monitor(f"force_delta,every={every}"), parse_monitor(f"energy_drift,every={every}")]

    run(model, tmp_path, "full.extxyz", mons(), **kw)
    kill_after_fs = kw["steps"] * 0.6 * MDSettings(**kw).step_fs(forces)  # 60 % through the run

    def kill(t_fs):
        if t_fs > kill_after_fs:
            raise Killed

    with pytest.raises(Killed):
        MDRun(start(), model, MDSettings(**kw), tmp_path / "cut.extxyz", mons(), say=lambda m: None).run(kill)
    with open(
        tmp_path / "cut.extxyz", "a"
    ) as fh:  # a frame half-written when the process died
        fh.write("9\nProperties=species:S:1:pos:R:3 step=99\nC 0.1 0.2")
    messages = []
    settings = MDSettings(**kw)
    MDRun(
        start(seed=5),
        model,
        settings,
        tmp_path / "cut.extxyz",
        mons(),
        resume=True,
        say=messages.append,
    ).run()
    assert any("dropped a half-written last frame" in m for m in messages)
    assert "dropped a half-written" in (tmp_path / "cut.extxyz.log").read_text()
    full, cut = (
        scan_trajectory(tmp_path / "full.extxyz").frames,
        scan_trajectory(tmp_path / "cut.extxyz").frames,
    )
    assert [f.info["step"] for f in cut] == [f.info["step"] for f in full]
    for a, b in zip(full, cut):
        assert np.allclose(a.positions, b.positions, rtol=0, atol=1e-8)
        assert np.allclose(a.get_momenta(), b.get_momenta(), rtol=0, atol=1e-8)
        assert a.info.get("force_delta") == pytest.approx(
            b.info.get("force_delta"), abs=1e-8
        )


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"ensemble": "nvt"}, "needs temperature_K"),
        ({"ensemble": "npt"}, "^ensemble must be one of"),
        ({"forces": "magic"}, "^forces must be one of"),
        ({"timestep_fs": -1.0}, "^timestep_fs must be a positive"),
        ({"timestep_fs": 0.0}, "^timestep_fs must be a positive"),
        ({"timestep_fs": float("nan")}, "^timestep_fs must be a positive"),
        ({"timestep_fs": 50.0}, "far too long"),
        ({"steps": -1}, "^steps must be an integer >= 0"),
        ({"temperature_K": -5.0}, "^temperature_K must be a number of K >= 0"),
        ({"tdamp_fs": 0.0}, "^tdamp_fs must be a positive"),
        ({"friction_per_fs": -0.1}, "^friction_per_fs must be a positive"),
        ({"traj_every": 0}, "^traj_every must be a positive integer"),
        ({"max_rollbacks": -1}, "^max_rollbacks must be an integer >= 0"),
        ({"mts_outer_fs": 0.0, "forces": "mts"}, "^mts_outer_fs must be a positive"),
        ({"forces": "mts", "ensemble": "nvt", "temperature_K": 300.0}, "not with nvt"),
        ({"fallback": "direct"}, "^fallback must be one of"),
        ({"mts_inner": 0, "forces": "mts"}, "^mts_inner must be a positive"),
    ],
)
def test_bad_settings_give_clear_errors_naming_the_field(kw, match):
    with pytest.raises(SettingError, match=match) as info:
        MDSettings(**kw).validate()
    assert isinstance(info.value, InputError)


def test_setting_errors_render_with_the_command_line_flags():
    from atomuq.cli.md_commands import FLAGS

    with pytest.raises(SettingError) as info:
        MDSettings(ensemble="langevin").validate()
    assert str(info.value) == "ensemble langevin needs temperature_K K"
    assert info.value.render(FLAGS) == "--ensemble langevin needs --temperature K"
    assert set(FLAGS) >= {f for f in MDSettings.__dataclass_fields__}  # every setting has its flag


@pytest.mark.parametrize(
    "spec,match",
    [
        ("entropy,every=3", "unknown quantity"),
        ("force_delta,every=0", "every must be a positive"),
        ("force_delta,action=rollback", "needs a threshold"),
        ("force_delta,max=2,action=explode", "action must be one of"),
        ("force_delta,max=-2xstart", "must be finite"),
        ("force_delta,often", "expected key=value"),
        ("force_delta,colour=red", "unknown option"),
    ],
)
def test_bad_monitor_specs_give_clear_errors(spec, match):
    with pytest.raises(InputError, match=match):
        parse_monitor(spec)


def test_missing_momenta_without_temperature_is_an_error(model, tmp_path):
    with pytest.raises(InputError, match="no momenta"):
        MDRun(molecule("CH3CH2OH"), model, MDSettings(), tmp_path / "x.extxyz")


def test_mts_langevin_noise_has_the_canonical_variance_and_its_stream_is_restorable():
    atoms = start()
    dyn = MultipleTimeStepping(
        atoms,
        1.0 * units.fs,
        inner=2,
        thermostat="langevin",
        temperature_K=300.0,
        friction=0.02 / units.fs,
        rng=3,
    )
    zeros = np.zeros((len(atoms), 3))
    samples = np.array(
        [dyn._ou(zeros, 1e4 * units.fs) for _ in range(3000)]
    )  # c1 = 0: a fresh draw
    kT = units.kB * 300.0
    assert np.allclose(
        (samples**2).mean(axis=(0, 2)) / atoms.get_masses(), kT, rtol=0.06
    )
    state = dyn.get_state()
    first = dyn._ou(zeros, 1.0)
    dyn.set_state(state)
    assert np.array_equal(dyn._ou(zeros, 1.0), first)


def test_mts_works_with_ase_trajectories_and_observers(model, tmp_path):
    from ase.io import Trajectory, read

    atoms = start()
    atoms.calc = AtomuqCalculator(model, conservative="on_demand")
    dyn = MultipleTimeStepping(atoms, 2.0 * units.fs, inner=4)
    with Trajectory(tmp_path / "mts.traj", "w", atoms) as traj:
        dyn.attach(traj.write, interval=1)
        seen = []
        dyn.attach(lambda: seen.append(dyn.get_time() / units.fs), interval=2)
        dyn.run(4)
    frames = read(tmp_path / "mts.traj", ":")
    assert len(frames) == 5 and seen == pytest.approx([0.0, 4.0, 8.0])
    assert np.allclose(frames[-1].positions, atoms.positions)
    assert dyn.todict()["inner"] == 4


def test_calculator_runs_the_backward_pass_only_on_demand(model):
    atoms = start()
    always = AtomuqCalculator(model)
    lazy = AtomuqCalculator(model, conservative="on_demand")
    atoms.calc = lazy
    forces = atoms.get_forces()
    assert (
        "forces_conservative" not in lazy.results and "force_delta" not in lazy.results
    )
    ref = always.get_property("force_delta", atoms)
    assert lazy.get_property("force_delta", atoms) == pytest.approx(
        ref, rel=1e-12
    )  # computed when asked
    assert np.allclose(lazy.results["forces_direct"], forces, atol=1e-12)
    atoms.positions[0, 0] += 0.01
    lazy.request_conservative()
    atoms.get_forces()
    assert "forces_conservative" in lazy.results  # the one-shot request was honoured
    atoms.positions[0, 0] += 0.01
    atoms.get_forces()
    assert "forces_conservative" not in lazy.results  # and used up
    with pytest.raises(ValueError, match="on_demand"):
        AtomuqCalculator(model, conservative="sometimes")


def test_snapshot_action_writes_the_frame_and_logs_it(model, tmp_path):
    quantity = FunctionQuantity(lambda atoms, t: t, "clock", "fs")
    mon = Monitor(quantity, every=4, threshold=Threshold(6.0), action="snapshot")
    result, path = run(model, tmp_path, "snap.extxyz", [mon], steps=20)
    assert result.status == "completed"
    snaps = scan_trajectory(path.with_name("snap.extxyz.snapshots.extxyz")).frames
    assert [f.info["time_fs"] for f in snaps] == [
        8.0,
        10.0,
    ]  # checked every 2 fs; 8 and 10 fs exceed 6 fs
    assert "snapshot written" in (tmp_path / "snap.extxyz.log").read_text()


def test_ltau_monitor_stops_a_run_whose_atoms_the_estimator_distrusts(model, tmp_path):
    from atomuq.models.checkpoint import weights_fingerprint
    from atomuq.uq.ltau.estimator import fit_estimator
    from atomuq.uq.ltau.index import build_index
    from atomuq.workflows.ltau import compute_descriptors

    train = [start(seed) for seed in range(3)]
    descriptors = compute_descriptors(model, train)
    n = len(descriptors)
    errors = np.full((5, n), 10.0)  # every training atom always far above atol: p_i = 0
    est = fit_estimator([errors], np.concatenate([a.numbers for a in train]), np.ones(n), build_index(descriptors),
                        atol=0.1, metadata={"model_fingerprint": weights_fingerprint(model)})
    mon = parse_monitor("key:ltau_uncertainty,reduce=mean,every=5,max=0.5,action=stop")
    result = MDRun(start(), model, MDSettings(steps=50, traj_every=5), tmp_path / "l.extxyz", [mon],
                   say=lambda m: None, ltau=est, ltau_k=2).run()
    assert result.status == "stopped" and result.step == 0  # the start is checked too
    log = (tmp_path / "l.extxyz.log").read_text()
    assert "ltau_uncertainty" in log and "BREACH -> stop" in log
