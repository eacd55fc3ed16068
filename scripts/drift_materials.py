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

With --starts K each system runs K independent starts (start k: its own NVT equilibration from the relaxed cell
with velocity seed --seed + k; files SYSTEM_sK.* for k > 0, start 0 keeps the one-start names) and the intervals
resample whole systems (a cluster bootstrap: the starts of one system are not independent); --floor-starts M runs
the conservative NVE (the floor) for the first M starts of each system only.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/drift_materials.py --systems al cu ...   # run
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/drift_materials.py --report              # report
    # the 10 ps study (issue 14 item 3): 6 systems x 4 starts, the floor from one start per system
    ... scripts/drift_materials.py --nve-ps 10 --starts 4 --floor-starts 1 --label-frames 5 \\
        --systems al cu kmgf3 mg quartz si --eq-ps 0.5 --out out/drift_nve10 --name drift_nve10
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_name(system: str, start: int) -> str:
    """The file and status prefix of one start of a system (start 0 keeps the one-start names)."""
    return system if start == 0 else f"{system}_s{start}"


def run_system(system: str, model, out: Path, eq_ps: float, nve_ps: float, label_frames: int, seed: int,
               start: int = 0, floor: bool = True) -> None:
    """Equilibrate one start, run its NVE runs (conservative only if floor) and label frames of the direct one;
    resumable."""
    name = run_name(system, start)
    status_path = out / f"{name}.status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    relaxed = relaxed_start(system, model, out)
    md(relaxed, model, out / f"{name}.nvt_conservative.extxyz", f"{name}/nvt_conservative", status, status_path,
       ensemble="nvt", forces="conservative", steps=int(round(eq_ps * 1000 / TIMESTEP)), temperature_K=temperature(system),
       tdamp_fs=TDAMP, seed=seed + start)
    frame = last_frame(out / f"{name}.nvt_conservative.extxyz")
    runs = [("nve_direct", "direct")] + ([("nve_conservative", "conservative")] if floor else [])
    for run, forces in runs:
        md(frame, model, out / f"{name}.{run}.extxyz", f"{name}/{run}", status, status_path, ensemble="nve",
           forces=forces, steps=int(round(nve_ps * 1000 / TIMESTEP)), seed=seed + start)
    if label_frames and "labelled" not in status:
        status["labelled"] = errors_along(model, out / f"{name}.nve_direct.extxyz", label_frames, "gfn1-xtb",
                                          dict(TBLITE_OPTIONS))
        status_path.write_text(json.dumps(status, indent=1))


def rows_of(out: Path, starts: int) -> list[dict]:
    """One row per start whose direct NVE run exists (drift_conservative None where no floor run was made)."""
    rows = []
    for system in SYSTEMS:
        for start in range(starts):
            name = run_name(system, start)
            direct, conservative = out / f"{name}.nve_direct.extxyz", out / f"{name}.nve_conservative.extxyz"
            if not direct.exists() or not (out / f"{name}.status.json").exists():
                continue
            status = json.loads((out / f"{name}.status.json").read_text())
            if starts == 1 and not conservative.exists():
                continue  # the one-start study reports systems with both runs only
            d = analyse(direct).as_dict()
            c = analyse(conservative).as_dict() if conservative.exists() else None
            labelled = status.get("labelled", {})
            rows.append({"system": system, "start": start, "held_out": system in HELD_OUT, "T_K": temperature(system),
                         "drift_direct": d["drift_meV_atom_ps"],
                         "drift_conservative": c["drift_meV_atom_ps"] if c else None,
                         "ps_direct": d.get("duration_ps"), "force_delta_mean": d["force_delta_mean"],
                         "eps_nc_mean": labelled.get("eps_nc_mean"), "eps_c_mean": labelled.get("eps_c_mean"),
                         "labelled_frames": labelled.get("labelled_frames", 0),
                         "error": status.get(f"{name}/nve_direct", {}).get("error"),
                         "wall_s": sum(v.get("wall_s", 0.0) for k, v in status.items()
                                       if k.startswith(name + "/"))})
    return rows


def correlation(x: np.ndarray, y: np.ndarray, groups: list[str] | None = None) -> dict:
    """r_s with a 95 % interval from resampling systems (whole systems when groups names each row's system)."""
    ci = bootstrap_ci(spearman, x, y, n_boot=2000, seed=0, groups=groups)
    return {"r_s": ci.estimate, "low": ci.low, "high": ci.high, "n": int(len(x)),
            "systems": len(set(groups)) if groups is not None else int(len(x))}


def correlations(rows: list[dict], grouped: bool = False) -> dict:
    """r_s of |drift| of the direct runs with mean U_Δ, ε_nc and ε_c, each over the rows that have it (at least 4);
    grouped: intervals resample whole systems."""
    stats = {}
    for key in ("force_delta_mean", "eps_nc_mean", "eps_c_mean"):
        have = [r for r in rows if r[key] is not None]
        if len(have) >= 4 and (not grouped or len({r["system"] for r in have}) >= 2):
            stats[key] = correlation(np.array([r[key] for r in have]), np.abs([r["drift_direct"] for r in have]),
                                     [r["system"] for r in have] if grouped else None)
    return stats


def report(out: Path, docs: Path, model_name: str, eq_ps: float, nve_ps: float, starts: int = 1,
           name: str = "drift_materials", command: str = "") -> dict:
    if starts > 1:
        return report_starts(out, docs, model_name, eq_ps, nve_ps, starts, name, command)
    rows = rows_of(out, 1)
    stats = correlations(rows)
    low = [r for r in rows if abs(r["drift_direct"]) < LOW_DRIFT]  # the runs that did not run away
    stats_low = correlations(low)
    result = {"model": model_name, "eq_ps": eq_ps, "nve_ps": nve_ps, "rows": rows, "spearman_with_abs_drift": stats,
              "low_drift_limit": LOW_DRIFT, "spearman_with_abs_drift_low": stats_low}
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "drift_materials.json").write_text(json.dumps(result, indent=1))
    figure(rows, docs / "drift_materials.png", stats)
    lines = [f"# NVE drift against the Force Delta on the materials set ({model_name})", "",
             f"Rebuilt by `OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/drift_materials.py --eq-ps {eq_ps:g} "
             f"--nve-ps {nve_ps:g}` (protocol in the script's docstring): per system one start, NVT with conservative "
             f"forces for {eq_ps:g} ps, then NVE at {TIMESTEP:g} fs for {nve_ps:g} ps with direct and with conservative "
             "forces from the same frame (ASE integrators in float64, the model in float32). ε_nc and ε_c: GFN1-xTB "
             "on frames spread over the direct run.", "",
             "| r_s with \\|drift\\| of the direct runs | ours (95 % interval over systems) | systems | paper (Fig. 6) |",
             "|---|---|---:|---:|"]
    for key, s in stats.items():
        lines.append(f"| {NAMES[key]} | {s['r_s']:.2f} [{s['low']:.2f}, {s['high']:.2f}] | {s['n']} | {PAPER[key]} |")
    for key, s in stats_low.items():
        lines.append(f"| {NAMES[key]}, runs with \\|drift\\| < {LOW_DRIFT:g} | {s['r_s']:.2f} [{s['low']:.2f}, "
                     f"{s['high']:.2f}] | {s['n']} | {PAPER[key]} |")
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


NAMES = {"force_delta_mean": "mean U_Δ", "eps_nc_mean": "mean ε_nc", "eps_c_mean": "mean ε_c"}
PAPER = {"force_delta_mean": "0.91", "eps_nc_mean": "0.24", "eps_c_mean": "-"}


def report_starts(out: Path, docs: Path, model_name: str, eq_ps: float, nve_ps: float, starts: int, name: str,
                  command: str) -> dict:
    """The several-starts study: every direct run a point, intervals resampling whole systems."""
    rows = rows_of(out, starts)
    stats = correlations(rows, grouped=True)
    low = [r for r in rows if abs(r["drift_direct"]) < LOW_DRIFT]
    stats_low = correlations(low, grouped=True)
    floors = [abs(r["drift_conservative"]) for r in rows if r["drift_conservative"] is not None]
    result = {"model": model_name, "eq_ps": eq_ps, "nve_ps": nve_ps, "starts": starts, "rows": rows,
              "spearman_with_abs_drift": stats, "low_drift_limit": LOW_DRIFT, "spearman_with_abs_drift_low": stats_low,
              "conservative_floor_max_abs": max(floors) if floors else None}
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"{name}.json").write_text(json.dumps(result, indent=1))
    figure_starts(rows, docs / f"{name}.png", stats)
    systems = sorted({r["system"] for r in rows})
    lasted = sum(1 for r in rows if r["ps_direct"] is not None and r["ps_direct"] >= nve_ps - 1e-6 and not r["error"])
    lines = [f"# NVE drift against the Force Delta over {nve_ps:g} ps, {starts} starts per system ({model_name})", "",
             f"Rebuilt by `OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/drift_materials.py {command}` "
             "(protocol in the script's docstring; two processes may split --systems, then the same command with "
             f"--report). Per start: NVT with conservative forces for {eq_ps:g} ps from the model-relaxed cell "
             f"(velocity seed = start), then NVE at {TIMESTEP:g} fs for {nve_ps:g} ps with direct forces; the "
             "conservative NVE from the same frame (the integrator's floor) for the starts marked. ASE integrators "
             "in float64, the model in float32. ε_nc and ε_c: GFN1-xTB on frames spread over each direct run. "
             "Intervals: 95 %, resampling whole systems (the starts of one system share its model errors).", "",
             f"{len(rows)} direct runs on {len(systems)} systems ({', '.join(systems)}); {lasted} ran the whole "
             f"{nve_ps:g} ps; {len(low)} drift by less than {LOW_DRIFT:g} meV/atom/ps.", "",
             "| r_s with \\|drift\\| of the direct runs | ours (95 % interval) | runs | systems | paper (Fig. 6) |",
             "|---|---|---:|---:|---:|"]
    for block, label in ((stats, ""), (stats_low, f", runs with \\|drift\\| < {LOW_DRIFT:g}")):
        for key, st in block.items():
            lines.append(f"| {NAMES[key]}{label} | {st['r_s']:.2f} [{st['low']:.2f}, {st['high']:.2f}] | {st['n']} | "
                         f"{st['systems']} | {PAPER[key]} |")
    if floors:
        lines += ["", f"Conservative floor (same starts): largest \\|drift\\| {max(floors):.3g} meV/atom/ps over "
                  f"{len(floors)} runs; the smallest direct-run \\|drift\\| is "
                  f"{min(abs(r['drift_direct']) for r in rows):.3g}."]
    lines += ["", f"![drift against U_Δ and ε_nc]({name}.png)", "",
              "| system | start | drift direct (meV/atom/ps) | lasted (ps) | drift conservative | mean U_Δ (eV/Å) "
              "| mean ε_nc | mean ε_c | labelled frames | wall (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = ("-" if r[k] is None else f"{r[k]:.3f}" for k in ("force_delta_mean", "eps_nc_mean", "eps_c_mean"))
        floor = "-" if r["drift_conservative"] is None else f"{r['drift_conservative']:.3g}"
        lasted_ps = "-" if r["ps_direct"] is None else f"{r['ps_direct']:.2f}"
        label = r["system"] + (" (held out)" if r["held_out"] else "") + (" (blew up)" if r["error"] else "")
        lines.append(f"| {label} | {r['start']} | {r['drift_direct']:.4g} | {lasted_ps} | {floor} | "
                     + " | ".join(f) + f" | {r['labelled_frames']} | {r['wall_s']:.0f} |")
    lines.append("")
    (docs / f"{name}.md").write_text("\n".join(lines))
    return result


def figure_starts(rows: list[dict], path: Path, stats: dict) -> None:
    """|drift| of every direct run against its mean U_Δ and mean ε_nc, one colour per system, floors beside."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    systems = sorted({r["system"] for r in rows})
    colours = dict(zip(systems, plt.cm.tab10.colors))
    for ax, key in zip(axes, ("force_delta_mean", "eps_nc_mean")):
        for system in systems:
            mine = [r for r in rows if r["system"] == system and r[key] is not None]
            ax.scatter([r[key] for r in mine], [abs(r["drift_direct"]) for r in mine], color=colours[system],
                       label=system, s=28)
            floor = [r for r in mine if r["drift_conservative"] is not None]
            ax.scatter([r[key] for r in floor], [max(abs(r["drift_conservative"]), 1e-5) for r in floor],
                       color=colours[system], marker="x", s=28)
        st = stats.get(key)
        title = f"{NAMES[key]} along the run"
        if st:
            title += f": r_s = {st['r_s']:.2f} [{st['low']:.2f}, {st['high']:.2f}]"
        ax.set(xscale="log", yscale="log", xlabel=f"{NAMES[key]} (eV/Å)", title=title)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("|drift| (meV/atom/ps); x: conservative NVE from the same start")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("NVE drift of direct-force runs (dots) and the conservative floor (crosses)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    parser.add_argument("--starts", type=int, default=1, help="independent starts per system")
    parser.add_argument("--floor-starts", type=int, default=None,
                        help="conservative NVE (the floor) for the first this many starts of each system (default all)")
    parser.add_argument("--name", default="drift_materials", help="stem of the report files in --docs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="only write the report from finished runs")
    args = parser.parse_args()
    if args.starts < 1:
        parser.error("--starts must be at least 1")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    floor = args.starts if args.floor_starts is None else args.floor_starts
    if not args.report:
        model = resolve_model(args.model)
        # every direct run first, the floors after them (a study cut short still has all its points)
        for with_floor in (False, True):
            for start in range(args.starts):
                if with_floor and start >= floor:
                    continue
                for system in args.systems:
                    t0 = time.perf_counter()
                    run_system(system, model, args.out, args.eq_ps, args.nve_ps, args.label_frames, args.seed, start,
                               floor=with_floor)
                    print(time.strftime("%H:%M:%S"), f"{run_name(system, start)}{' floor' if with_floor else ''} done "
                          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    command = (f"--nve-ps {args.nve_ps:g} --eq-ps {args.eq_ps:g} --starts {args.starts} --floor-starts {floor} "
               f"--label-frames {args.label_frames} --systems {' '.join(args.systems)} "
               f"--out {os.path.relpath(args.out, ROOT)} --name {args.name}")
    result = report(args.out, args.docs, args.model, args.eq_ps, args.nve_ps, args.starts, args.name, command)
    print(json.dumps(result["spearman_with_abs_drift"], indent=1))


if __name__ == "__main__":
    main()
