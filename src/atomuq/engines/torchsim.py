"""torch-sim integration (design.md, layer `engines`): any atomuq model as a torch-sim model, and batched MD of many
systems at once with atomuq's MD monitors checked per system.

- TorchSimModel(model, forces): a torch_sim ModelInterface around any AtomisticModel (native or adapter) through
  the one model protocol. forward(state) gives energy (B,) eV, forces (N, 3) eV/Å and, with compute_stress, stress
  (B, 3, 3) eV/Å³ (ASE's sign). forces="direct" uses the model's force head, "conservative" -dE/dr by autograd
  (models.derivatives.evaluate, the one place derivatives are taken). In direct mode the backward pass runs only
  after request_conservative() (conservative="on_demand", as AtomuqCalculator), so a step costs one forward pass
  and a step whose Force Delta is monitored one forward + backward; the last evaluation is kept (last, last_batch).
- BatchedMD(structures, model, settings, monitors): torch-sim's nve or nvt_langevin integrator over every system
  in one batch. The monitors are atomuq md's own (monitor_plan: the safe defaults when none are given, or
  parse_monitor specs), copied once per system, each checked every `every` steps on its own system's values with
  its own threshold state. A breach with action=stop takes that system out of the batch (its last frame and the
  reason are kept) while the others go on; log and snapshot breaches flag the system (SystemResult.flags) and it
  continues. A system whose energy or forces become non-finite is stopped at once. rollback is atomuq md's (ASE).

Units and conventions: torch-sim's metal units are ASE's (Å, eV, amu, time in units of sqrt(amu Å²/eV)), so
momenta move between ASE atoms and torch-sim states unchanged; torch-sim stores cells as columns (state.cell is the
transpose of ASE's rows). A system's velocities are its atoms' momenta, or, where it has none, Maxwell-Boltzmann
at settings.temperature_K drawn as atomuq md draws them (init_velocities) with seed settings.seed + its index.
Needs the optional extra atomuq[torchsim] (torch-sim-atomistic 0.3 on Python 3.11).
"""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read

from atomuq.calculator import AtomuqCalculator
from atomuq.core.batch import Batch, scatter_sum
from atomuq.core.errors import InputError
from atomuq.core.io import Record, atomic_path, records_sha256
from atomuq.core.paths import check_output_file
from atomuq.core.schema import prepare_results
from atomuq.core.validate import DEFAULT_MIN_DISTANCE, check_structure
from atomuq.models.adapters import require
from atomuq.models.derivatives import Prediction, evaluate
from atomuq.models.protocol import AtomisticModel
from atomuq.models.provenance import model_provenance
from atomuq.workflows.md.integrators import check_force_mode, init_velocities
from atomuq.workflows.md.monitor_plan import MonitorPlan, check_plan_for_model, resolve_plan
from atomuq.workflows.md.monitors import Monitor, Reading, ResultKey, missing_result_error
from atomuq.workflows.md.run_record import build_record, check_resume, load_document
from atomuq.workflows.md.settings import MDSettings, SettingError
from atomuq.workflows.md.trajectory import frame_text
from atomuq.workflows.score import prediction_results
from atomuq.workflows.train.augment import voigt_to_matrix

ts = require("torch_sim", "torchsim")
from torch_sim.integrators.md import MDState  # noqa: E402
from torch_sim.models.interface import ModelInterface  # noqa: E402

#: the settings.ensemble values a torch-sim run integrates, and torch-sim's integrator for each
ENSEMBLES = {"nve": ts.nve, "langevin": ts.nvt_langevin}
CHECKPOINT_FORMAT = "atomuq-torchsim-run"
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------------- the model


def _field(state: Any, name: str) -> Any:
    return state[name] if isinstance(state, Mapping) else getattr(state, name)


def state_to_batch(state: Any) -> Batch:
    """An atomuq Batch (ASE row cells, Å) of a torch-sim SimState or state dict (column cells)."""
    positions = _field(state, "positions")
    system_idx = _field(state, "system_idx").long()
    cell = _field(state, "cell").mT  # torch-sim columns -> ASE rows
    n_systems = cell.shape[0]
    pbc = bool(_field(state, "pbc"))
    return Batch(
        positions=positions,
        numbers=_field(state, "atomic_numbers").long(),  # torch-sim's io gives int32
        cell=cell,
        pbc=torch.full((n_systems, 3), pbc, dtype=torch.bool, device=positions.device),
        structure_index=system_idx,
        atoms_per_structure=torch.bincount(system_idx, minlength=n_systems),
        fixed=torch.zeros(positions.shape[0], dtype=torch.bool, device=positions.device),
    )


class TorchSimModel(ModelInterface):
    """Any atomuq model as a torch-sim model: energy (B,) eV, forces (N, 3) eV/Å, stress (B, 3, 3) eV/Å³.

    forces: "direct" (the force head; default for a model with one) or "conservative" (-dE/dr).
    conservative: "on_demand" (direct mode runs the backward pass only after request_conservative()) or "always".
    dtype: the dtype of the outputs and so of torch-sim's state (the model computes in its own dtype).
    compute_stress: also return stress, periodic systems only (the direct stress head in direct mode where the model
    has one, else the virial stress).
    """

    def __init__(
        self,
        model: AtomisticModel,
        forces: str | None = None,
        *,
        compute_stress: bool = False,
        conservative: str = "on_demand",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        forces = forces or ("direct" if model.has_direct_forces else "conservative")
        if forces not in ("direct", "conservative"):
            raise ValueError(f"forces must be 'direct' or 'conservative', got {forces!r}")
        if forces == "direct" and not model.has_direct_forces:
            raise ValueError("forces='direct' needs a model with a direct force head; this one is conservative-only")
        if conservative not in ("always", "on_demand"):
            raise ValueError(f"conservative must be 'always' or 'on_demand', got {conservative!r}")
        self.model = model
        self.force_mode = forces
        self.conservative_policy = conservative
        self._device = model.device
        self._dtype = dtype
        self._compute_stress = compute_stress
        self._compute_forces = True
        self._conservative_requested = False
        #: the last evaluation (detached) and the batch it was made on
        self.last: Prediction | None = None
        self.last_batch: Batch | None = None

    def request_conservative(self) -> None:
        """Make the next evaluation also compute conservative forces (for the Force Delta; one-shot)."""
        self._conservative_requested = True

    def forward(self, state: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Energy (B,) eV, forces (N, 3) eV/Å and, with compute_stress, stress (B, 3, 3) eV/Å³ of a torch-sim state."""
        batch = state_to_batch(state)
        backward = (self.force_mode == "conservative" or self.conservative_policy == "always"
                    or self._conservative_requested)
        self._conservative_requested = False
        if self._compute_stress and not bool(_field(state, "pbc")):
            raise ValueError("stress is defined only for periodic systems: build the model with compute_stress=False")
        pred = evaluate(self.model, batch, conservative=backward, stress=self._compute_stress).detach()
        self.last, self.last_batch = pred, batch
        forces = pred.forces_direct if self.force_mode == "direct" else pred.forces_conservative
        out = {"energy": pred.energy.to(self._dtype), "forces": forces.to(self._dtype)}
        if self._compute_stress:
            direct = self.force_mode == "direct" and pred.stress_direct is not None
            out["stress"] = voigt_to_matrix(pred.stress_direct if direct else pred.stress_virial).to(self._dtype)
        return out


# --------------------------------------------------------------------------------------------- batched MD


@dataclass
class SystemResult:
    """How one system of a batched run ended: status "completed" or "stopped" (reason says why), at step / time_fs.

    atoms: its last frame (for a stopped system the frame of the breach), with the run's result keys (epot, etot,
    temperature, the monitored values, ...) and energy / forces readable the ASE way; readings: every monitor reading
    of this system; snapshots: frames of breaches with action=snapshot.
    """

    index: int
    where: str
    status: str
    step: int
    time_fs: float
    reason: str | None
    atoms: Atoms
    readings: list[Reading] = field(default_factory=list)
    snapshots: list[Atoms] = field(default_factory=list)

    @property
    def flags(self) -> list[Reading]:
        """The readings that breached their limit (any action)."""
        return [r for r in self.readings if r.breached]


def _frame_to_text(atoms: Atoms) -> str:
    """A frame as full-precision extended XYZ text (positions, momenta, forces, energy, info)."""
    calc = atoms.calc
    forces = calc.results.get("forces") if calc is not None else None
    energy = calc.results.get("energy") if calc is not None else None
    return frame_text(atoms, dict(atoms.info), forces, energy)


def _frame_from_text(text: str) -> Atoms:
    return read(io.StringIO(text), format="extxyz")


class BatchedMD:
    """A batched torch-sim MD run of many systems with atomuq's monitors per system (see the module docstring).

    settings: MDSettings with ensemble nve or langevin and forces direct or conservative (timestep_fs, steps,
    temperature_K, friction_per_fs, seed, traj_every are used). monitors: None gives atomuq md's safe defaults, a
    list exactly those, a MonitorPlan also how they were chosen. trajectory: an extended XYZ file that gets every
    running system's frame every traj_every steps and each stopped system's last frame (info source_index: the
    system's index in `structures`). checkpoint: a JSON file written every checkpoint_every steps and at the end;
    resume=True continues from it exactly (same path as an uninterrupted run) and refuses changed settings (only
    steps may change). dtype: precision of the integration (the model computes in its own dtype).
    """

    def __init__(
        self,
        structures: Sequence[Atoms],
        model: AtomisticModel,
        settings: MDSettings,
        monitors: MonitorPlan | Sequence[Monitor] | None = None,
        *,
        trajectory: str | Path | None = None,
        checkpoint: str | Path | None = None,
        checkpoint_every: int = 100,
        resume: bool = False,
        say: Callable[[str], None] = print,
        source: str = "structures",
        model_name: str | None = None,
        min_distance: float = DEFAULT_MIN_DISTANCE,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        settings.validate()
        if settings.ensemble not in ENSEMBLES:
            raise SettingError(f"{{ensemble}} {settings.ensemble} is not available in torch-sim runs; use "
                               f"{' or '.join(ENSEMBLES)} (Nosé–Hoover NVT runs in atomuq md)")
        if settings.forces not in ("direct", "conservative"):
            raise SettingError(f"{{forces}} {settings.forces} is not available in torch-sim runs; use direct or "
                               "conservative (MTS runs in atomuq md)")
        if settings.fallback is not None:
            raise SettingError("{fallback}: torch-sim runs stop a system instead of rolling back; leave it unset "
                               "(rollback runs in atomuq md)")
        if int(checkpoint_every) != checkpoint_every or checkpoint_every < 1:
            raise SettingError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
        check_force_mode(model, settings.forces)
        direct = model.has_direct_forces
        self.plan = resolve_plan(monitors, settings, direct)
        check_plan_for_model(self.plan, direct)
        for m in self.plan.monitors:
            if m.action == "rollback":
                raise SettingError(f"{{monitors}} {m.spec()}: torch-sim runs do not roll back; use action=stop "
                                   "(it stops that system and the others go on) or atomuq md")
        if len(structures) == 0:
            raise InputError(f"{source}: no structures to run")
        self.where = [f"{source} structure {i}" for i in range(len(structures))]
        for atoms, where in zip(structures, self.where):
            check_structure(atoms, where, model.elements, min_distance)
        periodic = [bool(a.pbc.all()) for a in structures]
        for atoms, where in zip(structures, self.where):
            if atoms.constraints:
                raise InputError(f"{where}: has constraints ({', '.join(type(c).__name__ for c in atoms.constraints)}), "
                                 "which torch-sim 0.3 runs do not apply; remove them or run it with atomuq md")
            if atoms.pbc.any() and not atoms.pbc.all():
                raise InputError(f"{where}: pbc {atoms.pbc.tolist()}: torch-sim runs systems periodic along all "
                                 "three axes or along none")
        if len(set(periodic)) > 1:
            k = periodic.index(not periodic[0])
            kinds = {True: "periodic", False: "not periodic"}
            raise InputError(f"{self.where[k]} is {kinds[periodic[k]]} but {self.where[0]} is {kinds[periodic[0]]}: "
                             "one torch-sim batch holds periodic systems or molecules, not both; run two batches")
        self.trajectory = Path(trajectory) if trajectory is not None else None
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        if self.trajectory is not None:
            check_output_file(self.trajectory, "trajectory")
            if self.trajectory.suffix.lower() not in (".extxyz", ".xyz"):
                raise InputError(f"trajectory {self.trajectory}: a batched run writes extended XYZ (.extxyz, .xyz)")
        if self.checkpoint is not None:
            check_output_file(self.checkpoint, "checkpoint")
        if self.checkpoint is not None and self.trajectory is not None and self.checkpoint == self.trajectory:
            raise InputError(f"checkpoint {self.checkpoint}: is also the trajectory; give two names")
        self.settings, self.model, self.say = settings, model, say
        self.checkpoint_every = int(checkpoint_every)
        self.provenance = model_provenance(model, model_name)
        self.record = build_record(settings, self.plan, model, model_name, f"{len(structures)} {source} (torch-sim)")
        self.record["engine"] = "torch-sim"
        self.record["compare"]["structure"] = records_sha256(
            [Record(a, source, i) for i, a in enumerate(structures)])
        self.structures = [a.copy() for a in structures]
        for atoms, where, i in zip(self.structures, self.where, range(len(structures))):
            atoms.calc = None
            p = atoms.get_momenta()
            if not np.isfinite(p).all():
                raise InputError(f"{where}: momenta are NaN or infinite")
            if not np.any(p):
                if settings.temperature_K is None:
                    raise SettingError(f"{where} has no momenta: give {{temperature_K}} K to draw "
                                       "Maxwell-Boltzmann velocities")
                init_velocities(atoms, settings.temperature_K, settings.seed + i)
        #: the structures without their own info and arrays: frames carry the run's keys only
        self._bare = [Atoms(a.numbers, a.positions, cell=a.cell, pbc=a.pbc, masses=a.get_masses())
                      for a in self.structures]
        self.dtype = dtype
        self.wrapper = TorchSimModel(model, settings.forces, dtype=dtype)
        kT = torch.tensor((settings.temperature_K or 0.0) * units.kB, dtype=dtype, device=model.device)
        dt = torch.tensor(settings.timestep_fs * units.fs, dtype=dtype, device=model.device)
        if settings.ensemble == "langevin":
            gamma = torch.tensor(settings.friction_per_fs / units.fs, dtype=dtype, device=model.device)
            self._init_fn, self._update_fn = ts.nvt_langevin(model=self.wrapper, dt=dt, kT=kT, gamma=gamma)
        else:
            self._init_fn, self._update_fn = ts.nve(model=self.wrapper, dt=dt, kT=kT)
        n = len(self.structures)
        self.monitors: list[list[Monitor]] = [copy.deepcopy(self.plan.monitors) for _ in range(n)]
        self.readings: list[list[Reading]] = [[] for _ in range(n)]
        self.snapshots: list[list[Atoms]] = [[] for _ in range(n)]
        self.done: dict[int, SystemResult] = {}
        self.active = list(range(n))
        self.step = 0
        self._last_values: list[dict[str, float]] = [{} for _ in range(n)]
        self._rng_state: dict[str, list[int]] | None = None
        self._trajectory_bytes = 0
        self._resumed = False
        if resume and self.checkpoint is not None and self.checkpoint.is_file():
            self._load_checkpoint()
        elif resume:
            say(f"resume: {self.checkpoint or 'no checkpoint file given'} does not exist yet; starting a new run")

    # -- state -------------------------------------------------------------------------------------

    @property
    def time_fs(self) -> float:
        """Simulated time now (fs)."""
        return self.step * self.settings.timestep_fs

    def _state_of(self, indices: Sequence[int], positions: np.ndarray | None = None,
                  momenta: np.ndarray | None = None) -> MDState:
        """An MDState of the given systems (positions, momenta: concatenated, else the structures' own)."""
        chosen = [self.structures[i] for i in indices]
        device, dtype = self.model.device, self.dtype
        t = lambda x, dt=dtype: torch.as_tensor(np.asarray(x), dtype=dt, device=device)  # noqa: E731
        sizes = [len(a) for a in chosen]
        positions = np.concatenate([a.positions for a in chosen]) if positions is None else positions
        momenta = np.concatenate([a.get_momenta() for a in chosen]) if momenta is None else momenta
        n = sum(sizes)
        return MDState(
            positions=t(positions),
            momenta=t(momenta),
            energy=torch.zeros(len(chosen), dtype=dtype, device=device),
            forces=torch.zeros((n, 3), dtype=dtype, device=device),
            masses=t(np.concatenate([a.get_masses() for a in chosen])),
            cell=t(np.stack([a.cell.array.T for a in chosen])),
            pbc=bool(chosen[0].pbc.all()),
            atomic_numbers=t(np.concatenate([a.numbers for a in chosen]), torch.long),
            system_idx=torch.repeat_interleave(torch.arange(len(chosen), device=device),
                                               torch.as_tensor(sizes, device=device)),
        )

    def _needs_conservative(self, step: int) -> bool:
        if self.wrapper.force_mode == "conservative":
            return False
        return any(m.due(step) and (m.quantity.needs_conservative or (
            isinstance(m.quantity, ResultKey) and m.quantity.key in AtomuqCalculator.CONSERVATIVE_RESULTS))
            for m in self.plan.monitors)

    # -- monitoring ------------------------------------------------------------------------------

    def _per_system(self, state: MDState) -> dict[str, np.ndarray]:
        """Per running system: epot, ekin, etot (eV), temperature (K), finite (energy and forces); per atom, split."""
        n_sys = state.n_systems
        p, m = state.momenta, state.masses
        ekin = scatter_sum(0.5 * (p**2).sum(-1) / m, state.system_idx, n_sys)
        sizes = state.n_atoms_per_system.to(ekin.dtype)
        finite_atoms = torch.isfinite(state.forces).all(-1).to(state.dtype)
        finite = (scatter_sum(finite_atoms, state.system_idx, n_sys) == sizes) & torch.isfinite(state.energy)
        epot = state.energy
        return {
            "epot": epot.cpu().numpy(),
            "ekin": ekin.cpu().numpy(),
            "etot": (epot + ekin).cpu().numpy(),
            "temperature": (2.0 * ekin / (3.0 * sizes * units.kB)).cpu().numpy(),
            "finite": finite.cpu().numpy(),
        }

    def _frames(self, state: MDState, results: list[dict[str, Any]] | None, event: str | None = None
                ) -> list[Atoms]:
        """One frame per running system: positions, momenta, energy / forces the ASE way and the run's info keys."""
        positions = state.positions.detach().cpu().numpy()
        momenta = state.momenta.detach().cpu().numpy()
        forces = state.forces.detach().cpu().numpy()
        ptr = np.concatenate([[0], np.cumsum(state.n_atoms_per_system.cpu().numpy())])
        values = self._per_system(state)
        frames = []
        for pos, i in enumerate(self.active):
            sl = slice(ptr[pos], ptr[pos + 1])
            atoms = self._bare[i].copy()
            atoms.positions = positions[sl]
            atoms.set_momenta(momenta[sl], apply_constraint=False)
            info: dict[str, Any] = {"step": self.step, "time_fs": round(self.time_fs, 9),
                                    "force_mode": self.wrapper.force_mode, "source_index": i}
            if event:
                info["event"] = event
            if values["finite"][pos]:
                info.update({k: float(values[k][pos]) for k in ("epot", "ekin", "etot", "temperature")})
                info.update({k: v for k, v in self._last_values[i].items() if np.isfinite(v)})
                info.update({"energy": float(values["epot"][pos]), "forces": forces[sl]})
            prepared = prepare_results(info, self.provenance, len(atoms))
            atoms.info.update(prepared.info)
            atoms.arrays.update(prepared.arrays)
            if prepared.calculator:
                atoms.calc = SinglePointCalculator(atoms, **prepared.calculator)
            if results is not None and values["finite"][pos] and atoms.calc is not None:
                atoms.calc.results.update({k: v for k, v in results[pos].items() if k not in atoms.calc.results})
            frames.append(atoms)
        return frames

    def _check(self, state: MDState) -> set[int]:
        """Run the due monitors on every running system; returns the batch positions of the systems to stop."""
        values = self._per_system(state)
        stop: dict[int, str] = {}
        snapshot: list[int] = []
        for pos in range(len(self.active)):
            if not values["finite"][pos]:
                stop[pos] = f"non-finite energy or forces at step {self.step} (t = {self.time_fs:g} fs)"
        due = [k for k, m in enumerate(self.plan.monitors) if m.due(self.step)]
        if due:
            pred, batch = self.wrapper.last, self.wrapper.last_batch
            results = prediction_results(self.model, batch, pred, self.wrapper.force_mode)
            frames = self._frames(state, results)
            for pos, i in enumerate(self.active):
                if pos in stop:
                    continue
                self._last_values[i] = {}
                breaches = []
                for k in due:
                    reading = self.monitors[i][k].check(frames[pos], self.step, self.time_fs)
                    self.readings[i].append(reading)
                    if reading.value is not None:
                        self._last_values[i][reading.monitor] = reading.value
                    if reading.breached:
                        self.say(f"{self.where[i]}: {reading.line().strip()}")
                        if reading.action == "stop":
                            breaches.append(reading.reason())
                        elif reading.action == "snapshot":
                            snapshot.append(pos)
                if breaches:
                    stop[pos] = "; ".join(breaches)
        if snapshot:
            snapshot_frames = self._frames(state, None, event="snapshot")
            for pos in snapshot:
                self.snapshots[self.active[pos]].append(snapshot_frames[pos])
        if stop:
            stopped_frames = self._frames(state, None, event="stop")
            for pos, reason in stop.items():
                i = self.active[pos]
                frame = stopped_frames[pos]
                self.done[i] = SystemResult(i, self.where[i], "stopped", self.step, self.time_fs, reason, frame,
                                            self.readings[i], self.snapshots[i])
                self.say(f"{self.where[i]}: stopped at step {self.step}: {reason}")
                self._write_frames([frame])
        return set(stop)

    # -- files -----------------------------------------------------------------------------------

    def _write_frames(self, frames: list[Atoms]) -> None:
        if self.trajectory is None or not frames:
            return
        with open(self.trajectory, "a", encoding="utf-8") as fh:
            fh.write("".join(_frame_to_text(f) for f in frames))
            fh.flush()
            os.fsync(fh.fileno())

    def _save_checkpoint(self, state: MDState) -> None:
        if self.checkpoint is None:
            return
        data = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "record": self.record,
            "step": self.step,
            "active": self.active,
            "positions": state.positions.detach().cpu().double().numpy().tolist(),
            "momenta": state.momenta.detach().cpu().double().numpy().tolist(),
            "monitors": [[m.get_state() for m in ms] for ms in self.monitors],
            "readings": [[r.__dict__ for r in rs] for rs in self.readings],
            "snapshots": [[_frame_to_text(f) for f in fs] for fs in self.snapshots],
            "last_values": self._last_values,
            "done": {str(i): {"status": r.status, "step": r.step, "time_fs": r.time_fs, "reason": r.reason,
                              "frame": _frame_to_text(r.atoms)} for i, r in self.done.items()},
            "rng": _rng_state(self.model.device),
            "trajectory_bytes": self.trajectory.stat().st_size if self.trajectory and self.trajectory.is_file() else 0,
        }
        with atomic_path(self.checkpoint) as tmp:
            Path(tmp).write_text(json.dumps(data, default=_json_default))

    def _load_checkpoint(self) -> None:
        path = self.checkpoint
        data = load_document(path, CHECKPOINT_FORMAT, "checkpoint", "delete it to start afresh",
                             "a checkpoint of a batched torch-sim run (atomuq.engines.torchsim)")
        check_resume(data["record"], self.record, path)
        self.step = int(data["step"])
        self.active = [int(i) for i in data["active"]]
        for ms, states in zip(self.monitors, data["monitors"]):
            for m, s in zip(ms, states):
                m.set_state(s)
        self.readings = [[Reading(**r) for r in rs] for rs in data["readings"]]
        self.snapshots = [[_frame_from_text(t) for t in fs] for fs in data["snapshots"]]
        self._last_values = data["last_values"]
        self.done = {int(i): SystemResult(int(i), self.where[int(i)], d["status"], d["step"], d["time_fs"],
                                          d["reason"], _frame_from_text(d["frame"]), self.readings[int(i)],
                                          self.snapshots[int(i)]) for i, d in data["done"].items()}
        self._positions = np.asarray(data["positions"], dtype=float)
        self._momenta = np.asarray(data["momenta"], dtype=float)
        self._rng_state = data["rng"]
        self._trajectory_bytes = int(data["trajectory_bytes"])
        self._resumed = True
        self.say(f"resuming from {path} at step {self.step} ({len(self.active)} of {len(self.structures)} systems "
                 "running)")

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> list[SystemResult]:
        """Integrate until settings.steps (or until every system stopped); one SystemResult per system, in order."""
        device = self.model.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the caller's random streams are left as they were
            if self._resumed:
                _set_rng_state(self._rng_state, device)
            else:
                torch.manual_seed(self.settings.seed + 1)
            self._integrate()
        return [self.done[i] for i in range(len(self.structures))]

    def _integrate(self) -> None:
        s = self.settings
        if self.trajectory is not None:
            if self._resumed and self.trajectory.is_file():
                with open(self.trajectory, "r+b") as fh:
                    fh.truncate(self._trajectory_bytes)
            elif not self._resumed:
                self.trajectory.write_text("")
        if not self.active:
            return
        if self._resumed:
            state = self._state_of(self.active, self._positions, self._momenta)
        else:
            state = self._state_of(self.active)
        if self._needs_conservative(self.step):
            self.wrapper.request_conservative()
        state = self._init_fn(state)
        if not self._resumed:
            self._check_result_keys()
            state = self._after_step(state)
            self._save_checkpoint(state)
        while self.active and self.step < s.steps:
            if self._needs_conservative(self.step + 1):
                self.wrapper.request_conservative()
            state = self._update_fn(state)
            self.step += 1
            state = self._after_step(state)
            if self.active and (self.step % self.checkpoint_every == 0 or self.step == s.steps):
                self._save_checkpoint(state)
        if self.active:
            frames = self._frames(state, None)
            for frame, i in zip(frames, self.active):
                self.done[i] = SystemResult(i, self.where[i], "completed", self.step, self.time_fs, None, frame,
                                            self.readings[i], self.snapshots[i])
        elif self.checkpoint is not None:
            self._save_checkpoint(state)

    def _after_step(self, state: MDState) -> MDState:
        """Monitors, frames and stops after the step just taken (the forces at the new positions are known)."""
        stop = self._check(state)
        if self.trajectory is not None and self.step % self.settings.traj_every == 0:
            running = [pos for pos in range(len(self.active)) if pos not in stop]
            frames = self._frames(state, None)
            self._write_frames([frames[pos] for pos in running])
        if not stop:
            return state
        keep = [pos for pos in range(len(self.active)) if pos not in stop]
        self.active = [self.active[pos] for pos in keep]
        if not keep:
            return state
        return state[keep]

    def _check_result_keys(self) -> None:
        """SettingError for a key:RESULT monitor whose result the model's evaluation does not give."""
        keys = [m.quantity.key for m in self.plan.monitors if isinstance(m.quantity, ResultKey)]
        if not keys:
            return
        batch = self.wrapper.last_batch
        pred = evaluate(self.model, batch.select(torch.arange(1, device=batch.device)), conservative=True).detach()
        (results,) = prediction_results(self.model, batch.select(torch.arange(1, device=batch.device)), pred,
                                        self.wrapper.force_mode)
        for key in keys:
            if key not in results:
                raise missing_result_error(key, list(results))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def _rng_state(device: torch.device) -> dict[str, list[int]]:
    state = {"cpu": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def _set_rng_state(state: dict[str, list[int]], device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)
