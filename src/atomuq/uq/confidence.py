"""Confidence head read-out (Orb-v3 Algorithm 1): bin probabilities and expected per-atom force error."""

from __future__ import annotations

import torch

from atomuq.core.batch import Batch, scatter_mean
from atomuq.uq.result import UQResult


def bin_centres(edges: torch.Tensor) -> torch.Tensor:
    """(K,) centres of K bins given (K+1,) edges, eV/Å."""
    return 0.5 * (edges[1:] + edges[:-1])


def confidence(logits: torch.Tensor, edges: torch.Tensor, batch: Batch) -> UQResult:
    """Per-atom expected force error sum_b p_b * centre_b (eV/Å); per-structure mean (eV/Å)."""
    probs = torch.softmax(logits, dim=-1)
    expected = probs @ bin_centres(edges).to(probs)
    return UQResult(
        per_atom={"confidence_error": expected},
        per_structure={"confidence_error": scatter_mean(expected, batch.structure_index, batch.num_structures)},
    )


def error_bins(errors: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bin index of each per-atom force error (eV/Å); errors beyond the last edge go to the last bin."""
    return torch.bucketize(errors.detach(), edges[1:-1].to(errors), right=True)
