"""Multiple time stepping (MTS) for models with a direct and a conservative force head, as an ASE integrator."""

from __future__ import annotations

import numpy as np
from ase import Atoms, units
from ase.md.md import MolecularDynamics


class MultipleTimeStepping(MolecularDynamics):
    """Multiple-time-stepping velocity Verlet: cheap direct forces inside, conservative forces outside.

    Bigi, Langer and Ceriotti (2025), "The dark side of the forces: assessing non-conservative
    force models for atomistic machine learning" (ICML 2025). The direct (non-conservative) force
    F_nc is cheap (one forward pass) but is not the gradient of any energy, so NVE with it drifts;
    the conservative force F_c = -dE/dr is exact but needs a backward pass. Per outer step dt:

    1. half kick with the slow correction:  p += dt/2 (F_c - F_nc)(q)
    2. `inner` velocity-Verlet steps of dt/inner on F_nc
    3. closing half kick:                   p += dt/2 (F_c - F_nc)(q')

    The composite step is time-reversible and follows the conservative energy surface on the
    outer time scale, so the energy E + K of the model is conserved (up to the integration
    error) while most force evaluations are direct. With inner=1 it is velocity Verlet on F_c
    exactly. Cost per outer step: inner - 1 direct-only evaluations plus one evaluation that
    returns both forces (one forward + backward pass with AtomuqCalculator(conservative="on_demand")).
    Reference setting of the paper: dt = 4 fs, inner = 8.

    Forces are read from the attached calculator's results: `fast_key` (default
    "forces_direct") and `slow_key` (default "forces_conservative"); any ASE calculator that
    offers both keys works.

    thermostat: None (NVE) or "langevin": an exact Ornstein-Uhlenbeck velocity update of
    dt/2 before and after each outer step (OBABO splitting around the MTS propagator), with
    `friction` in 1/(ASE time) and `temperature_K`. The random stream is `rng`
    (numpy Generator); get_state()/set_state() save and restore it with the thermostat, so a
    resumed run continues the same stream.

    Use it like VelocityVerlet: MultipleTimeStepping(atoms, timestep=4 * units.fs, inner=8),
    attach observers and trajectories, dyn.run(steps) (steps count outer steps; get_time()
    is nsteps * timestep).
    """

    def __init__(
        self,
        atoms: Atoms,
        timestep: float,
        inner: int = 8,
        *,
        thermostat: str | None = None,
        temperature_K: float | None = None,
        friction: float | None = None,
        rng: np.random.Generator | int | None = None,
        fast_key: str = "forces_direct",
        slow_key: str = "forces_conservative",
        **kwargs,
    ) -> None:
        if int(inner) != inner or inner < 1:
            raise ValueError(
                f"inner must be a positive integer (inner steps per outer step), got {inner!r}"
            )
        if thermostat not in (None, "langevin"):
            raise ValueError(
                f"thermostat must be None or 'langevin', got {thermostat!r}"
            )
        if thermostat == "langevin" and (
            temperature_K is None or friction is None or friction <= 0
        ):
            raise ValueError(
                "the langevin thermostat needs temperature_K and a positive friction (1/ASE time)"
            )
        self.inner = int(inner)
        self.thermostat = thermostat
        self.temperature_K = temperature_K
        self.friction = friction
        self.rng = (
            rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        )
        self.fast_key = fast_key
        self.slow_key = slow_key
        super().__init__(atoms, timestep, **kwargs)

    def todict(self) -> dict:
        d = super().todict()
        d.update(
            inner=self.inner,
            thermostat=self.thermostat,
            temperature_K=self.temperature_K,
            friction=self.friction,
        )
        return d

    # -- forces -------------------------------------------------------------------------------

    def _forces(self, key: str) -> np.ndarray:
        """Forces `key` (eV/Å) at the current positions, constraints applied."""
        forces = np.array(self.atoms.calc.get_property(key, self.atoms), dtype=float)
        for constraint in self.atoms.constraints:
            constraint.adjust_forces(self.atoms, forces)
        return forces

    def _both_forces(self) -> tuple[np.ndarray, np.ndarray]:
        """(F_nc, F_c) at the current positions from one evaluation (slow key asked first)."""
        slow = self._forces(self.slow_key)
        return self._forces(self.fast_key), slow

    # -- thermostat ---------------------------------------------------------------------------

    def _ou(self, p: np.ndarray, duration: float) -> np.ndarray:
        """Exact Ornstein-Uhlenbeck update of momenta over `duration` (Langevin thermostat)."""
        c1 = np.exp(-self.friction * duration)
        kT = units.kB * self.temperature_K
        noise = self.rng.standard_normal(size=p.shape)
        return c1 * p + np.sqrt((1.0 - c1**2) * kT * self.masses) * noise

    def get_state(self) -> dict:
        """The integrator's own state beyond positions and momenta (JSON-serialisable)."""
        return {"rng": self.rng.bit_generator.state} if self.thermostat else {}

    def set_state(self, state: dict) -> None:
        """Restore what get_state() returned."""
        if self.thermostat and "rng" in state:
            self.rng.bit_generator.state = state["rng"]

    # -- one outer step -----------------------------------------------------------------------

    def step(self) -> None:
        atoms = self.atoms
        dt, m = self.dt, self.masses
        h = dt / self.inner
        p = atoms.get_momenta()
        if self.thermostat:
            p = self._ou(p, dt / 2)
        f_nc, f_c = self._both_forces()
        p += 0.5 * dt * (f_c - f_nc)
        for k in range(self.inner):
            p += 0.5 * h * f_nc
            r = atoms.get_positions()
            atoms.set_positions(r + h * p / m)
            if atoms.constraints:
                p = (atoms.get_positions() - r) * m / h
            atoms.set_momenta(p, apply_constraint=False)
            if k < self.inner - 1:
                f_nc = self._forces(self.fast_key)
            else:
                f_nc, f_c = self._both_forces()
            p += 0.5 * h * f_nc
        p += 0.5 * dt * (f_c - f_nc)
        if self.thermostat:
            p = self._ou(p, dt / 2)
        atoms.set_momenta(p)
