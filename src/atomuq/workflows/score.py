"""Score many structures in batches: model outputs, Force Delta, confidence, errors against references.

Every value is written through the output schema (core.schema): see docs/output_keys.md for the keys.
`score_shard` is the unit of work an engine runs (engines.local; a Ray actor can call it the same way).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from ase import Atoms

from atomuq.core.batch import Batch
from atomuq.core.errors import InputError
from atomuq.core.io import Record, detach_reference, reference_forces
from atomuq.core.memory import memory_errors
from atomuq.core.schema import SCORE, Provenance, write_results
from atomuq.models.derivatives import Prediction, evaluate
from atomuq.models.protocol import AtomisticModel
from atomuq.models.provenance import model_provenance
from atomuq.uq.confidence import confidence
from atomuq.uq.ensemble import Member, ensemble_uncertainty, evaluate_ensemble, member_name
from atomuq.uq.equigrad import rotational_gradient
from atomuq.uq.force_delta import force_delta
from atomuq.uq.result import UQResult, split_outputs

#: results that exist only for periodic structures
PERIODIC_ONLY = ("stress", "stress_direct", "stress_virial", "force_delta_stress")
#: results that exist only where reference forces do
NEEDS_REFERENCE = ("eps_nc", "eps_c", "eps_ensemble", "eps_nc_atoms", "eps_c_atoms", "eps_ensemble_atoms")

#: info keys whose values name a structure in the summary table, in order of preference
TAG_KEYS = ("molecule", "name", "config_type", "demo_group", "temperature")


def structure_tag(atoms: Atoms, max_parts: int = 2) -> str:
    """Short human label from the first info keys of TAG_KEYS present (e.g. 'naproxen 1200 K')."""
    parts = []
    for key in TAG_KEYS:
        if key in atoms.info and len(parts) < max_parts:
            value = atoms.info[key]
            parts.append(f"{value:g} K" if key == "temperature" and isinstance(value, (int, float)) else str(value))
    return " ".join(parts)


@dataclass
class ScoreRow:
    """One line of the summary table."""

    source: str
    index: int
    tag: str
    formula: str
    n_atoms: int
    energy_per_atom: float
    force_delta: float
    force_delta_max: float
    eps_nc: float | None
    eps_c: float | None
    ensemble_std: float | None = None


def score_row(atoms: Atoms) -> ScoreRow:
    """The summary row of a scored structure (from its written keys, so resumed shards give the same rows)."""
    info = atoms.info
    return ScoreRow(
        source=str(info["source_file"]), index=int(info["source_index"]), tag=structure_tag(atoms),
        formula=atoms.get_chemical_formula(), n_atoms=len(atoms),
        energy_per_atom=float(info["model_energy"]) / len(atoms), force_delta=float(info["force_delta"]),
        force_delta_max=float(info["force_delta_max"]), eps_nc=info.get("eps_nc"), eps_c=info.get("eps_c"),
        ensemble_std=info.get("ensemble_std"),
    )


@dataclass(frozen=True)
class ScoreSettings:
    """What score computes; every field changes the output (an engine refuses to resume with other values)."""

    batch_size: int = 16
    rotational: bool = False
    forces_key: str | None = None
    ensemble_forces: str = "direct"

    def as_dict(self) -> dict[str, Any]:
        """JSON-able settings."""
        return asdict(self)


def check_direct_head(model: AtomisticModel) -> None:
    """Raise InputError unless the model has a direct force head (the Force Delta needs one); the message says
    how a conservative-only model can still be used (as an ensemble member)."""
    if not model.has_direct_forces:
        raise InputError(
            f"atomuq score needs a model with a direct force head for the Force Delta; {model.source or type(model).__name__} "
            "is conservative-only: score with a direct model and add it as an ensemble member "
            "(--ensemble A,B --ensemble-forces conservative)")


def prediction_results(
    model: AtomisticModel,
    batch: Batch,
    pred: Prediction,
    force_mode: str = "direct",
    reference_forces: torch.Tensor | None = None,
    has_reference: Sequence[bool] | None = None,
    extra: Sequence[UQResult | None] = (),
    exclude_fixed: bool = True,
) -> list[dict[str, Any]]:
    """Per structure, every result of one evaluation under its output key (energy eV, forces eV/Å, stress eV/Å³,
    the Force Delta, confidence, rotational gradient, and the extra UQ results), as write_results takes them.

    forces (the ASE property) are the direct or conservative forces (force_mode); stress-like values are kept
    for periodic structures only, errors against references only where has_reference is true.
    """
    forces = pred.forces_direct if force_mode == "direct" else pred.forces_conservative
    if forces is None:
        raise ValueError(f"no {force_mode} forces in this evaluation")
    per_atom: dict[str, Any] = {"forces": forces}
    per_structure: dict[str, Any] = {"energy": pred.energy}
    for name in ("forces_direct", "forces_conservative"):
        if getattr(pred, name) is not None:
            per_atom[name] = getattr(pred, name)
    if pred.stress_virial is not None:
        per_structure["stress_virial"] = pred.stress_virial
        if pred.stress_direct is not None:
            per_structure["stress_direct"] = pred.stress_direct
        use_direct = force_mode == "direct" and pred.stress_direct is not None
        per_structure["stress"] = pred.stress_direct if use_direct else pred.stress_virial
    uq = UQResult()
    if pred.forces_direct is not None and pred.forces_conservative is not None:
        uq = uq.merged(force_delta(pred, batch, reference_forces, exclude_fixed))
    if pred.confidence_logits is not None:
        uq = uq.merged(confidence(pred.confidence_logits, model.confidence_bin_edges, batch))
    if pred.rotational_gradient is not None:
        uq = uq.merged(rotational_gradient(pred))
    atom_values, structure_values = uq.merged(*extra).outputs()
    per_atom.update(atom_values)
    per_structure.update(structure_values)
    values = split_outputs(per_atom, per_structure, batch.ptr.tolist())
    periodic = pred.periodic.tolist() if pred.periodic is not None else batch.pbc.all(dim=1).tolist()
    for b, structure in enumerate(values):
        dropped = ([] if periodic[b] else list(PERIODIC_ONLY)) + (
            list(NEEDS_REFERENCE) if has_reference is not None and not has_reference[b] else [])
        for name in dropped:
            structure.pop(name, None)
    return values


def _references(structures: Sequence[Atoms], forces_key: str | None, model: AtomisticModel
                ) -> tuple[torch.Tensor | None, list[bool]]:
    """Concatenated reference forces (zeros where a structure has none) and which structures have them."""
    refs = [reference_forces(a, forces_key) for a in structures]
    has_ref = [f is not None and f.shape == (len(a), 3) for f, a in zip(refs, structures)]
    if not any(has_ref):
        return None, has_ref
    stacked = np.concatenate([f if ok else np.zeros((len(a), 3)) for f, ok, a in zip(refs, has_ref, structures)])
    return torch.as_tensor(stacked, dtype=model.dtype, device=model.device), has_ref


def describe_records(records: Sequence[Record]) -> str:
    """'FILE structure I (N atoms)' for one record, the first and last of several (for error messages)."""
    atoms = sum(len(r.atoms) for r in records)
    if len(records) == 1:
        return f"{records[0].where} ({atoms:,} atoms)"
    return f"{records[0].where} to {records[-1].where} ({len(records)} structures, {atoms:,} atoms)"


def score_shard(
    records: Sequence[Record],
    settings: ScoreSettings,
    model: AtomisticModel,
    ensemble: Sequence[Member] | None = None,
    ensemble_names: Sequence[str] | None = None,
    provenance: Provenance | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Atoms]:
    """Scored copies of the structures (model energy and direct forces as ASE results, every UQ value under its
    schema key, reference labels as REF_*), in batches of settings.batch_size; with ensemble members also
    ensemble_std, forces_ensemble_mean, ... (uq.ensemble, ddof=0)."""
    check_direct_head(model)
    provenance = provenance or model_provenance(model)
    out: list[Atoms] = []
    size = settings.batch_size
    for start in range(0, len(records), size):
        chunk = records[start : start + size]
        structures = [r.atoms for r in chunk]
        batch = Batch.from_atoms(structures, device=model.device, dtype=model.dtype)
        ref_tensor, has_ref = _references(structures, settings.forces_key, model)
        periodic = bool(batch.pbc.all(dim=1).any())
        with memory_errors(describe_records(chunk)), torch.no_grad():  # evaluate enables autograd where it needs it
            pred = evaluate(model, batch, conservative=True, stress=periodic, rotational=settings.rotational).detach()
        extra = []
        if ensemble:
            with memory_errors(describe_records(chunk)), torch.no_grad():
                ens_pred = evaluate_ensemble(ensemble, batch, settings.ensemble_forces, ensemble_names)
            extra += [ensemble_uncertainty(ens_pred, batch, ref_tensor),
                      UQResult(per_atom={"forces_ensemble_mean": ens_pred.mean_forces})]
        values = prediction_results(model, batch, pred, "direct", ref_tensor, has_ref, extra)
        for rec, result in zip(chunk, values):
            result.update(source_file=rec.source, source_index=rec.index)
            out.append(write_results(detach_reference(rec.atoms), result, provenance, writer=SCORE))
        if progress is not None:
            progress(len(chunk))
    return out


def ensemble_provenance(ensemble: Sequence[Member] | None, names: Sequence[str] | None) -> list[dict[str, str]]:
    """Name and weights fingerprint of every ensemble member (for an engine's resume manifest)."""
    return [{"name": member_name(m, names, k), "fingerprint": model_provenance(m).model_fingerprint}
            for k, m in enumerate(ensemble or [])]


def score_records(
    records: Sequence[Record],
    model: AtomisticModel,
    batch_size: int = 16,
    rotational: bool = False,
    forces_key: str | None = None,
    progress: Callable[[int], None] | None = None,
    ensemble: Sequence[Member] | None = None,
    ensemble_forces: str = "direct",
    ensemble_names: Sequence[str] | None = None,
) -> tuple[list[Atoms], list[ScoreRow]]:
    """Scored copies of the structures in memory (score_shard over all of them) and their summary rows."""
    settings = ScoreSettings(batch_size=batch_size, rotational=rotational, forces_key=forces_key,
                             ensemble_forces=ensemble_forces)
    scored = score_shard(records, settings, model, ensemble, ensemble_names, progress=progress)
    return scored, [score_row(a) for a in scored]
