"""Crystallographic data of the materials reference set, each with its published source, and the structures built from it.

Every solid is built by ``ase.spacegroup.crystal`` from a space group (International Tables number, ASE's
default setting: origin choice 1 where there are two), lattice parameters in Å and degrees, and one
position per Wyckoff orbit (fractional). The numbers were typed by hand from the cited papers: that is why
``tests/test_materials_structures.py`` checks every built structure with spglib (space group and
composition as cited, no atoms too close) and ``scripts/build_materials_set.py`` checks each one's
GFN1-xTB relaxed lattice against the cited lattice (tolerance ``LATTICE_TOLERANCE``).

Public entry points: ``SYSTEMS`` (name -> System), ``System.unit_cell()`` (the cell spglib checks),
``System.supercell()`` (the cell that is labelled at the Γ point, at least about 32 atoms).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from ase import Atoms
from ase.spacegroup import crystal

#: relaxed lattice parameters (GFN1-xTB, Γ point, the supercell) must lie within this fraction of the cited ones
LATTICE_TOLERANCE = 0.05
#: water box: molecules, density (g/cm³) and the packing seed
WATER_MOLECULES, WATER_DENSITY, WATER_SEED = 64, 1.0, 20261201


@dataclass(frozen=True)
class System:
    """One system of the set: how its cited cell and its labelled supercell are built, and what spglib must find."""

    name: str
    group: str  # paper | prototype
    source: str  # where the numbers come from
    build: Callable[[], Atoms]  # the cited cell (unit cell, or the ordered approximant / slab / box)
    spacegroup: int | None  # what spglib must find in build() (None: not checked, the liquid)
    formula: str  # reduced formula (ASE 'metal' order) of build()
    repeat: tuple[int, int, int] = (1, 1, 1)  # supercell of build() that is labelled
    relax: str = "cell"  # cell: positions and cell (lattice check) | positions: positions only
    role: str = "train"  # train | heldout (every frame of a held-out system is kept out of training)
    emt_md: bool = False  # ASE's EMT covers every element: short EMT MD frames are sampled too
    vacancies: bool = True
    notes: str = ""
    cited_lattice: tuple[float, ...] = field(default=())  # a, b, c (Å) of build() as cited

    def unit_cell(self) -> Atoms:
        """The cited cell (spglib checks this one)."""
        built = self.build()  # only numbers, positions, cell: ase.spacegroup / ase.build extras stay behind
        return Atoms(built.numbers, built.positions, cell=built.cell, pbc=True, info={"system": self.name})

    def supercell(self) -> Atoms:
        """The cell labelled at the Γ point: unit_cell() repeated by `repeat`."""
        atoms = self.unit_cell() * self.repeat
        atoms.info = {"system": self.name}
        return atoms


# ---------------------------------------------------------------------------------------------
# elemental and binary prototypes


def _cubic(a: float) -> list[float]:
    return [a, a, a, 90.0, 90.0, 90.0]


def silicon() -> Atoms:
    """Diamond Si, Fd-3m (227), 8a; a = 5.4310 Å (Okada & Tokumaru, J. Appl. Phys. 56, 314 (1984))."""
    return crystal(["Si"], [(0, 0, 0)], spacegroup=227, cellpar=_cubic(5.4310))


def aluminium() -> Atoms:
    """fcc Al, Fm-3m (225), 4a; a = 4.0495 Å (Wyckoff, Crystal Structures vol. 1 (1963)); primitive cell."""
    return crystal(["Al"], [(0, 0, 0)], spacegroup=225, cellpar=_cubic(4.0495), primitive_cell=True)


def copper() -> Atoms:
    """fcc Cu, Fm-3m (225), 4a; a = 3.6149 Å (Wyckoff, Crystal Structures vol. 1 (1963)); primitive cell."""
    return crystal(["Cu"], [(0, 0, 0)], spacegroup=225, cellpar=_cubic(3.6149), primitive_cell=True)


def magnesium() -> Atoms:
    """hcp Mg, P6_3/mmc (194), 2c (1/3, 2/3, 1/4); a = 3.2094, c = 5.2108 Å (Walker & Marezio, Acta Metall. 7, 769 (1959))."""
    return crystal(["Mg"], [(1 / 3, 2 / 3, 0.25)], spacegroup=194, cellpar=[3.2094, 3.2094, 5.2108, 90, 90, 120])


def rocksalt(cation: str, anion: str, a: float) -> Callable[[], Atoms]:
    """Rock salt AB, Fm-3m (225): A 4a (0,0,0), B 4b (1/2,1/2,1/2); conventional cell of lattice a (Å)."""
    def build() -> Atoms:
        return crystal([cation, anion], [(0, 0, 0), (0.5, 0.5, 0.5)], spacegroup=225, cellpar=_cubic(a))
    return build


def rutile() -> Atoms:
    """Rutile TiO2, P4_2/mnm (136): Ti 2a, O 4f (x,x,0) x = 0.30478; a = 4.5937, c = 2.9587 Å
    (Burdett, Hughbanks, Miller, Richardson & Smith, J. Am. Chem. Soc. 109, 3639 (1987), 15 K neutron data)."""
    return crystal(["Ti", "O"], [(0, 0, 0), (0.30478, 0.30478, 0)], spacegroup=136,
                   cellpar=[4.5937, 4.5937, 2.9587, 90, 90, 90])


def potassium_magnesium_fluoride() -> Atoms:
    """Cubic perovskite KMgF3, Pm-3m (221): K 1a, Mg 1b, F 3c; a = 3.978 Å (Wyckoff, Crystal Structures vol. 2 (1964)).

    The set's perovskite. SrTiO3 (a = 3.9051 Å, Abramov et al., Acta Cryst. B51, 942 (1995)) was the first choice;
    GFN1-xTB at the Γ point runs away from it (a first BFGS step to 0.90 of the volume and -0.63 eV/atom, then the
    overlap matrix fails, 'sygvd failed'); BaTiO3 fails at once. KMgF3 relaxes normally (stress 0.06 GPa at -3.6 %
    in a). See data/materials/README.md."""
    return crystal(["K", "Mg", "F"], [(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)], spacegroup=221,
                   cellpar=_cubic(3.978))


def alpha_quartz() -> Atoms:
    """alpha-quartz SiO2, P3_221 (154): Si 3a x = 0.4697, O 6c (0.4135, 0.2669, 0.1191); a = 4.9160, c = 5.4054 Å
    (Levien, Prewitt & Weidner, Am. Mineral. 65, 920 (1980), ambient pressure). The paper puts Si at z = 0; in the
    International Tables origin of P3_221 (ASE's) every z is shifted by +2/3 (Si 3a at z = 2/3, O z = 0.1191 + 2/3)."""
    return crystal(["Si", "O"], [(0.4697, 0, 2 / 3), (0.4135, 0.2669, 0.1191 + 2 / 3)], spacegroup=154,
                   cellpar=[4.9160, 4.9160, 5.4054, 90, 90, 120])


# ---------------------------------------------------------------------------------------------
# the Force Delta paper's systems


def ice_xi() -> Atoms:
    """Proton-ordered ice XI, Cmc2_1 (36), Z = 8 (the ordered approximant of ice Ih).

    Lattice: ice Ih at 10 K (Röttger, Endriss, Ihringer, Doyle & Kuhs, Acta Cryst. B50, 644 (1994): a_h = 4.4969,
    c = 7.3211 Å) in the orthohexagonal cell of ice XI, a = a_h, b = √3 a_h, c. Ordering: the ferroelectric Cmc2_1
    arrangement of ice XI (Leadbetter et al., J. Chem. Phys. 82, 424 (1985); Line & Whitworth, J. Chem. Phys. 104,
    10008 (1996)): O1 and O2 on 4a, H1, H2 on 4a, H3 on 8b. Positions are the ideal ones of that arrangement:
    O on the tetrahedral ice Ih framework (z = 1/16, 7/16), H at 0.98 Å from its O along the O···O line
    (enumerated over every ice-rule ordering of the 8-molecule cell; this is its Cmc2_1 one).
    """
    a, c = 4.4969, 7.3211
    return crystal(["O", "O", "H", "H", "H"],
                   [(0.0, 1 / 3, 1 / 16), (0.0, 1 / 3, 7 / 16), (0.0, 0.4520, 0.0180), (0.0, 1 / 3, 0.1964),
                    (0.1780, 0.7260, 0.9820)],
                   spacegroup=36, cellpar=[a, np.sqrt(3) * a, c, 90, 90, 90])


def mg17al12() -> Atoms:
    """gamma-Mg17Al12 (alpha-Mn type), I-43m (217): Mg1 2a, Mg2 8c x = 0.324, Mg3 24g (0.3582, 0.3582, 0.0393),
    Al 24g (0.0954, 0.0954, 0.2725); a = 10.5438 Å (Schobinger-Papamantellos & Fischer, Naturwissenschaften 57, 128
    (1970)). Conventional cell, 58 atoms (the primitive bcc cell has 29, too few for Γ-point labels)."""
    return crystal(["Mg", "Mg", "Mg", "Al"],
                   [(0, 0, 0), (0.324, 0.324, 0.324), (0.3582, 0.3582, 0.0393), (0.0954, 0.0954, 0.2725)],
                   spacegroup=217, cellpar=_cubic(10.5438))


#: LGPS (Kamaya et al., Nat. Mater. 10, 682 (2011)), P4_2/nmc (137), origin choice 1: a = 8.7177, c = 12.6345 Å.
#: site: (species, fractional position, occupancy as published)
LGPS_CELL = [8.7177, 8.7177, 12.6345, 90.0, 90.0, 90.0]
LGPS_SITES = {
    "Ge1/P1 4d": ("Ge/P", (0.0, 0.5, 0.6975), "Ge 0.5 / P 0.5"),
    "P2 2b": ("P", (0.0, 0.0, 0.5), "1"),
    "S1 8g": ("S", (0.0, 0.1798, 0.4058), "1"),
    "S2 8g": ("S", (0.0, 0.2915, 0.0956), "1"),
    "S3 8g": ("S", (0.0, 0.2993, 0.7897), "1"),
    "Li1 16h": ("Li", (0.2472, 0.2711, 0.1942), "0.69"),
    "Li2 4d": ("Li", (0.0, 0.5, 0.9466), "1"),
    "Li3 8f": ("Li", (0.2308, 0.2308, 0.0), "0.64"),
}
#: the space group spglib finds for the ordered approximant lgps_ordered() builds
LGPS_ORDERED_SPACEGROUP = 105  # P4_2mc


def lgps_sites() -> Atoms:
    """Every LGPS site of LGPS_SITES fully occupied (the 4d Ge/P site as Ge): the parent structure, 58 sites.

    Array 'site' numbers the Wyckoff orbit (order of LGPS_SITES)."""
    species = [s.split("/")[0] for s, _, _ in LGPS_SITES.values()]
    atoms = crystal(species, [p for _, p, _ in LGPS_SITES.values()], spacegroup=137, cellpar=LGPS_CELL)
    atoms.set_array("site", atoms.get_array("spacegroup_kinds").copy())
    return atoms


def _screened_coulomb(atoms: Atoms, cutoff: float = 12.0, alpha: float = 0.25) -> np.ndarray:
    """Pair matrix W (eV per e², Å units) of erfc(alpha r)/r summed over images within cutoff (Wolf-type sum)."""
    from scipy.special import erfc

    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, cutoff)
    w = np.zeros((len(atoms), len(atoms)))
    np.add.at(w, (i, j), 14.399645 * erfc(alpha * d) / d)
    return w


def lgps_ordered() -> Atoms:
    """An ordered approximant of LGPS, Li20Ge2P4S24 (50 atoms, one conventional cell).

    How it is chosen: the framework sites (P2 2b, S1-S3 8g) and Li2 4d are fully occupied as published. The Li1 16h
    sites come in 8 pairs 1.46 Å apart (so at most one of a pair holds Li; the published occupancy is 0.69); the 8f
    sites (Li3, occupancy 0.64) are 2.5 Å from their Li1 neighbours. The approximant fills Li3 8f completely and one
    Li1 of every pair (8 + 8 + 4 = 20 Li), and puts 2 Ge and 2 P on the four 4d Ge/P sites. Of the 6 x 2^8 such
    orderings it takes the one with the lowest screened Coulomb energy of formal charges (Li+1, Ge+4, P+5, S-2;
    erfc(0.25 r)/r summed to 12 Å; the approach of Mo, Ong & Ceder, Chem. Mater. 24, 15 (2012), who ranked LGPS
    orderings by electrostatic energy), ties broken by enumeration order. spglib's space group of the result is
    LGPS_ORDERED_SPACEGROUP; the parent (every site filled) is checked against P4_2/nmc (137).
    """
    parent = lgps_sites()
    site = parent.get_array("site")
    names = list(LGPS_SITES)
    ge_sites = np.flatnonzero(site == names.index("Ge1/P1 4d"))
    li1 = np.flatnonzero(site == names.index("Li1 16h"))
    d = parent.get_all_distances(mic=True)[np.ix_(li1, li1)]
    pairs = sorted({tuple(sorted((int(li1[k]), int(li1[int(np.argmin(d[k] + 100 * np.eye(len(li1))[k]))]))))
                    for k in range(len(li1))})
    if len(pairs) != 8:
        raise ValueError(f"LGPS: expected 8 Li1 pairs, found {len(pairs)}")
    charge = {"Li": 1.0, "Ge": 4.0, "P": 5.0, "S": -2.0}
    base_q = np.array([charge[s] for s in parent.get_chemical_symbols()])
    w = _screened_coulomb(parent)
    best: tuple[float, list[int], tuple[int, ...]] | None = None
    for ge in itertools.combinations(range(4), 2):
        q_frame = base_q.copy()
        q_frame[ge_sites] = 5.0
        q_frame[ge_sites[list(ge)]] = 4.0
        for choice in itertools.product((0, 1), repeat=8):
            q = q_frame.copy()
            for (p0, p1), c in zip(pairs, choice):
                q[p1 if c == 0 else p0] = 0.0  # the other member of the pair is empty
            energy = round(0.5 * float(q @ w @ q), 6)
            if best is None or energy < best[0]:  # ties: the first in enumeration order
                best = (energy, list(ge), choice)
    assert best is not None
    _, ge, choice = best
    keep = np.ones(len(parent), dtype=bool)
    for (p0, p1), c in zip(pairs, choice):
        keep[p1 if c == 0 else p0] = False
    symbols = parent.get_chemical_symbols()
    for k, s in enumerate(ge_sites):
        symbols[s] = "Ge" if k in ge else "P"
    out = Atoms(symbols, scaled_positions=parent.get_scaled_positions(), cell=parent.cell, pbc=True)[keep]
    order = np.argsort(out.numbers, kind="stable")
    return out[order]


def mof5() -> Atoms:
    """MOF-5 (IRMOF-1), Zn4O(BDC)3, Fm-3m (225), primitive cell of 106 atoms; a = 25.832 Å
    (Eddaoudi et al., Science 295, 469 (2002); structure of Li, Eddaoudi, O'Keeffe & Yaghi, Nature 402, 276 (1999)).

    Zn 32f x = 0.2934; O1 (mu4-O) 8c; O2 (carboxylate) 96k; C1 (carboxylate) 48g x = 0.1117; C2 (ipso) 48g
    x = 0.0538; C3 (ring CH) 96k; H 96k. The 96k positions are written as the orbit member on the linker along x
    through (x, 1/4, 1/4) with the linker plane y + z = 1/2 (carboxylate and ring coplanar, as published).
    """
    return crystal(["Zn", "O", "O", "C", "C", "C", "H"],
                   [(0.2934, 0.2934, 0.2934), (0.25, 0.25, 0.25), (0.1340, 0.2801, 0.2199), (0.1117, 0.25, 0.25),
                    (0.0538, 0.25, 0.25), (0.0269, 0.2830, 0.2170), (0.0478, 0.3086, 0.1914)],
                   spacegroup=225, cellpar=_cubic(25.832), primitive_cell=True)


def water_box(n: int = WATER_MOLECULES, density: float = WATER_DENSITY, seed: int = WATER_SEED) -> Atoms:
    """A liquid water box: n molecules (O-H 0.9572 Å, H-O-H 104.52°) at `density` g/cm³, seeded packing.

    Molecules sit on the sites of a cubic grid (n must be a cube), each shifted by up to 0.3 Å and turned to a
    random orientation (seeded): no two molecules overlap, and a short GFN1-xTB relaxation (build script) then
    removes the grid's stress. No spglib check (a liquid).
    """
    from ase.data import atomic_masses
    from ase.units import _amu

    side = round(n ** (1 / 3))
    if side ** 3 != n:
        raise ValueError(f"water box: {n} molecules is not a cube number")
    mass = (2 * atomic_masses[1] + atomic_masses[8]) * n * _amu * 1e3  # g
    length = (mass / density * 1e24) ** (1 / 3)  # Å
    rng = np.random.default_rng(seed)
    theta = np.deg2rad(104.52 / 2)
    mol = np.array([[0, 0, 0], [0.9572 * np.sin(theta), 0, 0.9572 * np.cos(theta)],
                    [-0.9572 * np.sin(theta), 0, 0.9572 * np.cos(theta)]])
    mol -= mol.mean(axis=0)
    positions = []
    spacing = length / side
    for ijk in itertools.product(range(side), repeat=3):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        centre = (np.array(ijk) + 0.5) * spacing + rng.uniform(-0.3, 0.3, 3)
        positions.append(mol @ q.T + centre)
    atoms = Atoms("OH2" * n, positions=np.vstack(positions), cell=[length] * 3, pbc=True)
    atoms.wrap()
    return atoms


def cu111_co() -> Atoms:
    """Cu(111) slab, 3x3 surface cell, 4 layers, CO on top of one surface atom (C down, Cu-C 1.85 Å, C-O 1.15 Å),
    10 Å of vacuum; periodic in all three directions (tblite handles 0D or 3D cells), lateral lattice from
    Cu a = 3.6149 Å (as for bulk Cu). Built with ase.build.fcc111 and add_adsorbate."""
    from ase.build import add_adsorbate, fcc111

    slab = fcc111("Cu", size=(3, 3, 4), a=3.6149, vacuum=5.0, periodic=True)
    co = Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)])
    add_adsorbate(slab, co, height=1.85, position="ontop", mol_index=0)
    slab.center(vacuum=5.0, axis=2)
    slab.pbc = True
    return slab


SYSTEMS: dict[str, System] = {s.name: s for s in [
    # the paper's systems
    System("ice", "paper", "ice XI (Leadbetter 1985; Line & Whitworth 1996), lattice of ice Ih at 10 K (Röttger 1994)",
           ice_xi, 36, "H2O", (2, 1, 1), cited_lattice=(4.4969, 7.7889, 7.3211),
           notes="proton-ordered approximant of ice Ih; vacancies remove a whole molecule"),
    System("mg17al12", "paper", "Schobinger-Papamantellos & Fischer, Naturwissenschaften 57, 128 (1970)",
           mg17al12, 217, "Mg17Al12", cited_lattice=(10.5438,)),
    System("lgps", "paper", "Kamaya et al., Nat. Mater. 10, 682 (2011); ordered approximant (see lgps_ordered)",
           lgps_ordered, LGPS_ORDERED_SPACEGROUP, "Li10GeP2S12", cited_lattice=(8.7177, 8.7177, 12.6345),
           notes="partial occupancies resolved by the lowest screened-Coulomb ordering; vacancies remove Li2S"),
    System("mof5", "paper", "Eddaoudi et al., Science 295, 469 (2002) (IRMOF-1); Li et al., Nature 402, 276 (1999)",
           mof5, 225, "Zn4C24H12O13", cited_lattice=(25.832,), vacancies=False, notes="primitive cell, 106 atoms"),
    System("water", "paper", "liquid water, 64 molecules at 1.0 g/cm3, seeded grid packing (water_box)",
           water_box, None, "H2O", relax="positions", vacancies=False),
    System("cu111_co", "paper", "Cu(111) 3x3x4 slab + CO on top (ase.build.fcc111; Cu lattice as bulk Cu)",
           cu111_co, 156, "Cu36CO", relax="positions", vacancies=False,
           notes="stands in for the paper's CaPd-NH2 surface (OC22); space group of the 3D cell checked"),
    # elemental and binary prototypes
    System("si", "prototype", "Okada & Tokumaru, J. Appl. Phys. 56, 314 (1984)", silicon, 227, "Si", (2, 2, 2),
           cited_lattice=(5.4310,)),
    System("al", "prototype", "Wyckoff, Crystal Structures vol. 1 (1963)", aluminium, 225, "Al", (4, 4, 4),
           cited_lattice=(4.0495,), emt_md=True),
    System("cu", "prototype", "Wyckoff, Crystal Structures vol. 1 (1963)", copper, 225, "Cu", (4, 4, 4),
           cited_lattice=(3.6149,), emt_md=True),
    System("mg", "prototype", "Walker & Marezio, Acta Metall. 7, 769 (1959)", magnesium, 194, "Mg", (4, 4, 2),
           cited_lattice=(3.2094, 3.2094, 5.2108)),
    System("mgo", "prototype", "Hazen, Am. Mineral. 61, 266 (1976)", rocksalt("Mg", "O", 4.2112), 225, "MgO",
           (2, 2, 2), cited_lattice=(4.2112,), role="heldout", notes="held-out system: no frame in training"),
    System("nacl", "prototype", "Wyckoff, Crystal Structures vol. 1 (1963)", rocksalt("Na", "Cl", 5.6402), 225,
           "ClNa", (2, 2, 2), cited_lattice=(5.6402,)),
    System("lif", "prototype", "Wyckoff, Crystal Structures vol. 1 (1963)", rocksalt("Li", "F", 4.0270), 225, "FLi",
           (2, 2, 2), cited_lattice=(4.0270,)),
    System("tio2_rutile", "prototype", "Burdett et al., J. Am. Chem. Soc. 109, 3639 (1987)", rutile, 136, "O2Ti",
           (2, 2, 3), cited_lattice=(4.5937, 4.5937, 2.9587)),
    System("kmgf3", "prototype", "Wyckoff, Crystal Structures vol. 2 (1964)", potassium_magnesium_fluoride, 221,
           "F3KMg", (2, 2, 2), cited_lattice=(3.978,), notes="the perovskite; replaces SrTiO3 (GFN1-xTB runs away)"),
    System("quartz", "prototype", "Levien, Prewitt & Weidner, Am. Mineral. 65, 920 (1980)", alpha_quartz, 154,
           "O2Si", (2, 2, 2), cited_lattice=(4.9160, 4.9160, 5.4054)),
]}
