"""Figures for LTAU-FF: reliability (calibration) curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from atomuq.core.io import atomic_path  # noqa: E402
from atomuq.uq.ltau.calibration import ReliabilityCurve  # noqa: E402


def draw_reliability(ax: plt.Axes, curves: Sequence[tuple[str, ReliabilityCurve]], title: str) -> None:
    """Observed hit fraction against mean predicted p_j per bin, one line per labelled curve, on ax."""
    ax.plot([0, 1], [0, 1], "--", color="tab:red", lw=1, label="ideal")
    for label, curve in curves:
        ax.plot(curve.predicted, curve.observed, "o-", ms=3,
                label=f"{label} (area {curve.miscalibration_area:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted p_j", ylabel="observed fraction with error ≤ s·atol",
           title=title)
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="upper left")


def reliability_figure(panels: Sequence[tuple[str, Sequence[tuple[str, ReliabilityCurve]]]], path: str | Path) -> Path:
    """One panel per (title, curves) side by side, written atomically to path (PNG)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels):
        draw_reliability(ax, curves, title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)
    return path
