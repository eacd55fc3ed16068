"""The materials set's structures (scripts/crystals.py): every cell built, checked with spglib against its cited
space group and composition, sane distances; the queue plan's splits and shards (scripts/build_materials_set.py).

No xTB here: builds and symmetry checks only (seconds). The GFN1-xTB lattice check runs in the build script.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

spglib = pytest.importorskip("spglib")
from ase.formula import Formula  # noqa: E402
from ase.neighborlist import neighbor_list  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import build_materials_set as build  # noqa: E402
import crystals  # noqa: E402
from crystals import SYSTEMS  # noqa: E402

CHECKED = [name for name, s in SYSTEMS.items() if s.spacegroup is not None]


def spacegroup(atoms, symprec: float = 1e-3) -> int:
    """spglib's space group number of `atoms`."""
    ds = spglib.get_symmetry_dataset((atoms.cell[:], atoms.get_scaled_positions(), atoms.numbers), symprec=symprec)
    assert ds is not None, "spglib found no symmetry"
    return int(ds.number)


def reduced(formula: str) -> dict[str, int]:
    """Element counts of the reduced formula."""
    return dict(Formula(formula).reduce()[0].count())


def min_distance(atoms) -> float:
    """Shortest interatomic distance (Å), periodic images included."""
    return float(neighbor_list("d", atoms, 4.0).min())


def min_covalent_ratio(atoms) -> float:
    """Shortest distance over the sum of the two covalent radii, over all pairs (1 is a typical bond)."""
    from ase.data import covalent_radii

    i, j, d = neighbor_list("ijd", atoms, 4.0)
    return float((d / (covalent_radii[atoms.numbers[i]] + covalent_radii[atoms.numbers[j]])).min())


@pytest.mark.parametrize("name", CHECKED)
def test_space_group_and_composition_as_cited(name):
    s = SYSTEMS[name]
    cell = s.unit_cell()
    assert spacegroup(cell) == s.spacegroup, f"{name}: spglib finds another space group than cited"
    # a looser tolerance must not find a different group either (no near-miss of a higher symmetry)
    assert spacegroup(cell, 1e-2) == s.spacegroup
    assert reduced(cell.get_chemical_formula()) == reduced(s.formula), f"{name}: composition not as cited"


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_supercells_are_big_enough_and_no_atoms_overlap(name):
    s = SYSTEMS[name]
    sup = s.supercell()
    assert len(sup) >= 32, f"{name}: {len(sup)} atoms is too few for Γ-point labels"
    assert sup.pbc.all()
    assert reduced(sup.get_chemical_formula()) == reduced(s.formula)
    assert int(sup.numbers.sum()) % 2 == 0, "odd electron count: a closed-shell singlet label is impossible"
    assert min_covalent_ratio(sup) > 0.75, f"{name}: atoms too close"
    # the supercell keeps the unit cell's density
    assert np.isclose(sup.get_volume() / len(sup), s.unit_cell().get_volume() / len(s.unit_cell()))


def test_bond_lengths_of_the_hand_typed_structures():
    """Nearest-neighbour distances a wrong Wyckoff position would spoil (Å, typical published values ±0.06)."""
    expected = {
        "si": {("Si", "Si"): 2.35}, "quartz": {("O", "Si"): 1.61}, "tio2_rutile": {("O", "Ti"): 1.95},
        "kmgf3": {("F", "Mg"): 1.99}, "mgo": {("Mg", "O"): 2.11}, "nacl": {("Cl", "Na"): 2.82},
        "ice": {("H", "O"): 0.98}, "mof5": {("O", "Zn"): 1.94, ("C", "H"): 1.08, ("C", "C"): 1.39},
        "lgps": {("P", "S"): 2.03, ("Ge", "S"): 2.12}, "mg17al12": {("Al", "Mg"): 2.90},
    }
    for name, pairs in expected.items():
        atoms = SYSTEMS[name].unit_cell()
        i, j, d = neighbor_list("ijd", atoms, 3.5)
        sym = np.array(atoms.get_chemical_symbols())
        for (a, b), length in pairs.items():
            sel = ((sym[i] == a) & (sym[j] == b)) | ((sym[i] == b) & (sym[j] == a))
            assert sel.any(), f"{name}: no {a}-{b} pair within 3.5 Å"
            assert abs(d[sel].min() - length) < 0.07, f"{name}: shortest {a}-{b} {d[sel].min():.3f} Å, expected {length}"


def test_lgps_parent_is_p42nmc_and_the_approximant_is_ordered_and_neutral():
    parent = crystals.lgps_sites()
    assert spacegroup(parent) == 137  # every published site filled: the cited P4_2/nmc
    ordered = SYSTEMS["lgps"].unit_cell()
    assert Counter(ordered.get_chemical_symbols()) == {"Li": 20, "Ge": 2, "P": 4, "S": 24}
    assert spacegroup(ordered) == crystals.LGPS_ORDERED_SPACEGROUP
    li = ordered[[s == "Li" for s in ordered.get_chemical_symbols()]]
    assert min_distance(li) > 2.0  # one Li of each 1.46 Å Li1 pair


def test_mof5_primitive_cell_and_ice_molecules():
    assert len(SYSTEMS["mof5"].unit_cell()) == 106
    ice = SYSTEMS["ice"].supercell()
    i, j = neighbor_list("ij", ice, 1.2)
    sym = np.array(ice.get_chemical_symbols())
    oh = (sym[i] == "O") & (sym[j] == "H")
    assert (np.bincount(i[oh], minlength=len(ice))[sym == "O"] == 2).all()  # every O has exactly two H: ice rules


def test_water_box_density_and_intact_molecules():
    w = SYSTEMS["water"].supercell()
    assert len(w) == 3 * crystals.WATER_MOLECULES
    density = w.get_masses().sum() * 1.66053906660 / w.get_volume()  # g/cm³
    assert abs(density - crystals.WATER_DENSITY) < 0.005
    i, j, d = neighbor_list("ijd", w, 1.6)
    mol_i, mol_j = i // 3, j // 3
    assert (d[mol_i != mol_j] > 1.5).all(), "two molecules overlap"
    assert spacegroup(w, 1e-3) == 1


def test_slab_has_the_adsorbate_on_top_and_vacuum():
    slab = SYSTEMS["cu111_co"].supercell()
    z = slab.positions[:, 2]
    sym = np.array(slab.get_chemical_symbols())
    assert slab.cell[2, 2] - (z.max() - z.min()) >= 9.0  # vacuum
    assert z[sym == "C"][0] > z[sym == "Cu"].max() and z[sym == "O"][0] > z[sym == "C"][0]


def test_plan_splits_heldout_system_and_unique_shards():
    systems = list(SYSTEMS.values())
    jobs = build.plan_jobs(systems, build.FULL, 0)
    assert len({j.output for j in jobs}) == len(jobs)
    assert len({j.seed for j in jobs if j.kind == "label" and j.family != "md"}) == \
        sum(1 for j in jobs if j.kind == "label" and j.family != "md")
    labels = [j for j in jobs if j.kind == "label"]
    assert sum(j.frames for j in labels) >= 5000
    for j in labels:
        assert j.depends_on == [f"{j.system}.relax"]
        assert (j.split == "heldout") == (j.system in build.HELDOUT)
        assert 1 <= j.frames <= build.FULL.chunk
    splits = Counter(j.split for j in labels)
    assert {"train", "val", "test", "heldout"} <= set(splits)
    assert all(j.kind == "relax" for j in jobs[: len(systems) - len(build.LARGE)])  # relaxations first


def test_frames_of_each_family_are_deterministic_and_neutral():
    jobs = [j for j in build.plan_jobs([SYSTEMS["nacl"], SYSTEMS["ice"]], build.QUICK, 0) if j.kind == "label"]
    for j in jobs:
        base = SYSTEMS[j.system].supercell()
        a, b = build.make_frames(j, base, build.QUICK), build.make_frames(j, base, build.QUICK)
        assert len(a) == j.frames
        for fa, fb in zip(a, b):
            assert np.array_equal(fa.positions, fb.positions) and fa.info["split"] == j.split
            assert int(fa.numbers.sum()) % 2 == 0
            assert fa.info["system"] == j.system and fa.info["family"] == j.family
        if j.family == "vacancy":
            assert all(len(f) < len(base) for f in a)
            assert all(Formula(f.get_chemical_formula()).reduce()[0] == Formula(base.get_chemical_formula()).reduce()[0]
                       for f in a if j.system == "nacl")


@pytest.mark.parametrize("name", ["al", "mg", "quartz", "mg17al12", "ice"])
def test_relaxed_lattice_is_read_back_in_the_conventional_cell(name):
    """A supercell strained by (1 + eps) reports the cited conventional a, b, c strained the same way."""
    s = SYSTEMS[name]
    sup = s.supercell()
    eps = np.diag([0.03, -0.02, 0.01])
    cell = np.asarray(sup.cell) @ (np.eye(3) + eps)
    got = build.conventional_cellpar(s, cell)
    cited = build._cellpar_of(build._conventional(s))
    assert np.allclose(cited[:3], list(s.cited_lattice) * (3 if len(s.cited_lattice) == 1 else 1), atol=1e-3)
    if name in ("mg17al12", "ice"):  # orthogonal conventional axes along x, y, z
        assert np.allclose(got[:3], np.array(cited[:3]) * np.array([1.03, 0.98, 1.01]), atol=2e-4)
    assert not np.allclose(got[:3], cited[:3], atol=1e-3)
    iso = build.conventional_cellpar(s, np.asarray(sup.cell) * 1.02)
    assert np.allclose(iso[:3], np.array(cited[:3]) * 1.02, atol=2e-4) and np.allclose(iso[3:], cited[3:], atol=1e-3)


def test_strained_cells_cover_the_relaxed_and_the_cited_lattice():
    s = SYSTEMS["nacl"]
    cited = s.supercell()
    cited.info["base"] = "cited"
    relaxed = cited.copy()
    relaxed.set_cell(np.asarray(cited.cell) * 0.97, scale_atoms=True)
    relaxed.info["base"] = "relaxed"
    job = next(j for j in build.plan_jobs([s], build.FULL, 0) if j.family == "strain" and j.frames >= 8)
    frames = build.make_frames(job, relaxed, build.FULL, cited)
    bases = [f.info["base"] for f in frames]
    assert bases == ["cited" if k % 4 >= 2 else "relaxed" for k in range(len(frames))]
    for f in frames:  # each strained cell is 2-5 % from the cell it was made from
        ref = cited if f.info["base"] == "cited" else relaxed
        ratio = (f.get_volume() / ref.get_volume()) ** (1 / 3)
        assert 0.94 < ratio < 1.06
