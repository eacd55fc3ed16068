"""The broad molecular set's build script: molecule roles, held-out dissimilarity, job queue, bond-graph filter.

No xTB calculation here (seconds): the script's pure parts only.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdkit")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_broad_molecular_set.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_broad_molecular_set", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def molecules(build):
    return build.load_molecules()


def test_roles_and_heldout_dissimilarity(build, molecules):
    roles = {m.name: m.role for m in molecules}
    assert len(molecules) >= 150
    for name in ("aspirin", "paracetamol", "dha", "ac_ala3_nhme", "stachyose", "ibuprofen", "caffeine"):
        assert roles[name] == "train"
    for name in ("naproxen", "3bpa", "nicotine"):
        assert roles[name] == "heldout"
    held = [m for m in molecules if m.role == "heldout"]
    assert len(held) >= 15
    for m in held:
        assert (not m.scaffold_in_training) or m.max_tanimoto_to_training <= build.TANIMOTO_MAX, m.name
    assert set().union(*(m.elements for m in held)) >= {"F", "S", "Cl", "P"}
    assert set().union(*(m.elements for m in molecules if m.role == "train")) >= {"H", "C", "N", "O", "F", "S", "Cl", "P"}


def test_jobs_split_by_molecule_and_trajectory(build, molecules):
    jobs = build.plan_jobs(molecules, build.FULL, seed=0)
    assert [j.id for j in jobs] == [j.id for j in build.plan_jobs(molecules, build.FULL, seed=0)]
    assert len({j.id for j in jobs}) == len(jobs) and len({j.seed for j in jobs}) == len(jobs)
    assert len({j.output for j in jobs}) == len(jobs)
    roles = {m.name: m.role for m in molecules}
    by_id = {j.id: j for j in jobs}
    position = {j.id: k for k, j in enumerate(jobs)}
    split_of: dict[tuple[str, int], set[str]] = {}
    for j in jobs:
        for name, confs in j.conformers.items():
            assert (j.split == "heldout") == (roles[name] == "heldout")
            for c in confs:
                split_of.setdefault((name, c), set()).add(j.split)
        for d in j.depends_on:  # dependencies exist, share the split and come earlier in the queue
            assert by_id[d].split == j.split and position[d] < position[j.id]
    assert all(len(s) == 1 for s in split_of.values())  # one trajectory, one split
    assert {j.stage for j in jobs if j.kind == "sample"} == set(build.STAGES)
    assert all(build.job_output(j.id) == j.output for j in jobs)
    large = {m.name: m.large for m in molecules}
    assert all(len({large[n] for n in j.molecules}) == 1 and len(j.molecules) <= build.FULL.batch_max for j in jobs)
    assert sum(j.frames_expected for j in jobs) >= 20_000
    first = [j for j in jobs if j.tier == 0]
    assert {name for j in first for name in j.molecules} == set(roles)  # every molecule at 300 K in the first tier


def test_bond_graph_filter_and_off_equilibrium_frames(build, molecules):
    mol = next(m for m in molecules if m.name == "ethanol")
    conf = build.make_conformers(mol, build.QUICK, seed=0)[0]
    bonds = np.array(mol.bonds).reshape(-1, 2)
    assert build.bond_graph_change(conf.numbers, conf.positions, bonds) == (0, 0)
    c, o = next((i, j) for i, j in bonds if {conf.numbers[i], conf.numbers[j]} == {6, 8})
    pos = conf.positions.copy()
    pos[o] = pos[c] + 1.7 * (pos[o] - pos[c])  # C-O stretched to about 2.4 Å: broken
    assert build.bond_graph_change(conf.numbers, pos, bonds)[0] == 1
    h = next(k for k in range(len(conf)) if conf.numbers[k] == 1 and c not in bonds[(bonds == k).any(1)].ravel())
    pos = conf.positions.copy()
    pos[h] = pos[c] + np.array([0.0, 0.0, 1.0])  # an H not on that carbon put 1 Å from it: formed
    assert build.bond_graph_change(conf.numbers, pos, bonds)[1] >= 1
    rng = np.random.default_rng(0)
    frames = build.offeq_structures(mol, [conf], rng, build.FULL, 0)
    assert len(frames) == build.n_offeq(build.FULL)
    assert all(build.intact(f, bonds) for f in frames)
    rattles = [f for f in frames if f.info["perturbation"] == "rattle"]
    sigma = np.array([f.info["rattle_sigma_A"] for f in rattles])
    rms = np.array([np.sqrt(((f.positions - conf.positions) ** 2).sum(1).mean()) for f in rattles])
    assert np.all(np.abs(rms - sigma) < 0.6 * sigma)  # 9 atoms: the rms scatters around the asked value
    torsions = [f for f in frames if f.info["perturbation"] == "torsion"]
    assert torsions and all(np.abs(f.positions - conf.positions).max() > 0.1 for f in torsions)
