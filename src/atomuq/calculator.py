"""ASE calculator: every atomuq result of a model, for one structure at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from atomuq.core.batch import Batch
from atomuq.models.checkpoint import weights_fingerprint
from atomuq.models.derivatives import evaluate, rotational_gradient_norm
from atomuq.models.protocol import AtomisticModel
from atomuq.models.registry import resolve_model
from atomuq.uq.confidence import confidence
from atomuq.uq.force_delta import force_delta
from atomuq.uq.ltau.estimator import ATOM_KEYS as LTAU_ATOM_KEYS
from atomuq.uq.ltau.estimator import LTAUEstimator


class AtomuqCalculator(Calculator):
    """ASE calculator around any atomuq model.

    forces: "direct" (the model's force head; default for a direct model) or "conservative"
    (-dE/dr). Results: energy (eV), forces, forces_direct, forces_conservative (eV/Å),
    force_delta (U_Delta, eV/Å), force_delta_atoms (u_i, eV/Å), stress (eV/Å³, periodic only;
    direct head if forces="direct" and the model has one, else virial), stress_virial,
    stress_direct, confidence_error (per atom, eV/Å), and with rotational_gradient=True
    rotational_gradient (3x3, eV) and rotational_gradient_norm (eV). With an LTAU estimator
    (ltau=LTAUEstimator or its file, fitted with this model): per-atom ltau_confidence,
    ltau_uncertainty, ltau_expected_error (eV/Å), ltau_distance, and ltau_uncertainty_mean
    (mean over atoms of 1 − p_j), using ltau_k neighbours.

    conservative: "always" (every evaluation also runs the backward pass, so every result is
    there at once) or "on_demand" (with forces="direct", the backward pass runs only when a
    result that needs it is asked for, or after request_conservative(); MD uses this so a step
    costs one forward pass and a monitored or MTS outer step one forward + backward).
    """

    #: results that need the backward pass
    CONSERVATIVE_RESULTS = frozenset({
        "forces_conservative", "force_delta", "force_delta_atoms", "stress", "stress_virial",
        "rotational_gradient", "rotational_gradient_norm",
    })

    implemented_properties = [
        "energy", "free_energy", "forces", "stress", "forces_direct", "forces_conservative",
        "force_delta", "force_delta_atoms", "stress_direct", "stress_virial", "confidence_error",
        "rotational_gradient", "rotational_gradient_norm", *LTAU_ATOM_KEYS, "ltau_uncertainty_mean",
    ]

    def __init__(
        self,
        model: AtomisticModel | str | None = None,
        forces: str | None = None,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        rotational_gradient: bool = False,
        ltau: LTAUEstimator | str | Path | None = None,
        ltau_k: int = 1,
        conservative: str = "always",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model if isinstance(model, AtomisticModel) else resolve_model(model, device=device)
        if dtype is not None:
            self.model = self.model.to(dtype)
        direct = self.model.has_direct_forces
        forces = forces or ("direct" if direct else "conservative")
        if forces not in ("direct", "conservative"):
            raise ValueError(f"forces must be 'direct' or 'conservative', got {forces!r}")
        if forces == "direct" and not direct:
            raise ValueError("forces='direct' needs a model with a direct force head; this one is conservative-only")
        if conservative not in ("always", "on_demand"):
            raise ValueError(f"conservative must be 'always' or 'on_demand', got {conservative!r}")
        self.force_mode = forces
        self.want_rotational = rotational_gradient
        self.ltau = ltau if ltau is None or isinstance(ltau, LTAUEstimator) else LTAUEstimator.load(ltau)
        self.ltau_k = ltau_k
        if self.ltau is not None:
            self.ltau.check_model(weights_fingerprint(self.model), str(getattr(self.model, "source", "this model")))
        self.conservative_policy = conservative
        self._conservative_requested = False

    def request_conservative(self) -> None:
        """Make the next evaluation also compute conservative forces and the Force Delta (one-shot)."""
        self._conservative_requested = True

    def _needs_backward(self, properties) -> bool:
        if self.conservative_policy == "always" or self.force_mode == "conservative" or self.want_rotational:
            return True
        return self._conservative_requested or bool(self.CONSERVATIVE_RESULTS.intersection(properties))

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        batch = Batch.from_atoms([self.atoms], device=self.model.device, dtype=self.model.dtype)
        backward = self._needs_backward(properties)
        self._conservative_requested = False
        periodic = bool(self.atoms.pbc.all()) and backward
        pred = evaluate(self.model, batch, conservative=backward, stress=periodic, rotational=self.want_rotational).detach()
        to_np = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
        self.results = r = {}
        r["energy"] = r["free_energy"] = float(pred.energy[0])
        if backward:
            r["forces_conservative"] = to_np(pred.forces_conservative)
        if pred.forces_direct is not None:
            r["forces_direct"] = to_np(pred.forces_direct)
        if pred.forces_direct is not None and backward:
            fd = force_delta(pred, batch)
            r["force_delta"] = float(fd.per_structure["force_delta"][0])
            r["force_delta_atoms"] = to_np(fd.per_atom["force_delta"])
        r["forces"] = r["forces_direct"] if self.force_mode == "direct" else r["forces_conservative"]
        if periodic:
            r["stress_virial"] = to_np(pred.stress_virial[0])
            if pred.stress_direct is not None:
                r["stress_direct"] = to_np(pred.stress_direct[0])
            use_direct = self.force_mode == "direct" and pred.stress_direct is not None
            r["stress"] = r["stress_direct"] if use_direct else r["stress_virial"]
        if pred.confidence_logits is not None:
            conf = confidence(pred.confidence_logits, self.model.confidence_bin_edges, batch)
            r["confidence_error"] = to_np(conf.per_atom["confidence_error"])
        if self.ltau is not None:
            self.ltau.check_elements(self.atoms.numbers, "structure given to AtomuqCalculator")
            ltau = self.ltau.predict(pred.node_features.cpu().float().numpy(), self.ltau_k)
            r.update(ltau.per_atom())
            r["ltau_uncertainty_mean"] = float(ltau.uncertainty.mean())
        if self.want_rotational:
            r["rotational_gradient"] = to_np(pred.rotational_gradient[0])
            r["rotational_gradient_norm"] = float(rotational_gradient_norm(pred)[0])

    def get_property(self, name, atoms=None, allow_calculation=True):
        if name == "stress" and atoms is not None and not np.asarray(atoms.pbc).all():
            raise PropertyNotImplementedError("stress is defined only for fully periodic structures")
        if name.startswith("ltau") and self.ltau is None:
            raise PropertyNotImplementedError("create the calculator with ltau=ESTIMATOR for LTAU results")
        if name.startswith("rotational_gradient") and not self.want_rotational:
            raise PropertyNotImplementedError("create the calculator with rotational_gradient=True for this result")
        return super().get_property(name, atoms, allow_calculation)
