"""LTAU-FF on the molecular set, after the paper's 3BPA experiment (LTAU-FF Fig. 1): calibration curves.

Run (about 3 minutes on one core):
    OMP_NUM_THREADS=1 .venv/bin/python scripts/ltau_reproduction.py --out docs/ltau_reproduction
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/ltau_reproduction.py --set materials --out docs/ltau_materials

--set materials (issue 14, item 6; after `scripts/build_materials_set.py --export out/materials`): the bundled
materials model and its run's error log (runs/materials/error_log, 8 epochs, every epoch counted), test frames
split by temperature (the thermal rattles at 300-1200 K), the strained test frames and the held-out MgO; each split
also ranks with U_Δ and, where its members exist, the ensemble spread σ_ens (runs/materials_member1..4 with the
model), all against the same ε_nc.

Fits LTAU estimators for the bundled model from its committed training error log
(data/training/molecular-small/error_log, 80 epochs, 43,385 training atoms; direct-force errors):
one over all epochs (the paper's choice) and one over the last half of training (--skip-epochs 40).
For every test split (300 / 600 / 1200 K, and the held-out molecules), with k = 1 and k = K:
reliability curves uncalibrated (s = 1) and with s fitted on a random half of the split's
structures and evaluated on the other half; miscalibration area and Brier score; Spearman
correlation of the per-structure mean uncertainty and of the maximum latent distance with the
true per-structure error ε_nc. Writes OUT.md, OUT.json and OUT_*.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.stats import spearmanr

from atomuq.core.io import read_structures
from atomuq.core.memory import reuse_freed_memory
from atomuq.models.registry import resolve_model
from atomuq.uq.ltau.calibration import brier_score, fit_scale, reliability_curve
from atomuq.uq.ltau.plots import reliability_figure
from atomuq.workflows.ltau import fit_from_logs, predict_records

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_train import finished_members  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "molecular"
LOG = ROOT / "data" / "training" / "molecular-small" / "error_log"
TEST = ("test_300K", "test_600K", "test_1200K")
HELDOUT = ("heldout_300K", "heldout_600K", "heldout_1200K")
MATERIALS = ROOT / "out" / "materials"
MATERIALS_TEMPERATURES = (300, 450, 600, 750, 900, 1200)


@dataclass(frozen=True)
class LTAUSet:
    """What one reproduction runs on: model, error log, training files, splits (name -> file and frame filter)."""

    model: str
    log: Path
    train: Path
    splits: dict[str, tuple[Path, Callable[[dict], bool]]]
    groups: dict[str, tuple[str, ...]]  # figure name -> splits drawn in it
    variants: dict[str, int | None]  # name -> skip_epochs
    members: tuple[str, ...] = ()
    title: str = "the molecular set (the paper's 3BPA experiment, Fig. 1)"


def _every(info: dict) -> bool:
    return True


def _thermal_at(temperature: float) -> Callable[[dict], bool]:
    return lambda info: info.get("family") == "thermal" and float(info.get("temperature", -1)) == temperature


SETS = {
    "molecular": LTAUSet(
        "molecular-small", LOG, DATA / "train.extxyz.gz",
        {name: (DATA / f"{name}.extxyz.gz", _every) for name in TEST + HELDOUT},
        {"test": TEST, "heldout": HELDOUT}, {"all epochs": None, "last 40 epochs": 40}),
    "materials": LTAUSet(
        "materials", ROOT / "runs" / "materials" / "error_log", MATERIALS / "train.extxyz.gz",
        {**{f"test_{t}K": (MATERIALS / "test.extxyz.gz", _thermal_at(float(t))) for t in MATERIALS_TEMPERATURES},
         "test_strained": (MATERIALS / "test.extxyz.gz", lambda info: info.get("family") == "strain"),
         "heldout_mgo": (MATERIALS / "heldout_mgo.extxyz.gz", _every)},
        {"test": tuple(f"test_{t}K" for t in MATERIALS_TEMPERATURES), "heldout": ("test_strained", "heldout_mgo")},
        {"all epochs": None}, members=tuple(f"runs/materials_member{i}/best.pt" for i in range(1, 5)),
        title="the materials set (GFN1-xTB), after the paper's 3BPA experiment"),
}


def structure_halves(offsets: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Atom masks of a random half of the structures (calibration) and of the rest (evaluation)."""
    n = len(offsets) - 1
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).choice(n, size=n // 2, replace=False)] = True
    per_atom = np.repeat(chosen, np.diff(offsets))
    return per_atom, ~per_atom


def per_structure(values: np.ndarray, offsets: np.ndarray, how: str) -> np.ndarray:
    """Mean, max or RMS/√3 (ε per structure, eV/Å) of per-atom values within each structure."""
    parts = np.split(values, offsets[1:-1])
    if how == "mean":
        return np.array([p.mean() for p in parts])
    if how == "max":
        return np.array([p.max() for p in parts])
    return np.array([np.sqrt(np.mean(p**2) / 3.0) for p in parts])


def other_rankers(records, model, ensemble) -> dict:
    """r_s with ε_nc of the per-structure U_Δ and (with an ensemble) σ_ens on the same frames (workflows.bench.collect)."""
    from atomuq.workflows.bench import collect

    data = collect(records, model, ensemble=ensemble, group_key="system")
    out = {"spearman_force_delta_eps": float(spearmanr(data.values["force_delta"], data.values["eps_nc"]).statistic)}
    if "ensemble_std" in data.values:
        out["spearman_ensemble_eps"] = float(spearmanr(data.values["ensemble_std"], data.values["eps_nc"]).statistic)
    return out


def evaluate_split(estimator, descriptors, errors, offsets, k: int, seed: int) -> tuple[dict, dict]:
    """Metrics and reliability curves of one split at one k."""
    pred = estimator.predict(descriptors, k)
    p, atol = pred.confidence, estimator.atol
    fit_mask, test_mask = structure_halves(offsets, seed)
    fit = fit_scale(p[fit_mask], errors[fit_mask], atol)
    held_p, held_e = p[test_mask], errors[test_mask]
    eps = per_structure(errors, offsets, "rms")
    curves = {"s1": reliability_curve(p, errors <= atol),
              "fitted": reliability_curve(held_p, held_e <= fit.scale * atol)}
    row = {
        "k": k, "atoms": int(len(p)), "structures": int(len(offsets) - 1),
        "mean_error_norm": float(errors.mean()), "mean_p": float(p.mean()),
        "observed_fraction_below_atol": float(np.mean(errors <= atol)),
        "area_s1": curves["s1"].miscalibration_area,
        "brier_s1": brier_score(p, errors <= atol),
        "s": fit.scale,
        "area_fitted_heldout_half": curves["fitted"].miscalibration_area,
        "area_s1_heldout_half": reliability_curve(held_p, held_e <= atol).miscalibration_area,
        "brier_fitted_heldout_half": brier_score(held_p, held_e <= fit.scale * atol),
        "spearman_uncertainty_eps": float(spearmanr(per_structure(1 - p, offsets, "mean"), eps).statistic),
        "spearman_distance_eps": float(spearmanr(per_structure(pred.distance, offsets, "max"), eps).statistic),
        "spearman_expected_error_atom": float(spearmanr(pred.expected_error, errors).statistic),
    }
    return row, curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=list(SETS), default="molecular", dest="which")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ltau_reproduction")
    parser.add_argument("--ks", type=int, nargs=2, default=(1, 10), help="small and large k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="rewrite OUT.md from an existing OUT.json")
    args = parser.parse_args()
    args.out = args.out.resolve()
    if args.report_only:
        write_report(json.loads(args.out.with_suffix(".json").read_text()), args.out)
        return
    reuse_freed_memory()
    spec = SETS[args.which]
    model = resolve_model(spec.model)
    t0 = time.perf_counter()
    variants = {name: fit_from_logs([spec.log], model, [spec.train], skip_epochs=skip)
                for name, skip in spec.variants.items()}
    fit_time = time.perf_counter() - t0
    first = next(iter(variants))
    members = [model] + [resolve_model(m) for m in finished_members(spec.members, ROOT)]
    splits, rankers = {}, {}
    for name, (path, keep) in spec.splits.items():
        records = [r for r in read_structures([path]) if keep(r.atoms.info)]
        scored = predict_records(records, model, variants[first], k=1)
        splits[name] = (scored.descriptors, scored.errors, scored.offsets)
        if spec.members:
            rankers[name] = other_rankers(records, model, members if len(members) > 1 else None)
    results, curves = [], {}
    for variant, estimator in variants.items():
        for k in args.ks:
            for name, (descriptors, errors, offsets) in splits.items():
                row, c = evaluate_split(estimator, descriptors, errors, offsets, k, args.seed)
                if name in rankers:
                    row.update(rankers[name])
                results.append({"variant": variant, "split": name, "atol": estimator.atol, **row})
                curves[(variant, k, name)] = c
    args.out.parent.mkdir(parents=True, exist_ok=True)
    k_small, k_large = args.ks
    tags = {"all epochs": "all", "last 40 epochs": "last40"}
    for variant in variants:
        tag = tags[variant]
        for group, names in spec.groups.items():
            fitted_label = "s fitted on half, other half shown"
            panels = [
                (f"k = {k_small}, s = 1", [(n, curves[(variant, k_small, n)]["s1"]) for n in names]),
                (f"k = {k_large}, s = 1", [(n, curves[(variant, k_large, n)]["s1"]) for n in names]),
                (f"k = {k_large}, {fitted_label}", [
                    (f"{n} s={next(r['s'] for r in results if r['variant'] == variant and r['k'] == k_large and r['split'] == n):.2f}",
                     curves[(variant, k_large, n)]["fitted"]) for n in names]),
            ]
            reliability_figure(panels, args.out.parent / f"{args.out.name}_{tag}_{group}.png")
    summary = {"fit_time_s": fit_time, "n_training_atoms": variants[first].n_atoms, "seed": args.seed,
               "atol": {v: e.atol for v, e in variants.items()}, "rows": results}
    if args.which != "molecular":
        summary.update(set=args.which, model=spec.model, ensemble_members=len(members),
                       epochs=int(json.loads((spec.log / "error_log.json").read_text())["n_epochs_completed"]),
                       title=spec.title)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    write_report(summary, args.out)


def write_report(summary: dict, out: Path) -> None:
    """OUT.md from the summary (the table of every split, variant and k, and the figures)."""
    results = summary["rows"]
    which = summary.get("set", "molecular")
    labels = {"spearman_force_delta_eps": "r_s(U_Δ, ε_nc)", "spearman_ensemble_eps": "r_s(σ_ens, ε_nc)"}
    rankers = [key for key in labels if any(key in r for r in results)]
    if which == "molecular":
        command = f"OMP_NUM_THREADS=1 .venv/bin/python scripts/ltau_reproduction.py --out {out.relative_to(ROOT)}"
        about = f"bundled model `molecular-small`, its training error log ({summary['n_training_atoms']:,} atoms, 80 epochs"
    else:
        command = (f"OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/ltau_reproduction.py --set {which} "
                   f"--out {out.relative_to(ROOT)}")
        about = (f"bundled model `{summary['model']}`, its run's error log ({summary['n_training_atoms']:,} atoms, "
                 f"{summary['epochs']} epochs")
    lines = [
        f"# LTAU-FF on {summary.get('title', 'the molecular set (the paper' + chr(39) + 's 3BPA experiment, Fig. 1)')}", "",
        f"Command: `{command}`", "",
        f"Estimator: {about}, direct-force errors), exact FAISS index, atol = mean final-epoch error norm = "
        f"{summary['atol']['all epochs']:.4f} eV/Å. s is fitted on a random half of each split's structures (seed "
        f"{summary.get('seed', 0)}) and the 'other half' columns are measured on the rest."
        + (f" U_Δ and σ_ens (the model and {summary['ensemble_members'] - 1} members) rank the same frames."
           if rankers else ""), "",
        "| p_i from | split | k | atoms | mean ε_i (eV/Å) | mean p_j | observed P(ε ≤ atol) | area s=1 | Brier s=1 "
        "| fitted s | area s=1 (other half) | area fitted (other half) | r_s(mean 1−p_j, ε_nc) | r_s(max distance, ε_nc) |"
        + "".join(f" {labels[k]} |" for k in rankers),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(rankers),
    ]
    for r in results:
        lines.append(f"| {r['variant']} | {r['split']} | {r['k']} | {r['atoms']} | {r['mean_error_norm']:.3f} | "
                     f"{r['mean_p']:.3f} | {r['observed_fraction_below_atol']:.3f} | {r['area_s1']:.3f} | "
                     f"{r['brier_s1']:.3f} | {r['s']:.2f} | {r['area_s1_heldout_half']:.3f} | "
                     f"{r['area_fitted_heldout_half']:.3f} | {r['spearman_uncertainty_eps']:.2f} | "
                     f"{r['spearman_distance_eps']:.2f} |" + "".join(f" {r.get(k, float('nan')):.2f} |" for k in rankers))
    lines += ["", "Figures (left: k small, uncalibrated; middle: k large, uncalibrated; right: k large, calibrated):", ""]
    tags = [t for v, t in (("all epochs", "all"), ("last 40 epochs", "last40")) if v in summary["atol"]]
    for tag in tags:
        for group in ("test", "heldout"):
            lines.append(f"![{tag} {group}]({out.name}_{tag}_{group}.png)")
    path = out.with_suffix(".md")
    keep = "<!-- hand-written notes below are kept by ltau_reproduction.py -->"
    notes = path.read_text().split(keep, 1)[1] if path.exists() and keep in path.read_text() else None
    path.write_text("\n".join(lines) + "\n" + (keep + notes if notes is not None else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
