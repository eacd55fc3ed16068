"""Training loss terms: Huber on energy per atom, forces and stress, equigrad, confidence cross-entropy.

Each term is a small function on tensors of one batch; `compute_losses` combines the terms
with the weights of a `LossConfig`. Units of the terms (before weighting): Huber terms are
in the unit of their quantity (eV/atom, eV/Å, eV/Å³) because Huber(x) = x²/2 for |x| ≤ δ
and δ(|x| − δ/2) above; the equigrad term is in eV²; the confidence term is in nats.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from atomuq.models.derivatives import Prediction
from atomuq.uq.confidence import error_bins
from atomuq.workflows.toml_config import FieldError

#: names of the loss terms, in the order they are reported
TERMS = ("energy", "forces", "conservative_forces", "stress", "conservative_stress", "equigrad", "confidence")


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms (dimensionless) and the Huber threshold delta (in each term's unit).

    energy: energy per atom (eV/atom); forces: direct forces (eV/Å); conservative_forces:
    −dE/dr (eV/Å; on for "conservative fine-tuning"); stress: the direct stress head (eV/Å³);
    conservative_stress: the virial stress (eV/Å³); both stress terms use periodic structures
    with stress labels only; equigrad: λ for mean ‖Δ_rot‖² (eV²); confidence: cross-entropy of
    the confidence head against the binned direct-force errors.
    """

    huber_delta: float = 0.01
    energy: float = 1.0
    forces: float = 1.0
    conservative_forces: float = 0.0
    stress: float = 0.0
    conservative_stress: float = 0.0
    equigrad: float = 0.0
    confidence: float = 1.0

    def __post_init__(self) -> None:
        if not self.huber_delta > 0:
            raise FieldError("huber_delta", f"must be positive, got {self.huber_delta}")
        for f in fields(self):
            if f.name != "huber_delta" and not getattr(self, f.name) >= 0:
                raise FieldError(f.name, f"must be a weight >= 0, got {getattr(self, f.name)}")
        fitted = ("energy", "forces", "conservative_forces", "stress", "conservative_stress")
        if all(getattr(self, name) == 0 for name in fitted):
            raise FieldError("", f"at least one of the weights {', '.join(fitted)} must be > 0")

    @property
    def needs_conservative(self) -> bool:
        """True when a term needs −dE/dr with its graph kept."""
        return self.conservative_forces > 0

    @property
    def needs_virial(self) -> bool:
        """True when a term needs the virial stress with its graph kept."""
        return self.conservative_stress > 0

    @property
    def needs_rotational(self) -> bool:
        """True when the equigrad term is on."""
        return self.equigrad > 0


@dataclass
class Targets:
    """Reference labels of one batch of B structures and N atoms.

    energy: (B,) eV (meaningful where has_energy); forces: (N, 3) eV/Å; stress: (B, 6) eV/Å³
    Voigt (xx, yy, zz, yz, xz, xy), meaningful where stress_mask (periodic and labelled);
    n_atoms: (B,); force_weights: (N,) per-atom weights of the force terms, or None (all 1).
    """

    energy: torch.Tensor
    has_energy: bool
    forces: torch.Tensor
    stress: torch.Tensor
    stress_mask: torch.Tensor
    n_atoms: torch.Tensor
    force_weights: torch.Tensor | None = None


def huber(prediction: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    """Mean Huber loss over all elements, in the unit of the inputs (δ in the same unit)."""
    return F.huber_loss(prediction, target, reduction="mean", delta=delta)


def energy_loss(energy: torch.Tensor, target: torch.Tensor, n_atoms: torch.Tensor, delta: float) -> torch.Tensor:
    """Huber loss on the energy per atom (energies in eV, result in eV/atom)."""
    n = n_atoms.to(energy.dtype)
    return huber(energy / n, target.to(energy.dtype) / n, delta)


def forces_loss(forces: torch.Tensor, target: torch.Tensor, delta: float, weights: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Huber loss over force components (eV/Å), each atom's three components scaled by weights (N,) if given."""
    if weights is None:
        return huber(forces, target.to(forces.dtype), delta)
    per_component = F.huber_loss(forces, target.to(forces.dtype), reduction="none", delta=delta)
    return (per_component * weights.to(forces.dtype)[:, None]).mean()


def stress_loss(stress: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, delta: float) -> torch.Tensor:
    """Huber loss over the Voigt components (eV/Å³) of the structures in mask; 0 when mask is empty."""
    if not bool(mask.any()):
        return stress.sum() * 0.0
    return huber(stress[mask], target[mask].to(stress.dtype), delta)


def equigrad_loss(rotational_gradient: torch.Tensor) -> torch.Tensor:
    """Mean over structures of the squared Frobenius norm of Δ_rot (B, 3, 3) eV, in eV²."""
    return rotational_gradient.square().sum(dim=(1, 2)).mean()


def force_error_norm(forces: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) per-atom force-error norms ‖F − F_ref‖₂ in eV/Å."""
    return torch.linalg.vector_norm(forces - target.to(forces.dtype), dim=-1)


def confidence_loss(logits: torch.Tensor, forces: torch.Tensor, target: torch.Tensor, edges: torch.Tensor,
                    max_error: float) -> torch.Tensor:
    """Cross-entropy (nats, mean over atoms) of the confidence logits against the bin of each atom's
    detached direct-force error (eV/Å), errors capped at max_error so they fall in the last bin."""
    errors = force_error_norm(forces.detach(), target).clamp(max=max_error)
    bins = error_bins(errors, edges)
    return F.cross_entropy(logits, bins)


def compute_losses(prediction: Prediction, targets: Targets, config: LossConfig, confidence_edges: torch.Tensor | None,
                   confidence_max_error: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted total loss and the unweighted terms that have a non-zero weight."""
    delta = config.huber_delta
    terms: dict[str, torch.Tensor] = {}
    if config.energy > 0:
        terms["energy"] = energy_loss(prediction.energy, targets.energy, targets.n_atoms, delta)
    if config.forces > 0:
        terms["forces"] = forces_loss(_need(prediction.forces_direct, "forces", "a direct force head"), targets.forces, delta,
                                      targets.force_weights)
    if config.conservative_forces > 0:
        terms["conservative_forces"] = forces_loss(
            _need(prediction.forces_conservative, "conservative_forces", "evaluate(conservative=True)"), targets.forces, delta,
            targets.force_weights)
    if config.stress > 0:
        terms["stress"] = stress_loss(_need(prediction.stress_direct, "stress", "a direct stress head (model.direct_stress = true)"),
                                      targets.stress, targets.stress_mask, delta)
    if config.conservative_stress > 0:
        terms["conservative_stress"] = stress_loss(
            _need(prediction.stress_virial, "conservative_stress", "evaluate(stress=True)"), targets.stress, targets.stress_mask, delta)
    if config.equigrad > 0:
        terms["equigrad"] = equigrad_loss(_need(prediction.rotational_gradient, "equigrad", "evaluate(rotational=True)"))
    if config.confidence > 0:
        logits = _need(prediction.confidence_logits, "confidence", "a confidence head")
        forces = _need(prediction.forces_direct, "confidence", "a direct force head")
        if confidence_edges is None:
            raise ValueError("loss.confidence > 0 needs a model with confidence_bin_edges")
        terms["confidence"] = confidence_loss(logits, forces, targets.forces, confidence_edges, confidence_max_error)
    total = sum(getattr(config, name) * value for name, value in terms.items())
    return total, terms


def _need(value: torch.Tensor | None, term: str, what: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"loss.{term} > 0 needs {what}; set loss.{term} = 0 or change the model")
    return value
