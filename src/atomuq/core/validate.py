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
from atomuq.core.io import Record, reference_energy, reference_forces
from atomuq.core.neighbors import build_graph, edge_vectors

DEFAULT_MIN_DISTANCE = 0.3  # Å: closer than this, two atoms are taken as overlapping
#: Å: largest extent of the atoms or length of a cell vector accepted (10 µm): beyond it the positions are taken as
#: corrupt, and neighbour lists (vesin's cell lists, one cell per cutoff) would need an absurd number of cells
MAX_EXTENT = 1e5
#: eV/Å: largest reference force component accepted; beyond it the labels are taken as corrupt (errors would overflow)
MAX_REFERENCE_FORCE = 1e6
#: most neighbour-list cells along one axis in the overlap check (its search radius grows with the extent)
_MAX_CELLS = 1e4


def nonfinite_atoms(positions: np.ndarray) -> np.ndarray:
    """Indices of the atoms whose positions (N, 3), Å, hold NaN or infinite values (empty if none)."""
    return np.flatnonzero(~np.isfinite(positions).all(axis=1))


def check_structure(
    atoms: Atoms,
    where: str,
    elements: Sequence[int] | None = None,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    knower: str = "the model",
) -> None:
    """Raise InputError naming `where` if the structure is empty, non-finite, cell-less, overlapping or has
    unsupported elements (not in `elements`, the atomic numbers `knower` knows)."""
    if len(atoms) == 0:
        raise InputError(f"{where}: the structure has no atoms")
    positions = atoms.positions
    bad = nonfinite_atoms(positions)
    if bad.size:
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
    extent = float((positions.max(axis=0) - positions.min(axis=0)).max())
    if extent > MAX_EXTENT or (pbc.any() and lengths[pbc].max() > MAX_EXTENT):
        what = f"the atoms span {extent:.3g} Å" if extent > MAX_EXTENT else f"a cell vector is {lengths[pbc].max():.3g} Å long"
        raise InputError(f"{where}: {what}, more than {MAX_EXTENT:g} Å; the positions or the cell look corrupt")
    if elements is not None:
        unknown = sorted(set(atoms.numbers.tolist()) - set(int(z) for z in elements))
        if unknown:
            names = ", ".join(chemical_symbols[z] for z in unknown)
            have = " ".join(chemical_symbols[int(z)] for z in elements)
            raise InputError(f"{where}: element(s) {names} not supported by {knower} (elements known: {have})")
    if min_distance > 0 and len(atoms) > 1:
        box = cell if pbc.any() else np.zeros((3, 3))
        span = max(extent, float(lengths[pbc].max())) if pbc.any() else extent
        radius = max(min_distance, span / _MAX_CELLS)  # searched wider on huge structures, then filtered
        i, j, d = NeighborList(cutoff=radius, full_list=False).compute(positions, box, pbc, quantities="ijd")
        close = d < min_distance
        i, j, d = i[close], j[close], d[close]
        if len(d):
            k = int(np.argmin(d))
            raise InputError(
                f"{where}: atoms {int(i[k])} and {int(j[k])} overlap ({d[k]:.3f} Å apart, minimum {min_distance} Å)"
            )


def check_records(
    records: Sequence[Record],
    elements: Sequence[int] | None = None,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    knower: str = "the model",
) -> None:
    """Check every structure before any work (check_structure: file and structure index named, elements as
    symbols), so a bad one stops the run with nothing written. elements: atomic numbers the model (`knower`)
    knows; None skips the element check. InputError also when there is no structure."""
    if not records:
        raise InputError("no structures given")
    for rec in records:
        check_structure(rec.atoms, rec.where, elements, min_distance, knower)


def _per_atom_names(atoms: Atoms) -> list[str]:
    """Names of the per-atom (N, 3) float arrays of a structure: atoms.arrays and calculator results."""
    n = len(atoms)
    names = [k for k, v in atoms.arrays.items() if k not in ("numbers", "positions") and np.shape(v) == (n, 3)]
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    names += [f"{k} (calculator)" for k, v in results.items() if np.shape(v) == (n, 3)]
    return names


def check_references(records: Sequence[Record], forces_key: str | None = None, flag: str = "--forces-key") -> None:
    """Refuse reference labels that cannot be used, before any work: a forces_key that no structure has (the
    message names the key and the per-atom arrays present), reference forces (eV/Å) that are NaN, infinite or
    above MAX_REFERENCE_FORCE and energies (eV) that are not finite (naming the file and structure). Structures
    without labels pass."""
    if forces_key is not None and records and all(reference_forces(r.atoms, forces_key) is None for r in records):
        present = sorted({name for r in records for name in _per_atom_names(r.atoms)})
        files = ", ".join(dict.fromkeys(r.source for r in records))
        raise InputError(f"{flag} {forces_key!r}: no structure in {files} has a per-atom array of that name "
                         f"(present: {', '.join(present) or 'none'}); name one of them or omit {flag}")
    for rec in records:
        forces = reference_forces(rec.atoms, forces_key)
        if forces is not None and not (np.abs(forces) <= MAX_REFERENCE_FORCE).all():  # NaN fails the comparison
            bad = np.flatnonzero(~(np.abs(forces) <= MAX_REFERENCE_FORCE).reshape(len(forces), -1).all(axis=1))
            raise InputError(f"{rec.where}: reference forces of atoms {bad[:10].tolist()} are NaN, infinite or above "
                             f"{MAX_REFERENCE_FORCE:g} eV/Å; fix or drop the structure")
        energy = reference_energy(rec.atoms)
        if energy is not None and not np.isfinite(energy):
            raise InputError(f"{rec.where}: the reference energy is {energy}; fix or drop the structure")


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
