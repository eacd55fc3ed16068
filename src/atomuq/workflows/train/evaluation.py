"""Errors of a model on a labelled set (per epoch: training and validation metrics, and the error-log row)."""

from __future__ import annotations

import numpy as np

from atomuq.models.derivatives import evaluate, rotational_gradient_norm
from atomuq.models.native import NativeModel
from atomuq.workflows.error_log import LogWriter
from atomuq.workflows.losses import force_error_norm
from atomuq.workflows.train.data import LabelledData


def evaluate_set(model: NativeModel, data: LabelledData, batch_size: int, writer: LogWriter | None = None
                 ) -> dict[str, float]:
    """MAEs of a labelled set in eval mode (energy eV/atom, force components eV/Å), mean ‖Δ_rot‖ (eV);
    with a writer, the per-atom error norms (eV/Å) of direct and conservative forces go to the log."""
    was_training = model.training
    model.eval()
    sums = {"energy": 0.0, "forces": 0.0, "conservative": 0.0, "rot": 0.0}
    try:
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(start + batch_size, len(data))))
            batch, targets = data.batch(idx, model.device, model.dtype)
            # autograd, as for the losses: a run's metrics and error log do not depend on the inference path
            pred = evaluate(model, batch, conservative=True, rotational=True, own_derivatives=False)
            direct, conservative = pred.forces_direct.detach(), pred.forces_conservative.detach()
            if writer is not None:
                writer.write(int(data.offsets[start]),
                             force_error_norm(direct, targets.forces).cpu().numpy().astype(np.float32),
                             force_error_norm(conservative, targets.forces).cpu().numpy().astype(np.float32))
            sums["forces"] += float((direct - targets.forces).abs().sum())
            sums["conservative"] += float((conservative - targets.forces).abs().sum())
            sums["rot"] += float(rotational_gradient_norm(pred).detach().sum())
            if targets.has_energy:
                sums["energy"] += float(((pred.energy.detach() - targets.energy) / batch.atoms_per_structure).abs().sum())
    finally:
        model.train(was_training)
    components = 3 * data.n_atoms
    out = {"forces_mae": sums["forces"] / components, "conservative_forces_mae": sums["conservative"] / components,
           "rotational_gradient": sums["rot"] / len(data)}
    if data.energy is not None:
        out["energy_mae_per_atom"] = sums["energy"] / len(data)
    return out
