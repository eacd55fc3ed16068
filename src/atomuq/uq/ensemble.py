"""Ensemble disagreement (methods.md section 3), the baseline the single-model methods are compared with.

Members are atomuq models of any kind, named by the one model spec (atomuq.models.registry):
direct forces by default, or conservative -dE/dr; a model whose forces come from an ASE
calculator (external_forces) contributes the calculator's own forces in either mode. An ASE
calculator object given directly is wrapped as such a model. With F_m,ic the force component c
of atom i from member m:

- per atom: ensemble_std_i = sqrt( (1/3) Σ_c Var_m F_m,ic )  (RMS over xyz of the per-component
  standard deviation, eV/Å),
- per structure: ensemble_std = sqrt( (1/3N) Σ_i Σ_c Var_m F_m,ic )  (eV/Å), the RMS of the per-atom
  values, and ensemble_energy_std = std_m of the energies (eV),
- Var_m with ddof=0 (the population variance over the M members, as numpy's default) unless asked
  otherwise; it predicts the error of the ensemble-mean force, given as eps_ensemble against
  reference forces (RMS over components, like eps_nc).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from ase.calculators.calculator import BaseCalculator

from atomuq.core.batch import Batch
from atomuq.core.errors import InputError
from atomuq.models.adapters.ase_calculator import CalculatorModel
from atomuq.models.derivatives import evaluate
from atomuq.models.protocol import AtomisticModel
from atomuq.uq.force_delta import structure_rms
from atomuq.uq.result import UQResult

FORCE_MODES = ("direct", "conservative")

Member = AtomisticModel | BaseCalculator


@dataclass
class EnsemblePrediction:
    """Every member's energies (M, B) eV and forces (M, N, 3) eV/Å, float64."""

    energy: torch.Tensor
    forces: torch.Tensor

    @property
    def mean_forces(self) -> torch.Tensor:
        """(N, 3) ensemble-mean forces, eV/Å."""
        return self.forces.mean(dim=0)

    @property
    def mean_energy(self) -> torch.Tensor:
        """(B,) ensemble-mean energies, eV."""
        return self.energy.mean(dim=0)


def member_models(members: Sequence[Member]) -> list[AtomisticModel]:
    """The members as atomuq models: an ASE calculator object is wrapped as a CalculatorModel."""
    return [m if isinstance(m, AtomisticModel) else CalculatorModel(m) for m in members]


def member_name(member: AtomisticModel, names: Sequence[str] | None, m: int) -> str:
    """How member m is named in messages: its spec when given, else where it came from."""
    if names is not None:
        return names[m]
    return member.source or type(member).__name__


def check_members(members: Sequence[Member], numbers: set[int], forces: str = "direct", names: Sequence[str] | None = None) -> None:
    """Raise InputError if fewer than 2 members, an unknown force mode, a member lacking a direct head
    in direct mode (a calculator's own forces count for either mode), or a member that does not know
    an element among `numbers`."""
    from ase.data import chemical_symbols

    if forces not in FORCE_MODES:
        raise InputError(f"ensemble forces must be one of {', '.join(FORCE_MODES)}, got {forces!r}")
    if len(members) < 2:
        raise InputError(f"an ensemble needs at least 2 members, got {len(members)}")
    for m, member in enumerate(member_models(members)):
        name = member_name(member, names, m)
        if forces == "direct" and not member.has_direct_forces and not member.external_forces:
            raise InputError(f"ensemble member {name} has no direct force head; use conservative ensemble forces")
        if member.elements is not None:
            missing = sorted(numbers - {int(z) for z in member.elements})
            if missing:
                raise InputError(
                    f"ensemble member {name} does not know element(s) "
                    f"{', '.join(chemical_symbols[z] for z in missing)} present in the structures "
                    f"(it knows {' '.join(chemical_symbols[int(z)] for z in member.elements)})"
                )


def evaluate_ensemble(
    members: Sequence[Member], batch: Batch, forces: str = "direct", names: Sequence[str] | None = None
) -> EnsemblePrediction:
    """Energies and forces of every member on the batch: direct or conservative (-dE/dr) forces of atomuq
    models, a calculator's own forces in either mode."""
    check_members(members, set(batch.numbers.unique().tolist()), forces, names)
    energy, force = [], []
    for member in member_models(members):
        direct = forces == "direct" and not member.external_forces
        pred = evaluate(member, batch, conservative=not direct)
        f = pred.forces_direct if direct else pred.forces_conservative
        energy.append(pred.energy.detach().to(device=batch.device, dtype=torch.float64))
        force.append(f.detach().to(device=batch.device, dtype=torch.float64))
    return EnsemblePrediction(energy=torch.stack(energy), forces=torch.stack(force))


def ensemble_uncertainty(
    prediction: EnsemblePrediction, batch: Batch, reference_forces: torch.Tensor | None = None, ddof: int = 0, exclude_fixed: bool = True
) -> UQResult:
    """Per-atom and per-structure ensemble_std (eV/Å), ensemble_energy_std (eV), and eps_ensemble given
    reference forces (N, 3) eV/Å; Var_m uses ddof (0: population variance)."""
    m = prediction.forces.shape[0]
    if m - ddof < 1:
        raise InputError(f"ddof={ddof} needs more than {ddof} members, got {m}")
    variance_sum = prediction.forces.var(dim=0, correction=ddof).sum(-1)  # Σ_c Var_m F_m,ic, (N,)
    mask = ~batch.fixed if exclude_fixed and bool(batch.fixed.any()) else None
    result = UQResult()
    result.per_atom["ensemble_std"] = torch.sqrt(variance_sum / 3.0)
    result.per_structure["ensemble_std"] = structure_rms(variance_sum, batch, mask)
    result.per_structure["ensemble_energy_std"] = prediction.energy.std(dim=0, correction=ddof)
    if reference_forces is not None:
        err_sq = ((prediction.mean_forces - reference_forces.to(prediction.forces)) ** 2).sum(-1)
        result.per_atom["eps_ensemble"] = torch.sqrt(err_sq)
        result.per_structure["eps_ensemble"] = structure_rms(err_sq, batch, mask)
    return result
