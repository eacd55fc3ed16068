"""Build the molecular benchmark set: drug-like H/C/N/O molecules, Langevin MD driven by GFN2-xTB.

Run (one core, about 35-45 minutes):
    OMP_NUM_THREADS=1 .venv/bin/python scripts/build_molecular_set.py
Smoke test (well under a minute, written to out/molecular_quick):
    OMP_NUM_THREADS=1 .venv/bin/python scripts/build_molecular_set.py --quick

Per molecule: SMILES -> RDKit ETKDGv3 coordinates (fixed seed) -> GFN2-xTB relaxation (BFGS, fmax
0.05 eV/Å) -> Langevin MD at 0.5 fs with GFN2-xTB forces. Training molecules give 300 K training
frames (two independent trajectories) and separate 300 / 600 / 1200 K test trajectories, as the
3BPA benchmark does; held-out molecules give test frames only. Every frame carries the GFN2-xTB
energy and forces and info 'molecule', 'smiles', 'temperature', 'split'.

Outputs under --out (default data/molecular): train.extxyz.gz, test_{300,600,1200}K.extxyz.gz,
heldout_{300,600,1200}K.extxyz.gz, manifest.json, README.md (command, seed, counts, timings,
versions); a 30-frame demo subset goes to src/atomuq/data/structures/molecular_demo.extxyz.
Interrupted? Run the same command again: finished molecules and trajectories are kept in
OUT/work and the run continues from there.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before anything loads OpenMP: one thread is fastest here

import argparse
import hashlib
import json
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read
from ase.optimize import BFGS

from atomuq.core.io import Record
from atomuq.core.io import write_structures
from atomuq.reference import get_method
from atomuq.workflows.sample import SampleSettings, sample_structures

ROOT = Path(__file__).resolve().parents[1]
DEMO_PATH = ROOT / "src" / "atomuq" / "data" / "structures" / "molecular_demo.extxyz"
METHOD = "gfn2-xtb"
ELEMENTS = {"H", "C", "N", "O"}
TEST_TEMPERATURES = (300.0, 600.0, 1200.0)
TRAIN_TEMPERATURE = 300.0


@dataclass(frozen=True)
class Molecule:
    name: str
    smiles: str
    split: str  # "train": train + test frames; "heldout": test frames only
    scale: float = 1.0  # frame-count factor (stachyose: 87 atoms, ~15x the cost per step of aspirin)


MOLECULES = (
    # the paper molecules
    Molecule("aspirin", "CC(=O)Oc1ccccc1C(=O)O", "train"),
    Molecule("paracetamol", "CC(=O)Nc1ccc(O)cc1", "train"),
    Molecule("dha", "CC/C=C\\C/C=C\\C/C=C\\C/C=C\\C/C=C\\C/C=C\\CCC(=O)O", "train"),  # docosahexaenoic acid
    Molecule("ac_ala3_nhme", "CC(=O)N[C@@H](C)C(=O)N[C@@H](C)C(=O)N[C@@H](C)C(=O)NC", "train"),
    Molecule("stachyose",
             "C([C@@H]1[C@@H]([C@@H]([C@H]([C@H](O1)OC[C@@H]2[C@@H]([C@@H]([C@H]([C@H](O2)OC[C@@H]3[C@H]([C@@H]"
             "([C@H]([C@H](O3)O[C@]4([C@H]([C@@H]([C@H](O4)CO)O)O)CO)O)O)O)O)O)O)O)O)O)O", "train", scale=0.5),
    # other drug-like molecules
    Molecule("ibuprofen", "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "train"),
    Molecule("caffeine", "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "train"),
    # held out of training entirely
    Molecule("naproxen", "COc1ccc2cc([C@@H](C)C(=O)O)ccc2c1", "heldout"),
    Molecule("3bpa", "Nc1ncccc1OCc1ccccc1", "heldout"),  # 3-(benzyloxy)pyridin-2-amine
    Molecule("nicotine", "CN1CCC[C@H]1c1cccnc1", "heldout"),
)


@dataclass(frozen=True)
class Plan:
    molecules: tuple[Molecule, ...]
    train_trajectories: int
    train_frames: int  # per trajectory
    test_frames: int  # per temperature
    interval: int  # steps between frames
    burn_in: int  # steps
    timestep: float = 0.5  # fs
    friction: float = 0.02  # 1/fs
    relax_fmax: float = 0.05  # eV/Å
    relax_steps: int = 400


FULL = Plan(MOLECULES, train_trajectories=2, train_frames=100, test_frames=50, interval=20, burn_in=200)
QUICK = Plan(tuple(m for m in MOLECULES if m.name in ("paracetamol", "caffeine", "nicotine")),
             train_trajectories=2, train_frames=4, test_frames=3, interval=5, burn_in=10, relax_steps=100)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def embed(mol: Molecule, seed: int) -> Atoms:
    """3D coordinates from SMILES: RDKit ETKDGv3 with a fixed random seed, explicit hydrogens."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    rd = Chem.AddHs(Chem.MolFromSmiles(mol.smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    if AllChem.EmbedMolecule(rd, params) != 0:
        raise RuntimeError(f"{mol.name}: RDKit could not embed {mol.smiles}")
    atoms = Atoms([a.GetSymbol() for a in rd.GetAtoms()], rd.GetConformer().GetPositions())
    if not set(atoms.get_chemical_symbols()) <= ELEMENTS:
        raise RuntimeError(f"{mol.name}: elements outside H C N O")
    atoms.info.update(molecule=mol.name, smiles=mol.smiles)
    return atoms


def relaxed(mol: Molecule, plan: Plan, seed: int, work: Path) -> tuple[Atoms, dict]:
    """ETKDG structure relaxed with GFN2-xTB (cached in work/)."""
    path = work / f"{mol.name}_relaxed.extxyz"
    if path.exists():
        atoms = read(path)
        return atoms, {k: v for k, v in atoms.info.items() if k.startswith("relax_")}
    atoms = embed(mol, seed)
    atoms.calc = get_method(METHOD).make_calculator()
    t0 = time.perf_counter()
    opt = BFGS(atoms, logfile=None)
    converged = opt.run(fmax=plan.relax_fmax, steps=plan.relax_steps)
    fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    info = {"relax_steps": int(opt.nsteps), "relax_fmax": fmax, "relax_converged": bool(converged),
            "relax_seconds": time.perf_counter() - t0}
    out = Atoms(atoms.numbers, atoms.positions)
    out.info.update(molecule=mol.name, smiles=mol.smiles, **info)
    write_structures(path, [out])
    return out, info


def sample_split(mol: Molecule, start: Atoms, plan: Plan, split: str, seed: int, work: Path) -> tuple[list[Atoms], dict]:
    """Train (300 K, several trajectories) or test (300/600/1200 K) frames of one molecule (cached in work/)."""
    path = work / f"{mol.name}_{split}.extxyz"
    stats_path = work / f"{mol.name}_{split}.json"
    if path.exists() and stats_path.exists():
        return read(path, ":"), json.loads(stats_path.read_text())
    if split == "train":
        n_traj, temperatures, n_frames = plan.train_trajectories, (TRAIN_TEMPERATURE,), plan.train_frames
    else:
        n_traj, temperatures, n_frames = 1, TEST_TEMPERATURES, plan.test_frames
    n_frames = max(1, int(round(n_frames * mol.scale)))
    settings = SampleSettings(temperatures, steps=n_frames * plan.interval, interval=plan.interval,
                              timestep=plan.timestep, friction=plan.friction, burn_in=plan.burn_in, seed=seed)
    records = [Record(start, f"{mol.name} relaxed", k) for k in range(n_traj)]
    failures = []
    report = sample_structures(records, METHOD, path, settings, workers=1, log=say,
                               on_failure=lambda f: (failures.append(f), say(f"FAILED {f.where}: {f.error}")))
    stats = {"frames": report.n_frames, "trajectories": report.n_trajectories, "md_steps": report.md_steps,
             "seconds": report.seconds, "ms_per_step": 1000 * report.seconds_per_step, "seed": seed,
             "failures": [f.where + ": " + f.error for f in failures]}
    stats_path.write_text(json.dumps(stats))
    return read(path, ":"), stats


def tag(frames: list[Atoms], mol: Molecule, split: str) -> list[Atoms]:
    for f in frames:
        f.info.update(molecule=mol.name, smiles=mol.smiles, split=split, temperature=float(f.info["temperature"]))
        for key in ("relax_steps", "relax_fmax", "relax_converged", "relax_seconds"):
            f.info.pop(key, None)
    return frames


def pick(frames: list[Atoms], n: int) -> list[Atoms]:
    """n frames spread evenly over the list (so over the molecules, which come in order)."""
    if len(frames) <= n:
        return list(frames)
    return [frames[i] for i in np.linspace(0, len(frames) - 1, n).round().astype(int)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny version (3 molecules, a few frames) for smoke tests")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default data/molecular, or out/molecular_quick with --quick)")
    ap.add_argument("--demo", type=Path, default=None, help=f"demo subset path (default {DEMO_PATH.relative_to(ROOT)}; none with --quick)")
    ap.add_argument("--seed", type=int, default=0, help="seed of embedding and MD (default 0)")
    ap.add_argument("--keep-work", action="store_true", help="keep OUT/work (per-molecule files) after success")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    out = args.out or (ROOT / ("out/molecular_quick" if args.quick else "data/molecular"))
    demo = args.demo or (None if args.quick else DEMO_PATH)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    command = " ".join(["OMP_NUM_THREADS=1 .venv/bin/python scripts/build_molecular_set.py"] + [shlex.quote(a) for a in sys.argv[1:]])
    t_start = time.perf_counter()
    say(f"building the molecular set in {out} ({'quick' if args.quick else 'full'}), seed {args.seed}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")

    splits: dict[str, list[Atoms]] = {"train": []}
    for t in TEST_TEMPERATURES:
        splits[f"test_{t:g}K"] = []
        splits[f"heldout_{t:g}K"] = []
    table = []
    for m_index, mol in enumerate(plan.molecules):
        start, relax_info = relaxed(mol, plan, args.seed, work)
        say(f"{mol.name}: {len(start)} atoms, relaxed in {relax_info.get('relax_steps', '?')} steps "
            f"(fmax {relax_info.get('relax_fmax', float('nan')):.3f} eV/Å)")
        row = {"molecule": mol.name, "smiles": mol.smiles, "atoms": len(start), "role": mol.split, **relax_info}
        if mol.split == "train":
            frames, stats = sample_split(mol, start, plan, "train", args.seed * 100_000 + 1000 * m_index + 1, work)
            splits["train"] += tag(frames, mol, "train")
            row["train"] = len(frames)
            row["train_ms_per_step"] = stats["ms_per_step"]
            row["failures"] = list(stats["failures"])
            say(f"{mol.name}: {len(frames)} training frames, {stats['ms_per_step']:.1f} ms per MD step")
        frames, stats = sample_split(mol, start, plan, "test", args.seed * 100_000 + 1000 * m_index + 2, work)
        prefix = "test" if mol.split == "train" else "heldout"
        for t in TEST_TEMPERATURES:
            chosen = [f for f in frames if abs(f.info["temperature"] - t) < 1e-6]
            splits[f"{prefix}_{t:g}K"] += tag(chosen, mol, prefix)
            row[f"{t:g}K"] = len(chosen)
        row["test_ms_per_step"] = stats["ms_per_step"]
        row.setdefault("failures", []).extend(stats["failures"])
        say(f"{mol.name}: {len(frames)} test frames, {stats['ms_per_step']:.1f} ms per MD step")
        table.append(row)

    files = {}
    for name, frames in splits.items():
        if frames:
            path = write_structures(out / f"{name}.extxyz.gz", frames)
            files[path.name] = {"frames": len(frames), "sha256": sha256(path)}
            say(f"wrote {path} ({len(frames)} frames)")
    if demo is not None:
        subset = (pick(splits["test_300K"], 10) + pick(splits["test_1200K"], 10)
                  + pick(splits["heldout_300K"] + splits["heldout_1200K"], 10))
        for f, group in zip(subset, ["in-domain 300 K"] * 10 + ["in-domain 1200 K"] * 10 + ["held-out"] * 10):
            f.info["demo_group"] = group
        write_structures(demo, subset)
        say(f"wrote {demo} ({len(subset)} frames)")

    wall = time.perf_counter() - t_start
    versions = {p: version(p) for p in ("atomuq", "ase", "tblite", "rdkit", "numpy")}
    versions["python"] = platform.python_version()
    manifest = {
        "command": command, "seed": args.seed, "method": METHOD, "quick": args.quick,
        "plan": {k: v for k, v in plan.__dict__.items() if k != "molecules"},
        "test_temperatures_K": list(TEST_TEMPERATURES), "train_temperature_K": TRAIN_TEMPERATURE,
        "molecules": table, "files": files, "wall_seconds": wall, "versions": versions,
        "machine": {"platform": platform.platform(), "cpu": _cpu_name(), "cores": os.cpu_count(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (out / "README.md").write_text(readme(manifest))
    if not args.keep_work:
        shutil.rmtree(work)
    say(f"done in {wall / 60:.1f} min")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def readme(m: dict) -> str:
    plan = m["plan"]
    lines = [
        "# Molecular benchmark set (GFN2-xTB)",
        "",
        "Built by `scripts/build_molecular_set.py`; do not edit by hand, rebuild instead:",
        "",
        "```",
        m["command"],
        "```",
        "",
        f"- Seed {m['seed']} (RDKit ETKDGv3 embedding; MD seeds derive from it per molecule and split).",
        f"- Reference: {m['method']} (tblite {m['versions']['tblite']}), energies in eV, forces in eV/Å, "
        "stored as extxyz `energy=` and `forces` (ASE SinglePointCalculator).",
        f"- Structures: SMILES -> ETKDGv3 -> BFGS relaxation with GFN2-xTB to fmax {plan['relax_fmax']} eV/Å "
        f"(at most {plan['relax_steps']} steps).",
        f"- MD: ASE Langevin, timestep {plan['timestep']} fs, friction {plan['friction']} 1/fs, burn-in "
        f"{plan['burn_in']} steps, one frame every {plan['interval']} steps "
        f"({plan['interval'] * plan['timestep']:g} fs). Training: {plan['train_trajectories']} independent "
        f"{m['train_temperature_K']:g} K trajectories per training molecule; test: one separate trajectory per "
        f"temperature ({', '.join(f'{t:g}' for t in m['test_temperatures_K'])} K). Frame counts are scaled "
        "down for stachyose (87 atoms).",
        "- Held-out molecules have test frames only (files `heldout_*`); no frame of theirs is in `train`.",
        "- Info keys per frame: `molecule`, `smiles`, `split` (train / test / heldout), `temperature` (K, "
        "thermostat target), `kinetic_temperature` (K), `source`, `md_trajectory`, `md_frame`, `md_step`, "
        "`md_time_fs`, `md_seed`, `label_method`.",
        "",
        "| molecule | atoms | role | relax steps | train | 300 K | 600 K | 1200 K | ms / MD step | failures |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in m["molecules"]:
        lines.append(f"| {r['molecule']} | {r['atoms']} | {r['role']} | {r.get('relax_steps', '-')} | "
                     f"{r.get('train', 0)} | {r.get('300K', 0)} | {r.get('600K', 0)} | {r.get('1200K', 0)} | "
                     f"{r['test_ms_per_step']:.1f} | {len(r.get('failures', []))} |")
    lines += ["", "| file | frames | sha256 |", "| --- | ---: | --- |"]
    for name, f in m["files"].items():
        lines.append(f"| {name} | {f['frames']} | `{f['sha256'][:16]}…` |")
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines += [
        "",
        f"Wall time: {m['wall_seconds'] / 60:.1f} min on one core ({m['machine']['cpu']}, "
        f"OMP_NUM_THREADS={m['machine']['OMP_NUM_THREADS']}, other work running on the second core).",
        f"Versions: {versions}. Platform: {m['machine']['platform']}.",
        "",
        "Full details (per-molecule timings, relaxation, failures, file hashes): `manifest.json`.",
        "The 30-frame demo subset shipped with the package is `src/atomuq/data/structures/molecular_demo.extxyz` "
        "(10 in-domain 300 K test frames, 10 in-domain 1200 K test frames, 10 held-out frames; info `demo_group`).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
