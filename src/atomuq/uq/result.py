"""The common shape of every UQ method's output."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class UQResult:
    """Named per-atom (N,) and per-structure (B,) tensors; units[name] gives each unit.

    Every score is oriented so that higher means less trusted.
    """

    per_atom: dict[str, torch.Tensor] = field(default_factory=dict)
    per_structure: dict[str, torch.Tensor] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
