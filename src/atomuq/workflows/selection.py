"""Choosing which searched structures to keep (methods.md section 2, selection).

Frames are candidates when U_Δ exceeds a percentile of the starting set's U_Δ (and, optionally,
their energy per atom above the start stays under a cap). Candidates are taken in order of
decreasing U_Δ; one is dropped when it lies within an RMSD threshold of a frame already kept
with the same atoms (same species in the same order, same cell and pbc). The RMSD is taken after
optimal superposition (Kabsch, translation and proper rotation removed) for non-periodic
structures, and as the minimum-image RMSD with the mean displacement removed for periodic ones.
At most max_selected frames are kept per round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from ase import Atoms

from atomuq.core.errors import InputError


@dataclass
class SelectionSettings:
    """percentile (0-100) of the starting U_Δ; rmsd_threshold Å; max_energy_per_atom eV/atom above the start."""

    percentile: float = 90.0
    rmsd_threshold: float = 0.1
    max_selected: int | None = 100
    max_energy_per_atom: float | None = None

    def check(self) -> None:
        """Raise InputError on an invalid setting."""
        if not 0 <= self.percentile <= 100:
            raise InputError(f"percentile must be between 0 and 100, got {self.percentile}")
        if not (self.rmsd_threshold >= 0 and math.isfinite(self.rmsd_threshold)):
            raise InputError(f"rmsd threshold must be >= 0, got {self.rmsd_threshold}")
        if self.max_selected is not None and self.max_selected < 1:
            raise InputError(f"max_selected must be at least 1, got {self.max_selected}")


def kabsch_rmsd(reference: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(K,) RMSD in Å of each of others (K, n, 3) to reference (n, 3) after optimal translation and rotation."""
    a = reference - reference.mean(axis=0)
    b = others - others.mean(axis=1, keepdims=True)
    h = np.einsum("kni,nj->kij", b, a)
    u, s, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(u @ vt))
    trace = s[:, 0] + s[:, 1] + d * s[:, 2]
    sq = ((a**2).sum() + (b**2).sum(axis=(1, 2)) - 2 * trace) / len(a)
    return np.sqrt(np.clip(sq, 0.0, None))


def periodic_rmsd(reference: np.ndarray, others: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """(K,) minimum-image RMSD in Å of others (K, n, 3) to reference (n, 3), mean displacement removed."""
    diff = others - reference
    frac = diff @ np.linalg.inv(cell)
    frac -= np.round(frac) * np.asarray(pbc, dtype=float)
    diff = frac @ cell
    diff -= diff.mean(axis=1, keepdims=True)
    return np.sqrt((diff**2).sum(axis=2).mean(axis=1))


def structure_rmsd(reference: Atoms, others: Sequence[Atoms]) -> np.ndarray:
    """(K,) RMSD in Å between structures with the same atoms: Kabsch without pbc, minimum image with it."""
    stack = np.stack([o.positions for o in others])
    if np.asarray(reference.pbc).any():
        return periodic_rmsd(reference.positions, stack, reference.cell.array, reference.pbc)
    return kabsch_rmsd(reference.positions, stack)


def _group_key(atoms: Atoms) -> tuple:
    """Frames are compared only within a group: same numbers in order, same pbc, same cell."""
    return (atoms.numbers.tobytes(), tuple(bool(p) for p in atoms.pbc), np.round(atoms.cell.array, 6).tobytes())


def threshold(start_force_delta: Sequence[float], percentile: float) -> float:
    """The U_Δ (eV/Å) a frame must exceed: the given percentile of the starting structures' U_Δ."""
    values = np.asarray([u for u in start_force_delta if math.isfinite(u)], dtype=float)
    if len(values) == 0:
        raise InputError("no starting structure has a finite U_Δ; nothing to compare against")
    return float(np.percentile(values, percentile))


def select(frames: Sequence[Atoms], start_force_delta: Sequence[float], settings: SelectionSettings | None = None) -> list[int]:
    """Indices into frames (info force_delta, optional energy_per_atom_rel) that pass, best U_Δ first."""
    settings = settings or SelectionSettings()
    settings.check()
    cut = threshold(start_force_delta, settings.percentile)
    u = np.array([float(f.info["force_delta"]) for f in frames])
    ok = np.isfinite(u) & (u > cut)
    if settings.max_energy_per_atom is not None:
        e = np.array([float(f.info.get("energy_per_atom_rel", math.nan)) for f in frames])
        ok &= e <= settings.max_energy_per_atom
    kept: list[int] = []
    groups: dict[tuple, list[int]] = {}
    for k in sorted(np.flatnonzero(ok), key=lambda i: -u[i]):
        if settings.max_selected is not None and len(kept) >= settings.max_selected:
            break
        members = groups.setdefault(_group_key(frames[k]), [])
        if members and structure_rmsd(frames[k], [frames[j] for j in members]).min() < settings.rmsd_threshold:
            continue
        members.append(int(k))
        kept.append(int(k))
    return kept
