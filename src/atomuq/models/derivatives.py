"""Conservative forces, virial stress and the rotational gradient, by autograd, for any model.

One backward pass gives all three. Positions and cell are deformed by a per-structure matrix
(I + g): r' = r (I + g), h' = h (I + g), with r and h as row vectors. Then

- conservative forces  F_c = -dE/dr,
- virial stress        sigma = sym(dE/dg) / V   (ASE sign convention, eV/Å³),
- rotational gradient  Delta_rot = dE/dG at G = 0 for R = exp(G - G^T), which equals
  W - W^T with W = dE/dg (methods.md section 6); zero for a rotation-invariant model.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from atomuq.core.batch import Batch
from atomuq.models.protocol import AtomisticModel, ModelOutput

VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


@dataclass
class Prediction:
    """Model outputs plus the derived quantities (None where not requested or undefined).

    energy (B,) eV; forces_direct (N, 3) eV/Å; forces_conservative (N, 3) eV/Å;
    stress_direct (B, 6) eV/Å³; stress_virial (B, 6) eV/Å³ (zeros for non-periodic
    structures, see periodic); strain_derivative (B, 3, 3) eV, dE/dg;
    rotational_gradient (B, 3, 3) eV; node_features (N, F); confidence_logits (N, K).
    """

    energy: torch.Tensor
    forces_direct: torch.Tensor | None = None
    forces_conservative: torch.Tensor | None = None
    stress_direct: torch.Tensor | None = None
    stress_virial: torch.Tensor | None = None
    strain_derivative: torch.Tensor | None = None
    rotational_gradient: torch.Tensor | None = None
    node_features: torch.Tensor | None = None
    confidence_logits: torch.Tensor | None = None
    periodic: torch.Tensor | None = None

    def detach(self) -> "Prediction":
        """A copy with every tensor detached from the autograd graph."""
        return Prediction(**{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})


def to_voigt(matrix: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) -> (B, 6) in Voigt order xx, yy, zz, yz, xz, xy (symmetrised)."""
    sym = 0.5 * (matrix + matrix.transpose(1, 2))
    return torch.stack([sym[:, a, b] for a, b in VOIGT], dim=1)


def rotational_gradient_norm(prediction: Prediction) -> torch.Tensor:
    """(B,) Frobenius norm of Delta_rot in eV."""
    if prediction.rotational_gradient is None:
        raise ValueError("the rotational gradient was not computed: call evaluate(..., rotational=True)")
    return torch.linalg.matrix_norm(prediction.rotational_gradient)


def evaluate(
    model: AtomisticModel,
    batch: Batch,
    *,
    conservative: bool = True,
    stress: bool = False,
    rotational: bool = False,
    create_graph: bool = False,
    own_derivatives: bool = True,
) -> Prediction:
    """Run the model on a batch and add -dE/dr, the virial stress and Delta_rot as requested.

    create_graph=True keeps the graph of the derivatives (for losses on conservative forces
    and for gradients of the Force Delta). If batch.positions already requires grad (an outer
    optimisation), gradients flow through it. Otherwise a model with own_derivatives computes
    them itself (the native model: an exact backward over edge chunks, in linear memory), unless
    own_derivatives=False asks for autograd (equal to round-off, not to the bit).
    """
    if create_graph and not model.differentiable:
        raise ValueError(f"{model.source or type(model).__name__} has no second derivatives "
                         "(not a torch model): create_graph=True is not available")
    batch = batch.to(device=model.device, dtype=model.dtype)
    deform = stress or rotational
    needs_grad = conservative or deform
    if needs_grad and not create_graph and own_derivatives and model.own_derivatives and not (
            batch.positions.requires_grad or batch.cell.requires_grad):
        out, grad_positions, grad_strain = model.energy_derivatives(batch, strain=deform)
        grads = ([grad_positions] if conservative else []) + ([grad_strain] if deform else [])
        return _prediction(batch, out, grads, conservative, stress, rotational)
    with torch.enable_grad() if needs_grad else nullcontext():
        positions = batch.positions
        if conservative and not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        cell = batch.cell
        strain = None
        if deform:
            strain = torch.zeros_like(batch.cell).requires_grad_(True)
            deformed_positions = positions + torch.einsum("ni,nij->nj", positions, strain[batch.structure_index])
            cell = cell + torch.bmm(cell, strain)
        else:
            deformed_positions = positions
        out: ModelOutput = model(batch.replace(positions=deformed_positions, cell=cell))
        inputs = ([positions] if conservative else []) + ([strain] if deform else [])
        grads = []
        if inputs:
            grads = torch.autograd.grad(
                out.energy.sum(), inputs, create_graph=create_graph, retain_graph=create_graph, allow_unused=True
            )
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    return _prediction(batch, out, grads, conservative, stress, rotational)


def _prediction(batch: Batch, out: ModelOutput, grads: list[torch.Tensor], conservative: bool, stress: bool,
                rotational: bool) -> Prediction:
    """The Prediction from the model outputs and [dE/dr if conservative] + [dE/dg if stress or rotational]."""
    deform = stress or rotational
    prediction = Prediction(
        energy=out.energy,
        forces_direct=out.forces,
        stress_direct=out.stress,
        node_features=out.node_features,
        confidence_logits=out.confidence_logits,
        periodic=batch.pbc.all(dim=1),
    )
    if conservative:
        prediction.forces_conservative = -grads[0]
    if deform:
        w = grads[-1]
        prediction.strain_derivative = w
        if stress:
            volume = torch.linalg.det(batch.cell).abs()
            periodic = prediction.periodic
            safe_volume = torch.where(periodic, volume, torch.ones_like(volume))
            prediction.stress_virial = to_voigt(w) / safe_volume[:, None] * periodic[:, None]
        if rotational:
            prediction.rotational_gradient = w - w.transpose(1, 2)
    return prediction
