"""Writing an `atomuq bench` report: bench.json, bench.md (tables) and PNG figures in one directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from atomuq.core.io import atomic_path
from atomuq.uq.evaluate import BinnedCalibration, Coverage, calibration_curve, plots
from atomuq.workflows.bench import PAIRS, SIGMAS, SYMBOLS, BenchData, Calibration

#: one colour per system: matplotlib's ten, then ten more distinct ones
COLOURS = [*colormaps["tab10"].colors, "black", "gold", "navy", "lime", "maroon", "teal", "magenta", "olive", "coral", "slategray"]
FIGURES = {
    "scatter": "force_delta_vs_errors.png",
    "ensemble": "ensemble_std_vs_error.png",
    "calibration": "calibration.png",
    "coverage": "coverage.png",
}
#: the calibration written with --calibrate-on
CALIBRATION_FILES = ("force_delta_map.json", "force_delta_conformal.json")
#: every file a report folder may hold (files of an earlier report that this one does not write are removed)
REPORT_FILES = (*FIGURES.values(), *CALIBRATION_FILES, "bench.json", "bench.md")


def ci_text(d: dict[str, Any] | None, digits: int = 2) -> str:
    """'0.93 [0.88, 0.96]' from a bootstrap dict; '—' when missing, 'undefined' when undefined."""
    if not d:
        return "—"
    if "undefined" in d:
        return "undefined"
    return f"{d['estimate']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def pair_label(key: str) -> str:
    """'force_delta_vs_eps_c' -> 'r_s(U_Δ, ε_c)'."""
    score, error = key.split("_vs_")
    return f"{SYMBOLS[score]}, {SYMBOLS[error]}"


def _groups(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {**report["systems"], "all (pooled)": report["all"]}


def correlation_table(report: dict[str, Any]) -> list[str]:
    """Markdown: per system n and r_s with bootstrap CIs of every pair present."""
    keys = [f"{s}_vs_{e}" for s, e in PAIRS if f"{s}_vs_{e}" in report["all"]["spearman"]]
    lines = ["| system | n | " + " | ".join(f"r_s({pair_label(k)})" for k in keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for name, g in _groups(report).items():
        lines.append(f"| {name} | {g['n']} | " + " | ".join(ci_text(g["spearman"].get(k)) for k in keys) + " |")
    return lines


def flag_table(report: dict[str, Any]) -> list[str]:
    """Markdown: per system ROC-AUC of each score flagging its error above the threshold, with threshold and base rate."""
    keys = [f"{s}_vs_{e}" for s, e in PAIRS if f"{s}_vs_{e}" in report["all"]["roc_auc"]]
    head = " | ".join(f"AUC({pair_label(k)}) | threshold | base rate" for k in keys)
    lines = [f"| system | {head} |", "|---|" + "---:|" * (3 * len(keys))]
    for name, g in _groups(report).items():
        cells = []
        for k in keys:
            r = g["roc_auc"][k]
            cells += [ci_text(r["auc"]), f"{r['threshold']:.3f}", f"{r['base_rate']:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def calibration_table(report: dict[str, Any]) -> list[str]:
    """Markdown: ENCE, ZMS and miscalibration area of every σ, pooled and per system."""
    lines = ["| system | σ (against) | ENCE | ZMS | miscalibration area |", "|---|---|---:|---:|---:|"]
    for name, g in _groups(report).items():
        for sigma, c in g["calibration"].items():
            error = SYMBOLS[SIGMAS[sigma][1]]
            if "undefined" in c:
                lines.append(f"| {name} | {sigma} ({error}) | undefined | | |")
                continue
            lines.append(
                f"| {name} | {sigma} ({error}) | {ci_text(c['ence'])} | {ci_text(c['zms'])} | {ci_text(c.get('miscalibration_area'), 3)} |"
            )
    return lines


def coverage_table(report: dict[str, Any]) -> list[str]:
    """Markdown: empirical coverage (± binomial stderr) and mean bound of the conformal ε_nc bounds per input file."""
    cal = report["calibration"]
    levels = report["settings"]["levels"]
    lines = [
        "| input file | n | normaliser | " + " | ".join(f"coverage {lv:g} (mean bound eV/Å)" for lv in levels) + " | mean ε_nc |",
        "|---|---:|---|" + "---:|" * (len(levels) + 1),
    ]
    for name, f in cal["coverage"].items():
        label = Path(name).name + (" (in-sample: calibration file)" if f["in_sample"] else "")
        for norm, covs in f["coverage"].items():
            cells = " | ".join(f"{c['coverage']:.3f} ± {c['stderr']:.3f} ({c['mean_bound']:.3f})" for c in covs)
            lines.append(f"| {label} | {f['n']} | {norm} | {cells} | {f['mean_eps_nc']:.3f} |")
    return lines


def averaged_lines(report: dict[str, Any]) -> list[str]:
    """Markdown bullets of the model-averaged correlations."""
    m = report["model_averaged"]
    lines = []
    for key, v in m["mean_of_system_spearman"].items():
        means = m["spearman_of_system_means"].get(key)
        across = f"{means:.2f}" if isinstance(means, float) else "—"
        lines.append(
            f"- r_s({pair_label(key)}): mean over {v['n']} systems {v['mean']:.2f} ± {v['std']:.2f} (std over systems); "
            f"r_s of the per-system means {across}"
        )
    return lines


#: systems beyond which the scatter figures name none of them
MAX_LEGEND_SYSTEMS = 20


def _scatter(data: BenchData, ax, score: str, error: str) -> None:
    series = {
        name: (data.values[score][data.systems == name], data.values[error][data.systems == name])
        for name in dict.fromkeys(data.systems.tolist())
    }
    ax.set_prop_cycle(color=COLOURS)
    plots.plot_score_vs_error(series, ax=ax, score_label=f"{SYMBOLS[score]} (eV/Å)", error_label=f"{SYMBOLS[error]} (eV/Å)")
    lo = min(float(data.values[score].min()), float(data.values[error].min()))
    hi = max(float(data.values[score].max()), float(data.values[error].max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
    if len(series) > MAX_LEGEND_SYSTEMS:  # a legend of 100 molecules would cover the points
        ax.get_legend().remove()
        ax.text(0.02, 0.98, f"{len(series)} systems, one colour each", transform=ax.transAxes, va="top", fontsize=7)
    else:
        ax.legend(fontsize=6, markerscale=2, ncol=2)


def write_figures(data: BenchData, report: dict[str, Any], calibration: Calibration | None, out: Path) -> list[Path]:
    """The report's PNG figures (FIGURES); returns their paths."""
    paths = []
    fig = Figure(figsize=(11, 4.8))
    axes = fig.subplots(1, 2)
    for ax, error in zip(axes, ("eps_c", "eps_nc")):
        _scatter(data, ax, "force_delta", error)
        ax.set_title(f"U_Δ vs {SYMBOLS[error]} (dashed: y = x)")
    paths.append(plots.save_figure(axes[0], out / FIGURES["scatter"]))
    if "ensemble_std" in data.values and "eps_ensemble" in data.values:
        fig = Figure(figsize=(11, 4.8))
        axes = fig.subplots(1, 2)
        _scatter(data, axes[0], "force_delta", "eps_nc")
        axes[0].set_title("single model: U_Δ vs ε_nc")
        _scatter(data, axes[1], "ensemble_std", "eps_ensemble")
        axes[1].set_title("ensemble: σ_ens vs ε_ens (ensemble-mean error)")
        paths.append(plots.save_figure(axes[0], out / FIGURES["ensemble"]))

    values = dict(data.values)
    if calibration is not None:
        values["calibrated_force_delta"] = calibration.map.predict(values["force_delta"])
    fig = Figure(figsize=(11, 4.8))
    axes = fig.subplots(1, 2)
    binned, curves, areas = {}, {}, {}
    for name, (sigma_key, _, component_key) in SIGMAS.items():
        c = report["all"]["calibration"].get(name)
        if not c or "undefined" in c:
            continue
        b = c["rmse_vs_rmv"]
        binned[name] = BinnedCalibration(*(np.asarray(b[k]) for k in ("rmv", "rmse", "counts", "sigma_low", "sigma_high")))
        if component_key in data.components:
            curves[name] = calibration_curve(values[sigma_key][data.component_structure], data.components[component_key])
            if "estimate" in c.get("miscalibration_area", {}):
                areas[name] = c["miscalibration_area"]["estimate"]
    if binned:  # nothing to draw when every calibration is undefined (too few structures)
        plots.plot_rmse_vs_rmv(binned, ax=axes[0])
        axes[0].set_title("RMSE vs RMV, all structures (equal-count bins)")
        if curves:
            plots.plot_calibration_curve(curves, ax=axes[1], areas=areas)
            axes[1].set_title("force components against σ (all structures)")
        paths.append(plots.save_figure(axes[0], out / FIGURES["calibration"]))

    if calibration is not None:
        paths.append(coverage_figure(report, out / FIGURES["coverage"]))
    return paths


def coverage_figure(report: dict[str, Any], path: Path) -> Path:
    """Empirical against requested coverage of the conformal bounds per input file, one panel per normaliser.

    Drawn from the report alone (bench.json), so a saved report can be redrawn without scoring again.
    """
    coverage = report["calibration"]["coverage"]
    fig = Figure(figsize=(11, 5.6))
    axes = fig.subplots(1, 2)
    for ax, norm in zip(axes, coverage[next(iter(coverage))]["coverage"]):
        series = {
            Path(name).name + (" (in-sample)" if f["in_sample"] else ""): [Coverage(**c) for c in f["coverage"][norm]]
            for name, f in coverage.items()
        }
        plots.plot_coverage(series, ax=ax)
        ax.set_title(f"conformal ε_nc ≤ q̂·{norm} (fitted on {Path(report['calibration']['source']).name})", fontsize=10)
    return plots.save_figure(axes[0], path)


def markdown(report: dict[str, Any], figures: list[Path]) -> str:
    """bench.md: the command, the inputs, every table, the figures."""
    s = report["settings"]
    flag = (
        f"error above {s['flag_threshold']:g} eV/Å"
        if s["flag_threshold"] is not None
        else f"error above the system's own {100 * s['flag_quantile']:g}th percentile"
    )
    parts = [
        "# atomuq bench report",
        "",
        f"Command: `{report.get('command', 'atomuq bench')}`",
        "",
        f"Model {report.get('model')}; ensemble {', '.join(report.get('ensemble') or []) or 'none'}; "
        f"{report['n_structures']} structures grouped by info key `{report.get('group_key')}` (else the file name). "
        f"Errors ε_nc (direct), ε_c (conservative), ε_ens (ensemble mean) are RMS over the 3N force components "
        f"against the reference, eV/Å. Brackets: {100 * 0.95:g} % percentile bootstrap over structures "
        f"({s['n_boot']} resamples; at most 200 for the miscalibration area, whole structures resampled).",
        "",
        "## Rank correlation (Spearman r_s)",
        "",
        *correlation_table(report),
        "",
        "Model-averaged over systems:",
        "",
        *averaged_lines(report),
        "",
        f"## Flagging large errors (ROC-AUC; positive: {flag})",
        "",
        *flag_table(report),
        "",
        "## Calibration of error-unit σ (ENCE 0 and ZMS 1 when calibrated; area 0 best, 0.5 worst)",
        "",
        *calibration_table(report),
        "",
    ]
    if "calibration" in report:
        cal = report["calibration"]
        parts += [
            f"## Conformal error bars from U_Δ (fitted on {cal['source']})",
            "",
            f"Isotonic map g: U_Δ → RMS ε_nc fitted on {cal['n_map']} structures, split-conformal multiplier q̂ on "
            f"{cal['n_conformal']} others, coverage first on the {cal['n_held_back']} held back (random thirds, seed "
            f"{s['seed']}); bound ε_nc ≤ q̂·g(U_Δ) or q̂·U_Δ. "
            "Coverage: fraction of structures with ε_nc ≤ bound ± binomial standard error; in brackets the mean bound.",
            "",
            *coverage_table(report),
            "",
        ]
    parts += ["## Figures", ""] + [f"![{p.stem}](./{p.name})" for p in figures] + [""]
    return "\n".join(parts)


def _write_files(data: BenchData, report: dict[str, Any], calibration: Calibration | None, out: Path) -> list[Path]:
    """Every file of the report, written into folder out."""
    figures = write_figures(data, report, calibration, out)
    paths = [*figures]
    if calibration is not None:
        paths.append(calibration.map.save(out / CALIBRATION_FILES[0]))
        paths.append(calibration.conformal["g(U_Δ)"].save(out / CALIBRATION_FILES[1]))
    for name, text in (("bench.json", json.dumps(report, indent=1) + "\n"), ("bench.md", markdown(report, figures))):
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        paths.append(out / name)
    return paths


def write_report(data: BenchData, report: dict[str, Any], calibration: Calibration | None, out: str | Path) -> list[Path]:
    """Write bench.json, bench.md and the figures into directory out (created); the calibration too when given.

    Everything is written into a temporary folder first and moved into out only when complete (one rename per
    file), so a failure leaves no half-written report; files of an earlier report that this one lacks are removed.
    """
    out = Path(out)
    staging_parent = out if out.is_dir() else out.parent
    staging_parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=staging_parent, prefix=f".{out.name or 'bench'}.partial-"))
    try:
        written = _write_files(data, report, calibration, staging)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for path in written:
            os.replace(path, out / path.name)
            paths.append(out / path.name)
        for stale in set(REPORT_FILES) - {p.name for p in paths}:
            (out / stale).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths
