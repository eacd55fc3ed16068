"""Choosing the torch device from a user's string."""

from __future__ import annotations

import torch

from atomuq.core.errors import InputError


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' -> torch.device; InputError when malformed or CUDA is missing."""
    if name != "cpu" and not name.startswith("cuda"):
        raise InputError(f"device must be cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r}: CUDA is not available on this machine (torch {torch.__version__}); use cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"device must be cpu, cuda or cuda:N, got {name!r}") from exc
