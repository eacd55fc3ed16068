"""The one interface every model implements (native model and adapters alike)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from atomuq.core.batch import Batch


@dataclass
class ModelOutput:
    """What a model's forward pass returns for a batch of B structures and N atoms.

    energy: (B,) eV. forces: (N, 3) eV/Å from a direct force head, or None.
    stress: (B, 6) eV/Å³ Voigt (xx, yy, zz, yz, xz, xy) from a direct stress head, or None.
    node_features: (N, F) per-atom features of the last message-passing layer, or None.
    confidence_logits: (N, K) logits over K force-error bins, or None.
    """

    energy: torch.Tensor
    forces: torch.Tensor | None = None
    stress: torch.Tensor | None = None
    node_features: torch.Tensor | None = None
    confidence_logits: torch.Tensor | None = None


class AtomisticModel(torch.nn.Module):
    """Base class of all models: forward(batch) -> ModelOutput.

    The model must compute its edge vectors from batch.positions and batch.cell with torch
    operations, so that conservative forces, virial stress and the rotational gradient can be
    taken by autograd in atomuq.models.derivatives (the one place they are computed).
    Subclasses set: cutoff (Å), elements (supported atomic numbers, or None for any),
    and confidence_bin_edges ((K+1,) eV/Å) if they have a confidence head.
    """

    cutoff: float = 0.0
    elements: Sequence[int] | None = None

    @property
    def has_direct_forces(self) -> bool:
        """True when the model predicts forces with its own head."""
        return False

    @property
    def has_direct_stress(self) -> bool:
        """True when the model predicts stress with its own head."""
        return False

    @property
    def has_confidence(self) -> bool:
        """True when the model has a per-atom confidence head."""
        return getattr(self, "confidence_bin_edges", None) is not None

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the parameters (float32 when there are none)."""
        for p in self.parameters():
            return p.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def forward(self, batch: Batch) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError
