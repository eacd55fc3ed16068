"""The Force Delta paper's Table 1 on its mix of systems (issue 14, item 1): U_Δ against the ensemble as a
predictor of the direct-force error ε_nc on equilibrium frames of NVT MD, labelled with the reference.

Systems and models (the paper's ten): four solids (ice, Mg₁₇Al₁₂, LGPS, MoF-5) and one surface (Cu(111)+CO)
with the bundled materials model, labelled with GFN1-xTB (Γ point, the materials set's tblite options); five
molecules (Ac-Ala3-NHMe, stachyose, aspirin, paracetamol, DHA) with the bundled molecular-broad, labelled with
GFN2-xTB. Per system --trajectories independent Langevin NVT runs (atomuq md; 0.5 fs, friction 0.01/fs,
conservative forces: equilibrium sampling of the model's own energy surface; 300 K, ice 200 K), each from the
same start with its own velocity seed: the model-relaxed GFN1-xTB supercell for the solids (the drift study's
start, scripts/md_materials.relaxed_start), the first 300 K GFN2-xTB MD frame of the molecule's training
trajectory for the molecules. Frames every 25 fs after a 250 fs burn-in (--frames per run) are labelled.

Scores: U_Δ (the model alone) and σ_ens, the five-member ensemble's spread of direct forces (the model and its
members runs/<set>_member1..4, co-trained deep-ensemble members of the same data; the paper's ensembles are
ad-hoc collections of public models); errors ε_nc (the model's direct forces against the reference) and ε_ens
(the ensemble mean's). Per system r_s(U_Δ, ε_nc), r_s(σ_ens, ε_nc) (the paper's comparison), r_s(σ_ens, ε_ens),
with 95 % intervals from resampling whole trajectories; their mean over systems; and the model-averaged figure
(methods.md §10: per model, r_s over its systems of the per-system mean U_Δ against mean ε_nc, then the mean
over the two models; the paper: 0.98).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/table1.py --part molecules   # MD + labels (resumable)
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/table1.py --part materials
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/table1.py --report           # docs/bench/table1.*
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from atomuq.core.io import read_structures  # noqa: E402
from atomuq.models.registry import resolve_model  # noqa: E402
from build_bench_data import label  # noqa: E402
from build_materials_set import TBLITE_OPTIONS  # noqa: E402
from gpu_train import finished_members  # noqa: E402
from md_materials import TIMESTEP, md, relaxed_start, say  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "out" / "table1"
BENCH = ROOT / "data" / "bench"
DOCS = ROOT / "docs" / "bench"
#: part -> (model, reference method, label options, {system: temperature K})
PARTS = {
    "materials": ("materials", "gfn1-xtb", TBLITE_OPTIONS,
                  {"ice": 200.0, "mg17al12": 300.0, "lgps": 300.0, "mof5": 300.0, "cu111_co": 300.0}),
    "molecules": ("molecular-broad", "gfn2-xtb", {"charge": 0, "multiplicity": 1},
                  {"ac_ala3_nhme": 300.0, "stachyose": 300.0, "aspirin": 300.0, "paracetamol": 300.0, "dha": 300.0}),
}
SURFACE = {"cu111_co"}
BURN_IN_STEPS = 500  # 250 fs at md_materials.TIMESTEP = 0.5 fs
EVERY = 50  # a frame every 25 fs


def members_of(part: str) -> list[str]:
    """The ensemble: the bundled model and those of its members runs/<set>_member1..4 that finished training."""
    prefix = "materials" if part == "materials" else "molecular_broad"
    return finished_members([PARTS[part][0]] + [f"runs/{prefix}_member{i}/best.pt" for i in range(1, 5)], ROOT)


def start_of(part: str, system: str, model):
    """The starting frame of a system's runs (see the docstring)."""
    if part == "materials":
        return relaxed_start(system, model, ROOT / "out" / "drift_materials")
    for record in read_structures([ROOT / "out" / "molecular_broad" / "train_md300.extxyz.gz"]):
        if record.atoms.info.get("molecule") == system:
            atoms = record.atoms.copy()
            atoms.calc, atoms.info = None, {}
            return atoms
    raise SystemExit(f"{system}: no 300 K training frame in out/molecular_broad/train_md300.extxyz.gz")


def run_part(part: str, trajectories: int, frames: int) -> Path:
    """MD of every system of a part and the reference labels of its kept frames -> data/bench/table1_PART.extxyz.gz."""
    from atomuq.workflows.md.drift import load_md_frames

    model_name, method, options, systems = PARTS[part]
    model = resolve_model(model_name)
    WORK.mkdir(parents=True, exist_ok=True)
    status_path = WORK / f"{part}.status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    kept = []
    steps = BURN_IN_STEPS + frames * EVERY
    for system, temperature in systems.items():
        start = start_of(part, system, model)
        for seed in range(1, trajectories + 1):
            path = WORK / f"{system}.nvt{seed}.extxyz"
            md(start.copy(), model, path, f"{system}.nvt{seed}", status, status_path, ensemble="langevin",
               forces="conservative", steps=steps, temperature_K=temperature, seed=seed, traj_every=EVERY)
            if status[f"{system}.nvt{seed}"]["error"]:
                continue
            for frame in load_md_frames(path)[0]:
                step = int(round(frame.info["time_fs"] / TIMESTEP))
                if step > BURN_IN_STEPS:
                    atoms = frame.copy()
                    atoms.calc = None
                    atoms.info = {"system": system, "trajectory": seed, "md_step": step, "temperature": temperature}
                    kept.append(atoms)
        say(f"{part}: {system} done ({len(kept)} frames so far)")
    output = BENCH / f"table1_{part}.extxyz.gz"
    summary = label(kept, method, output, options=options)
    summary.update(model=model_name, trajectories=trajectories, frames_per_trajectory=frames, systems=systems,
                   md={k: v for k, v in status.items()})
    (BENCH / f"manifest_table1_{part}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return output


# ---------------------------------------------------------------------------------------------
# report


def score_part(part: str) -> dict[str, np.ndarray]:
    """Per-structure U_Δ, σ_ens, ε_nc, ε_ens, system and trajectory of a part's labelled frames."""
    from atomuq.workflows.bench import collect, load_labelled

    model = resolve_model(PARTS[part][0])
    members = [resolve_model(spec) for spec in members_of(part)]
    records = load_labelled([BENCH / f"table1_{part}.extxyz.gz"], model)
    data = collect(records, model, ensemble=members, group_key="system")
    return {**{k: data.values[k] for k in ("force_delta", "eps_nc", "eps_c", "ensemble_std", "eps_ensemble")},
            "system": data.systems, "trajectory": np.array([r.atoms.info["trajectory"] for r in records])}


def system_rows(part: str, values: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per system: frames, trajectories, means, and the three r_s with intervals over trajectories."""
    from atomuq.uq.evaluate import bootstrap_ci, spearman

    rows = {}
    for system in PARTS[part][3]:
        m = values["system"] == system
        if m.sum() < 5:
            continue
        v = {k: values[k][m] for k in ("force_delta", "eps_nc", "ensemble_std", "eps_ensemble")}
        groups = values["trajectory"][m]
        row = {"frames": int(m.sum()), "trajectories": int(len(np.unique(groups))),
               **{f"mean_{k}": float(x.mean()) for k, x in v.items()}}
        for name, (score, error) in {"u_nc": ("force_delta", "eps_nc"), "ens_nc": ("ensemble_std", "eps_nc"),
                                     "ens_ens": ("ensemble_std", "eps_ensemble")}.items():
            ci = bootstrap_ci(spearman, v[score], v[error], groups=groups, seed=0)
            row[name] = {"r_s": float(spearman(v[score], v[error])), "low": ci.low, "high": ci.high}
        rows[system] = row
    return rows


def model_averaged(rows: dict[str, dict]) -> dict[str, float]:
    """r_s over one model's systems of per-system mean score against mean error (methods.md §10)."""
    from atomuq.uq.evaluate import spearman

    def over(score: str, error: str) -> float:
        return float(spearman([r[score] for r in rows.values()], [r[error] for r in rows.values()]))

    return {"u_nc": over("mean_force_delta", "mean_eps_nc"), "ens_nc": over("mean_ensemble_std", "mean_eps_nc"),
            "ens_ens": over("mean_ensemble_std", "mean_eps_ensemble")}


def report() -> dict:
    """docs/bench/table1.{json,md,png} from the labelled frames of both parts."""
    results = {}
    for part in PARTS:
        if not (BENCH / f"table1_{part}.extxyz.gz").exists():
            say(f"{part}: not built yet (run --part {part}); left out")
            continue
        values = score_part(part)
        rows = system_rows(part, values)
        results[part] = {"model": PARTS[part][0], "reference": PARTS[part][1], "ensemble": members_of(part),
                         "systems": rows, "model_averaged": model_averaged(rows),
                         "mean_over_systems": {k: float(np.mean([r[k]["r_s"] for r in rows.values()]))
                                               for k in ("u_nc", "ens_nc", "ens_ens")}}
    every = [r for res in results.values() for r in res["systems"].values()]
    summary = {k: {"mean_over_systems": float(np.mean([r[k]["r_s"] for r in every])),
                   "model_averaged": float(np.mean([res["model_averaged"][k] for res in results.values()]))}
               for k in ("u_nc", "ens_nc", "ens_ens")} if every else {}
    out = {"command": "OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/table1.py --report",
           "parts": results, "summary": summary, "paper": {"u_nc_model_averaged": 0.98,
                                                            "u_nc_per_family": "0.70 ± 0.04 (Orb) / 0.91 ± 0.02 (EqV2)",
                                                            "ens_nc": "0.73 (Orb) / 0.79 (EqV2)"}}
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "table1.json").write_text(json.dumps(out, indent=1) + "\n")
    write_markdown(out)
    plot(results, DOCS / "table1.png")
    return out


def fmt(entry: dict) -> str:
    """r_s [low, high]."""
    return f"{entry['r_s']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}]"


def write_markdown(out: dict) -> None:
    """docs/bench/table1.md; hand-written notes after the marker are kept."""
    keep = "<!-- hand-written notes below are kept by table1.py -->"
    lines = ["# Table 1 analogue: U_Δ against a five-member ensemble on equilibrium frames", "",
             f"Generated by `{out['command']}` (frames: `--part molecules`, `--part materials`; protocol in the "
             "script's docstring). r_s: Spearman over a system's frames; brackets: 95 % bootstrap interval "
             "resampling whole trajectories. σ_ens: spread of the direct forces of the model and its four members; "
             "ε_nc: the model's direct-force error; ε_ens: the ensemble mean's. Paper: U_Δ model-averaged 0.98, "
             "per family 0.70 ± 0.04 (Orb) / 0.91 ± 0.02 (EqV2); ensemble variance against ε_nc 0.73 / 0.79.", "",
             "| system | model (reference) | frames (trajectories) | mean ε_nc (eV/Å) | mean U_Δ | mean σ_ens | "
             "r_s(U_Δ, ε_nc) | r_s(σ_ens, ε_nc) | r_s(σ_ens, ε_ens) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for res in out["parts"].values():
        for system, r in res["systems"].items():
            lines.append(f"| {system}{' (surface)' if system in SURFACE else ''} | {res['model']} ({res['reference']}) | "
                         f"{r['frames']} ({r['trajectories']}) | {r['mean_eps_nc']:.3f} | {r['mean_force_delta']:.3f} | "
                         f"{r['mean_ensemble_std']:.3f} | {fmt(r['u_nc'])} | {fmt(r['ens_nc'])} | {fmt(r['ens_ens'])} |")
    lines += ["", "| | r_s(U_Δ, ε_nc) | r_s(σ_ens, ε_nc) | r_s(σ_ens, ε_ens) |", "|---|---:|---:|---:|"]
    for res in out["parts"].values():
        lines.append(f"| {res['model']}: mean over its systems | "
                     + " | ".join(f"{res['mean_over_systems'][k]:.2f}" for k in ("u_nc", "ens_nc", "ens_ens")) + " |")
        lines.append(f"| {res['model']}: r_s of per-system means | "
                     + " | ".join(f"{res['model_averaged'][k]:.2f}" for k in ("u_nc", "ens_nc", "ens_ens")) + " |")
    if out["summary"]:
        s = out["summary"]
        lines.append("| all systems: mean of per-system r_s | "
                     + " | ".join(f"{s[k]['mean_over_systems']:.2f}" for k in ("u_nc", "ens_nc", "ens_ens")) + " |")
        lines.append("| model-averaged (mean over the two models of the row above it; paper 0.98 for U_Δ) | "
                     + " | ".join(f"{s[k]['model_averaged']:.2f}" for k in ("u_nc", "ens_nc", "ens_ens")) + " |")
    lines += ["", "![per-system r_s](table1.png)", ""]
    path = DOCS / "table1.md"
    notes = path.read_text().split(keep, 1)[1] if path.exists() and keep in path.read_text() else "\n"
    path.write_text("\n".join(lines) + "\n" + keep + notes)


def plot(results: dict, path: Path) -> None:
    """Per-system r_s of U_Δ and σ_ens against ε_nc (and σ_ens against ε_ens) with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [(part, s) for part, res in results.items() for s in res["systems"]]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(systems) + 1.4))
    for j, (key, label_) in enumerate((("u_nc", "r_s(U_Δ, ε_nc)"), ("ens_nc", "r_s(σ_ens, ε_nc)"),
                                       ("ens_ens", "r_s(σ_ens, ε_ens)"))):
        for i, (part, system) in enumerate(systems):
            e = results[part]["systems"][system][key]
            ax.errorbar(e["r_s"], i + (j - 1) * 0.22, xerr=[[max(e["r_s"] - e["low"], 0)], [max(e["high"] - e["r_s"], 0)]],
                        fmt="Dos"[j], color=f"C{j}", ms=5, capsize=2, lw=0.8, label=label_ if i == 0 else None)
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set_yticks(range(len(systems)))
    ax.set_yticklabels([f"{s} ({results[p]['model']})" for p, s in systems], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(-1.02, 1.02)
    ax.set_xlabel("Spearman r_s over equilibrium NVT frames (95 % interval over trajectories)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=list(PARTS), help="run the MD and labels of one part")
    ap.add_argument("--trajectories", type=int, default=5)
    ap.add_argument("--frames", type=int, default=10, help="labelled frames per trajectory")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.part:
        t = time.perf_counter()
        run_part(args.part, args.trajectories, args.frames)
        say(f"{args.part}: {time.perf_counter() - t:.0f} s")
    if args.report:
        report()


if __name__ == "__main__":
    main()
