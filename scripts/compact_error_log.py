"""Compact (histogram) error logs against the full log they were made from: file sizes and LTAU differences.

Run (about 3 minutes on one core):
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/compact_error_log.py --out docs/compact_error_log

Compacts the bundled model's committed training error log (data/training/molecular-small/error_log,
80 epochs x 43,385 atoms, float32) with `compact_error_log` (all epochs, and the last 40 at 10 and 5 edges
per decade), fits LTAU estimators (direct-force errors) from the full and from each compact log on the same
descriptors and FAISS index, and compares at the default atol (mean final-epoch error, an edge of every
compact log), at an edge (0.1 eV/Å) and inside bins (0.3, 0.5 eV/Å): the training atoms' p_i, and on test
structures (the first --structures of three splits) the per-atom LTAU uncertainty 1 - p_j (k = 1 and 5),
the per-structure mean uncertainty and the expected error; and the sizes at the next models' scale
(about 390k atoms x 40 epochs, tiled from this log). Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from atomuq.core.io import read_structures
from atomuq.models.registry import resolve_model
from atomuq.uq.ltau.estimator import fit_estimator
from atomuq.uq.ltau.index import build_index
from atomuq.workflows.error_log import ErrorLogWriter, compact_error_log, load_error_log
from atomuq.workflows.ltau import compute_descriptors, training_records

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "molecular"
LOG = ROOT / "data" / "training" / "molecular-small" / "error_log"
SPLITS = ("test_300K", "test_1200K", "heldout_1200K")
#: (label, skip_epochs, edges per decade)
VARIANTS = (("all 80 epochs, 10/decade", 0, 10), ("last 40 epochs, 10/decade", 40, 10),
            ("last 40 epochs, 5/decade", 40, 5))
ATOLS = ("default", 0.1, 0.3, 0.5)
KS = (1, 5)


def folder_size(folder: Path) -> int:
    """Bytes of the files in a folder."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def tiled_sizes(full, folder: Path, tiles: int = 9, seed: int = 0) -> dict:
    """Sizes at the scale of the next models: the last 40 epochs tiled `tiles` times over the atoms, each copy's
    atoms scaled by a random factor (log-normal, sigma 0.1) so the copies differ, written as a full log, compacted."""
    rng = np.random.default_rng(seed)
    factor = rng.lognormal(0.0, 0.1, full.n_atoms * tiles).astype(np.float32)
    errors = {kind: np.tile(np.asarray(getattr(full, f"errors_{kind}")[-40:]), (1, tiles)) * factor
              for kind in ("direct", "conservative")}
    offsets = np.concatenate([[0], np.cumsum(np.tile(np.diff(full.structure_offsets), tiles))])
    writer = ErrorLogWriter.create(folder / "full", run_id="tiled", n_epochs=40, structure_offsets=offsets,
                                   numbers=np.tile(full.atom_numbers, tiles),
                                   reference_force_norms=np.tile(full.reference_force_norms, tiles) * factor,
                                   training_files=[], training_data_hash="tiled")
    for epoch in range(40):
        writer.begin_epoch(epoch)
        writer.write(0, errors["direct"][epoch], errors["conservative"][epoch])
        writer.end_epoch("tiled")
    writer.close()
    sizes = {"n_atoms": int(offsets[-1]), "n_epochs": 40, "full_bytes": folder_size(folder / "full")}
    for per_decade in (10, 5):
        compact = compact_error_log(folder / "full", folder / f"compact{per_decade}", per_decade=per_decade)
        sizes[f"compact_{per_decade}_per_decade_bytes"] = folder_size(compact.directory)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "compact_error_log")
    parser.add_argument("--structures", type=int, default=60, help="test structures per split")
    args = parser.parse_args()
    full = load_error_log(LOG)
    model = resolve_model("molecular-small")
    train = training_records(full, [DATA / "train.extxyz.gz"])
    index = build_index(compute_descriptors(model, [r.atoms for r in train]))
    tests = [r for name in SPLITS for r in read_structures([DATA / f"{name}.extxyz.gz"])[: args.structures]]
    test_desc = compute_descriptors(model, [r.atoms for r in tests])
    ptr = np.concatenate([[0], np.cumsum([len(r.atoms) for r in tests])])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, skip, per_decade in VARIANTS:
            compact = compact_error_log(LOG, Path(tmp) / f"{skip}_{per_decade}", skip_epochs=skip, per_decade=per_decade)
            exact_run, binned_run = full.distribution("direct", skip), compact.distribution("direct", skip)
            for atol in ATOLS:
                value = exact_run.final_mean_error if atol == "default" else atol
                est = {form: fit_estimator([run], full.atom_numbers, full.reference_force_norms, index, value)
                       for form, run in (("full", exact_run), ("compact", binned_run))}
                dp = np.abs(est["full"].confidence - est["compact"].confidence)
                row = {"variant": label, "skip_epochs": skip, "edges_per_decade": per_decade,
                       "size_bytes": folder_size(compact.directory), "atol": float(value),
                       "atol_is_edge": bool(np.isin(value, binned_run.bins.edges)),
                       "train_p_max_abs_diff": float(dp.max()), "train_p_mean_abs_diff": float(dp.mean())}
                for k in KS:
                    pred = {form: e.predict(test_desc, k, ptr=ptr) for form, e in est.items()}
                    atom = np.abs(pred["full"].uncertainty - pred["compact"].uncertainty)
                    structure = np.abs(pred["full"].per_structure["ltau_uncertainty"]
                                       - pred["compact"].per_structure["ltau_uncertainty"])
                    rel = np.abs(pred["compact"].expected_error / pred["full"].expected_error - 1)
                    row[f"k{k}"] = {"atom_uncertainty_max_abs_diff": float(atom.max()),
                                    "atom_uncertainty_mean_abs_diff": float(atom.mean()),
                                    "structure_uncertainty_max_abs_diff": float(structure.max()),
                                    "expected_error_max_rel_diff": float(rel.max())}
                rows.append(row)
                print(json.dumps(row))
    with tempfile.TemporaryDirectory() as tmp:
        tiled = tiled_sizes(full, Path(tmp))
    summary = {"tiled": tiled, "full_log_bytes": folder_size(LOG), "n_training_atoms": full.n_atoms, "n_epochs": full.n_epochs,
               "test_structures": len(tests), "test_atoms": int(ptr[-1]), "splits": SPLITS, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    write_report(summary, args.out)


def write_report(summary: dict, out: Path) -> None:
    """OUT.md: one row per compact variant and atol."""
    lines = [
        "# Compact (histogram) error logs against the full log", "",
        f"Command: `OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/compact_error_log.py --out "
        f"{out.resolve().relative_to(ROOT)}`", "",
        f"Full log: `data/training/molecular-small/error_log`, {summary['n_epochs']} epochs x "
        f"{summary['n_training_atoms']:,} atoms, {summary['full_log_bytes'] / 1e6:.1f} MB. LTAU estimators on "
        f"direct-force errors from the full log and from each compact form, same descriptors and exact index; "
        f"differences on {summary['test_structures']} test structures ({summary['test_atoms']:,} atoms; the first of "
        f"{', '.join(summary['splits'])}). p_i from the counts is exact at every edge (the default atol, the mean "
        "final-epoch error, is one) and log-linear inside a bin.", "",
        "| compact form | size | atol (eV/Å) | edge? | train p_i max / mean abs diff | test 1-p_j k=1 max / mean "
        "| k=5 max / mean | structure mean 1-p_j max (k=1 / k=5) | expected error max rel. diff (k=5) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    tiled = summary["tiled"]
    for r in summary["rows"]:
        k1, k5 = r["k1"], r["k5"]
        lines.append(
            f"| {r['variant']} | {r['size_bytes'] / 1e6:.2f} MB | {r['atol']:.4g} | {'yes' if r['atol_is_edge'] else 'no'} "
            f"| {r['train_p_max_abs_diff']:.3g} / {r['train_p_mean_abs_diff']:.3g} "
            f"| {k1['atom_uncertainty_max_abs_diff']:.3g} / {k1['atom_uncertainty_mean_abs_diff']:.3g} "
            f"| {k5['atom_uncertainty_max_abs_diff']:.3g} / {k5['atom_uncertainty_mean_abs_diff']:.3g} "
            f"| {k1['structure_uncertainty_max_abs_diff']:.3g} / {k5['structure_uncertainty_max_abs_diff']:.3g} "
            f"| {k5['expected_error_max_rel_diff']:.3g} |")
    lines += [
        "", f"At the next models' scale (the last 40 epochs tiled over {tiled['n_atoms']:,} atoms, copies scaled by "
        f"random per-atom factors): full log {tiled['full_bytes'] / 1e6:.1f} MB, compact "
        f"{tiled['compact_10_per_decade_bytes'] / 1e6:.2f} MB (10 edges per decade), "
        f"{tiled['compact_5_per_decade_bytes'] / 1e6:.2f} MB (5 per decade).",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
