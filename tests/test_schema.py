"""The output schema: one registry of result keys, one writer, ASE conventions, files of version 0 still read."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from atomuq.core.batch import Batch
from atomuq.core.io import detach_reference, read_structures, reference_energy, reference_forces
from atomuq.core.schema import (
    ATOM,
    LESS_TRUSTED,
    MORE_TRUSTED,
    NOT_A_SCORE,
    BUILTIN_KEYS,
    LTAU,
    REGISTRY,
    SCORE,
    SCHEMA_VERSION,
    STRUCTURE,
    EarlierResults,
    Provenance,
    SchemaError,
    carries_prediction,
    earlier_results,
    lookup,
    own_keys,
    upgrade,
    write_results,
)
from atomuq.models.derivatives import evaluate
from atomuq.models.registry import resolve_model
from atomuq.uq.confidence import confidence
from atomuq.uq.force_delta import force_delta
from atomuq.uq.result import UQResult
from atomuq.workflows.score import score_records
from conftest import ethanol

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
PROV = Provenance(model="test-model", model_fingerprint="0123456789abcdef")


def test_every_key_is_described_and_named_by_the_scheme():
    for name, key in REGISTRY.items():
        assert key.name == name and key.level in (ATOM, STRUCTURE)
        assert key.orientation in (LESS_TRUSTED, MORE_TRUSTED, NOT_A_SCORE)
        assert key.description and key.writers and isinstance(key.unit, str)
        if key.level == ATOM and key.shape == "" and key.orientation != NOT_A_SCORE:
            assert name.endswith("_atoms"), name  # per-atom scores end in _atoms; the plain name is per structure
        if name.endswith("_atoms"):
            base = REGISTRY.get(name[: -len("_atoms")])
            assert base is None or base.level == STRUCTURE, name
    assert lookup("confidence_error_max").level == STRUCTURE  # md monitor names of per-atom results
    assert lookup("ltau_uncertainty_rms").unit == "1"
    for bad in ("force_delta_median", "nosuch", "forces_max"):
        with pytest.raises(SchemaError, match="not a registered"):
            lookup(bad)


def test_every_key_the_code_writes_is_registered():
    """Keys written by hand anywhere in src (info[...] = / arrays[...] = / md frame dicts) are registered."""
    src = ROOT / "src" / "atomuq"
    written = set()
    for path in [*src.glob("workflows/**/*.py"), src / "calculator.py"]:
        text = path.read_text()
        written |= set(re.findall(r'\.(?:info|arrays)\["([a-z_]+)"\]\s*=', text))
    md = (src / "workflows" / "md" / "driver.py").read_text()
    frame = md[md.index("def _write_frame"):]
    frame = frame[: frame.index("prepare_results(")]
    written |= set(re.findall(r'"([a-z_]+)":', frame)) | set(re.findall(r'info\["([a-z_]+)"\]', frame))
    unregistered = sorted(k for k in written if k not in REGISTRY and not k.startswith("REF_"))
    assert not unregistered, f"write these through core.schema (register them): {unregistered}"
    assert {"epot", "etot", "temperature", "md_state", "step", "time_fs"} <= written  # the scan saw the md frames


def test_writer_refuses_unknown_keys_bad_shapes_and_nan_without_touching_atoms():
    atoms = molecule("H2O")
    before = (dict(atoms.info), set(atoms.arrays))
    for results, message in (({"force_delta": 0.1, "nosuch": 1.0}, "not a registered"),
                             ({"force_delta_atoms": np.zeros(2)}, "shape"),
                             ({"forces": np.zeros((3, 2))}, "shape"),
                             ({"force_delta": float("nan")}, "not a finite"),
                             ({"forces_direct": np.full((3, 3), np.inf)}, "NaN or infinite")):
        with pytest.raises(SchemaError, match=message):
            write_results(atoms, results, PROV)
        assert (dict(atoms.info), set(atoms.arrays)) == before and atoms.calc is None


def test_written_structure_reads_back_the_ase_way_with_provenance(tmp_path):
    atoms = molecule("H2O")
    atoms.info["molecule"] = "water"
    forces = np.arange(9.0).reshape(3, 3)
    write_results(atoms, {"energy": -5.5, "forces": forces, "forces_direct": forces, "force_delta": 0.2,
                          "force_delta_atoms": [0.1, 0.2, 0.3], "rotational_gradient": np.eye(3)}, PROV)
    write(tmp_path / "w.extxyz", atoms)
    back = read(tmp_path / "w.extxyz")
    assert back.get_potential_energy() == -5.5 and np.allclose(back.get_forces(), forces)
    assert back.info["model_energy"] == -5.5 and back.info["molecule"] == "water"
    assert np.allclose(back.arrays["force_delta_atoms"], [0.1, 0.2, 0.3]) and back.info["force_delta"] == 0.2
    assert np.allclose(back.info["rotational_gradient"], np.eye(3))
    assert back.info["atomuq_schema_version"] == SCHEMA_VERSION and back.info["atomuq_model"] == "test-model"
    assert back.info["atomuq_model_fingerprint"] == "0123456789abcdef"
    assert carries_prediction(back) and reference_forces(back) is None and reference_energy(back) is None
    # the copy made for new results drops the predictions instead of keeping them as REF_ labels
    assert "REF_forces" not in detach_reference(back).arrays and "REF_energy" not in detach_reference(back).info


def test_prepared_results_for_a_frame_writer_of_its_own(tmp_path):
    """What md's own frame writer gets: checked info (with provenance), arrays and the ASE results."""
    from atomuq.core.schema import prepare_results

    atoms = molecule("H2O")
    forces = np.ones((3, 3))
    prepared = prepare_results({"energy": -3.0, "forces": forces, "step": 4, "time_fs": 2.0, "epot": -3.0,
                                "temperature": 290.0, "trusted": True, "force_delta": 0.1,
                                "confidence_error_max": 0.2}, PROV, len(atoms))
    assert prepared.calculator == {"energy": -3.0, "free_energy": -3.0, "forces": pytest.approx(forces)}
    assert prepared.info["model_energy"] == -3.0 and prepared.info["step"] == 4 and prepared.info["trusted"] is True
    assert prepared.info["atomuq_schema_version"] == SCHEMA_VERSION and not prepared.arrays
    with pytest.raises(SchemaError, match="not a registered"):
        prepare_results({"epot_typo": 1.0}, PROV, 3)


def test_labels_computed_after_atomuq_are_references_again():
    atoms = molecule("H2O")
    write_results(atoms, {"energy": -5.5, "forces": np.zeros((3, 3))}, PROV)
    labels = np.ones((3, 3))
    atoms.calc = SinglePointCalculator(atoms, energy=-7.0, forces=labels)  # e.g. DFT on the same structure
    assert not carries_prediction(atoms)
    assert reference_energy(atoms) == -7.0 and np.allclose(reference_forces(atoms), labels)


def test_rewriting_replaces_every_earlier_result():
    atoms = molecule("H2O")
    write_results(atoms, {"energy": 1.0, "forces": np.zeros((3, 3)), "eps_nc": 0.3, "eps_nc_atoms": np.ones(3)}, PROV)
    write_results(atoms, {"energy": 2.0, "forces": np.zeros((3, 3)), "force_delta": 0.1}, PROV)
    assert "eps_nc" not in atoms.info and "eps_nc_atoms" not in atoms.arrays
    assert atoms.get_potential_energy() == 2.0 and atoms.info["model_energy"] == 2.0


SCORED = {"energy": 1.0, "forces": np.zeros((3, 3)), "force_delta": 0.1, "force_delta_max": 0.2,
          "ensemble_std": 0.05, "eps_c": 0.4}
LTAU_SCORED = {"energy": 1.0, "forces": np.zeros((3, 3)), "ltau_uncertainty": 0.3, "ltau_threshold": 0.05,
               "ltau_uncertainty_atoms": np.full(3, 0.3)}


def test_score_and_ltau_score_replace_only_their_own_keys():
    atoms = molecule("H2O")
    write_results(atoms, SCORED, PROV, writer=SCORE)
    assert earlier_results(atoms, LTAU, PROV) == EarlierResults(own=False, kept=(SCORE,), dropped=None)
    write_results(atoms, LTAU_SCORED, PROV, writer=LTAU)
    assert atoms.info["force_delta"] == 0.1 and atoms.info["ltau_uncertainty"] == 0.3  # both commands' results
    assert earlier_results(atoms, SCORE, PROV).own and earlier_results(atoms, SCORE, PROV).kept == (LTAU,)
    rescored = {k: v for k, v in SCORED.items() if k != "ensemble_std"}  # a rerun without the ensemble
    write_results(atoms, {**rescored, "energy": 2.0}, PROV, writer=SCORE)
    assert "ensemble_std" not in atoms.info  # the command's own stale key goes
    assert atoms.info["ltau_uncertainty"] == 0.3 and "ltau_uncertainty_atoms" in atoms.arrays
    assert atoms.get_potential_energy() == 2.0 and atoms.info["model_energy"] == 2.0
    assert atoms.info["atomuq_model_fingerprint"] == PROV.model_fingerprint
    assert "force_delta_max" in own_keys(SCORE) and "ltau_threshold" in own_keys(LTAU)
    assert not set(own_keys(SCORE)) & set(own_keys(LTAU)) and "eps_c" not in own_keys(SCORE)  # shared: not own


def test_results_of_another_model_are_dropped_not_mixed_under_one_provenance():
    atoms = molecule("H2O")
    write_results(atoms, SCORED, PROV, writer=SCORE)
    other = Provenance(model="other-model", model_fingerprint="fedcba9876543210")
    assert earlier_results(atoms, LTAU, other).dropped == "test-model"
    write_results(atoms, LTAU_SCORED, other, writer=LTAU)
    assert "force_delta" not in atoms.info and atoms.info["atomuq_model"] == "other-model"
    weightless = Provenance(model="ase:a", model_fingerprint="none")  # ASE calculators have no weights to compare
    write_results(atoms, SCORED, weightless, writer=SCORE)
    assert earlier_results(atoms, LTAU, Provenance(model="ase:b", model_fingerprint="none")).dropped == "ase:a"
    assert earlier_results(atoms, LTAU, weightless).kept == (SCORE,)


def test_uq_results_take_names_units_and_orientation_from_the_registry(native_model):
    atoms = ethanol()
    batch = Batch.from_atoms([atoms], dtype=torch.float64)
    pred = evaluate(native_model, batch)
    fd = force_delta(pred, batch)
    conf = confidence(pred.confidence_logits, native_model.confidence_bin_edges, batch)
    assert fd.units["force_delta"] == "eV/Å" and fd.orientation["force_delta"] == LESS_TRUSTED
    assert conf.units["confidence_error"] == REGISTRY["confidence_error_atoms"].unit
    per_atom, per_structure = fd.outputs()
    assert set(per_atom) == {"force_delta_atoms"} and {"force_delta", "force_delta_max"} <= set(per_structure)
    assert per_structure["force_delta_max"][0] == pytest.approx(per_atom["force_delta_atoms"].max())
    (values,) = fd.merged(conf).structures(batch.ptr.tolist())
    assert values["confidence_error"] == pytest.approx(values["confidence_error_atoms"].mean())
    with pytest.raises(SchemaError):
        UQResult(per_atom={"my_score": torch.zeros(3)})
    with pytest.raises(SchemaError, match="per atom, not per structure"):
        UQResult(per_atom={"forces_direct": torch.zeros(3)}, per_structure={"forces_direct": torch.zeros(1)})


def test_ltau_predict_returns_the_common_result_shape():
    from atomuq.uq.ltau.estimator import fit_estimator
    from atomuq.uq.ltau.index import build_index

    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(30, 4)).astype(np.float32)
    est = fit_estimator([rng.lognormal(-3, 0.5, (6, 30))], rng.choice([1, 8], size=30), np.ones(30),
                        build_index(descriptors), atol=0.05)
    pred = est.predict(descriptors[:10], k=2, ptr=[0, 4, 10])
    assert isinstance(pred, UQResult) and pred.orientation["ltau_confidence"] == MORE_TRUSTED
    first, second = pred.structures([0, 4, 10])
    assert first["ltau_uncertainty"] == pytest.approx(first["ltau_uncertainty_atoms"].mean())
    assert second["ltau_distance_max"] == pytest.approx(pred.distance[4:].max())
    assert second["ltau_threshold"] == pytest.approx(0.05) and len(second["ltau_confidence_atoms"]) == 6


def test_attack_frames_carry_the_forces_at_the_frame(native_model):
    from atomuq.workflows.attack import AttackSettings, attack

    start = ethanol()
    result = attack(native_model, [start], AttackSettings(steps=2, patience=None))
    frame = result.to_atoms([start])[-1]
    pred = evaluate(native_model, Batch.from_atoms([frame], dtype=torch.float64))
    assert np.allclose(frame.get_forces(), pred.forces_direct.detach().numpy(), atol=1e-8)
    assert frame.get_potential_energy() == pytest.approx(float(pred.energy.detach()[0]), abs=1e-8)


# ------------------------------------------------------------------------------------ files of version 0


def test_score_file_of_version_0_reads_with_the_new_keys():
    raw = read(DATA / "scored_v0.extxyz", ":")
    records = read_structures([DATA / "scored_v0.extxyz"])
    assert len(records) == 3
    for old, rec in zip(raw, records):
        atoms = rec.atoms
        assert atoms.info["atomuq_schema_version"] == 0
        for name in ("force_delta", "confidence_error", "eps_nc", "eps_c", "ensemble_std"):
            assert np.array_equal(atoms.arrays[name + "_atoms"], old.arrays[name]) and name not in atoms.arrays
        assert atoms.info["force_delta"] == old.info["force_delta"]  # per-structure names kept
        assert atoms.info["rotational_gradient_norm"] == old.info["rotational_gradient"]
        assert atoms.get_potential_energy() == old.info["model_energy"]
        assert np.array_equal(atoms.get_forces(), old.arrays["forces_direct"])
        assert np.array_equal(reference_forces(atoms), old.arrays["REF_forces"])  # labels stay labels
        assert reference_energy(atoms) == old.info["REF_energy"]
    assert upgrade(records[0].atoms) is records[0].atoms and records[0].atoms.info["atomuq_schema_version"] == 0


def test_rescoring_a_version_0_file_gives_its_numbers_back():
    model = resolve_model("molecular-small")
    records = read_structures([DATA / "scored_v0.extxyz"])
    scored, _ = score_records(records, model, rotational=True)
    for atoms, rec in zip(scored, records):
        old = rec.atoms.info
        for name in ("force_delta", "force_delta_max", "eps_nc", "eps_c", "confidence_error", "model_energy"):
            assert atoms.info[name] == pytest.approx(old[name], rel=1e-5, abs=1e-6), name
        assert atoms.info["rotational_gradient_norm"] == pytest.approx(old["rotational_gradient_norm"], abs=1e-5)
        assert atoms.info["atomuq_schema_version"] == SCHEMA_VERSION


def test_ltau_attack_and_md_files_of_version_0_read():
    ltau_raw = read(DATA / "ltau_scored_v0.extxyz", ":")
    ltau = [r.atoms for r in read_structures([DATA / "ltau_scored_v0.extxyz"])]
    for old, atoms in zip(ltau_raw, ltau):
        assert np.array_equal(atoms.arrays["ltau_uncertainty_atoms"], old.arrays["ltau_uncertainty"])
        assert np.array_equal(atoms.arrays["eps_nc_atoms"], old.arrays["ltau_force_error"])
        assert atoms.info["ltau_uncertainty"] == old.info["ltau_uncertainty"]
        assert "ltau_force_error" not in atoms.arrays and "ltau_distance" not in atoms.arrays
    attack_raw = read(DATA / "attack_v0.extxyz", ":")
    attack = [r.atoms for r in read_structures([DATA / "attack_v0.extxyz"])]
    assert [a.info["attack_step"] for a in attack] == [0, 1, 2]
    for old, atoms in zip(attack_raw, attack):
        assert np.array_equal(atoms.arrays["force_delta_atoms"], old.arrays["force_delta"])
        assert atoms.get_potential_energy() == old.info["model_energy"]
    md_raw = read(DATA / "md_v0.extxyz", ":")
    assert all(reference_forces(a) is None for a in md_raw)  # model forces of an old MD frame are no labels
    md = [r.atoms for r in read_structures([DATA / "md_v0.extxyz"])]
    for old, atoms in zip(md_raw, md):
        assert atoms.get_potential_energy() == old.info["epot"]
        assert np.array_equal(atoms.get_forces(), old.get_forces()) and reference_forces(atoms) is None


def test_structures_that_are_not_atomuq_outputs_are_left_alone():
    atoms = molecule("H2O")
    atoms.arrays["force_delta"] = np.ones(3)  # a user's own array of that name
    atoms.info["temperature"] = 300.0
    upgrade(atoms)
    assert "force_delta" in atoms.arrays and "atomuq_schema_version" not in atoms.info


# ------------------------------------------------------------------------------------ the generated table


def test_committed_key_table_is_the_generated_one():
    spec = importlib.util.spec_from_file_location("output_keys_table", ROOT / "scripts" / "output_keys_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (ROOT / "docs" / "output_keys.md").read_text(encoding="utf-8")
    assert committed == module.table(), "docs/output_keys.md is stale: run scripts/output_keys_table.py"
    for name in BUILTIN_KEYS:
        assert f"`{name}`" in committed
