"""Bundled models shipped inside the package, and resolving a model name or path."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from atomuq.core.errors import ModelFileError
from atomuq.models.checkpoint import load_model
from atomuq.models.protocol import AtomisticModel

DEFAULT_MODEL = "molecular-small"


def bundled_dir() -> Path:
    """Folder holding the bundled model files."""
    return Path(str(resources.files("atomuq") / "data" / "models"))


def bundled_models() -> dict[str, Path]:
    """Name -> path of every bundled model file."""
    folder = bundled_dir()
    return {p.stem: p for p in sorted(folder.glob("*.pt"))} if folder.is_dir() else {}


def resolve_model(name_or_path: str | None = None, device: str | torch.device = "cpu") -> AtomisticModel:
    """Load a bundled model by name, or a model file by path (default: the bundled default)."""
    name = name_or_path or DEFAULT_MODEL
    models = bundled_models()
    if name in models:
        return load_model(models[name], device=device)
    path = Path(name)
    if path.exists():
        return load_model(path, device=device)
    raise ModelFileError(
        f"{name}: neither a bundled model ({', '.join(models) or 'none installed'}) nor an existing model file"
    )
