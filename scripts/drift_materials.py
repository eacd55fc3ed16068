"""NVE drift against the Force Delta on every system of the materials set (issue 14, part 3; paper section 4.3, Fig. 6).

Per system, from its model-relaxed GFN1-xTB supercell (scripts/md_materials.py's relaxed_start, cached in --out):
NVT with conservative forces (Nosé–Hoover chain, 10 fs) for --eq-ps at 300 K (ice 200 K), then NVE velocity Verlet
at 0.5 fs for --nve-ps with direct forces and, from the same frame, with conservative forces (the integrator's
floor). Along each direct run U_Δ is logged every 20 steps and --label-frames frames spread over it are labelled
with GFN1-xTB at the materials set's options, for mean ε_nc and ε_c. Drift: slope of E_tot per atom
(atomuq.workflows.md.drift), meV/atom/ps. Reported: per system, and r_s over systems of |drift| with mean U_Δ,
mean ε_nc and mean ε_c, with 95 % intervals from resampling systems (atomuq.uq.evaluate.bootstrap_ci); the paper
finds 0.91 for U_Δ and 0.24 for ε_nc. Resumable (atomuq md's files); two processes can split --systems (each
system keeps its own status file).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/drift_materials.py --systems al cu ...   # run
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/drift_materials.py --report              # report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from atomuq.models.registry import resolve_model  # noqa: E402
from atomuq.uq.evaluate.bootstrap import bootstrap_ci  # noqa: E402
from atomuq.uq.evaluate.ranking import spearman  # noqa: E402
from atomuq.workflows.md.drift import analyse  # noqa: E402
from atomuq.workflows.md.protocol import errors_along  # noqa: E402
from build_materials_set import TBLITE_OPTIONS  # noqa: E402
from md_materials import SYSTEMS as MD_TEMPERATURES  # noqa: E402
from md_materials import TDAMP, TIMESTEP, last_frame, md, relaxed_start  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ["al", "cu", "cu111_co", "ice", "kmgf3", "lgps", "lif", "mg", "mg17al12", "mgo", "mof5", "nacl", "quartz",
           "si", "tio2_rutile", "water"]
HELD_OUT = {"mgo"}
LOW_DRIFT = 100.0  # meV/atom/ps: direct runs below it did not run away


def temperature(system: str) -> float:
    """The NVT temperature of a system (K): md_materials' for ice and water, else 300 K."""
    return MD_TEMPERATURES.get(system, 300.0)


def run_system(system: str, model, out: Path, eq_ps: float, nve_ps: float, label_frames: int, seed: int) -> None:
    """Equilibrate, run both NVE runs and label frames of the direct one; resumable."""
    status_path = out / f"{system}.status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    start = relaxed_start(system, model, out)
    md(start, model, out / f"{system}.nvt_conservative.extxyz", f"{system}/nvt_conservative", status, status_path,
       ensemble="nvt", forces="conservative", steps=int(round(eq_ps * 1000 / TIMESTEP)), temperature_K=temperature(system),
       tdamp_fs=TDAMP, seed=seed)
    frame = last_frame(out / f"{system}.nvt_conservative.extxyz")
    for run, forces in (("nve_direct", "direct"), ("nve_conservative", "conservative")):
        md(frame, model, out / f"{system}.{run}.extxyz", f"{system}/{run}", status, status_path, ensemble="nve",
           forces=forces, steps=int(round(nve_ps * 1000 / TIMESTEP)), seed=seed)
    if label_frames and "labelled" not in status:
        status["labelled"] = errors_along(model, out / f"{system}.nve_direct.extxyz", label_frames, "gfn1-xtb",
                                          dict(TBLITE_OPTIONS))
        status_path.write_text(json.dumps(status, indent=1))


def rows_of(out: Path) -> list[dict]:
    """One row per system whose NVE runs exist."""
    rows = []
    for system in SYSTEMS:
        direct, conservative = out / f"{system}.nve_direct.extxyz", out / f"{system}.nve_conservative.extxyz"
        if not (direct.exists() and conservative.exists()):
            continue
        status = json.loads((out / f"{system}.status.json").read_text())
        d, c = analyse(direct).as_dict(), analyse(conservative).as_dict()
        labelled = status.get("labelled", {})
        rows.append({"system": system, "held_out": system in HELD_OUT, "T_K": temperature(system),
                     "drift_direct": d["drift_meV_atom_ps"], "drift_conservative": c["drift_meV_atom_ps"],
                     "ps_direct": d.get("duration_ps"), "force_delta_mean": d["force_delta_mean"],
                     "eps_nc_mean": labelled.get("eps_nc_mean"), "eps_c_mean": labelled.get("eps_c_mean"),
                     "labelled_frames": labelled.get("labelled_frames", 0),
                     "error": status.get(f"{system}/nve_direct", {}).get("error"),
                     "wall_s": sum(v.get("wall_s", 0.0) for k, v in status.items() if k.startswith(system + "/"))})
    return rows


def correlation(x: np.ndarray, y: np.ndarray) -> dict:
    """r_s with a 95 % interval from resampling systems."""
    ci = bootstrap_ci(spearman, x, y, n_boot=2000, seed=0)
    return {"r_s": ci.estimate, "low": ci.low, "high": ci.high, "n": int(len(x))}


def correlations(rows: list[dict]) -> dict:
    """r_s of |drift| of the direct runs with mean U_Δ, ε_nc and ε_c, each over the rows that have it (at least 4)."""
    stats = {}
    for key in ("force_delta_mean", "eps_nc_mean", "eps_c_mean"):
        have = [r for r in rows if r[key] is not None]
        if len(have) >= 4:
            stats[key] = correlation(np.array([r[key] for r in have]), np.abs([r["drift_direct"] for r in have]))
    return stats


def report(out: Path, docs: Path, model_name: str, eq_ps: float, nve_ps: float) -> dict:
    rows = rows_of(out)
    stats = correlations(rows)
    low = [r for r in rows if abs(r["drift_direct"]) < LOW_DRIFT]  # the runs that did not run away
    stats_low = correlations(low)
    result = {"model": model_name, "eq_ps": eq_ps, "nve_ps": nve_ps, "rows": rows, "spearman_with_abs_drift": stats,
              "low_drift_limit": LOW_DRIFT, "spearman_with_abs_drift_low": stats_low}
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "drift_materials.json").write_text(json.dumps(result, indent=1))
    figure(rows, docs / "drift_materials.png", stats)
    names = {"force_delta_mean": "mean U_Δ", "eps_nc_mean": "mean ε_nc", "eps_c_mean": "mean ε_c"}
    paper = {"force_delta_mean": "0.91", "eps_nc_mean": "0.24", "eps_c_mean": "-"}
    lines = [f"# NVE drift against the Force Delta on the materials set ({model_name})", "",
             f"Rebuilt by `OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/drift_materials.py --eq-ps {eq_ps:g} "
             f"--nve-ps {nve_ps:g}` (protocol in the script's docstring): per system one start, NVT with conservative "
             f"forces for {eq_ps:g} ps, then NVE at {TIMESTEP:g} fs for {nve_ps:g} ps with direct and with conservative "
             "forces from the same frame (ASE integrators in float64, the model in float32). ε_nc and ε_c: GFN1-xTB "
             "on frames spread over the direct run.", "",
             "| r_s with \\|drift\\| of the direct runs | ours (95 % interval over systems) | systems | paper (Fig. 6) |",
             "|---|---|---:|---:|"]
    for key, s in stats.items():
        lines.append(f"| {names[key]} | {s['r_s']:.2f} [{s['low']:.2f}, {s['high']:.2f}] | {s['n']} | {paper[key]} |")
    for key, s in stats_low.items():
        lines.append(f"| {names[key]}, runs with \\|drift\\| < {LOW_DRIFT:g} | {s['r_s']:.2f} [{s['low']:.2f}, "
                     f"{s['high']:.2f}] | {s['n']} | {paper[key]} |")
    runaway = len(rows) - len(low)
    no_floor = [r["system"] for r in rows if abs(r["drift_conservative"]) >= 1.0]
    lines += ["", f"{runaway} of {len(rows)} direct runs drift by {LOW_DRIFT:g} meV/atom/ps or more (the fragile "
              "regime); the paper's runs are mostly in the low-error regime, which the second block of rows restricts "
              "to. Conservative runs drifting by 1 meV/atom/ps or more (no floor: the model's own energy surface "
              f"fails there): {', '.join(no_floor) or 'none'}."]
    lines += ["", "| system | T (K) | drift direct (meV/atom/ps) | drift conservative | mean U_Δ (eV/Å) | mean ε_nc "
              "| mean ε_c | labelled frames | wall (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = ("-" if r[k] is None else f"{r[k]:.3f}" for k in ("force_delta_mean", "eps_nc_mean", "eps_c_mean"))
        name = r["system"] + (" (held out)" if r["held_out"] else "") + (" (blew up)" if r["error"] else "")
        lines.append(f"| {name} | {r['T_K']:g} | {r['drift_direct']:.4g} | {r['drift_conservative']:.3g} | "
                     + " | ".join(f) + f" | {r['labelled_frames']} | {r['wall_s']:.0f} |")
    lines += ["", "![drift against U_Δ](drift_materials.png)", ""]
    (docs / "drift_materials.md").write_text("\n".join(lines))
    return result


def figure(rows: list[dict], path: Path, stats: dict) -> None:
    """|drift| of every direct run against its mean U_Δ, the conservative floor beside it."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    fd = np.array([r["force_delta_mean"] for r in rows])
    ax.scatter(fd, np.abs([r["drift_direct"] for r in rows]), color="tab:red", label="direct forces")
    ax.scatter(fd, np.abs([r["drift_conservative"] for r in rows]), color="tab:blue", marker="x",
               label="conservative forces, same start (floor)")
    for r, x in zip(rows, fd):
        ax.annotate(r["system"], (x, abs(r["drift_direct"])), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="mean U_Δ along the direct run (eV/Å)",
           ylabel="|drift| (meV/atom/ps)")
    s = stats.get("force_delta_mean")
    title = "NVE drift vs Force Delta, materials set"
    if s:
        title += f"\nr_s(mean U_Δ, |drift|) = {s['r_s']:.2f} [{s['low']:.2f}, {s['high']:.2f}], {s['n']} systems"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="materials", help="model spec (a catalog name or a checkpoint)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "drift_materials")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--eq-ps", type=float, default=1.0, help="NVT equilibration with conservative forces (ps)")
    parser.add_argument("--nve-ps", type=float, default=3.0, help="each NVE run (ps)")
    parser.add_argument("--label-frames", type=int, default=4, help="GFN1-xTB frames along each direct run")
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="only write the report from finished runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        model = resolve_model(args.model)
        for system in args.systems:
            t0 = time.perf_counter()
            run_system(system, model, args.out, args.eq_ps, args.nve_ps, args.label_frames, args.seed)
            print(time.strftime("%H:%M:%S"), f"{system} done in {time.perf_counter() - t0:.0f} s", flush=True)
    result = report(args.out, args.docs, args.model, args.eq_ps, args.nve_ps)
    print(json.dumps(result["spearman_with_abs_drift"], indent=1))


if __name__ == "__main__":
    main()
