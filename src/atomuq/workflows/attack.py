"""Adversarial search (methods.md section 2): displace atoms to raise the Force Delta at low predicted energy.

The optimised variable is a displacement δ (N, 3) Å of every atom from its starting position x0,
started at init_scale·randn and moved by Adam. Objectives, per structure (maximised):

- "delta" (seed equation 3, r ← r + α∇U_Δ − β∇Ê): J = U_Δ − β·Ē, with Ē the predicted energy per
  atom relative to the starting structure (eV/atom) and β = energy_weight ((eV/Å)/(eV/atom)).
  By default β = U_Δ,0 / (2 kT) per structure: then the first ascent direction is exactly that of
  the Boltzmann form at the same kT (∇ log J_B = 2∇U/U − ∇Ē/kT), which ties both forms to one knob.
- "delta-boltzmann" (Schwalbe-Koda et al. 2021): J = U_Δ²·exp(−Ē/kT). Its gradient is taken on
  log J = 2 log U_Δ − Ē/kT (same maximiser, no overflow of the exponential).

U_Δ and its gradient come from models.derivatives.evaluate(create_graph=True), so ∇_δ U_Δ is exact
(second derivatives of the energy). The model builds its neighbour list on every call (exact; edges
that cross the cutoff enter with a vanishing envelope), periodic positions are wrapped into the
cell after every step, and |δ| is clamped per component. All structures of a call share one batch;
the objective is a sum of per-structure terms, so each structure's gradient is its own.

A structure stops on the step budget, when its energy per atom above the start exceeds the energy
budget (budget_kT·kT; the frame that crossed it is still recorded), when its objective has not
risen by a fraction min_gain of its best value (at least min_gain·|J_0|) for `patience` steps,
on a non-finite U_Δ / energy / gradient, or on an error in the model; the others go on. Every
evaluated frame is kept (trajectory), with the reason each structure stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from ase import Atoms

from atomuq.core.validate import DEFAULT_MIN_CONTACT_RATIO, closest_contacts
from atomuq.core.batch import Batch, scatter_sum
from atomuq.core.errors import InputError
from atomuq.core.schema import Provenance, clear_results, write_results
from atomuq.models.derivatives import evaluate
from atomuq.models.protocol import AtomisticModel
from atomuq.uq.force_delta import force_delta
from atomuq.models.provenance import model_provenance

OBJECTIVES = ("delta", "delta-boltzmann")

#: reference labels of a starting structure: they do not describe a displaced frame, so frames drop them
_LABEL_INFO = ("REF_energy", "REF_stress", "energy", "free_energy", "stress")


@dataclass
class AttackSettings:
    """Search settings; lengths in Å, energies in eV per atom."""

    objective: str = "delta-boltzmann"
    kT: float = 0.05
    energy_weight: float | None = None
    steps: int = 200
    lr: float = 0.01
    init_scale: float = 0.01
    max_displacement: float | None = 1.0
    patience: int | None = 50
    min_gain: float = 1e-2
    budget_kT: float | None = 3.0
    min_contact_ratio: float | None = DEFAULT_MIN_CONTACT_RATIO
    record_every: int = 1
    exclude_fixed: bool = True
    seed: int = 0

    @property
    def energy_budget(self) -> float | None:
        """Largest energy per atom above the start (eV/atom) a structure may reach: budget_kT·kT, or None."""
        return None if self.budget_kT is None else self.budget_kT * self.kT

    def check(self) -> None:
        """Raise InputError naming the first invalid setting."""
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        positive = {"kT": self.kT, "lr": self.lr, "record_every": self.record_every}
        if self.max_displacement is not None:
            positive["max_displacement"] = self.max_displacement
        if self.patience is not None:
            positive["patience"] = self.patience
        for name, value in positive.items():
            if not (value > 0 and math.isfinite(value)):
                raise InputError(f"{name} must be positive and finite, got {value}")
        if self.steps < 0 or self.init_scale < 0 or self.min_gain < 0:
            raise InputError("steps, init_scale and min_gain must not be negative")
        if self.min_contact_ratio is not None and not 0 < self.min_contact_ratio < 1:
            raise InputError(f"min_contact_ratio must be between 0 and 1, got {self.min_contact_ratio}")
        if self.budget_kT is not None and not self.budget_kT > 0:
            raise InputError(f"budget_kT must be positive, got {self.budget_kT}")
        if self.energy_weight is not None and not (self.energy_weight >= 0 and math.isfinite(self.energy_weight)):
            raise InputError(f"energy_weight must be >= 0 and finite, got {self.energy_weight}")


@dataclass
class Frame:
    """One evaluated configuration of one structure: positions (n, 3) Å, U_Δ (eV/Å), energy (eV)."""

    source: int
    step: int
    positions: np.ndarray
    force_delta: float
    energy: float
    energy_per_atom_rel: float
    force_delta_atoms: np.ndarray
    forces: np.ndarray | None = None  # the direct forces at the frame (n, 3) eV/Å


@dataclass
class Outcome:
    """How the search went for one starting structure (index into the input list); best_* are over frames
    within the energy budget."""

    index: int
    force_delta_start: float
    energy_start: float
    steps_run: int = 0
    best_force_delta: float = float("nan")
    best_step: int = -1
    best_energy_per_atom_rel: float = float("nan")
    stop_reason: str = ""
    failed_step: int | None = None

    @property
    def failed(self) -> bool:
        """True when the search of this structure ended on NaN or an error rather than by design."""
        return self.failed_step is not None


@dataclass
class AttackResult:
    """All recorded frames (every structure, in step order) and one Outcome per starting structure."""

    frames: list[Frame] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    settings: AttackSettings = field(default_factory=AttackSettings)
    provenance: Provenance | None = None  # the model searched
    interrupted: bool = False  # stopped by Ctrl-C (KeyboardInterrupt): structures without an outcome were not searched

    def to_atoms(self, structures: Sequence[Atoms], sources: Sequence[str] | None = None) -> list[Atoms]:
        """Frames as ase.Atoms written through the output schema (model energy and direct forces as ASE results,
        force_delta, force_delta_atoms, energy_per_atom_rel, force_delta_start, attack_*), sources[i] naming
        input i's file."""
        start = {o.index: o.force_delta_start for o in self.outcomes}
        provenance = self.provenance or Provenance(model="unknown", model_fingerprint="unknown")
        out = []
        for f in self.frames:
            results = {
                "energy": f.energy, "force_delta": f.force_delta, "force_delta_atoms": f.force_delta_atoms,
                "energy_per_atom_rel": f.energy_per_atom_rel, "force_delta_start": start[f.source],
                "attack_step": f.step, "source_index": f.source, "attack_objective": self.settings.objective,
                "attack_kT": self.settings.kT,
            }
            if f.forces is not None:
                results["forces"] = results["forces_direct"] = f.forces
            if sources is not None:
                results["source_file"] = sources[f.source]
            out.append(write_results(frame_atoms(structures[f.source], f.positions), results, provenance))
        return out


def frame_atoms(template: Atoms, positions: np.ndarray) -> Atoms:
    """A label-free copy of template (same cell, pbc, constraints, descriptive info) at new positions (Å)."""
    atoms = Atoms(numbers=template.numbers, positions=positions, cell=template.cell, pbc=template.pbc)
    atoms.set_constraint([c.copy() for c in template.constraints])
    atoms.info.update({k: v for k, v in template.info.items() if k not in _LABEL_INFO})
    return clear_results(atoms)


def _per_structure(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B,) True where every per-atom value of the structure is finite."""
    bad = (~torch.isfinite(values)).reshape(values.shape[0], -1).any(dim=1).to(values.dtype)
    return scatter_sum(bad, batch.structure_index, batch.num_structures) == 0


def _wrap(x0: torch.Tensor, delta: torch.Tensor, batch: Batch) -> None:
    """Shift x0 by lattice vectors (in place) so that x0 + δ lies inside the cell along periodic axes."""
    periodic = batch.pbc.any(dim=1) & (torch.linalg.det(batch.cell).abs() > 1e-9)
    if not bool(periodic.any()):
        return
    atoms = periodic[batch.structure_index]
    cell = batch.cell[batch.structure_index[atoms]]
    frac = torch.linalg.solve(cell.transpose(1, 2), (x0[atoms] + delta[atoms]).unsqueeze(-1)).squeeze(-1)
    shift = torch.floor(frac) * batch.pbc[batch.structure_index[atoms]].to(frac.dtype)
    x0[atoms] -= torch.einsum("nk,nkl->nl", shift, cell)


def attack_objective(
    u: torch.Tensor, e_rel: torch.Tensor, settings: AttackSettings, energy_weight: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per structure: (J, the surrogate whose gradient the search follows), from U_Δ (eV/Å) and Ē (eV/atom).

    delta: J = U_Δ − β·Ē, surrogate J (β = energy_weight); delta-boltzmann: J = U_Δ²·exp(−Ē/kT),
    surrogate log J = 2 log U_Δ − Ē/kT.
    """
    if settings.objective == "delta":
        value = u - energy_weight * e_rel
        return value, value
    log_value = 2 * torch.log(u) - e_rel / settings.kT
    return torch.exp(log_value), log_value


class _Search:
    """State of one batched search; run() drives it step by step."""

    def __init__(self, model: AtomisticModel, structures: Sequence[Atoms], settings: AttackSettings, first_index: int) -> None:
        self.model, self.settings = model, settings
        self.batch = Batch.from_atoms(structures, device=model.device, dtype=model.dtype)
        self.first_index = first_index
        b = self.batch
        self.n_atoms = b.atoms_per_structure.to(b.dtype)
        self.active = torch.ones(b.num_structures, dtype=torch.bool, device=b.device)
        self.x0 = b.positions.detach().clone()
        generator = torch.Generator().manual_seed(settings.seed + first_index)
        noise = torch.randn(self.x0.shape, generator=generator, dtype=torch.float64).to(self.x0)
        self.movable = ~b.fixed[:, None]
        self.delta = (settings.init_scale * noise * self.movable).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.delta], lr=settings.lr)
        _wrap(self.x0, self.delta.detach(), b)
        self.outcomes: list[Outcome] = []
        self.frames: list[Frame] = []

    def stop(self, b: int, reason: str, step: int, failed: bool = False) -> None:
        """Freeze structure b (local index) with a reason."""
        self.active[b] = False
        out = self.outcomes[b]
        out.stop_reason = reason
        if failed:
            out.failed_step = step

    def evaluate(self, idx: torch.Tensor, create_graph: bool
                 ) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sub-batch of structures idx at x0 + δ: (batch, energy (B',), U_Δ (B',), u_i (N',), direct forces (N', 3))."""
        sub = self.batch.replace(positions=self.x0 + self.delta).select(idx)
        pred = evaluate(self.model, sub, conservative=True, create_graph=create_graph)
        fd = force_delta(pred, sub, exclude_fixed=self.settings.exclude_fixed)
        return sub, pred.energy, fd.per_structure["force_delta"], fd.per_atom["force_delta"], pred.forces_direct

    def isolate_errors(self, idx: torch.Tensor, step: int, error: Exception) -> None:
        """After a batched evaluation raised: evaluate each structure alone and stop those that raise."""
        culprits = 0
        for b in idx.tolist():
            try:
                self.evaluate(torch.tensor([b], device=idx.device), create_graph=False)
            except Exception as exc:  # the model's own error, kept as the reason
                culprits += 1
                self.stop(b, f"model error at step {step}: {type(exc).__name__}: {exc}", step, failed=True)
        if culprits == 0:
            raise error

    def objective(self, u: torch.Tensor, e_rel: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """attack_objective for the structures idx."""
        return attack_objective(u, e_rel, self.settings, self.weights[idx])

    def run(self, progress: Callable[[int], None] | None = None) -> bool:
        """Evaluate the start, then up to `steps` Adam steps; frames and outcomes fill self.frames/outcomes.
        Returns False when Ctrl-C stopped it: active structures are marked interrupted, or, when it came before
        the start was evaluated, the batch has no outcome (not searched)."""
        b = self.batch
        saved = self.delta.detach().clone()
        try:
            with torch.no_grad():
                self.delta.zero_()
            u0, e0 = self._start(torch.arange(b.num_structures, device=b.device))
        except KeyboardInterrupt:
            self.outcomes, self.frames = [], []
            return False
        with torch.no_grad():
            self.delta.copy_(saved)
        return self._search(u0, e0, progress)

    def _search(self, u0: torch.Tensor, e0: torch.Tensor, progress: Callable[[int], None] | None) -> bool:
        """The Adam steps from the evaluated start (u0, e0); False when Ctrl-C stopped them."""
        s = self.settings
        self.e0, self.u0 = e0, u0
        self.weights = s.energy_weight * torch.ones_like(u0) if s.energy_weight is not None else u0 / (2 * s.kT)
        self.j0 = u0.abs() if s.objective == "delta" else u0**2
        self.best = torch.full_like(u0, -math.inf)
        self.since_best = torch.zeros_like(u0, dtype=torch.long)
        step = 0
        try:
            while bool(self.active.any()) and step <= s.steps:
                if self._step(step):
                    if progress is not None:
                        progress(1)
                    step += 1
        except KeyboardInterrupt:
            for k in torch.nonzero(self.active).flatten().tolist():
                self.stop(k, f"interrupted at step {step}", step)
            return False
        return True

    def _start(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """U_Δ and energy of the unperturbed structures; a structure that fails here is stopped at step 0."""
        nan = torch.full((len(idx),), math.nan, dtype=self.batch.dtype, device=self.batch.device)
        u0, e0 = nan.clone(), nan.clone()
        try:
            _, energy, u, _, _ = self.evaluate(idx, create_graph=False)
            u0, e0 = u.detach(), energy.detach()
        except Exception as exc:
            for b in range(len(idx)):
                self.outcomes.append(Outcome(index=self.first_index + b, force_delta_start=math.nan, energy_start=math.nan))
            self.isolate_errors(idx, 0, exc)
            return self._start_retry(idx, u0, e0)
        for b in range(len(idx)):
            self.outcomes.append(Outcome(index=self.first_index + b, force_delta_start=float(u0[b]), energy_start=float(e0[b])))
            if not (math.isfinite(float(u0[b])) and math.isfinite(float(e0[b]))):
                self.stop(b, "non-finite U_Δ or energy at the start", 0, failed=True)
        return u0, e0

    def _start_retry(self, idx: torch.Tensor, u0: torch.Tensor, e0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start values of the structures that did not raise, evaluated together."""
        ok = torch.nonzero(self.active).flatten()
        if len(ok):
            _, energy, u, _, _ = self.evaluate(ok, create_graph=False)
            u0[ok], e0[ok] = u.detach(), energy.detach()
            for k, b in enumerate(ok.tolist()):
                self.outcomes[b].force_delta_start = float(u[k])
                self.outcomes[b].energy_start = float(energy[k])
        return u0, e0

    def _step(self, step: int) -> bool:
        """Evaluate at step `step`, record, decide who stops, then move δ; False if the step must be redone."""
        s = self.settings
        idx = torch.nonzero(self.active).flatten()
        try:
            sub, energy, u, u_atoms, forces = self.evaluate(idx, create_graph=step < s.steps)
        except Exception as exc:
            self.isolate_errors(idx, step, exc)
            return False
        e_rel = (energy - self.e0[idx]) / self.n_atoms[idx]
        finite = torch.isfinite(u) & torch.isfinite(energy) & _per_structure(u_atoms, sub)
        value, surrogate = self.objective(u, e_rel, idx)
        u, energy, e_rel, value = u.detach(), energy.detach(), e_rel.detach(), value.detach()
        positions = sub.positions.detach().cpu().double().numpy()
        ptr = sub.ptr.tolist()
        u_atoms_np = u_atoms.detach().cpu().double().numpy()
        forces_np = forces.detach().cpu().double().numpy()
        contacts = closest_contacts(sub) if s.min_contact_ratio is not None else [None] * len(idx)
        keep_going = []
        for k, b in enumerate(idx.tolist()):
            out = self.outcomes[b]
            if not bool(finite[k]):
                self.stop(b, f"non-finite U_Δ or energy at step {step}", step, failed=True)
                continue
            c = contacts[k]
            if c is not None and c.ratio < s.min_contact_ratio:
                self.stop(b, f"atoms {c.i}-{c.j} at {c.distance:.2f} Å ({c.ratio:.2f} of their covalent radii) at step "
                             f"{step}; frame not kept", step)
                continue
            out.steps_run = step
            uk = float(u[k])
            last = step == s.steps
            if step % s.record_every == 0 or last:
                self.frames.append(
                    Frame(
                        source=out.index,
                        step=step,
                        positions=positions[ptr[k] : ptr[k + 1]],
                        force_delta=uk,
                        energy=float(energy[k]),
                        energy_per_atom_rel=float(e_rel[k]),
                        force_delta_atoms=u_atoms_np[ptr[k] : ptr[k + 1]],
                        forces=forces_np[ptr[k] : ptr[k + 1]],
                    )
                )
            budget = s.energy_budget
            within = budget is None or float(e_rel[k]) <= budget
            if within and not uk <= out.best_force_delta:  # also true while best is NaN
                out.best_force_delta, out.best_step, out.best_energy_per_atom_rel = uk, step, float(e_rel[k])
            v = float(value[k])
            best = float(self.best[b])
            if v > best + s.min_gain * max(abs(best) if math.isfinite(best) else 0.0, float(self.j0[b])):
                self.best[b], self.since_best[b] = v, 0
            else:
                self.since_best[b] += 1
            if not within:
                self.stop(b, f"energy budget at step {step} (Ē {float(e_rel[k]):.3g} > {budget:.3g})", step)
            elif last:
                self.stop(b, f"step budget ({s.steps}) reached", step)
            elif s.patience is not None and int(self.since_best[b]) >= s.patience:
                self.stop(b, f"objective flat for {s.patience} steps", step)
            else:
                keep_going.append(k)
        if not keep_going:
            return True
        keep = torch.tensor(keep_going, device=idx.device)
        # gradient with respect to δ only (not the model's parameters)
        (self.delta.grad,) = torch.autograd.grad(-surrogate.index_select(0, keep).sum(), [self.delta])
        self._move(idx[keep], step)
        return True

    def _move(self, moving: torch.Tensor, step: int) -> None:
        """One Adam step for the structures `moving`; others' δ is restored; clamp and wrap."""
        b, s = self.batch, self.settings
        grad = self.delta.grad
        good = _per_structure(grad, b)
        for k in moving.tolist():
            if not bool(good[k]):
                self.stop(k, f"non-finite gradient at step {step}", step, failed=True)
        mask = self.active[b.structure_index][:, None] & self.movable
        before = self.delta.detach().clone()
        grad.masked_fill_(~mask, 0.0)
        self.optimizer.step()
        with torch.no_grad():
            self.delta.copy_(torch.where(mask, self.delta, before))
            if s.max_displacement is not None:
                self.delta.clamp_(-s.max_displacement, s.max_displacement)
            _wrap(self.x0, self.delta.detach(), b)


def attack(
    model: AtomisticModel,
    structures: Sequence[Atoms],
    settings: AttackSettings | None = None,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> AttackResult:
    """Adversarial search from every structure (batched by batch_size; None: all at once); see the module doc."""
    settings = settings or AttackSettings()
    settings.check()
    if not model.has_direct_forces:
        raise InputError("the attack maximises the Force Delta and needs a model with a direct force head")
    result = AttackResult(settings=settings, provenance=model_provenance(model))
    size = batch_size or max(len(structures), 1)
    for first in range(0, len(structures), size):
        try:
            search = _Search(model, structures[first : first + size], settings, first)
        except KeyboardInterrupt:  # while building the batch: what earlier batches found stays
            result.interrupted = True
            break
        finished = search.run(progress)
        result.frames.extend(search.frames)
        result.outcomes.extend(search.outcomes)
        if not finished:
            result.interrupted = True
            break
    return result
