"""Model files: round trip, and a clear error for every kind of broken file."""

import pytest
import torch

import atomuq

from atomuq.core.batch import Batch
from atomuq.core.errors import ModelFileError
from atomuq.models.checkpoint import NO_DOWNLOADS, load_model, read_payload, save_model, save_payload, weights_fingerprint
from atomuq.models.derivatives import evaluate
from atomuq.models.registry import DEFAULT_MODEL, bundled_models, resolve_model
from conftest import copper_cell, ethanol, make_native


def test_round_trip_gives_identical_predictions(tmp_path):
    model = make_native(seed=3, direct_stress=True, max_neighbors=12).float()
    path = save_model(model, tmp_path / "m.pt", training_data_hash="abc", metadata={"epochs": 3})
    loaded = load_model(path)
    assert loaded.config == model.config
    assert loaded.training_data_hash == "abc" and loaded.metadata == {"epochs": 3}
    assert weights_fingerprint(loaded) == weights_fingerprint(model)
    batch = Batch.from_atoms([ethanol(), copper_cell()])
    a, b = evaluate(model, batch, stress=True), evaluate(loaded, batch, stress=True)
    for name in ("energy", "forces_direct", "forces_conservative", "stress_direct", "confidence_logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(loaded.reference_energies, model.reference_energies)


def corrupt(tmp_path, change):
    path = save_model(make_native().float(), tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("state_dict"), "missing fields"),
    (lambda p: p.update(format="something-else"), "format is"),
    (lambda p: p.update(format_version=99), "newer than this atomuq"),
    (lambda p: p.update(elements=[1, 6]), "element list"),
    (lambda p: p.update(reference_energies=[0.0]), "reference energies must be"),
    (lambda p: p["config"].update(bogus=1), "unknown native-model config keys"),
    (lambda p: p["config"].update(latent=48), "weights do not match"),
    (lambda p: p["state_dict"]["embedding.weight"].fill_(float("nan")), "NaN"),
    (lambda p: p.update(reference_energies=[9.0] * 6), "disagree with the weights"),
])
def test_broken_files_are_rejected_with_a_clear_message(tmp_path, change, message):
    path = corrupt(tmp_path, change)
    with pytest.raises(ModelFileError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_garbage_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not a readable model file"):
        load_model(garbage)
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(ModelFileError, match="neither a bundled model"):
        resolve_model("no-such-model")


def test_bundled_default_model_loads():
    assert DEFAULT_MODEL in bundled_models()
    model = resolve_model()
    assert model.has_direct_forces and model.has_confidence


def test_every_model_file_kind_is_written_and_read_by_one_pair_of_helpers(tmp_path):
    """save_payload / read_payload (native, orb and fairchem files): header, fields, CPU weights; errors name the file."""
    weights = torch.nn.Linear(3, 2).double()
    path = save_payload(tmp_path / "w.pt", "atomuq-test", weights, radius=5.0, task="omol")
    payload = read_payload(path, "test file")
    assert payload["format"] == "atomuq-test" and payload["atomuq_version"] == atomuq.__version__
    assert payload["radius"] == 5.0 and payload["task"] == "omol"
    assert all(torch.equal(payload["state_dict"][k], v) for k, v in weights.state_dict().items())
    assert not any(v.requires_grad for v in payload["state_dict"].values())
    with pytest.raises(ModelFileError, match=f"{tmp_path / 'none.pt'}: orb weights file not found" + r" \(atomuq never"):
        read_payload(tmp_path / "none.pt", "orb weights file", NO_DOWNLOADS)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ModelFileError, match="bad.pt: not a readable fairchem model file"):
        read_payload(tmp_path / "bad.pt", "fairchem model file")
