"""The MD workflow's public entry points, gathered from the modules that implement them.

settings.py (MDSettings, SettingError), integrators.py (calculators, velocities, ASE dynamics),
monitor_plan.py (safe defaults, log-only, custom), driver.py (MDRun, the loop), protocol.py
(PaperPreset, run_paper_protocol, relax). Import from here or from those modules.
"""

from atomuq.workflows.md.driver import MDRun, RunResult
from atomuq.workflows.md.integrators import init_velocities, make_calculator, make_dynamics
from atomuq.workflows.md.monitor_plan import MonitorPlan, log_monitors, plan_from_specs, safe_monitors
from atomuq.workflows.md.protocol import PaperPreset, relax, run_paper_protocol
from atomuq.workflows.md.settings import ENSEMBLES, FALLBACKS, FORCE_MODES, MDSettings, SettingError

__all__ = [
    "ENSEMBLES", "FALLBACKS", "FORCE_MODES", "MDRun", "MDSettings", "MonitorPlan", "PaperPreset", "RunResult",
    "SettingError", "init_velocities", "log_monitors", "make_calculator", "make_dynamics", "plan_from_specs",
    "relax", "run_paper_protocol", "safe_monitors",
]
