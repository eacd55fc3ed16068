"""Monitors for MD: a quantity checked every n steps against a threshold, with an action on a breach.

A quantity is anything with `name`, `unit`, `needs_conservative` and `__call__(atoms, time_fs)`
returning a float (or None while it has no value yet): a calculator result key (the Force
Delta, or any per-structure UQ scalar another estimator's calculator offers, e.g. an LTAU or
ensemble score), the temperature, or the fitted energy drift. FunctionQuantity wraps any
callable. Thresholds are absolute, or relative to the first value ("start") or to the running
median of the last values ("median"), optionally kept within [floor, cap] (the cap also applies
before a relative limit has its reference). Actions: log, snapshot, stop, rollback (driver.py
acts). Every monitor has a canonical spec string (Monitor.spec), parse_monitor's syntax, which
run records and resume checks compare.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from ase import Atoms

from atomuq.core.bonds import bond_changes, bond_graph
from atomuq.workflows.md.settings import SettingError
from atomuq.core.schema import LESS_TRUSTED, MD, STRUCTURE, Key, register_key

ACTIONS = ("log", "snapshot", "stop", "rollback")
REDUCTIONS = {"max": np.max, "mean": np.mean, "rms": lambda x: np.sqrt(np.mean(x**2))}
THRESHOLD_MODES = ("absolute", "start", "median")


class Quantity(Protocol):
    """A per-structure scalar an MD monitor watches (higher means worse)."""

    name: str
    unit: str
    needs_conservative: bool

    def __call__(self, atoms: Atoms, time_fs: float) -> float | None: ...


@dataclass
class ResultKey:
    """A calculator result as a per-structure scalar (default: the Force Delta U_Δ, eV/Å).

    Per-atom results (e.g. the confidence head's confidence_error, or an LTAU calculator's
    per-atom score) are reduced with `reduce`: "max", "mean" or "rms".
    """

    key: str = "force_delta"
    unit: str = "eV/Å"
    needs_conservative: bool = True
    reduce: str = "max"

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise SettingError(
                f"{{monitors}} key:{self.key}: reduce must be one of {', '.join(REDUCTIONS)}, got {self.reduce!r}"
            )

    @property
    def name(self) -> str:
        return self.key if self.key == "force_delta" else f"{self.key}_{self.reduce}"

    @property
    def spec(self) -> str:
        """The quantity part of parse_monitor's syntax."""
        return "force_delta" if self.key == "force_delta" else f"key:{self.key},reduce={self.reduce}"

    def __call__(self, atoms: Atoms, time_fs: float) -> float:
        """The value of `key` at the current positions (computed if the cached evaluation lacks it)."""
        value = atoms.calc.results.get(self.key)
        if value is None:
            value = atoms.calc.get_property(self.key, atoms)
        if np.ndim(value) == 0:
            return float(value)
        return float(REDUCTIONS[self.reduce](np.asarray(value, dtype=float)))


@dataclass
class FunctionQuantity:
    """Any callable fn(atoms, time_fs) -> float as a monitored quantity."""

    fn: Callable[[Atoms, float], float | None]
    name: str
    unit: str = ""
    needs_conservative: bool = False

    def __post_init__(self) -> None:
        # a user's own quantity is written into every frame, so its name joins the one key registry
        register_key(Key(self.name, STRUCTURE, self.unit, LESS_TRUSTED, f"user-defined MD monitor quantity {self.name}",
                         (MD,), clears=False))

    def __call__(self, atoms: Atoms, time_fs: float) -> float | None:
        return self.fn(atoms, time_fs)


@dataclass
class Temperature:
    """Instantaneous kinetic temperature (K)."""

    name: str = "temperature"
    unit: str = "K"
    needs_conservative: bool = False
    spec: str = "temperature"

    def __call__(self, atoms: Atoms, time_fs: float) -> float:
        return float(atoms.get_temperature())


@dataclass
class EnergyDrift:
    """|slope| of a linear fit of total energy per atom against time over the last `window` samples (meV/atom/ps)."""

    window: int = 100
    name: str = "energy_drift"
    unit: str = "meV/atom/ps"
    needs_conservative: bool = False
    spec: str = "energy_drift"
    times: deque = field(default_factory=deque)
    energies: deque = field(default_factory=deque)

    def __call__(self, atoms: Atoms, time_fs: float) -> float | None:
        etot = (atoms.get_potential_energy() + atoms.get_kinetic_energy()) / len(atoms)
        self.times.append(time_fs)
        self.energies.append(etot)
        while len(self.times) > self.window:
            self.times.popleft()
            self.energies.popleft()
        if len(self.times) < 3:
            return None
        return abs(drift_slope(np.array(self.times), np.array(self.energies)))

    def get_state(self) -> dict:
        return {"times": list(self.times), "energies": list(self.energies)}

    def set_state(self, state: dict) -> None:
        self.times = deque(state["times"])
        self.energies = deque(state["energies"])


@dataclass
class BondChanges:
    """Covalent bonds broken plus bonds formed since the first reading (core.bonds: broken beyond 1.5x, formed below
    1.2x the covalent radius sum; minimum image in periodic cells); a count, so max=0.5 stops at the first change."""

    name: str = "bonds"
    unit: str = ""
    needs_conservative: bool = False
    spec: str = "bonds"
    reference: np.ndarray | None = None

    def __call__(self, atoms: Atoms, time_fs: float) -> float:
        if self.reference is None:
            self.reference = bond_graph(atoms)
            return 0.0
        broken, formed = bond_changes(atoms.numbers, atoms.positions, self.reference, atoms.cell.array, atoms.pbc)
        return float(broken + formed)

    def get_state(self) -> dict:
        return {"bonds": None if self.reference is None else self.reference.tolist()}

    def set_state(self, state: dict) -> None:
        bonds = state.get("bonds")
        self.reference = None if bonds is None else np.asarray(bonds, dtype=np.int64).reshape(-1, 2)


def drift_slope(time_fs: np.ndarray, energy_per_atom: np.ndarray) -> float:
    """Slope of the least-squares line through (time fs, energy eV/atom), in meV/atom/ps."""
    slope_ev_per_fs = np.polyfit(
        np.asarray(time_fs, float), np.asarray(energy_per_atom, float), 1
    )[0]
    return float(slope_ev_per_fs * 1e6)


@dataclass
class Threshold:
    """A limit: `value` itself (absolute), or value × the first reading (start) or × the running median,
    kept within [floor, cap] when those are given (relative modes only)."""

    value: float
    mode: str = "absolute"
    window: int = 25
    floor: float | None = None
    cap: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in THRESHOLD_MODES:
            raise SettingError(
                f"{{monitors}}: threshold mode must be one of {', '.join(THRESHOLD_MODES)}, got {self.mode!r}"
            )
        if not np.isfinite(self.value) or (self.mode != "absolute" and self.value <= 0):
            raise SettingError(f"{{monitors}}: threshold {self.value!r} must be finite (and positive when relative)")
        if int(self.window) != self.window or self.window < 1:
            raise SettingError(f"{{monitors}}: window must be a positive integer, got {self.window!r}")
        if self.mode == "absolute" and (self.floor is not None or self.cap is not None):
            raise SettingError("{monitors}: floor and cap apply to relative limits (max=Xxstart or Xxmedian)")
        for name, bound in (("floor", self.floor), ("cap", self.cap)):
            if bound is not None and not np.isfinite(bound):
                raise SettingError(f"{{monitors}}: {name} must be a finite number, got {bound!r}")
        if self.floor is not None and self.cap is not None and self.floor > self.cap:
            raise SettingError(f"{{monitors}}: floor {self.floor:g} is above cap {self.cap:g}")

    def bound(self, relative: float | None) -> float | None:
        """The limit from the relative part (None while unknown), kept within [floor, cap]."""
        if relative is None:
            return self.cap
        if self.floor is not None:
            relative = max(relative, self.floor)
        return relative if self.cap is None else min(relative, self.cap)

    def describe(self) -> str:
        """Human-readable form, e.g. '5 x start within [0.5, 2]'."""
        text = {
            "absolute": f"{self.value:g}",
            "start": f"{self.value:g} x start",
            "median": f"{self.value:g} x running median of {self.window}",
        }[self.mode]
        if self.floor is not None or self.cap is not None:
            low = "-inf" if self.floor is None else f"{self.floor:g}"
            high = "inf" if self.cap is None else f"{self.cap:g}"
            text += f" within [{low}, {high}]"
        return text

    def spec(self) -> str:
        """The max=... (and floor=, cap=, window=) options of parse_monitor's syntax."""
        parts = [f"max={self.value:g}" + ("" if self.mode == "absolute" else f"x{self.mode}")]
        if self.mode == "median":
            parts.append(f"window={self.window}")
        if self.floor is not None:
            parts.append(f"floor={self.floor:g}")
        if self.cap is not None:
            parts.append(f"cap={self.cap:g}")
        return ",".join(parts)


@dataclass
class Reading:
    """One monitor evaluation."""

    monitor: str
    step: int
    time_fs: float
    value: float | None
    unit: str
    limit: float | None
    breached: bool
    action: str

    def line(self) -> str:
        """The human-readable log line."""
        value = (
            "n/a (not enough samples)"
            if self.value is None
            else f"{self.value:.6g} {self.unit}"
        )
        limit = "" if self.limit is None else f" (limit {self.limit:.6g})"
        status = f"BREACH -> {self.action}" if self.breached else "ok"
        return f"step {self.step:>8d}  t={self.time_fs:10.2f} fs  {self.monitor} = {value}{limit}  {status}"

    def reason(self) -> str:
        """Why a breached reading breached, e.g. 'temperature = 1244 K, above its limit 900 K at t = 320 fs'."""
        unit = f" {self.unit}" if self.unit else ""
        return (
            f"{self.monitor} = {self.value:.4g}{unit}, above its limit {self.limit:.4g}{unit} "
            f"at step {self.step} (t = {self.time_fs:g} fs)"
        )


@dataclass
class Monitor:
    """Checks `quantity` every `every` steps against `threshold`; on a breach the driver does `action`."""

    quantity: Quantity
    every: int = 10
    threshold: Threshold | None = None
    action: str = "log"
    reference: float | None = None
    history: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        if int(self.every) != self.every or self.every < 1:
            raise SettingError(f"{{monitors}} {self.name}: every must be a positive integer, got {self.every!r}")
        if self.action not in ACTIONS:
            raise SettingError(
                f"{{monitors}} {self.name}: action must be one of {', '.join(ACTIONS)}, got {self.action!r}"
            )
        if self.action != "log" and self.threshold is None:
            raise SettingError(f"{{monitors}} {self.name}: action {self.action!r} needs a threshold (max=...)")

    @property
    def name(self) -> str:
        return self.quantity.name

    def spec(self) -> str:
        """Canonical parse_monitor string of this monitor (what run records store and resume compares)."""
        parts = [getattr(self.quantity, "spec", self.name), f"every={self.every}"]
        if self.threshold is not None:
            parts.append(self.threshold.spec())
        parts.append(f"action={self.action}")
        return ",".join(parts)

    def describe(self) -> str:
        """Human-readable form for log headers, e.g. 'force_delta every 10 max 5 x start -> stop'."""
        text = f"{self.name} every {self.every}"
        if self.threshold is not None:
            text += f" max {self.threshold.describe()} -> {self.action}"
        return text

    def due(self, step: int) -> bool:
        """True if the monitor runs at this step."""
        return step % self.every == 0

    def limit(self) -> float | None:
        """The current limit (None until a relative threshold has its reference)."""
        t = self.threshold
        if t is None:
            return None
        if t.mode == "absolute":
            return t.value
        if t.mode == "start":
            return t.bound(None if self.reference is None else t.value * self.reference)
        return t.bound(float(np.median(self.history)) * t.value if self.history else None)

    def check(self, atoms: Atoms, step: int, time_fs: float) -> Reading:
        """Evaluate the quantity and compare it with the limit (the limit uses only earlier readings)."""
        value = self.quantity(atoms, time_fs)
        if value is not None and not np.isfinite(value):
            value = float("inf")  # a non-finite UQ value is the worst possible reading
        limit = self.limit()
        breached = value is not None and limit is not None and value > limit
        if value is not None and not breached:
            if self.reference is None:
                self.reference = value
            self.history.append(value)
            window = self.threshold.window if self.threshold else 25
            while len(self.history) > window:
                self.history.popleft()
        return Reading(
            self.name,
            step,
            time_fs,
            value,
            self.quantity.unit,
            limit,
            breached,
            self.action,
        )

    def get_state(self) -> dict:
        """Everything needed to resume this monitor exactly (JSON-able)."""
        state = {"reference": self.reference, "history": list(self.history)}
        if hasattr(self.quantity, "get_state"):
            state["quantity"] = self.quantity.get_state()
        return state

    def set_state(self, state: dict) -> None:
        """Restore what get_state() returned."""
        self.reference = state["reference"]
        self.history = deque(state["history"])
        if "quantity" in state and hasattr(self.quantity, "set_state"):
            self.quantity.set_state(state["quantity"])


def missing_result_error(key: str, available: list[str]) -> SettingError:
    """The SettingError for a key:RESULT monitor whose result the run's model evaluation does not give."""
    return SettingError(
        f"{{monitors}} key:{key}: the calculator gives no result {key!r} for this model and run; "
        f"monitors are force_delta, temperature, energy_drift, bonds or key:RESULT with RESULT one of "
        f"{', '.join(sorted(available))}"
    )


MONITOR_OPTIONS = ("every", "max", "floor", "cap", "window", "action", "reduce")
QUANTITY_NAMES = ("force_delta", "temperature", "energy_drift", "bonds", "key:RESULT")


def parse_monitor(spec: str) -> Monitor:
    """Monitor from 'NAME[,every=N][,max=X|Xxstart|Xxmedian][,floor=F][,cap=C][,window=W][,action=ACTION]'.

    NAME: force_delta, temperature, energy_drift, bonds (covalent bonds broken + formed since the first
    reading), or key:RESULT[,reduce=max|mean|rms] for any
    result of the calculator (per-structure, or per-atom reduced; e.g. key:confidence_error).
    A relative limit (Xxstart, Xxmedian) is kept within [floor, cap]; the cap also holds before
    the reference exists. ACTION: log, snapshot, stop or rollback. Errors are SettingErrors
    naming {monitors}.
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise SettingError("{monitors}: empty specification; example: force_delta,every=10,max=0.5,action=rollback")
    name, options = parts[0], {}
    for part in parts[1:]:
        if "=" not in part:
            raise SettingError(f"{{monitors}} {spec!r}: expected key=value, got {part!r}")
        key, value = part.split("=", 1)
        options[key.strip()] = value.strip()
    unknown = set(options) - set(MONITOR_OPTIONS)
    if unknown:
        raise SettingError(
            f"{{monitors}} {spec!r}: unknown option(s) {', '.join(sorted(unknown))}; use {', '.join(MONITOR_OPTIONS)}"
        )
    if name == "force_delta":
        quantity: Quantity = ResultKey("force_delta", "eV/Å")
    elif name == "temperature":
        quantity = Temperature()
    elif name == "energy_drift":
        quantity = EnergyDrift()
    elif name == "bonds":
        quantity = BondChanges()
    elif name.startswith("key:") and len(name) > 4:
        quantity = ResultKey(name[4:], unit="", needs_conservative=False, reduce=options.get("reduce", "max"))
    else:
        raise SettingError(
            f"{{monitors}} {spec!r}: unknown quantity {name!r}; use {', '.join(QUANTITY_NAMES)}"
        )
    if "reduce" in options and not name.startswith("key:"):
        raise SettingError(f"{{monitors}} {spec!r}: reduce applies to key:RESULT monitors only")
    try:
        every = int(options.get("every", 10))
        window = int(options.get("window", 25))
        floor = float(options["floor"]) if "floor" in options else None
        cap = float(options["cap"]) if "cap" in options else None
        threshold = None
        if "max" in options:
            text = options["max"].lower()
            mode = "absolute"
            for suffix in ("start", "median"):
                if text.endswith("x" + suffix):
                    mode, text = suffix, text[: -len(suffix) - 1]
            threshold = Threshold(float(text), mode, window, floor, cap)
        elif floor is not None or cap is not None:
            raise SettingError(f"{{monitors}} {spec!r}: floor and cap need a relative max (Xxstart or Xxmedian)")
    except ValueError as exc:
        raise SettingError(f"{{monitors}} {spec!r}: {exc}") from exc
    return Monitor(quantity, every=every, threshold=threshold, action=options.get("action", "log"))
