"""torch-sim integration: atomuq models as torch-sim models, and batched MD with atomuq's monitors per system."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.io import read
from ase.md.verlet import VelocityVerlet

from atomuq.calculator import AtomuqCalculator
from atomuq.core.batch import Batch
from atomuq.core.errors import InputError
from atomuq.models.adapters.ase_calculator import CalculatorModel
from atomuq.models.derivatives import evaluate
from atomuq.models.protocol import AtomisticModel, ModelOutput
from atomuq.models.registry import resolve_model
from atomuq.workflows.md.integrators import init_velocities
from atomuq.workflows.md.monitor_plan import FORCE_DELTA_CAP, FORCE_DELTA_FACTOR, FORCE_DELTA_FLOOR
from atomuq.workflows.md.monitors import parse_monitor
from atomuq.workflows.md.settings import MDSettings, SettingError
from conftest import make_native
from test_conformance import KINDS
from single_thread import one_thread  # noqa: F401

ts = pytest.importorskip("torch_sim")
from atomuq.engines.torchsim import BatchedMD, TorchSimModel  # noqa: E402

DEMO = read(str(__import__("atomuq").__path__[0]) + "/data/structures/molecular_demo.extxyz", ":")
#: in-domain 300 K demo frames of four different molecules: aspirin (21 atoms), paracetamol (20), ibuprofen (33),
#: caffeine (24)
PICK = (0, 2, 7, 8)
PARACETAMOL = 20  # atoms: the system the hooked model breaks


def demo(indices=PICK):
    frames = [DEMO[i].copy() for i in indices]
    for a in frames:
        a.calc = None
    return frames


@pytest.fixture(scope="module")
def bundled():
    """The bundled model in float64 (batched and one-by-one runs then agree to round-off)."""
    return resolve_model(None).to(torch.float64)


def quiet(_message: str) -> None:
    pass


class Hooked(AtomisticModel):
    """A model that breaks one system: after `after` evaluations the direct forces of every structure with `size`
    atoms get a constant extra field of `field` eV/Å (the Force Delta rises to field/sqrt(3) above its value) or, with
    field=None, become NaN."""

    def __init__(self, inner: AtomisticModel, size: int, after: int, field: float | None = 30.0) -> None:
        super().__init__()
        self.inner, self.size, self.after, self.field = inner, size, after, field
        self.cutoff, self.elements = inner.cutoff, inner.elements
        self.calls = 0

    @property
    def has_direct_forces(self) -> bool:
        return True

    def forward(self, batch: Batch) -> ModelOutput:
        out = self.inner(batch)
        self.calls += 1
        if self.calls <= self.after:
            return ModelOutput(energy=out.energy, forces=out.forces, node_features=out.node_features)
        bad = (batch.atoms_per_structure == self.size)[batch.structure_index][:, None]
        if self.field is None:
            forces = torch.where(bad, torch.full_like(out.forces, float("nan")), out.forces)
        else:
            forces = out.forces + bad * out.forces.new_tensor([self.field, 0.0, 0.0])
        return ModelOutput(energy=out.energy, forces=forces, node_features=out.node_features)


# --------------------------------------------------------------------------------------------- the model wrapper


@pytest.mark.parametrize("forces", ["direct", "conservative"])
def test_wrapper_gives_atomuqs_energies_and_forces_for_a_batch_of_different_molecules(bundled, forces):
    frames = demo()
    state = ts.io.atoms_to_state(frames, torch.device("cpu"), torch.float64)
    before = state.positions.clone()
    out = TorchSimModel(bundled, forces)(state)
    assert torch.equal(state.positions, before)  # the state is not changed
    assert out["energy"].shape == (len(frames),) and out["forces"].shape == (state.n_atoms, 3)
    offsets = np.cumsum([0] + [len(a) for a in frames])
    for k, atoms in enumerate(frames):  # one by one, through atomuq itself
        pred = evaluate(bundled, Batch.from_atoms([atoms], dtype=torch.float64))
        mine = pred.forces_direct if forces == "direct" else pred.forces_conservative
        got = out["forces"][offsets[k]:offsets[k + 1]]
        torch.testing.assert_close(out["energy"][k], pred.energy[0], rtol=0, atol=1e-9)
        torch.testing.assert_close(got, mine, rtol=0, atol=1e-9)
        atoms.calc = AtomuqCalculator(bundled, forces=forces)
        np.testing.assert_allclose(got.numpy(), atoms.get_forces(), rtol=0, atol=1e-9)
        assert abs(float(out["energy"][k]) - atoms.get_potential_energy()) < 1e-9


def test_conservative_forces_are_minus_the_gradient_of_the_wrappers_energy(bundled):
    frames = demo((0, 8))
    wrapper = TorchSimModel(bundled, "conservative")
    state = ts.io.atoms_to_state(frames, torch.device("cpu"), torch.float64)
    forces = wrapper(state)["forces"]
    h = 1e-5
    for atom, axis in ((0, 0), (5, 2), (len(frames[0]) + 3, 1)):  # atoms of both molecules
        energies = []
        for sign in (1, -1):
            moved = state.clone()
            moved.positions[atom, axis] += sign * h
            energies.append(wrapper(moved)["energy"].sum())
        numeric = -(energies[0] - energies[1]) / (2 * h)
        assert abs(float(numeric) - float(forces[atom, axis])) < 1e-5
    direct = TorchSimModel(bundled, "direct")(state)["forces"]
    assert (direct - forces).norm() > 1e-3  # the two heads differ: that difference is the Force Delta


def test_wrapper_passes_torch_sims_own_model_checks_with_stress():
    model = make_native(elements=(14, 26))
    wrapper = TorchSimModel(model, "conservative", compute_stress=True)
    ts.models.interface.validate_model_outputs(wrapper, torch.device("cpu"), torch.float64)
    cell = bulk("Si", "diamond", a=5.43, cubic=True)
    cell.positions += np.random.default_rng(0).normal(scale=0.05, size=cell.positions.shape)
    state = ts.io.atoms_to_state([cell], torch.device("cpu"), torch.float64)
    stress = wrapper(state)["stress"][0].numpy()
    cell.calc = AtomuqCalculator(model, forces="conservative")
    np.testing.assert_allclose(stress, cell.get_stress(voigt=False), rtol=0, atol=1e-10)


def test_an_adapter_runs_through_the_wrapper_ase_calculator_model():
    cluster = bulk("Cu", "fcc", a=3.61, cubic=True)
    cluster.pbc = False
    cluster.positions += np.random.default_rng(1).normal(scale=0.05, size=cluster.positions.shape)
    other = cluster.copy()
    other.positions *= 1.02
    model = CalculatorModel(EMT())
    state = ts.io.atoms_to_state([cluster, other], torch.device("cpu"), torch.float64)
    out = TorchSimModel(model)(state)  # conservative: the calculator's own forces
    for k, atoms in enumerate((cluster, other)):
        atoms.calc = EMT()
        np.testing.assert_allclose(out["forces"][4 * k:4 * k + 4].numpy(), atoms.get_forces(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="direct force head"):
        TorchSimModel(model, "direct")


@pytest.mark.parametrize("name", list(KINDS))
def test_every_model_kind_runs_in_torch_sim_with_atomuqs_own_forces(name):
    model = KINDS[name]().model
    rng = np.random.default_rng(4)
    frames = [molecule("CH3OH"), molecule("NH3"), molecule("H2O")]
    for a in frames:
        a.positions += rng.normal(scale=0.03, size=a.positions.shape)
    state = ts.io.atoms_to_state(frames, torch.device("cpu"), torch.float64)
    modes = ["direct", "conservative"] if model.has_direct_forces else ["conservative"]
    for mode in modes:
        out = TorchSimModel(model, mode)(state)
        for k, atoms in enumerate(frames):  # the batch equals atomuq's evaluation one structure at a time
            pred = evaluate(model, Batch.from_atoms([atoms], dtype=torch.float64))
            mine = pred.forces_direct if mode == "direct" else pred.forces_conservative
            got = out["forces"][state.system_idx == k]
            torch.testing.assert_close(got, mine.to(got), rtol=0, atol=1e-8)
            torch.testing.assert_close(out["energy"][k], pred.energy[0].to(got), rtol=0, atol=1e-8)
    monitor = "force_delta,every=2" if model.has_direct_forces else "temperature,every=2"
    settings = MDSettings(ensemble="nve", forces=modes[0], temperature_K=100.0, steps=4, timestep_fs=0.25)
    results = BatchedMD(frames, model, settings, [parse_monitor(monitor)], say=quiet, min_distance=0.0).run()
    assert [r.status for r in results] == ["completed"] * 3
    assert all(len(r.readings) == 3 and np.isfinite(r.atoms.get_potential_energy()) for r in results)


# --------------------------------------------------------------------------------------------- batched MD


def test_batched_nve_follows_ase_velocity_verlet_one_by_one(bundled):
    frames = demo()
    settings = MDSettings(ensemble="nve", temperature_K=300.0, steps=20, timestep_fs=0.5)
    results = BatchedMD(frames, bundled, settings, monitors=[], say=quiet).run()
    for k, atoms in enumerate(frames):
        atoms = atoms.copy()
        init_velocities(atoms, 300.0, settings.seed + k)  # the batched run draws system k's velocities so
        atoms.calc = AtomuqCalculator(bundled, forces="direct")
        VelocityVerlet(atoms, 0.5 * units.fs).run(20)
        final = results[k].atoms
        assert results[k].status == "completed" and final.info["step"] == 20
        np.testing.assert_allclose(final.positions, atoms.positions, rtol=0, atol=1e-10)
        np.testing.assert_allclose(final.get_momenta(), atoms.get_momenta(), rtol=0, atol=1e-10)
        assert abs(final.get_potential_energy() - atoms.get_potential_energy()) < 1e-9
        assert abs(final.info["temperature"] - atoms.get_temperature()) < 1e-9


@pytest.mark.parametrize("field", [30.0, None], ids=["force-delta", "nan-forces"])
def test_a_system_that_goes_bad_is_stopped_alone_and_the_others_continue(bundled, field):
    every, after, steps = 5, 12, 30
    monitors = [parse_monitor(f"force_delta,every={every},max=5,action=stop")]
    settings = MDSettings(ensemble="nve", temperature_K=300.0, steps=steps, timestep_fs=0.5)
    frames = demo()
    for k, a in enumerate(frames):
        init_velocities(a, 300.0, k)
    hooked = Hooked(bundled, PARACETAMOL, after, field)
    results = BatchedMD(frames, hooked, settings, monitors, say=quiet).run()
    bad = PICK.index(2)
    stopped = results[bad]
    assert stopped.status == "stopped" and 0 < stopped.step <= after + every
    assert stopped.atoms.info["event"] == "stop" and stopped.atoms.info["step"] == stopped.step
    if field is None:
        assert "non-finite" in stopped.reason
    else:
        assert stopped.step % every == 0 and "force_delta" in stopped.reason
        assert stopped.flags[-1].value > 5 == stopped.flags[-1].limit
    others = [r for k, r in enumerate(results) if k != bad]
    assert all(r.status == "completed" and r.step == steps and not r.flags for r in others)
    # the others followed exactly the path they take in a batch without the broken system
    alone = BatchedMD([a for k, a in enumerate(frames) if k != bad], bundled, settings, monitors, say=quiet).run()
    for mine, ref in zip(others, alone):
        np.testing.assert_allclose(mine.atoms.positions, ref.atoms.positions, rtol=0, atol=1e-10)
        assert [r.value for r in mine.readings] == pytest.approx([r.value for r in ref.readings], abs=1e-10)


def test_log_breaches_flag_a_system_without_stopping_it(bundled):
    frames = demo()
    for k, a in enumerate(frames):
        init_velocities(a, 900.0 if k == 1 else 100.0, k)
    monitors = [parse_monitor("temperature,every=4,max=500,action=log")]
    settings = MDSettings(ensemble="nve", steps=12, timestep_fs=0.5)
    results = BatchedMD(frames, bundled, settings, monitors, say=quiet).run()
    assert all(r.status == "completed" and r.step == 12 for r in results)
    assert [bool(r.flags) for r in results] == [False, True, False, False]
    assert len(results[1].readings) == 4  # steps 0, 4, 8, 12
    assert all(r.value > 500 for r in results[1].flags)


def test_safe_default_monitors_keep_their_own_start_reference_per_system(bundled):
    settings = MDSettings(ensemble="langevin", temperature_K=300.0, steps=10, timestep_fs=0.5)
    run = BatchedMD(demo(), bundled, settings, say=quiet)
    assert run.plan.choice == "safe"
    results = run.run()
    for r in results:
        fd = [x for x in r.readings if x.monitor == "force_delta"]
        start, later = fd[0], fd[1]
        assert start.step == 0 and start.limit == FORCE_DELTA_CAP  # the cap holds before the start is known
        expected = min(max(FORCE_DELTA_FACTOR * start.value, FORCE_DELTA_FLOOR), FORCE_DELTA_CAP)
        assert later.step == 10 and abs(later.limit - expected) < 1e-12
        assert r.atoms.info["force_delta"] == later.value
    assert len({round(r.readings[0].value, 9) for r in results}) == len(results)  # four different U_Δ


# --------------------------------------------------------------------------------------------- resume and checks


def test_resume_from_the_checkpoint_follows_the_uninterrupted_run_exactly(bundled, tmp_path):
    monitors = ["force_delta,every=5", "temperature,every=5,max=2000,action=stop", "energy_drift,every=5"]

    def run(steps, name, resume=False):
        settings = MDSettings(ensemble="langevin", temperature_K=300.0, steps=steps, timestep_fs=0.5, traj_every=5)
        return BatchedMD(demo(), bundled, settings, [parse_monitor(m) for m in monitors], say=quiet,
                         trajectory=tmp_path / f"{name}.extxyz", checkpoint=tmp_path / f"{name}.json",
                         checkpoint_every=5, resume=resume).run()

    whole = run(20, "whole")
    run(10, "split")
    resumed = run(20, "split", resume=True)
    for a, b in zip(whole, resumed):
        assert a.step == b.step == 20
        np.testing.assert_array_equal(a.atoms.positions, b.atoms.positions)
        np.testing.assert_array_equal(a.atoms.get_momenta(), b.atoms.get_momenta())
        assert [r.value for r in a.readings] == [r.value for r in b.readings]
    assert (tmp_path / "whole.extxyz").read_bytes() == (tmp_path / "split.extxyz").read_bytes()
    frames = read(tmp_path / "whole.extxyz", ":")
    assert len(frames) == 5 * 4 and sorted({f.info["source_index"] for f in frames}) == [0, 1, 2, 3]
    assert "molecule" not in frames[0].info and "label_method" not in frames[0].info  # the run's keys only
    assert frames[-1].info["step"] == 20 and frames[-1].get_forces().shape == (len(DEMO[PICK[-1]]), 3)
    settings = MDSettings(ensemble="langevin", temperature_K=300.0, steps=30, timestep_fs=0.25)
    with pytest.raises(SettingError, match="timestep_fs 0.5 \\(was\\) -> 0.25"):
        BatchedMD(demo(), bundled, settings, [parse_monitor(m) for m in monitors], checkpoint=tmp_path / "split.json",
                  resume=True, say=quiet)


def test_settings_and_inputs_a_batched_run_cannot_take_are_refused(bundled):
    frames = demo()
    nve = MDSettings(ensemble="nve", temperature_K=300.0, steps=5)
    cases = [
        (MDSettings(ensemble="nvt", temperature_K=300.0), None, SettingError, "nve or langevin"),
        (MDSettings(forces="mts", temperature_K=300.0), None, SettingError, "MTS runs in atomuq md"),
        (nve, [parse_monitor("force_delta,max=1,action=rollback")], SettingError, "do not roll back"),
        (nve, [parse_monitor("key:ltau_uncertainty,every=5")], SettingError, "no result 'ltau_uncertainty'"),
    ]
    for settings, monitors, error, text in cases:
        with pytest.raises(error, match=text):
            BatchedMD(frames, bundled, settings, monitors, say=quiet).run()
    cell = bulk("Cu", "fcc", a=3.6, cubic=True)
    with pytest.raises(InputError, match="not both"):
        BatchedMD([molecule("CH4"), cell], make_native(), nve, [], say=quiet)
    with pytest.raises(InputError, match="structure 1: element"):
        BatchedMD([molecule("CH4"), molecule("SiH4")], bundled, nve, [], say=quiet)
    with pytest.raises(SettingError, match="force_delta needs a model with a direct force head"):
        BatchedMD([cell], CalculatorModel(EMT()), MDSettings(forces="conservative", temperature_K=300.0),
                  [parse_monitor("force_delta")], say=quiet)
    with pytest.raises(SettingError, match="forces direct needs a model with a direct force head"):
        BatchedMD([cell], CalculatorModel(EMT()), MDSettings(temperature_K=300.0), say=quiet)
    fixed = molecule("CH4")
    fixed.set_constraint(FixAtoms([0]))
    with pytest.raises(InputError, match="structure 0: has constraints \\(FixAtoms\\)"):
        BatchedMD([fixed], bundled, nve, [], say=quiet)
    no_momenta = MDSettings(ensemble="nve", steps=5)
    with pytest.raises(SettingError, match="structure 0 has no momenta"):
        BatchedMD(frames, bundled, no_momenta, [], say=quiet)
