"""Ensemble disagreement: ensemble_std against numpy over members, ASE calculators as members,
score --ensemble from the CLI with the bundled members, and clear errors on bad members."""

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones
from ase.io import read, write
from typer.testing import CliRunner

from atomuq.calculator import AtomuqCalculator
from atomuq.cli.main import app
from atomuq.core.batch import Batch
from atomuq.core.errors import InputError, ModelFileError
from atomuq.models.checkpoint import save_model
from atomuq.models.derivatives import evaluate
from atomuq.models.members import load_ase_calculator, resolve_member
from atomuq.uq.ensemble import ensemble_uncertainty, evaluate_ensemble
from conftest import copper_cell, ethanol, make_native

runner = CliRunner()
BUNDLED = ["molecular-small"] + [f"molecular-small-seed{k}" for k in range(1, 5)]


def manual(forces, energies, ref, n_atoms, ddof):
    """Per-atom and per-structure ensemble_std, energy std and eps_ensemble by numpy, structure by structure."""
    var = forces.var(axis=0, ddof=ddof)  # (N, 3)
    per_atom = np.sqrt(var.mean(axis=1))
    bounds = np.cumsum([0, *n_atoms])
    per_structure = [np.sqrt(var[a:b].sum() / (3 * (b - a))) for a, b in zip(bounds[:-1], bounds[1:])]
    err = forces.mean(axis=0) - ref
    eps = [np.sqrt((err[a:b] ** 2).sum() / (3 * (b - a))) for a, b in zip(bounds[:-1], bounds[1:])]
    return per_atom, np.array(per_structure), energies.std(axis=0, ddof=ddof), np.array(eps)


@pytest.mark.parametrize("forces_mode", ["direct", "conservative"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_ensemble_std_equals_numpy_over_members(forces_mode, ddof):
    members = [make_native(seed=s) for s in (0, 3, 4)]
    structures = [ethanol(), copper_cell(), molecule("H2O")]
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    ref = np.random.default_rng(0).normal(size=(batch.num_atoms, 3))
    pred = evaluate_ensemble(members, batch, forces=forces_mode)
    result = ensemble_uncertainty(pred, batch, torch.as_tensor(ref), ddof=ddof)
    # each member alone, structure by structure
    key = "forces_direct" if forces_mode == "direct" else "forces_conservative"
    forces = np.stack([np.concatenate([getattr(evaluate(m, Batch.from_atoms([a], dtype=torch.float64)), key).detach().numpy()
                                       for a in structures]) for m in members])
    energies = np.stack([[float(evaluate(m, Batch.from_atoms([a], dtype=torch.float64), conservative=False).energy.detach()[0])
                          for a in structures] for m in members])
    per_atom, per_structure, energy_std, eps = manual(forces, energies, ref, [len(a) for a in structures], ddof)
    assert np.allclose(result.per_atom["ensemble_std"].numpy(), per_atom, atol=1e-10)
    assert np.allclose(result.per_structure["ensemble_std"].numpy(), per_structure, atol=1e-10)
    assert np.allclose(result.per_structure["ensemble_energy_std"].numpy(), energy_std, atol=1e-10)
    assert np.allclose(result.per_structure["eps_ensemble"].numpy(), eps, atol=1e-10)
    assert np.allclose(pred.mean_forces.numpy(), forces.mean(axis=0), atol=1e-10)
    assert result.per_structure["ensemble_std"].min() > 0


def test_identical_members_have_zero_std_and_ase_members_agree():
    # the bundled model as an atomuq model and as an ASE calculator (module:Class) give the same forces
    members = [resolve_member("molecular-small"), resolve_member("atomuq.calculator:AtomuqCalculator")]
    assert isinstance(members[1], AtomuqCalculator)
    batch = Batch.from_atoms([read("data/molecular/test_300K.extxyz.gz", index=0)])
    result = ensemble_uncertainty(evaluate_ensemble(members, batch), batch)
    assert float(result.per_structure["ensemble_std"][0]) == pytest.approx(0.0, abs=1e-5)


def test_ase_calculator_members_equal_numpy():
    atoms = copper_cell()
    members = [EMT(), LennardJones(sigma=2.3, epsilon=0.4, rc=5.0)]
    batch = Batch.from_atoms([atoms], dtype=torch.float64)
    result = ensemble_uncertainty(evaluate_ensemble(members, batch), batch)
    forces = []
    for calc in members:
        a = atoms.copy()
        a.calc = calc
        forces.append(a.get_forces())
    var = np.var(forces, axis=0)
    assert np.allclose(result.per_atom["ensemble_std"].numpy(), np.sqrt(var.mean(axis=1)), atol=1e-12)
    assert float(result.per_structure["ensemble_std"][0]) == pytest.approx(np.sqrt(var.mean()), rel=1e-12)


def test_score_with_the_bundled_ensemble_from_the_cli(tmp_path):
    src = tmp_path / "in.extxyz"
    structures = read("data/molecular/test_300K.extxyz.gz", index="0:150:75")
    write(src, structures)
    out = tmp_path / "out.extxyz"
    args = ["score", str(src), "-o", str(out), "--ensemble", ",".join(BUNDLED[:3])]
    for name in BUNDLED[3:]:
        args += ["--ensemble", name]  # both spellings: comma-separated and repeated
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    scored = read(out, ":")
    for atoms, original in zip(scored, structures):
        forces = []
        for name in BUNDLED:
            a = original.copy()
            a.calc = AtomuqCalculator(name)
            forces.append(a.get_forces())
        forces = np.array(forces)
        assert np.allclose(atoms.arrays["forces_ensemble_mean"], forces.mean(axis=0), atol=1e-4)
        assert np.allclose(atoms.arrays["ensemble_std_atoms"], np.sqrt(forces.var(axis=0).mean(axis=1)), atol=1e-4)
        assert atoms.info["ensemble_std"] == pytest.approx(np.sqrt(forces.var(axis=0).mean()), rel=1e-4)
        ref = original.get_forces()
        assert atoms.info["eps_ensemble"] == pytest.approx(np.sqrt(((forces.mean(axis=0) - ref) ** 2).mean()), rel=1e-4)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("members")
    wide = save_model(make_native(seed=0).float(), folder / "wide.pt")
    narrow = save_model(make_native(seed=1, elements=(1, 8)).float(), folder / "narrow.pt")
    return str(wide), str(narrow)


@pytest.mark.parametrize("members, message", [
    (["molecular-small", "nope"], "not a bundled model"),
    (["molecular-small", "no_such_module_xyz:Calc"], "cannot import module no_such_module_xyz"),
    (["molecular-small", "ase.calculators.emt:NoSuchCalculator"], "has no attribute NoSuchCalculator"),
    (["molecular-small", "atomuq.core.batch:Batch"], "Batch() failed"),
    (["molecular-small"], "at least 2 members"),
])
def test_bad_members_give_clear_errors(tmp_path, members, message):
    src = tmp_path / "in.extxyz"
    write(src, [molecule("CH4")])
    out = tmp_path / "o.extxyz"
    result = runner.invoke(app, ["score", str(src), "-o", str(out), *[x for m in members for x in ("--ensemble", m)]])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert not out.exists()


def test_element_sets_matter_only_when_a_structure_needs_them(tmp_path, model_files):
    wide, narrow = model_files
    src = tmp_path / "in.extxyz"
    write(src, [molecule("H2O"), molecule("CH4")])
    out = tmp_path / "o.extxyz"
    result = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", wide, "--ensemble", f"{wide},{narrow}"])
    assert result.exit_code == 1
    assert f"ensemble member {narrow} does not know element(s) C" in result.output
    write(src, [molecule("H2O")])  # H and O only: both members know them
    result = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", wide, "--ensemble", f"{wide},{narrow}"])
    assert result.exit_code == 0, result.output
    assert read(out).info["ensemble_std"] > 0


def test_library_errors():
    with pytest.raises(ModelFileError, match="module:Class"):
        load_ase_calculator("ase.calculators.emt")
    with pytest.raises(ModelFileError, match="not an ASE calculator"):
        load_ase_calculator("collections:OrderedDict")
    batch = Batch.from_atoms([molecule("H2O")], dtype=torch.float64)
    with pytest.raises(InputError, match="ensemble forces must be"):
        evaluate_ensemble([make_native(), make_native(seed=2)], batch, forces="mixed")
    pred = evaluate_ensemble([make_native(), make_native(seed=2)], batch)
    with pytest.raises(InputError, match="ddof=2"):
        ensemble_uncertainty(pred, batch, ddof=2)
