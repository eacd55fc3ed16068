"""One Langevin trajectory driven by a reference method: what a sampling worker runs (it imports no torch).

Velocities are drawn from the Maxwell-Boltzmann distribution at the target temperature T (K), then
`burn_in` steps, then `steps` steps of which every `interval`-th is emitted with its reference labels
(energy eV, forces eV/Å, stress eV/Å³ for periodic cells, already computed by the integrator). The
random numbers come from (seed, structure position, T), so a trajectory is reproducible and does not
depend on which others run beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from ase import Atoms, units
from ase.constraints import FixCom
from ase.md import velocitydistribution
from ase.md.langevin import Langevin

from atomuq.core.errors import InputError
from atomuq.core.io import Record
from atomuq.core.workers import send
from atomuq.reference import ReferenceMethod
from atomuq.reference.labels import attach_labels, compute_labels, error_text


@dataclass(frozen=True)
class SampleSettings:
    """Langevin settings: temperatures in K, timestep in fs, friction in 1/fs, step counts."""

    temperatures: tuple[float, ...]
    steps: int  # MD steps per trajectory after the burn-in
    interval: int  # write every interval-th step
    timestep: float = 0.5  # fs
    friction: float = 0.01  # 1/fs
    burn_in: int = 0  # steps before the first counted step
    seed: int = 0

    @property
    def n_frames(self) -> int:
        """Frames written per trajectory."""
        return self.steps // self.interval

    @property
    def steps_per_trajectory(self) -> int:
        """MD steps run per trajectory, burn-in included."""
        return self.burn_in + self.n_frames * self.interval

    def check(self) -> None:
        """Raise InputError for settings that cannot work."""
        if not self.temperatures:
            raise InputError("give at least one --temperature")
        if any(not np.isfinite(t) or t <= 0 for t in self.temperatures):
            raise InputError(f"temperatures must be positive (K), got {list(self.temperatures)}")
        if self.interval < 1 or self.steps < self.interval:
            raise InputError(f"--steps ({self.steps}) must be at least --interval ({self.interval}) and --interval at least 1")
        if self.burn_in < 0:
            raise InputError(f"--burn-in must be zero or more, got {self.burn_in}")
        if not 0 < self.timestep <= 10:
            raise InputError(f"--timestep must be in (0, 10] fs, got {self.timestep}")
        if self.friction < 0:
            raise InputError(f"--friction must be zero or more (1/fs), got {self.friction}")


@dataclass(frozen=True)
class TrajectorySpec:
    """One (structure, temperature) run."""

    id: int
    position: int  # structure position in the whole input
    temperature: float  # K
    key: str  # fingerprint of input structure, temperature, settings and method


class TrajectoryFailed(Exception):
    """A trajectory stopped by a failed calculation at `step`; `error` is one line."""

    def __init__(self, step: int, error: str) -> None:
        super().__init__(error)
        self.step = step
        self.error = error


def _thermalize(atoms: Atoms, temperature: float, rng: np.random.Generator) -> None:
    fn = getattr(velocitydistribution, "thermalize_momenta", None)  # ASE >= 3.29
    if fn is not None:
        fn(atoms, temperature, rng=rng)
    else:  # pragma: no cover - older ASE
        velocitydistribution.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)


def trajectory_rng(seed: int, position: int, temperature: float) -> np.random.Generator:
    """The random generator of one trajectory, fixed by (seed, structure position, temperature in mK)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(position), int(round(temperature * 1000))]))


def run_trajectory(
    record: Record,
    spec: TrajectorySpec,
    method: ReferenceMethod,
    settings: SampleSettings,
    emit: Callable[[int, Atoms], None],
    advance: Callable[[int], None] | None = None,
) -> None:
    """Run one Langevin trajectory; emit(k, frame) for each labelled frame, advance(n) per n MD steps.

    Raises TrajectoryFailed (with the step) when the calculator fails or returns non-finite values.
    """
    atoms = record.atoms.copy()
    original_constraints = [c.copy() for c in atoms.constraints]
    rng = trajectory_rng(settings.seed, spec.position, spec.temperature)
    _thermalize(atoms, spec.temperature, rng)
    velocitydistribution.Stationary(atoms)
    if not atoms.pbc.any():
        velocitydistribution.ZeroRotation(atoms)
    atoms.set_constraint(original_constraints + [FixCom()])
    step = 0
    try:
        atoms.calc = method.make_calculator()
        dyn = Langevin(atoms, settings.timestep * units.fs, temperature_K=spec.temperature,
                       friction=settings.friction / units.fs, fixcm=False, rng=rng)
        for chunk in _chunks(settings.burn_in, settings.interval):
            dyn.run(chunk)
            step += chunk
            if advance:
                advance(chunk)
        for k in range(settings.n_frames):
            dyn.run(settings.interval)
            step += settings.interval
            if not np.isfinite(atoms.positions).all():
                raise TrajectoryFailed(step, "positions became NaN or infinite")
            results = compute_labels(atoms, atoms.calc)  # cached by the calculator: no new calculation
            frame = atoms.copy()
            frame.set_constraint([c.copy() for c in original_constraints])
            frame.arrays.pop("momenta", None)
            frame = attach_labels(frame, results, method.name)
            frame.info.update(
                temperature=float(spec.temperature), source=f"{record.source}:{record.index}",
                md_trajectory=spec.id, md_frame=k, md_step=step, md_time_fs=step * settings.timestep,
                md_seed=int(settings.seed), kinetic_temperature=float(atoms.get_temperature()),
                sample_key=spec.key,
            )
            emit(k, frame)
            if advance:
                advance(settings.interval)
    except TrajectoryFailed:
        raise
    except Exception as exc:  # a calculator failure ends this trajectory, recorded by the caller
        raise TrajectoryFailed(step, error_text(exc)) from exc


def _chunks(total: int, size: int) -> list[int]:
    return [size] * (total // size) + ([total % size] if total % size else [])


# --------------------------------------------------------------------------------------------
# one trajectory as a task of atomuq.core.workers.run_tasks: frames and progress are sent as they come


def trajectory_task(record: Record, spec: TrajectorySpec, method: ReferenceMethod,
                     settings: SampleSettings) -> tuple[int | None, str | None]:
    """(None, None), or (failed step, error); sends ('frame', trajectory id, k, frame) and ('steps', n)."""
    try:
        run_trajectory(record, spec, method, settings, lambda k, frame: send(("frame", spec.id, k, frame)),
                       lambda n: send(("steps", n)))
    except TrajectoryFailed as exc:
        return exc.step, exc.error
    return None, None
