"""Write the untrained stand-in model and the demo structure set shipped in the package.

Run: python scripts/make_demo_assets.py   (deterministic: seed 0)
The untrained model is a placeholder until the trained bundled model exists (issue 3):
its Force Delta values are those of random weights and mean nothing physically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase.build import molecule
from ase.collections import g2

from atomuq.core.io import write_structures
from atomuq.models.checkpoint import save_model
from atomuq.models.native import NativeConfig, NativeModel

ROOT = Path(__file__).resolve().parents[1] / "src" / "atomuq" / "data"
SEED = 0


def demo_structures(rng: np.random.Generator) -> list:
    """HCNO molecules from ASE's g2 collection, each at rest and rattled by 0.05 and 0.15 Å."""
    names = [n for n in g2.names if set(molecule(n).get_chemical_symbols()) <= {"H", "C", "N", "O"} and len(molecule(n)) >= 6]
    out = []
    for name in names[:12]:
        for amplitude in (0.0, 0.05, 0.15):
            atoms = molecule(name)
            atoms.positions += rng.normal(scale=amplitude, size=atoms.positions.shape)
            atoms.info["name"] = name
            atoms.info["rattle"] = amplitude
            out.append(atoms)
    return out


def main() -> None:
    torch.manual_seed(SEED)
    model = NativeModel(NativeConfig(elements=(1, 6, 7, 8)))
    save_model(model, ROOT / "models" / "untrained-demo.pt", metadata={"trained_on": "nothing (random weights, seed 0)"})
    write_structures(ROOT / "structures" / "demo.extxyz", demo_structures(np.random.default_rng(SEED)))


if __name__ == "__main__":
    main()
