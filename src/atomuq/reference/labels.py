"""Reference labels of one structure: energy (eV), forces (eV/Å) and stress (eV/Å³), stored the ASE way."""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, Calculator
from ase.calculators.singlepoint import SinglePointCalculator

from atomuq.reference.method import ReferenceMethod

#: result keys written as labels, with units
LABEL_KEYS = {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å³ (Voigt xx yy zz yz xz xy)"}
#: keys removed from a structure before new labels are attached (they would contradict them)
STALE_KEYS = ("energy", "free_energy", "forces", "stress", "energies", "label_method")


def compute_labels(atoms: Atoms, calc: Calculator) -> dict[str, Any]:
    """Energy (eV), forces (N, 3) eV/Å and, for fully periodic cells, stress (6,) eV/Å³ from `calc`."""
    a = atoms.copy()
    a.calc = calc
    results: dict[str, Any] = {"energy": float(a.get_potential_energy()),
                               "forces": np.array(a.get_forces(apply_constraint=False), dtype=float)}
    if a.pbc.all() and "stress" in getattr(calc, "implemented_properties", ()):
        results["stress"] = np.array(a.get_stress(voigt=True, apply_constraint=False), dtype=float)
    if not np.isfinite(results["energy"]) or not np.isfinite(results["forces"]).all() or (
            "stress" in results and not np.isfinite(results["stress"]).all()):
        raise CalculationFailed("the calculator returned NaN or infinite energy, forces or stress")
    return results


def attach_labels(atoms: Atoms, results: Mapping[str, Any], method: str) -> Atoms:
    """A copy of `atoms` carrying `results` as a SinglePointCalculator and info['label_method']."""
    out = atoms.copy()
    for key in STALE_KEYS:
        out.info.pop(key, None)
        out.arrays.pop(key, None)
    out.calc = SinglePointCalculator(out, **{k: v for k, v in results.items() if k in LABEL_KEYS})
    out.info["label_method"] = method
    return out


def results_of(atoms: Atoms) -> dict[str, Any]:
    """The label results (energy, forces, stress) a structure carries in its calculator."""
    res = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    return {k: res[k] for k in LABEL_KEYS if k in res}


def error_text(exc: BaseException) -> str:
    """One line naming an exception: 'Type: first line of its message' (at most 500 characters)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def label_one(method: ReferenceMethod, atoms: Atoms) -> tuple[dict[str, Any] | None, str | None, float]:
    """Label one structure with a fresh calculator: (results, None, seconds) or (None, error text, seconds)."""
    t0 = time.perf_counter()
    try:
        results = compute_labels(atoms, method.make_calculator())
        return results, None, time.perf_counter() - t0
    except Exception as exc:  # any calculator failure is recorded for this frame, never fatal for the run
        return None, error_text(exc), time.perf_counter() - t0
