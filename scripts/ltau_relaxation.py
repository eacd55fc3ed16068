"""LTAU-FF along relaxation trajectories (the paper's OC20 IS2RS experiment, LTAU-FF Fig. 4), on our molecules.

Run (about 15 minutes on one core):
    OMP_NUM_THREADS=1 .venv/bin/python scripts/ltau_relaxation.py --out docs/ltau_relaxation

Starting structures: frames of the 1200 K test set (the seven training molecules, hot) and of
the 1200 K held-out set (naproxen, 3BPA, nicotine). Each is relaxed twice from the same start:
with the bundled model's direct forces (FIRE, fmax 0.05 eV/Å) and with the reference GFN2-xTB
(tblite, BFGS, fmax 0.05 eV/Å). The outcome is the RMSD (Å, after optimal superposition) between
the two relaxed structures. Along the model's trajectory the per-structure LTAU uncertainty
(mean over atoms of 1 − p_j, k neighbours) gives four predictors: initial, final, maximum, mean.
Reports each predictor's Spearman correlation with the final RMSD (paper: initial and maximum
predict it, final and mean do not) and the mean RMSD in predictor quartiles. Writes OUT.md,
OUT.json, OUT.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from ase.optimize import BFGS, FIRE  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from atomuq.calculator import AtomuqCalculator  # noqa: E402
from atomuq.core.io import read_structures  # noqa: E402
from atomuq.reference import get_method  # noqa: E402
from atomuq.core.memory import reuse_freed_memory  # noqa: E402
from atomuq.models.registry import resolve_model  # noqa: E402
from atomuq.workflows.ltau import fit_from_logs  # noqa: E402
from atomuq.workflows.selection import structure_rmsd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "molecular"
LOG = ROOT / "data" / "training" / "molecular-small" / "error_log"
PREDICTORS = ("initial", "final", "max", "mean")


def pick(records, per_molecule: int):
    """per_molecule evenly spaced frames of every molecule (info 'molecule'), in file order."""
    by_name: dict[str, list] = {}
    for rec in records:
        by_name.setdefault(str(rec.atoms.info.get("molecule", "?")), []).append(rec)
    chosen = []
    for recs in by_name.values():
        chosen += [recs[i] for i in np.linspace(0, len(recs) - 1, per_molecule).round().astype(int)]
    return chosen


def relax_model(atoms, calc, fmax: float, steps: int) -> tuple[object, list[float], int]:
    """Relax with the model; LTAU uncertainty (mean 1 − p_j) of every visited structure."""
    atoms = atoms.copy()
    atoms.calc = calc
    trace: list[float] = []
    opt = FIRE(atoms, logfile=None)
    opt.attach(lambda: trace.append(calc.get_property("ltau_uncertainty", atoms)))
    opt.run(fmax=fmax, steps=steps)
    return atoms, trace, opt.nsteps


def relax_reference(atoms, fmax: float, steps: int) -> tuple[object, int]:
    """Relax with GFN2-xTB (BFGS)."""
    atoms = atoms.copy()
    atoms.calc = get_method("gfn2-xtb").make_calculator()
    opt = BFGS(atoms, logfile=None)
    opt.run(fmax=fmax, steps=steps)
    return atoms, opt.nsteps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ltau_relaxation")
    parser.add_argument("--per-molecule", type=int, default=4)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    args.out = args.out.resolve()
    reuse_freed_memory()
    model = resolve_model("molecular-small")
    estimator = fit_from_logs([LOG], model, [DATA / "train.extxyz.gz"])
    calc = AtomuqCalculator(model, forces="direct", ltau=estimator, ltau_k=args.k)
    starts = pick(read_structures([DATA / "test_1200K.extxyz.gz"]), args.per_molecule)
    starts += pick(read_structures([DATA / "heldout_1200K.extxyz.gz"]), args.per_molecule)
    rows = []
    t0 = time.perf_counter()
    for n, rec in enumerate(starts):
        relaxed, trace, model_steps = relax_model(rec.atoms, calc, args.fmax, args.steps)
        reference, ref_steps = relax_reference(rec.atoms, args.fmax, args.steps)
        rmsd = float(structure_rmsd(reference, [relaxed])[0])
        rows.append({"source": Path(rec.source).name, "index": rec.index, "molecule": rec.atoms.info.get("molecule"),
                     "atoms": len(rec.atoms), "model_steps": model_steps, "reference_steps": ref_steps,
                     "converged_model": model_steps < args.steps, "converged_reference": ref_steps < args.steps,
                     "rmsd": rmsd, "initial": trace[0], "final": trace[-1], "max": max(trace),
                     "mean": float(np.mean(trace))})
        print(f"{n + 1}/{len(starts)} {rows[-1]['molecule']}: RMSD {rmsd:.3f} Å, steps {model_steps}/{ref_steps}, "
              f"uncertainty initial {trace[0]:.3f} final {trace[-1]:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    rmsd = np.array([r["rmsd"] for r in rows])
    stats = {}
    for name in PREDICTORS:
        values = np.array([r[name] for r in rows])
        quartile = np.digitize(values, np.quantile(values, [0.25, 0.5, 0.75]))
        stats[name] = {"spearman": float(spearmanr(values, rmsd).statistic),
                       "rmsd_by_quartile": [float(rmsd[quartile == q].mean()) for q in range(4)]}
    args.out.with_suffix(".json").write_text(json.dumps({"k": args.k, "rows": rows, "stats": stats}, indent=1) + "\n")
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), sharey=True)
    heldout = np.array([r["source"].startswith("heldout") for r in rows])
    for ax, name in zip(axes, PREDICTORS):
        values = np.array([r[name] for r in rows])
        ax.scatter(values[~heldout], rmsd[~heldout], s=14, label="training molecules, 1200 K start")
        ax.scatter(values[heldout], rmsd[heldout], s=14, marker="^", label="held-out molecules, 1200 K start")
        ax.set(xlabel=f"{name} LTAU uncertainty (mean 1 − p_j)", yscale="log",
               title=f"{name}: r_s = {stats[name]['spearman']:.2f}")
    axes[0].set_ylabel("RMSD model vs GFN2-xTB relaxed (Å)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    lines = [
        "# LTAU-FF along relaxation trajectories (the paper's OC20 IS2RS experiment, Fig. 4)", "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python scripts/ltau_relaxation.py --out {args.out.relative_to(ROOT)}`", "",
        f"{len(rows)} starting structures ({args.per_molecule} per molecule from test_1200K and heldout_1200K), relaxed "
        f"with the bundled model's direct forces (FIRE) and with GFN2-xTB (BFGS), fmax {args.fmax} eV/Å, at most "
        f"{args.steps} steps; {sum(r['converged_model'] for r in rows)} model and "
        f"{sum(r['converged_reference'] for r in rows)} reference relaxations converged. LTAU: the bundled model's "
        f"estimator (all epochs, atol {estimator.atol:.3f} eV/Å), k = {args.k}. RMSD after optimal superposition: "
        f"median {np.median(rmsd):.3f} Å, max {rmsd.max():.3f} Å.", "",
        "| predictor | Spearman r_s with final RMSD | mean RMSD (Å) by predictor quartile, low → high |",
        "|---|---:|---|",
    ]
    for name in PREDICTORS:
        q = " / ".join(f"{v:.3f}" for v in stats[name]["rmsd_by_quartile"])
        lines.append(f"| {name} | {stats[name]['spearman']:.2f} | {q} |")
    lines += ["", f"![LTAU along relaxations]({args.out.name}.png)"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
