"""Build the benchmark data of `atomuq bench` (issue 8, part 4) once; the result is committed under data/bench/.

Run (about 4 minutes on one CPU core):
    OMP_NUM_THREADS=1 .venv/bin/python scripts/build_bench_data.py

1. Molecules (GFN2-xTB, the reference of data/molecular): for each of the 10 molecules, N_START frames
   evenly spread over its 300 K test trajectory (test_300K for the 7 training molecules, heldout_300K for
   the 3 held-out ones) are attacked with the bundled model (atomuq attack: delta-boltzmann, kT 0.05 eV/atom,
   100 steps, every step recorded). From each search, frames at roughly log-spaced steps (0, 1, 2, 3, 5, ...,
   last) are kept, so U_Δ spans the range from the equilibrium start to far out of distribution, and labelled
   with GFN2-xTB -> adversarial_molecules.extxyz.gz.
2. A periodic system the H C N O model can see: a box of 16 water molecules (48 atoms, 6.2 × 6.2 × 12.4 Å,
   pbc) labelled with GFN1-xTB (tblite, Γ point). Reference-driven Langevin MD at 300 K (atomuq sample)
   gives 40 equilibrium-ish frames -> water_md.extxyz.gz; N_START of them are attacked like the molecules
   and 40 frames kept and labelled with GFN1-xTB -> water_adversarial.extxyz.gz.
Frames the attack pushed into overlapping atoms (closer than the validator's minimum distance) and frames
whose reference calculation fails are dropped and counted in manifest.json. Info key "molecule" names the
system in every file ("water_box" for the periodic one).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import ase
import numpy as np
from ase import Atoms
from ase.build import molecule
from scipy.spatial.transform import Rotation

import atomuq
from atomuq.core.errors import InputError
from atomuq.core.io import file_sha256, read_structures
from atomuq.workflows.label import label_structures
from atomuq.core.validate import DEFAULT_MIN_DISTANCE, check_structure
from atomuq.models.registry import resolve_model
from atomuq.workflows.attack import AttackSettings, attack
from atomuq.workflows.sample import SampleSettings, sample_structures

SYSTEM_KEY = "molecule"
WATER = "water_box"


def spread(n_total: int, n: int) -> np.ndarray:
    """n indices evenly spread over range(n_total) (all of them if n >= n_total)."""
    return np.unique(np.linspace(0, n_total - 1, min(n, n_total)).round().astype(int))


def kept_steps(last: int, n: int) -> set[int]:
    """About n steps between 0 and last, log-spaced (dense early, where U_Δ rises fastest), 0 and last included."""
    return {0, last} | set(np.unique(np.geomspace(1, max(last, 1), n - 1).round().astype(int)).tolist())


def water_box(grid: tuple[int, int, int] = (2, 2, 4), spacing: float = 3.1, seed: int = 0) -> Atoms:
    """Water molecules on a grid (spacing Å, about 1 g/cm³ at 3.1 Å), random orientations, periodic cell."""
    rng = np.random.default_rng(seed)
    template = molecule("H2O")
    template.positions -= template.get_center_of_mass()
    box = Atoms(cell=np.array(grid, dtype=float) * spacing, pbc=True)
    for ijk in np.ndindex(*grid):
        w = template.copy()
        w.positions = Rotation.random(random_state=int(rng.integers(2**31))).apply(w.positions)
        w.positions += (np.array(ijk) + 0.5) * spacing
        box += w
    box.info[SYSTEM_KEY] = WATER
    return box


def adversarial_frames(model, starts: list[Atoms], settings: AttackSettings, per_start: int,
                       key: str = SYSTEM_KEY) -> tuple[list[Atoms], int]:
    """Attack every start; keep about per_start log-spaced frames of each search; drop overlapping frames
    (key: the info key naming each start's system, for the messages)."""
    result = attack(model, starts, settings, batch_size=16)
    frames = result.to_atoms(starts)
    last = {o.index: o.steps_run for o in result.outcomes}
    keep, overlapping = [], 0
    for atoms in frames:
        if atoms.info["attack_step"] not in kept_steps(last[atoms.info["source_index"]], per_start):
            continue
        try:
            check_structure(atoms, f"{atoms.info[key]} step {atoms.info['attack_step']}", None, DEFAULT_MIN_DISTANCE)
        except InputError:
            overlapping += 1
            continue
        keep.append(atoms)
    return keep, overlapping


def label(frames: list[Atoms], method: str, output: Path, options: dict | None = None, workers: int = 1) -> dict:
    """Label frames with a reference method (options: the calculator's) into output; a summary for the manifest."""
    report = label_structures(frames, method, output, workers=workers, options=options, log=print)
    return {
        "file": output.name,
        "method": method,
        "input_frames": report.n_input,
        "labelled": report.n_labelled,
        "failures": [f"{f.index}: {f.error}" for f in report.failures],
        "calc_seconds": round(report.calc_seconds, 1),
        "seconds_per_structure": round(report.calc_seconds / max(report.n_new, 1), 4),
    }


ATTACK_FIELDS = ("objective", "kT", "steps", "lr", "init_scale", "budget_kT", "patience", "seed")


def attack_record(settings: AttackSettings) -> dict:
    """The attack settings a manifest records."""
    return {k: getattr(settings, k) for k in ATTACK_FIELDS}


def write_manifest(path: Path, manifest: dict) -> None:
    """Write a manifest (JSON, one-space indent) and print it."""
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest, indent=1))


def versions() -> dict[str, str]:
    """The versions a manifest records."""
    return {"atomuq": atomuq.__version__, "ase": ase.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/molecular")
    ap.add_argument("--out", default="data/bench")
    ap.add_argument("--starts", type=int, default=4, help="starting frames per system")
    ap.add_argument("--per-start", type=int, default=12, help="frames kept per search")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--kT", type=float, default=0.05)
    ap.add_argument("--water-frames", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(None)
    settings = AttackSettings(objective="delta-boltzmann", kT=args.kT, steps=args.steps, seed=args.seed)
    manifest: dict = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python scripts/build_bench_data.py",
        "model": "molecular-small",
        "attack": attack_record(settings),
        "starts_per_system": args.starts,
        "frames_per_search": args.per_start,
        "files": {},
    }

    # 1. molecules
    starts: list[Atoms] = []
    for name in ("test_300K", "heldout_300K"):
        records = read_structures([Path(args.data) / f"{name}.extxyz.gz"])
        by_molecule: dict[str, list[Atoms]] = {}
        for r in records:
            by_molecule.setdefault(r.atoms.info[SYSTEM_KEY], []).append(r.atoms)
        for frames in by_molecule.values():
            starts += [frames[i] for i in spread(len(frames), args.starts)]
    t = time.perf_counter()
    frames, overlapping = adversarial_frames(model, starts, settings, args.per_start)
    attack_seconds = time.perf_counter() - t
    print(f"molecules: {len(starts)} searches, {len(frames)} frames kept ({overlapping} overlapping dropped) in {attack_seconds:.0f} s")
    summary = label(frames, "gfn2-xtb", out / "adversarial_molecules.extxyz.gz")
    summary.update(starts=len(starts), overlapping_dropped=overlapping, attack_seconds=round(attack_seconds, 1))
    manifest["files"]["adversarial_molecules"] = summary

    # 2. periodic water box with GFN1-xTB
    box = water_box(seed=args.seed)
    interval = 10
    md = SampleSettings(
        temperatures=(300.0,),
        steps=args.water_frames * interval,
        interval=interval,
        timestep=0.5,
        friction=0.02,
        burn_in=200,
        seed=args.seed,
    )
    t = time.perf_counter()
    report = sample_structures([box], "gfn1-xtb", out / "water_md.extxyz.gz", md, log=print)
    md_frames = [r.atoms for r in read_structures([out / "water_md.extxyz.gz"])]
    manifest["files"]["water_md"] = {
        "file": "water_md.extxyz.gz",
        "method": "gfn1-xtb",
        "frames": len(md_frames),
        "atoms": len(box),
        "cell": box.cell.lengths().tolist(),
        "md": {"temperature_K": 300.0, "timestep_fs": 0.5, "friction_per_fs": 0.02, "burn_in": 200, "interval": interval},
        "seconds": round(time.perf_counter() - t, 1),
        "seconds_per_md_step": round(report.seconds_per_step, 4),
        "failures": len(report.failures),
    }
    water_starts = [md_frames[i] for i in spread(len(md_frames), args.starts)]
    per_start = int(np.ceil(args.water_frames / len(water_starts)))
    t = time.perf_counter()
    frames, overlapping = adversarial_frames(model, water_starts, settings, per_start)
    attack_seconds = time.perf_counter() - t
    summary = label(frames, "gfn1-xtb", out / "water_adversarial.extxyz.gz")
    summary.update(starts=len(water_starts), overlapping_dropped=overlapping, attack_seconds=round(attack_seconds, 1))
    manifest["files"]["water_adversarial"] = summary

    files = sorted(out.glob("*.extxyz.gz"))
    manifest["sha256"] = {p.name: file_sha256([p])[0] for p in files}
    manifest["wall_seconds"] = round(time.perf_counter() - t0, 1)
    manifest["versions"] = versions()
    write_manifest(out / "manifest.json", manifest)


if __name__ == "__main__":
    main()
