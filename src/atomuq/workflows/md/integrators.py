"""The ASE pieces of a run: the calculator of a force mode, initial velocities, and the dynamics object
(VelocityVerlet, Nosé–Hoover chain NVT, Langevin, or MTS from mts.py) with its state for resume."""

from __future__ import annotations

import warnings

import numpy as np
from ase import Atoms, units
from ase.md.langevin import Langevin
from ase.md.md import MolecularDynamics
from ase.md.nose_hoover_chain import NoseHooverChainNVT
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from atomuq.calculator import AtomuqCalculator
from atomuq.models.protocol import AtomisticModel
from atomuq.uq.ltau.estimator import LTAUEstimator
from atomuq.workflows.md.mts import MultipleTimeStepping
from atomuq.workflows.md.settings import MDSettings, SettingError


def check_force_mode(model: AtomisticModel, mode: str) -> None:
    """SettingError when force mode `mode` (direct, mts) needs a direct force head the model lacks."""
    if mode in ("direct", "mts") and not model.has_direct_forces:
        raise SettingError(f"{{forces}} {mode} needs a model with a direct force head; this one is conservative-only")


def make_calculator(
    model: AtomisticModel, mode: str, ltau: LTAUEstimator | None = None, ltau_k: int = 1
) -> AtomuqCalculator:
    """Calculator for a force mode; the backward pass runs only where needed (direct and MTS).

    With an LTAU estimator the calculator also gives ltau_* results (for `key:ltau_uncertainty` monitors).
    """
    check_force_mode(model, mode)
    forces = "conservative" if mode == "conservative" else "direct"
    return AtomuqCalculator(model, forces=forces, conservative="on_demand", ltau=ltau, ltau_k=ltau_k)


def init_velocities(atoms: Atoms, temperature_K: float, seed: int) -> None:
    """Maxwell-Boltzmann momenta at temperature_K (K), no centre-of-mass motion or rotation (molecules)."""
    with warnings.catch_warnings():  # ASE 3.29 renames it thermalize_momenta; older ASE lacks that name
        warnings.simplefilter("ignore", DeprecationWarning)
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)


def make_dynamics(atoms: Atoms, settings: MDSettings, mode: str) -> MolecularDynamics:
    """The ASE integrator for an ensemble and force mode (atoms must carry the calculator)."""
    dt = settings.step_fs(mode) * units.fs
    rng = np.random.default_rng(settings.seed + 1)
    friction = settings.friction_per_fs / units.fs
    if mode == "mts":
        if settings.ensemble == "langevin":
            return MultipleTimeStepping(
                atoms, dt, settings.mts_inner, thermostat="langevin", temperature_K=settings.temperature_K,
                friction=friction, rng=rng,
            )
        return MultipleTimeStepping(atoms, dt, settings.mts_inner)
    if settings.ensemble == "nve":
        return VelocityVerlet(atoms, dt)
    if settings.ensemble == "nvt":
        return NoseHooverChainNVT(atoms, dt, temperature_K=settings.temperature_K, tdamp=settings.tdamp_fs * units.fs)
    return Langevin(atoms, dt, temperature_K=settings.temperature_K, friction=friction, fixcm=False, rng=rng)


def dynamics_state(dyn: MolecularDynamics) -> dict:
    """Integrator state beyond positions and momenta (JSON-able)."""
    if isinstance(dyn, NoseHooverChainNVT):
        th = dyn._thermostat
        return {"nhc_eta": th._eta.tolist(), "nhc_p_eta": th._p_eta.tolist()}
    if isinstance(dyn, Langevin):
        return {"rng": dyn.rng.bit_generator.state}
    if isinstance(dyn, MultipleTimeStepping):
        return dyn.get_state()
    return {}


def restore_dynamics_state(dyn: MolecularDynamics, state: dict) -> None:
    """Inverse of dynamics_state."""
    if isinstance(dyn, NoseHooverChainNVT) and "nhc_eta" in state:
        dyn._thermostat._eta[:] = state["nhc_eta"]
        dyn._thermostat._p_eta[:] = state["nhc_p_eta"]
    elif isinstance(dyn, Langevin) and "rng" in state:
        dyn.rng.bit_generator.state = state["rng"]
    elif isinstance(dyn, MultipleTimeStepping):
        dyn.set_state(state)
