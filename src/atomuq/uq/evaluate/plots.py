"""Figures of UQ evaluation (matplotlib, no pyplot state: works headless). Each function draws one or more
labelled series on an Axes (a new figure when ax is None) and returns the Axes; save with save_figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from numpy.typing import ArrayLike

from .calibration import BinnedCalibration
from .conformal import Coverage
from .inputs import as_pair


def new_axes(figsize: tuple[float, float] = (5.0, 4.4)) -> Axes:
    """One Axes on a new Figure (not registered with pyplot)."""
    return Figure(figsize=figsize).add_subplot()


def save_figure(ax: Axes, path: str | Path, dpi: int = 130) -> Path:
    """Save the figure holding `ax` as PNG (or any format matplotlib knows from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = ax.get_figure()
    figure.tight_layout()
    figure.savefig(path, dpi=dpi, bbox_inches="tight")  # legends under the axes and titles of equal-aspect axes stay in
    return path


def _plain_log_ticks(ax: Axes) -> None:
    """Log axes labelled at 1, 2 and 5 per decade in plain numbers, minor ticks unlabelled (no colliding labels)."""
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(NullFormatter())


def _legend_below(ax: Axes, fontsize: float = 7) -> None:
    """Legend under the axes, so that it never covers a curve."""
    ax.legend(fontsize=fontsize, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)


def _diagonal(ax: Axes, low: float, high: float) -> None:
    ax.plot([low, high], [low, high], color="k", ls="--", lw=0.8, label="ideal")


def plot_rmse_vs_rmv(
    series: Mapping[str, BinnedCalibration], ax: Axes | None = None, unit: str = "eV/Å"
) -> Axes:
    """RMSE against RMV per equal-count bin (log axes, both in `unit`); calibrated points lie on the diagonal."""
    ax = ax or new_axes()
    values = np.concatenate([np.r_[b.rmv, b.rmse] for b in series.values()])
    for label, binned in series.items():
        ax.plot(binned.rmv, binned.rmse, "o-", ms=4, label=label)
    _diagonal(ax, values.min() / 1.3, values.max() * 1.3)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=f"RMV = sqrt(mean σ²) per bin ({unit})",
        ylabel=f"RMSE per bin ({unit})",
        title="RMSE vs RMV (equal-count bins)",
    )
    _plain_log_ticks(ax)
    ax.legend(fontsize=8)
    return ax


def plot_calibration_curve(
    series: Mapping[str, tuple[np.ndarray, np.ndarray]],
    ax: Axes | None = None,
    areas: Mapping[str, float] | None = None,
) -> Axes:
    """Observed against expected fraction of errors inside Gaussian central intervals (from calibration_curve)."""
    ax = ax or new_axes()
    for label, (expected, observed) in series.items():
        text = (
            f"{label} (area {areas[label]:.3f})" if areas and label in areas else label
        )
        ax.plot(expected, observed, lw=1.5, label=text)
    _diagonal(ax, 0.0, 1.0)
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        aspect="equal",
        xlabel="expected proportion in interval",
        ylabel="observed proportion in interval",
        title="interval calibration (below: σ too small)",
    )
    ax.legend(fontsize=8, loc="upper left")
    return ax


def plot_coverage(
    series: Mapping[str, Sequence[Coverage]], ax: Axes | None = None
) -> Axes:
    """Empirical against requested coverage of conformal bounds, with ±2 binomial standard errors."""
    ax = ax or new_axes()
    levels = [c.level for cs in series.values() for c in cs]
    for label, results in series.items():
        ax.errorbar(
            [c.level for c in results],
            [c.coverage for c in results],
            yerr=[2 * c.stderr for c in results],
            fmt="o-",
            ms=4,
            capsize=3,
            label=label,
        )
    low = min(levels + [c.coverage for cs in series.values() for c in cs]) - 0.05
    _diagonal(ax, low, 1.0)
    ax.set(
        xlim=(low, 1.0),
        ylim=(low, 1.0),
        aspect="equal",
        xlabel="requested coverage",
        ylabel="empirical coverage",
        title="split-conformal coverage",
    )
    _legend_below(ax)
    return ax


def plot_score_vs_error(
    series: Mapping[str, tuple[ArrayLike, ArrayLike]],
    ax: Axes | None = None,
    score_label: str = "score",
    error_label: str = "error",
    curve: tuple[ArrayLike, ArrayLike] | None = None,
    curve_label: str = "map",
) -> Axes:
    """Scatter of error against score on log axes; `curve` (x, y) overlays a map or a bound, e.g. g(score)."""
    ax = ax or new_axes()
    for label, (score, error) in series.items():
        s, e = as_pair(f"{label}: score", score, f"{label}: error", error, min_len=1)
        ax.scatter(s, e, s=6, alpha=0.5, label=label, rasterized=True)
    if curve is not None:
        ax.plot(*curve, color="k", lw=1.2, label=curve_label)
    ax.set(xscale="log", yscale="log", xlabel=score_label, ylabel=error_label)
    ax.legend(fontsize=8, markerscale=2)
    return ax
