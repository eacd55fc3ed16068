"""Deprecated: ensemble members are named and loaded like any model, by atomuq.models.registry.resolve_model.

Kept so that old imports keep working; new code calls resolve_model (or, in the CLI,
atomuq.cli.ensemble_options.load_ensemble).
"""

from __future__ import annotations

import torch

from atomuq.models.protocol import AtomisticModel
from atomuq.models.registry import resolve_model


def resolve_member(spec: str, device: str | torch.device = "cpu") -> AtomisticModel:
    """Deprecated alias of resolve_model: any model spec (bundled name, file, orb:, metatomic:, ase:MODULE:CLASS)."""
    return resolve_model(spec, device=device)
