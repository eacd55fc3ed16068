"""The one model-spec resolver: every form listed by spec_help, new prefixes and names registered in one
place, old spellings of ase:MODULE:CLASS read with a deprecation note, clear errors for the rest."""

from __future__ import annotations

import pytest
import torch

from atomuq.core.errors import ModelFileError
from atomuq.models import registry
from atomuq.models.adapters.ase_calculator import CalculatorModel
from atomuq.models.checkpoint import save_model
from atomuq.models.registry import normalise_spec, register_name, register_spec, resolve_model, spec_help
from conftest import PairModel, make_native


def test_spec_help_lists_every_form_and_the_bundled_models():
    text = spec_help()
    lines = text.splitlines()
    for syntax in ("NAME", "PATH", "orb:PATH", "metatomic:PATH", "ase:MODULE:CLASS"):
        assert any(line.startswith(syntax) for line in lines), syntax
    assert all(name in text for name in registry.bundled_models())
    assert "pip install 'atomuq[orb]'" in text and "pip install 'atomuq[metatomic]'" in text
    one_line = spec_help(one_line=True)
    assert "\n" not in one_line and len(lines) == len(registry.spec_forms())
    assert all(f"{syntax} ({text})" in one_line for syntax, text in registry.spec_forms())


def test_a_registered_prefix_and_name_work_everywhere(monkeypatch):
    monkeypatch.setattr(registry, "SPEC_PREFIXES", dict(registry.SPEC_PREFIXES))
    monkeypatch.setattr(registry, "SHORT_NAMES", dict(registry.SHORT_NAMES))
    calls = []

    def load_toy(rest: str, device) -> PairModel:
        calls.append((rest, device))
        return PairModel(cutoff=float(rest))

    register_spec("toy", "toy:CUTOFF", "a pair model with that cutoff (Å)", load_toy)
    register_name("toy-default", "the toy pair model at 2.5 Å", lambda rest, device: load_toy("2.5", device))
    model = resolve_model("toy:3.5", device="cpu")
    assert isinstance(model, PairModel) and model.cutoff == 3.5
    assert resolve_model("toy-default").cutoff == 2.5 and calls == [("3.5", "cpu"), ("2.5", "cpu")]
    assert any(line.startswith("toy:CUTOFF ") and line.endswith("a pair model with that cutoff (Å)")
               for line in spec_help().splitlines())
    assert "toy-default (the toy pair model" in spec_help(one_line=True)
    with pytest.raises(ModelFileError, match="toy:: expected toy:CUTOFF"):
        resolve_model("toy:")
    with pytest.raises(ValueError, match="lower-case word"):
        register_spec("Bad Prefix", "x", "x", load_toy)
    with pytest.raises(ValueError, match="no ':'"):
        register_name("a:b", "x", load_toy)


@pytest.mark.parametrize("spec, expected, deprecated", [
    ("ase:ase.calculators.emt:EMT", "ase:ase.calculators.emt:EMT", False),
    ("ase:ase.calculators.emt.EMT", "ase:ase.calculators.emt:EMT", True),  # labelling's old spelling
    ("ase.calculators.emt:EMT", "ase:ase.calculators.emt:EMT", True),  # --ensemble's old spelling
    ("orb:weights.ckpt", "orb:weights.ckpt", False),
    ("molecular-small", "molecular-small", False),
    ("no-such-thing", "no-such-thing", False),
])
def test_old_spellings_are_normalised_with_a_note(spec, expected, deprecated):
    canonical, note = normalise_spec(spec)
    assert canonical == expected and (note is not None) == deprecated
    if deprecated:
        assert "deprecated" in note and expected in note


def test_an_existing_file_wins_over_a_prefix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = make_native(seed=1).float()
    save_model(model, tmp_path / "ase:odd.pt")  # a file whose name looks like a spec
    assert normalise_spec("ase:odd.pt") == ("ase:odd.pt", None)
    loaded = resolve_model("ase:odd.pt")
    torch.testing.assert_close(loaded.reference_energies, model.reference_energies)


def test_every_form_resolves_to_a_model_with_its_source(tmp_path):
    path = save_model(make_native(seed=2).float(), tmp_path / "m.pt")
    assert resolve_model(str(path)).source == str(path)
    assert resolve_model().source.endswith(f"{registry.DEFAULT_MODEL}.pt")
    emt = resolve_model("ase:ase.calculators.emt:EMT")
    assert isinstance(emt, CalculatorModel) and emt.source == "ase:ase.calculators.emt:EMT"
    with pytest.raises(ModelFileError, match=r"nowhere.pt: neither a bundled model .*; a model is named by NAME \(a bundled model"):
        resolve_model(str(tmp_path / "nowhere.pt"))


def test_cli_help_and_option_use_the_one_resolver(capsys):
    from atomuq.cli.common import ensemble_help, model_help
    from atomuq.cli.ensemble_options import load_model_option

    for shown in (model_help(), ensemble_help()):  # plain text: the CLI's help is not rendered as markup
        assert "ase:MODULE:CLASS" in shown and "metatomic:PATH" in shown and "orb:PATH" in shown
    assert "pip install 'atomuq[orb]'" in model_help()
    assert "the bundled model that knows every element of the input" in model_help()
    assert f"Default: {registry.DEFAULT_MODEL}" in model_help(default=registry.DEFAULT_MODEL)
    model = load_model_option("ase.calculators.emt:EMT", "cpu")
    assert isinstance(model, CalculatorModel)
    assert "deprecated; write ase:ase.calculators.emt:EMT" in capsys.readouterr().err
