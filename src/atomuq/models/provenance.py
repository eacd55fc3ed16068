"""Who made a result: a model's name and weights fingerprint, as every output records them (core.schema.Provenance)."""

from __future__ import annotations

import torch

from atomuq.core.schema import Provenance
from atomuq.models.checkpoint import weights_fingerprint
from atomuq.models.protocol import AtomisticModel


def model_name(model: AtomisticModel, name: str | None = None) -> str:
    """The name outputs record for a model: the one given, else its source (file or spec), else its class."""
    return name or str(model.source or type(model).__name__)


def model_provenance(model: AtomisticModel, name: str | None = None) -> Provenance:
    """Provenance of results made with model: its name (model_name) and weights fingerprint ('none' without weights)."""
    fingerprint = weights_fingerprint(model) if isinstance(model, torch.nn.Module) else "none"
    return Provenance(model=model_name(model, name), model_fingerprint=fingerprint)
