"""`atomuq score` and `atomuq models` end to end, and every bad input's error."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from typer.testing import CliRunner

from atomuq.calculator import AtomuqCalculator
from atomuq.cli.main import app
from atomuq.models.checkpoint import save_model
from atomuq.models.registry import DEFAULT_MODEL
from conftest import copper_cell, ethanol, make_native

runner = CliRunner()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return str(save_model(make_native().float(), tmp_path_factory.mktemp("m") / "model.pt"))


def labelled(atoms, seed):
    forces = np.random.default_rng(seed).normal(scale=0.5, size=(len(atoms), 3))
    atoms.calc = SinglePointCalculator(atoms, energy=-10.0, forces=forces)
    return atoms


def test_score_writes_every_structure_with_results(tmp_path, model_file):
    src = tmp_path / "in.extxyz"
    structures = [labelled(ethanol(), 0), copper_cell(), labelled(molecule("H2O"), 1)]
    write(src, structures)
    out = tmp_path / "out.extxyz"
    result = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", model_file, "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "Force Delta, worst first" in result.output
    scored = read(out, ":")
    assert len(scored) == 3
    for atoms, original in zip(scored, structures):
        assert np.allclose(atoms.positions, original.positions, atol=1e-6)
        for name in ("forces_direct", "forces_conservative", "force_delta_atoms", "confidence_error_atoms"):
            assert atoms.arrays[name].shape[0] == len(atoms), name
        u = np.linalg.norm(atoms.arrays["forces_direct"] - atoms.arrays["forces_conservative"], axis=1)
        assert np.allclose(atoms.arrays["force_delta_atoms"], u, atol=1e-5)
        assert atoms.info["force_delta"] == pytest.approx(np.sqrt((u**2).sum() / (3 * len(atoms))), rel=1e-4)
        assert atoms.info["force_delta_max"] == pytest.approx(u.max(), abs=1e-6)
        # ASE conventions: the model's energy and the (direct) forces it ran with, read back the ASE way
        assert atoms.get_potential_energy() == atoms.info["model_energy"]
        assert np.allclose(atoms.get_forces(), atoms.arrays["forces_direct"])
        assert atoms.info["atomuq_model"] == model_file and len(atoms.info["atomuq_model_fingerprint"]) == 16
    # reference forces give eps_nc / eps_c and are kept as REF_forces
    ref = structures[0].calc.results["forces"]
    assert np.allclose(scored[0].arrays["REF_forces"], ref)
    expected = np.sqrt(((scored[0].arrays["forces_direct"] - ref) ** 2).sum() / (3 * len(ref)))
    assert scored[0].info["eps_nc"] == pytest.approx(expected, rel=1e-4)
    assert "eps_nc" not in scored[1].info and "eps_nc_atoms" not in scored[1].arrays
    assert scored[1].get_stress().shape == (6,) and "stress" not in scored[0].calc.results
    # the model energy matches the calculator's for the same structure
    calc_atoms = ethanol()
    calc_atoms.calc = AtomuqCalculator(make_native().float())
    assert scored[0].info["model_energy"] == pytest.approx(calc_atoms.get_potential_energy(), rel=1e-5)


def test_models_lists_the_bundled_default():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert DEFAULT_MODEL in result.output and "(default)" in result.output


def bad_structures():
    nan = molecule("H2O")
    nan.positions[1, 0] = np.nan
    overlap = molecule("H2O")
    overlap.positions[2] = overlap.positions[0] + [0.05, 0, 0]
    no_cell = molecule("CH4")
    no_cell.pbc = True
    return {
        "empty": (Atoms(), "no atoms"),
        "nan": (nan, "NaN or infinite"),
        "overlap": (overlap, "overlap"),
        "pbc_without_cell": (no_cell, "cell vector is zero"),
        "unknown_element": (Atoms("UH", positions=[[0, 0, 0], [0, 0, 1.8]]), "not supported by the model"),
    }


@pytest.mark.parametrize("case", sorted(bad_structures()))
def test_bad_structure_is_named_and_nothing_is_written(tmp_path, model_file, case):
    atoms, message = bad_structures()[case]
    src = tmp_path / "in.extxyz"
    write(src, [molecule("CH4"), atoms], format="extxyz")
    out = tmp_path / "out.extxyz"
    result = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", model_file])
    assert result.exit_code == 1
    assert message in result.output
    assert f"{src} structure 1" in result.output
    assert not out.exists()
    assert not list(tmp_path.glob(".out.extxyz*"))


def test_unreadable_and_missing_files(tmp_path, model_file):
    bad = tmp_path / "bad.extxyz"
    bad.write_text("3\nthis is not\nextxyz at all\n")
    for path, message in ((bad, "cannot read structures"), (tmp_path / "missing.xyz", "file not found")):
        result = runner.invoke(app, ["score", str(path), "-o", str(tmp_path / "o.extxyz"), "--model", model_file])
        assert result.exit_code == 1 and message in result.output and str(path) in result.output


def test_bad_options(tmp_path, model_file):
    src = tmp_path / "in.extxyz"
    write(src, [molecule("CH4")])
    result = runner.invoke(app, ["score", str(src), "-o", str(tmp_path / "o.extxyz"), "--device", "tpu"])
    assert result.exit_code != 0 and "--device" in result.output
    result = runner.invoke(app, ["score", str(src), "-o", str(tmp_path / "o.extxyz"), "--model", "nope"])
    assert result.exit_code == 1 and "neither a bundled model" in result.output
    result = runner.invoke(app, ["score", str(src), "-o", str(tmp_path / "o.extxyz"), "--batch-size", "0"])
    assert result.exit_code != 0


def test_structure_tag_names_structures_in_the_summary():
    from atomuq.workflows.score import structure_tag

    atoms = molecule("H2O")
    assert structure_tag(atoms) == ""
    atoms.info.update(molecule="water", temperature=600.0, split="test")
    assert structure_tag(atoms) == "water 600 K"
    atoms.info["demo_group"] = "in-domain"
    assert structure_tag(atoms) == "water in-domain"


def test_scored_output_read_back_keeps_the_reference_labels(tmp_path, model_file):
    from atomuq.core.io import reference_energy, reference_forces

    src, out = tmp_path / "in.extxyz", tmp_path / "out.extxyz"
    original = labelled(ethanol(), 3)
    write(src, [original])
    assert runner.invoke(app, ["score", str(src), "-o", str(out), "--model", model_file]).exit_code == 0
    back = read(out)
    assert "model_energy" in back.info and back.info["model_energy"] != pytest.approx(-10.0)
    assert back.get_potential_energy() == back.info["model_energy"]  # the prediction, the ASE way
    assert reference_energy(back) == pytest.approx(-10.0)
    assert np.allclose(reference_forces(back), original.calc.results["forces"])
    # scoring the scored file again keeps the labels: the predictions never become references
    again = tmp_path / "again.extxyz"
    assert runner.invoke(app, ["score", str(out), "-o", str(again), "--model", model_file]).exit_code == 0
    twice = read(again)
    assert twice.info["REF_energy"] == pytest.approx(-10.0)
    assert np.allclose(twice.arrays["REF_forces"], original.calc.results["forces"])
    assert twice.info["eps_nc"] == pytest.approx(back.info["eps_nc"], rel=1e-6)
    del back.info["REF_energy"], back.arrays["REF_forces"]
    assert reference_energy(back) is None and reference_forces(back) is None
