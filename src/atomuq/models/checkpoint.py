"""Saving and loading native models: one file with weights, config, elements, reference energies and version.

save_payload / read_payload write and read every kind of atomuq model file (native, orb, fairchem): a dict with
the format name, the atomuq version, what the kind needs to rebuild the model and its weights on the CPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

import atomuq
from atomuq.core.errors import ModelFileError
from atomuq.core.io import atomic_path
from atomuq.models.native import NativeConfig, NativeModel

FORMAT = "atomuq-model"
FORMAT_VERSION = 1
REQUIRED = ("format", "format_version", "atomuq_version", "architecture", "config", "elements",
            "reference_energies", "state_dict", "training_data_hash", "metadata")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (hex, 16 chars) of the model's state dict values, to tie fitted estimators to exact weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_payload(path: str | Path, file_format: str, weights: torch.nn.Module, **fields: Any) -> Path:
    """Write a model file atomically with torch.save: {format, atomuq_version, **fields, state_dict} where
    state_dict is weights' state dict, detached, on the CPU."""
    path = Path(path)
    payload = {
        "format": file_format,
        "atomuq_version": atomuq.__version__,
        **fields,
        "state_dict": {k: v.detach().cpu() for k, v in weights.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_payload(path: str | Path, what: str = "model file", hint: str = "") -> Any:
    """torch.load (weights only, to the CPU) of a model file; ModelFileError '<path>: <what> not found<hint>' or
    'not a readable <what>' otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: {what} not found{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise ModelFileError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from exc


#: the hint of a missing third-party weights file
NO_DOWNLOADS = " (atomuq never downloads weights: give a local file)"


def save_model(model: NativeModel, path: str | Path, training_data_hash: str = "", metadata: dict[str, Any] | None = None) -> Path:
    """Write the model atomically to path (a .pt file)."""
    return save_payload(
        path, FORMAT, model,
        format_version=FORMAT_VERSION,
        architecture="native",
        config=model.config.to_dict(),
        elements=list(model.elements),
        reference_energies=model.reference_energies.detach().cpu().double().tolist(),
        training_data_hash=training_data_hash,
        metadata=dict(metadata or {}),
    )


def _check(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise ModelFileError(f"{path}: {message}")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> NativeModel:
    """Load a model file written by save_model, checking every part of it."""
    path = Path(path)
    payload = read_payload(path)
    _check(isinstance(payload, dict), path, "not an atomuq model file (no header)")
    missing = [k for k in REQUIRED if k not in payload]
    _check(not missing, path, f"missing fields {missing}; was it written by atomuq.models.checkpoint.save_model?")
    _check(payload["format"] == FORMAT, path, f"format is {payload['format']!r}, expected {FORMAT!r}")
    _check(payload["format_version"] <= FORMAT_VERSION, path,
           f"format version {payload['format_version']} is newer than this atomuq ({FORMAT_VERSION}); upgrade atomuq")
    _check(payload["architecture"] == "native", path, f"unknown architecture {payload['architecture']!r}")
    try:
        config = NativeConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: invalid config: {exc}") from exc
    _check(list(config.elements) == list(payload["elements"]), path,
           f"element list {payload['elements']} disagrees with the config's {list(config.elements)}")
    refs = torch.tensor(payload["reference_energies"], dtype=torch.float64)
    _check(refs.shape == (len(config.elements),) and bool(torch.isfinite(refs).all()), path,
           f"reference energies must be {len(config.elements)} finite numbers, got {payload['reference_energies']}")
    model = NativeModel(config)
    state = payload["state_dict"]
    _check(torch.allclose(state.get("reference_energies", refs).double(), refs, atol=1e-6), path,
           "reference energies in the header disagree with the weights")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not match the config: {exc}") from exc
    for name, tensor in state.items():
        _check(bool(torch.isfinite(tensor).all()) if tensor.is_floating_point() else True, path,
               f"weight {name} contains NaN or infinity")
    model.training_data_hash = payload["training_data_hash"]
    model.metadata = payload["metadata"]
    model.source = str(path)
    return model.to(device).eval()
