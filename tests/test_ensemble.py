"""Ensemble disagreement: ensemble_std against numpy over members, ASE calculators as members,
score --ensemble from the CLI with the bundled members, members of every kind (orb, metatomic)
named through the one model-spec resolver of --model, and clear errors on bad members."""

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
from atomuq.models.adapters.ase_calculator import CalculatorModel
from atomuq.reference.ase_class import build_calculator
from atomuq.models.registry import resolve_model
from atomuq.uq.ensemble import check_members, ensemble_uncertainty, evaluate_ensemble
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
    # the bundled model as an atomuq model and as an ASE calculator (ase:MODULE:CLASS) give the same forces
    members = [resolve_model("molecular-small"), resolve_model("ase:atomuq.calculator:AtomuqCalculator")]
    assert isinstance(members[1], CalculatorModel) and isinstance(members[1].calculator, AtomuqCalculator)
    assert members[1].external_forces and not members[1].has_direct_forces  # its own forces count as direct
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
    (["molecular-small", "nope"], "nope: neither a bundled model nor an existing model file"),
    (["molecular-small", "ase:no_such_module_xyz:Calc"], "cannot import module no_such_module_xyz"),
    (["molecular-small", "no_such_module_xyz:Calc"], "cannot import module no_such_module_xyz"),  # old spelling
    (["molecular-small", "ase:ase.calculators.emt:NoSuchCalculator"], "has no attribute NoSuchCalculator"),
    (["molecular-small", "ase:atomuq.core.batch:Batch"], "Batch is not an ASE calculator"),
    (["molecular-small", "ase:ase.calculators.singlepoint:SinglePointCalculator"], "SinglePointCalculator() failed"),
    (["molecular-small", "orb:"], "orb:: expected orb:PATH or orb:ARCHITECTURE:PATH"),
    (["molecular-small", "metatomic:/proc/atomuq-nowhere.pt"], "metatomic model file not found"),
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


def test_old_member_spelling_is_read_with_a_note(tmp_path):
    src, out = tmp_path / "in.extxyz", tmp_path / "o.extxyz"
    write(src, [molecule("H2O")])
    result = runner.invoke(app, ["score", str(src), "-o", str(out), "--ensemble",
                                 "molecular-small,atomuq.calculator:AtomuqCalculator"])
    assert result.exit_code == 0, result.output
    assert "deprecated; write ase:atomuq.calculator:AtomuqCalculator" in result.output
    assert read(out).info["ensemble_std"] == pytest.approx(0.0, abs=1e-5)  # the same model twice


def test_direct_mode_refuses_a_conservative_only_member():
    class Conservative(type(make_native())):
        @property
        def has_direct_forces(self) -> bool:
            return False

    members = [make_native(), make_native(seed=2)]
    members[1].__class__ = Conservative
    with pytest.raises(InputError, match="member m1 has no direct force head"):
        check_members(members, {1, 8}, "direct", ["m0", "m1"])
    check_members(members, {1, 8}, "conservative", ["m0", "m1"])
    check_members([members[0], EMT()], {1, 8}, "direct")  # a calculator's own forces count in either mode


def test_library_errors():
    with pytest.raises(ModelFileError, match="written MODULE:CLASS"):
        build_calculator("ase.calculators.emt")
    with pytest.raises(ModelFileError, match="not an ASE calculator"):
        build_calculator("collections:OrderedDict")
    batch = Batch.from_atoms([molecule("H2O")], dtype=torch.float64)
    with pytest.raises(InputError, match="ensemble forces must be"):
        evaluate_ensemble([make_native(), make_native(seed=2)], batch, forces="mixed")
    pred = evaluate_ensemble([make_native(), make_native(seed=2)], batch)
    with pytest.raises(InputError, match="ddof=2"):
        ensemble_uncertainty(pred, batch, ddof=2)


def test_orb_members_through_the_model_resolver(tmp_path):
    """Two random-weight orb models named orb:PATH, as --model names them: ensemble_std equals numpy."""
    pytest.importorskip("orb_models", reason="orb-models is not installed (pip install 'atomuq[orb]')")
    from atomuq.cli.ensemble_options import load_ensemble
    from atomuq.core.io import Record
    from atomuq.models.adapters.orb import save_orb
    from model_kinds import small_orb

    paths = [str(save_orb(small_orb(seed=s), tmp_path / f"orb{s}.pt")) for s in (0, 1)]
    structures = [ethanol(), copper_cell()]
    records = [Record(a, "in.extxyz", k) for k, a in enumerate(structures)]
    members, names = load_ensemble([f"orb:{paths[0]},orb:{paths[1]}"], records, "direct", "cpu")
    assert names == [f"orb:{p}" for p in paths] and all(m.has_direct_forces for m in members)
    batch = Batch.from_atoms(structures)
    std = ensemble_uncertainty(evaluate_ensemble(members, batch, names=names), batch).per_atom["ensemble_std"]
    forces = np.stack([evaluate(resolve_model(n), batch, conservative=False).forces_direct.detach().numpy() for n in names])
    assert np.allclose(std.numpy(), np.sqrt(forces.var(axis=0).mean(axis=1)), atol=1e-6) and float(std.min()) > 0
    src, out = tmp_path / "in.extxyz", tmp_path / "out.extxyz"
    write(src, structures)
    result = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", names[0], "--ensemble", ",".join(names)])
    assert result.exit_code == 0, result.output
    scored = read(out, ":")
    assert np.allclose(np.concatenate([a.arrays["ensemble_std_atoms"] for a in scored]), std.numpy(), atol=1e-5)


def test_metatomic_pet_members_through_the_model_resolver(tmp_path):
    """Two exported random PETs named metatomic:PATH: direct and conservative ensembles equal numpy."""
    pytest.importorskip("metatomic.torch", reason="metatomic-torch is not installed (pip install 'atomuq[metatomic]')")
    pytest.importorskip("metatrain.pet", reason="metatrain is not installed (pip install 'atomuq[metatomic]')")
    from atomuq.cli.ensemble_options import load_ensemble
    from atomuq.core.io import Record
    from model_kinds import export_pet

    names = [f"metatomic:{export_pet(tmp_path / f'pet{s}.pt', seed=s)}" for s in (0, 1)]
    structures = [ethanol(), molecule("H2O")]
    records = [Record(a, "in.extxyz", k) for k, a in enumerate(structures)]
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    for mode, key in (("direct", "forces_direct"), ("conservative", "forces_conservative")):
        members, _ = load_ensemble(names, records, mode, "cpu")
        std = ensemble_uncertainty(evaluate_ensemble(members, batch, mode), batch).per_atom["ensemble_std"]
        forces = np.stack([getattr(evaluate(m, batch), key).detach().numpy() for m in members])
        assert np.allclose(std.numpy(), np.sqrt(forces.var(axis=0).mean(axis=1)), atol=1e-10) and float(std.min()) > 0
    with pytest.raises(InputError, match="does not know element"):
        load_ensemble(names, [Record(copper_cell(), "cu.extxyz", 0)], "direct", "cpu")
