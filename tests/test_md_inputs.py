"""`atomuq md` refuses bad input before any work: one line naming file and structure, no traceback, and
nothing left behind, so the rerun with good input needs no --resume."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.io import write
from typer.testing import CliRunner

from atomuq.cli.main import app
from atomuq.workflows.md.monitors import parse_monitor

runner = CliRunner()


def water() -> Atoms:
    return molecule("H2O")


def bad_structures() -> dict[str, tuple[Atoms, str]]:
    overlap = molecule("CH3CH2OH")
    overlap.positions[3] = overlap.positions[0] + [0.017, 0.0, 0.0]
    nan = water()
    nan.positions[1, 2] = np.nan
    bromine = molecule("CH3Cl")
    bromine.symbols[bromine.symbols == "Cl"] = "Br"
    gold = Atoms("Au2", positions=[[0, 0, 0], [2.5, 0, 0]])  # no bundled model knows Au
    no_cell = water()
    no_cell.pbc = True
    return {
        "overlap": (overlap, "overlap (0.017 Å apart"),
        "nan": (nan, "NaN or infinite"),
        "bromine": (bromine, "element(s) Br not supported by any bundled model"),
        "gold": (gold, "element(s) Au not supported by any bundled model"),
        "no_cell": (no_cell, "periodic along abc but the cell vector is zero"),
    }


def md(start, out, *extra: str):
    return runner.invoke(app, ["md", str(start), "-o", str(out), "--steps", "4", "--temperature", "300", *extra])


def assert_one_line_error(res, *needles: str) -> None:
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), res.exception  # a clean exit, not an unhandled exception
    lines = [line for line in res.output.splitlines() if line.strip() and not line.startswith("note: --model not given")]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    text = " ".join(res.output.split())  # the console may wrap a long line
    for needle in needles:
        assert needle in text, res.output


def leftovers(folder, keep=()) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.mark.parametrize("case", list(bad_structures()))
def test_a_bad_starting_structure_is_refused_naming_file_and_structure_and_leaves_nothing(tmp_path, case):
    atoms, message = bad_structures()[case]
    start = tmp_path / "start.extxyz"
    write(start, [water(), atoms])  # the bad structure is the second one
    out = tmp_path / "run.extxyz"
    res = md(start, out, "--index", "1")
    assert_one_line_error(res, f"{start} structure 1", message)
    assert leftovers(tmp_path) == ["start.extxyz"]
    res = md(start, out, "--index", "0")  # the good structure: no --resume needed
    assert res.exit_code == 0, res.output
    assert "completed: step 4" in res.output


def test_an_unknown_monitor_key_is_refused_before_running_listing_the_keys(tmp_path):
    start = tmp_path / "w.extxyz"
    write(start, water())
    out = tmp_path / "run.extxyz"
    res = md(start, out, "--monitor", "key:nosuch,every=2")
    assert_one_line_error(res, "--monitor key:nosuch", "no result 'nosuch'", "force_delta", "confidence_error")
    assert leftovers(tmp_path) == ["w.extxyz"]
    assert md(start, out, "--monitor", "key:confidence_error,every=2").exit_code == 0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--timestep", "0"], "--timestep must be a positive number of fs, got 0.0"),
        (["--timestep", "-0.5"], "--timestep must be a positive number of fs"),
        (["--steps", "-3"], "--steps must be an integer >= 0"),
        (["--temperature", "-10"], "--temperature must be a number of K >= 0"),
        (["--ensemble", "npt"], "--ensemble must be one of nve, nvt, langevin"),
        (["--forces", "magic"], "--forces must be one of direct, conservative, mts"),
        (["--tdamp", "0"], "--tdamp must be a positive number of fs"),
        (["--friction", "-1"], "--friction must be a positive number of 1/fs"),
        (["--fallback", "direct"], "--fallback must be one of conservative, mts"),
        (["--monitor", "log", "--monitor", "temperature"], "--monitor log stands alone"),
        (["--monitor", "temperature,max=3,floor=1"], "floor and cap apply to relative limits"),
        (["--index", "-3"], "out of range"),
    ],
)
def test_bad_settings_are_refused_naming_the_flag(tmp_path, extra, message):
    start = tmp_path / "w.extxyz"
    write(start, water())
    res = md(start, tmp_path / "run.extxyz", *extra)
    assert_one_line_error(res, message)
    assert leftovers(tmp_path) == ["w.extxyz"]


def test_bad_output_paths_are_refused_before_any_work(tmp_path):
    start = tmp_path / "w.extxyz"
    write(start, water())
    folder = tmp_path / "adir"
    folder.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line_error(md(start, folder), "--output", "is a directory")
    assert_one_line_error(md(start, afile / "run.extxyz"), "--output", "is a file, not a folder")
    assert_one_line_error(md(start, "/proc/atomuq-nowhere/run.extxyz"), "--output", "cannot write")
    assert_one_line_error(md(start, tmp_path / "run.pdb"), "run.pdb", "extended XYZ (.extxyz, .xyz) or ASE trajectories (.traj)")
    assert_one_line_error(md(start, tmp_path / "run.extxyz.gz"), "compressed files cannot be appended")
    (tmp_path / "run.extxyz.log").mkdir()  # a companion file that cannot be written
    assert_one_line_error(md(start, tmp_path / "run.extxyz"), "--output", "run.extxyz.log", "is a directory")
    assert leftovers(tmp_path) == ["adir", "afile", "run.extxyz.log", "w.extxyz"]


def test_unreadable_inputs_give_one_line(tmp_path):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    binary = tmp_path / "blob.extxyz"
    binary.write_bytes(bytes(range(256)) * 4)
    folder = tmp_path / "folder.extxyz"
    folder.mkdir()
    for path in (empty, binary, folder, tmp_path / "missing.extxyz"):
        res = md(path, tmp_path / "run.extxyz")
        assert_one_line_error(res, str(path))
    assert not (tmp_path / "run.extxyz").exists()


def test_messages_keep_square_brackets_of_file_names(tmp_path):
    start = tmp_path / "frames[run1].extxyz"
    bad = water()
    bad.positions[0] = np.nan
    write(start, bad)
    assert_one_line_error(md(start, tmp_path / "o.extxyz"), "frames[run1].extxyz structure 0")


def test_the_library_names_settings_fields_and_refuses_before_writing(tmp_path):
    from atomuq.models.registry import resolve_model
    from atomuq.workflows.md.run import MDRun, MDSettings, SettingError

    model = resolve_model(None)
    with pytest.raises(SettingError, match="^timestep_fs must be a positive"):
        MDRun(water(), model, MDSettings(timestep_fs=0.0, temperature_K=300), tmp_path / "a.extxyz")
    with pytest.raises(SettingError, match="trajectory .*is a directory"):
        MDRun(water(), model, MDSettings(temperature_K=300), tmp_path)
    with pytest.raises(SettingError, match="has no momenta: give temperature_K K"):
        MDRun(water(), model, MDSettings(), tmp_path / "a.extxyz")
    run = MDRun(water(), model, MDSettings(steps=2, temperature_K=300), tmp_path / "b.extxyz", [parse_monitor("key:nosuch")])
    with pytest.raises(SettingError, match="monitors key:nosuch"):
        run.run()
    assert leftovers(tmp_path) == []
