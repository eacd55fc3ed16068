"""Covalent bond graphs (core.bonds) and the `bonds` MD monitor: a bond counts as broken beyond 1.5x its covalent
radius sum, as formed below 1.2x; periodic cells by minimum image; an MD run whose molecule falls apart stops at
the first change and says so."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.data import covalent_radii
from ase.io import read

from atomuq.core.bonds import BROKEN, FORMED, bond_changes, bond_graph
from atomuq.models.registry import resolve_model
from atomuq.workflows.md.monitor_plan import MonitorPlan
from atomuq.workflows.md.monitors import parse_monitor
from atomuq.workflows.md.run import MDRun, MDSettings, init_velocities


def test_the_graph_of_ethanol_is_its_chemical_graph():
    atoms = molecule("CH3CH2OH")  # C C O H(O) H H H H H in ASE's order
    bonds = {tuple(b) for b in bond_graph(atoms).tolist()}
    symbols = atoms.get_chemical_symbols()
    kinds = sorted("".join(sorted(symbols[i] + symbols[j])) for i, j in bonds)
    assert kinds == sorted(["CC", "CO", "HO"] + ["CH"] * 5)
    assert bond_changes(atoms.numbers, atoms.positions, bond_graph(atoms)) == (0, 0)


def test_stretching_counts_as_broken_only_beyond_the_factor_and_approach_as_formed():
    atoms = molecule("H2O")
    bonds = bond_graph(atoms)
    o, h = 0, 1
    rsum = covalent_radii[8] + covalent_radii[1]
    direction = (atoms.positions[h] - atoms.positions[o]) / np.linalg.norm(atoms.positions[h] - atoms.positions[o])
    for ratio, broken in ((1.4, 0), (1.6, 1)):
        p = atoms.positions.copy()
        p[h] = p[o] + ratio * rsum * direction
        assert bond_changes(atoms.numbers, p, bonds) == (broken, 0)
    p = atoms.positions.copy()  # bring the two hydrogens within FORMED x their covalent sum
    p[2] = p[1] + np.array([0.9 * FORMED * 2 * covalent_radii[1], 0.0, 0.0])
    assert bond_changes(atoms.numbers, p, bonds)[1] == 1
    assert BROKEN > FORMED


def test_periodic_bonds_cross_the_boundary_and_survive_wrapping():
    si = bulk("Si", "diamond", 5.43, cubic=True) * (2, 2, 2)
    bonds = bond_graph(si)
    assert len(bonds) == 2 * len(si)  # four bonds per atom, each counted once
    moved = si.copy()
    moved.positions[0] -= [0.3, 0.3, 0.3]  # leaves the cell; the minimum image keeps its bonds
    assert bond_changes(moved.numbers, moved.positions, bonds, moved.cell.array, moved.pbc) == (0, 0)
    moved.wrap()
    assert bond_changes(moved.numbers, moved.positions, bonds, moved.cell.array, moved.pbc) == (0, 0)
    far = si.copy()  # large random moves: the count agrees with ASE's minimum-image distances pair by pair
    far.positions += np.random.default_rng(0).normal(scale=0.6, size=far.positions.shape)
    rsum = 2 * covalent_radii[14]
    expected = sum(far.get_distance(i, j, mic=True) > BROKEN * rsum for i, j in bonds)
    broken, _ = bond_changes(far.numbers, far.positions, bonds, far.cell.array, far.pbc)
    assert broken == expected > 10


def test_the_monitor_starts_from_the_first_frame_and_resumes_its_reference():
    monitor = parse_monitor("bonds,every=5,max=0.5,action=stop")
    assert monitor.spec() == "bonds,every=5,max=0.5,action=stop"
    atoms = molecule("CH3CH2OH")
    assert monitor.check(atoms, 0, 0.0).value == 0.0
    pulled = atoms.copy()
    pulled.positions[[2, 3]] += [10.0, 0.0, 0.0]  # the OH group leaves: one bond (C-O) broken
    copy = parse_monitor("bonds,every=5,max=0.5,action=stop")
    copy.set_state(monitor.get_state())
    for m in (monitor, copy):
        reading = m.check(pulled, 5, 2.5)
        assert reading.breached and reading.value == 1.0 and "bonds = 1" in reading.reason()


@pytest.fixture(scope="module")
def model():
    return resolve_model(None)


def test_md_stops_when_the_molecule_falls_apart_and_keeps_a_cold_one(model, tmp_path):
    plan = MonitorPlan("custom", [parse_monitor("bonds,every=5,max=0.5,action=stop")])
    hot = molecule("CH3CH2OH")
    init_velocities(hot, 6000.0, 0)
    settings = MDSettings(steps=400, traj_every=5, temperature_K=6000.0)
    result = MDRun(hot, model, settings, tmp_path / "hot.extxyz", plan, say=lambda m: None).run()
    assert result.status == "stopped" and "bonds" in result.reason, result.reason
    frames = read(tmp_path / "hot.extxyz", ":")
    start, last = frames[0], frames[-1]
    assert start.info["bonds"] == 0 and last.info["bonds"] >= 1
    assert sum(bond_changes(last.numbers, last.positions, bond_graph(start))) == last.info["bonds"]
    cold = molecule("CH3CH2OH")
    init_velocities(cold, 100.0, 0)
    settings = MDSettings(steps=100, traj_every=20, temperature_K=100.0)
    result = MDRun(cold, model, settings, tmp_path / "cold.extxyz", plan, say=lambda m: None).run()
    assert result.status == "completed"
    assert all(a.info["bonds"] == 0 for a in read(tmp_path / "cold.extxyz", ":"))
