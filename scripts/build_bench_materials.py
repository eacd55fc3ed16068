"""Adversarial benchmark frames of the bundled materials model (issue 14, part 2 on solids); committed under data/bench/.

Run after `PYTHONPATH=src python scripts/build_materials_set.py --export out/materials` (about 30 min on two cores):
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/build_bench_materials.py --workers 2

For every system of the materials set, the held-out MgO included, --starts frames evenly spread over its test
split (out/materials/test_SYSTEM.extxyz.gz; MgO: heldout_mgo) are attacked with the bundled materials model
(atomuq attack: delta-boltzmann, kT 0.05 eV/atom, 100 steps, positions only, the cell kept), about --per-start
log-spaced frames of each search are kept (step 0, the equilibrium start, among them), overlapping frames are
dropped, and the rest are labelled with GFN1-xTB at the materials set's tblite options (Γ point;
build_materials_set.TBLITE_OPTIONS) -> data/bench/adversarial_materials.extxyz.gz (info key "system", and
"source_index": one search). Frames whose SCF fails are dropped and counted in data/bench/manifest_materials.json.
Resumable: the labelling continues from its resume file when rerun with the same arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import ase

sys.path.insert(0, str(Path(__file__).resolve().parent))
from atomuq.core.io import file_sha256, read_structures  # noqa: E402
from atomuq.models.registry import resolve_model  # noqa: E402
from atomuq.workflows.attack import AttackSettings  # noqa: E402
from build_bench_data import adversarial_frames, attack_record, label, spread, versions, write_manifest  # noqa: E402
from build_materials_set import TBLITE_OPTIONS  # noqa: E402

KEY = "system"
HELD_OUT = "mgo"


def starts_of(data: Path, n: int) -> list[ase.Atoms]:
    """n frames evenly spread over each system's test split (the held-out system's own split for MgO)."""
    files = sorted(data.glob("test_*.extxyz.gz")) + [data / f"heldout_{HELD_OUT}.extxyz.gz"]
    starts = []
    for path in files:
        frames = [r.atoms for r in read_structures([path])]
        starts += [frames[i] for i in spread(len(frames), n)]
    return starts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("out/materials"))
    ap.add_argument("--out", type=Path, default=Path("data/bench"))
    ap.add_argument("--model", default="materials")
    ap.add_argument("--starts", type=int, default=3, help="starting frames per system")
    ap.add_argument("--per-start", type=int, default=6, help="frames kept per search")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--kT", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="GFN1-xTB processes (one core each)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model)
    settings = AttackSettings(objective="delta-boltzmann", kT=args.kT, steps=args.steps, seed=args.seed)
    starts = starts_of(args.data, args.starts)
    t = time.perf_counter()
    frames, overlapping = adversarial_frames(model, starts, settings, args.per_start, key=KEY)
    attack_seconds = time.perf_counter() - t
    systems = sorted({a.info[KEY] for a in starts})
    print(f"{len(systems)} systems, {len(starts)} searches, {len(frames)} frames kept "
          f"({overlapping} overlapping dropped) in {attack_seconds:.0f} s", flush=True)
    output = args.out / "adversarial_materials.extxyz.gz"
    summary = label(frames, "gfn1-xtb", output, options=TBLITE_OPTIONS, workers=args.workers)
    summary.update(starts=len(starts), overlapping_dropped=overlapping, attack_seconds=round(attack_seconds, 1),
                   systems=systems, held_out=HELD_OUT)
    manifest = {
        "command": f"OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/build_bench_materials.py --workers {args.workers}",
        "model": args.model,
        "attack": attack_record(settings),
        "starts_per_system": args.starts,
        "frames_per_search": args.per_start,
        "tblite_options": TBLITE_OPTIONS,
        "kpoints": "Gamma only",
        "files": {"adversarial_materials": summary},
        "sha256": {output.name: file_sha256([output])[0]},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "versions": versions(),
    }
    write_manifest(args.out / "manifest_materials.json", manifest)


if __name__ == "__main__":
    main()
