"""Covalent bond graphs from geometry, and how a later frame's graph differs from a reference one.

A pair i < j is bonded when its distance is below FORMED x (r_cov,i + r_cov,j) (ASE's covalent radii, Å);
against a reference graph, a reference bond is broken when it has stretched beyond BROKEN x the covalent sum,
and a bond is formed when a pair not bonded in the reference comes closer than FORMED x the sum. The gap between
the two factors keeps a vibrating bond from counting as broken and formed again. Periodic cells are handled by
the minimum-image pairs of the neighbour list (vesin), so the cost is linear in the atoms. The same rule filters
dissociated frames out of the broad molecular set (scripts/build_broad_molecular_set.py) and stops MD runs whose
molecules fall apart (the `bonds` MD monitor).
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from vesin import NeighborList

#: a reference bond counts as broken beyond this multiple of its covalent radius sum
BROKEN = 1.5
#: a pair counts as bonded (in the reference) or newly formed (later) below this multiple
FORMED = 1.2


def _pairs(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, factor: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, d / covalent sum) of the pairs i < j closer than factor x their covalent sum (half list, no self)."""
    radii = covalent_radii[numbers]
    cutoff = float(factor * 2.0 * radii.max())
    periodic = bool(np.any(pbc))
    box = np.asarray(cell, dtype=np.float64) if periodic else np.zeros((3, 3))
    i, j, d = NeighborList(cutoff=cutoff, full_list=False).compute(
        np.asarray(positions, dtype=np.float64), box, periodic, quantities="ijd")
    i, j = i.astype(np.int64), j.astype(np.int64)
    ratio = d / (radii[i] + radii[j])
    keep = (ratio < factor) & (i != j)
    i, j, ratio = i[keep], j[keep], ratio[keep]
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    return lo, hi, ratio


def bond_graph(atoms: Atoms) -> np.ndarray:
    """(B, 2) sorted atom index pairs i < j bonded in this frame (distance < FORMED x covalent sum)."""
    i, j, _ = _pairs(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, FORMED)
    return np.unique(np.stack([i, j], axis=1), axis=0).reshape(-1, 2)


def bond_changes(numbers: np.ndarray, positions: np.ndarray, bonds: np.ndarray, cell: np.ndarray | None = None,
                 pbc: np.ndarray | None = None) -> tuple[int, int]:
    """(broken, formed) against the reference bonds (B, 2): reference bonds beyond BROKEN x covalent sum, new pairs
    closer than FORMED x (positions in Å; cell and pbc for periodic frames, minimum image)."""
    numbers = np.asarray(numbers)
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64)
    pbc = np.zeros(3, dtype=bool) if pbc is None else np.asarray(pbc, dtype=bool)
    bonds = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
    n = len(numbers)
    key = np.minimum(bonds[:, 0], bonds[:, 1]) * n + np.maximum(bonds[:, 0], bonds[:, 1])
    i, j, ratio = _pairs(numbers, positions, cell, pbc, BROKEN)
    near = i * n + j
    # a reference bond survives while some image of the pair is within BROKEN x its covalent sum
    broken = int(len(np.setdiff1d(key, near)))
    formed = int(len(np.setdiff1d(near[ratio < FORMED], key)))
    return broken, formed
