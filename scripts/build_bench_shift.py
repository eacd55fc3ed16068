"""Test sets of the conformal-under-shift study (issue 14, item 7) that the data sets do not already hold.

Run after the two exports (`scripts/build_broad_molecular_set.py --export out/molecular_broad`,
`scripts/build_materials_set.py --export out/materials`), about 15 min on one core:
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/build_bench_shift.py

1. adversarial_broad.extxyz.gz: adversarial frames of the bundled molecular-broad. One start per test molecule
   (its first test_md300 frame: training molecules, trajectories the model never saw), attacked as the other
   bench sets are (atomuq attack: delta-boltzmann, kT 0.05 eV/atom, 100 steps), about --per-start log-spaced
   frames kept per search, overlapping frames dropped, labelled with GFN2-xTB (the set's reference).
   Info "molecule" and "source_index" (one search).
2. heldout_mgo_extra.extxyz.gz: more frames of the materials set's held-out solid (MgO, 64 atoms), so that it
   reaches the study's 300 structures: --mgo-frames frames, each a held-out MgO frame (spread over
   out/materials/heldout_mgo) rattled again at a temperature drawn from the set's thermal ladder (Einstein
   rattles of build_materials_set.rattled) and strained by up to 1 %, labelled with GFN1-xTB at the set's
   tblite options. Info "job" = the source frame's job (the group of correlated frames), "family" = "extra".
Frames whose reference calculation fails are dropped and counted in data/bench/manifest_shift.json.
Resumable: each labelling continues from its resume file when rerun with the same arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from atomuq.core.io import file_sha256, read_structures  # noqa: E402
from atomuq.models.registry import resolve_model  # noqa: E402
from atomuq.workflows.attack import AttackSettings  # noqa: E402
from build_bench_data import adversarial_frames, attack_record, label, spread, versions, write_manifest  # noqa: E402
from build_materials_set import FULL, TBLITE_OPTIONS, random_strain, rattled, strained  # noqa: E402

MGO_STRAIN = 0.01  # largest strain component of the extra MgO frames


def molecule_starts(data: Path) -> list:
    """The first test_md300 frame of every test molecule (file order)."""
    starts, seen = [], set()
    for record in read_structures([data / "test_md300.extxyz.gz"]):
        name = record.atoms.info["molecule"]
        if name not in seen:
            seen.add(name)
            starts.append(record.atoms)
    return starts


def mgo_frames(data: Path, n: int, seed: int) -> list:
    """n new MgO frames: held-out frames spread over the split, rattled at a ladder temperature and strained."""
    source = [r.atoms for r in read_structures([data / "heldout_mgo.extxyz.gz"])]
    rng = np.random.default_rng(seed)
    frames = []
    for k, i in enumerate(np.resize(spread(len(source), n), n)):
        temperature = float(rng.choice(FULL.temperatures))
        atoms = strained(rattled(source[i], rng, temperature), random_strain(rng, MGO_STRAIN, isotropic=False))
        atoms.info.update(family="extra", temperature=temperature, strain_max=MGO_STRAIN, source_frame=int(i),
                          job=source[i].info["job"], split="heldout", source=f"mgo.extra:{k}")
        atoms.calc = None
        frames.append(atoms)
    return frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--molecular", type=Path, default=Path("out/molecular_broad"))
    ap.add_argument("--materials", type=Path, default=Path("out/materials"))
    ap.add_argument("--out", type=Path, default=Path("data/bench"))
    ap.add_argument("--per-start", type=int, default=10, help="adversarial frames kept per search")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--kT", type=float, default=0.05)
    ap.add_argument("--mgo-frames", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="reference processes (one core each)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = AttackSettings(objective="delta-boltzmann", kT=args.kT, steps=args.steps, seed=args.seed)
    starts = molecule_starts(args.molecular)
    t = time.perf_counter()
    frames, overlapping = adversarial_frames(resolve_model("molecular-broad"), starts, settings, args.per_start)
    attack_seconds = time.perf_counter() - t
    print(f"{len(starts)} searches, {len(frames)} frames kept ({overlapping} overlapping dropped) in "
          f"{attack_seconds:.0f} s", flush=True)
    adversarial = args.out / "adversarial_broad.extxyz.gz"
    files = {"adversarial_broad": label(frames, "gfn2-xtb", adversarial, options={"charge": 0, "multiplicity": 1},
                                        workers=args.workers)}
    files["adversarial_broad"].update(starts=len(starts), overlapping_dropped=overlapping,
                                      attack_seconds=round(attack_seconds, 1), model="molecular-broad")
    mgo = args.out / "heldout_mgo_extra.extxyz.gz"
    files["heldout_mgo_extra"] = label(mgo_frames(args.materials, args.mgo_frames, args.seed), "gfn1-xtb", mgo,
                                       options=TBLITE_OPTIONS, workers=args.workers)
    files["heldout_mgo_extra"].update(strain_max=MGO_STRAIN, temperatures=list(FULL.temperatures))
    manifest = {
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/build_bench_shift.py"
                   + (f" --workers {args.workers}" if args.workers != 1 else ""),
        "attack": attack_record(settings),
        "frames_per_search": args.per_start,
        "tblite_options_materials": TBLITE_OPTIONS,
        "files": files,
        "sha256": {p.name: file_sha256([p])[0] for p in (adversarial, mgo)},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "versions": versions(),
    }
    write_manifest(args.out / "manifest_shift.json", manifest)


if __name__ == "__main__":
    main()
