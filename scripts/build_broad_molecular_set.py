"""Build the broad molecular set (GFN2-xTB) as a resumable job queue driven by `atomuq sample` and `atomuq label`.

Continue (or start) the build, two worker processes, low priority:
    nice -n 19 /work/main/.venv/bin/python scripts/build_broad_molecular_set.py --workers 2
See the plan without running anything:
    python scripts/build_broad_molecular_set.py --plan
Smoke test (three small molecules, a few frames, under out/molecular_broad_quick):
    python scripts/build_broad_molecular_set.py --quick --workers 2

What it does, from one seed (default 0):
1. Molecules: the SMILES of scripts/broad_molecules.py (H C N O F S Cl P, neutral, closed shell),
   each with its role (train / heldout). Held-out molecules are checked against every training molecule:
   Bemis-Murcko scaffold not among the training scaffolds, or Morgan (r=2, 2048 bits) Tanimoto <= 0.4;
   both numbers go to the manifest, and a held-out molecule failing both stops the script.
2. Conformers: RDKit ETKDGv3 (random seed from --seed), MMFF94 relaxed, the lowest-energy one and then
   the most distant ones (heavy-atom RMSD) kept: 3 per training molecule, 2 per held-out or large molecule.
   Written once to OUT/conformers.extxyz.gz and reused by every later run.
3. Jobs (OUT/manifest.json): per molecule and conformer group (split), one `atomuq sample` job per stage
   md300 -> md600 -> md1200. Each conformer is ONE trajectory heated in stages: the 600 K stage starts from
   the last intact frame of that conformer's 300 K stage, 1200 K from 600 K; each stage has one burn-in
   (equilibration) with fresh Maxwell-Boltzmann velocities. Off-equilibrium frames (rattled, one bond
   stretched or compressed, one torsion turned) are made from the 300 K frames and labelled as single
   points by `atomuq label` jobs (a chunk of molecules per job, one split per job).
   Splits are by molecule (heldout) and by trajectory (train / val / test: one conformer of each training
   molecule is val or test, alternately; its MD and off-equilibrium frames all carry that split).
4. Each job writes its own compressed shard OUT/shards/<stage>/<job>.extxyz.gz once, atomically, after
   dropping frames whose covalent bond graph changed against the molecule's (see README: dissociation
   filter); OUT/state.json lists done jobs (frames, dropped frames, SCF failures, CPU seconds).
   A rerun skips done jobs; a killed job reruns from the sample/label command's own resume files under
   OUT/work/ (not committed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np

from atomuq.core.bonds import BROKEN, FORMED, bond_changes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from broad_molecules import MOLECULES  # noqa: E402
from build_queue import (Running, acquire_lock, atomuq_command, check_exit, finished, launch, load_state, lower_priority,  # noqa: E402
                         export_splits, progress, read_failures, read_frames, say, sync_manifest, write_json,
                         write_shard)

METHOD = "gfn2-xtb"
#: tblite options passed to every command (tblite defaults otherwise: accuracy 1.0, electronic temperature 300 K)
TBLITE_OPTIONS = {"charge": 0, "multiplicity": 1}
ELEMENTS = {"H", "C", "N", "O", "F", "S", "Cl", "P"}
TANIMOTO_MAX = 0.4
LARGE_ATOMS = 45  # molecules with more atoms get fewer conformers and frames
STAGES = {"md300": 300.0, "md600": 600.0, "md1200": 1200.0}
#: bond-graph filter (atomuq.core.bonds): a bond of the molecule is broken beyond BROKEN x the sum of covalent
#: radii; two atoms not bonded in the molecule have formed a bond inside FORMED x that sum (1.5 and 1.2)
#: measured cost model: seconds per GFN2-xTB MD step on one core ~ 9.3 ms (aspirin, 21 atoms) x (N/21)^2.25
STEP_SECONDS_21, STEP_EXPONENT = 0.0093, 2.25
SINGLE_POINT_STEPS = 3.0  # a single point from scratch costs about three MD steps (SCF from the SAD guess)
STARTUP_SECONDS = 5.0  # one `atomuq` command start (imports)


@dataclass(frozen=True)
class Plan:
    """Sampling settings: frames per stage, steps (0.5 fs each), conformers."""

    conformers: int = 3  # per training molecule (train, train, val/test)
    conformers_small_set: int = 2  # per held-out or large molecule
    embed_attempts: int = 30  # ETKDG conformers before the MMFF relaxation and the diversity pick
    frames: int = 12  # kept MD frames per stage and trajectory
    frames_large: int = 6
    interval: int = 40  # MD steps between kept frames (20 fs)
    burn_in_first: int = 200  # steps before the first 300 K frame (from the MMFF structure)
    burn_in: int = 100  # steps before the first frame of the 600 K and 1200 K stages
    timestep: float = 0.5  # fs
    friction: float = 0.02  # 1/fs
    rattles: tuple[float, ...] = (0.02, 0.05, 0.08, 0.12, 0.15, 0.2, 0.25)  # Å, rms displacement per atom
    stretches: tuple[float, ...] = (1.12, 1.25)  # bond length factors
    compressions: tuple[float, ...] = (0.88,)
    torsions: int = 3
    batch_seconds: float = 40.0  # estimated 300 K compute per command at least this (one start, about 5 s, per batch)
    batch_max: int = 12  # molecules per command at most


FULL = Plan()
QUICK = Plan(conformers=2, conformers_small_set=1, embed_attempts=4, frames=2, frames_large=1, interval=5,
             burn_in_first=10, burn_in=5, rattles=(0.05, 0.2), stretches=(1.2,), compressions=(0.9,), torsions=1,
             batch_seconds=0.5, batch_max=2)
QUICK_MOLECULES = ("paracetamol", "dmso", "sulfolane")


# ---------------------------------------------------------------------------------------------
# molecules


@dataclass
class Molecule:
    index: int
    name: str
    smiles: str
    role: str
    atoms: int
    elements: list[str]
    scaffold: str
    large: bool
    nearest_training: str = ""
    max_tanimoto_to_training: float = 0.0
    scaffold_in_training: bool = False
    bonds: list[tuple[int, int]] = field(default_factory=list, repr=False)


def load_molecules(names: tuple[str, ...] | None = None) -> list[Molecule]:
    """Parse every SMILES, check elements and charge, and compute the held-out dissimilarity (scaffold, Tanimoto)."""
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator
    from rdkit.Chem.Scaffolds import MurckoScaffold

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    seen_names, seen_smiles = set(), set()
    mols, fps = [], []
    for index, (name, smiles, role) in enumerate(MOLECULES):
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            raise SystemExit(f"broad_molecules.py: {name}: RDKit cannot parse {smiles!r}")
        canonical = Chem.MolToSmiles(mol)
        if name in seen_names or canonical in seen_smiles:
            raise SystemExit(f"broad_molecules.py: {name} is listed twice (name or molecule)")
        seen_names.add(name)
        seen_smiles.add(canonical)
        if role not in ("train", "heldout"):
            raise SystemExit(f"broad_molecules.py: {name}: role must be train or heldout, not {role!r}")
        if Chem.GetFormalCharge(mol) != 0:
            raise SystemExit(f"broad_molecules.py: {name}: net charge {Chem.GetFormalCharge(mol)} (neutral molecules only)")
        molh = Chem.AddHs(mol)
        elements = sorted({a.GetSymbol() for a in molh.GetAtoms()})
        if not set(elements) <= ELEMENTS:
            raise SystemExit(f"broad_molecules.py: {name}: elements {sorted(set(elements) - ELEMENTS)} outside {sorted(ELEMENTS)}")
        bonds = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in molh.GetBonds()]
        mols.append(Molecule(index, name, smiles, role, molh.GetNumAtoms(), elements,
                             MurckoScaffold.MurckoScaffoldSmiles(mol=mol), molh.GetNumAtoms() > LARGE_ATOMS, bonds=bonds))
        fps.append(gen.GetFingerprint(mol))
    train = [k for k, m in enumerate(mols) if m.role == "train"]
    train_scaffolds = {mols[k].scaffold for k in train}
    for k, m in enumerate(mols):
        if m.role != "heldout":
            continue
        sims = DataStructs.BulkTanimotoSimilarity(fps[k], [fps[j] for j in train])
        best = int(np.argmax(sims))
        m.nearest_training, m.max_tanimoto_to_training = mols[train[best]].name, round(float(sims[best]), 4)
        m.scaffold_in_training = m.scaffold in train_scaffolds
        if m.scaffold_in_training and m.max_tanimoto_to_training > TANIMOTO_MAX:
            raise SystemExit(f"broad_molecules.py: held-out {m.name} shares its scaffold with a training molecule and has "
                             f"Tanimoto {m.max_tanimoto_to_training:.2f} > {TANIMOTO_MAX} to {m.nearest_training}: "
                             "choose another held-out molecule")
    if names is not None:
        mols = [m for m in mols if m.name in names]
    return mols


def n_conformers(m: Molecule, plan: Plan) -> int:
    """Conformers (= trajectories) of one molecule."""
    return plan.conformers_small_set if (m.role == "heldout" or m.large) else plan.conformers


def groups_of(m: Molecule, plan: Plan) -> list[tuple[str, list[int]]]:
    """(split, conformer ids) per job group: training molecules: train + one val or test conformer; held-out: all."""
    n = n_conformers(m, plan)
    if m.role == "heldout":
        return [("heldout", list(range(n)))]
    evaluation = "test" if (m.index < 7 or m.index % 2 == 0) else "val"  # the small set's training molecules: test
    return [("train", list(range(n - 1))), (evaluation, [n - 1])]


# ---------------------------------------------------------------------------------------------
# conformers


def make_conformers(m: Molecule, plan: Plan, seed: int) -> list:
    """ETKDGv3 embeddings (seeded) relaxed with MMFF94; the lowest-energy one, then farthest-first by heavy-atom RMSD."""
    from ase import Atoms
    from rdkit import Chem
    from rdkit.Chem import AllChem, rdMolAlign

    mol = Chem.AddHs(Chem.MolFromSmiles(m.smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed * 100_003 + m.index) % 2_147_483_647
    params.numThreads = 1
    ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=plan.embed_attempts, params=params))
    if not ids:
        raise SystemExit(f"{m.name}: RDKit could not embed {m.smiles}")
    results = AllChem.MMFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=2000)
    energies = [e if conv == 0 else e + 1e6 for conv, e in results]  # unconverged ones last
    # distinct minima: one embedding per MMFF energy (0.01 kcal/mol), lowest energy first
    order, seen = [], set()
    for k in sorted(range(len(ids)), key=lambda k: energies[k]):
        if round(energies[k], 2) not in seen:
            seen.add(round(energies[k], 2))
            order.append(k)
    chosen = [order[0]]
    want = min(n_conformers(m, plan), len(order))
    noh = Chem.RemoveHs(mol)
    while len(chosen) < want:  # farthest first: symmetry-aware heavy-atom RMSD to the ones already chosen
        dist = {k: min(rdMolAlign.GetBestRMS(noh, noh, ids[c], ids[k], maxMatches=1000) for c in chosen)
                for k in order if k not in chosen}
        chosen.append(max(dist, key=lambda k: (dist[k], -k)))
    symbols = [a.GetSymbol() for a in mol.GetAtoms()]
    out = []
    for conf_id, k in enumerate(chosen):
        pos = mol.GetConformer(ids[k]).GetPositions()
        atoms = Atoms(symbols, pos - pos.mean(axis=0))
        atoms.info.update(molecule=m.name, conformer=conf_id, mmff_energy_kcal=round(float(results[k][1]), 4),
                          mmff_converged=bool(results[k][0] == 0))
        out.append(atoms)
    if len(out) < n_conformers(m, plan):  # fewer distinct embeddings than asked (tiny molecules): repeat, MD differs
        n_distinct = len(out)
        for k in range(n_distinct, n_conformers(m, plan)):
            a = out[k % n_distinct].copy()
            a.info.update(conformer=k, repeat_of=k % n_distinct)
            out.append(a)
    return out


def load_or_make_conformers(mols: list[Molecule], plan: Plan, seed: int, path: Path) -> dict[str, list]:
    """Conformers per molecule name, read from `path` when it exists (so every run uses the same), else made and written."""
    from ase.io import read

    if path.exists():
        by = {}
        for a in read(path, ":"):
            by.setdefault(a.info["molecule"], []).append(a)
        missing = [m.name for m in mols if len(by.get(m.name, [])) != n_conformers(m, plan)]
        if not missing:
            return by
        say(f"{path}: conformers missing or incomplete for {len(missing)} molecules ({', '.join(missing[:5])}...); making them")
    else:
        by = {}
    for m in mols:
        if len(by.get(m.name, [])) != n_conformers(m, plan):
            by[m.name] = make_conformers(m, plan, seed)
    write_shard(path, [a for m in mols for a in by[m.name]])
    return by


# ---------------------------------------------------------------------------------------------
# bond graph (dissociation filter)


def bond_graph_change(numbers: np.ndarray, positions: np.ndarray, bonds: np.ndarray) -> tuple[int, int]:
    """(broken, formed): bonds of the molecule longer than BROKEN x covalent sum, new pairs closer than FORMED x
    (atomuq.core.bonds, the rule the `bonds` MD monitor uses too)."""
    return bond_changes(numbers, positions, bonds)


def intact(atoms, bonds: np.ndarray) -> bool:
    """True when the frame has the molecule's covalent bond graph (no bond broken, none formed)."""
    return bond_graph_change(atoms.numbers, atoms.positions, bonds) == (0, 0)


# ---------------------------------------------------------------------------------------------
# jobs


@dataclass
class Job:
    id: str
    kind: str  # sample | label
    stage: str  # md300 | md600 | md1200 | offeq
    split: str
    molecules: list[str]
    conformers: dict[str, list[int]]
    seed: int
    output: str  # shard path relative to OUT
    depends_on: list[str]
    atoms: int  # atoms per structure (largest molecule of the job)
    structures: int
    md_steps_per_trajectory: int
    frames_expected: int
    est_core_seconds: float
    tier: int
    command_args: list[str] = field(default_factory=list)


def job_key(job: Job) -> str:
    """Fingerprint of what a job computes (molecules, conformers, seed, stage, split, command); not its cost or tier."""
    content = {k: v for k, v in asdict(job).items() if k not in ("est_core_seconds", "tier", "atoms", "structures")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def step_seconds(n_atoms: int) -> float:
    """Estimated seconds per GFN2-xTB MD step on one core for a molecule of n_atoms."""
    return STEP_SECONDS_21 * (n_atoms / 21.0) ** STEP_EXPONENT


def n_offeq(plan: Plan) -> int:
    """Off-equilibrium frames per conformer."""
    return len(plan.rattles) + len(plan.stretches) + len(plan.compressions) + plan.torsions


def batches_of(mols: list[Molecule], plan: Plan) -> dict[str, list[list[Molecule]]]:
    """Molecules per split, batched so that each command runs long enough to pay for its start (cheapest first)."""
    by_split: dict[str, list[tuple[float, Molecule]]] = {}
    for m in mols:
        frames = plan.frames_large if m.large else plan.frames
        for split, confs in groups_of(m, plan):
            cost = len(confs) * (plan.burn_in_first + frames * plan.interval) * step_seconds(m.atoms)
            by_split.setdefault(split, []).append((cost, m))
    out: dict[str, list[list[Molecule]]] = {}
    for split in ("heldout", "train", "val", "test"):
        batches: list[list[Molecule]] = []
        current, total = [], 0.0
        for cost, m in sorted(by_split.get(split, []), key=lambda cm: (cm[1].large, cm[0], cm[1].index)):
            if current and current[-1].large != m.large:  # large molecules (fewer frames) in their own batches
                batches.append(current)
                current, total = [], 0.0
            current.append(m)
            total += cost
            if total >= plan.batch_seconds or len(current) >= plan.batch_max:
                batches.append(current)
                current, total = [], 0.0
        if current:
            batches.append(current)
        if batches:
            out[split] = batches
    return out


def plan_jobs(mols: list[Molecule], plan: Plan, seed: int) -> list[Job]:
    """Every job of the build, in queue order (tier, then held-out first, then cost)."""
    options = [a for k, v in TBLITE_OPTIONS.items() for a in ("--option", f"{k}={json.dumps(v)}")]
    jobs: list[Job] = []
    stage_names = list(STAGES)
    for split_number, (split, batches) in enumerate(batches_of(mols, plan).items()):
        for b, batch in enumerate(batches):
            confs = {m.name: dict(groups_of(m, plan))[split] for m in batch}
            n_struct = sum(len(c) for c in confs.values())
            atoms = max(m.atoms for m in batch)
            for s, stage in enumerate(stage_names):
                burn = plan.burn_in_first if s == 0 else plan.burn_in
                frames = plan.frames_large if batch[0].large else plan.frames  # a batch is all large or all small
                steps = frames * plan.interval
                job_seed = seed * 1_000_000 + split_number * 10_000 + b * 10 + s
                jid = f"{split}.{stage}.{b:03d}"
                if stage == "md300":
                    tier = 0 if split in ("train", "heldout") else 1
                else:
                    tier = 1 if split == "heldout" else (3 if stage == "md600" else 4)
                est = STARTUP_SECONDS + sum(len(confs[m.name]) * (burn + steps) * step_seconds(m.atoms) for m in batch) \
                    * (1.3 if stage == "md1200" else 1.0)
                args = ["sample", "--method", METHOD, "--temperature", f"{STAGES[stage]:g}", "--steps", str(steps),
                        "--interval", str(plan.interval), "--burn-in", str(burn), "--timestep", f"{plan.timestep:g}",
                        "--friction", f"{plan.friction:g}", "--seed", str(job_seed), "--workers", "1", *options]
                jobs.append(Job(jid, "sample", stage, split, [m.name for m in batch], confs, job_seed,
                                f"shards/{stage}/{jid}.extxyz.gz",
                                [] if s == 0 else [f"{split}.{stage_names[s - 1]}.{b:03d}"], atoms, n_struct,
                                burn + steps, n_struct * frames, round(est, 1), tier, args))
            # off-equilibrium single points of the same molecules, made from their 300 K frames
            n = n_struct * n_offeq(plan)
            est = STARTUP_SECONDS + sum(len(confs[m.name]) * n_offeq(plan) * SINGLE_POINT_STEPS * step_seconds(m.atoms)
                                        for m in batch)
            jid = f"{split}.offeq.{b:03d}"
            jobs.append(Job(jid, "label", "offeq", split, [m.name for m in batch], confs,
                            seed * 1_000_000 + 900_000 + split_number * 1000 + b, f"shards/offeq/{jid}.extxyz.gz",
                            [f"{split}.md300.{b:03d}"], atoms, n, 0, n, round(est, 1), 1 if split == "heldout" else 2,
                            ["label", "--method", METHOD, "--workers", "1", *options]))
    jobs.sort(key=lambda j: (j.tier, j.split != "heldout", j.est_core_seconds, j.id))
    return jobs


# ---------------------------------------------------------------------------------------------
# job inputs


def sample_inputs(job: Job, mols: dict[str, Molecule], conformers: dict[str, list], out: Path) -> list:
    """Starting structures of an MD stage: the conformers (md300) or the last intact frame per conformer of the stage before."""
    from ase import Atoms

    previous = None
    if job.depends_on:  # a stage before that kept no frame wrote no shard: start again from the conformers
        shard = out / job_output(job.depends_on[0])
        previous = read_frames(shard) if shard.exists() else []
    starts = []
    for name in job.molecules:
        bonds = np.array(mols[name].bonds, dtype=int).reshape(-1, 2)
        for c in job.conformers[name]:
            base, origin = conformers[name][c], "conformer"
            if previous is not None:
                mine = [f for f in previous if f.info["molecule"] == name and int(f.info["conformer"]) == c and intact(f, bonds)]
                if mine:
                    base, origin = mine[-1], f"{job.depends_on[0]} frame {int(mine[-1].info['md_frame'])}"
            a = Atoms(base.numbers, base.positions)
            a.info.update(molecule=name, conformer=int(c), start=origin)
            starts.append(a)
    return starts


def job_output(job_id: str) -> str:
    """Shard path (relative to OUT) of a job id (SPLIT.STAGE.BATCH)."""
    return f"shards/{job_id.split('.')[1]}/{job_id}.extxyz.gz"


def offeq_structures(mol: Molecule, base_frames: list, rng: np.random.Generator, plan: Plan, conformer: int) -> list:
    """Rattled, bond-stretched/compressed and torsion-turned copies of 300 K frames (no label), checked for intact bonds."""
    from ase import Atoms
    from rdkit import Chem
    from rdkit.Chem import rdMolTransforms
    from rdkit.Geometry import Point3D

    molh = Chem.AddHs(Chem.MolFromSmiles(mol.smiles))
    bonds = np.array(mol.bonds, dtype=int).reshape(-1, 2)
    rotatable = [tuple(t) for t in molh.GetSubstructMatches(Chem.MolFromSmarts("[!D1]-&!@[!D1]"))]
    out = []

    def base(k: int):
        f = base_frames[k % len(base_frames)]
        return f.numbers, f.positions.copy()

    def rd_conf(pos: np.ndarray):
        m = Chem.Mol(molh)
        conf = Chem.Conformer(len(pos))
        for i, p in enumerate(pos):
            conf.SetAtomPosition(i, Point3D(*map(float, p)))
        m.RemoveAllConformers()
        m.AddConformer(conf, assignId=True)
        return m, m.GetConformer()

    def keep(numbers, pos, kind: str, **info) -> bool:
        if not np.isfinite(pos).all() or bond_graph_change(numbers, pos, bonds) != (0, 0):
            return False
        a = Atoms(numbers, pos)
        a.info.update(molecule=mol.name, conformer=int(conformer), perturbation=kind, **info)
        out.append(a)
        return True

    k = 0
    for amp in plan.rattles:
        numbers, pos = base(k)
        k += 1
        for _ in range(20):
            disp = rng.normal(size=pos.shape) * amp / np.sqrt(3.0)
            if keep(numbers, pos + disp, "rattle", rattle_rms_A=round(float(np.sqrt((disp ** 2).sum(1).mean())), 5),
                    rattle_sigma_A=amp):
                break
    for factor in (*plan.stretches, *plan.compressions):
        numbers, pos = base(k)
        k += 1
        for _ in range(20):
            i, j = (int(x) for x in bonds[rng.integers(len(bonds))])
            m, conf = rd_conf(pos)
            length = float(np.linalg.norm(pos[i] - pos[j]))
            new = pos.copy()
            if m.GetBondBetweenAtoms(i, j).IsInRing():
                u = (pos[j] - pos[i]) / length
                shift = 0.5 * (factor - 1.0) * length * u
                new[i] -= shift
                new[j] += shift
            else:
                rdMolTransforms.SetBondLength(conf, i, j, factor * length)
                new = conf.GetPositions()
            if keep(numbers, new, "stretch" if factor > 1 else "compress", bond_atoms=f"{i}-{j}",
                    bond_factor=factor, bond_length_A=round(factor * length, 5)):
                break
    for _ in range(plan.torsions):
        numbers, pos = base(k)
        k += 1
        if not rotatable:  # rigid molecule: one more rattle instead
            keep(numbers, pos + rng.normal(size=pos.shape) * 0.1 / np.sqrt(3.0), "rattle", rattle_sigma_A=0.1)
            continue
        for _ in range(20):
            b, c = rotatable[int(rng.integers(len(rotatable)))]
            a = next(n.GetIdx() for n in molh.GetAtomWithIdx(b).GetNeighbors() if n.GetIdx() != c)
            d = next(n.GetIdx() for n in molh.GetAtomWithIdx(c).GetNeighbors() if n.GetIdx() != b)
            m, conf = rd_conf(pos)
            turn = float(rng.uniform(40.0, 320.0))
            old = rdMolTransforms.GetDihedralDeg(conf, a, b, c, d)
            rdMolTransforms.SetDihedralDeg(conf, a, b, c, d, old + turn)
            if keep(numbers, conf.GetPositions(), "torsion", torsion_atoms=f"{a}-{b}-{c}-{d}", torsion_turn_deg=round(turn, 3)):
                break
    return out


def label_inputs(job: Job, mols: dict[str, Molecule], plan: Plan, out: Path) -> list:
    """Off-equilibrium structures of a label job, made from its molecules' 300 K frames (seeded: same every run)."""
    structures = []
    shard = out / job_output(job.depends_on[0])
    frames = read_frames(shard) if shard.exists() else []  # none: no off-equilibrium frames for these molecules
    for name in job.molecules:
        mol = mols[name]
        bonds = np.array(mol.bonds, dtype=int).reshape(-1, 2)
        for c in job.conformers[name]:
            base = [f for f in frames if f.info["molecule"] == name and int(f.info["conformer"]) == c and intact(f, bonds)]
            if not base:
                continue
            rng = np.random.default_rng(np.random.SeedSequence([job.seed, mol.index, c]))
            order = rng.permutation(len(base))
            structures += offeq_structures(mol, [base[i] for i in order], rng, plan, c)
    return structures


# ---------------------------------------------------------------------------------------------
# running


def start_job(job: Job, mols: dict[str, Molecule], conformers: dict[str, list], plan: Plan, out: Path) -> Running | None:
    """Write the job's input (deterministic, so the command's resume files stay valid) and start its command."""
    key = job_key(job)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    work_in = work / f"{job.id}.{key}.in.extxyz"
    work_out = work / f"{job.id}.{key}.extxyz"
    if job.kind == "sample":
        structures = sample_inputs(job, mols, conformers, out)
    else:
        structures = label_inputs(job, mols, plan, out)
    if not structures:
        return None
    from ase.io import write

    tmp = work_in.with_name(work_in.name + ".tmp.extxyz")
    write(tmp, structures, format="extxyz")
    os.replace(tmp, work_in)
    log = work / f"{job.id}.log"
    cmd = atomuq_command() + [job.command_args[0], str(work_in), "-o", str(work_out), *job.command_args[1:]]
    if work_out.exists():  # finished earlier, killed before its shard was written: no need to run again
        cmd = ["true"]
    proc = launch(cmd, log)
    return Running(job, proc, work_in, work_out, log, time.perf_counter(), len(structures))


def finish_job(r: Running, mols: dict[str, Molecule], out: Path, cpu_seconds: float, returncode: int) -> dict:
    """Filter and tag the command's output, write the shard; return the state entry (or raise RuntimeError)."""
    job = r.job
    check_exit(r, returncode)
    frames = read_frames(r.work_out)
    kept, dropped = [], 0
    broken_traj: set[tuple[str, int]] = set()
    for f in frames:
        name = f.info.get("molecule") or job.molecules[0]
        mol = mols[name]
        bonds = np.array(mol.bonds, dtype=int).reshape(-1, 2)
        conf = int(f.info["conformer"])
        # MD: drop a trajectory's frames from its first changed bond graph on (they may be another molecule)
        if (name, conf) in broken_traj or not intact(f, bonds):
            if job.kind == "sample":
                broken_traj.add((name, conf))
            dropped += 1
            continue
        f.info.update(molecule=name, smiles=mol.smiles, conformer=conf, split=job.split, stage=job.stage, job=job.id,
                      source=f"{job.id}:{len(kept) + dropped}")
        # stored precision 1e-6 Å and 1e-5 eV/Å (the extxyz text then compresses to about half)
        f.positions[:] = np.round(f.positions, 6)
        f.calc.results["forces"] = np.round(f.calc.results["forces"], 5)
        kept.append(f)
    failures = read_failures(r.work_out)
    sha = write_shard(out / job.output, kept) if kept else ""
    entry = {"key": job_key(job), "frames": len(kept), "dropped_bond_graph": dropped, "scf_failures": len(failures),
             "failures": [str(x.get("error", x))[:200] for x in failures][:5],
             "structures_in": r.n_input, "cpu_seconds": round(cpu_seconds, 2),
             "wall_seconds": round(time.perf_counter() - r.t0, 2), "output": job.output if kept else None,
             "sha256": sha, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return entry


def clean_work(r: Running) -> None:
    """Remove a finished job's files under OUT/work (after its state entry is written)."""
    for p in (r.work_in, r.work_out, r.work_out.with_name(r.work_out.name + ".failures.jsonl"), r.log):
        p.unlink(missing_ok=True)


def run_queue(jobs: list[Job], mols: dict[str, Molecule], conformers: dict[str, list], plan: Plan, out: Path,
              workers: int, max_jobs: int | None, stop_at: float | None) -> None:
    """Run jobs whose dependencies are done, `workers` at a time, updating OUT/state.json after each."""
    state_path = out / "state.json"
    lock = acquire_lock(out)  # noqa: F841 (held until this process ends)
    state = load_state(state_path)
    state["failed"] = {}  # failed jobs are tried again on every run
    stale = [j.id for j in jobs if j.id in state["done"] and state["done"][j.id].get("key") != job_key(j)]
    if stale:
        raise SystemExit(f"{state_path}: {len(stale)} done jobs ({', '.join(stale[:4])}, ...) were computed for another "
                         "job list (molecules or settings changed since): build into a new --out, or move "
                         "state.json and shards/ away to start over")
    running: dict[str, Running] = {}
    started = 0
    blocked: set[str] = set()

    def dep_state(j: Job) -> str:
        if any(d in state["failed"] or d in blocked for d in j.depends_on):
            return "blocked"
        # a dependency with no intact frame: the next MD stage restarts from the conformer
        return "ready" if all(d in state["done"] for d in j.depends_on) else "wait"

    n_total = len(jobs)
    while True:
        stopping = (max_jobs is not None and started >= max_jobs) or (stop_at is not None and time.time() > stop_at)
        if not stopping:
            for j in jobs:
                if len(running) >= workers:
                    break
                if j.id in state["done"] or j.id in running or j.id in state["failed"] or j.id in blocked:
                    continue
                ds = dep_state(j)
                if ds == "blocked":
                    blocked.add(j.id)
                    continue
                if ds != "ready":
                    continue
                try:
                    r = start_job(j, mols, conformers, plan, out)
                except Exception as exc:  # an input that cannot be made: record, go on
                    state["failed"][j.id] = {"error": f"input: {type(exc).__name__}: {exc}"[:300]}
                    write_json(state_path, state)
                    say(f"FAILED {j.id} (input): {exc}")
                    continue
                if r is None:
                    state["done"][j.id] = {"key": job_key(j), "frames": 0, "note": "no intact starting frame", "output": None,
                                           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                    write_json(state_path, state)
                    continue
                running[j.id] = r
                started += 1
                say(f"start {j.id} ({j.kind}, {r.n_input} structures, est {j.est_core_seconds:.0f} core-s)")
        if not running:
            break
        time.sleep(1.0)
        for jid, r, cpu in finished(running):
            try:
                entry = finish_job(r, mols, out, cpu, r.proc.returncode)
            except Exception as exc:
                state["failed"][jid] = {"error": str(exc)[:500]}
                say(f"FAILED {jid}: {exc}")
            else:
                state["done"][jid] = entry
                say(f"done {jid}: {entry['frames']} frames ({entry['dropped_bond_graph']} dropped, "
                    f"{entry['scf_failures']} SCF failures), {cpu:.0f} CPU s; "
                    f"{len(state['done'])}/{n_total} jobs, {sum(e['frames'] for e in state['done'].values())} frames")
            write_json(state_path, state)
            if jid in state["done"]:
                clean_work(r)
    left = [j.id for j in jobs if j.id not in state["done"]]
    say(f"stopped: {len(state['done'])}/{n_total} jobs done, {len(left)} left "
        f"({len(state['failed'])} failed, {len(blocked)} blocked by a failed dependency)")


# ---------------------------------------------------------------------------------------------


def manifest_of(mols: list[Molecule], jobs: list[Job], plan: Plan, seed: int, quick: bool) -> dict:
    """The manifest: settings, molecules with their dissimilarity numbers, every job."""
    versions = {p: version(p) for p in ("ase", "tblite", "rdkit", "numpy")}
    return {
        "description": "broad molecular set, GFN2-xTB (tblite); built by scripts/build_broad_molecular_set.py",
        "seed": seed, "quick": quick, "method": METHOD, "tblite_options": TBLITE_OPTIONS,
        "plan": asdict(plan), "stages_K": STAGES,
        "bond_graph_filter": {"broken_factor": BROKEN, "formed_factor": FORMED,
                              "radii": "ase.data.covalent_radii", "reference": "RDKit bonds of the SMILES with hydrogens"},
        "heldout_rule": f"Bemis-Murcko scaffold not among the training scaffolds, or Morgan r=2 Tanimoto <= {TANIMOTO_MAX}",
        "cost_model": {"step_seconds_21_atoms": STEP_SECONDS_21, "exponent": STEP_EXPONENT,
                       "single_point_steps": SINGLE_POINT_STEPS, "startup_seconds": STARTUP_SECONDS},
        "versions": versions,
        "totals": {"molecules": len(mols), "train_molecules": sum(m.role == "train" for m in mols),
                   "heldout_molecules": sum(m.role == "heldout" for m in mols), "jobs": len(jobs),
                   "frames_expected": sum(j.frames_expected for j in jobs),
                   "est_core_hours": round(sum(j.est_core_seconds for j in jobs) / 3600, 2)},
        "molecules": [{k: v for k, v in asdict(m).items() if k != "bonds"} for m in mols],
        "jobs": [asdict(j) for j in jobs],
    }


def status_report(manifest: dict, out: Path) -> str:
    """Jobs done / total, frames, measured CPU seconds per frame, projected remaining core-hours (from state.json)."""
    pr = progress(manifest, out)
    jobs, done, frames, cpu, est_left, ratio = pr.jobs, pr.done, pr.frames, pr.cpu, pr.est_left, pr.ratio
    lines = [pr.jobs_line(),
             f"frames labelled: {frames} of about {manifest['totals']['frames_expected']} planned "
             f"({sum(v.get('dropped_bond_graph', 0) for v in done.values())} dropped by the bond-graph filter, "
             f"{sum(v.get('scf_failures', 0) for v in done.values())} SCF failures)",
             f"CPU time so far: {cpu / 3600:.2f} core-hours, {cpu / frames if frames else float('nan'):.2f} s per frame "
             f"(command start-up included); measured / estimated cost {ratio:.2f}",
             f"projected remaining: {est_left * ratio / 3600:.2f} core-hours ({est_left / 3600:.2f} estimated x {ratio:.2f})"]
    by_stage: dict[str, list[int]] = {}
    for k, j in jobs.items():
        row = by_stage.setdefault(f"{j['stage']}/{j['split']}", [0, 0, 0])
        row[1] += 1
        if k in done:
            row[0] += 1
            row[2] += done[k]["frames"]
    lines.append("stage/split: jobs done/total, frames")
    lines += [f"  {k}: {v[0]}/{v[1]}, {v[2]}" for k, v in sorted(by_stage.items())]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="commands run at once, one core each (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of conformers, MD and perturbations (default 0)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default data/molecular_broad)")
    ap.add_argument("--quick", action="store_true", help="three molecules, a few frames, into out/molecular_broad_quick")
    ap.add_argument("--plan", action="store_true", help="write the manifest and print the plan; run nothing")
    ap.add_argument("--status", action="store_true", help="print jobs done, frames, cost so far and projected; run nothing")
    ap.add_argument("--export", type=Path, default=None, metavar="DIR",
                    help="write the done frames per split (and split_stage) as DIR/*.extxyz.gz for training; run nothing")
    ap.add_argument("--max-jobs", type=int, default=None, help="start at most this many jobs, then stop")
    ap.add_argument("--hours", type=float, default=None, help="start no new job after this many hours")
    args = ap.parse_args()
    lower_priority()
    plan = QUICK if args.quick else FULL
    out = args.out or (ROOT / ("out/molecular_broad_quick" if args.quick else "data/molecular_broad"))
    out.mkdir(parents=True, exist_ok=True)
    mols = load_molecules(QUICK_MOLECULES if args.quick else None)
    say(f"{len(mols)} molecules ({sum(m.role == 'heldout' for m in mols)} held out); conformers ...")
    conformers = load_or_make_conformers(mols, plan, args.seed, out / "conformers.extxyz.gz")
    jobs = plan_jobs(mols, plan, args.seed)
    manifest = manifest_of(mols, jobs, plan, args.seed, args.quick)
    manifest_path = out / "manifest.json"
    manifest = json.loads(json.dumps(manifest))  # tuples as lists, as read back
    sync_manifest(manifest_path, manifest, args.seed, " (molecules or job settings)", note_versions=True)
    if args.status:
        print(status_report(manifest, out))
        return
    if args.export:
        print("\n".join(export_splits(manifest, out, args.export, by="stage")))
        return
    t = manifest["totals"]
    say(f"plan: {t['jobs']} jobs, {t['frames_expected']} frames expected, about {t['est_core_hours']} core-hours")
    if args.plan:
        return
    stop_at = time.time() + 3600 * args.hours if args.hours else None
    mol_by = {m.name: m for m in mols}
    run_queue(jobs, mol_by, conformers, plan, out, max(1, args.workers), args.max_jobs, stop_at)


if __name__ == "__main__":
    main()
