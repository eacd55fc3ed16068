"""Agreement of the two public pretrained models (CHGNet 0.3.0, SevenNet-0) on small periodic materials frames.

Both are trained on PBE(+U) (MPtrj); atomuq's references are GFN1-xTB, so this is not an error score:
it shows how far two independent public models agree, and their ensemble spread as a flag.
Frames (ase.build): fcc Cu, diamond Si and rocksalt MgO 2x2x2 cubic supercells, each near
equilibrium (rattled 0.03 Å), hot (rattled 0.15 Å), compressed by 6 % (rattled 0.03 Å) and with one
vacancy (rattled 0.03 Å). Per frame: energy per atom of each model and their difference (eV/atom),
RMS force difference sqrt(sum_i |F_a,i - F_b,i|^2 / 3N) (eV/Å), ensemble_std (atomuq.uq.ensemble,
two members, conservative forces, ddof=0; eV/Å) and a flag where ensemble_std exceeds --flag.

Run (in a venv with pip install 'atomuq[pretrained]'):
    OMP_NUM_THREADS=1 python scripts/pretrained_agreement.py [--flag 0.05] [-o table.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk

from atomuq.core.batch import Batch
from atomuq.models.derivatives import evaluate
from atomuq.models.registry import resolve_model
from atomuq.uq.ensemble import ensemble_uncertainty, evaluate_ensemble

MEMBERS = ("chgnet", "sevennet-0")


def frames() -> list[tuple[str, Atoms]]:
    """(label, structure) of every frame: four variants of each of three materials."""
    materials = {
        "Cu fcc": bulk("Cu", "fcc", a=3.61, cubic=True),
        "Si diamond": bulk("Si", "diamond", a=5.43, cubic=True),
        "MgO rocksalt": bulk("MgO", "rocksalt", a=4.21, cubic=True),
    }
    out = []
    for seed, (name, unit) in enumerate(materials.items()):
        cell = unit.repeat((2, 2, 2))
        near = cell.copy()
        near.rattle(0.03, seed=seed)
        hot = cell.copy()
        hot.rattle(0.15, seed=seed + 10)
        compressed = cell.copy()
        compressed.set_cell(cell.cell * 0.94, scale_atoms=True)
        compressed.rattle(0.03, seed=seed + 20)
        vacancy = cell.copy()
        del vacancy[0]
        vacancy.rattle(0.03, seed=seed + 30)
        out += [(f"{name} near equilibrium", near), (f"{name} hot (0.15 Å)", hot),
                (f"{name} compressed 6 %", compressed), (f"{name} vacancy", vacancy)]
    return out


def agreement(flag: float) -> list[dict]:
    """One row per frame: energies per atom (eV/atom), their difference, RMS force difference and ensemble_std (eV/Å)."""
    models = [resolve_model(name) for name in MEMBERS]
    rows = []
    for label, atoms in frames():
        batch = Batch.from_atoms([atoms])
        preds = [evaluate(m, batch) for m in models]
        energies = [float(p.energy[0].detach()) / len(atoms) for p in preds]
        diff = (preds[0].forces_conservative - preds[1].forces_conservative).detach()
        force_rms = float(torch.sqrt((diff**2).sum() / (3 * len(atoms))))
        ens = evaluate_ensemble(models, batch, "conservative", list(MEMBERS))
        std = float(ensemble_uncertainty(ens, batch).per_structure["ensemble_std"][0])
        rows.append({"frame": label, "atoms": len(atoms), "e_chgnet": energies[0], "e_sevennet": energies[1],
                     "de": energies[0] - energies[1], "force_rms": force_rms, "ensemble_std": std,
                     "flag": std > flag})
    return rows


def table(rows: list[dict], flag: float) -> str:
    """The rows as a markdown table."""
    lines = ["| frame | atoms | E/atom CHGNet eV | E/atom SevenNet-0 eV | ΔE/atom eV | force RMS diff eV/Å "
             f"| ensemble_std eV/Å | flag (> {flag:g}) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['frame']} | {r['atoms']} | {r['e_chgnet']:.4f} | {r['e_sevennet']:.4f} | {r['de']:+.4f} | "
                     f"{r['force_rms']:.4f} | {r['ensemble_std']:.4f} | {'FLAG' if r['flag'] else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flag", type=float, default=0.05, help="flag frames whose ensemble_std exceeds this (eV/Å)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    rows = agreement(args.flag)
    text = table(rows, args.flag)
    de = np.array([r["de"] for r in rows])
    text += (f"\n\nmean |ΔE/atom| {np.abs(de).mean():.4f} eV/atom; mean force RMS difference "
             f"{np.mean([r['force_rms'] for r in rows]):.4f} eV/Å; {sum(r['flag'] for r in rows)} of {len(rows)} frames flagged\n")
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
