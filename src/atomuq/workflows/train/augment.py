"""Random-rotation augmentation: positions, cell, reference forces and stress of each structure turned together."""

from __future__ import annotations

import dataclasses

import torch

from atomuq.core.batch import Batch
from atomuq.core.rotations import random_rotations
from atomuq.models.derivatives import VOIGT
from atomuq.workflows.losses import Targets

__all__ = ["random_rotations", "rotate", "voigt_to_matrix"]


def voigt_to_matrix(voigt: torch.Tensor) -> torch.Tensor:
    """(B, 6) Voigt xx, yy, zz, yz, xz, xy -> (B, 3, 3) symmetric."""
    out = voigt.new_zeros(voigt.shape[0], 3, 3)
    for k, (a, b) in enumerate(VOIGT):
        out[:, a, b] = voigt[:, k]
        out[:, b, a] = voigt[:, k]
    return out


def rotate(batch: Batch, targets: Targets, rotations: torch.Tensor) -> tuple[Batch, Targets]:
    """Rotate positions, cell rows, reference forces and stress of each structure by its matrix (B, 3, 3)."""
    rot = rotations.to(device=batch.device, dtype=batch.dtype)
    per_atom = rot[batch.structure_index]
    positions = torch.einsum("nij,nj->ni", per_atom, batch.positions)
    cell = torch.einsum("bij,bkj->bki", rot, batch.cell)
    forces = torch.einsum("nij,nj->ni", per_atom, targets.forces)
    sigma = rot @ voigt_to_matrix(targets.stress) @ rot.transpose(1, 2)
    stress = torch.stack([sigma[:, a, b] for a, b in VOIGT], dim=1)
    return batch.replace(positions=positions, cell=cell), dataclasses.replace(targets, forces=forces, stress=stress)
