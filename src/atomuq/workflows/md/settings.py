"""MD settings: what to integrate and how, each value checked with the name of its field.

Errors are SettingError: the message names MDSettings fields as `{field}`; `str(error)` shows
the field names (library use) and `error.render(names)` any other spelling, e.g. the command
line's flags (atomuq.cli.md_commands keeps that map).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from atomuq.core.errors import InputError

ENSEMBLES = ("nve", "nvt", "langevin")
FORCE_MODES = ("direct", "conservative", "mts")
FALLBACKS = ("conservative", "mts")
#: longest time step accepted (fs): beyond this no atomistic MD is stable
MAX_TIMESTEP_FS = 10.0
#: the only setting that may change when a run is resumed (the run is made longer or shorter)
RESUMABLE_CHANGES = ("steps",)

#: names a SettingError may mention besides the MDSettings fields
EXTRA_NAMES = ("trajectory", "monitors", "model", "ltau", "ltau_k", "structure")


class SettingError(InputError):
    """An MD setting that cannot be used; its message names the fields involved as {field}."""

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self.render())

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message with each {field} replaced by names[field] (default: the field name itself)."""
        known = set(setting_names()) | set(EXTRA_NAMES)
        names = names or {}
        return re.sub(r"\{(\w+)\}", lambda m: names.get(m[1], m[1]) if m[1] in known else m[0], self.template)


def _positive(name: str, value: float, unit: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise SettingError(f"{{{name}}} must be a positive number of {unit}, got {value!r}")


def _count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise SettingError(f"{{{name}}} must be {what}, got {value!r}")


@dataclass
class MDSettings:
    """What to integrate and how. Times in fs, temperatures in K, friction in 1/fs.

    fallback: the forces a rollback switches to; None means conservative for monitors with
    action=rollback, and makes the safe default monitors stop rather than roll back.
    """

    ensemble: str = "nve"
    forces: str = "direct"
    timestep_fs: float = 0.5
    steps: int = 1000
    temperature_K: float | None = None
    mts_outer_fs: float | None = None
    mts_inner: int = 4  # 2 fs outer at 0.5 fs: the paper's 4 fs / M = 8 is unstable with H for our model
    tdamp_fs: float = 10.0
    friction_per_fs: float = 0.01
    seed: int = 0
    traj_every: int = 10
    fallback: str | None = None
    max_rollbacks: int = 1

    def validate(self) -> None:
        """SettingError naming the field for anything out of range or inconsistent."""
        if self.ensemble not in ENSEMBLES:
            raise SettingError(f"{{ensemble}} must be one of {', '.join(ENSEMBLES)}, got {self.ensemble!r}")
        if self.forces not in FORCE_MODES:
            raise SettingError(f"{{forces}} must be one of {', '.join(FORCE_MODES)}, got {self.forces!r}")
        _positive("timestep_fs", self.timestep_fs, "fs")
        if self.timestep_fs > MAX_TIMESTEP_FS:
            raise SettingError(
                f"{{timestep_fs}} {self.timestep_fs} fs is far too long for atomistic MD "
                f"(use <= {MAX_TIMESTEP_FS:g} fs; 0.5 fs is the paper's)"
            )
        _count("steps", self.steps, 0)
        _count("mts_inner", self.mts_inner, 1)
        if self.mts_outer_fs is not None:
            _positive("mts_outer_fs", self.mts_outer_fs, "fs")
        _positive("tdamp_fs", self.tdamp_fs, "fs")
        _positive("friction_per_fs", self.friction_per_fs, "1/fs")
        if self.temperature_K is not None and not (
            isinstance(self.temperature_K, (int, float)) and math.isfinite(self.temperature_K) and self.temperature_K >= 0
        ):
            raise SettingError(f"{{temperature_K}} must be a number of K >= 0, got {self.temperature_K!r}")
        if self.ensemble in ("nvt", "langevin") and self.temperature_K is None:
            raise SettingError(f"{{ensemble}} {self.ensemble} needs {{temperature_K}} K")
        if self.fallback is not None and self.fallback not in FALLBACKS:
            raise SettingError(f"{{fallback}} must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}")
        if "mts" in (self.forces, self.fallback) and self.ensemble == "nvt":
            which = "{forces} mts" if self.forces == "mts" else "{fallback} mts"
            raise SettingError(
                f"{which} works with {{ensemble}} nve or langevin (its thermostat); not with nvt (Nosé–Hoover)"
            )
        _count("traj_every", self.traj_every, 1)
        _count("seed", self.seed, 0)
        _count("max_rollbacks", self.max_rollbacks, 0)

    @property
    def fallback_forces(self) -> str:
        """The forces a rollback switches to (conservative unless fallback says otherwise)."""
        return self.fallback or "conservative"

    def step_fs(self, mode: str) -> float:
        """Length of one integrator step (fs) in force mode `mode` (the outer step for MTS)."""
        if mode == "mts":
            return self.mts_outer_fs if self.mts_outer_fs is not None else self.timestep_fs * self.mts_inner
        return self.timestep_fs

    def target_fs(self) -> float:
        """Simulated time the run ends at (fs): steps x the step of the starting force mode."""
        return self.steps * self.step_fs(self.forces)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able) of every field."""
        return asdict(self)


def setting_names() -> tuple[str, ...]:
    """The MDSettings field names."""
    return tuple(f.name for f in fields(MDSettings))


def describe_value(value: Any) -> str:
    """A setting's value as shown in messages (None as 'not set')."""
    return "not set" if value is None else repr(value) if isinstance(value, str) else f"{value}"
