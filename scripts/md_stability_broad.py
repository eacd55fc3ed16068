"""Direct-force MD stability of a molecular model on many molecules at once (issue 13), batched through torch-sim.

Starts: the first 300 K GFN2-xTB MD frame of each chosen molecule of the broad molecular set (test split for
training molecules: their own trajectories, never trained on; heldout split for molecules kept out of training),
exported by `python scripts/build_broad_molecular_set.py --export out/molecular_broad`. Three batched runs, each
one torch-sim batch of every system (atomuq.engines.torchsim.BatchedMD, float64 integration, 0.5 fs):

1. langevin: Langevin 300 K (friction 0.01/fs), direct forces, --ps ps; the `bonds` monitor (covalent bonds broken
   beyond 1.5x or formed below 1.2x the covalent radius sum, atomuq.core.bonds) every 20 steps stops a system at
   the first change; temperature and U_Δ logged. Its last frames (momenta included) are the NVE starts.
2. nve_direct: NVE from the last frames of the systems that completed step 1, direct forces, --ps ps; completing =
   no bond changed and the temperature within 2x of its first reading throughout (monitors log only; a system is
   taken out of the batch only above 5x its first temperature, when it has failed already, to save the compute).
3. nve_conservative: NVE from the same frames with conservative forces (the integrator's drift floor).

Drift: slope of a least-squares line through the total energy per atom (float64) of the frames written every
--traj-every steps, meV/atom/ps. Each run resumes from its checkpoint (out/md_stability_broad/<run>/).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/md_stability_broad.py --model runs/molecular_broad/best.pt
    ... --report             # docs/md_stability_broad.md and figures from the finished runs
    ... --ps 0.05 --out /tmp/mds --docs /tmp/mds   # a smoke test of the whole pipeline in minutes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from ase.io import read, write

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from atomuq.core.bonds import bond_changes, bond_graph  # noqa: E402
from atomuq.engines.torchsim import BatchedMD  # noqa: E402
from atomuq.models.registry import resolve_model  # noqa: E402
from atomuq.workflows.md.monitors import drift_slope, parse_monitor  # noqa: E402
from atomuq.workflows.md.settings import MDSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: the seven molecules of the first training set (molecular-small), then others across F, S, Cl and P
TRAINING = ["aspirin", "paracetamol", "caffeine", "ibuprofen", "ac_ala3_nhme", "dha", "stachyose",
            "benzotrifluoride", "fluoxetine", "trifluoroacetic_acid", "dimethyl_sulfone", "cysteine", "thiophene",
            "chlorobenzene", "chloramphenicol", "triethyl_phosphate", "glycerol_phosphate", "carbamazepine",
            "nifedipine", "theophylline", "procaine"]
#: the three held-out molecules of the first set, then new held-out ones with F, S, Cl, P
HELDOUT = ["3bpa", "naproxen", "nicotine", "celecoxib", "chlorzoxazone", "cyclophosphamide", "diazepam",
           "hydrochlorothiazide"]
TEMPERATURE = 300.0
TIMESTEP = 0.5
HEAT_FACTOR = 2.0  # completing NVE: temperature within this factor of its first reading throughout
GIVE_UP_FACTOR = 5.0  # a system this hot (and already failed) is taken out of the batch
EVERY = 20


def starts(data: Path) -> tuple[list, list[str], list[str]]:
    """(frames, molecule names, roles): the first 300 K MD frame of each chosen molecule."""
    frames, names, roles = [], [], []
    for split, chosen, role in (("test", TRAINING, "training"), ("heldout", HELDOUT, "held-out")):
        path = data / f"{split}_md300.extxyz.gz"
        if not path.is_file():
            raise SystemExit(f"{path}: missing; export the set first: python scripts/build_broad_molecular_set.py "
                             f"--export {data}")
        first: dict[str, object] = {}
        for atoms in read(path, ":"):
            name = atoms.info["molecule"]
            if name in chosen and name not in first:
                first[name] = atoms
        missing = sorted(set(chosen) - set(first))
        if missing:
            raise SystemExit(f"{path}: no 300 K frames of {', '.join(missing)}")
        for name in chosen:
            atoms = first[name].copy()
            atoms.calc = None
            atoms.info = {"molecule": name, "role": role}
            atoms.set_momenta(np.zeros((len(atoms), 3)))
            frames.append(atoms)
            names.append(name)
            roles.append(role)
    return frames, names, roles


def run(name: str, frames: list, model, out: Path, settings: MDSettings, monitors: list[str]) -> dict:
    """One batched run, resumed from its checkpoint; per system: status, reason, step, time (s of wall time)."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    md = BatchedMD(frames, model, settings, [parse_monitor(m) for m in monitors],
                   trajectory=folder / "trajectory.extxyz", checkpoint=folder / "checkpoint.json",
                   checkpoint_every=1000, resume=True, say=lambda m: None, source=name)
    results = md.run()
    wall = time.perf_counter() - start
    write(folder / "last.extxyz", [r.atoms for r in results])
    summary = {"wall_s": wall, "systems": [
        {"status": r.status, "reason": r.reason, "step": r.step, "time_fs": r.time_fs,
         "readings": [{"monitor": x.monitor, "step": x.step, "value": x.value} for x in r.readings]}
        for r in results]}
    (folder / "summary.json").write_text(json.dumps(summary))
    return summary


def nve_starts(out: Path) -> list:
    """The last Langevin frames (momenta included) of the systems whose Langevin run completed with bonds intact."""
    summary = json.loads((out / "langevin" / "summary.json").read_text())
    lasts = read(out / "langevin" / "last.extxyz", ":")
    keep = [i for i, s in enumerate(summary["systems"]) if s["status"] == "completed"]
    frames = []
    for i in keep:
        atoms = lasts[i]
        atoms.info = {"langevin_index": i}
        frames.append(atoms)
    return frames


def per_system_series(folder: Path, n: int) -> list[dict[str, np.ndarray]]:
    """time (fs), total energy per atom (eV), temperature (K) of each system's trajectory frames."""
    series = [{"t": [], "e": [], "T": []} for _ in range(n)]
    for atoms in read(folder / "trajectory.extxyz", ":"):
        i = int(atoms.info["source_index"])
        if "etot" not in atoms.info:
            continue
        series[i]["t"].append(atoms.info["time_fs"])
        series[i]["e"].append(atoms.info["etot"] / len(atoms))
        series[i]["T"].append(atoms.info["temperature"])
    return [{k: np.asarray(v, dtype=np.float64) for k, v in s.items()} for s in series]


def verdicts(summary: dict, series: list[dict], starts_: list, lasts: list) -> list[dict]:
    """Per system: bonds intact (from the monitor readings and the last frame), max T / first T, completed, drift."""
    rows = []
    for s, ts, first, last in zip(summary["systems"], series, starts_, lasts):
        bonds = [x["value"] for x in s["readings"] if x["monitor"] == "bonds" and x["value"] is not None]
        temps = [x["value"] for x in s["readings"] if x["monitor"] == "temperature" and x["value"] is not None]
        changed = max(bonds, default=0.0) > 0 or sum(bond_changes(last.numbers, last.positions, bond_graph(first))) > 0
        heat = max(temps) / temps[0] if temps and temps[0] > 0 else float("nan")
        drift = drift_slope(ts["t"], ts["e"]) if len(ts["t"]) >= 3 else float("nan")
        rows.append({"status": s["status"], "reason": s["reason"], "time_ps": s["time_fs"] / 1000.0,
                     "bonds_intact": not changed, "max_T_over_start": heat,
                     "T_start": temps[0] if temps else float("nan"), "T_max": max(temps, default=float("nan")),
                     "drift_meV_atom_ps": drift})
    return rows


def report(out: Path, docs: Path, names: list[str], roles: list[str], frames: list, model_name: str, ps: float) -> dict:
    """docs/md_stability_broad.md, .json and figures from the three runs."""
    result = {"model": model_name, "ps": ps, "timestep_fs": TIMESTEP, "temperature_K": TEMPERATURE, "runs": {}}
    nve = nve_starts(out)
    index = [int(a.info["langevin_index"]) for a in nve]
    for name in ("langevin", "nve_direct", "nve_conservative"):
        folder = out / name
        summary = json.loads((folder / "summary.json").read_text())
        lasts = read(folder / "last.extxyz", ":")
        firsts = frames if name == "langevin" else nve
        chosen = range(len(names)) if name == "langevin" else index
        rows = verdicts(summary, per_system_series(folder, len(firsts)), firsts, lasts)
        for row, nm, role in zip(rows, [names[i] for i in chosen], [roles[i] for i in chosen]):
            row.update(molecule=nm, role=role)
            full = row["status"] == "completed" and row["bonds_intact"]
            row["completed"] = bool(full and (name == "langevin" or row["max_T_over_start"] <= HEAT_FACTOR))
        result["runs"][name] = {"wall_s": summary["wall_s"], "systems": rows}
    lang, nved, nvec = (result["runs"][k]["systems"] for k in ("langevin", "nve_direct", "nve_conservative"))
    count = lambda rows, role=None: (sum(r["completed"] for r in rows if role in (None, r["role"])),  # noqa: E731
                                     sum(1 for r in rows if role in (None, r["role"])))
    result["summary"] = {
        "langevin_training": count(lang, "training"), "langevin_heldout": count(lang, "held-out"),
        "nve_direct": count(nved), "nve_conservative": count(nvec),
        "conservative_drift_max": float(np.nanmax([abs(r["drift_meV_atom_ps"]) for r in nvec])),
    }
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "md_stability_broad.json").write_text(json.dumps(result, indent=1) + "\n")
    figure(result, docs / "md_stability_broad_drift.png")
    s = result["summary"]
    lines = [
        f"# Direct-force MD stability of {model_name} on {len(names)} molecules", "",
        f"Rebuilt by `OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/md_stability_broad.py --model "
        f"{model_name}{'' if ps == 10 else f' --ps {ps:g}'}` then `--report`. "
        "One torch-sim batch of all molecules per run (float64 integration, "
        f"{TIMESTEP} fs, {ps:g} ps, {TEMPERATURE:g} K), starts from the first 300 K GFN2-xTB MD frame of each molecule "
        "(test trajectories of training molecules, held-out molecules' own). A bond counts as broken beyond 1.5x its "
        "covalent radius sum, as formed below 1.2x (atomuq.core.bonds, the `bonds` monitor every 20 steps, also "
        "checked on the last frame). NVE completes with no bond changed and the temperature within 2x of its first "
        "reading throughout. Drift: least-squares slope of the total energy per atom over the run.", "",
        "| run | completed | wall time |", "|---|---:|---:|",
        f"| Langevin 300 K, direct, training molecules | {s['langevin_training'][0]} / {s['langevin_training'][1]} | "
        f"{result['runs']['langevin']['wall_s'] / 60:.0f} min (both rows) |",
        f"| Langevin 300 K, direct, held-out molecules | {s['langevin_heldout'][0]} / {s['langevin_heldout'][1]} | |",
        f"| NVE, direct forces | {s['nve_direct'][0]} / {s['nve_direct'][1]} | "
        f"{result['runs']['nve_direct']['wall_s'] / 60:.0f} min |",
        f"| NVE, conservative forces | {s['nve_conservative'][0]} / {s['nve_conservative'][1]} | "
        f"{result['runs']['nve_conservative']['wall_s'] / 60:.0f} min |", "",
        f"Largest |drift| of the conservative runs: {s['conservative_drift_max']:.3g} meV/atom/ps.", "",
        "![drift](md_stability_broad_drift.png)", "",
        "| molecule | role | Langevin | NVE direct: ended, max T / start, drift meV/atom/ps | NVE conservative drift |",
        "|---|---|---|---|---:|",
    ]
    by_name = {r["molecule"]: (b, c) for r, b, c in zip(nved, nved, nvec)}
    for a in lang:
        lv = ("completed" if a["completed"] else
              f"failed at {a['time_ps']:.2f} ps ({'bonds' if not a['bonds_intact'] else a['reason']})")
        if a["molecule"] in by_name:
            b, c = by_name[a["molecule"]]
            nv = "completed" if b["completed"] else f"failed ({'bonds changed' if not b['bonds_intact'] else 'heated'})"
            tail = f"{nv}, {b['max_T_over_start']:.2f}, {b['drift_meV_atom_ps']:.3g} | {c['drift_meV_atom_ps']:.3g}"
        else:
            tail = "not started (Langevin failed) | –"
        lines.append(f"| {a['molecule']} | {a['role']} | {lv} | {tail} |")
    (docs / "md_stability_broad.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def figure(result: dict, path: Path) -> None:
    """|drift| per molecule, direct against conservative NVE, log scale."""
    d = result["runs"]["nve_direct"]["systems"]
    c = result["runs"]["nve_conservative"]["systems"]
    x = np.arange(len(d))
    fig, ax = plt.subplots(figsize=(11, 4.2))
    done = np.array([r["completed"] for r in d])
    drift = np.array([abs(r["drift_meV_atom_ps"]) for r in d])
    ax.bar(x[done] - 0.2, drift[done], 0.4, label="direct forces, completed", color="C0")
    ax.bar(x[~done] - 0.2, drift[~done], 0.4, label="direct forces, did not complete", color="C3")
    ax.bar(x + 0.2, [abs(r["drift_meV_atom_ps"]) for r in c], 0.4, label="conservative forces", color="C2")
    ax.set_yscale("log")
    ax.set_xticks(x, [r["molecule"] + ("*" if r["role"] == "held-out" else "") for r in d], rotation=70, fontsize=8)
    ax.set_ylabel("|energy drift| (meV/atom/ps)")
    ax.set_title(f"NVE {result['ps']:g} ps at {result['temperature_K']:g} K: direct vs conservative forces; "
                 "* held out")
    ax.set_ylim(top=ax.get_ylim()[1] * 100)  # room for the legend above the bars
    ax.legend(loc="upper left", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model spec (a checkpoint or a catalog name)")
    parser.add_argument("--data", type=Path, default=ROOT / "out" / "molecular_broad")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "md_stability_broad")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--ps", type=float, default=10.0, help="simulated time of each run (ps)")
    parser.add_argument("--traj-every", type=int, default=100)
    parser.add_argument("--report", action="store_true", help="only write the report from finished runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    frames, names, roles = starts(args.data)
    steps = int(round(args.ps * 1000 / TIMESTEP))
    model = resolve_model(args.model)
    if not args.report:
        common = dict(timestep_fs=TIMESTEP, steps=steps, temperature_K=TEMPERATURE, traj_every=args.traj_every)
        watch = [f"bonds,every={EVERY},max=0.5,action=stop", f"temperature,every={EVERY}",
                 f"force_delta,every={EVERY}"]
        run("langevin", frames, model, args.out, MDSettings(ensemble="langevin", forces="direct", **common), watch)
        equilibrated = nve_starts(args.out)
        nve_watch = [f"bonds,every={EVERY}", f"temperature,every={EVERY},max={GIVE_UP_FACTOR}xstart,action=stop",
                     f"force_delta,every={EVERY}"]
        run("nve_direct", equilibrated, model, args.out, MDSettings(ensemble="nve", forces="direct", **common),
            nve_watch)
        run("nve_conservative", equilibrated, model, args.out,
            MDSettings(ensemble="nve", forces="conservative", **common), [f"bonds,every={EVERY}",
                                                                         f"temperature,every={EVERY}"])
    report(args.out, args.docs, names, roles, frames, args.model, args.ps)


if __name__ == "__main__":
    main()
