"""The one interface every model implements (native model and adapters alike)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from atomuq.core.batch import Batch
from atomuq.core.errors import ModelError


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

    Every attribute below is part of the protocol: code reads it directly, never with a
    fallback. Subclasses override the defaults that do not hold for them (as class or
    instance attributes, or as properties); tests/test_conformance.py checks each model kind.
    """

    #: interaction cutoff in Å (0.0 when the model has none, e.g. an ASE calculator)
    cutoff: float = 0.0
    #: supported atomic numbers, or None for any element
    elements: Sequence[int] | None = None
    #: where the model came from (a model file, or the spec it was resolved from, e.g.
    #: "orb:orb-v3-direct:weights.ckpt"); "" for a model built in memory
    source: str = ""
    #: True when second derivatives are available by autograd (create_graph=True in
    #: derivatives.evaluate: losses on conservative forces, gradients of the Force Delta);
    #: False for models whose energy is not a torch function (an ASE calculator)
    differentiable: bool = True
    #: True when the forces are computed outside torch by another program (an ASE calculator)
    #: and come back as forces_conservative: the model has one kind of forces, so ensembles use
    #: them in direct and conservative force mode alike
    external_forces: bool = False
    #: True when the model computes dE/dr and dE/dg itself, by an exact backward of its own
    #: (energy_derivatives); derivatives.evaluate then uses it wherever no graph of the derivatives
    #: is asked for (create_graph=False) and autograd otherwise. Setting it False on an instance
    #: makes evaluate use autograd (the reference the own backward is tested against).
    own_derivatives: bool = False

    @property
    def confidence_bin_edges(self) -> torch.Tensor | None:
        """(K+1,) edges in eV/Å of the confidence head's per-atom force-error bins, or None without a head.

        Setting it stores a persistent buffer named confidence_bin_edges (saved in the state dict).
        """
        return self._buffers.get("confidence_bin_edges")

    @confidence_bin_edges.setter
    def confidence_bin_edges(self, edges: torch.Tensor | None) -> None:
        # register_buffer refuses a name the class already defines, so the buffer is stored directly
        self._buffers["confidence_bin_edges"] = edges
        self._non_persistent_buffers_set.discard("confidence_bin_edges")

    @property
    def has_direct_forces(self) -> bool:
        """True when the model predicts forces with its own head (ModelOutput.forces, eV/Å)."""
        return False

    @property
    def has_direct_stress(self) -> bool:
        """True when the model predicts stress with its own head (ModelOutput.stress, eV/Å³)."""
        return False

    @property
    def has_confidence(self) -> bool:
        """True when the model has a per-atom confidence head (logits over confidence_bin_edges)."""
        return self.confidence_bin_edges is not None

    @property
    def has_node_features(self) -> bool:
        """True when forward returns per-atom node features (ModelOutput.node_features, for LTAU)."""
        return False

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype the model computes in: that of its parameters (float32 when there are none)."""
        for p in self.parameters():
            return p.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        """Device of the parameters (the CPU when there are none); batches are moved there."""
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def __call__(self, batch: Batch, *args: Any, **kwargs: Any) -> ModelOutput:
        """forward(batch), checked: when derivatives are wanted (grad mode on and batch.positions or batch.cell
        requiring grad, as in derivatives.evaluate), an energy that autograd cannot trace back to them is refused
        with a ModelError naming the model (torch's own error would be a bare RuntimeError)."""
        out = super().__call__(batch, *args, **kwargs)
        wanted = torch.is_grad_enabled() and (batch.positions.requires_grad or batch.cell.requires_grad)
        if wanted and not out.energy.requires_grad:
            name = self.source or type(self).__name__
            raise ModelError(
                f"{name}: its energy has no autograd graph back to the atom positions and cell, so conservative "
                "forces, stress, the Force Delta and the rotational gradient cannot be taken; the model must compute "
                "its edge vectors from batch.positions and batch.cell with torch operations (atomuq.models.protocol), "
                "or a model outside torch can be wrapped as an ASE calculator (ase:MODULE:CLASS)")
        return out

    def energy_derivatives(self, batch: Batch, strain: bool) -> tuple[ModelOutput, torch.Tensor, torch.Tensor | None]:
        """The forward outputs, dE/dr (N, 3) eV/Å and, with strain, dE/dg (B, 3, 3) eV for the deformation
        r' = r (I + g), cell' = cell (I + g), without graphs; only for models with own_derivatives."""
        raise NotImplementedError(f"{type(self).__name__} has no own derivatives (own_derivatives is False)")

    def forward(self, batch: Batch) -> ModelOutput:  # pragma: no cover - abstract
        """Energy (B,) eV and whatever heads the model has, for a batch of structures."""
        raise NotImplementedError
