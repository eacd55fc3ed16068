"""Neighbour lists (vesin) and differentiable edge vectors.

Indices and integer periodic shifts are found without gradients by vesin; edge vectors are
then rebuilt in torch from positions and cell, so that they are differentiable with respect
to both (conservative forces, virial stress, rotational gradient all flow through them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vesin import NeighborList

from atomuq.core.batch import Batch


#: edges per piece of the strain derivative in edge_gradients
STRAIN_CHUNK = 1 << 16


@dataclass(frozen=True)
class Graph:
    """Directed edges i -> j (j is a neighbour of centre i), one per periodic image.

    centers, neighbors: (E,) global atom indices; shifts: (E, 3) integer cell shifts (as
    floats) so that r_ij = r_j - r_i + shifts @ cell; edge_batch: (E,) structure of each edge.
    """

    centers: torch.Tensor
    neighbors: torch.Tensor
    shifts: torch.Tensor
    edge_batch: torch.Tensor

    @property
    def num_edges(self) -> int:
        return int(self.centers.shape[0])


def _limit_neighbors(i: np.ndarray, d: np.ndarray, max_neighbors: int) -> np.ndarray:
    """Boolean mask keeping, for each centre, its max_neighbors nearest edges (ties by order)."""
    order = np.lexsort((d, i))
    sorted_i = i[order]
    starts = np.searchsorted(sorted_i, sorted_i, side="left")
    rank = np.arange(len(order)) - starts
    keep = np.zeros(len(i), dtype=bool)
    keep[order[rank < max_neighbors]] = True
    return keep


def build_graph(batch: Batch, cutoff: float, max_neighbors: int | None = None) -> Graph:
    """Full neighbour list within cutoff (Å) of every structure in the batch, periodic images included."""
    calculator = NeighborList(cutoff=float(cutoff), full_list=True)
    positions = batch.positions.detach().cpu().double().numpy()
    cells = batch.cell.detach().cpu().double().numpy()
    pbcs = batch.pbc.cpu().numpy()
    ptr = batch.ptr.tolist()
    centers, neighbors, shifts, owners = [], [], [], []
    for b in range(batch.num_structures):
        start, stop = ptr[b], ptr[b + 1]
        box = cells[b] if pbcs[b].any() else np.zeros((3, 3))
        i, j, s, d = calculator.compute(positions[start:stop], box, pbcs[b], quantities="ijSd")
        if max_neighbors is not None:
            keep = _limit_neighbors(i, d, max_neighbors)
            i, j, s = i[keep], j[keep], s[keep]
        centers.append(i.astype(np.int64) + start)
        neighbors.append(j.astype(np.int64) + start)
        shifts.append(s)
        owners.append(np.full(len(i), b, dtype=np.int64))
    device = batch.device
    return Graph(
        centers=torch.as_tensor(np.concatenate(centers), device=device),
        neighbors=torch.as_tensor(np.concatenate(neighbors), device=device),
        shifts=torch.as_tensor(np.concatenate(shifts).reshape(-1, 3), dtype=batch.dtype, device=device),
        edge_batch=torch.as_tensor(np.concatenate(owners), device=device),
    )


def edge_vectors(batch: Batch, graph: Graph) -> torch.Tensor:
    """(E, 3) vectors r_j - r_i + S·cell in Å, differentiable in positions and cell."""
    offsets = torch.einsum("ek,ekl->el", graph.shifts, batch.cell.index_select(0, graph.edge_batch))
    positions = batch.positions
    return positions.index_select(0, graph.neighbors) - positions.index_select(0, graph.centers) + offsets


def edge_gradients(graph: Graph, vectors: torch.Tensor, grad_vectors: torch.Tensor, n_atoms: int, n_structures: int,
                   strain: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dE/dr (N, 3) eV/Å and the strain derivative dE/dg (B, 3, 3) eV from dE/d(edge vectors) (E, 3) eV/Å.

    The adjoint of edge_vectors: r_ij = r_j - r_i + S·cell, and under the deformation r' = r (I + g),
    cell' = cell (I + g) every edge vector becomes r_ij (I + g), so dE/dg_ab = sum_ij r_ij,a dE/dr_ij,b.
    """
    grad_positions = grad_vectors.new_zeros(n_atoms, 3)
    grad_positions.index_add_(0, graph.neighbors, grad_vectors)
    grad_positions.index_add_(0, graph.centers, grad_vectors, alpha=-1)
    if not strain:
        return grad_positions, None
    grad_strain = grad_vectors.new_zeros(n_structures, 3, 3)
    for start in range(0, len(vectors), STRAIN_CHUNK):  # bounded temporaries: (chunk, 3, 3) outer products
        s = slice(start, start + STRAIN_CHUNK)
        grad_strain.index_add_(0, graph.edge_batch[s], vectors[s, :, None] * grad_vectors[s, None, :])
    return grad_positions, grad_strain
