"""Adversarial search: the exact gradient it follows, that it raises U_Δ within the energy budget on a
molecule and a periodic cell, failure handling, selection (RMSD, percentile, cap) and the CLI."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.io import read, write
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

from atomuq.cli.attack_commands import selected_path
from atomuq.cli.main import app
from atomuq.core.batch import Batch
from atomuq.models.derivatives import evaluate
from atomuq.models.protocol import AtomisticModel, ModelOutput
from atomuq.models.registry import resolve_model
from atomuq.uq.force_delta import force_delta
from atomuq.workflows.attack import AttackSettings, attack, attack_objective
from atomuq.workflows.selection import SelectionSettings, kabsch_rmsd, periodic_rmsd, select, threshold
from conftest import copper_cell, ethanol

runner = CliRunner()


def objective_of(model, atoms, positions, settings, e0, weight):
    """(surrogate J, dJ/dr) at positions (n, 3) float64, as the attack computes it."""
    x = torch.as_tensor(positions, dtype=torch.float64).requires_grad_(True)
    batch = Batch.from_atoms([atoms], dtype=torch.float64).replace(positions=x)
    pred = evaluate(model, batch, create_graph=True)
    u = force_delta(pred, batch).per_structure["force_delta"]
    e_rel = (pred.energy - e0) / len(atoms)
    _, surrogate = attack_objective(u, e_rel, settings, weight)
    (grad,) = torch.autograd.grad(surrogate.sum(), [x])
    return float(surrogate.detach()[0]), grad.numpy()


@pytest.mark.parametrize("make", [ethanol, copper_cell])
@pytest.mark.parametrize("objective", ["delta", "delta-boltzmann"])
def test_objective_gradient_matches_finite_differences(native_model, make, objective):
    atoms = make()
    settings = AttackSettings(objective=objective, kT=0.1)
    e0 = float(evaluate(native_model, Batch.from_atoms([atoms], dtype=torch.float64)).energy.detach()[0]) - 0.3
    _, grad = objective_of(native_model, atoms, atoms.positions, settings, e0, 0.7)
    assert np.abs(grad).max() > 1e-3  # a gradient worth checking
    h = 1e-5
    rng = np.random.default_rng(0)
    for a in rng.choice(len(atoms), size=min(4, len(atoms)), replace=False):
        for c in range(3):
            plus, minus = atoms.positions.copy(), atoms.positions.copy()
            plus[a, c] += h
            minus[a, c] -= h
            fd = (objective_of(native_model, atoms, plus, settings, e0, 0.7)[0]
                  - objective_of(native_model, atoms, minus, settings, e0, 0.7)[0]) / (2 * h)
            assert grad[a, c] == pytest.approx(fd, rel=1e-5, abs=1e-7)


def test_first_adam_step_follows_the_exact_gradient(native_model):
    """Adam's first step is lr·sign(g): the positions must move by exactly that for the gradient above."""
    atoms = ethanol()
    settings = AttackSettings(objective="delta-boltzmann", kT=0.1, steps=1, lr=1e-3, max_displacement=None, budget_kT=None)
    result = attack(native_model, [atoms], settings)
    f0, f1 = result.frames
    e0 = result.outcomes[0].energy_start
    _, grad = objective_of(native_model, atoms, f0.positions, settings, e0, 0.0)
    big = np.abs(grad) > 1e-3  # Adam's step is lr·g/(|g| + 1e-8): sign(g) to 1e-5 here
    assert big.sum() > 10
    step = f1.positions - f0.positions
    assert np.allclose(step[big], settings.lr * np.sign(grad[big]), rtol=1e-5, atol=1e-12)


def water_box(n: int = 2, a: float = 6.2, seed: int = 0) -> Atoms:
    """n³ randomly oriented water molecules in a cubic periodic cell (about liquid density for a = 3.1 n Å)."""
    rng = np.random.default_rng(seed)
    box = Atoms(cell=[a, a, a], pbc=True)
    for corner in np.ndindex(n, n, n):
        w = molecule("H2O")
        w.rotate(rng.uniform(0, 360), rng.normal(size=3))
        w.translate((np.array(corner) + 0.5) * a / n)
        box += w
    box.positions += [0.0, 0.0, -1.2]  # some atoms outside the cell, to be wrapped
    return box


def demo_molecule() -> Atoms:
    return read("data/molecular/test_300K.extxyz.gz", index=0)


@pytest.fixture(scope="module")
def bundled():
    return resolve_model(None)


@pytest.mark.parametrize("make", [demo_molecule, water_box])
def test_attack_raises_force_delta_within_the_energy_budget(bundled, make):
    atoms = make()
    settings = AttackSettings(objective="delta-boltzmann", kT=0.05, steps=25)
    result = attack(bundled, [atoms], settings)
    (out,) = result.outcomes
    budget = settings.energy_budget
    assert out.best_force_delta > 1.5 * out.force_delta_start
    assert out.best_energy_per_atom_rel <= budget and not out.failed
    frames = result.to_atoms([atoms])
    e_rel = np.array([f.info["energy_per_atom_rel"] for f in frames])
    over = np.flatnonzero(e_rel > budget)  # only the frame that crossed the budget, and the search stopped there
    assert len(over) == 0 or (list(over) == [len(frames) - 1] and out.stop_reason.startswith("energy budget"))
    chosen = select(frames, [out.force_delta_start], SelectionSettings(percentile=50, max_energy_per_atom=budget))
    assert chosen and all(frames[k].info["energy_per_atom_rel"] <= budget for k in chosen)
    # every written frame is what the model says at its (wrapped) positions
    last = frames[-1]
    pred = evaluate(bundled, Batch.from_atoms([last])).detach()
    assert float(force_delta(pred, Batch.from_atoms([last])).per_structure["force_delta"][0]) == pytest.approx(
        last.info["force_delta"], rel=1e-3)
    assert float(pred.energy[0]) == pytest.approx(last.info["model_energy"], abs=1e-3 * len(last))
    if atoms.pbc.all():
        frac = np.stack([f.get_scaled_positions(wrap=False) for f in frames])
        assert frac.min() >= 0 and frac.max() < 1


class Sabotaged(AtomisticModel):
    """Wraps a model; after `after` calls, structures starting with oxygen get NaN energy, or the call raises."""

    def __init__(self, inner, after: int, mode: str) -> None:
        super().__init__()
        self.inner, self.after, self.mode, self.calls = inner, after, mode, 0
        self.cutoff, self.elements = inner.cutoff, inner.elements

    @property
    def has_direct_forces(self) -> bool:
        return True

    def forward(self, batch: Batch) -> ModelOutput:
        self.calls += 1
        out = self.inner(batch)
        oxygen_first = batch.numbers[batch.ptr[:-1]] == 8
        if self.calls > self.after and bool(oxygen_first.any()):
            if self.mode == "raise":
                raise RuntimeError("simulated model failure")
            if self.mode == "interrupt":
                raise KeyboardInterrupt
            factor = torch.where(oxygen_first, float("nan"), 1.0).to(out.energy)  # NaN energy and forces there only
            out.energy = out.energy * factor
        return out


@pytest.mark.parametrize("mode", ["nan", "raise"])
def test_a_failing_structure_is_reported_and_the_others_go_on(native_model, mode):
    water, etoh = molecule("H2O"), ethanol()
    settings = AttackSettings(steps=8, budget_kT=None, patience=None)
    result = attack(Sabotaged(native_model, after=4, mode=mode), [etoh, water], settings)
    good, bad = result.outcomes
    assert not good.failed and good.stop_reason.startswith("step budget") and good.steps_run == 8
    assert bad.failed and bad.failed_step == 3  # call 1 is the start, call k+2 is step k
    assert ("non-finite" in bad.stop_reason) if mode == "nan" else ("simulated model failure" in bad.stop_reason)
    assert [f.step for f in result.frames if f.source == 1] == [0, 1, 2]  # frames before the failure kept
    assert [f.step for f in result.frames if f.source == 0] == list(range(9))
    assert all(np.isfinite(f.positions).all() for f in result.frames)


def test_interrupt_keeps_everything_found_so_far(native_model):
    result = attack(Sabotaged(native_model, after=3, mode="interrupt"), [molecule("H2O"), ethanol()],
                    AttackSettings(steps=10), batch_size=1)
    assert len(result.outcomes) == 1 and result.outcomes[0].stop_reason == "interrupted at step 2"
    assert [f.step for f in result.frames] == [0, 1]


def test_interrupt_at_the_start_of_a_later_batch_keeps_the_earlier_batches(native_model):
    # ethanol (carbon first: never sabotaged) is searched to its end; Ctrl-C comes in water's first model call
    result = attack(Sabotaged(native_model, after=0, mode="interrupt"), [ethanol(), molecule("H2O")],
                    AttackSettings(steps=4, budget_kT=None, patience=None), batch_size=1)
    assert result.interrupted and [o.index for o in result.outcomes] == [0]
    assert [f.step for f in result.frames] == list(range(5)) and {f.source for f in result.frames} == {0}
    assert not attack(native_model, [ethanol()], AttackSettings(steps=1)).interrupted


def test_patience_stops_a_flat_search(native_model):
    # with lr tiny nothing rises by min_gain, so patience ends the search before the budget
    result = attack(native_model, [ethanol()], AttackSettings(steps=50, lr=1e-9, init_scale=0.0, patience=5))
    assert result.outcomes[0].stop_reason == "objective flat for 5 steps" and result.outcomes[0].steps_run < 10


def test_kabsch_rmsd_against_scipy_and_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(9, 3))
    rotated = Rotation.random(random_state=1).apply(a) + [1.0, -2.0, 0.5]
    noisy = rotated + rng.normal(scale=0.1, size=a.shape)
    got = kabsch_rmsd(a, np.stack([rotated, noisy]))
    assert got[0] == pytest.approx(0.0, abs=1e-7)
    centred_a, centred_b = a - a.mean(0), noisy - noisy.mean(0)
    rot, _ = Rotation.align_vectors(centred_a, centred_b)
    expected = np.sqrt(((rot.apply(centred_b) - centred_a) ** 2).sum(1).mean())
    assert got[1] == pytest.approx(expected, rel=1e-6)
    mirrored = a * [-1, 1, 1]  # a reflection is not a rotation: the RMSD stays non-zero for a chiral set
    assert kabsch_rmsd(a, mirrored[None])[0] > 0.1


def test_periodic_rmsd_uses_minimum_images():
    cell = np.diag([4.0, 5.0, 6.0])
    x = np.random.default_rng(0).uniform(0, 4, size=(5, 3))
    moved = x + [4.0, 0.0, -6.0] * np.array([[1], [0], [1], [0], [0]]) + [0.3, 0.3, 0.3]  # images + a translation
    one = x.copy()
    one[2, 1] += 0.5 + 5.0  # one atom displaced by 0.5 Å (plus a lattice vector)
    got = periodic_rmsd(x, np.stack([moved, one]), cell, np.array([True, True, True]))
    assert got[0] == pytest.approx(0.0, abs=1e-12)
    n = len(x)  # one displacement d, mean removed: sum of squares d²(1 - 1/n)
    assert got[1] == pytest.approx(np.sqrt(0.25 * (1 - 1 / n) / n), rel=1e-12)


def test_selection_threshold_duplicates_energy_and_cap():
    base = molecule("CH4")
    rng = np.random.default_rng(0)

    def frame(u, shift, e=0.0):
        a = base.copy()
        a.positions += shift
        a.info.update(force_delta=u, energy_per_atom_rel=e)
        return a

    frames = [frame(5.0, 0.0), frame(4.0, 0.01 * rng.normal(size=(5, 3))),  # near-duplicate of the first
              frame(3.0, 0.3 * rng.normal(size=(5, 3))), frame(0.5, 0.3 * rng.normal(size=(5, 3))),  # below threshold
              frame(6.0, 0.3 * rng.normal(size=(5, 3)), e=0.5)]  # over the energy cap
    starts = [0.2, 0.4, 0.6, 0.8, 1.0]
    assert threshold(starts, 50) == pytest.approx(0.6)
    assert select(frames, starts, SelectionSettings(percentile=100, rmsd_threshold=0.1)) == [4, 0, 2]
    assert select(frames, starts, SelectionSettings(percentile=100, max_energy_per_atom=0.1)) == [0, 2]
    assert select(frames, starts, SelectionSettings(percentile=100, rmsd_threshold=0.0)) == [4, 0, 1, 2]
    assert select(frames, starts, SelectionSettings(percentile=100, max_selected=1)) == [4]


def test_selected_path_names():
    from pathlib import Path

    assert selected_path(Path("out/run.extxyz")) == Path("out/run.selected.extxyz")
    assert selected_path(Path("run.extxyz.gz")) == Path("run.selected.extxyz.gz")
    assert selected_path(Path("run")) == Path("run.selected")


def test_cli_attack_writes_trajectory_and_selection(tmp_path):
    src = tmp_path / "in.extxyz"
    write(src, read("data/molecular/test_300K.extxyz.gz", index="0:100:50"))
    out = tmp_path / "traj.extxyz"
    result = runner.invoke(app, ["attack", str(src), "-o", str(out), "--steps", "6", "--write-every", "2",
                                 "--percentile", "0"])
    assert result.exit_code == 0, result.output
    assert "adversarial search" in result.output
    frames = read(out, ":")
    for source in (0, 1):
        steps = [f.info["attack_step"] for f in frames if f.info["source_index"] == source]
        assert steps == [0, 2, 4, 6]
    for key in ("force_delta", "energy_per_atom_rel", "force_delta_start", "source_file"):
        assert key in frames[0].info, key
    assert frames[0].arrays["force_delta_atoms"].shape == (len(frames[0]),)
    # ASE conventions: each frame gives the model's energy and the direct forces at that frame
    assert frames[0].get_potential_energy() == frames[0].info["model_energy"]
    assert frames[0].get_forces().shape == (len(frames[0]), 3) and "atomuq_model_fingerprint" in frames[0].info
    chosen = read(tmp_path / "traj.selected.extxyz", ":")
    assert 1 <= len(chosen) <= len(frames)
    assert min(f.info["force_delta"] for f in chosen) > min(f.info["force_delta_start"] for f in frames)


@pytest.mark.parametrize("args, message", [
    (["--objective", "energy"], "objective must be one of"),
    (["--kT", "-1"], "kT must be positive"),
    (["--percentile", "120"], "percentile must be between"),
])
def test_cli_attack_bad_options(tmp_path, args, message):
    src = tmp_path / "in.extxyz"
    write(src, [molecule("CH4")])
    result = runner.invoke(app, ["attack", str(src), "-o", str(tmp_path / "o.extxyz"), *args])
    assert result.exit_code == 1 and message in result.output
    assert not (tmp_path / "o.extxyz").exists()


def test_batch_select_equals_batching_the_chosen_structures():
    structures = [ethanol(), copper_cell(), molecule("H2O")]
    picked = Batch.from_atoms(structures).select(torch.tensor([2, 0]))
    direct = Batch.from_atoms([structures[2], structures[0]])
    for name in ("positions", "numbers", "cell", "pbc", "structure_index", "atoms_per_structure", "fixed"):
        assert torch.equal(getattr(picked, name), getattr(direct, name)), name


def test_closest_contacts_relative_to_covalent_radii():
    from ase.build import bulk
    from ase.data import covalent_radii

    from atomuq.core.validate import closest_contacts

    squeezed = molecule("H2O")
    squeezed.positions[2] = squeezed.positions[0] + [0.0, 0.0, 0.6]
    cu = bulk("Cu", "fcc", a=3.6)  # primitive cell: every contact is a periodic image
    normal, close, metal = closest_contacts(Batch.from_atoms([molecule("H2O"), squeezed, cu], dtype=torch.float64))
    assert {close.i, close.j} == {0, 2}
    assert close.distance == pytest.approx(0.6) and close.ratio == pytest.approx(0.6 / (covalent_radii[8] + covalent_radii[1]))
    assert normal.ratio == pytest.approx(np.linalg.norm(molecule("H2O").get_distance(0, 1)) / (covalent_radii[8] + covalent_radii[1]))
    assert metal.distance == pytest.approx(3.6 / np.sqrt(2)) and metal.i == metal.j == 0


def test_attack_stops_a_structure_whose_atoms_collide_and_keeps_no_such_frame(bundled):
    squeezed = molecule("CH3OH")
    squeezed.positions[3] = squeezed.positions[1] + [0.0, 0.0, 0.55]  # an O-H at 0.55 Å
    fine = molecule("CH3OH")
    result = attack(bundled, [squeezed, fine], AttackSettings(steps=3, seed=0))
    stopped = result.outcomes[0]
    assert "covalent radii" in stopped.stop_reason and stopped.steps_run == 0
    assert all(f.source != 0 for f in result.frames)
    assert any(f.source == 1 for f in result.frames)
    off = attack(bundled, [squeezed], AttackSettings(steps=2, seed=0, min_contact_ratio=None))
    assert any(f.source == 0 for f in off.frames)


@pytest.mark.parametrize("after", [13, 0])  # Ctrl-C in the middle of water's search, or in its first model call
def test_cli_attack_stopped_by_ctrl_c_exits_130_and_writes_what_it_found(tmp_path, monkeypatch, after):
    """Ctrl-C (KeyboardInterrupt) in the middle of the search: the frames found so far are written, exit status 130."""
    import atomuq.cli.attack_commands as commands

    bundled = resolve_model("molecular-small")
    # the first batch (methane: never sabotaged) runs to its end; the interrupt comes during the second (water)
    monkeypatch.setattr(commands, "load_model_option", lambda *a, **k: Sabotaged(bundled, after=after, mode="interrupt"))
    src, out = tmp_path / "in.extxyz", tmp_path / "traj.extxyz"
    write(src, [molecule("CH4"), molecule("H2O")])
    result = runner.invoke(app, ["attack", str(src), "-o", str(out), "--steps", "9", "--batch-size", "1",
                                 "--percentile", "0"])
    assert result.exit_code == 130, result.output
    assert "1 of 2 structures not searched to the end" in result.output and "Traceback" not in result.output
    frames = read(out, ":")
    steps = {k: [f.info["attack_step"] for f in frames if f.info["source_index"] == k] for k in (0, 1)}
    assert steps[0] == list(range(10))
    assert (0 < len(steps[1]) < 10 if after else not steps[1]) and steps[1] == list(range(len(steps[1])))
    assert (tmp_path / "traj.selected.extxyz").is_file()


def test_cli_attack_checks_its_outputs_before_searching(tmp_path):
    src = tmp_path / "in.extxyz"
    write(src, [molecule("CH4")])
    result = runner.invoke(app, ["attack", str(src), "-o", str(tmp_path / "a.extxyz"), "--selected", str(tmp_path / "a.extxyz")])
    assert result.exit_code == 1 and "--selected" in result.output and "the same file as --output" in result.output
    result = runner.invoke(app, ["attack", str(src), "-o", str(tmp_path / "a.extxyz"), "--selected", str(tmp_path)])
    assert result.exit_code == 1 and f"--selected {tmp_path}: is a directory" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.extxyz"]
