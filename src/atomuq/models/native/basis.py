"""Edge featurisation: Bessel radial bases, real spherical harmonics (L_max = 3), smooth envelope."""

from __future__ import annotations

import math

import torch


def bessel_basis(r: torch.Tensor, cutoff: float, num_basis: int) -> torch.Tensor:
    """(E,) distances in Å -> (E, num_basis) sqrt(2/c) sin(n pi r / c) / r."""
    n = torch.arange(1, num_basis + 1, device=r.device, dtype=r.dtype)
    r = r.unsqueeze(-1)
    return math.sqrt(2.0 / cutoff) * torch.sin(n * math.pi * r / cutoff) / r


def polynomial_envelope(r: torch.Tensor, cutoff: float, p: int = 5) -> torch.Tensor:
    """Smooth cutoff (DimeNet form): 1 at r = 0, zero with p-1 vanishing derivatives at r = cutoff."""
    x = (r / cutoff).clamp(max=1.0)
    a = -(p + 1) * (p + 2) / 2.0
    b = p * (p + 2.0)
    c = -p * (p + 1) / 2.0
    env = 1.0 + a * x**p + b * x ** (p + 1) + c * x ** (p + 2)
    return torch.where(r < cutoff, env, torch.zeros_like(env))


def spherical_harmonics(unit: torch.Tensor, lmax: int = 3) -> torch.Tensor:
    """(E, 3) unit vectors -> (E, (lmax+1)^2) orthonormal real spherical harmonics, l = 0..lmax (lmax <= 3)."""
    if not 0 <= lmax <= 3:
        raise ValueError(f"lmax must be between 0 and 3, got {lmax}")
    x, y, z = unit.unbind(-1)
    pi = math.pi
    out = [torch.full_like(x, 0.5 * math.sqrt(1 / pi))]
    if lmax >= 1:
        c1 = math.sqrt(3 / (4 * pi))
        out += [c1 * y, c1 * z, c1 * x]
    if lmax >= 2:
        out += [
            0.5 * math.sqrt(15 / pi) * x * y,
            0.5 * math.sqrt(15 / pi) * y * z,
            0.25 * math.sqrt(5 / pi) * (3 * z**2 - 1),
            0.5 * math.sqrt(15 / pi) * x * z,
            0.25 * math.sqrt(15 / pi) * (x**2 - y**2),
        ]
    if lmax >= 3:
        out += [
            0.25 * math.sqrt(35 / (2 * pi)) * y * (3 * x**2 - y**2),
            0.5 * math.sqrt(105 / pi) * x * y * z,
            0.25 * math.sqrt(21 / (2 * pi)) * y * (5 * z**2 - 1),
            0.25 * math.sqrt(7 / pi) * z * (5 * z**2 - 3),
            0.25 * math.sqrt(21 / (2 * pi)) * x * (5 * z**2 - 1),
            0.25 * math.sqrt(105 / pi) * z * (x**2 - y**2),
            0.25 * math.sqrt(35 / (2 * pi)) * x * (x**2 - 3 * y**2),
        ]
    return torch.stack(out, dim=-1)
