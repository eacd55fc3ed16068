"""The output schema: every result key atomuq writes, and the one function that writes results onto Atoms.

A key names one quantity at one level and means the same in a file and in the ASE calculator:

- per-structure values go to ``atoms.info`` (and are scalars or small arrays in the calculator's
  results); per-atom values go to ``atoms.arrays`` (arrays of length N in the calculator);
- a per-atom UQ value ends in ``_atoms`` (``force_delta_atoms``); the plain name is its
  per-structure value (``force_delta``, U_Δ); ``_max`` is the largest per-atom value of a structure;
- vectors per atom keep ASE's style (``forces_direct``, ``forces_conservative``);
- energy, forces and stress are ASE properties: a written structure carries them in a
  SinglePointCalculator, so ``get_potential_energy()`` and ``get_forces()`` work when it is read back
  (``model_energy`` in ``atoms.info`` records the same energy, which marks calculator results
  as the model's predictions, never reference labels);
- provenance (``atomuq_model``, ``atomuq_model_fingerprint``, ``atomuq_version``,
  ``atomuq_schema_version``) is recorded on every written structure;
- score and ltau score add results to structures in place: rerunning one of them on a file the
  other wrote replaces only its own keys (`write_results(..., writer=...)`); the other's results
  stay as long as they are the same model's (the provenance names one model per structure).

SCHEMA_VERSION counts changes of this registry that a reader must know about; files of
version 0 (written before the registry existed) are upgraded on read by `upgrade`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from atomuq.core.errors import AtomuqError

SCHEMA_VERSION = 1

ATOM = "atom"
STRUCTURE = "structure"

LESS_TRUSTED = "higher means less trusted"
MORE_TRUSTED = "higher means more trusted"
NOT_A_SCORE = "not a score"

#: where a key goes on an Atoms: info, arrays, or the attached (single-point) calculator
INFO, ARRAYS, CALCULATOR = "info", "arrays", "calculator"

#: writers, as named in the table
SCORE, LTAU, ATTACK, MD, CALC = "score", "ltau score", "attack", "md", "calculator"
IMPROVE, LABEL = "improve", "label"
EVERY = (SCORE, LTAU, ATTACK, MD, CALC)
#: the commands whose results are written to files (the calculator's live only on the atoms it is attached to)
COMMANDS = (SCORE, LTAU, ATTACK, MD)
#: the commands that add results to structures without moving them (write_results(..., writer=...))
IN_PLACE = (SCORE, LTAU)

ATOM_SUFFIX = "_atoms"
#: per-structure reductions of a per-atom value that a name may carry (md monitors key:RESULT,reduce=...)
REDUCTIONS = ("max", "mean", "rms")


class SchemaError(AtomuqError, ValueError):
    """A result key that is not in the registry, or a value of the wrong shape or not finite."""


class NonFiniteResult(SchemaError):
    """A result value that is NaN or infinite."""


@dataclass(frozen=True)
class Key:
    """One registered result key.

    shape: "" a number, "3" a vector (per atom: (N, 3)), "6" Voigt stress, "3x3" a matrix,
    "text", "int" or "bool". clears: removed from an input structure before new results are
    written onto its copy (it described an earlier prediction); False for names users also give
    their own structures (temperature).
    """

    name: str
    level: str
    unit: str
    orientation: str
    description: str
    writers: tuple[str, ...]
    shape: str = ""
    clears: bool = True

    @property
    def store(self) -> str:
        """Where the key lives on an Atoms: info, arrays or calculator."""
        if self.name in ASE_PROPERTIES:
            return CALCULATOR
        return ARRAYS if self.level == ATOM else INFO


ASE_PROPERTIES = ("energy", "free_energy", "forces", "stress")

_S, _A = STRUCTURE, ATOM


def _keys() -> list[Key]:
    k = Key
    return [
        # ---------------------------------------------------------------- ASE properties and model outputs
        k("energy", _S, "eV", NOT_A_SCORE, "ASE energy: on written structures the model's predicted energy (read back "
          "by get_potential_energy())", (SCORE, LTAU, ATTACK, MD, CALC)),
        k("free_energy", _S, "eV", NOT_A_SCORE, "ASE free energy, equal to energy", (SCORE, LTAU, ATTACK, MD, CALC)),
        k("forces", _A, "eV/Å", NOT_A_SCORE, "ASE forces: the forces the model was run with (direct by default for a "
          "model with a force head; read back by get_forces())", (SCORE, LTAU, ATTACK, MD, CALC), "3"),
        k("stress", _S, "eV/Å³", NOT_A_SCORE, "ASE stress (xx yy zz yz xz xy), periodic structures only: the "
          "direct head with direct forces where the model has one, else the virial", (SCORE, CALC), "6"),
        k("model_energy", _S, "eV", NOT_A_SCORE, "the model's predicted energy (the same as energy; marks the "
          "calculator results of a written structure as predictions, not reference labels)", (SCORE, LTAU, ATTACK, MD, CALC)),
        k("forces_direct", _A, "eV/Å", NOT_A_SCORE, "forces of the model's direct force head", (SCORE, LTAU, CALC), "3"),
        k("forces_conservative", _A, "eV/Å", NOT_A_SCORE, "conservative forces -dE/dr", (SCORE, LTAU, CALC), "3"),
        k("stress_direct", _S, "eV/Å³", NOT_A_SCORE, "stress of the model's direct stress head (periodic only)",
          (SCORE, CALC), "6"),
        k("stress_virial", _S, "eV/Å³", NOT_A_SCORE, "virial stress from dE/dstrain (periodic only)", (SCORE, CALC), "6"),
        # ---------------------------------------------------------------- Force Delta (methods.md 1)
        k("force_delta", _S, "eV/Å", LESS_TRUSTED, "U_Δ, the Force Delta: sqrt(Σ_i u_i² / 3N) over the structure's "
          "free atoms", (SCORE, ATTACK, MD, CALC)),
        k("force_delta_atoms", _A, "eV/Å", LESS_TRUSTED, "u_i = |F_direct - F_conservative| per atom", (SCORE, ATTACK, CALC)),
        k("force_delta_max", _S, "eV/Å", LESS_TRUSTED, "largest u_i of the structure", (SCORE, CALC)),
        k("force_delta_stress", _S, "eV/Å³", LESS_TRUSTED, "RMS over the 6 Voigt components of direct minus virial "
          "stress (periodic structures of a model with a stress head)", (SCORE, CALC)),
        # ---------------------------------------------------------------- errors against reference forces
        k("eps_nc", _S, "eV/Å", NOT_A_SCORE, "RMS error of the direct forces against the reference forces (the "
          "error U_Δ predicts; only where references exist)", (SCORE, LTAU)),
        k("eps_nc_atoms", _A, "eV/Å", NOT_A_SCORE, "|F_direct - F_ref| per atom", (SCORE, LTAU)),
        k("eps_c", _S, "eV/Å", NOT_A_SCORE, "RMS error of the conservative forces against the reference forces",
          (SCORE, LTAU)),
        k("eps_c_atoms", _A, "eV/Å", NOT_A_SCORE, "|F_conservative - F_ref| per atom", (SCORE, LTAU)),
        # ---------------------------------------------------------------- confidence head (methods.md 5)
        k("confidence_error", _S, "eV/Å", LESS_TRUSTED, "mean over atoms of the confidence head's expected force "
          "error", (SCORE, CALC)),
        k("confidence_error_atoms", _A, "eV/Å", LESS_TRUSTED, "the confidence head's expected force error "
          "Σ_b p_b·centre_b per atom", (SCORE, CALC)),
        # ---------------------------------------------------------------- rotational gradient (methods.md 6)
        k("rotational_gradient_norm", _S, "eV", LESS_TRUSTED, "|Δ_rot|, Frobenius norm of the rotational gradient "
          "(zero for a rotation-invariant model)", (SCORE, CALC)),
        k("rotational_gradient", _S, "eV", NOT_A_SCORE, "Δ_rot, the rotational gradient dE/dG", (SCORE, CALC), "3x3"),
        # ---------------------------------------------------------------- ensembles (methods.md 3)
        k("ensemble_std", _S, "eV/Å", LESS_TRUSTED, "ensemble force spread sqrt(Σ_i Σ_c Var_m F / 3N) (ddof=0)", (SCORE,)),
        k("ensemble_std_atoms", _A, "eV/Å", LESS_TRUSTED, "ensemble force spread sqrt(Σ_c Var_m F / 3) per atom", (SCORE,)),
        k("ensemble_energy_std", _S, "eV", LESS_TRUSTED, "standard deviation of the members' energies (ddof=0)", (SCORE,)),
        k("eps_ensemble", _S, "eV/Å", NOT_A_SCORE, "RMS error of the ensemble-mean forces against the reference forces",
          (SCORE,)),
        k("eps_ensemble_atoms", _A, "eV/Å", NOT_A_SCORE, "|mean_m F_m - F_ref| per atom", (SCORE,)),
        k("forces_ensemble_mean", _A, "eV/Å", NOT_A_SCORE, "ensemble-mean forces", (SCORE,), "3"),
        # ---------------------------------------------------------------- LTAU-FF (methods.md 4)
        k("ltau_confidence_atoms", _A, "1", MORE_TRUSTED, "p_j, probability that the atom's force error is at most "
          "ltau_threshold (mean over its k nearest training atoms)", (LTAU, CALC)),
        k("ltau_uncertainty_atoms", _A, "1", LESS_TRUSTED, "1 - p_j", (LTAU, CALC)),
        k("ltau_expected_error_atoms", _A, "eV/Å", LESS_TRUSTED, "mean of the neighbour-averaged training error "
          "distribution", (LTAU, CALC)),
        k("ltau_distance_atoms", _A, "descriptor units", LESS_TRUSTED, "mean descriptor distance to the k nearest "
          "training atoms (out-of-distribution score)", (LTAU, CALC)),
        k("ltau_uncertainty", _S, "1", LESS_TRUSTED, "mean over atoms of 1 - p_j", (LTAU, CALC)),
        k("ltau_uncertainty_max", _S, "1", LESS_TRUSTED, "largest 1 - p_j of the structure", (LTAU, CALC)),
        k("ltau_expected_error", _S, "eV/Å", LESS_TRUSTED, "mean over atoms of ltau_expected_error_atoms", (LTAU, CALC)),
        k("ltau_distance_max", _S, "descriptor units", LESS_TRUSTED, "largest ltau_distance_atoms of the structure",
          (LTAU, CALC)),
        k("ltau_threshold", _S, "eV/Å", NOT_A_SCORE, "the error tolerance s·atol that p_j refers to", (LTAU, CALC)),
        # ---------------------------------------------------------------- adversarial search (methods.md 2)
        k("energy_per_atom_rel", _S, "eV/atom", NOT_A_SCORE, "predicted energy per atom above the starting "
          "structure", (ATTACK,)),
        k("force_delta_start", _S, "eV/Å", LESS_TRUSTED, "U_Δ of the starting structure of the search", (ATTACK,)),
        k("attack_step", _S, "", NOT_A_SCORE, "search step of the frame (0: the start)", (ATTACK,), "int"),
        k("attack_objective", _S, "", NOT_A_SCORE, "objective of the search (delta or delta-boltzmann)", (ATTACK,), "text"),
        k("attack_kT", _S, "eV", NOT_A_SCORE, "kT of the search", (ATTACK,)),
        k("generation", _S, "", NOT_A_SCORE, "improve generation whose search found the frame", (IMPROVE,), "int"),
        k("label_method", _S, "", NOT_A_SCORE, "reference method that labelled the structure (its energy, forces "
          "and stress are then reference labels)", (LABEL,), "text", clears=False),
        # ---------------------------------------------------------------- molecular dynamics frames
        k("step", _S, "", NOT_A_SCORE, "MD step of the frame", (MD,), "int", clears=False),
        k("time_fs", _S, "fs", NOT_A_SCORE, "simulated time of the frame", (MD,), clears=False),
        k("force_mode", _S, "", NOT_A_SCORE, "forces that moved the atoms (direct or conservative)", (MD,), "text",
          clears=False),
        k("epot", _S, "eV", NOT_A_SCORE, "potential energy (the model's energy)", (MD,)),
        k("ekin", _S, "eV", NOT_A_SCORE, "kinetic energy", (MD,)),
        k("etot", _S, "eV", NOT_A_SCORE, "total energy epot + ekin", (MD,)),
        k("temperature", _S, "K", NOT_A_SCORE, "instantaneous kinetic temperature of an MD frame (inputs often carry "
          "their own temperature, so it is never cleared)", (MD,), clears=False),
        k("energy_drift", _S, "meV/atom/ps", LESS_TRUSTED, "|slope| of total energy per atom against time over the "
          "monitor's window", (MD,)),
        k("bonds", _S, "", LESS_TRUSTED, "covalent bonds broken plus bonds formed since the run's first reading (the "
          "bonds monitor; core.bonds)", (MD,)),
        k("trusted", _S, "", NOT_A_SCORE, "whether every thresholded monitor was within its limit at this frame",
          (MD,), "bool"),
        k("event", _S, "", NOT_A_SCORE, "what happened at this frame (breach, rollback, ...)", (MD,), "text"),
        k("md_state", _S, "", NOT_A_SCORE, "integrator state for an exact resume (base64 JSON)", (MD,), "text"),
        k("momenta", _A, "amu·Å/(ASE time unit)", NOT_A_SCORE, "atomic momenta (ASE's array)", (MD,), "3", clears=False),
        # ---------------------------------------------------------------- where it came from
        k("source_file", _S, "", NOT_A_SCORE, "input file of the structure", (SCORE, LTAU, ATTACK), "text"),
        k("source_index", _S, "", NOT_A_SCORE, "0-based index of the structure in its input file (attack: in the "
          "input list)", (SCORE, LTAU, ATTACK), "int"),
        k("atomuq_model", _S, "", NOT_A_SCORE, "the model that made the predictions (its file or name)", EVERY, "text"),
        k("atomuq_model_fingerprint", _S, "", NOT_A_SCORE, "SHA-256 (16 hex) of the model's weights "
          "(models.checkpoint.weights_fingerprint)", EVERY, "text"),
        k("atomuq_version", _S, "", NOT_A_SCORE, "atomuq version that wrote the structure", EVERY, "text"),
        k("atomuq_schema_version", _S, "", NOT_A_SCORE, "version of this key registry (0: a file of an older atomuq, "
          "upgraded on read)", EVERY, "int"),
    ]


#: the keys atomuq itself writes (the documented table); REGISTRY adds users' own keys (register_key)
BUILTIN_KEYS: dict[str, Key] = {key.name: key for key in _keys()}
REGISTRY: dict[str, Key] = dict(BUILTIN_KEYS)
PROVENANCE_KEYS = ("atomuq_model", "atomuq_model_fingerprint", "atomuq_version", "atomuq_schema_version")


def register_key(key: Key) -> Key:
    """Add a key defined outside atomuq (a user's own MD monitor quantity) to the registry and return it;
    registering a name again is fine when the definition is the same, SchemaError when it differs."""
    known = REGISTRY.get(key.name)
    if known is not None and known != key:
        raise SchemaError(f"{key.name!r} is already a registered atomuq result key ({known.description}); "
                          "give the quantity another name")
    REGISTRY[key.name] = key
    return key


def atom_key(name: str) -> str:
    """The per-atom output key of a quantity: force_delta -> force_delta_atoms (name itself if registered per atom)."""
    if name in REGISTRY and REGISTRY[name].level == ATOM:
        return name
    return name + ATOM_SUFFIX


def lookup(name: str) -> Key:
    """The registered key `name`, or a per-structure reduction `<quantity>_<max|mean|rms>` of a per-atom key
    (as md monitors name them); SchemaError for anything else."""
    key = REGISTRY.get(name)
    if key is not None:
        return key
    base, _, reduce = name.rpartition("_")
    if reduce in REDUCTIONS and base:
        for candidate in (atom_key(base), base):
            per_atom = REGISTRY.get(candidate)
            if per_atom is not None and per_atom.level == ATOM and per_atom.shape == "":
                return Key(name, STRUCTURE, per_atom.unit, per_atom.orientation,
                           f"{reduce} over atoms of {per_atom.name}", (MD,))
    raise SchemaError(f"{name!r} is not a registered atomuq result key (see docs/output_keys.md)")


def writers_keys(writer: str) -> list[str]:
    """Names of the keys a writer (score, ltau score, attack, md, calculator) may write."""
    return [name for name, key in REGISTRY.items() if writer in key.writers]


# ------------------------------------------------------------------------------------------- provenance


@dataclass(frozen=True)
class Provenance:
    """Who made the results on a structure: the model's name and weights fingerprint, atomuq and schema version."""

    model: str
    model_fingerprint: str
    atomuq_version: str = field(default_factory=lambda: _atomuq_version())
    schema_version: int = SCHEMA_VERSION

    def info(self) -> dict[str, Any]:
        """The provenance keys as they are written to atoms.info."""
        return {"atomuq_model": self.model, "atomuq_model_fingerprint": self.model_fingerprint,
                "atomuq_version": self.atomuq_version, "atomuq_schema_version": int(self.schema_version)}


def _atomuq_version() -> str:
    import atomuq

    return atomuq.__version__


# ------------------------------------------------------------------------------------------- writing


def _number(name: str, value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise NonFiniteResult(f"result {name} is {number}, not a finite number")
    return number


def check_value(key: Key, value: Any, n_atoms: int) -> Any:
    """The value as it is stored (python scalar or float64 array), or SchemaError on a wrong shape or non-finite data."""
    if key.shape == "text":
        return str(value)
    if key.shape == "bool":
        return bool(value)
    if key.shape == "int":
        if key.level == ATOM:
            return np.asarray(value, dtype=np.int64)
        return int(value)
    if key.level == STRUCTURE and key.shape == "":
        return _number(key.name, np.asarray(value).reshape(()) if np.ndim(value) else value)
    array = np.array(value, dtype=np.float64)  # a copy: later changes of the source do not leak in
    expected = {"": (), "3": (3,), "6": (6,), "3x3": (3, 3)}[key.shape]
    if key.level == ATOM:
        expected = (n_atoms, *expected)
    if array.shape != expected:
        raise SchemaError(f"result {key.name} has shape {array.shape}, expected {expected}")
    if not np.isfinite(array).all():
        raise NonFiniteResult(f"result {key.name} contains NaN or infinite values")
    return array


def clear_results(atoms: Atoms, *, keep_calculator: bool = False) -> Atoms:
    """Remove (in place) every registered result that describes an earlier prediction, and such a calculator.

    keep_calculator=True leaves atoms.calc and the ASE-property names alone (the live calculator's case).
    """
    if not keep_calculator and carries_prediction(atoms):
        atoms.calc = None
    for name, key in REGISTRY.items():
        if not key.clears:
            continue
        if key.store == INFO:
            atoms.info.pop(name, None)
        elif key.store == ARRAYS:
            atoms.arrays.pop(name, None)
        elif not keep_calculator:  # a stray copy would collide with the calculator's value when written
            atoms.info.pop(name, None)
            if name == "forces":
                atoms.arrays.pop(name, None)
    return atoms


def own_keys(writer: str) -> list[str]:
    """The keys that, of the commands writing files, only `writer` writes: on a structure they mark its results."""
    others = [c for c in COMMANDS if c != writer]
    return [name for name, key in REGISTRY.items()
            if writer in key.writers and key.clears and not any(c in key.writers for c in others)]


def _present(atoms: Atoms, names: list[str]) -> bool:
    return any(name in atoms.info or name in atoms.arrays for name in names)


@dataclass(frozen=True)
class EarlierResults:
    """What a structure carries before `writer` writes onto it in place (write_results(..., writer=...)).

    own: results of an earlier run of the same command (replaced); kept: the other commands whose
    results stay; dropped: the model (name) of earlier results that are removed because another model made them.
    """

    own: bool
    kept: tuple[str, ...]
    dropped: str | None


def earlier_results(atoms: Atoms, writer: str, provenance: Provenance) -> EarlierResults:
    """Which atomuq results on atoms a write by `writer` (one of IN_PLACE) with `provenance` replaces, keeps, drops."""
    if writer not in IN_PLACE:
        raise ValueError(f"{writer!r} does not write in place; choose one of {IN_PLACE}")
    own = _present(atoms, own_keys(writer))
    others = tuple(c for c in COMMANDS if c != writer and _present(atoms, own_keys(c)))
    if not others:
        return EarlierResults(own, (), None)
    info = atoms.info
    same = info.get("atomuq_model_fingerprint") == provenance.model_fingerprint
    if provenance.model_fingerprint == "none":  # a model without weights: only its name tells
        same = same and info.get("atomuq_model") == provenance.model
    if not same:
        return EarlierResults(own, (), str(info.get("atomuq_model", "an unrecorded model")))
    return EarlierResults(own, others, None)


def clear_own_results(atoms: Atoms, writer: str, written: Mapping[str, Any]) -> Atoms:
    """Remove (in place) `writer`'s own keys, the keys about to be written (`written`, with model_energy and
    free_energy beside energy) and a prediction calculator; other commands' results stay."""
    names = set(own_keys(writer)) | set(written)
    if "energy" in written:
        names |= {"model_energy", "free_energy"}
    if carries_prediction(atoms):
        atoms.calc = None
    for name in names:
        atoms.info.pop(name, None)
        if REGISTRY[name].store != INFO:
            atoms.arrays.pop(name, None)
    return atoms


@dataclass
class PreparedResults:
    """Checked results split by where they go: atoms.info, atoms.arrays, and the ASE calculator's results."""

    info: dict[str, Any]
    arrays: dict[str, Any]
    calculator: dict[str, Any]


def prepare_results(results: Mapping[str, Any], provenance: Provenance, n_atoms: int) -> PreparedResults:
    """Check results against the registry (SchemaError on an unknown key, a wrong shape, a non-finite value) and
    split them: per-structure keys and provenance to info, per-atom keys to arrays, energy/free_energy/forces/
    stress to the calculator (energy is also recorded as model_energy, free_energy defaults to energy)."""
    stored: dict[str, Any] = {}
    for name, value in results.items():
        stored[name] = check_value(lookup(name), value, n_atoms)
    if "energy" in stored:
        if "model_energy" in stored and stored["model_energy"] != stored["energy"]:
            raise SchemaError("model_energy and energy differ; give the model's energy once, as energy")
        stored["model_energy"] = stored["energy"]
        stored.setdefault("free_energy", stored["energy"])
    calculator = {name: stored.pop(name) for name in ASE_PROPERTIES if name in stored}
    info = {name: value for name, value in stored.items() if lookup(name).level == STRUCTURE}
    arrays = {name: value for name, value in stored.items() if lookup(name).level == ATOM}
    info.update(provenance.info())
    return PreparedResults(info, arrays, calculator)


def write_results(atoms: Atoms, results: Mapping[str, Any], provenance: Provenance, *,
                  attach_calculator: bool = True, writer: str | None = None) -> Atoms:
    """Write results onto atoms (in place) under their registered keys, with provenance, and return atoms.

    Per-structure keys go to atoms.info, per-atom keys to atoms.arrays; energy, free_energy, forces
    and stress go into a SinglePointCalculator (attach_calculator=False: left to the calculator
    already attached, as the ASE calculator does), and energy is also recorded as model_energy.
    Earlier atomuq results on atoms are removed first: all of them (the atoms may have moved), or
    with writer (one of IN_PLACE: the atoms have not moved) only that command's own keys and the keys
    written now, so that another command's results of the same model stay (earlier_results says
    which). Unknown keys, wrong shapes and non-finite values raise SchemaError before atoms is changed.
    """
    prepared = prepare_results(results, provenance, len(atoms))
    if writer is not None and earlier_results(atoms, writer, provenance).kept:
        clear_own_results(atoms, writer, {**prepared.info, **prepared.arrays, **prepared.calculator})
    else:
        clear_results(atoms, keep_calculator=not attach_calculator)
    atoms.arrays.update(prepared.arrays)
    atoms.info.update(prepared.info)
    if attach_calculator and prepared.calculator:
        atoms.calc = SinglePointCalculator(atoms, **prepared.calculator)
    return atoms


# ------------------------------------------------------------------------------------------- predictions vs labels


def carries_prediction(atoms: Atoms) -> bool:
    """True when the calculator results on atoms are an atomuq model's predictions, not reference labels.

    That is: atoms.calc is atomuq's calculator, or atoms.info records the model's energy
    (model_energy, or epot of an MD frame) and the calculator's energy equals it (a label
    computed later by another calculator differs), or the calculator has forces but no energy on
    a structure atomuq wrote (provenance or an MD frame's md_state).
    """
    calc = atoms.calc
    if calc is None:
        return False
    if getattr(calc, "atomuq_predictions", False):
        return True
    results = getattr(calc, "results", {}) or {}
    info = atoms.info
    recorded = info.get("model_energy", info.get("epot"))
    if "energy" in results:
        if recorded is None:
            return False
        try:
            return bool(np.isclose(float(results["energy"]), float(recorded), rtol=1e-12, atol=1e-9))
        except (TypeError, ValueError):
            return False
    return "forces" in results and ("atomuq_schema_version" in info or "md_state" in info)


def written_by_atomuq(atoms: Atoms) -> bool:
    """True when atoms.info carries atomuq's provenance (or the marks of a file of an older atomuq)."""
    info = atoms.info
    return "atomuq_schema_version" in info or any(k in info for k in _V0_MARKS)


# ------------------------------------------------------------------------------------------- reading files of version 0

#: info keys that only atomuq's own outputs of version 0 carried
_V0_MARKS = ("model_energy", "md_state", "ltau_threshold", "attack_step")

#: per-atom arrays renamed in version 1 (old name -> new name); see docs/migration.md
ARRAY_RENAMES_V0 = {
    "force_delta": "force_delta_atoms",
    "confidence_error": "confidence_error_atoms",
    "eps_nc": "eps_nc_atoms",
    "eps_c": "eps_c_atoms",
    "ensemble_std": "ensemble_std_atoms",
    "ltau_confidence": "ltau_confidence_atoms",
    "ltau_uncertainty": "ltau_uncertainty_atoms",
    "ltau_expected_error": "ltau_expected_error_atoms",
    "ltau_distance": "ltau_distance_atoms",
}
#: per-structure keys renamed in version 1 (old name -> new name)
INFO_RENAMES_V0 = {"rotational_gradient": "rotational_gradient_norm"}
#: calculator result names renamed in version 1
CALCULATOR_RENAMES_V0 = {
    "confidence_error": "confidence_error_atoms (confidence_error is now the per-structure mean)",
    "ltau_confidence": "ltau_confidence_atoms",
    "ltau_uncertainty": "ltau_uncertainty_atoms (ltau_uncertainty is now the per-structure mean)",
    "ltau_expected_error": "ltau_expected_error_atoms (ltau_expected_error is now the per-structure mean)",
    "ltau_distance": "ltau_distance_atoms",
    "ltau_uncertainty_mean": "ltau_uncertainty",
}


def upgrade(atoms: Atoms) -> Atoms:
    """Bring a structure written by atomuq before the registry (version 0) to the current keys, in place.

    Renamed arrays and info keys get their new names; ltau score's ltau_force_error becomes
    eps_nc_atoms or eps_c_atoms (by the forces it was written with); the model's energy (model_energy,
    or epot of an MD frame) and the forces it ran with become ASE calculator results; the structure
    is marked atomuq_schema_version = 0. Structures that are not old atomuq outputs are left alone.
    """
    info, arrays = atoms.info, atoms.arrays
    if "atomuq_schema_version" in info or not any(k in info for k in _V0_MARKS):
        return atoms
    for old, new in ARRAY_RENAMES_V0.items():
        if old in arrays and new not in arrays:
            arrays[new] = arrays.pop(old)
    if "ltau_force_error" in arrays:
        kind = "eps_c_atoms" if "forces_conservative" in arrays and "forces_direct" not in arrays else "eps_nc_atoms"
        arrays.setdefault(kind, arrays.pop("ltau_force_error"))
        arrays.pop("ltau_force_error", None)
    for old, new in INFO_RENAMES_V0.items():
        if old in info and np.ndim(info[old]) == 0 and new not in info:
            info[new] = info.pop(old)
    results = dict(getattr(atoms.calc, "results", {}) or {}) if atoms.calc is not None else {}
    energy = info.get("model_energy", info.get("epot"))
    if energy is not None:
        info["model_energy"] = float(energy)
        if "energy" not in results:
            results.update(energy=float(energy), free_energy=float(energy))
        if "forces" not in results and "forces_direct" in arrays and "md_state" not in info:
            results["forces"] = np.array(arrays["forces_direct"])
    info["atomuq_schema_version"] = 0
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms
