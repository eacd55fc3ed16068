"""Score many structures in batches: model outputs, Force Delta, confidence, errors against references."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from ase import Atoms

from atomuq.core.batch import Batch
from atomuq.core.io import Record, detach_reference, reference_forces
from atomuq.core.validate import check_records as validate_records  # noqa: F401 (moved to core.validate)
from atomuq.models.derivatives import evaluate, rotational_gradient_norm
from atomuq.models.protocol import AtomisticModel
from atomuq.uq.confidence import confidence
from atomuq.uq.ensemble import Member, ensemble_uncertainty, evaluate_ensemble
from atomuq.uq.force_delta import force_delta

#: per-structure info keys written by score, with units
INFO_KEYS = {
    "model_energy": "eV",
    "force_delta": "eV/Å",
    "force_delta_max": "eV/Å",
    "force_delta_stress": "eV/Å³",
    "confidence_error": "eV/Å",
    "eps_nc": "eV/Å",
    "eps_c": "eV/Å",
    "rotational_gradient": "eV",
    "ensemble_std": "eV/Å",
    "ensemble_energy_std": "eV",
    "eps_ensemble": "eV/Å",
}
#: per-atom arrays written by score, with units
ARRAY_KEYS = {
    "forces_direct": "eV/Å",
    "forces_conservative": "eV/Å",
    "force_delta": "eV/Å",
    "confidence_error": "eV/Å",
    "eps_nc": "eV/Å",
    "eps_c": "eV/Å",
    "ensemble_std": "eV/Å",
    "forces_ensemble_mean": "eV/Å",
}


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


def _split_numpy(batch: Batch, values: torch.Tensor) -> list[np.ndarray]:
    """Per-structure float64 numpy arrays of per-atom values."""
    return [x.cpu().double().numpy() for x in batch.split(values)]


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
    """Annotated copies of the structures (arrays and info as in ARRAY_KEYS / INFO_KEYS) and summary rows;
    with ensemble members also ensemble_std, forces_ensemble_mean (uq.ensemble, ddof=0)."""
    if not model.has_direct_forces:
        raise ValueError("atomuq score needs a model with a direct force head for the Force Delta")
    out_atoms: list[Atoms] = []
    rows: list[ScoreRow] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        structures = [r.atoms for r in chunk]
        batch = Batch.from_atoms(structures, device=model.device, dtype=model.dtype)
        refs = [reference_forces(a, forces_key) for a in structures]
        has_ref = [f is not None and f.shape == (len(a), 3) for f, a in zip(refs, structures)]
        ref_tensor = None
        if any(has_ref):
            ref_tensor = torch.as_tensor(
                np.concatenate([f if ok else np.zeros((len(a), 3)) for f, ok, a in zip(refs, has_ref, structures)]),
                dtype=model.dtype, device=model.device,
            )
        periodic = bool(batch.pbc.all(dim=1).any())
        pred = evaluate(model, batch, conservative=True, stress=periodic, rotational=rotational).detach()
        fd = force_delta(pred, batch, ref_tensor)
        conf = (confidence(pred.confidence_logits, model.confidence_bin_edges, batch)
                if pred.confidence_logits is not None else None)
        rot = rotational_gradient_norm(pred) if rotational else None
        ens = None
        if ensemble:
            ens_pred = evaluate_ensemble(ensemble, batch, ensemble_forces, ensemble_names)
            ens = ensemble_uncertainty(ens_pred, batch, ref_tensor)
        split = functools.partial(_split_numpy, batch)
        per_atom = {
            "forces_direct": split(pred.forces_direct),
            "forces_conservative": split(pred.forces_conservative),
            "force_delta": split(fd.per_atom["force_delta"]),
        }
        if conf is not None:
            per_atom["confidence_error"] = split(conf.per_atom["confidence_error"])
        for name in ("eps_nc", "eps_c"):
            if name in fd.per_atom:
                per_atom[name] = split(fd.per_atom[name])
        if ens is not None:
            per_atom["ensemble_std"] = split(ens.per_atom["ensemble_std"])
            per_atom["forces_ensemble_mean"] = split(ens_pred.mean_forces)
        for k, (rec, atoms) in enumerate(zip(chunk, structures)):
            out = detach_reference(atoms)
            for name, arrays in per_atom.items():
                if name.startswith("eps") and not has_ref[k]:
                    continue
                out.arrays[name] = arrays[k]
            info = out.info
            info["model_energy"] = float(pred.energy[k])
            info["force_delta"] = float(fd.per_structure["force_delta"][k])
            info["force_delta_max"] = float(per_atom["force_delta"][k].max())
            if "force_delta_stress" in fd.per_structure and bool(pred.periodic[k]):
                info["force_delta_stress"] = float(fd.per_structure["force_delta_stress"][k])
            if conf is not None:
                info["confidence_error"] = float(conf.per_structure["confidence_error"][k])
            if has_ref[k]:
                info["eps_nc"] = float(fd.per_structure["eps_nc"][k])
                info["eps_c"] = float(fd.per_structure["eps_c"][k])
            if rot is not None:
                info["rotational_gradient"] = float(rot[k])
            if ens is not None:
                info["ensemble_std"] = float(ens.per_structure["ensemble_std"][k])
                info["ensemble_energy_std"] = float(ens.per_structure["ensemble_energy_std"][k])
                if has_ref[k]:
                    info["eps_ensemble"] = float(ens.per_structure["eps_ensemble"][k])
            info["source_file"] = rec.source
            info["source_index"] = rec.index
            out_atoms.append(out)
            rows.append(ScoreRow(
                source=rec.source, index=rec.index, tag=structure_tag(atoms), formula=atoms.get_chemical_formula(),
                n_atoms=len(atoms),
                energy_per_atom=info["model_energy"] / len(atoms), force_delta=info["force_delta"],
                force_delta_max=info["force_delta_max"], eps_nc=info.get("eps_nc"), eps_c=info.get("eps_c"),
            ))
        if progress is not None:
            progress(len(chunk))
    return out_atoms, rows
