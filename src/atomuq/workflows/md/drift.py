"""Drift and stability analysis of an `atomuq md` trajectory: energy drift, temperature, U_Δ against time."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from atomuq.core.errors import InputError
from atomuq.workflows.md.monitors import drift_slope
from atomuq.workflows.md.trajectory import scan_trajectory


def final_branch(frames: list[Atoms]) -> tuple[list[Atoms], int]:
    """The frames of the path the run finally took, and how many restarts (rollbacks) it had.

    A frame whose time is not after the previous frame's starts a new branch: earlier frames
    at or after its time are dropped.
    """
    kept: list[Atoms] = []
    restarts = 0
    for f in frames:
        t = float(f.info["time_fs"])
        if kept and t <= float(kept[-1].info["time_fs"]):
            restarts += 1
            while kept and float(kept[-1].info["time_fs"]) >= t:
                kept.pop()
        kept.append(f)
    return kept, restarts


@dataclass
class DriftReport:
    """Energy drift and temperature statistics of one trajectory (energies per atom)."""

    path: str
    frames: int
    atoms: int
    duration_ps: float
    drift_meV_atom_ps: float  # slope of a linear fit of E_tot/N against time
    total_change_meV_atom: float  # E_tot/N at the end minus at the start
    max_deviation_meV_atom: float  # largest |E_tot/N - E_tot/N(0)|
    temperature_mean_K: float
    temperature_std_K: float
    force_delta_mean: float | None  # U_Δ, eV/Å, over frames that carry it
    force_delta_max: float | None
    force_delta_frames: int
    restarts: int
    modes: str

    def as_dict(self) -> dict:
        """Plain dict (JSON-able)."""
        return asdict(self)


def series(frames: list[Atoms], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(time fs, values) of an info key over the frames that have it."""
    pairs = [
        (float(f.info["time_fs"]), float(f.info[key])) for f in frames if key in f.info
    ]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    t, v = np.array(pairs).T
    return t, v


def load_md_frames(path: str | Path) -> tuple[list[Atoms], int]:
    """Complete frames of an `atomuq md` trajectory on its final branch, and the restart count."""
    scan = scan_trajectory(path)
    frames = [f for f in scan.frames if "time_fs" in f.info and "etot" in f.info]
    if len(frames) < 2:
        raise InputError(
            f"{path}: needs at least 2 frames written by `atomuq md` (found {len(frames)})"
        )
    return final_branch(frames)


def analyse(path: str | Path) -> DriftReport:
    """Drift (meV/atom/ps), total change, temperature mean/std (K) and U_Δ statistics of a trajectory."""
    frames, restarts = load_md_frames(path)
    n = len(frames[0])
    t, etot = series(frames, "etot")
    e = etot / n
    _, temp = series(frames, "temperature")
    _, fd = series(frames, "force_delta")
    modes = sorted({str(f.info.get("force_mode", "?")) for f in frames})
    return DriftReport(
        path=str(path),
        frames=len(frames),
        atoms=n,
        duration_ps=float(t[-1] - t[0]) / 1000.0,
        drift_meV_atom_ps=drift_slope(t, e),
        total_change_meV_atom=float(e[-1] - e[0]) * 1000.0,
        max_deviation_meV_atom=float(np.abs(e - e[0]).max()) * 1000.0,
        temperature_mean_K=float(temp.mean()),
        temperature_std_K=float(temp.std()),
        force_delta_mean=float(fd.mean()) if fd.size else None,
        force_delta_max=float(fd.max()) if fd.size else None,
        force_delta_frames=int(fd.size),
        restarts=restarts,
        modes=",".join(modes),
    )


def plot_drift(
    paths: list[str | Path],
    output: str | Path,
    labels: list[str] | None = None,
    tmax_ps: float | None = None,
    symlog: bool = False,
    title: str | None = None,
) -> Path:
    """PNG of total energy per atom (meV/atom, relative to the start), U_Δ and temperature against time (ps).

    symlog: symmetric-log energy axis (linear within ±1 meV/atom) for runs differing by orders of magnitude;
    title: figure title (e.g. the system and what differs between the runs).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(7, 7.5), sharex=True)
    for k, path in enumerate(paths):
        frames, _ = load_md_frames(path)
        label = labels[k] if labels else Path(path).name
        t, etot = series(frames, "etot")
        axes[0].plot(
            t / 1000, (etot - etot[0]) / len(frames[0]) * 1000, label=label, lw=1
        )
        tf, fd = series(frames, "force_delta")
        if fd.size:
            axes[1].plot(tf / 1000, fd, label=label, lw=1)
        tt, temp = series(frames, "temperature")
        axes[2].plot(tt / 1000, temp, label=label, lw=0.8)
    axes[0].set_ylabel("E_tot - E_tot(0) (meV/atom)")
    if symlog:
        axes[0].set_yscale("symlog", linthresh=1.0)
        axes[0].grid(alpha=0.3)
    axes[1].set_ylabel("U_Δ (eV/Å)")
    axes[2].set_ylabel("T (K)")
    axes[2].set_xlabel("time (ps)")
    if tmax_ps is not None:
        axes[2].set_xlim(0, tmax_ps)
    axes[0].legend(fontsize=8)
    if title:
        axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
