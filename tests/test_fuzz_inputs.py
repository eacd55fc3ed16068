"""Property: no corruption of a valid extended XYZ file makes `atomuq score` give a traceback or write a NaN.

The corruptions (hypothesis, examples and deadline capped): truncation, byte flips, deleted or repeated lines,
numbers replaced by NaN / infinity / huge values. Every outcome must be either a clean refusal (exit 1, one
`error:` line, nothing written) or a run whose output holds finite numbers only.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from atomuq.cli.main import app

runner = CliRunner()
NUMBER = re.compile(rb"-?\d+\.\d+(?:[eE][-+]?\d+)?")
BAD_NUMBERS = (b"nan", b"NaN", b"inf", b"-inf", b"1e308", b"-1e300", b"1e30", b"123456789.0", b"1e-320")


def valid_file() -> bytes:
    """Two labelled molecules and a periodic water cell (energy eV, forces eV/Å) as extended XYZ bytes."""
    structures = []
    for k, name in enumerate(("H2O", "NH3", "H2O")):
        atoms = molecule(name)
        rng = np.random.default_rng(k)
        atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
        if k == 2:
            atoms.set_cell([6.0, 6.5, 7.0])
            atoms.pbc = True
            atoms.center()
        atoms.calc = SinglePointCalculator(atoms, energy=-10.0 - k, forces=rng.normal(scale=0.3, size=(len(atoms), 3)))
        structures.append(atoms)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "valid.extxyz"
        write(path, structures, format="extxyz")
        return path.read_bytes()


VALID = valid_file()


def corrupt(data: bytes, operations: list[tuple[str, float, int]]) -> bytes:
    """Apply (kind, where in [0, 1), value) corruptions in order."""
    for kind, where, value in operations:
        if not data:
            break
        if kind == "truncate":
            data = data[: int(where * len(data))]
        elif kind == "flip":
            k = int(where * len(data))
            data = data[:k] + bytes([value % 256]) + data[k + 1 :]
        elif kind in ("delete_line", "repeat_line"):
            lines = data.splitlines(keepends=True)
            k = int(where * len(lines))
            lines[k:k + 1] = [] if kind == "delete_line" else [lines[k], lines[k]]
            data = b"".join(lines)
        elif kind == "bad_number":
            numbers = list(NUMBER.finditer(data))
            if numbers:
                m = numbers[int(where * len(numbers))]
                data = data[: m.start()] + BAD_NUMBERS[value % len(BAD_NUMBERS)] + data[m.end() :]
    return data


OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["truncate", "flip", "delete_line", "repeat_line", "bad_number", "bad_number"]),
              st.floats(min_value=0.0, max_value=0.999), st.integers(min_value=0, max_value=255)),
    min_size=1, max_size=3,
)


def finite_everywhere(path: Path) -> None:
    """Every number of every structure read back from path is finite."""
    for atoms in read(path, ":"):
        for name, values in atoms.arrays.items():
            if np.issubdtype(np.asarray(values).dtype, np.number):
                assert np.isfinite(values).all(), name
        for name, value in atoms.info.items():
            if isinstance(value, (float, int, np.ndarray)) and np.issubdtype(np.asarray(value).dtype, np.number):
                assert np.isfinite(value).all(), name
        if atoms.calc is not None:
            for name, value in atoms.calc.results.items():
                assert np.isfinite(value).all(), name


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=40, deadline=10_000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS)
def test_score_survives_any_corruption_of_a_valid_file(operations):
    data = corrupt(VALID, operations)
    with tempfile.TemporaryDirectory() as folder:
        src, out = Path(folder) / "input.extxyz", Path(folder) / "out" / "scored.extxyz"
        src.write_bytes(data)
        result = runner.invoke(app, ["score", str(src), "-o", str(out)])
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in result.output
        assert result.exit_code in (0, 1), result.output
        if result.exit_code == 1:
            errors = [line for line in result.output.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "input.extxyz" in errors[0], result.output
            assert not out.parent.exists()
        else:
            finite_everywhere(out)


def test_the_corruptions_do_reach_the_reader():
    """The strategy's operations change the file (so the property is not vacuous)."""
    assert corrupt(VALID, [("bad_number", 0.5, 0)]) != VALID
    assert b"nan" in corrupt(VALID, [("bad_number", 0.1, 0)])
    assert len(corrupt(VALID, [("truncate", 0.5, 0)])) == len(VALID) // 2
    assert corrupt(VALID, [("delete_line", 0.0, 0)]) == VALID.split(b"\n", 1)[1]
