"""Direct-force MD of ice and the liquid water box with a materials model (issues 13 and 14, paper A.1.4 and A.2.1).

Per system, from the GFN1-xTB relaxed supercell of the materials set (data/materials/shards/relax/SYSTEM.extxyz.gz):

1. relax: BFGS to fmax 0.05 eV/Å on the model's direct forces (conservative where that does not converge), the
   cell kept (the paper relaxes with the model; the cell is GFN1-xTB's).
2. nvt_direct and nvt_conservative: Nosé–Hoover chain (tdamp 10 fs, the paper's), 0.5 fs, --ps ps, at 200 K for
   ice and 300 K for water (the paper's temperatures), same seed and velocities; monitors log only: the `bonds`
   monitor (covalent bonds broken beyond 1.5x or formed below 1.2x the covalent radius sum, atomuq.core.bonds),
   temperature and U_Δ every 20 steps. Completed: no bond changed (readings and the last frame) and the
   temperature within 2x the target throughout. Temperature mean and standard deviation over the frames after
   the first ps (paper A.2.1: 19.9 K direct against 10.6 K conservative).
3. nve_direct and nve_conservative: velocity Verlet, 0.5 fs, --nve-ps ps, both from the last frame of
   nvt_conservative (an equilibrium frame of the energy the conservative run conserves); drift: the slope of a
   least-squares line through E_tot per atom (atomuq.workflows.md.drift), meV/atom/ps.
4. with --cap K (paper Fig. 1, its third level): nve_conservative_capK, the same conservative NVE with the same
   weights but each atom's edges cut to its K nearest neighbours at inference (NativeConfig.max_neighbors, as
   orb-v3's "-20" models are trained): an energy that jumps whenever the K-th neighbour changes, so its forces
   are a gradient only piecewise and the integrator no longer conserves it.

Every run resumes (atomuq md's crash-safe files in --out); the report is DOCS/md_materials.md with
DOCS/md_materials_SYSTEM_nve.png (E_tot, U_Δ and temperature of the NVE runs) and the numbers in
DOCS/md_materials.json.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/md_materials.py --model runs/materials/best.pt
    ... --report                                         # the report from the finished runs
    ... --ps 0.05 --nve-ps 0.05 --out /tmp/mdm --docs /tmp/mdm   # a smoke test in minutes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from ase.io import read

from atomuq.core.bonds import bond_changes, bond_graph
from atomuq.core.errors import AtomuqError
from atomuq.core.io import write_structures
from atomuq.models.registry import resolve_model
from atomuq.workflows.md.drift import analyse, load_md_frames, plot_drift, series
from atomuq.workflows.md.driver import MDRun
from atomuq.workflows.md.monitors import drift_slope, parse_monitor
from atomuq.workflows.md.protocol import relax_with_fallback
from atomuq.workflows.md.settings import MDSettings

ROOT = Path(__file__).resolve().parents[1]
#: system -> temperature (K): the paper equilibrates at 300 K, ice at 200 K
SYSTEMS = {"ice": 200.0, "water": 300.0}
TIMESTEP = 0.5
TDAMP = 10.0
EARLY_PS = 0.25  # the NVE drift over the first EARLY_PS too, before a run that runs away leaves the start
EVERY = 20
HEAT_FACTOR = 2.0
EQUILIBRATION_PS = 1.0  # temperature statistics over the frames after this


def say(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def watch() -> list:
    """Monitors that log only (the study lets a run drift; atomuq md's safe defaults would stop it)."""
    return [parse_monitor(f"{name},every={EVERY}") for name in ("bonds", "temperature", "force_delta")]


def relaxed_start(system: str, model, out: Path):
    """The model-relaxed GFN1-xTB supercell of `system`, cached in OUT/SYSTEM.relaxed.extxyz."""
    path = out / f"{system}.relaxed.extxyz"
    if not path.exists():
        atoms = read(ROOT / "data" / "materials" / "shards" / "relax" / f"{system}.extxyz.gz")
        atoms.calc = None
        done, forces = relax_with_fallback(atoms, model, 0.05, where=system, say=say)
        done.info = {"relax_forces": forces}
        write_structures(path, [done])
    atoms = read(path)
    atoms.calc = None
    return atoms


def md(atoms, model, path: Path, key: str, status: dict, status_path: Path, **settings) -> None:
    """One resumable atomuq md run; its wall time and any blow-up go to status[key] (a blown-up run is not rerun)."""
    entry = status.setdefault(key, {"wall_s": 0.0, "error": None})
    if entry["error"]:
        return
    t0 = time.perf_counter()
    try:
        MDRun(atoms, model, MDSettings(**{"timestep_fs": TIMESTEP, "traj_every": 10, **settings}), path, watch(), resume=True,
              say=say, where=f"{key} ({path})").run()
    except AtomuqError as exc:  # the integrator blew up: the frames so far are kept and reported
        say(str(exc))
        entry["error"] = str(exc)
    entry["wall_s"] += time.perf_counter() - t0
    status_path.write_text(json.dumps(status, indent=1))


def capped(model, k: int):
    """A copy of a native model whose neighbour graph keeps each atom's k nearest edges (same weights)."""
    import copy
    import dataclasses

    out = copy.deepcopy(model)
    out.config = dataclasses.replace(model.config, max_neighbors=k)
    return out


def last_frame(path: Path):
    """The last complete frame of a run, momenta kept, without its results and info."""
    frame = load_md_frames(path)[0][-1].copy()  # copy(): positions and momenta, no calculator
    frame.info = {}
    return frame


def verdict(path: Path, start, target_K: float | None) -> dict:
    """Bonds intact, temperature bounds, drift and temperature statistics of one run."""
    frames, _ = load_md_frames(path)
    _, bonds = series(frames, "bonds")
    last = frames[-1]
    broken, formed = bond_changes(last.numbers, last.positions, bond_graph(start), last.cell.array, last.pbc)
    changed = bool((bonds > 0).any()) or broken + formed > 0
    t, temp = series(frames, "temperature")
    reference = target_K if target_K is not None else float(temp[0])
    late = temp[t >= EQUILIBRATION_PS * 1000.0]
    row = analyse(path).as_dict()
    _, etot = series(frames, "etot")
    early = t <= EARLY_PS * 1000.0
    row["drift_first_window_meV_atom_ps"] = drift_slope(t[early], etot[early] / len(start)) if early.sum() > 2 else None
    row.update(bonds_intact=not changed, max_T_over_reference=float(temp.max() / reference),
               completed=(not changed) and bool(temp.max() <= HEAT_FACTOR * reference),
               T_mean_after_1ps=float(late.mean()) if late.size else None,
               T_std_after_1ps=float(late.std()) if late.size else None)
    return row


def report(out: Path, docs: Path, model_name: str, ps: float, nve_ps: float, status: dict) -> dict:
    rows = {}
    for system, temperature in SYSTEMS.items():
        if not (out / f"{system}.relaxed.extxyz").exists():
            continue
        start = read(out / f"{system}.relaxed.extxyz")
        caps = sorted(p.name.split(".")[1] for p in out.glob(f"{system}.nve_conservative_cap*.extxyz"))
        for run in ("nvt_direct", "nvt_conservative", "nve_direct", "nve_conservative", *caps):
            path = out / f"{system}.{run}.extxyz"
            if path.exists():
                target = temperature if run.startswith("nvt") else None
                entry = status.get(f"{system}/{run}", {})
                row = {**verdict(path, start, target), "atoms": len(start), "wall_s": entry.get("wall_s"),
                       "error": entry.get("error")}
                row["completed"] = row["completed"] and not row["error"]
                rows[f"{system}/{run}"] = row
    result = {"model": model_name, "ps": ps, "nve_ps": nve_ps, "timestep_fs": TIMESTEP, "tdamp_fs": TDAMP,
              "systems": SYSTEMS, "runs": rows}
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "md_materials.json").write_text(json.dumps(result, indent=1))
    pictures = figures(out, docs)
    lines = [f"# Direct-force MD of ice and the water box with {model_name}", "",
             f"Rebuilt by `OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/md_materials.py --model "
             f"{model_name} --ps {ps:g} --nve-ps {nve_ps:g}` (the protocol is the script's docstring). NVT: "
             f"Nosé–Hoover chain, {TDAMP:g} fs, ice at 200 K, water at 300 K, {ps:g} ps; NVE: {nve_ps:g} ps from the "
             f"last conservative NVT frame; {TIMESTEP:g} fs throughout. A run completes with no covalent bond changed "
             "(atomuq.core.bonds: broken beyond 1.5x, formed below 1.2x the covalent radius sum; the `bonds` monitor "
             f"every {EVERY} steps and the last frame) and the temperature within {HEAT_FACTOR:g}x the target (NVT) or "
             "the first reading (NVE) throughout.", "",
             "| system | atoms | run | completed | max T / reference | T mean, std after 1 ps (K) | drift (meV/atom/ps) "
             f"| drift over the first {EARLY_PS:g} ps | mean U_Δ (eV/Å) | wall (s) |",
             "|---|---:|---|---|---:|---|---:|---:|---:|---:|"]
    for key, r in rows.items():
        system, run = key.split("/")
        stats = "-" if r["T_std_after_1ps"] is None else f"{r['T_mean_after_1ps']:.1f}, {r['T_std_after_1ps']:.1f}"
        fd = "-" if r["force_delta_mean"] is None else f"{r['force_delta_mean']:.3f}"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        done = "yes" if r["completed"] else ("no (blew up)" if r["error"] else
                                             "no (bonds changed)" if not r["bonds_intact"] else "no (heated)")
        early = "-" if r["drift_first_window_meV_atom_ps"] is None else f"{r['drift_first_window_meV_atom_ps']:.4g}"
        if run.startswith("nvt"):
            early = "-"
        lines.append(f"| {system} | {r['atoms']} | {run.replace('_', ' ')} | {done} | {r['max_T_over_reference']:.2f} "
                     f"| {stats} | {r['drift_meV_atom_ps']:.4g} | {early} | {fd} | {wall} |")
    lines += ["", "NVT drift is of the extended energy's physical part only and is not a conservation check; the NVE "
              "rows are.", "", *[f"![{name}]({name})" for name in pictures], ""]
    path = docs / "md_materials.md"
    keep = "<!-- hand-written notes below are kept by md_materials.py -->"
    notes = path.read_text().split(keep, 1)[1] if path.exists() and keep in path.read_text() else "\n"
    path.write_text("\n".join(lines) + "\n" + keep + notes)
    return result


def figures(out: Path, docs: Path) -> list[str]:
    """Per system with NVE runs: DOCS/md_materials_SYSTEM_nve.png (atomuq.workflows.md.drift.plot_drift: E_tot, U_Δ
    and temperature of the direct and conservative runs); the file names written."""
    names = []
    for system in SYSTEMS:
        caps = sorted(p.name.split(".")[1] for p in out.glob(f"{system}.nve_conservative_cap*.extxyz"))
        runs = [r for r in ("nve_direct", "nve_conservative", *caps) if (out / f"{system}.{r}.extxyz").exists()]
        if runs:
            name = f"md_materials_{system}_nve.png"
            plot_drift([out / f"{system}.{r}.extxyz" for r in runs], docs / name,
                       labels=[r.replace("_", " ") for r in runs], symlog=True, title=f"{system}: NVE")
            names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model spec (a checkpoint or a catalog name)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "md_materials")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--ps", type=float, default=5.0, help="simulated time of each NVT run (ps)")
    parser.add_argument("--nve-ps", type=float, default=5.0, help="simulated time of each NVE run (ps)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cap", type=int, default=None, metavar="K",
                        help="also run NVE on conservative forces with each atom's neighbours cut to its K nearest")
    parser.add_argument("--report", action="store_true", help="only write the report from finished runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    status_path = args.out / "status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    if not args.report:
        model = resolve_model(args.model)
        for system in args.systems:
            temperature = SYSTEMS[system]
            start = relaxed_start(system, model, args.out)
            for run, kw in (("nvt_direct", dict(ensemble="nvt", forces="direct")),
                            ("nvt_conservative", dict(ensemble="nvt", forces="conservative"))):
                md(start, model, args.out / f"{system}.{run}.extxyz", f"{system}/{run}", status, status_path,
                   steps=int(round(args.ps * 1000 / TIMESTEP)), temperature_K=temperature, tdamp_fs=TDAMP,
                   seed=args.seed, **kw)
            equilibrated = last_frame(args.out / f"{system}.nvt_conservative.extxyz")
            for run, forces in (("nve_direct", "direct"), ("nve_conservative", "conservative")):
                md(equilibrated, model, args.out / f"{system}.{run}.extxyz", f"{system}/{run}", status, status_path,
                   ensemble="nve", forces=forces, steps=int(round(args.nve_ps * 1000 / TIMESTEP)), seed=args.seed)
            if args.cap is not None:
                run = f"nve_conservative_cap{args.cap}"
                md(equilibrated, capped(model, args.cap), args.out / f"{system}.{run}.extxyz", f"{system}/{run}",
                   status, status_path, ensemble="nve", forces="conservative",
                   steps=int(round(args.nve_ps * 1000 / TIMESTEP)), seed=args.seed)
    result = report(args.out, args.docs, args.model, args.ps, args.nve_ps, status)
    for key, r in result["runs"].items():
        print(f"{key}: completed {r['completed']}, drift {r['drift_meV_atom_ps']:.4g} meV/atom/ps, "
              f"T std after 1 ps {r['T_std_after_1ps']}")


if __name__ == "__main__":
    main()
