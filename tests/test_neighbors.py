"""vesin neighbour lists against ase.neighborlist; differentiable edge vectors; neighbour limits."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list

from atomuq.core.batch import Batch
from atomuq.core.neighbors import build_graph, edge_vectors
from conftest import copper_cell, triclinic_alcu

CASES = {
    "molecule": lambda: molecule("C6H6"),
    "cu_primitive_smaller_than_cutoff": lambda: bulk("Cu", "fcc", a=3.6),
    "cu_cubic_rattled": copper_cell,
    "triclinic": triclinic_alcu,
    "slab_mixed_pbc": lambda: fcc111("Al", size=(2, 2, 3), vacuum=5.0),
}


def edge_set(i, j, S):
    return sorted(zip(i.tolist(), j.tolist(), map(tuple, np.asarray(S).astype(int).tolist())))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("cutoff", [3.0, 5.5])
def test_matches_ase(name, cutoff):
    atoms = CASES[name]()
    graph = build_graph(Batch.from_atoms([atoms], dtype=torch.float64), cutoff)
    i, j, S, d = neighbor_list("ijSd", atoms, cutoff)
    assert graph.num_edges == len(i) > 0
    assert edge_set(graph.centers.numpy(), graph.neighbors.numpy(), graph.shifts.numpy()) == edge_set(i, j, S)
    vec = edge_vectors(Batch.from_atoms([atoms], dtype=torch.float64), graph)
    assert np.allclose(np.sort(torch.linalg.norm(vec, dim=1).numpy()), np.sort(d), atol=1e-10)


def test_batched_graph_offsets_indices():
    structures = [molecule("H2O"), bulk("Cu", "fcc", a=3.6), molecule("CH4")]
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    graph = build_graph(batch, 4.0)
    owner = batch.structure_index
    assert torch.equal(owner[graph.centers], graph.edge_batch)
    assert torch.equal(owner[graph.neighbors], graph.edge_batch)
    for b, atoms in enumerate(structures):
        assert int((graph.edge_batch == b).sum()) == len(neighbor_list("i", atoms, 4.0))


def test_edge_vectors_are_differentiable_in_positions_and_cell():
    atoms = triclinic_alcu()
    batch = Batch.from_atoms([atoms], dtype=torch.float64)
    graph = build_graph(batch, 4.0)
    pos = batch.positions.clone().requires_grad_(True)
    cell = batch.cell.clone().requires_grad_(True)

    def total_length(p, c):
        return torch.linalg.norm(edge_vectors(batch.replace(positions=p, cell=c), graph), dim=1).sum()

    assert torch.autograd.gradcheck(total_length, (pos, cell))


def test_max_neighbors_keeps_the_nearest():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=0)
    batch = Batch.from_atoms([atoms], dtype=torch.float64)
    full = build_graph(batch, 5.0)
    limited = build_graph(batch, 5.0, max_neighbors=6)
    counts = torch.bincount(limited.centers, minlength=len(atoms))
    assert torch.all(counts == 6)
    d_full = torch.linalg.norm(edge_vectors(batch, full), dim=1)
    d_lim = torch.linalg.norm(edge_vectors(batch, limited), dim=1)
    for a in range(len(atoms)):
        nearest = torch.sort(d_full[full.centers == a]).values[:6]
        assert torch.allclose(torch.sort(d_lim[limited.centers == a]).values, nearest)


def test_isolated_atom_has_no_edges():
    batch = Batch.from_atoms([Atoms("H", positions=[[0, 0, 0]])], dtype=torch.float64)
    assert build_graph(batch, 5.0).num_edges == 0
