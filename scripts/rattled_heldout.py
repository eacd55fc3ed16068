"""Direct-force errors on rattled held-out molecules (issue 13): new molecular model against molecular-small.

Starts: the first --per-molecule frames of each held-out molecule's 300 K GFN2-xTB trajectory (the heldout_md300
split exported by `python scripts/build_broad_molecular_set.py --export out/molecular_broad`). Each start is
displaced by a Gaussian of standard deviation sigma per Cartesian component (seeded), for sigma 0.02 ... 0.25 Å,
labelled with GFN2-xTB through the public command (`atomuq label --method gfn2-xtb`), and scored by each model that
knows the molecule's elements (molecular-small knows H C N O only). Reported per sigma and model: direct and
conservative force MAE (eV/Å, per component) and direct MAE over mean |F|, on the three held-out molecules of the
first set (3BPA, naproxen, nicotine) and on all held-out molecules a model knows.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/rattled_heldout.py \\
        --models runs/molecular_broad/best.pt molecular-small   # docs/rattled_heldout.md and .json, a few minutes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from ase.io import read, write

from atomuq.core.io import read_structures
from atomuq.models.registry import resolve_model
from atomuq.workflows.score import score_records

ROOT = Path(__file__).resolve().parents[1]
SIGMAS = (0.02, 0.05, 0.08, 0.12, 0.15, 0.2, 0.25)
FIRST_SET = ("3bpa", "naproxen", "nicotine")
MIN_DISTANCE = 0.6  # Å: a draw closer than this is redrawn (atomuq label refuses overlapping atoms)


def rattled_frames(source: Path, per_molecule: int, seed: int) -> list:
    """The displaced starts, each tagged with its molecule and sigma (Å)."""
    frames = read(source, index=":")
    starts: dict[str, list] = {}
    for atoms in frames:
        bucket = starts.setdefault(atoms.info["molecule"], [])
        if len(bucket) < per_molecule:
            bucket.append(atoms)
    rng = np.random.default_rng(seed)
    out = []
    for name in sorted(starts):
        for sigma in SIGMAS:
            for atoms in starts[name]:
                new = atoms.copy()
                new.calc = None
                new.info = {"molecule": name, "sigma": sigma}
                for _ in range(100):  # redraw a displacement that puts two atoms closer than MIN_DISTANCE
                    new.positions = atoms.positions + rng.normal(0.0, sigma, atoms.positions.shape)
                    d = new.get_all_distances()
                    if d[np.triu_indices(len(new), 1)].min() >= MIN_DISTANCE:
                        break
                else:
                    raise SystemExit(f"{name}: no displacement of sigma {sigma} A kept atoms {MIN_DISTANCE} A apart")
                out.append(new)
    return out


def metrics(scored: list) -> dict:
    """Force MAE (eV/Å) of both kinds and direct MAE over mean |F| of scored frames with REF_forces."""
    ref = np.concatenate([a.arrays["REF_forces"] for a in scored])
    direct = np.concatenate([a.arrays["forces_direct"] for a in scored])
    conservative = np.concatenate([a.arrays["forces_conservative"] for a in scored])
    mae = float(np.abs(direct - ref).mean())
    return {"frames": len(scored), "force_mae_direct": mae, "force_mae_conservative": float(np.abs(conservative - ref).mean()),
            "mean_abs_force": float(np.abs(ref).mean()), "direct_over_mean_abs_force": mae / float(np.abs(ref).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="model specs (checkpoint paths or bundled names)")
    parser.add_argument("--data", type=Path, default=ROOT / "out" / "molecular_broad")
    parser.add_argument("--per-molecule", type=int, default=4, help="starts per held-out molecule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "rattled_heldout")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    raw, labelled = args.work / "rattled.extxyz", args.work / "rattled_labelled.extxyz"
    start = time.perf_counter()
    if not labelled.exists():
        write(raw, rattled_frames(args.data / "heldout_md300.extxyz.gz", args.per_molecule, args.seed))
        subprocess.run([sys.executable, "-m", "atomuq.cli.main", "label", str(raw), "-o", str(labelled),
                        "--method", "gfn2-xtb", "--workers", "1"], check=True)
    label_s = time.perf_counter() - start
    records = read_structures([labelled])
    result: dict = {"sigmas_A": list(SIGMAS), "per_molecule": args.per_molecule, "seed": args.seed,
                    "frames": len(records), "label_wall_s": label_s, "models": {}}
    for spec in args.models:
        model = resolve_model(spec)
        known = set(int(z) for z in model.config.elements)
        mine = [r for r in records if set(r.atoms.numbers.tolist()) <= known]
        scored, _ = score_records(mine, model, batch_size=32)
        rows = {}
        for sigma in SIGMAS:
            at = [a for a in scored if a.info["sigma"] == sigma]
            first = [a for a in at if a.info["molecule"] in FIRST_SET]
            rows[str(sigma)] = {"first_set": metrics(first), "all_known": metrics(at),
                                "molecules": len({a.info["molecule"] for a in at})}
        result["models"][spec] = rows
        print(spec, json.dumps({s: round(r["first_set"]["force_mae_direct"], 3) for s, r in rows.items()}))
    (args.docs / "rattled_heldout.json").write_text(json.dumps(result, indent=1))
    lines = ["# Rattled held-out molecules: direct-force errors", "",
             "Rebuilt by `OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/rattled_heldout.py --models "
             + " ".join(args.models) + f"` ({len(records)} GFN2-xTB single points, labelled in {label_s:.0f} s). "
             f"{args.per_molecule} starts per held-out molecule (first frames of its 300 K trajectory), each displaced "
             "by a Gaussian of standard deviation sigma per Cartesian component (redrawn where two atoms came within "
             f"{MIN_DISTANCE} Å). Force MAE per component, eV/Å.", ""]
    for group, title in (("first_set", "3BPA, naproxen, nicotine (held out of both models)"),
                         ("all_known", "every held-out molecule the model knows")):
        lines += [f"## {title}", "", "| sigma (Å) | " + " | ".join(
            f"{m}: direct / conservative / direct÷mean\\|F\\|"
            for m in args.models) + " |", "|---:|" + "---:|" * len(args.models)]
        for sigma in SIGMAS:
            cells = []
            for spec in args.models:
                r = result["models"][spec][str(sigma)][group]
                cells.append(f"{r['force_mae_direct']:.3f} / {r['force_mae_conservative']:.3f} / "
                             f"{r['direct_over_mean_abs_force']:.2f} ({r['frames']} frames)")
            lines.append(f"| {sigma:g} | " + " | ".join(cells) + " |")
        lines.append("")
    (args.docs / "rattled_heldout.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
