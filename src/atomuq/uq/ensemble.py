"""Ensemble disagreement (methods.md section 3), the baseline the single-model methods are compared with.

Members are atomuq models (direct forces by default, or conservative -dE/dr) or ASE calculators
(whatever forces they compute). With F_m,ic the force component c of atom i from member m:

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

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import BaseCalculator

from atomuq.core.batch import Batch
from atomuq.core.errors import InputError
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


def member_name(member: Member, names: Sequence[str] | None, m: int) -> str:
    """How member m is named in messages."""
    if names is not None:
        return names[m]
    return str(getattr(member, "source", type(member).__name__))


def check_members(members: Sequence[Member], numbers: set[int], forces: str = "direct", names: Sequence[str] | None = None) -> None:
    """Raise InputError if fewer than 2 members, an unknown force mode, a member lacking a direct head
    in direct mode, or a member that does not know an element among `numbers`."""
    from ase.data import chemical_symbols

    if forces not in FORCE_MODES:
        raise InputError(f"ensemble forces must be one of {', '.join(FORCE_MODES)}, got {forces!r}")
    if len(members) < 2:
        raise InputError(f"an ensemble needs at least 2 members, got {len(members)}")
    for m, member in enumerate(members):
        if not isinstance(member, AtomisticModel):
            continue
        name = member_name(member, names, m)
        if forces == "direct" and not member.has_direct_forces:
            raise InputError(f"ensemble member {name} has no direct force head; use conservative ensemble forces")
        if member.elements is not None:
            missing = sorted(numbers - {int(z) for z in member.elements})
            if missing:
                raise InputError(
                    f"ensemble member {name} does not know element(s) "
                    f"{', '.join(chemical_symbols[z] for z in missing)} present in the structures "
                    f"(it knows {' '.join(chemical_symbols[int(z)] for z in member.elements)})"
                )


def batch_atoms(batch: Batch) -> list[Atoms]:
    """The batch's structures as ase.Atoms (positions Å, numbers, cell, pbc)."""
    positions = batch.split(batch.positions.detach().cpu().double().numpy())
    numbers = batch.split(batch.numbers.cpu().numpy())
    cells = batch.cell.detach().cpu().double().numpy()
    pbcs = batch.pbc.cpu().numpy()
    return [Atoms(numbers=z, positions=r, cell=c, pbc=p) for z, r, c, p in zip(numbers, positions, cells, pbcs)]


def _calculator_outputs(calc: BaseCalculator, batch: Batch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(B,) energies and (N, 3) forces of an ASE calculator, one structure at a time."""
    energies, forces = [], []
    for b, atoms in enumerate(batch_atoms(batch)):
        atoms.calc = calc
        try:
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
        except Exception as exc:  # the calculator's own failure, named with the member and structure
            raise InputError(
                f"ensemble member {name} failed on structure {b} of the batch ({atoms.get_chemical_formula()}): {type(exc).__name__}: {exc}"
            ) from exc
    return np.asarray(energies, dtype=float), np.concatenate(forces).reshape(-1, 3)


def evaluate_ensemble(
    members: Sequence[Member], batch: Batch, forces: str = "direct", names: Sequence[str] | None = None
) -> EnsemblePrediction:
    """Energies and forces of every member on the batch (direct or conservative for atomuq models)."""
    check_members(members, set(batch.numbers.unique().tolist()), forces, names)
    energy, force = [], []
    for m, member in enumerate(members):
        if isinstance(member, AtomisticModel):
            pred = evaluate(member, batch, conservative=forces == "conservative")
            f = pred.forces_direct if forces == "direct" else pred.forces_conservative
            e, f = pred.energy.detach(), f.detach()
        else:
            e_np, f_np = _calculator_outputs(member, batch, member_name(member, names, m))
            e, f = torch.as_tensor(e_np), torch.as_tensor(f_np)
        energy.append(e.to(device=batch.device, dtype=torch.float64))
        force.append(f.to(device=batch.device, dtype=torch.float64))
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
