"""Model card of a trained native model on the molecular set: errors, parity, equigrad, confidence head.

Run (after training, see configs/train_molecular.toml):
    .venv/bin/python scripts/model_card.py --model runs/molecular/best.pt \
        --compare runs/molecular_noequigrad/best.pt --out docs/model_card
Only the parity figure (the bundled model, about a minute; needs no other model):
    PYTHONPATH=src python scripts/model_card.py --model src/atomuq/data/models/molecular-small.pt --only parity --out docs/model_card
Writes OUT.md, OUT.json and figures OUT_parity.png, OUT_equigrad.png, OUT_confidence.png; with
--members M1 M2 ..., OUT_ensemble.md with every member's force errors per split.
The new models' sets (exported by the build scripts' --export) take --splits, --parity-splits and --group-key:
    .venv/bin/python scripts/model_card.py --model runs/materials/best.pt --data out/materials \
        --splits test heldout --parity-splits test heldout --group-key system --out docs/model_card_materials

- Force MAE (per Cartesian component, eV/Å) of the direct and the conservative forces, energy MAE
  (meV/atom), U_Delta and r_s(U_Delta, eps_nc) on every test split (300 / 600 / 1200 K, held-out molecules),
  stress MAE (GPa, direct head and virial) where the frames carry reference stress; with --group-key, the same
  per system (an info key of the frames: molecule, system).
- ||Delta_rot|| against the measured energy spread over 32 random rotations (Orb-v3 Fig. 3), for
  the model and, with --compare, a model trained without the equigrad term.
- The confidence head's predicted error bin against the true per-atom force error (Orb-v3 Fig. 4)
  with the Spearman correlation of its expected error and the true error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.colors
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from atomuq.core.batch import Batch  # noqa: E402
from atomuq.core.io import read_structures, reference_energy, reference_stress  # noqa: E402
from atomuq.core.memory import reuse_freed_memory  # noqa: E402
from atomuq.models.checkpoint import load_model  # noqa: E402
from atomuq.models.derivatives import evaluate, rotational_gradient_norm  # noqa: E402
from atomuq.uq.confidence import bin_centres  # noqa: E402
from atomuq.uq.equigrad import energy_spread_under_rotations  # noqa: E402
from atomuq.workflows.score import score_records  # noqa: E402

SPLITS = ("test_300K", "test_600K", "test_1200K", "heldout_300K", "heldout_600K", "heldout_1200K")
#: eV/Å³ in GPa
EV_PER_A3_IN_GPA = 160.21766


def split_metrics(records, scored) -> dict:
    """Force MAE (eV/Å, per component) of both force kinds, energy MAE (meV/atom), mean U_Delta (eV/Å), r_s of U_Delta
    with eps_nc, and the stress MAE (GPa) of the direct head and the virial where the frames carry reference stress."""
    ref_f = np.concatenate([a.arrays["REF_forces"] for a in scored])
    direct = np.concatenate([a.arrays["forces_direct"] for a in scored])
    conservative = np.concatenate([a.arrays["forces_conservative"] for a in scored])
    e_err = [abs(a.info["model_energy"] - reference_energy(r.atoms)) / len(a) for r, a in zip(records, scored)]
    deltas, eps = [a.info["force_delta"] for a in scored], [a.info["eps_nc"] for a in scored]
    metrics = {
        "structures": len(scored), "atoms": int(len(ref_f)),
        "force_mae_direct": float(np.abs(direct - ref_f).mean()),
        "force_mae_conservative": float(np.abs(conservative - ref_f).mean()),
        "mean_abs_force": float(np.abs(ref_f).mean()),
        "energy_mae_mev_per_atom": 1000 * float(np.mean(e_err)),
        "force_delta_mean": float(np.mean(deltas)),
        "spearman_force_delta_eps_nc": float(spearmanr(deltas, eps).statistic) if len(scored) > 2 else None,
    }
    stressed = [(reference_stress(r.atoms), a) for r, a in zip(records, scored)]
    stressed = [(ref, a) for ref, a in stressed if ref is not None and "stress_virial" in a.info]
    if stressed:
        ref_s = np.array([ref for ref, _ in stressed])
        for kind in ("stress_direct", "stress_virial"):
            if all(kind in a.info for _, a in stressed):
                pred = np.array([np.asarray(a.info[kind], dtype=float) for _, a in stressed])
                metrics[f"{kind}_mae_gpa"] = float(np.abs(pred - ref_s).mean() * EV_PER_A3_IN_GPA)
    return metrics


def group_metrics(records, scored, key: str) -> dict:
    """split_metrics per value of the frames' info[key] (a molecule, a system), sorted by name."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(str(record.atoms.info.get(key, "(none)")), []).append(i)
    return {name: split_metrics([records[i] for i in idx], [scored[i] for i in idx])
            for name, idx in sorted(groups.items())}


def reference_name(records) -> str:
    """The reference method the frames were labelled with (info label_method), as the figures name it."""
    methods = sorted({str(r.atoms.info.get("label_method", "reference")) for r in records})
    return "/".join(m.upper().replace("-XTB", "-xTB") for m in methods)


PARITY_SPLITS = ("test_300K", "test_1200K", "heldout_300K")
PARITY_COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")


def parity_figure(scored: dict, path: str, names: tuple = PARITY_SPLITS, reference: str = "GFN2-xTB") -> None:
    """Model against GFN2-xTB force components, direct (top) and conservative (bottom), one column per split.

    One panel per split so that no split hides another; colour is the log density of points (hexagonal bins).
    """
    splits = [(split, colour) for split, colour in zip([n for n in names if n in scored], PARITY_COLOURS)]
    fig, axes = plt.subplots(2, len(splits), figsize=(4.2 * len(splits), 8.4), sharex=True, sharey=True, squeeze=False)
    lim = 12
    for row, kind in enumerate(("forces_direct", "forces_conservative")):
        for col, (split, colour) in enumerate(splits):
            ax = axes[row, col]
            ref = np.concatenate([a.arrays["REF_forces"] for a in scored[split]]).ravel()
            pred = np.concatenate([a.arrays[kind] for a in scored[split]]).ravel()
            light = 0.7 + 0.3 * np.array(matplotlib.colors.to_rgb(colour))  # single points stay visible
            cmap = matplotlib.colors.LinearSegmentedColormap.from_list(split, [light * 0.9, colour])
            ax.hexbin(ref, pred, gridsize=70, extent=(-lim, lim, -lim, lim), bins="log", mincnt=1, cmap=cmap, linewidths=0)
            ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
            ax.set_title(f"{split}, {kind.split('_')[1]} forces\nMAE {np.abs(pred - ref).mean():.3f} eV/Å, "
                         f"{len(ref):,} components", fontsize=10)
            if row == 1:
                ax.set_xlabel(f"{reference} force component (eV/Å)")
            if col == 0:
                ax.set_ylabel(f"model {kind.split('_')[1]} force (eV/Å)")
    fig.suptitle("Force parity of the model (colour: log count per hexagon)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rotation_study(model, structures, n_rotations: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per structure: ||Delta_rot|| (eV) and the energy std over random rotations (eV)."""
    grads, spreads = [], []
    for atoms in structures:
        pred = evaluate(model, Batch.from_atoms([atoms], dtype=model.dtype), conservative=False, rotational=True)
        grads.append(float(rotational_gradient_norm(pred)[0]))
        spreads.append(energy_spread_under_rotations(model, atoms, n_rotations, seed=0))
    return np.array(grads), np.array(spreads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--compare", help="a model trained without the equigrad term")
    ap.add_argument("--data", default="data/molecular")
    ap.add_argument("--out", default="docs/model_card")
    ap.add_argument("--rotation-structures", type=int, default=40)
    ap.add_argument("--members", nargs="*", default=[], help="ensemble members: their errors go to OUT_ensemble.md")
    ap.add_argument("--only", choices=["parity"], help="only redraw OUT_parity.png (scores the splits it shows)")
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), help="files DATA/SPLIT.extxyz.gz to report")
    ap.add_argument("--parity-splits", nargs="+", default=list(PARITY_SPLITS), help="splits in the parity figure")
    ap.add_argument("--group-key", help="info key of a frame's system (molecule, system): per-system tables too")
    args = ap.parse_args()
    reuse_freed_memory()
    torch.manual_seed(0)
    model = load_model(args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = model.metadata
    card: dict = {"model": args.model, "parameters": sum(p.numel() for p in model.parameters()),
                  "config": model.config.to_dict(), "epochs": meta.get("epoch"), "best_epoch": meta.get("best_epoch"),
                  "wall_time_s": meta.get("wall_time_s"), "trained_on": meta.get("trained_on"), "splits": {}}

    per_split = {}
    for split in args.splits if args.only is None else args.parity_splits:
        path = Path(args.data) / f"{split}.extxyz.gz"
        if not path.exists():
            continue
        records = read_structures([path])
        scored, _ = score_records(records, model, batch_size=32)
        per_split[split] = (records, scored)
        card["splits"][split] = split_metrics(records, scored)
        if args.group_key:
            card.setdefault("systems", {})[split] = group_metrics(records, scored, args.group_key)
        print(split, json.dumps(card["splits"][split]))
    if not per_split:
        raise SystemExit(f"none of {', '.join(f'{args.data}/{s}.extxyz.gz' for s in args.splits)} exists")
    reference = reference_name([r for records, _ in per_split.values() for r in records])

    parity_figure({split: scored for split, (_, scored) in per_split.items()}, f"{out}_parity.png",
                  tuple(args.parity_splits), reference)
    if args.only == "parity":
        return

    # equigrad: ||Delta_rot|| against the measured energy spread under 32 rotations
    rng = np.random.default_rng(0)
    pool = [a for split in args.parity_splits if split in per_split for a in per_split[split][0]]
    chosen = [pool[i].atoms for i in rng.choice(len(pool), size=min(args.rotation_structures, len(pool)), replace=False)]
    fig, ax = plt.subplots(figsize=(5.5, 4.6))
    card["equigrad"] = {}
    studies = [("with equigrad (this model)", model, "tab:red")]
    if args.compare:
        studies.append(("without equigrad", load_model(args.compare), "tab:grey"))
    for label, net, colour in studies:
        grads, spreads = rotation_study(net, chosen)
        n_atoms = np.array([len(a) for a in chosen])
        ax.scatter(1000 * grads / n_atoms, 1000 * spreads / n_atoms, s=14, color=colour, label=label)
        card["equigrad"][label] = {"mean_rotational_gradient_mev_per_atom": float(1000 * np.mean(grads / n_atoms)),
                                   "mean_energy_spread_mev_per_atom": float(1000 * np.mean(spreads / n_atoms)),
                                   "spearman": float(spearmanr(grads, spreads).statistic)}
    ax.set(xlabel="‖Δ_rot‖ (meV/atom)", ylabel="energy std over 32 rotations (meV/atom)", xscale="log", yscale="log",
           title="rotational invariance (Orb-v3 Fig. 3)")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{out}_equigrad.png", dpi=130)
    plt.close(fig)

    # confidence head: predicted bin against the true per-atom direct-force error
    scored = [a for split in per_split for a in per_split[split][1]]
    batch_atoms = [r.atoms for split in per_split for r in per_split[split][0]]
    true_err = np.concatenate([a.arrays["eps_nc_atoms"] for a in scored])
    expected = np.concatenate([a.arrays["confidence_error_atoms"] for a in scored])
    edges = model.confidence_bin_edges.double()
    bins = []
    with torch.no_grad():
        for start in range(0, len(batch_atoms), 64):
            batch = Batch.from_atoms(batch_atoms[start:start + 64], dtype=model.dtype)
            bins.append(model(batch).confidence_logits.argmax(-1).numpy())
    bins = np.concatenate(bins)
    centres = bin_centres(edges).numpy()
    rho = float(spearmanr(expected, true_err).statistic)
    card["confidence"] = {"spearman_expected_vs_true": rho, "atoms": int(len(true_err)),
                          "bins_used": sorted(set(bins.tolist()))}
    fig, ax = plt.subplots(figsize=(6, 4.6))
    used = sorted(set(bins.tolist()))
    ax.boxplot([true_err[bins == b] for b in used], positions=centres[used], widths=0.004, showfliers=False,
               manage_ticks=False)
    ax.plot([0, edges[-1]], [0, edges[-1]], "k--", lw=0.8)
    ax.set(xlabel="predicted error bin centre (eV/Å)", ylabel="true per-atom direct-force error (eV/Å)",
           title=f"confidence head (Orb-v3 Fig. 4)\nSpearman {rho:.2f} (expected vs true error), {len(true_err)} test atoms")
    fig.tight_layout()
    fig.savefig(f"{out}_confidence.png", dpi=130)
    plt.close(fig)

    if args.members:
        rows = ["| member | seed | epochs | " + " | ".join(f"{s} direct / conservative (eV/Å)" for s in per_split) + " |",
                "|---|---:|---:|" + "---:|" * len(per_split)]
        card["members"] = {}
        for path in [args.model, *args.members]:
            member = load_model(path)
            cells, metrics = [], {}
            for split, (records, _) in per_split.items():
                metrics[split] = split_metrics(records, score_records(records, member, batch_size=32)[0])
                cells.append(f"{metrics[split]['force_mae_direct']:.3f} / {metrics[split]['force_mae_conservative']:.3f}")
            card["members"][path] = metrics
            rows.append(f"| {Path(path).name} | {member.metadata.get('seed')} | {member.metadata.get('epoch')} | "
                        + " | ".join(cells) + " |")
        Path(f"{out}_ensemble.md").write_text("\n".join(rows) + "\n")
        print("\n".join(rows))

    Path(f"{out}.json").write_text(json.dumps(card, indent=2))
    stress = any("stress_direct_mae_gpa" in m or "stress_virial_mae_gpa" in m for m in card["splits"].values())

    def row(name: str, m: dict) -> str:
        rho = m["spearman_force_delta_eps_nc"]
        cells = [name, str(m["structures"]), str(m["atoms"]), f"{m['force_mae_direct']:.4f}",
                 f"{m['force_mae_conservative']:.4f}", f"{m['force_mae_direct'] / m['mean_abs_force']:.2f}",
                 f"{m['energy_mae_mev_per_atom']:.2f}", f"{m['force_delta_mean']:.4f}",
                 "–" if rho is None else f"{rho:.2f}"]
        if stress:
            cells += [f"{m[k]:.3f}" if k in m else "–" for k in ("stress_direct_mae_gpa", "stress_virial_mae_gpa")]
        return "| " + " | ".join(cells) + " |"

    columns = ["structures", "atoms", "force MAE direct (eV/Å)", "force MAE conservative (eV/Å)",
               "direct MAE / mean |F|", "energy MAE (meV/atom)", "mean U_Δ (eV/Å)", "r_s(U_Δ, ε_nc)"]
    columns += ["stress MAE direct (GPa)", "stress MAE virial (GPa)"] if stress else []

    def header(first: str) -> list[str]:
        return ["| " + " | ".join([first, *columns]) + " |", "|---|" + "---:|" * len(columns)]

    lines = header("split") + [row(split, m) for split, m in card["splits"].items()]
    for split, systems in card.get("systems", {}).items():
        lines += ["", f"Per {args.group_key}, split {split}:", "", *header(args.group_key)]
        lines += [row(name, m) for name, m in systems.items()]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({k: card[k] for k in ("equigrad", "confidence")}, indent=2))


if __name__ == "__main__":
    main()
