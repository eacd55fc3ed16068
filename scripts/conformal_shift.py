"""Error bars that hold under shift (issue 14, item 7): split-conformal bounds on ε_nc from in-domain data only,
tested on held-out molecules, hot frames, adversarial frames and the materials set's held-out solid (MgO).

Run (after the exports of the two data sets and scripts/build_bench_shift.py; about 10 min on one core):
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/conformal_shift.py
    (--collect-only scores the sets into out/conformal_shift/*.npz; --report-only rebuilds the report from them)

Protocol, fixed before any reported set was scored:
- Error: ε_nc, the RMS over 3N components of F_direct − F_ref (eV/Å), per structure; request: coverage 0.9.
- Calibration: in-domain frames only, split at random by group (trajectory) into a fit half (maps, regression
  weights) and a conformal half (the multiplier q̂). Nothing is fitted, weighted or grouped on a test set.
- Methods (every one a normalised split-conformal bound ε_nc ≤ q̂·g(x)):
  map(U_Δ) (isotonic, the current one), U_Δ (proportional, the current one), confidence (the model's own
  confidence head), U_Δ + confidence, and two log-linear normalisers g = exp(β·[1, log U_Δ, log c, log ν])
  fitted by least squares on the fit half, with and without ν, the structure's novelty (mean over atoms of
  the distance of its descriptor to the nearest training-set descriptor, in units of the calibration
  frames' median).
- Method choice: on a development study only (molecular-small and its sets: test_300K calibrates, its
  held-out molecules, 1200 K frames and adversarial frames test), never on the reported studies.
- Reported studies: molecular-broad (calibration: val_md300; tests: heldout_md300, test_md1200,
  adversarial_broad) and materials (calibration: val; test: held-out MgO, heldout_mgo + heldout_mgo_extra).
- The calibration split is redrawn --splits times; coverage is the mean over splits (± their standard deviation:
  the calibration set's share of the spread). Intervals: 95 % percentile bootstrap over the test set's groups (a
  trajectory, an adversarial search, a materials job; 1000 resamples) of that mean coverage.
Writes docs/conformal_shift.md, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_train import finished_members  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "out" / "conformal_shift"
DOCS = ROOT / "docs"
LEVEL = 0.9


@dataclass(frozen=True)
class SetSpec:
    """One scored set: files, the info key naming a structure's group of correlated frames, its role."""

    name: str
    files: tuple[str, ...]
    groups: tuple[str, ...]  # info keys joined into the group label
    role: str  # "calibration" | "test"


@dataclass(frozen=True)
class Study:
    """A model, the data its novelty is measured against, and its sets."""

    name: str
    model: str
    train: tuple[str, ...]
    sets: tuple[SetSpec, ...]
    ensemble: tuple[str, ...] = ()  # model specs of the ensemble members (the model itself among them), if any
    development: bool = False


MOL, MB, MAT, BENCH = "data/molecular", "out/molecular_broad", "out/materials", "data/bench"
STUDIES = (
    Study("development", "molecular-small", (f"{MOL}/train.extxyz.gz",), (
        SetSpec("test_300K", (f"{MOL}/test_300K.extxyz.gz",), ("molecule", "md_trajectory"), "calibration"),
        SetSpec("held-out molecules (300 K)", (f"{MOL}/heldout_300K.extxyz.gz",), ("molecule", "md_trajectory"), "test"),
        SetSpec("hot frames (1200 K)", (f"{MOL}/test_1200K.extxyz.gz",), ("molecule", "md_trajectory"), "test"),
        SetSpec("adversarial", (f"{BENCH}/adversarial_molecules.extxyz.gz",), ("molecule", "source_index"), "test"),
    ), ensemble=("molecular-small",) + tuple(f"molecular-small-seed{i}" for i in range(1, 5)), development=True),
    Study("molecular-broad", "molecular-broad", (f"{MB}/train.extxyz.gz",), (
        SetSpec("val_md300", (f"{MB}/val_md300.extxyz.gz",), ("job", "md_trajectory"), "calibration"),
        SetSpec("held-out molecules (300 K)", (f"{MB}/heldout_md300.extxyz.gz",), ("job", "md_trajectory"), "test"),
        SetSpec("hot frames (1200 K)", (f"{MB}/test_md1200.extxyz.gz",), ("job", "md_trajectory"), "test"),
        SetSpec("adversarial", (f"{BENCH}/adversarial_broad.extxyz.gz",), ("molecule", "source_index"), "test"),
    ), ensemble=("molecular-broad",) + tuple(f"runs/molecular_broad_member{i}/best.pt" for i in range(1, 5))),
    Study("materials", "materials", (f"{MAT}/train.extxyz.gz",), (
        SetSpec("val", (f"{MAT}/val.extxyz.gz",), ("job",), "calibration"),
        SetSpec("held-out solid (MgO)", (f"{MAT}/heldout_mgo.extxyz.gz", f"{BENCH}/heldout_mgo_extra.extxyz.gz"),
                ("job",), "test"),
    ), ensemble=("materials",) + tuple(f"runs/materials_member{i}/best.pt" for i in range(1, 5))),
)


# ---------------------------------------------------------------------------------------------
# scoring


def group_labels(records, keys: tuple[str, ...]) -> np.ndarray:
    """One label per structure: its file and the values of the info keys (InputError if a key is missing)."""
    from atomuq.core.errors import InputError

    labels = []
    for r in records:
        missing = [k for k in keys if k not in r.atoms.info]
        if missing:
            raise InputError(f"{r.where}: no info {missing} to group correlated frames by")
        labels.append("|".join([Path(r.source).name] + [str(r.atoms.info[k]) for k in keys]))
    return np.array(labels)


def atom_distances(model, records, index) -> np.ndarray:
    """Each atom's descriptor distance to its nearest training descriptor (descriptor units), structures concatenated."""
    from atomuq.workflows.ltau import compute_descriptors

    distance, _ = index.search(compute_descriptors(model, [r.atoms for r in records]), 1)
    return distance[:, 0]


def training_index(model, paths: tuple[str, ...]):
    """An exact index (uq.ltau.index, kind flat) over the descriptors of every training atom."""
    from atomuq.core.io import read_structures
    from atomuq.uq.ltau.index import build_index
    from atomuq.workflows.ltau import compute_descriptors

    return build_index(compute_descriptors(model, [r.atoms for r in read_structures([ROOT / p for p in paths])],
                                           batch_size=32))


def collect_study(study: Study) -> None:
    """Score every set of a study (U_Δ, ε_nc, ε_c, confidence, novelty, groups) into CACHE/<study>.npz."""
    from atomuq.models.registry import resolve_model
    from atomuq.workflows.bench import collect, load_labelled

    model = resolve_model(study.model)
    members = [resolve_model(spec) for spec in finished_members(study.ensemble, ROOT)]
    t = time.perf_counter()
    index = training_index(model, study.train)
    print(f"{study.name}: {len(members)} ensemble members; training descriptors of {index.size} atoms in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    arrays: dict[str, np.ndarray] = {}
    for k, spec in enumerate(study.sets):
        t = time.perf_counter()
        records = load_labelled([ROOT / p for p in spec.files], model, minimum=1)
        data = collect(records, model, ensemble=members or None, batch_size=16)
        for key in ("force_delta", "eps_nc", "eps_c", "confidence_error", "ensemble_std"):
            if key in data.values:
                arrays[f"{k}/{key}"] = data.values[key]
        arrays[f"{k}/atom_distance"] = atom_distances(model, records, index)
        arrays[f"{k}/elements"] = np.concatenate([r.atoms.numbers for r in records])
        arrays[f"{k}/groups"] = group_labels(records, spec.groups)
        arrays[f"{k}/atoms"] = np.array([len(r.atoms) for r in records])
        print(f"  {spec.name}: {len(records)} structures, {len(np.unique(arrays[f'{k}/groups']))} groups, "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(CACHE / f"{study.name}.npz", **arrays)


def load_study(study: Study) -> list[dict[str, np.ndarray]]:
    """The cached per-structure arrays of each set of a study."""
    path = CACHE / f"{study.name}.npz"
    if not path.exists():
        raise SystemExit(f"{path}: not scored yet; run without --report-only first")
    stored = np.load(path)
    return [{key.split("/", 1)[1]: stored[key] for key in stored.files if key.startswith(f"{k}/")}
            for k in range(len(study.sets))]


# ---------------------------------------------------------------------------------------------
# bounds


def with_novelty(sets: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Each set with ν: mean atom distance per structure over the calibration set's median of it."""
    def mean_distance(s: dict[str, np.ndarray]) -> np.ndarray:
        starts = np.r_[0, np.cumsum(s["atoms"])[:-1]]
        return np.add.reduceat(s["atom_distance"], starts) / s["atoms"]

    median = float(np.median(mean_distance(sets[0])))
    return [{**s, "novelty": mean_distance(s) / median} for s in sets]


def per_structure(s: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The per-structure arrays of a set at the given rows."""
    n = len(s["eps_nc"])
    return {k: v[rows] for k, v in s.items() if len(v) == n}


def _log_linear(fit: dict[str, np.ndarray]):
    """g = exp(β·[1, log U_Δ, log ν]) by least squares of log ε_nc on the fit half."""
    def features(s: dict[str, np.ndarray]) -> np.ndarray:
        return np.stack([np.ones(len(s["eps_nc"])), np.log(s["force_delta"]), np.log(s["novelty"])], axis=1)

    beta, *_ = np.linalg.lstsq(features(fit), np.log(fit["eps_nc"]), rcond=None)
    return lambda s: np.exp(features(s) @ beta)


def _max_score(fit: dict[str, np.ndarray]):
    """g = max(a·U_Δ, b·σ_ens), a and b scaling each to the fit half's RMS ε_nc (uq.evaluate.MaxScore)."""
    from atomuq.uq.evaluate import MaxScore

    columns = lambda s: np.stack([s["force_delta"], s["ensemble_std"]], axis=1)  # noqa: E731
    combined = MaxScore(("U_Δ", "σ_ens")).fit(columns(fit), fit["eps_nc"])
    return lambda s: combined.predict(columns(s))


def _isotonic(fit: dict[str, np.ndarray]):
    """g = the isotonic map U_Δ → RMS ε_nc of the fit half (held constant beyond its range)."""
    from atomuq.uq.evaluate import IsotonicMap

    fitted = IsotonicMap("rms").fit(fit["force_delta"], fit["eps_nc"])
    return lambda s: fitted.predict(s["force_delta"])


#: name -> (needs, normaliser fitted on the fit half); the last one is the method chosen on the development study
METHODS = {
    "map(U_Δ)": ((), _isotonic),
    "U_Δ": ((), lambda fit: (lambda s: s["force_delta"])),
    "confidence": ((), lambda fit: (lambda s: s["confidence_error"])),
    "σ_ens": (("ensemble_std",), lambda fit: (lambda s: s["ensemble_std"])),
    "log-linear(U_Δ, ν)": ((), _log_linear),
    "max(a·U_Δ, b·σ_ens)": (("ensemble_std",), _max_score),
}
CHOSEN = "max(a·U_Δ, b·σ_ens)"


def calibration_halves(cal: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the fit and conformal halves: whole groups at random when there are at least 20, else structures."""
    groups = np.unique(cal["groups"])
    if len(groups) >= 20:
        chosen = rng.permutation(groups)[: len(groups) // 2]
        mask = np.isin(cal["groups"], chosen)
    else:
        mask = np.zeros(len(cal["eps_nc"]), dtype=bool)
        mask[rng.permutation(len(mask))[: len(mask) // 2]] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def evaluate_study(study: Study, sets: list[dict[str, np.ndarray]], splits: int, seed: int = 0) -> dict:
    """Coverage at LEVEL and mean bound of every applicable method on every test set, over `splits` calibration splits."""
    from atomuq.uq.evaluate import ConformalCalibrator, bootstrap_ci

    sets = with_novelty(sets)
    cal, tests = sets[0], list(zip(study.sets[1:], sets[1:]))
    rng = np.random.default_rng(seed)
    halves = [calibration_halves(cal, rng) for _ in range(splits)]
    out: dict = {"calibration": {"set": study.sets[0].name, "structures": len(cal["eps_nc"]),
                                 "groups": int(len(np.unique(cal["groups"])))},
                 "sets": {spec.name: {"structures": len(s["eps_nc"]), "groups": int(len(np.unique(s["groups"]))),
                                      "mean_eps_nc": float(np.mean(s["eps_nc"]))} for spec, s in tests},
                 "methods": {}}
    for name, (needs, make) in METHODS.items():
        if any(key not in cal for key in needs):
            continue
        covered: dict[str, list[np.ndarray]] = {spec.name: [] for spec, _ in tests}
        width: dict[str, list[float]] = {spec.name: [] for spec, _ in tests}
        for fit_rows, conf_rows in halves:
            g = make(per_structure(cal, fit_rows))
            conf = per_structure(cal, conf_rows)
            calibrator = ConformalCalibrator("score").fit(g(conf), conf["eps_nc"])
            for spec, s in tests:
                bound = calibrator.predict(g(s), LEVEL)
                covered[spec.name].append(s["eps_nc"] <= bound)
                width[spec.name].append(float(bound.mean()))
        rows = {}
        for spec, s in tests:
            per_split = np.array([c.mean() for c in covered[spec.name]])
            # each structure's fraction of splits whose bound covers it; its mean over structures is the coverage
            ci = bootstrap_ci(np.mean, np.mean(covered[spec.name], axis=0), groups=s["groups"], seed=seed)
            rows[spec.name] = {"coverage": float(per_split.mean()), "coverage_sd_over_splits": float(per_split.std()),
                               "first_split": float(per_split[0]), "ci_low": ci.low, "ci_high": ci.high,
                               "mean_bound": float(np.mean(width[spec.name])),
                               "holds": bool(abs(per_split.mean() - LEVEL) <= 0.05)}
        out["methods"][name] = rows
    return out


# ---------------------------------------------------------------------------------------------
# report

KEEP = "<!-- hand-written notes below are kept by conformal_shift.py -->"


def plot(results: dict, path: Path) -> None:
    """Coverage at LEVEL per test set and method, one panel per study, the ±0.05 band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = list(results)
    heights = [len(results[n]["sets"]) for n in studies]
    fig, axes = plt.subplots(len(studies), 1, figsize=(7.5, 1.1 + 1.0 * sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, name in zip(axes[:, 0], studies):
        res = results[name]
        ax.axvspan(LEVEL - 0.05, LEVEL + 0.05, color="0.9")
        ax.axvline(LEVEL, color="0.5", lw=0.8)
        methods = list(res["methods"])
        for i, set_name in enumerate(res["sets"]):
            for j, method in enumerate(methods):
                row = res["methods"][method][set_name]
                y = i + (j - (len(methods) - 1) / 2) * 0.8 / len(methods)
                ax.errorbar(row["coverage"], y, xerr=[[max(row["coverage"] - row["ci_low"], 0)],
                                                     [max(row["ci_high"] - row["coverage"], 0)]],
                            fmt="D" if method == CHOSEN else "o", ms=6 if method == CHOSEN else 4,
                            color=colours[method], label=method if i == 0 else None, capsize=2, lw=0.8)
        ax.set_yticks(range(len(res["sets"])))
        ax.set_yticklabels([f"{s} ({res['sets'][s]['structures']})" for s in res["sets"]], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(f"{name}: calibrated on {res['calibration']['set']} ({res['calibration']['structures']})",
                     fontsize=9, loc="left")
    axes[-1, 0].set_xlabel(f"coverage of ε_nc ≤ bound at {LEVEL} requested (95 % interval over groups)")
    handles = {}
    for ax in axes[:, 0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (3 - len(studies)), 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def markdown(results: dict, command: str) -> str:
    """The generated part of docs/conformal_shift.md."""
    lines = ["# Error bars that hold under shift (split conformal, calibrated in domain only)", "",
             f"Generated by `{command}` from out/conformal_shift/*.npz; protocol in the script's docstring.", "",
             f"Bound: ε_nc ≤ q̂·g(x) at coverage {LEVEL}, ε_nc the RMS over 3N components of F_direct − F_ref "
             "(eV/Å). g is fitted on one half of the in-domain calibration set (groups of frames drawn at random), "
             "q̂ on the other; coverage is the mean over the calibration splits (± their standard deviation), "
             "[brackets]: 95 % bootstrap interval of that mean over the test set's groups (trajectories, searches, "
             "jobs). **Held** = mean coverage within ±0.05 of 0.9. Method "
             f"**{CHOSEN}** was chosen on the development study (molecular-small) before the others were scored.", "",
             "![coverage](conformal_shift.png)", ""]
    for name, res in results.items():
        cal = res["calibration"]
        lines += [f"## {name}{' (development: method choice)' if name == 'development' else ''}", "",
                  f"Calibration: {cal['set']}, {cal['structures']} structures in {cal['groups']} groups.", "",
                  "| set | n (groups) | mean ε_nc | " + " | ".join(res["methods"]) + " |",
                  "|---|---:|---:|" + "---:|" * len(res["methods"])]
        for set_name, info in res["sets"].items():
            cells = []
            for rows in res["methods"].values():
                row = rows[set_name]
                text = (f"{row['coverage']:.3f} ± {row['coverage_sd_over_splits']:.3f} "
                        f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}] w {row['mean_bound']:.3f}")
                cells.append(f"**{text}**" if row["holds"] else text)
            lines.append(f"| {set_name} | {info['structures']} ({info['groups']}) | {info['mean_eps_nc']:.3f} | "
                         + " | ".join(cells) + " |")
        lines += ["", "w: mean bound (eV/Å); bold: held.", ""]
    return "\n".join(lines) + "\n"


def write_report(results: dict, command: str) -> None:
    """docs/conformal_shift.{json,md,png}; hand-written notes after KEEP in the .md are kept."""
    DOCS.mkdir(exist_ok=True)
    (DOCS / "conformal_shift.json").write_text(json.dumps({"command": command, "level": LEVEL, "chosen": CHOSEN,
                                                           "studies": results}, indent=1) + "\n")
    plot(results, DOCS / "conformal_shift.png")
    path = DOCS / "conformal_shift.md"
    notes = path.read_text().split(KEEP, 1)[1] if path.exists() and KEEP in path.read_text() else "\n"
    path.write_text(markdown(results, command) + KEEP + notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", nargs="+", default=[s.name for s in STUDIES])
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--splits", type=int, default=50)
    args = ap.parse_args()
    chosen = [s for s in STUDIES if s.name in args.studies]
    if not args.report_only:
        for study in chosen:
            collect_study(study)
    if args.collect_only:
        return
    results = {study.name: evaluate_study(study, load_study(study), args.splits) for study in STUDIES
               if (CACHE / f"{study.name}.npz").exists()}
    write_report(results, "OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/conformal_shift.py")
    for name, res in results.items():
        for set_name in res["sets"]:
            row = res["methods"].get(CHOSEN, {}).get(set_name)
            if row:
                print(f"{name:16s} {set_name:28s} {CHOSEN}: coverage {row['coverage']:.3f} (held: {row['holds']})")


if __name__ == "__main__":
    sys.exit(main())
