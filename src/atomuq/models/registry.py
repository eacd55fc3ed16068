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


#: third-party model specs PREFIX:REST, resolved by atomuq.models.adapters (imported only when used)
ADAPTER_SPECS = {
    "orb": "orb:PATH or orb:ARCHITECTURE:PATH (orb-models weights file)",
    "metatomic": "metatomic:PATH (exported metatomic model, e.g. PET-MAD / UPET)",
    "ase": "ase:MODULE:CLASS (an ASE calculator class, built without arguments)",
}


def resolve_adapter(spec: str, device: str | torch.device = "cpu") -> AtomisticModel:
    """Load a third-party model from a spec of ADAPTER_SPECS."""
    prefix, _, rest = spec.partition(":")
    if not rest:
        raise ModelFileError(f"{spec}: expected {ADAPTER_SPECS[prefix]}")
    if prefix == "orb":
        from atomuq.models.adapters.orb import load_orb

        path = Path(rest)
        architecture, sep, tail = rest.partition(":")
        if not path.exists() and sep:
            return load_orb(tail, architecture, device=device)
        return load_orb(path, device=device)
    if prefix == "metatomic":
        from atomuq.models.adapters.metatomic import load_metatomic

        return load_metatomic(rest, device=device)
    from atomuq.models.adapters.ase_calculator import calculator_model

    return calculator_model(rest)


def resolve_model(name_or_path: str | None = None, device: str | torch.device = "cpu") -> AtomisticModel:
    """Load a bundled model by name, a model file by path, or a third-party model by spec (ADAPTER_SPECS)."""
    name = name_or_path or DEFAULT_MODEL
    if name.partition(":")[0] in ADAPTER_SPECS and not Path(name).exists():
        return resolve_adapter(name, device=device)
    models = bundled_models()
    if name in models:
        return load_model(models[name], device=device)
    path = Path(name)
    if path.exists():
        return load_model(path, device=device)
    raise ModelFileError(
        f"{name}: neither a bundled model ({', '.join(models) or 'none installed'}) nor an existing model file "
        f"nor a third-party spec ({'; '.join(ADAPTER_SPECS.values())})"
    )
