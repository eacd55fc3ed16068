"""LTAU-FF re-weighting of the training set (the paper's section 5.1, Fig. 3): up-weight easy or hard atoms.

Run (about 30-40 minutes on one core with --epochs 15):
    OMP_NUM_THREADS=1 .venv/bin/python scripts/ltau_reweighting.py --epochs 15 --out docs/ltau_reweighting

μ_M(p_i) and σ_M(p_i) come from the committed error log of the bundled model plus, when present,
the logs of the ensemble members' runs (runs/molecular_seed{1..4}/error_log, made by
scripts/train_ensemble.sh; they share the training atoms). Weights follow the paper's appendix E:
"hard" w_i ∝ exp[4.5(1 − μ + σ)], "easy" w_i ∝ exp[2(μ + σ)] (mean 1). Three models are trained from
scratch with configs/train_molecular.toml for the same (short) number of epochs and seed —
uniform, easy, hard — and compared on the training set, the validation split and the test and
held-out sets (direct-force MAE per component, eV/Å) and on the train–validation gap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from atomuq.core.io import read_structures
from atomuq.core.memory import reuse_freed_memory
from atomuq.models.registry import resolve_model
from atomuq.uq.ltau.reweight import loss_weights
from atomuq.workflows.ltau import fit_from_logs
from atomuq.workflows.score import score_records
from atomuq.workflows.train import TrainConfig, train_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "molecular"
SPLITS = ("test_300K", "test_600K", "test_1200K", "heldout_300K", "heldout_1200K")
SCHEMES = {"uniform": None, "easy": 2.0, "hard": 4.5}


def force_mae(model, path: Path) -> float:
    """Direct-force MAE per component (eV/Å) of model on a labelled file."""
    scored, _ = score_records(read_structures([path]), model, batch_size=32)
    diff = np.concatenate([a.arrays["forces_direct"] - a.arrays["REF_forces"] for a in scored])
    return float(np.abs(diff).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ltau_reweighting")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "reweighting")
    args = parser.parse_args()
    args.out = args.out.resolve()
    reuse_freed_memory()
    logs = [ROOT / "data" / "training" / "molecular-small" / "error_log"]
    logs += sorted(p for p in (ROOT / "runs").glob("molecular_seed*/error_log") if (p / "error_log.json").is_file())
    estimator = fit_from_logs(logs, resolve_model("molecular-small"), [DATA / "train.extxyz.gz"])
    args.runs.mkdir(parents=True, exist_ok=True)
    base = TrainConfig.from_toml(ROOT / "configs" / "train_molecular.toml")
    rows = []
    for scheme, lam in SCHEMES.items():
        data = base.data
        weights = None
        if lam is not None:
            weights = loss_weights(estimator.confidence, estimator.spread, scheme, lam)
            np.save(args.runs / f"weights_{scheme}.npy", weights)
            data = dataclasses.replace(base.data, atom_weights=args.runs / f"weights_{scheme}.npy")
        config = dataclasses.replace(base, run_dir=args.runs / scheme, epochs=args.epochs, data=data)
        result = train_model(config)
        last = result.history[-1]
        model = result.model
        row = {"scheme": scheme, "lambda": lam, "train_forces_mae": last.get("train_forces_mae"),
               "val_forces_mae": last.get("val_forces_mae"),
               "weights_max": None if weights is None else float(weights.max()),
               "weights_min": None if weights is None else float(weights.min())}
        row["gap"] = row["val_forces_mae"] - row["train_forces_mae"]
        for split in SPLITS:
            row[split] = force_mae(model, DATA / f"{split}.extxyz.gz")
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"epochs": args.epochs, "logs": [str(p.relative_to(ROOT)) for p in logs],
               "mean_mu": float(estimator.confidence.mean()), "mean_sigma": float(estimator.spread.mean()),
               "atol": estimator.atol, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "# LTAU-FF re-weighting (the paper's section 5.1, Fig. 3)", "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python scripts/ltau_reweighting.py --epochs {args.epochs}`", "",
        f"μ_M and σ_M from {len(logs)} training run(s) ({', '.join(summary['logs'])}); atol {estimator.atol:.3f} eV/Å; "
        f"mean μ_M {summary['mean_mu']:.3f}, mean σ_M {summary['mean_sigma']:.3f}. Each model: "
        f"configs/train_molecular.toml, {args.epochs} epochs, seed 0. Direct-force MAE per component (eV/Å); "
        "train/validation from the last epoch's evaluation pass.", "",
        "| scheme | λ | weights min–max | train | validation | gap | " + " | ".join(SPLITS) + " |",
        "|---|---:|---|---:|---:|---:|" + "---:|" * len(SPLITS),
    ]
    for r in rows:
        w = "1" if r["lambda"] is None else f"{r['weights_min']:.2f}–{r['weights_max']:.2f}"
        lines.append(f"| {r['scheme']} | {r['lambda'] or '-'} | {w} | {r['train_forces_mae']:.4f} | "
                     f"{r['val_forces_mae']:.4f} | {r['gap']:+.4f} | " + " | ".join(f"{r[s]:.4f}" for s in SPLITS) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
