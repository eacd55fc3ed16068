"""Timing helper shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def timed(repeats: int, fn: Callable[..., T], *fn_args: object, **fn_kwargs: object) -> tuple[float, T]:
    """(minimum wall time in s, last result) of fn(*fn_args, **fn_kwargs) over repeats."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*fn_args, **fn_kwargs)
        best = min(best, time.perf_counter() - start)
    return best, result


def interleaved_minimum(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Minimum wall time (s) of each function over repeats, the functions interleaved within each repeat."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def interleaved_minima(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """Minimum thread CPU seconds ("cpu") and wall seconds ("wall") of each function over repeats, interleaved,
    and every repeat's CPU seconds ("samples", for ratios paired within a repeat).

    CPU time of the calling thread leaves out the time spent waiting for a core on a machine shared with other
    jobs; with one thread it equals wall time on an idle machine."""
    best: dict[str, dict] = {name: {"cpu": float("inf"), "wall": float("inf"), "samples": []} for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            cpu, wall = time.thread_time(), time.perf_counter()
            fn()
            elapsed = time.thread_time() - cpu
            best[name]["samples"].append(elapsed)
            best[name]["cpu"] = min(best[name]["cpu"], elapsed)
            best[name]["wall"] = min(best[name]["wall"], time.perf_counter() - wall)
    return best


def paired_median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over repeats of numerator[k] / denominator[k] (each pair timed back to back: slow changes of the
    load on a shared machine cancel)."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else 0.5 * (ratios[mid - 1] + ratios[mid])


def write_report(path: Path, lines: list[str], ratios: dict[str, float], env: dict) -> None:
    """Append the ratio table and the environment to a report's lines, write them to path (markdown), print them."""
    lines = [*lines, "", "| ratio | value |", "| --- | ---: |", *(f"| {k} | {v:.2f} |" for k, v in ratios.items()),
             "", f"{env}"]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
