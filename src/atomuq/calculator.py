"""ASE calculator: every atomuq result of a model, for one structure at a time, under the output schema's keys."""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from atomuq.core.batch import Batch
from atomuq.core.errors import BlownUp
from atomuq.core.memory import memory_errors
from atomuq.core.validate import nonfinite_atoms
from atomuq.core.schema import ASE_PROPERTIES, CALC, PROVENANCE_KEYS, NonFiniteResult, clear_results, write_results, writers_keys
from atomuq.models.derivatives import evaluate
from atomuq.models.protocol import AtomisticModel
from atomuq.models.registry import resolve_model
from atomuq.uq.ltau.estimator import LTAUEstimator
from atomuq.models.provenance import model_provenance
from atomuq.workflows.score import prediction_results


class AtomuqCalculator(Calculator):
    """ASE calculator around any atomuq model.

    forces: "direct" (the model's force head; default for a direct model) or "conservative"
    (-dE/dr). Results use the keys of docs/output_keys.md: energy (eV), forces, forces_direct,
    forces_conservative (eV/Å), force_delta (U_Δ, eV/Å), force_delta_atoms (u_i), force_delta_max,
    stress (eV/Å³, periodic only; direct head if forces="direct" and the model has one, else virial),
    stress_virial, stress_direct, force_delta_stress, confidence_error (per structure) and
    confidence_error_atoms (eV/Å), and with rotational_gradient=True rotational_gradient (3x3, eV)
    and rotational_gradient_norm (eV). With an LTAU estimator (ltau=LTAUEstimator or its file,
    fitted with this model): per atom ltau_confidence_atoms, ltau_uncertainty_atoms,
    ltau_expected_error_atoms (eV/Å), ltau_distance_atoms, per structure ltau_uncertainty (mean
    of 1 − p_j), ltau_uncertainty_max, ltau_expected_error, ltau_distance_max, ltau_threshold,
    using ltau_k neighbours.

    After every evaluation the results that are not ASE properties are also written onto the atoms
    (atoms.info per structure, atoms.arrays per atom, with the model's provenance), so
    ase.io.write keeps them; the ASE properties are written by ASE from this calculator as usual.
    get_property(name, atoms) recomputes when the atoms have moved; get_property(name) without
    atoms uses the structure this calculator was last evaluated on, at its current positions.

    conservative: "always" (every evaluation also runs the backward pass, so every result is
    there at once) or "on_demand" (with forces="direct", the backward pass runs only when a
    result that needs it is asked for, or after request_conservative(); MD uses this so a step
    costs one forward pass and a monitored or MTS outer step one forward + backward).
    """

    #: marks results of this calculator as model predictions (core.schema.carries_prediction)
    atomuq_predictions = True

    #: results that need the backward pass
    CONSERVATIVE_RESULTS = frozenset({
        "forces_conservative", "force_delta", "force_delta_atoms", "force_delta_max", "force_delta_stress",
        "stress", "stress_virial", "stress_direct", "rotational_gradient", "rotational_gradient_norm",
    })

    implemented_properties = [k for k in writers_keys(CALC) if k not in PROVENANCE_KEYS]

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
        self.provenance = model_provenance(self.model)
        if self.ltau is not None:
            self.ltau.check_model(self.provenance.model_fingerprint, str(getattr(self.model, "source", "this model")))
        self.conservative_policy = conservative
        self._conservative_requested = False
        self._last_atoms: weakref.ref[Atoms] | None = None

    def request_conservative(self) -> None:
        """Make the next evaluation also compute conservative forces and the Force Delta (one-shot)."""
        self._conservative_requested = True

    def _needs_backward(self, properties) -> bool:
        if self.conservative_policy == "always" or self.force_mode == "conservative" or self.want_rotational:
            return True
        return self._conservative_requested or bool(self.CONSERVATIVE_RESULTS.intersection(properties))

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        bad = nonfinite_atoms(self.atoms.positions)
        if bad.size:  # checked here, not deep inside the neighbour search, so that MD can say what happened
            raise BlownUp(f"{bad.size} of {len(self.atoms)} atoms have NaN or infinite positions (first: atom "
                          f"{int(bad[0])}): the integrator blew up; shorten the time step or use "
                          "forces that can be trusted here")
        batch = Batch.from_atoms([self.atoms], device=self.model.device, dtype=self.model.dtype)
        backward = self._needs_backward(properties)
        self._conservative_requested = False
        periodic = bool(self.atoms.pbc.all()) and backward
        with memory_errors(f"the structure given to AtomuqCalculator ({len(self.atoms):,} atoms)"), torch.no_grad():
            # no graph is kept: evaluate turns autograd on where a model needs it for the derivatives
            pred = evaluate(self.model, batch, conservative=backward, stress=periodic,
                            rotational=self.want_rotational).detach()
        extra = []
        if self.ltau is not None:
            self.ltau.check_elements(self.atoms.numbers, "structure given to AtomuqCalculator")
            extra.append(self.ltau.predict(pred.node_features.cpu().float().numpy(), self.ltau_k,
                                           ptr=[0, len(self.atoms)]))
        (results,) = prediction_results(self.model, batch, pred, self.force_mode, extra=extra)
        self.results = {name: (float(v) if getattr(v, "ndim", 1) == 0 else v) for name, v in results.items()}
        self.results["free_energy"] = self.results["model_energy"] = self.results["energy"]
        target = atoms if atoms is not None else self.atoms
        try:
            write_results(target, results, self.provenance, attach_calculator=False)
        except NonFiniteResult:  # kept in self.results for MD monitors to see; nothing stale stays on the atoms
            clear_results(target, keep_calculator=True)

    def get_property(self, name, atoms=None, allow_calculation=True):
        if atoms is None and self._last_atoms is not None:
            atoms = self._last_atoms()  # the structure last evaluated, as it is now (ASE alone would reuse old results)
        if atoms is not None:
            self._last_atoms = weakref.ref(atoms)
        if name == "stress" and atoms is not None and not bool(atoms.pbc.all()):
            raise PropertyNotImplementedError("stress is defined only for fully periodic structures")
        if name.startswith("ltau") and self.ltau is None:
            raise PropertyNotImplementedError("create the calculator with ltau=ESTIMATOR for LTAU results")
        if name.startswith("rotational_gradient") and not self.want_rotational:
            raise PropertyNotImplementedError("create the calculator with rotational_gradient=True for this result")
        return super().get_property(name, atoms, allow_calculation)


#: the calculator's non-ASE results, as written onto atoms (for documentation and tests)
EXTRA_RESULTS = tuple(k for k in AtomuqCalculator.implemented_properties if k not in ASE_PROPERTIES)
