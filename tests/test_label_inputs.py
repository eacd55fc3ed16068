"""`atomuq label` and `atomuq sample` refuse bad inputs and outputs before any work, escape user text, stop on Ctrl-C.

Runs in-process through the CLI entry point with EMT (no optional package needed): each refusal is one
line naming the file and structure, exit 1, no traceback, and nothing left behind that blocks the rerun.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read, write
from typer.testing import CliRunner

import atomuq.workflows.label as label_module
import atomuq.workflows.sample as sample_module
import atomuq.workflows.sample_trajectory as trajectory_module
from atomuq.cli.main import app
from atomuq.core.errors import InputError
from atomuq.reference import INSTALL_HINT, ReferenceMethod, available_methods, get_method
from atomuq.reference import registry
from atomuq.reference.ase_calculator import split_class_spec
from atomuq.reference.files import PartialFrames, failures_path, partial_path
from atomuq.workflows.label import label_structures

runner = CliRunner()
SAMPLE_ARGS = ["--steps", "4", "--interval", "2", "--workers", "1", "--temperature", "300"]


def copper(n: int = 3, seed: int = 0, repeat: int = 2) -> list[Atoms]:
    """n rattled copper cells of 4 repeat³ atoms."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((repeat, repeat, repeat))
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        out.append(a)
    return out


def run(*args: str):
    """Invoke atomuq in this process; the result with exit_code and output (stdout and stderr)."""
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(res, *needles: str) -> None:
    """Exit 1, one error line holding every needle, no traceback."""
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    for needle in needles:
        assert needle in errors[0], res.output
    assert "Traceback" not in res.output


def bad_structures(tmp_path) -> dict[str, tuple]:
    """name -> (input file, expected text in the error) for each kind of unusable input."""
    cases = {}
    good = copper(2)

    overlap = [a.copy() for a in good]
    overlap[1].positions[5] = overlap[1].positions[4] + [0.01, 0.0, 0.0]
    cases["overlap"] = (overlap, "structure 1: atoms 4 and 5 overlap")
    nan = [a.copy() for a in good]
    nan[0].positions[2, 1] = np.nan
    cases["nan"] = (nan, "structure 0: positions of atoms [2] are NaN")
    nocell = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]], pbc=True)
    cases["no cell"] = ([good[0], nocell], "structure 1: periodic along abc but the cell vector is zero")
    silicon = bulk("Si", "diamond", a=5.43)
    cases["element"] = ([good[0], silicon], "structure 1: element(s) Si not supported by method emt")
    out = {}
    for name, (frames, text) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.extxyz"
        write(path, frames)
        out[name] = (path, text)
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    out["empty"] = (empty, "empty.extxyz: cannot read structures")  # ASE: "Empty file"
    binary = tmp_path / "binary.extxyz"
    binary.write_bytes(bytes(range(256)) * 4)
    out["binary"] = (binary, "binary.extxyz: cannot read structures")
    return out


@pytest.mark.parametrize("command", ["label", "sample"])
def test_bad_inputs_are_refused_before_any_work(tmp_path, command):
    extra = SAMPLE_ARGS if command == "sample" else []
    for name, (path, text) in bad_structures(tmp_path).items():
        out = tmp_path / f"out_{command}.extxyz"
        res = run(command, path, "-o", out, "--method", "emt", *extra)
        assert_refused(res, text)
        assert not out.exists() and not partial_path(out).exists() and not failures_path(out).exists(), name


@pytest.mark.parametrize("command", ["label", "sample"])
def test_bad_outputs_are_refused_before_any_work(tmp_path, command, monkeypatch):
    extra = SAMPLE_ARGS if command == "sample" else []
    inp = tmp_path / "in.extxyz"
    write(inp, copper(2))
    calls = []
    monkeypatch.setattr(label_module, "check_structure", lambda *a, **k: calls.append(a))  # reading is not reached
    monkeypatch.setattr(sample_module, "check_run", lambda *a, **k: calls.append(a))
    folder = tmp_path / "results"
    folder.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    cases = {
        folder: "is a directory",
        afile / "out.extxyz": "is a file, not a folder",
        "/proc/atomuq-nowhere/out.extxyz": "cannot write in /proc",
    }
    for output, text in cases.items():
        res = run(command, inp, "-o", output, "--method", "emt", *extra)
        assert_refused(res, f"--output {output}", text)
    assert calls == []  # refused before the structures were even checked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "in.extxyz", "results"]
    assert list(folder.iterdir()) == []
    # the same refusal from the library, before any structure is looked at
    with pytest.raises(InputError, match="is a directory"):
        label_structures(copper(1), "emt", folder)


def test_a_partial_file_that_is_a_folder_is_refused(tmp_path):
    inp, out = tmp_path / "in.extxyz", tmp_path / "out.extxyz"
    write(inp, copper(1))
    partial_path(out).mkdir()
    assert_refused(run("label", inp, "-o", out, "--method", "emt"), "out.extxyz.partial", "is a directory")


def test_brackets_in_file_names_survive_every_message(tmp_path, monkeypatch):
    inp, out = tmp_path / "frames[run1].extxyz", tmp_path / "out[a].extxyz"
    frames = copper(3)
    frames[1].positions[1] = frames[1].positions[0]
    write(inp, frames)
    res = run("label", inp, "-o", out, "--method", "emt", "--workers", "1")
    assert_refused(res, "frames[run1].extxyz structure 1: atoms 0 and 1 overlap")
    write(inp, copper(3))
    real, calls = label_module.label_one, []

    def third_fails(method, atoms):
        calls.append(1)
        return (None, "CalculationFailed: [scf] no", 0.0) if len(calls) == 3 else real(method, atoms)

    monkeypatch.setattr(label_module, "label_one", third_fails)
    res = run("label", inp, "-o", out, "--method", "emt", "--workers", "1")
    text = res.output.replace("\n", "")
    assert res.exit_code == 0, res.output
    assert f"failed: {inp} structure 2: CalculationFailed: [scf] no (skipped, recorded)" in text
    assert f"1 structure(s) failed and are not in the output; see {failures_path(out)}" in text
    assert f"wrote {out}" in text
    res = run("label", inp, "-o", out, "--method", "emt", "--workers", "1")  # a second run replaces, and says so
    assert res.exit_code == 0 and f"{out} exists and will be replaced" in res.output.replace("\n", "")


def test_missing_package_prints_the_install_hint_with_its_brackets(tmp_path, monkeypatch):
    def no_tblite(**options):
        raise ImportError("No module named 'tblite'")

    monkeypatch.setitem(registry.METHODS, "gfn2-xtb", ReferenceMethod("gfn2-xtb", "test", no_tblite, package="tblite"))
    inp = tmp_path / "in.extxyz"
    write(inp, bulk("Cu", cubic=True))
    out = tmp_path / "out.extxyz"
    res = run("label", inp, "-o", out, "--method", "gfn2-xtb")
    assert_refused(res, "cannot import tblite", f"install it with {INSTALL_HINT}")
    assert "pip install 'atomuq[label]'" in res.output
    assert not partial_path(out).exists()


def test_ase_calculator_spec_matches_model_syntax_and_the_dotted_form_still_works(tmp_path):
    assert split_class_spec("ase:ase.calculators.emt:EMT") == ("ase.calculators.emt", "EMT", False)
    assert split_class_spec("ase:ase.calculators.emt.EMT") == ("ase.calculators.emt", "EMT", True)
    assert "ase:MODULE:CLASS" in available_methods()
    for bad in ("ase:EMT", "ase:", "ase::EMT", "ase:ase.calculators.emt:"):
        with pytest.raises(InputError, match="write ase:MODULE:CLASS"):
            get_method(bad)
    with pytest.raises(InputError, match="module ase.calculators.emt has no attribute Nope"):
        get_method("ase:ase.calculators.emt:Nope")
    notes = []
    old = get_method("ase:ase.calculators.emt.EMT", log=notes.append)
    new = get_method("ase:ase.calculators.emt:EMT", log=notes.append)
    assert old.name == new.name == "ase:ase.calculators.emt:EMT" and old.is_named("ase:ase.calculators.emt.EMT")
    assert len(notes) == 1 and "deprecated" in notes[0] and "ase:ase.calculators.emt:EMT" in notes[0]

    cells = copper(2)
    inp = tmp_path / "in.extxyz"
    write(inp, cells)
    res = run("label", inp, "-o", tmp_path / "new.extxyz", "--method", "ase:ase.calculators.emt:EMT", "--workers", "1")
    assert res.exit_code == 0 and "note:" not in res.output, res.output
    res = run("label", inp, "-o", tmp_path / "old.extxyz", "--method", "ase:ase.calculators.emt.EMT", "--workers", "1")
    assert res.exit_code == 0 and "the dotted form is deprecated" in res.output, res.output
    a, b = read(tmp_path / "new.extxyz", ":"), read(tmp_path / "old.extxyz", ":")
    for fa, fb, cell in zip(a, b, cells):
        assert fa.info["label_method"] == fb.info["label_method"] == "ase:ase.calculators.emt:EMT"
        ref = cell.copy()
        ref.calc = EMT()  # built without arguments: the plain ASE cutoff, not the asap one of --method emt
        assert fa.get_potential_energy() == fb.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-6)


def interrupt_after(n: int, real):
    """`real` wrapped to raise KeyboardInterrupt (a Ctrl-C) on its call after the first n."""
    calls = []

    def wrapped(*args):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)

    return wrapped


@pytest.mark.parametrize("command, module, name, n, kept, resumed, total", [
    ("label", label_module, "label_one", 2, 2, "2 resumed, 2 new", 4),  # 4 structures, 2 labelled
    ("sample", trajectory_module, "compute_labels", 3, 3, "(1 resumed)", 4),  # 2 trajectories of 2 frames, 3 written
])
def test_ctrl_c_exits_130_keeps_the_finished_frames_and_the_rerun_resumes(tmp_path, monkeypatch, command, module, name,
                                                                          n, kept, resumed, total):
    inp, out = tmp_path / "in.extxyz", tmp_path / "out.extxyz"
    write(inp, copper(4 if command == "label" else 2))
    args = [command, inp, "-o", out, "--method", "emt", *(SAMPLE_ARGS if command == "sample" else ["--workers", "1"])]
    real = getattr(module, name)
    monkeypatch.setattr(module, name, interrupt_after(n, real))
    res = run(*args)
    what = "structures" if command == "label" else "trajectories"
    assert res.exit_code == 130, res.output
    assert f"interrupted: finished {what} are kept in {partial_path(out)}; rerun the same command to resume" in \
        res.output.replace("\n", "")
    assert not out.exists() and len(PartialFrames(partial_path(out)).load()) == kept
    monkeypatch.setattr(module, name, real)
    res = run(*args)
    assert res.exit_code == 0 and resumed in res.output, res.output
    assert len(read(out, ":")) == total and not partial_path(out).exists()
