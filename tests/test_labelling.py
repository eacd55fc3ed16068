"""Reference labelling and MD sampling: real labels, resumability, recorded failures, clear errors, the CLI."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.calculator import CalculationFailed, Calculator, all_changes
from ase.io import read, write
from typer.testing import CliRunner

from atomuq.cli.main import app
from atomuq.core.errors import InputError
from atomuq.core.io import Record, write_structures
from atomuq.core.workers import openmp_threads
from atomuq.reference import ReferenceMethod, get_method
from atomuq.reference.files import PartialFrames, failures_path, partial_path
from atomuq.workflows.label import LabellingError, label_structures
from atomuq.workflows.sample import SampleSettings, sample_structures

tblite = pytest.importorskip("tblite.ase")


def rattled_molecules(n: int, seed: int = 0) -> list[Atoms]:
    """n small H/C/O molecules, each rattled, tagged with info['tag'] = position."""
    rng = np.random.default_rng(seed)
    names = ["H2O", "CH4", "CH3OH", "CH3CH2OH", "HCOOH"]
    out = []
    for k in range(n):
        a = molecule(names[k % len(names)])
        a.positions += rng.normal(scale=0.03, size=a.positions.shape)
        a.info["tag"] = k
        out.append(a)
    return out


# --------------------------------------------------------------------------------------------
# a cheap calculator that counts its finished calculations and can fail or be "killed" on demand

CALLS: Counter = Counter()  # info['tag'] -> finished calculations
PLAN: dict = {"kill_after": None, "fail_tags": set()}


class CountingCalculator(Calculator):
    """E = 0.5 k Σ|r - c|² (c: centroid), F = -k (r - c); counts finished calls by info['tag']."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        tag = self.atoms.info.get("tag", -1)
        if PLAN["kill_after"] is not None and sum(CALLS.values()) >= PLAN["kill_after"]:
            raise KeyboardInterrupt("simulated kill")
        if tag in PLAN["fail_tags"]:
            raise CalculationFailed("SCF did not converge (simulated)")
        d = self.atoms.positions - self.atoms.positions.mean(axis=0)
        self.results["energy"] = 0.5 * 2.0 * float((d**2).sum())
        self.results["forces"] = -2.0 * d
        CALLS[tag] += 1


COUNTING = ReferenceMethod("counting", "test calculator", CountingCalculator)


@pytest.fixture(autouse=True)
def _reset_counting():
    CALLS.clear()
    PLAN.update(kill_after=None, fail_tags=set())
    with openmp_threads(1):  # reference calculations in the tests themselves: one thread is fastest
        yield


# --------------------------------------------------------------------------------------------
# real reference methods


def test_gfn2_round_trip_and_finite_difference(tmp_path):
    mols = rattled_molecules(3)
    out = tmp_path / "labelled.extxyz"
    report = label_structures(mols, "gfn2-xtb", out)
    assert report.complete and report.n_labelled == 3 and not report.failures
    assert not partial_path(out).exists() and not failures_path(out).exists()
    back = read(out, ":")
    assert len(back) == 3
    for mol, frame in zip(mols, back):
        assert frame.info["label_method"] == "gfn2-xtb" and frame.info["tag"] == mol.info["tag"]
        np.testing.assert_allclose(frame.positions, mol.positions, atol=1e-8)
        ref = mol.copy()
        ref.calc = tblite.TBLite(method="GFN2-xTB", verbosity=0)
        assert frame.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(frame.get_forces(), ref.get_forces(), atol=1e-6)
    # forces are minus the gradient of the energy (central differences, h = 1e-3 Å)
    ethanol = rattled_molecules(4)[3]
    labelled = read(label_structures([ethanol], "gfn2-xtb", tmp_path / "e.extxyz").output)
    calc = tblite.TBLite(method="GFN2-xTB", verbosity=0, accuracy=0.01)
    h, fd = 1e-3, np.zeros((len(ethanol), 3))
    for i in range(len(ethanol)):
        for c in range(3):
            e = []
            for sign in (1, -1):
                a = ethanol.copy()
                a.positions[i, c] += sign * h
                a.calc = calc
                e.append(a.get_potential_energy())
            fd[i, c] = -(e[0] - e[1]) / (2 * h)
    np.testing.assert_allclose(labelled.get_forces(), fd, atol=1e-3)


def test_emt_copper_cell_energy_forces_stress(tmp_path):
    from ase.calculators.emt import EMT

    cu = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    cu.rattle(0.05, seed=3)
    out = tmp_path / "cu.extxyz.gz"
    label_structures([cu], "emt", out)
    frame = read(out)
    res = frame.calc.results
    assert {"energy", "forces", "stress"} <= set(res)
    assert res["forces"].shape == (32, 3) and res["stress"].shape == (6,)
    ref = cu.copy()
    ref.calc = EMT(asap_cutoff=True)
    assert res["energy"] == pytest.approx(ref.get_potential_energy(), abs=1e-8)
    np.testing.assert_allclose(res["forces"], ref.get_forces(), atol=1e-7)
    np.testing.assert_allclose(res["stress"], ref.get_stress(), atol=1e-8)
    # stress_xx = (1/V) dE/dε_xx: strain the cell and atoms by ±h along x
    h, e = 1e-5, []
    for sign in (1, -1):
        a = cu.copy()
        a.set_cell(cu.cell.array @ np.diag([1 + sign * h, 1, 1]), scale_atoms=True)
        a.calc = EMT(asap_cutoff=True)
        e.append(a.get_potential_energy())
    assert res["stress"][0] == pytest.approx((e[0] - e[1]) / (2 * h) / cu.get_volume(), abs=1e-5)
    assert np.abs(res["stress"][0]) > 1e-4  # a real, non-zero stress was checked


def test_dft_pbe_forces_match_energy_gradient(tmp_path):
    pytest.importorskip("pyscf")
    h2o = molecule("H2O")
    h2o.positions[1] += [0.0, 0.05, 0.02]
    out = tmp_path / "dft.extxyz"
    label_structures([h2o], "dft-pbe", out, options={"basis": "sto-3g"})
    frame = read(out)
    assert frame.info["label_method"] == "dft-pbe"
    method = get_method("dft-pbe", {"basis": "sto-3g"})
    h, e = 1e-3, []
    for sign in (1, -1):
        a = h2o.copy()
        a.positions[1, 1] += sign * h
        a.calc = method.make_calculator()
        e.append(a.get_potential_energy())
    assert frame.get_forces()[1, 1] == pytest.approx(-(e[0] - e[1]) / (2 * h), abs=2e-3)


def test_worker_processes_give_the_same_labels(tmp_path):
    mols = rattled_molecules(6)
    one = label_structures(mols, "gfn2-xtb", tmp_path / "one.extxyz", workers=1)
    two = label_structures(mols, "gfn2-xtb", tmp_path / "two.extxyz", workers=2)
    assert one.n_labelled == two.n_labelled == 6
    for a, b in zip(read(one.output, ":"), read(two.output, ":")):
        assert a.info["tag"] == b.info["tag"]
        assert a.get_potential_energy() == b.get_potential_energy()
        np.testing.assert_array_equal(a.get_forces(), b.get_forces())


# --------------------------------------------------------------------------------------------
# resumability


def test_resume_after_kill_loses_nothing_and_repeats_nothing(tmp_path):
    mols = rattled_molecules(10)
    out = tmp_path / "out.extxyz"
    PLAN["kill_after"] = 4
    with pytest.raises(KeyboardInterrupt):
        label_structures(mols, COUNTING, out)
    assert not out.exists()
    assert len(PartialFrames(partial_path(out)).load()) == 4 and sum(CALLS.values()) == 4
    PLAN["kill_after"] = None
    progressed = []
    report = label_structures(mols, COUNTING, out, progress=progressed.append)
    assert report.complete and report.n_resumed == 4 and report.n_new == 6
    assert sum(progressed) == 10 and progressed[0] == 4
    assert CALLS == Counter(range(10))  # each structure calculated exactly once over both runs
    assert not partial_path(out).exists()
    back = read(out, ":")
    assert [a.info["tag"] for a in back] == list(range(10))  # input order
    for mol, frame in zip(mols, back):
        d = mol.positions - mol.positions.mean(axis=0)
        np.testing.assert_allclose(frame.get_forces(), -2.0 * d, atol=1e-7)


def test_limit_then_resume_and_truncated_partial(tmp_path):
    mols = rattled_molecules(8)
    out = tmp_path / "out.extxyz"
    first = label_structures(mols, COUNTING, out, limit=5)
    assert not first.complete and not out.exists() and first.n_labelled == 5
    # a run killed while writing leaves half a frame at the end: it is cut off and done again
    with open(partial_path(out), "a") as fh:
        fh.write("7\nProperties=species:S:1:pos:R:3 label_position=6\nH 0.0 0.0")
    notes = []
    second = label_structures(mols, COUNTING, out, log=notes.append)
    assert second.complete and second.n_resumed == 5 and second.n_new == 3
    assert any("incomplete last frame" in n for n in notes)
    assert CALLS == Counter(range(8))
    assert [a.info["tag"] for a in read(out, ":")] == list(range(8))


def test_resume_with_changed_input_or_method_is_refused(tmp_path):
    mols = rattled_molecules(4)
    out = tmp_path / "out.extxyz"
    label_structures(mols, COUNTING, out, limit=2)
    changed = [m.copy() for m in mols]
    changed[1].positions += 0.1
    with pytest.raises(InputError, match="does not match structure 1"):
        label_structures(changed, COUNTING, out)
    with pytest.raises(InputError, match="labelled with 'counting'"):
        label_structures(mols, "emt", out)


# --------------------------------------------------------------------------------------------
# failures


def test_failed_frame_is_reported_skipped_and_recorded(tmp_path):
    mols = rattled_molecules(6)
    records = [Record(a, "input.xyz", k) for k, a in enumerate(mols)]
    out = tmp_path / "out.extxyz"
    PLAN["fail_tags"] = {2, 4}
    seen = []
    report = label_structures(records, COUNTING, out, on_failure=seen.append)
    assert [f.index for f in seen] == [2, 4] and all("did not converge" in f.error for f in seen)
    assert report.complete and report.n_labelled == 4 and report.failures_log == failures_path(out)
    assert [a.info["tag"] for a in read(out, ":")] == [0, 1, 3, 5]
    logged = [json.loads(line) for line in failures_path(out).read_text().splitlines()]
    assert [(r["source"], r["index"], r["method"]) for r in logged] == [("input.xyz", 2, "counting"), ("input.xyz", 4, "counting")]
    assert seen[0].where == "input.xyz structure 2"
    # a later clean run removes the stale failure log
    PLAN["fail_tags"] = set()
    label_structures(records, COUNTING, out)
    assert not failures_path(out).exists() and len(read(out, ":")) == 6


def test_all_frames_failing_is_an_error(tmp_path):
    PLAN["fail_tags"] = {0, 1}
    with pytest.raises(LabellingError, match="no structure could be labelled"):
        label_structures(rattled_molecules(2), COUNTING, tmp_path / "o.extxyz")
    assert failures_path(tmp_path / "o.extxyz").exists() and not (tmp_path / "o.extxyz").exists()


def test_scf_failure_from_tblite_is_recorded(tmp_path):
    out = tmp_path / "o.extxyz"
    seen = []
    with pytest.raises(LabellingError):  # one SCF iteration converges nothing
        label_structures(rattled_molecules(3), "gfn2-xtb", out, options={"max_iterations": 1}, on_failure=seen.append)
    assert [f.index for f in seen] == [0, 1, 2] and all("CalculationFailed" in f.error for f in seen)
    logged = [json.loads(line) for line in failures_path(out).read_text().splitlines()]
    assert [r["index"] for r in logged] == [0, 1, 2] and all(r["error"] == f.error for r, f in zip(logged, seen))


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_methods_and_inputs_give_clear_errors(tmp_path):
    with pytest.raises(InputError, match="unknown reference method 'b3lyp'.*gfn2-xtb"):
        get_method("b3lyp")
    with pytest.raises(InputError, match="module ase.calculators.emt has no attribute Nope"):
        get_method("ase:ase.calculators.emt.Nope")
    with pytest.raises(InputError, match="ase:MODULE:CLASS"):
        get_method("ase:EMT")
    assert get_method("ase:ase.calculators.emt:EMT").make_calculator().__class__.__name__ == "EMT"
    si = bulk("Si", "diamond", a=5.43)
    with pytest.raises(InputError, match="<input> structure 0: element.*Si.*not supported by method emt"):
        label_structures([si], "emt", tmp_path / "o.extxyz")
    with pytest.raises(InputError, match="handles molecules only"):
        label_structures([bulk("Cu")], "dft-pbe", tmp_path / "o.extxyz")
    broken = molecule("H2O")
    broken.positions[1] = broken.positions[0]
    with pytest.raises(InputError, match="structure 0: atoms 0 and 1 overlap"):
        label_structures([broken], "gfn2-xtb", tmp_path / "o.extxyz")
    with pytest.raises(InputError, match="unknown option.*no_such_option.*known: asap_cutoff"):
        label_structures([bulk("Cu")], "emt", tmp_path / "o.extxyz", options={"no_such_option": 1})
    with pytest.raises(InputError, match="unknown option.*acuracy"):
        get_method("gfn2-xtb", {"acuracy": 0.1}).make_calculator()


def test_compressed_output_is_reproducible(tmp_path):
    frames = rattled_molecules(3)
    a, b = write_structures(tmp_path / "a.extxyz.gz", frames), write_structures(tmp_path / "b.extxyz.gz", frames)
    assert a.read_bytes() == b.read_bytes()
    assert gzip.open(a, "rt").readline().strip() == str(len(frames[0]))
    assert len(read(a, ":")) == 3


# --------------------------------------------------------------------------------------------
# sampling


def test_sample_gfn2_frames_are_labelled_and_reproducible(tmp_path):
    start = molecule("CH3CH2OH")
    settings = SampleSettings((300.0, 900.0), steps=40, interval=10, burn_in=10, seed=7)
    r1 = sample_structures([start], "gfn2-xtb", tmp_path / "a.extxyz", settings)
    r2 = sample_structures([start], "gfn2-xtb", tmp_path / "b.extxyz", settings)
    assert r1.n_frames == 8 and r1.n_trajectories == 2 and r1.md_steps == 2 * 50
    a, b = read(r1.output, ":"), read(r2.output, ":")
    assert [f.info["temperature"] for f in a] == [300.0] * 4 + [900.0] * 4
    assert [f.info["md_step"] for f in a[:4]] == [20, 30, 40, 50]
    assert all(f.info["source"] == "<input>:0" and f.info["label_method"] == "gfn2-xtb" for f in a)
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa.positions, fb.positions)
    assert not np.allclose(a[0].positions, start.positions, atol=1e-3)  # the atoms did move
    # each frame's labels are the reference at that frame's positions (the MD's SCF starts from the previous
    # step's wavefunction, a fresh one from scratch: they agree to the SCF tolerance, ~1e-4 eV/Å)
    for frame in (a[0], a[-1]):
        ref = frame.copy()
        ref.calc = tblite.TBLite(method="GFN2-xTB", verbosity=0)
        assert frame.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-5)
        np.testing.assert_allclose(frame.get_forces(), ref.get_forces(), atol=1e-3)


def test_sample_resume_after_kill_gives_the_same_frames(tmp_path):
    mols = [molecule("CH4"), molecule("H2O")]
    settings = SampleSettings((300.0, 600.0), steps=30, interval=10, burn_in=5, seed=1)
    reference = read(sample_structures(mols, COUNTING, tmp_path / "ref.extxyz", settings).output, ":")
    assert sum(CALLS.values()) == 4 * 36  # 35 MD steps and the initial forces per trajectory
    CALLS.clear()
    out = tmp_path / "out.extxyz"
    PLAN["kill_after"] = 100  # in the third of four trajectories, after two of its frames
    with pytest.raises(KeyboardInterrupt):
        sample_structures(mols, COUNTING, out, settings)
    assert len(PartialFrames(partial_path(out)).load()) == 8
    PLAN["kill_after"] = None
    notes = []
    report = sample_structures(mols, COUNTING, out, settings, log=notes.append)
    assert report.n_resumed == 2 and any("dropped" in n for n in notes)
    resumed = read(out, ":")
    assert len(resumed) == len(reference) == 12
    for x, y in zip(resumed, reference):
        assert (x.info["md_trajectory"], x.info["md_frame"]) == (y.info["md_trajectory"], y.info["md_frame"])
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.get_forces(), y.get_forces())


def test_sample_failure_keeps_earlier_frames_and_records(tmp_path):
    a = molecule("CH4")
    a.info["tag"] = 3
    b = molecule("H2O")
    b.info["tag"] = 4
    PLAN["fail_tags"] = {4}
    settings = SampleSettings((300.0,), steps=20, interval=10)
    report = sample_structures([Record(a, "in.xyz", 0), Record(b, "in.xyz", 1)], COUNTING, tmp_path / "s.extxyz", settings)
    assert report.n_frames == 2 and len(report.failures) == 1
    assert report.failures[0].where == "in.xyz structure 1 at 300 K, step 0"
    assert failures_path(tmp_path / "s.extxyz").exists()


def test_sample_settings_are_checked():
    with pytest.raises(InputError, match="--steps"):
        SampleSettings((300.0,), steps=5, interval=10).check()
    with pytest.raises(InputError, match="positive"):
        SampleSettings((-3.0,), steps=10, interval=10).check()


# --------------------------------------------------------------------------------------------
# command line


def test_cli_label_and_sample(tmp_path):
    inp = tmp_path / "in.xyz"
    write(inp, rattled_molecules(3))
    runner = CliRunner()
    res = runner.invoke(app, ["label", str(inp), "-o", str(tmp_path / "l.extxyz"), "--method", "gfn2-xtb", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "labelled 3 of 3 structures" in res.output
    frames = read(tmp_path / "l.extxyz", ":")
    assert len(frames) == 3 and all(f.calc is not None and "energy" in f.calc.results for f in frames)

    res = runner.invoke(app, ["sample", str(inp) + "@0", "-o", str(tmp_path / "s.extxyz")])
    assert res.exit_code == 1 and "file not found" in res.output
    single = tmp_path / "one.xyz"
    write(single, molecule("CH3OH"))
    res = runner.invoke(app, ["sample", str(single), "-o", str(tmp_path / "s.extxyz.gz"), "--method", "gfn2-xtb",
                              "--temperature", "300", "--temperature", "600", "--steps", "20", "--interval", "10",
                              "--timestep", "0.5", "--seed", "3", "--workers", "1"])
    assert res.exit_code == 0, res.output
    frames = read(tmp_path / "s.extxyz.gz", ":")
    assert [f.info["temperature"] for f in frames] == [300.0, 300.0, 600.0, 600.0]
    assert all(f.info["source"] == f"{single}:0" and f.get_forces().shape == (6, 3) for f in frames)


def test_cli_errors(tmp_path):
    runner = CliRunner()
    inp = tmp_path / "in.xyz"
    write(inp, molecule("H2O"))
    res = runner.invoke(app, ["label", str(inp), "-o", str(tmp_path / "o.extxyz"), "--method", "nope"])
    assert res.exit_code == 1 and "unknown reference method 'nope'" in res.output
    bad = tmp_path / "bad.xyz"
    bad.write_text("this is not\na structure file\n")
    res = runner.invoke(app, ["label", str(bad), "-o", str(tmp_path / "o.extxyz")])
    assert res.exit_code == 1 and "bad.xyz: cannot read structures" in res.output
    res = runner.invoke(app, ["label", str(inp), "-o", str(tmp_path / "o.extxyz"), "--option", "oops"])
    assert res.exit_code == 1 and "KEY=VALUE" in res.output
    res = runner.invoke(app, ["label", str(inp), "-o", str(tmp_path / "o.extxyz"), "--option", "max_iterations=1",
                              "--workers", "1", "--strict"])
    assert res.exit_code == 1 and "no structure could be labelled" in res.output


def test_gfn1_periodic_cell_has_stress_consistent_with_energy(tmp_path):
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    si.rattle(0.03, seed=0)
    frame = read(label_structures([si], "gfn1-xtb", tmp_path / "si.extxyz").output)
    res = frame.calc.results
    assert res["forces"].shape == (8, 3) and res["stress"].shape == (6,)
    h, e = 1e-4, []
    for sign in (1, -1):
        a = si.copy()
        a.set_cell(si.cell.array @ np.diag([1 + sign * h, 1, 1]), scale_atoms=True)
        a.calc = get_method("gfn1-xtb", {"accuracy": 0.01}).make_calculator()
        e.append(a.get_potential_energy())
    assert res["stress"][0] == pytest.approx((e[0] - e[1]) / (2 * h) / si.get_volume(), abs=2e-4)
