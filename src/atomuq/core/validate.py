"""Input checks with errors that name the file and structure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols, covalent_radii
from vesin import NeighborList

from atomuq.core.batch import Batch
from atomuq.core.errors import InputError
from atomuq.core.neighbors import build_graph, edge_vectors

DEFAULT_MIN_DISTANCE = 0.3  # Å: closer than this, two atoms are taken as overlapping


def check_structure(
    atoms: Atoms,
    where: str,
    elements: Sequence[int] | None = None,
    min_distance: float = DEFAULT_MIN_DISTANCE,
) -> None:
    """Raise InputError naming `where` if the structure is empty, non-finite, cell-less, overlapping or has unsupported elements."""
    if len(atoms) == 0:
        raise InputError(f"{where}: the structure has no atoms")
    positions = atoms.positions
    if not np.isfinite(positions).all():
        bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
        raise InputError(f"{where}: positions of atoms {bad[:10].tolist()} are NaN or infinite")
    cell = atoms.cell.array
    if not np.isfinite(cell).all():
        raise InputError(f"{where}: the cell contains NaN or infinite values")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    lengths = np.linalg.norm(cell, axis=1)
    if pbc.any() and (lengths[pbc] < 1e-6).any():
        axes = "".join("abc"[k] for k in range(3) if pbc[k] and lengths[k] < 1e-6)
        raise InputError(f"{where}: periodic along {axes} but the cell vector is zero; set a cell or pbc=False")
    if pbc.all() and abs(np.linalg.det(cell)) < 1e-6:
        raise InputError(f"{where}: periodic cell has zero volume (cell vectors are linearly dependent)")
    if elements is not None:
        unknown = sorted(set(atoms.numbers.tolist()) - set(int(z) for z in elements))
        if unknown:
            names = ", ".join(chemical_symbols[z] for z in unknown)
            have = " ".join(chemical_symbols[int(z)] for z in elements)
            raise InputError(f"{where}: element(s) {names} not supported by the model (it knows {have})")
    if min_distance > 0 and len(atoms) > 0:
        box = cell if pbc.any() else np.zeros((3, 3))
        i, j, d = NeighborList(cutoff=min_distance, full_list=False).compute(positions, box, pbc, quantities="ijd")
        if len(d):
            k = int(np.argmin(d))
            raise InputError(
                f"{where}: atoms {int(i[k])} and {int(j[k])} overlap ({d[k]:.3f} Å apart, minimum {min_distance} Å)"
            )


#: a pair closer than this fraction of the sum of its covalent radii is taken as a broken geometry
DEFAULT_MIN_CONTACT_RATIO = 0.7


@dataclass
class Contact:
    """The closest pair of one structure relative to covalent radii: d_ij / (r_cov,i + r_cov,j), and the pair."""

    ratio: float
    i: int
    j: int
    distance: float


def closest_contacts(batch: Batch) -> list[Contact | None]:
    """Per structure, the pair with the smallest d_ij / (r_cov,i + r_cov,j) (ASE covalent radii, Å); None if no pair
    is within the sum of radii. Periodic images included; atom indices are within the structure."""
    radii = torch.as_tensor(covalent_radii, dtype=torch.float64)[batch.numbers.cpu()]
    graph = build_graph(batch, cutoff=float(2 * radii.max()))
    if len(graph.centers) == 0:
        return [None] * batch.num_structures
    distance = torch.linalg.norm(edge_vectors(batch, graph).detach().cpu().double(), dim=-1)
    centers, neighbors = graph.centers.cpu(), graph.neighbors.cpu()
    ratio = distance / (radii[centers] + radii[neighbors])
    edge_batch = graph.edge_batch.cpu()
    best = torch.full((batch.num_structures,), float("inf"), dtype=torch.float64)
    best = best.scatter_reduce(0, edge_batch, ratio, reduce="amin")
    start = batch.ptr.cpu()
    out: list[Contact | None] = []
    for b in range(batch.num_structures):
        if not bool(best[b] < 1.0):
            out.append(None)
            continue
        e = int(torch.nonzero((edge_batch == b) & (ratio == best[b]))[0])
        out.append(Contact(float(best[b]), int(centers[e] - start[b]), int(neighbors[e] - start[b]), float(distance[e])))
    return out
