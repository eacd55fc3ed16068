"""Which monitors a run gets: the safe defaults (stop when trust is lost), log only, none, or a custom list.

The safe defaults, checked every SAFE_EVERY steps (MTS: outer steps):

- force_delta (U_Δ, models with a direct force head): trust is lost above FORCE_DELTA_FACTOR x
  its value at the start, the limit kept within [FORCE_DELTA_FLOOR, FORCE_DELTA_CAP] eV/Å (the
  cap holds from step 0: a start above it is refused at once);
- temperature: above TEMPERATURE_FACTOR x the target temperature (temperature_K), or x the
  start temperature when there is no target, and never below TEMPERATURE_FLOOR_K;
- energy_drift: logged only.

On a breach the run stops; it rolls back instead (to the last frame under every limit, and
continues on the fallback forces) when MDSettings.fallback is set and differs from the run's
forces. The log-only plan (the opt-out for studies whose runs must drift) watches the same
quantities without limits. These constants are the one place the defaults are defined; the
CLI's --help and the docs quote them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from atomuq.workflows.md.monitors import EnergyDrift, Monitor, ResultKey, Temperature, Threshold, parse_monitor
from atomuq.workflows.md.settings import MDSettings, SettingError

SAFE_EVERY = 10  # steps between checks
FORCE_DELTA_FACTOR = 5.0  # x the start value of U_Δ
FORCE_DELTA_FLOOR = 0.5  # eV/Å: the limit is never lower (a relaxed start has a tiny U_Δ)
FORCE_DELTA_CAP = 2.0  # eV/Å: the limit is never higher
TEMPERATURE_FACTOR = 3.0  # x the target (or start) temperature
TEMPERATURE_FLOOR_K = 300.0  # K: the limit is never lower

#: how a run's monitors were chosen (recorded in its log and run record)
CHOICES = {
    "safe": "safe defaults (stop when trust is lost)",
    "log": "log only (opted out of the safe defaults)",
    "none": "none",
    "custom": "custom",
}
#: the --monitor words that choose a plan instead of naming a monitor
PLAN_WORDS = ("log", "none")


@dataclass
class MonitorPlan:
    """The monitors of a run and how they were chosen (one of CHOICES)."""

    choice: str
    monitors: list[Monitor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.choice not in CHOICES:
            raise SettingError(f"{{monitors}}: plan must be one of {', '.join(CHOICES)}, got {self.choice!r}")

    def describe(self) -> str:
        """E.g. 'safe defaults (stop when trust is lost): force_delta every 10 max ... -> stop, ...'."""
        listed = ", ".join(m.describe() for m in self.monitors) or "none"
        return listed if self.choice == "custom" else f"{CHOICES[self.choice]}: {listed}"

    def specs(self) -> list[str]:
        """Canonical spec of each monitor (what resume compares)."""
        return [m.spec() for m in self.monitors]


def safe_action(settings: MDSettings) -> str:
    """'rollback' when a fallback other than the run's own forces is set, else 'stop'."""
    return "rollback" if settings.fallback is not None and settings.fallback != settings.forces else "stop"


def safe_monitors(settings: MDSettings, has_direct_forces: bool) -> list[Monitor]:
    """The safe default monitors for these settings (see the module docstring for the limits)."""
    action = safe_action(settings)
    monitors = []
    if has_direct_forces:
        limit = Threshold(FORCE_DELTA_FACTOR, "start", floor=FORCE_DELTA_FLOOR, cap=FORCE_DELTA_CAP)
        monitors.append(Monitor(ResultKey("force_delta", "eV/Å"), SAFE_EVERY, limit, action))
    target = settings.temperature_K
    if target:
        limit = Threshold(max(TEMPERATURE_FACTOR * target, TEMPERATURE_FLOOR_K))
    else:
        limit = Threshold(TEMPERATURE_FACTOR, "start", floor=TEMPERATURE_FLOOR_K)
    monitors.append(Monitor(Temperature(), SAFE_EVERY, limit, action))
    monitors.append(Monitor(EnergyDrift(), SAFE_EVERY))
    return monitors


def log_monitors(has_direct_forces: bool) -> list[Monitor]:
    """U_Δ (with a direct head), energy drift and temperature every SAFE_EVERY steps, logged only."""
    quantities = [ResultKey("force_delta", "eV/Å")] if has_direct_forces else []
    quantities += [EnergyDrift(), Temperature()]
    return [Monitor(q, SAFE_EVERY) for q in quantities]


def plan_from_specs(specs: Sequence[str] | None, settings: MDSettings, has_direct_forces: bool) -> MonitorPlan:
    """The plan for --monitor values: none given: safe defaults; 'log': log only; 'none': no monitors;
    otherwise exactly the monitors given (parse_monitor syntax)."""
    specs = [s.strip() for s in specs or [] if s.strip()]
    if not specs:
        return MonitorPlan("safe", safe_monitors(settings, has_direct_forces))
    words = [s for s in specs if s in PLAN_WORDS]
    if words and len(specs) > 1:
        raise SettingError(f"{{monitors}} {words[0]} stands alone: it cannot be combined with other monitors")
    if specs == ["log"]:
        return MonitorPlan("log", log_monitors(has_direct_forces))
    if specs == ["none"]:
        return MonitorPlan("none", [])
    return MonitorPlan("custom", [parse_monitor(s) for s in specs])


def resolve_plan(
    monitors: MonitorPlan | Sequence[Monitor] | None, settings: MDSettings, has_direct_forces: bool
) -> MonitorPlan:
    """A plan from what MDRun was given: None: the safe defaults; a list: exactly those ('none' if empty)."""
    if isinstance(monitors, MonitorPlan):
        return monitors
    if monitors is None:
        return MonitorPlan("safe", safe_monitors(settings, has_direct_forces))
    monitors = list(monitors)
    return MonitorPlan("custom" if monitors else "none", monitors)


def check_plan_for_model(plan: MonitorPlan, has_direct_forces: bool) -> None:
    """SettingError when a monitor of the plan needs what the model lacks (force_delta: a direct force head)."""
    for m in plan.monitors:
        if m.quantity.name == "force_delta" and not has_direct_forces:
            raise SettingError(
                "{monitors} force_delta needs a model with a direct force head; this one is conservative-only"
            )
