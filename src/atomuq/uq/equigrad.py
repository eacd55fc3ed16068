"""Rotational invariance diagnostics (methods.md section 6): |Delta_rot| and the measured energy
spread under random rotations (Orb-v3 Fig. 3 compares the two)."""

from __future__ import annotations

import torch
from ase import Atoms

from atomuq.core.batch import Batch
from atomuq.core.rotations import random_rotations
from atomuq.models.derivatives import Prediction, evaluate, rotational_gradient_norm
from atomuq.models.protocol import AtomisticModel
from atomuq.uq.result import UQResult


def rotational_gradient(prediction: Prediction) -> UQResult:
    """Per-structure Frobenius norm of Delta_rot and Delta_rot itself (3x3), eV; zero for a rotation-invariant model."""
    return UQResult(per_structure={"rotational_gradient_norm": rotational_gradient_norm(prediction),
                                   "rotational_gradient": prediction.rotational_gradient})


def energy_spread_under_rotations(model: AtomisticModel, atoms: Atoms, n_rotations: int = 32, seed: int = 0,
                                  batch_size: int = 32) -> float:
    """Standard deviation (eV) of the predicted energy over n random rigid rotations of positions and cell."""
    copies = []
    for rot in random_rotations(n_rotations, torch.Generator().manual_seed(seed)).numpy():
        rotated = atoms.copy()
        rotated.positions = atoms.positions @ rot.T
        rotated.cell = atoms.cell.array @ rot.T
        copies.append(rotated)
    energies = []
    with torch.no_grad():
        for start in range(0, len(copies), batch_size):
            batch = Batch.from_atoms(copies[start:start + batch_size], device=model.device, dtype=model.dtype)
            energies.append(evaluate(model, batch, conservative=False).energy.cpu().double())
    return float(torch.cat(energies).std(unbiased=True))
