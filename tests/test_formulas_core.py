"""Core formulas on tiny hand-computed inputs: batching and re-indexing, scatter sums and means, the
nearest-neighbour limit, edge vectors and the closest covalent contact (written to kill the mutants that
survived the rest of the suite, see docs/mutation_testing.md)."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.constraints import FixAtoms
from ase.data import covalent_radii

from atomuq.core.batch import Batch, scatter_mean, scatter_sum
from atomuq.core.neighbors import _limit_neighbors, build_graph, edge_vectors
from atomuq.core.validate import closest_contacts


def three_structures() -> tuple[list[Atoms], Batch]:
    """H2 (2 atoms, atom 1 fixed), O (1 atom, periodic cell), CH2 (3 atoms, atom 0 fixed)."""
    h2 = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]])
    h2.set_constraint(FixAtoms(indices=[1]))
    o = Atoms("O", positions=[[0.5, 0.5, 0.5]], cell=[4.0, 5.0, 6.0], pbc=True)
    ch2 = Atoms("CH2", positions=[[0, 0, 0], [1.0, 0, 0], [0, 1.1, 0]])
    ch2.set_constraint(FixAtoms(indices=[0]))
    structures = [h2, o, ch2]
    return structures, Batch.from_atoms(structures, dtype=torch.float64)


# --- Batch ------------------------------------------------------------------------------------------------


def test_batch_from_atoms_counts_indices_and_fixed_atoms():
    structures, batch = three_structures()
    assert batch.atoms_per_structure.tolist() == [2, 1, 3]
    assert batch.structure_index.tolist() == [0, 0, 1, 2, 2, 2]
    assert (batch.num_structures, batch.num_atoms) == (3, 6)
    assert batch.ptr.tolist() == [0, 2, 3, 6]
    assert batch.fixed.tolist() == [False, True, False, True, False, False]
    assert batch.numbers.tolist() == [1, 1, 8, 6, 1, 1]
    assert batch.pbc.tolist() == [[False] * 3, [True] * 3, [False] * 3]
    assert torch.equal(batch.cell[1], torch.diag(torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64)))
    assert batch.dtype == torch.float64 and Batch.from_atoms(structures).dtype == torch.float32
    with pytest.raises(ValueError, match="empty list"):
        Batch.from_atoms([])


def test_fixed_atoms_are_offset_by_the_atoms_of_earlier_structures():
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    water.set_constraint(FixAtoms(indices=[0]))
    batch = Batch.from_atoms([Atoms("H", positions=[[0, 0, 0]]), water])
    assert batch.fixed.tolist() == [False, True, False, False]


def test_batch_split_per_atom_arrays():
    _, batch = three_structures()
    values = torch.arange(6)
    assert [t.tolist() for t in batch.split(values)] == [[0, 1], [2], [3, 4, 5]]
    assert [a.tolist() for a in batch.split(np.arange(6) * 2)] == [[0, 2], [4], [6, 8, 10]]


def test_batch_select_reorders_and_reindexes():
    _, batch = three_structures()
    sub = batch.select(torch.tensor([2, 0]))
    assert sub.atoms_per_structure.tolist() == [3, 2]
    assert sub.structure_index.tolist() == [0, 0, 0, 1, 1]
    assert torch.equal(sub.positions, batch.positions[[3, 4, 5, 0, 1]])
    assert sub.numbers.tolist() == [6, 1, 1, 1, 1]
    assert sub.fixed.tolist() == [True, False, False, False, True]
    assert torch.equal(sub.cell, batch.cell[[2, 0]]) and torch.equal(sub.pbc, batch.pbc[[2, 0]])
    middle = batch.select([1])
    assert torch.equal(middle.positions, batch.positions[2:3]) and middle.structure_index.tolist() == [0]


def test_batch_to_casts_only_floating_tensors_and_replace_changes_fields():
    _, batch = three_structures()
    single = batch.to(dtype=torch.float32)
    assert single.positions.dtype == torch.float32 and single.cell.dtype == torch.float32
    assert single.numbers.dtype == torch.long and single.fixed.dtype == torch.bool and single.pbc.dtype == torch.bool
    assert torch.equal(single.numbers, batch.numbers)
    moved = batch.replace(structure_index=torch.zeros(6, dtype=torch.long), positions=batch.positions + 1.0)
    assert moved.structure_index.tolist() == [0] * 6
    assert torch.equal(moved.positions, batch.positions + 1.0)


def test_scatter_sum_and_mean_by_hand():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    index = torch.tensor([2, 0, 2])
    assert scatter_sum(values, index, 4).tolist() == [[3.0, 4.0], [0.0, 0.0], [6.0, 8.0], [0.0, 0.0]]
    assert scatter_mean(values, index, 4).tolist() == [[3.0, 4.0], [0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]
    assert scatter_mean(torch.tensor([1.0, 2.0, 6.0]), index, 3).tolist() == [2.0, 0.0, 3.5]


# --- neighbours -------------------------------------------------------------------------------------------


def test_limit_neighbors_keeps_the_nearest_edges_of_each_centre():
    i = np.array([1, 0, 1, 0, 0, 1])
    d = np.array([1.0, 2.0, 0.5, 1.0, 3.0, 0.7])
    assert _limit_neighbors(i, d, 1).tolist() == [False, False, True, True, False, False]
    assert _limit_neighbors(i, d, 2).tolist() == [False, True, True, True, False, True]
    assert _limit_neighbors(i, d, 3).all()


def test_edge_vectors_by_hand_with_a_periodic_shift():
    # two atoms along x in a 3 Å periodic box (x only): neighbours at +-1 Å and through the boundary at +-2 Å
    atoms = Atoms("H2", positions=[[0.5, 0, 0], [1.5, 0, 0]], cell=[3.0, 10.0, 10.0], pbc=[True, False, False])
    batch = Batch.from_atoms([atoms], dtype=torch.float64)
    graph = build_graph(batch, 2.5)
    vectors = edge_vectors(batch, graph)
    edges = sorted((int(c), int(n), tuple(v.tolist())) for c, n, v in zip(graph.centers, graph.neighbors, vectors))
    assert edges == [(0, 1, (-2.0, 0.0, 0.0)), (0, 1, (1.0, 0.0, 0.0)), (1, 0, (-1.0, 0.0, 0.0)), (1, 0, (2.0, 0.0, 0.0))]
    assert graph.num_edges == 4 and graph.edge_batch.tolist() == [0] * 4


def test_graph_of_two_structures_offsets_atoms_and_owners():
    h2 = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]])
    h3 = Atoms("H3", positions=[[0, 0, 0], [0, 0, 0.8], [0, 0, 5.0]])
    batch = Batch.from_atoms([h2, h3], dtype=torch.float64)
    graph = build_graph(batch, 1.0)
    edges = sorted(zip(graph.centers.tolist(), graph.neighbors.tolist(), graph.edge_batch.tolist()))
    assert edges == [(0, 1, 0), (1, 0, 0), (2, 3, 1), (3, 2, 1)]
    lengths = torch.linalg.norm(edge_vectors(batch, graph), dim=1)
    assert sorted(lengths.tolist()) == pytest.approx([0.7, 0.7, 0.8, 0.8])


# --- closest contacts -------------------------------------------------------------------------------------


def test_closest_contacts_by_hand():
    r_h, r_o, r_cu = covalent_radii[1], covalent_radii[8], covalent_radii[29]
    water = Atoms("OHH", positions=[[0, 0, 0], [0.9, 0, 0], [0, 0.6, 0]])  # O-H 0.9 and 0.6, H-H 1.08
    far = Atoms("H2", positions=[[0, 0, 0], [0, 0, 3.0]])
    cu = Atoms("Cu", positions=[[0, 0, 0]], cell=[2.0, 2.0, 2.0], pbc=True)  # touches its own images
    apart = Atoms("HO", positions=[[0, 0, 0], [0, 0, r_h + r_o]])  # exactly at the sum of radii: not closer
    contacts = closest_contacts(Batch.from_atoms([water, far, cu, apart], dtype=torch.float64))
    assert contacts[1] is None and contacts[3] is None
    w = contacts[0]
    assert w.ratio == pytest.approx(0.6 / (r_o + r_h)) and w.distance == pytest.approx(0.6)
    assert {w.i, w.j} == {0, 2}
    c = contacts[2]
    assert (c.i, c.j) == (0, 0) and c.distance == pytest.approx(2.0) and c.ratio == pytest.approx(2.0 / (2 * r_cu))


def test_closest_contacts_index_atoms_within_their_structure():
    far = Atoms("H2", positions=[[0, 0, 0], [0, 0, 3.0]])
    pair = Atoms("HHH", positions=[[0, 0, 0], [0, 0, 4.0], [0, 0, 4.5]])
    contacts = closest_contacts(Batch.from_atoms([far, pair], dtype=torch.float64))
    assert contacts[0] is None
    assert {contacts[1].i, contacts[1].j} == {1, 2} and contacts[1].distance == pytest.approx(0.5)
    assert closest_contacts(Batch.from_atoms([far, far.copy()], dtype=torch.float64)) == [None, None]
