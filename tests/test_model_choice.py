"""The catalog of bundled models and the model a command takes without --model: the first primary model of the
input's domain that knows every element, else any primary model that does, else a clear error; the catalog must
list exactly the bundled files."""

import json
import shutil

import pytest
from ase.build import bulk, molecule
from ase.io import write
from typer.testing import CliRunner

import atomuq.models.catalog as catalog_module
from atomuq.cli.main import app
from atomuq.core.errors import InputError, ModelFileError
from atomuq.models.catalog import CATALOG_FILE, catalog, choose_model, input_domain
from atomuq.models.checkpoint import save_model
from atomuq.models.registry import DEFAULT_MODEL, bundled_models
from conftest import make_native

runner = CliRunner()


def test_the_shipped_catalog_lists_every_bundled_file_with_its_elements():
    entries = catalog()
    assert sorted(e.name for e in entries) == sorted(bundled_models())
    primaries = [e for e in entries if e.member_of is None]
    assert DEFAULT_MODEL in [e.name for e in primaries]
    for entry in entries:
        assert entry.elements and entry.domain in ("molecular", "materials")
        assert entry.member_of is None or entry.member_of in [p.name for p in primaries]


def fake_catalog(folder, rows):
    """A model folder holding random native models (name -> elements) and a catalog of rows."""
    folder.mkdir()
    for row in rows:
        save_model(make_native(elements=row.pop("elements")).float(), folder / f"{row['name']}.pt")
    (folder / CATALOG_FILE).write_text(json.dumps({"models": rows}))
    return catalog(folder)


@pytest.fixture()
def two_domains(tmp_path):
    return fake_catalog(tmp_path / "models", [
        {"name": "mol", "domain": "molecular", "elements": [1, 6, 7, 8]},
        {"name": "mat", "domain": "materials", "elements": [1, 8, 14, 29]},
        {"name": "mat-seed1", "domain": "materials", "elements": [1, 8, 14, 29, 79], "member_of": "mat"},
    ])


def test_the_domain_decides_between_models_that_both_know_the_elements(two_domains):
    assert input_domain([False, False]) == "molecular" and input_domain([True]) == "materials"
    assert input_domain([True, False]) is None
    assert choose_model({1, 8}, [False], two_domains).entry.name == "mol"
    choice = choose_model({1, 8}, [True], two_domains)
    assert choice.entry.name == "mat" and "periodic input" in choice.reason and "H O" in choice.reason


def test_a_model_of_the_other_domain_is_taken_when_only_it_knows_the_elements(two_domains):
    choice = choose_model({1, 6}, [True], two_domains)  # periodic, but only the molecular model knows C
    assert choice.entry.name == "mol" and "no bundled materials model knows them" in choice.reason
    assert choose_model({14, 29}, [False], two_domains).entry.name == "mat"


def test_an_element_no_primary_model_knows_is_a_clear_error(two_domains):
    with pytest.raises(InputError, match=r"element\(s\) Au not supported by any bundled model \(mol: H C N O; "
                                         r"mat: H O Si Cu\); give --model"):
        choose_model({29, 79}, [True], two_domains)  # the member knows Au, but members are never chosen alone
    with pytest.raises(InputError, match="the combination C Cu not supported"):
        choose_model({6, 29}, [True], two_domains)


def test_a_catalog_that_disagrees_with_the_files_is_refused(tmp_path):
    folder = tmp_path / "models"
    fake_catalog(folder, [{"name": "mol", "domain": "molecular", "elements": [1, 6]}])
    shutil.copy(folder / "mol.pt", folder / "extra.pt")
    with pytest.raises(ModelFileError, match=r"files not listed: \['extra'\]"):
        catalog(folder)
    (folder / "extra.pt").unlink()
    (folder / CATALOG_FILE).write_text(json.dumps({"models": [{"name": "mol", "domain": "solids"}]}))
    with pytest.raises(ModelFileError, match="domain 'solids'"):
        catalog(folder)


def test_score_without_model_says_which_model_it_took_and_refuses_copper_clearly(tmp_path):
    water = tmp_path / "water.extxyz"
    write(water, molecule("H2O"))
    result = runner.invoke(app, ["score", str(water), "-o", str(tmp_path / "out.extxyz")])
    assert result.exit_code == 0, result.output
    assert f"--model not given: using {DEFAULT_MODEL}" in result.output
    copper = tmp_path / "cu.extxyz"
    write(copper, bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2))
    result = runner.invoke(app, ["score", str(copper), "-o", str(tmp_path / "cu_out.extxyz")])
    known = [e for e in catalog() if e.member_of is None and e.knows({29})]
    if known:  # a shipped model knows Cu: it is taken and said
        assert result.exit_code == 0 and f"using {known[0].name}" in result.output
    else:
        assert result.exit_code == 1 and "element(s) Cu not supported by any bundled model" in result.output
        assert "Traceback" not in result.output and not (tmp_path / "cu_out.extxyz").exists()


def test_md_without_model_takes_the_chosen_model_for_the_structure(tmp_path, monkeypatch, two_domains):
    monkeypatch.setattr(catalog_module, "catalog", lambda folder=None: two_domains)
    monkeypatch.setattr("atomuq.models.registry.bundled_dir", lambda: two_domains[0].path.parent)
    crystal = tmp_path / "si.extxyz"
    write(crystal, bulk("Si", "diamond", a=5.43, cubic=True))
    result = runner.invoke(app, ["md", str(crystal), "-o", str(tmp_path / "md.extxyz"), "--steps", "2", "--temperature", "300",
                                 "--monitor", "log"])
    assert "--model not given: using mat, the bundled materials model that knows Si" in result.output
    assert result.exit_code == 0, result.output


def test_bench_without_model_takes_the_model_for_its_inputs_elements(tmp_path, monkeypatch, two_domains):
    from ase.calculators.singlepoint import SinglePointCalculator

    monkeypatch.setattr(catalog_module, "catalog", lambda folder=None: two_domains)
    monkeypatch.setattr("atomuq.models.registry.bundled_dir", lambda: two_domains[0].path.parent)
    frames = []
    for k in range(12):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.05, seed=k)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=atoms.positions * 0.1)
        frames.append(atoms)
    path = tmp_path / "cu.extxyz"
    write(path, frames)
    result = runner.invoke(app, ["bench", str(path), "-o", str(tmp_path / "report"), "--bootstrap", "20", "--bins", "3"])
    assert "--model not given: using mat, the bundled materials model that knows Cu" in result.output
    assert result.exit_code == 0, result.output
    assert '"model": "mat"' in (tmp_path / "report" / "bench.json").read_text()


def test_a_chlorinated_molecule_gets_the_shipped_model_that_knows_chlorine(tmp_path):
    path = tmp_path / "ch3cl.extxyz"
    write(path, molecule("CH3Cl"))
    result = runner.invoke(app, ["score", str(path), "-o", str(tmp_path / "out.extxyz")])
    knowing = [e.name for e in catalog() if e.member_of is None and e.domain == "molecular" and e.knows({1, 6, 17})]
    assert knowing, "no shipped molecular model knows Cl (molecular-broad does)"
    assert result.exit_code == 0, result.output
    assert f"--model not given: using {knowing[0]}, the bundled molecular model that knows H C Cl" in result.output
    assert (tmp_path / "out.extxyz").stat().st_size > 0
