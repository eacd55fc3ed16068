"""Batching several structures into one flat graph-ready set of tensors."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.constraints import FixAtoms


@dataclass(frozen=True)
class Batch:
    """Several structures concatenated atom-wise.

    positions: (N, 3) Å; numbers: (N,) atomic numbers; cell: (B, 3, 3) Å, rows are the
    cell vectors (zeros for a non-periodic structure); pbc: (B, 3) bool;
    structure_index: (N,) long, the index (0..B-1) of the structure each atom belongs to;
    atoms_per_structure: (B,) long, the number of atoms of each structure;
    fixed: (N,) bool, atoms held by a FixAtoms constraint.
    """

    positions: torch.Tensor
    numbers: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    structure_index: torch.Tensor
    atoms_per_structure: torch.Tensor
    fixed: torch.Tensor

    @property
    def num_structures(self) -> int:
        """Number of structures B."""
        return int(self.atoms_per_structure.shape[0])

    @property
    def num_atoms(self) -> int:
        """Total number of atoms N."""
        return int(self.positions.shape[0])

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def dtype(self) -> torch.dtype:
        return self.positions.dtype

    @property
    def ptr(self) -> torch.Tensor:
        """(B+1,) offsets of each structure's first atom."""
        sizes = self.atoms_per_structure
        return torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)])

    def replace(self, **changes: torch.Tensor) -> "Batch":
        """A copy with some tensors replaced (used to insert differentiable positions/cell); old field names accepted."""
        return replace(self, **changes)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Batch":
        """Move to a device and cast the floating tensors (positions, cell) to dtype."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t.is_floating_point():
                out[f.name] = t.to(device=device, dtype=dtype)
            else:
                out[f.name] = t.to(device=device)
        return Batch(**out)

    def split(self, per_atom: torch.Tensor | np.ndarray) -> list:
        """Split a per-atom array (N, ...) into one piece per structure."""
        sizes = self.atoms_per_structure.tolist()
        if isinstance(per_atom, torch.Tensor):
            return list(torch.split(per_atom, sizes))
        return np.split(per_atom, np.cumsum(sizes)[:-1])

    def select(self, structures: torch.Tensor) -> "Batch":
        """The sub-batch of the given structure indices (B',), in that order, re-indexed from 0."""
        structures = torch.as_tensor(structures, dtype=torch.long, device=self.device)
        sizes = self.atoms_per_structure.index_select(0, structures)
        starts = self.ptr.index_select(0, structures)
        owner = torch.repeat_interleave(torch.arange(len(structures), device=self.device), sizes)
        atoms = starts.index_select(0, owner) + torch.arange(int(sizes.sum()), device=self.device) - (
            torch.cumsum(sizes, 0) - sizes).index_select(0, owner)
        return Batch(
            positions=self.positions.index_select(0, atoms),
            numbers=self.numbers.index_select(0, atoms),
            cell=self.cell.index_select(0, structures),
            pbc=self.pbc.index_select(0, structures),
            structure_index=owner,
            atoms_per_structure=sizes,
            fixed=self.fixed.index_select(0, atoms),
        )

    @classmethod
    def from_atoms(
        cls,
        structures: Sequence[Atoms],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "Batch":
        """Batch a list of ase.Atoms; positions and cell in Å."""
        if len(structures) == 0:
            raise ValueError("cannot batch an empty list of structures")
        positions = np.concatenate([a.positions for a in structures], axis=0)
        numbers = np.concatenate([a.numbers for a in structures])
        cell = np.stack([a.cell.array for a in structures])
        pbc = np.stack([a.pbc for a in structures])
        sizes = np.array([len(a) for a in structures])
        fixed = np.zeros(len(numbers), dtype=bool)
        offset = 0
        for a in structures:
            for c in a.constraints:
                if isinstance(c, FixAtoms):
                    fixed[offset + c.get_indices()] = True
            offset += len(a)
        t = lambda x, dt: torch.as_tensor(x, dtype=dt, device=device)  # noqa: E731
        return cls(
            positions=t(positions, dtype),
            numbers=t(numbers, torch.long),
            cell=t(cell, dtype),
            pbc=t(pbc, torch.bool),
            structure_index=torch.repeat_interleave(torch.arange(len(structures), device=device), t(sizes, torch.long)),
            atoms_per_structure=t(sizes, torch.long),
            fixed=t(fixed, torch.bool),
        )


def scatter_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum rows of values (E, ...) into size bins given by index (E,)."""
    out = values.new_zeros((size,) + tuple(values.shape[1:]))
    return out.index_add(0, index, values)


def scatter_mean(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of rows of values (E, ...) per bin; empty bins give 0."""
    total = scatter_sum(values, index, size)
    count = scatter_sum(torch.ones_like(index, dtype=values.dtype), index, size).clamp(min=1)
    return total / count.view((-1,) + (1,) * (values.dim() - 1))
