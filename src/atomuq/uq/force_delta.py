"""The Force Delta (methods.md section 1): disagreement of a model's direct and conservative forces.

u_i = |F_nc,i - F_c,i| (eV/Å) per atom; U_Delta = sqrt(sum_i u_i^2 / 3N) per structure (eV/Å);
the stress delta is the RMS over the 6 Voigt components of direct minus virial stress (eV/Å³);
eps_nc and eps_c are the RMS errors of the direct and conservative forces against reference
forces (eV/Å). Atoms held fixed by FixAtoms constraints can be left out of the structure averages.
All differentiable, so the adversarial search can take gradients of U_Delta.
"""

from __future__ import annotations

import torch

from atomuq.core.batch import Batch, scatter_sum
from atomuq.models.derivatives import Prediction
from atomuq.uq.result import UQResult


def structure_rms(per_atom_sq: torch.Tensor, batch: Batch, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) sqrt(sum_i x_i / 3N_b) over a structure's counted atoms, x_i a squared per-atom 3-vector norm."""
    weights = torch.ones_like(per_atom_sq) if mask is None else mask.to(per_atom_sq.dtype)
    total = scatter_sum(per_atom_sq * weights, batch.structure_index, batch.num_structures)
    count = scatter_sum(weights, batch.structure_index, batch.num_structures)
    if (count == 0).any():
        empty = torch.nonzero(count == 0).flatten().tolist()
        raise ValueError(f"structures {empty} have no counted atoms (all fixed?); use exclude_fixed=False")
    return torch.sqrt(total / (3.0 * count))


def force_delta(
    prediction: Prediction,
    batch: Batch,
    reference_forces: torch.Tensor | None = None,
    exclude_fixed: bool = True,
) -> UQResult:
    """Per-atom u_i, per-structure U_Delta and the largest u_i (eV/Å), the stress delta (eV/Å³), and eps_nc / eps_c
    given reference forces (N, 3) eV/Å."""
    if prediction.forces_direct is None:
        raise ValueError("the Force Delta needs a direct force head; this model is conservative-only")
    if prediction.forces_conservative is None:
        raise ValueError("the Force Delta needs conservative forces: evaluate(..., conservative=True)")
    mask = ~batch.fixed if exclude_fixed and bool(batch.fixed.any()) else None
    diff_sq = ((prediction.forces_direct - prediction.forces_conservative) ** 2).sum(-1)
    result = UQResult()
    u = torch.sqrt(diff_sq)
    result.per_atom["force_delta"] = u
    result.per_structure["force_delta"] = structure_rms(diff_sq, batch, mask)
    result.per_structure["force_delta_max"] = u.new_zeros(batch.num_structures).scatter_reduce(
        0, batch.structure_index, u, reduce="amax", include_self=False)
    if prediction.stress_direct is not None and prediction.stress_virial is not None:
        delta = prediction.stress_direct - prediction.stress_virial
        result.per_structure["force_delta_stress"] = torch.sqrt((delta**2).mean(-1))
    if reference_forces is not None:
        reference_forces = reference_forces.to(prediction.forces_direct)
        for name, forces in (("eps_nc", prediction.forces_direct), ("eps_c", prediction.forces_conservative)):
            err_sq = ((forces - reference_forces) ** 2).sum(-1)
            result.per_atom[name] = torch.sqrt(err_sq)
            result.per_structure[name] = structure_rms(err_sq, batch, mask)
    return result
