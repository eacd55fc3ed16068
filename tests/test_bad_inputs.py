"""Every command against the bad-input set, through the CLI entry point in-process (seconds, not minutes).

Bad inputs: overlapping atoms (0.017 Å), NaN positions, an unknown element (Br: no bundled model knows it), a periodic structure without a
cell, an empty file, a directory, a binary file; bad outputs: a folder that cannot be written, a parent that is a
file, an output that is a directory (for commands writing a folder: a folder that is a file); for md a monitor key
that does not exist. Every one must end with a non-zero exit, exactly one `error:` line naming the file (and the
structure index where there is one), no traceback, and nothing left in the output folder that blocks a rerun.
A few subprocess smoke tests run the real `atomuq` process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from ase import Atoms
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from typer.testing import CliRunner

from atomuq.cli.main import app
from atomuq.models.checkpoint import weights_fingerprint
from atomuq.models.registry import DEFAULT_MODEL, resolve_model
from atomuq.uq.ltau.estimator import fit_estimator
from atomuq.uq.ltau.index import build_index
from atomuq.workflows.ltau import compute_descriptors

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# ------------------------------------------------------------------------------------------ the inputs


def water(seed: int = 0, shift: float = 0.0) -> Atoms:
    """A labelled water molecule (random reference forces, eV/Å), slightly rattled."""
    atoms = molecule("H2O")
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(scale=0.02, size=atoms.positions.shape) + shift
    atoms.calc = SinglePointCalculator(atoms, energy=-14.0 + 0.01 * seed, forces=rng.normal(scale=0.3, size=(3, 3)))
    return atoms


def labelled(atoms: Atoms, seed: int = 7) -> Atoms:
    atoms.calc = SinglePointCalculator(atoms, energy=-10.0, forces=np.random.default_rng(seed).normal(scale=0.3, size=(len(atoms), 3)))
    return atoms


def bad_structure(case: str) -> Atoms:
    """The broken structure of a structure-level case."""
    atoms = molecule("H2O")
    if case == "overlap":
        atoms.positions[2] = atoms.positions[0] + [0.017, 0.0, 0.0]
    elif case == "nan":
        atoms.positions[1, 0] = np.nan
    elif case == "unknown_element":
        atoms = molecule("HCl")
        atoms.symbols[atoms.symbols == "Cl"] = "Br"
    elif case == "no_cell":
        atoms.pbc = True
    return labelled(atoms)


#: structure-level cases: (fragment the message must contain) -- the structure is the file's second, index 1
STRUCTURE_CASES = {"overlap": "overlap", "nan": "NaN", "unknown_element": "Br", "no_cell": "cell"}
FILE_CASES = ("empty_file", "directory", "binary_file")
OUTPUT_CASES = ("output_unwritable", "output_parent_is_file", "output_is_directory")
CASES = (*STRUCTURE_CASES, *FILE_CASES, *OUTPUT_CASES)


def write_input(case: str, folder: Path) -> Path:
    """The input file (or directory) of an input case, in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if case in STRUCTURE_CASES:
        path = folder / f"{case}.extxyz"
        write(path, [water(0), bad_structure(case)], format="extxyz")
    elif case == "empty_file":
        path = folder / "empty.extxyz"
        path.write_bytes(b"")
    elif case == "directory":
        path = folder / "structures.extxyz"
        path.mkdir()
    elif case == "binary_file":
        path = folder / "binary.extxyz"
        path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 777, dtype=np.uint8)))
    else:
        raise ValueError(case)
    return path


# ------------------------------------------------------------------------------------------ shared fixtures


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Good inputs every command can use: labelled water (4 structures), an LTAU estimator of the bundled model,
    a short md trajectory, tiny train and improve configs."""
    folder = tmp_path_factory.mktemp("shared")
    good = folder / "good.extxyz"
    write(good, [water(k) for k in range(4)], format="extxyz")
    model = resolve_model(DEFAULT_MODEL)
    structures = read(good, ":")
    descriptors = compute_descriptors(model, structures)
    numbers = np.concatenate([a.numbers for a in structures])
    errors = np.random.default_rng(0).lognormal(-2.0, 0.5, (6, len(numbers)))
    estimator = fit_estimator([errors], numbers, np.ones(len(numbers)), build_index(descriptors, "flat"),
                              metadata={"model": DEFAULT_MODEL, "model_name": DEFAULT_MODEL, "force_kind": "direct",
                                        "model_fingerprint": weights_fingerprint(model)})
    estimator_path = estimator.save(folder / "estimator.npz")
    return {"folder": folder, "good": good, "estimator": estimator_path}


@pytest.fixture(scope="module")
def trajectory(shared):
    """A few frames written by `atomuq md` (the good input of drift)."""
    out = shared["folder"] / "md" / "run.extxyz"
    result = runner.invoke(app, ["md", str(shared["good"]), "-o", str(out), "--steps", "4", "--traj-every", "1",
                                 "--temperature", "300"])
    if result.exit_code != 0 or not out.is_file():
        pytest.skip(f"atomuq md gave no trajectory for drift: {result.output[-500:]}")
    return out


def improve_config(run_dir: Path, starts: Path, folder: Path) -> Path:
    """A one-generation improve config searching from `starts` (EMT labels, one fine-tuning epoch)."""
    path = folder / "improve.toml"
    path.write_text(f"""
run_dir = "{run_dir}"
model = "{DEFAULT_MODEL}"
generations = 1

[search]
starts = ["{starts}"]
n_starts = 1
batch_size = 1
steps = 1

[label]
method = "emt"

[finetune]
epochs = 1
batch_size = 2
validation_fraction = 0.5
""")
    return path


def train_config(run_dir: Path, train: Path, validation: Path, folder: Path) -> Path:
    """A one-epoch tiny training config on `train` (elements H C N O, so Br is unknown)."""
    path = folder / "train.toml"
    path.write_text(f"""
run_dir = "{run_dir}"
epochs = 1
batch_size = 2

[data]
train = ["{train}"]
validation = ["{validation}"]

[model]
elements = ["H", "C", "N", "O"]
cutoff = 4.0
num_bessel = 4
lmax = 1
latent = 8
hidden = 8
num_layers = 1
confidence_bins = 4
confidence_hidden = 8
""")
    return path


# ------------------------------------------------------------------------------------------ the commands


#: command -> (what its output is: "file" or "folder", mark or None)
COMMANDS = {
    "score": ("file", None),
    "attack": ("file", None),
    "ltau score": ("file", None),
    "bench": ("folder", None),
    "improve": ("folder", None),
    "md": ("file", None),
    "drift": ("file", None),
    "label": ("file", None),
    "sample": ("file", None),
    "train": ("folder", None),
}


def argv(command: str, inp: Path, out: Path, shared: dict, folder: Path, index: int = 0) -> list[str]:
    """The command line of `command` reading `inp` and writing `out` (configs written into folder)."""
    if command == "score":
        return ["score", str(inp), "-o", str(out)]
    if command == "attack":
        return ["attack", str(inp), "-o", str(out), "--steps", "1"]
    if command == "ltau score":
        return ["ltau", "score", str(inp), "-e", str(shared["estimator"]), "-o", str(out)]
    if command == "bench":
        return ["bench", str(inp), "-o", str(out), "--bootstrap", "10"]
    if command == "improve":
        return ["improve", str(improve_config(out, inp, folder))]
    if command == "md":
        return ["md", str(inp), "-o", str(out), "--steps", "2", "--temperature", "300", "--index", str(index)]
    if command == "drift":
        return ["drift", str(inp), "--json", str(out)]
    if command == "label":
        return ["label", str(inp), "-o", str(out), "--method", "emt", "--workers", "1"]
    if command == "sample":
        return ["sample", str(inp), "-o", str(out), "--method", "emt", "--steps", "2", "--interval", "1", "--workers", "1"]
    if command == "train":
        return ["train", str(train_config(out, inp, shared["good"], folder))]
    raise ValueError(command)


def output_flag(command: str) -> str:
    """How the output is named in messages: an option, or the config key."""
    return {"improve": "run_dir", "train": "run_dir", "drift": "--json"}.get(command, "--output")


def rows() -> list:
    """One test row per (command, case), marked when the command's fix is on another branch."""
    return [pytest.param(command, case, id=f"{command.replace(' ', '-')}-{case}", marks=[mark] if mark else [])
            for command, (_, mark) in COMMANDS.items() for case in CASES]


# ------------------------------------------------------------------------------------------ the checks


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.lstrip().lower().startswith("error")]


def assert_clean_failure(result, names: list[str], structure: bool = False) -> str:
    """Non-zero exit, no traceback, one error line naming every one of names (and 'structure 1'); that line."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    for name in names:
        assert name in lines[0], (name, lines[0])
    if structure:
        assert "structure 1" in lines[0], lines[0]
    return lines[0]


def left_behind(folder: Path) -> list[str]:
    """Everything inside folder (recursively), hidden temporary files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("command, case", rows())
def test_every_command_refuses_every_bad_input(command, case, shared, tmp_path, request):
    kind, _ = COMMANDS[command]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / ("result" if kind == "folder" else "result.extxyz" if command != "drift" else "drift.json")
    inp = shared["good"] if command not in ("drift",) else None
    if command == "drift" and case in OUTPUT_CASES:
        inp = request.getfixturevalue("trajectory")
    index = 0
    if case in STRUCTURE_CASES or case in FILE_CASES:
        inp = write_input(case, tmp_path / "in")
        index = 1
    if case == "output_unwritable":
        out = Path("/proc/atomuq-nowhere") / out.name
    elif case == "output_parent_is_file":
        (out_dir / "afile").write_text("not a folder")
        out = out_dir / "afile" / out.name
    elif case == "output_is_directory":
        if kind == "folder":  # a folder output that is a file
            out.write_text("a file, not a folder")
        else:
            out.mkdir()
    before = left_behind(out_dir)
    result = runner.invoke(app, argv(command, inp, out, shared, tmp_path, index))
    if case in OUTPUT_CASES:
        line = assert_clean_failure(result, [str(out)])
        assert output_flag(command) in line, line
    else:
        line = assert_clean_failure(result, [inp.name], structure=case in STRUCTURE_CASES and command != "drift")
        if case in STRUCTURE_CASES and command != "drift":
            assert STRUCTURE_CASES[case] in line, line
    assert left_behind(out_dir) == before, "a failed start left files behind"


def test_md_refuses_a_monitor_key_that_no_calculator_gives(shared, tmp_path):
    out = tmp_path / "out" / "run.extxyz"
    out.parent.mkdir()
    result = runner.invoke(app, ["md", str(shared["good"]), "-o", str(out), "--steps", "2", "--temperature", "300",
                                 "--monitor", "key:nosuch"])
    assert_clean_failure(result, ["nosuch"])
    assert left_behind(out.parent) == []


# ------------------------------------------------------------------------------------------ reruns and item 8


def test_a_rerun_after_a_failed_start_succeeds(shared, tmp_path):
    bad = write_input("overlap", tmp_path / "in")
    out = tmp_path / "out" / "scored.extxyz"
    assert runner.invoke(app, ["score", str(bad), "-o", str(out)]).exit_code == 1
    result = runner.invoke(app, ["score", str(shared["good"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert len(read(out, ":")) == 4
    again = runner.invoke(app, ["score", str(shared["good"]), "-o", str(out)])
    assert again.exit_code == 0 and "note:" in again.output and "will be replaced" in again.output


def test_bench_on_one_structure_is_refused_before_any_folder_is_made(shared, tmp_path):
    one = tmp_path / "one.extxyz"
    write(one, read(shared["good"], "0"), format="extxyz")
    out = tmp_path / "report"
    result = runner.invoke(app, ["bench", str(one), "-o", str(out), "--bootstrap", "10"])
    line = assert_clean_failure(result, ["one.extxyz"])
    assert "at least 3" in line
    assert not out.exists() and left_behind(tmp_path) == ["one.extxyz"]


def test_bench_report_folder_is_complete_and_replaces_an_earlier_one(shared, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "coverage.png").write_bytes(b"stale figure of an earlier calibrated run")
    (out / "notes.txt").write_text("the user's own file")
    result = runner.invoke(app, ["bench", str(shared["good"]), "-o", str(out), "--bootstrap", "10"])
    assert result.exit_code == 0, result.output
    assert "will be replaced" in result.output
    names = set(os.listdir(out))
    assert {"bench.json", "bench.md", "force_delta_vs_errors.png"} <= names
    assert "coverage.png" not in names, "a stale file of an earlier report survived"
    assert "notes.txt" in names, "a file that is not part of a report was removed"
    assert not [n for n in names if n.startswith(".")], names


@pytest.mark.parametrize("command", ["score", "bench"])
def test_a_forces_key_that_no_structure_has_names_the_key_and_the_arrays(command, shared, tmp_path):
    out = tmp_path / ("o.extxyz" if command == "score" else "report")
    result = runner.invoke(app, [command, str(shared["good"]), "-o", str(out), "--forces-key", "REF_force"])
    line = assert_clean_failure(result, ["--forces-key", "REF_force", "good.extxyz"])
    assert "forces" in line.split("present:")[1]
    assert not out.exists()
    ok = runner.invoke(app, ["score", str(shared["good"]), "-o", str(tmp_path / "k.extxyz"), "--forces-key", "forces"])
    assert ok.exit_code == 0, ok.output
    assert all("eps_nc" in a.info for a in read(tmp_path / "k.extxyz", ":"))


@pytest.mark.parametrize("args", [["score"], ["attack"], ["ltau", "score"]])
def test_top_must_be_positive(args, shared, tmp_path):
    extra = ["-e", str(shared["estimator"])] if args[0] == "ltau" else []
    out = tmp_path / "o.extxyz"
    result = runner.invoke(app, [*args, str(shared["good"]), "-o", str(out), *extra, "--top", "-1"])
    assert result.exit_code == 2 and "--top" in result.output
    assert not out.exists()


def test_text_in_square_brackets_survives_in_messages_and_tables(shared, tmp_path):
    src = tmp_path / "frames[run1].extxyz"
    structures = [water(k) for k in range(2)]
    for atoms in structures:
        atoms.info["name"] = "water[bold]"
    write(src, structures, format="extxyz")
    out = tmp_path / "scored[a].extxyz"
    result = runner.invoke(app, ["score", str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "frames[run1].extxyz:0" in result.output and "water[bold]" in result.output
    assert f"wrote 2 structures to {out}" in result.output
    bad = tmp_path / "bad[x].extxyz"
    write(bad, [water(0), bad_structure("nan")], format="extxyz")
    result = runner.invoke(app, ["score", str(bad), "-o", str(out)])
    assert_clean_failure(result, ["bad[x].extxyz"], structure=True)



def test_install_hints_keep_their_brackets():
    """Every error goes through cli.common.fail, which shows 'atomuq[label]' literally (rich would eat '[label]')."""
    from atomuq.cli.common import fail

    tiny = typer.Typer()

    @tiny.command()
    def run() -> None:
        fail("method gfn2-xtb: cannot import tblite; install it with pip install 'atomuq[label]'")

    result = runner.invoke(tiny, [])
    assert result.exit_code == 1 and "pip install 'atomuq[label]'" in result.output

# ------------------------------------------------------------------------------------------ the real process


def atomuq(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the real `atomuq` console script (this checkout's code first on the path)."""
    script = Path(sys.executable).with_name("atomuq")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "atomuq.cli.main"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_subprocess_bad_structure_and_bad_output(shared, tmp_path):
    bad = write_input("unknown_element", tmp_path)
    proc = atomuq("score", str(bad), "-o", "out.extxyz", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert line.startswith(f"error: {bad} structure 1: ") and "element(s) Br" in line
    known = set(line.split("elements known: ")[1].rstrip(")").split())  # every element some bundled model knows
    assert {"H", "C", "N", "O", "Cu", "Si"} <= known and "Br" not in known
    proc = atomuq("attack", str(shared["good"]), "-o", "/proc/atomuq-nowhere/a.extxyz", "--steps", "1", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(error_lines(proc.stderr)) == 1 and "--output /proc/atomuq-nowhere/a.extxyz" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == [bad.name]

