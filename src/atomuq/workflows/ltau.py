"""LTAU-FF workflows: fit an estimator from training error logs, score structures, calibrate on held-out data."""

from __future__ import annotations

import contextlib
import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from ase import Atoms

import atomuq
from atomuq.core.batch import Batch
from atomuq.core.errors import InputError
from atomuq.core.io import Record, atomic_path, detach_reference, file_sha256, read_structures, reference_forces
from atomuq.core.schema import LTAU, Provenance, write_results
from atomuq.core.validate import check_records
from atomuq.models.checkpoint import weights_fingerprint
from atomuq.models.derivatives import evaluate
from atomuq.models.protocol import AtomisticModel
from atomuq.uq.ltau.calibration import ReliabilityCurve, ScaleFit, fit_scale, reliability_curve
from atomuq.uq.ltau.estimator import LTAUEstimator, LTAUPrediction, fit_estimator
from atomuq.uq.ltau.index import build_index
from atomuq.uq.result import split_outputs
from atomuq.uq.ltau.distribution import ErrorDistribution
from atomuq.workflows.error_log import FORCE_KINDS, METADATA, ErrorLog, load_error_log
from atomuq.models.provenance import model_name, model_provenance
from atomuq.workflows.score import structure_tag

Progress = Callable[[int], None] | None


def load_runs(log_dirs: Sequence[str | Path], kind: str = "direct", skip_epochs: int | None = None
              ) -> tuple[list[ErrorDistribution], list[ErrorLog]]:
    """Error distributions (eV/Å) of several runs over the same atoms, from logs of either form (full or
    compact), each over the epochs after its first skip_epochs (None: every epoch it holds), and the runs' logs."""
    if kind not in FORCE_KINDS:
        raise InputError(f"unknown error kind {kind!r}; use direct or conservative")
    if not log_dirs:
        raise InputError("give at least one error-log folder (<run_dir>/error_log)")
    logs = [load_error_log(d) for d in log_dirs]
    first = logs[0]
    trajectories = []
    for log in logs:
        if log.n_atoms != first.n_atoms or not np.array_equal(log.atom_numbers, first.atom_numbers):
            raise InputError(f"{log.directory}: logs {log.n_atoms} atoms that differ from {first.directory} "
                             f"({first.n_atoms}); LTAU needs every run on the same training atoms in the same order")
        if log.metadata.get("training_data_hash") != first.metadata.get("training_data_hash"):
            raise InputError(f"{log.directory}: trained on other data than {first.directory} (training-data hash)")
        trajectories.append(log.distribution(kind, skip_epochs))
    return trajectories, logs


def check_log_model(logs: Sequence[ErrorLog], model: AtomisticModel) -> None:
    """Raise InputError unless the model's weights are those of a logged epoch of one of the runs (the error log
    stores each epoch's weights fingerprint): descriptors of another model do not match the logged errors."""
    fingerprint = weights_fingerprint(model)
    if any(fingerprint in log.metadata.get("model_fingerprints", []) for log in logs):
        return
    log = logs[0]
    logged = log.metadata.get("model_fingerprints") or ["none recorded"]
    runs = ", ".join(str(run.directory / METADATA) for run in logs)
    raise InputError(
        f"{runs}: written by the model of run {log.metadata.get('run_id', '?')} ({log.directory.parent / 'best.pt'}, "
        f"weights fingerprint {logged[-1]} at its last epoch), but {model_name(model)} has fingerprint {fingerprint} "
        "and wrote none of these logs; give that run's model with --model (its best.pt or last.pt)"
    )


def training_records(log: ErrorLog, train_paths: Sequence[str | Path]) -> list[Record]:
    """The training structures of an error log, in its atom order, read from the given files (matched by SHA-256)."""
    entries = log.metadata.get("training_files") or []
    if not entries:
        raise InputError(f"{log.directory}: the error log names no training files")
    by_hash: dict[str, Path] = {}
    for path in map(Path, train_paths):
        if not path.is_file():
            raise InputError(f"{path}: training file not found")
        by_hash[file_sha256([path])[1][0]] = path
    files = []
    for entry in entries:
        path = by_hash.get(entry.get("sha256"))
        if path is None:
            raise InputError(f"{log.directory}: the run was trained on {entry.get('path')} (SHA-256 "
                             f"{str(entry.get('sha256'))[:12]}…) but no --train file has that content; "
                             f"give the exact training files ({', '.join(map(str, train_paths))} do not match)")
        files.append(read_structures([path]))
    if log.structure_frames is not None:
        try:
            records = [files[int(f)][int(i)] for f, i in log.structure_frames]
        except IndexError as exc:
            raise InputError(f"{log.directory}: its structure frames point outside the training files ({exc})") from exc
    else:
        records = [rec for recs in files for rec in recs]
    numbers = np.concatenate([rec.atoms.numbers for rec in records])
    if len(records) != len(log.structure_offsets) - 1 or not np.array_equal(numbers, log.atom_numbers):
        raise InputError(f"{log.directory}: the training structures read ({len(records)}, {len(numbers)} atoms) do "
                         f"not match the log ({len(log.structure_offsets) - 1} structures, {log.n_atoms} atoms)")
    return records


def _descriptors(features: torch.Tensor | None, model: AtomisticModel) -> np.ndarray:
    """Node features as float32 numpy descriptors; InputError when the model exposes none."""
    if features is None:
        raise InputError(f"{model_name(model)} exposes no per-atom node features; LTAU needs them as descriptors")
    return features.detach().cpu().float().numpy()


def compute_descriptors(model: AtomisticModel, structures: Sequence[Atoms], batch_size: int = 16,
                        progress: Progress = None, out: str | Path | None = None) -> np.ndarray:
    """Per-atom descriptors (N, d) float32: the model's last message-passing features, structures concatenated.

    out: a .npy file to write them to batch by batch (written atomically) and return memory-mapped, so that a
    training set of 10^7 atoms never holds its descriptors in memory."""
    total = sum(len(atoms) for atoms in structures)
    chunks: list[np.ndarray] = []
    with contextlib.ExitStack() as stack:
        target: np.ndarray | None = None
        row = 0
        for start in range(0, len(structures), batch_size):
            part = list(structures[start : start + batch_size])
            batch = Batch.from_atoms(part, device=model.device, dtype=model.dtype)
            with torch.no_grad():
                features = _descriptors(model(batch).node_features, model)
            if out is None:
                chunks.append(features)
            else:
                if target is None:
                    tmp = stack.enter_context(atomic_path(out))
                    target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, features.shape[1]))
                target[row : row + len(features)] = features
                row += len(features)
            if progress is not None:
                progress(len(part))
        if target is not None:
            target.flush()
            del target
    if out is None:
        return np.concatenate(chunks)
    return np.load(out, mmap_mode="r")


def fit_from_logs(
    log_dirs: Sequence[str | Path],
    model: AtomisticModel,
    train_paths: Sequence[str | Path],
    *,
    kind: str = "direct",
    atol: float | None = None,
    rtol: float = 0.0,
    skip_epochs: int | None = None,
    index_kind: str = "flat",
    index_parameters: dict[str, int] | None = None,
    batch_size: int = 16,
    progress: Progress = None,
    on_total: Progress = None,
    descriptor_file: str | Path | None = None,
) -> LTAUEstimator:
    """Fit an LTAU estimator: error logs of one or more runs (either form), descriptors of their training atoms
    from model. skip_epochs: ignore the first training epochs of every run (None: use every epoch each log holds).

    on_total(n) is called once with the number of training structures, progress(k) after each batch.
    descriptor_file: keep the descriptors in this .npy file (memory-mapped) rather than in memory.
    """
    trajectories, logs = load_runs(log_dirs, kind, skip_epochs)
    check_log_model(logs, model)
    log = logs[0]
    records = training_records(log, train_paths)
    check_records(records, model.elements, min_distance=0.0)  # training checked their contacts with its own setting
    if on_total is not None:
        on_total(len(records))
    descriptors = compute_descriptors(model, [r.atoms for r in records], batch_size, progress, descriptor_file)
    index = build_index(descriptors, index_kind, index_parameters)
    meta = {
        "model": model_name(model),
        "model_fingerprint": weights_fingerprint(model),
        "force_kind": kind,
        "skip_epochs": skip_epochs,
        "runs": [{"error_log": str(run.directory), "run_id": run.metadata.get("run_id"), "form": run.form,
                  "epochs": list(run.epochs) if skip_epochs is None else [skip_epochs + 1, run.epochs[1]]}
                 for run in logs],
        "training_data_hash": log.metadata.get("training_data_hash"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "atomuq_version": atomuq.__version__,
    }
    estimator = fit_estimator(trajectories, log.atom_numbers, log.reference_force_norms, index, atol, rtol,
                              metadata=meta)
    estimator.metadata["confidence_read_out"] = read_out(trajectories, logs, estimator.atol, rtol)
    return estimator


def read_out(runs: Sequence[ErrorDistribution], logs: Sequence[ErrorLog], atol: float, rtol: float) -> str:
    """How p_i at atol (eV/Å) + rtol·|F_ref| was read from the runs: 'exact', or which compact log interpolated it."""
    for run, log in zip(runs, logs):
        if run.bins is None or (rtol == 0 and atol in run.bins.edges):
            continue
        if rtol:
            return (f"interpolated: the per-atom thresholds atol + rtol·|F_ref| fall inside histogram bins of "
                    f"{log.directory}, where p_i is log-linear between edges")
        j = int(np.searchsorted(run.bins.edges, atol))
        lo, hi = run.bins.edges[max(j - 1, 0)], run.bins.edges[min(j, len(run.bins.edges) - 1)]
        return (f"interpolated: atol {atol:.4g} eV/Å lies between the histogram edges {lo:.4g} and {hi:.4g} of "
                f"{log.directory}, where p_i is log-linear; an atol at an edge (a power of ten, or the first run's "
                "mean final-epoch error, the default) is exact")
    return "exact"


@dataclass
class LTAURow:
    """One structure's LTAU summary."""

    source: str
    index: int
    tag: str
    formula: str
    n_atoms: int
    uncertainty: float
    uncertainty_max: float
    expected_error: float
    distance_max: float
    error: float | None


@dataclass
class ScoredAtoms:
    """LTAU predictions of a set of structures (per atom and per structure), with the model's force errors where
    references exist."""

    prediction: LTAUPrediction
    errors: np.ndarray | None  # per-atom ‖F − F_ref‖ (eV/Å) of the estimator's force kind, or None
    offsets: np.ndarray  # structure boundaries in the concatenated atom arrays
    forces: np.ndarray
    descriptors: np.ndarray  # (N, d) the model's node features, for other k or atol without a new model pass
    energies: np.ndarray | None = None  # (B,) the model's energies, eV
    provenance: Provenance | None = None  # the model that made the predictions


def predict_records(records: Sequence[Record], model: AtomisticModel, estimator: LTAUEstimator, k: int = 1,
                    atol: float | None = None, batch_size: int = 16, forces_key: str | None = None,
                    progress: Progress = None) -> ScoredAtoms:
    """LTAU per atom for many structures (checked against the estimator first) and force errors where labelled."""
    estimator.check_model(weights_fingerprint(model), model_name(model))
    for rec in records:
        estimator.check_elements(rec.atoms.numbers, rec.where)
    kind = estimator.metadata.get("force_kind", "direct")
    descriptors, forces, energies = [], [], []
    for start in range(0, len(records), batch_size):
        part = [r.atoms for r in records[start : start + batch_size]]
        batch = Batch.from_atoms(part, device=model.device, dtype=model.dtype)
        with torch.set_grad_enabled(kind == "conservative"):  # direct forces need no autograd graph
            pred = evaluate(model, batch, conservative=kind == "conservative").detach()
        descriptors.append(_descriptors(pred.node_features, model))
        chosen = pred.forces_direct if kind == "direct" else pred.forces_conservative
        forces.append(chosen.cpu().double().numpy())
        energies.append(pred.energy.cpu().double().numpy())
        if progress is not None:
            progress(len(part))
    descriptors_all, forces_all = np.concatenate(descriptors), np.concatenate(forces)
    offsets = np.concatenate([[0], np.cumsum([len(r.atoms) for r in records])])
    refs = [reference_forces(r.atoms, forces_key) for r in records]
    errors = None
    if all(f is not None and f.shape == (len(r.atoms), 3) for f, r in zip(refs, records)):
        errors = np.linalg.norm(forces_all - np.concatenate(refs), axis=1)
    prediction = estimator.predict(descriptors_all, k, atol, ptr=offsets)
    return ScoredAtoms(prediction, errors, offsets, forces_all, descriptors_all, np.concatenate(energies),
                       model_provenance(model))


def annotate(records: Sequence[Record], scored: ScoredAtoms, kind: str) -> tuple[list[Atoms], list[LTAURow]]:
    """Copies of the structures with the LTAU values per atom and per structure (core.schema keys ltau_*), the
    model's energy and forces of `kind` (the ASE results), and eps_nc/eps_c where references exist."""
    if scored.provenance is None or scored.energies is None:
        raise ValueError("annotate needs the energies and provenance that predict_records records")
    per_atom = {f"forces_{kind}": scored.forces, "forces": scored.forces}
    per_structure: dict[str, np.ndarray] = {"energy": scored.energies}
    error_name = "eps_nc" if kind == "direct" else "eps_c"
    if scored.errors is not None:
        counts = np.diff(scored.offsets)
        per_atom[error_name + "_atoms"] = scored.errors
        per_structure[error_name] = np.sqrt(np.add.reduceat(scored.errors**2, scored.offsets[:-1]) / (3.0 * counts))
    predicted_atoms, predicted_structures = scored.prediction.outputs()
    values = split_outputs({**per_atom, **predicted_atoms}, {**per_structure, **predicted_structures}, scored.offsets)
    out_atoms, rows = [], []
    for rec, result in zip(records, values):
        result.update(source_file=rec.source, source_index=rec.index)
        atoms = write_results(detach_reference(rec.atoms), result, scored.provenance, writer=LTAU)
        info = atoms.info
        out_atoms.append(atoms)
        rows.append(LTAURow(rec.source, rec.index, structure_tag(rec.atoms), rec.atoms.get_chemical_formula(),
                            len(rec.atoms), info["ltau_uncertainty"], info["ltau_uncertainty_max"],
                            info["ltau_expected_error"], info["ltau_distance_max"], info.get(error_name)))
    return out_atoms, rows


@dataclass
class CalibrationResult:
    """A fitted scale, and reliability curves at s = 1 and at the fitted s."""

    fit: ScaleFit
    before: ReliabilityCurve
    after: ReliabilityCurve


def calibrate(scored: ScoredAtoms, estimator: LTAUEstimator, n_bins: int = 10, where: str = "held-out set"
              ) -> CalibrationResult:
    """Fit the scale s on labelled, scored atoms (p_j refers to atol before, s·atol after)."""
    if scored.errors is None:
        raise InputError(f"{where}: calibration needs reference forces on every structure")
    p = scored.prediction.confidence
    atol = scored.prediction.threshold / estimator.scale
    fit = fit_scale(p, scored.errors, atol, n_bins)
    return CalibrationResult(fit, reliability_curve(p, scored.errors <= atol, n_bins),
                             reliability_curve(p, scored.errors <= fit.scale * atol, n_bins))
