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


def bessel_basis_and_derivative(r: torch.Tensor, cutoff: float, num_basis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(E,) distances in Å -> bessel_basis (E, num_basis) and its derivative in r (1/Å²)."""
    k = torch.arange(1, num_basis + 1, device=r.device, dtype=r.dtype) * (math.pi / cutoff)
    r = r.unsqueeze(-1)
    arg = k * r
    basis = math.sqrt(2.0 / cutoff) * torch.sin(arg) / r
    derivative = (math.sqrt(2.0 / cutoff) * k * torch.cos(arg) - basis) / r
    return basis, derivative


def polynomial_envelope_derivative(r: torch.Tensor, cutoff: float, p: int = 5) -> torch.Tensor:
    """d polynomial_envelope / dr (1/Å), zero at and beyond the cutoff."""
    x = (r / cutoff).clamp(max=1.0)
    a = -(p + 1) * (p + 2) / 2.0
    b = p * (p + 2.0)
    c = -p * (p + 1) / 2.0
    d = (a * p + (b * (p + 1) + c * (p + 2) * x) * x) * x ** (p - 1) / cutoff
    return torch.where(r < cutoff, d, torch.zeros_like(d))


def spherical_harmonics_vjp(unit: torch.Tensor, grad: torch.Tensor, lmax: int = 3) -> torch.Tensor:
    """(E, 3): sum_a grad[:, a] dY_a/du of spherical_harmonics (its formulas as polynomials in the components of u,
    not restricted to the sphere: project onto the tangent plane for the gradient in the direction of a vector).

    Fastest when the columns of unit and grad are contiguous (views of (3, E) and (K, E) tensors)."""
    size = (lmax + 1) ** 2
    if size < 16:
        grad = torch.nn.functional.pad(grad, (0, 16 - size))
    pi = math.pi
    c1 = math.sqrt(3 / (4 * pi))
    k1, k2, k3 = 0.5 * math.sqrt(15 / pi), 0.25 * math.sqrt(5 / pi), 0.25 * math.sqrt(15 / pi)
    c9, c10 = 0.25 * math.sqrt(35 / (2 * pi)), 0.5 * math.sqrt(105 / pi)
    c11, c12, c14 = 0.25 * math.sqrt(21 / (2 * pi)), 0.25 * math.sqrt(7 / pi), 0.25 * math.sqrt(105 / pi)
    x, y, z = unit.unbind(-1)
    g = grad.unbind(-1)
    xy, xz, yz = x * y, x * z, y * z
    d = x * x - y * y  # x² - y²
    q = 5 * z * z - 1  # 5z² - 1
    gx = (c1 * g[3] + k1 * (g[4] * y + g[7] * z) + (2 * k3) * g[8] * x + (6 * c9) * g[9] * xy + c10 * g[10] * yz
          + c11 * g[13] * q + (2 * c14) * g[14] * xz + (3 * c9) * g[15] * d)
    gy = (c1 * g[1] + k1 * (g[4] * x + g[5] * z) - (2 * k3) * g[8] * y + (3 * c9) * g[9] * d + c10 * g[10] * xz
          + c11 * g[11] * q - (2 * c14) * g[14] * yz - (6 * c9) * g[15] * xy)
    gz = (c1 * g[2] + k1 * (g[5] * y + g[7] * x) + (6 * k2) * g[6] * z + c10 * g[10] * xy
          + (10 * c11) * (g[11] * y + g[13] * x) * z + c12 * g[12] * (15 * z * z - 3) + c14 * g[14] * d)
    return torch.stack([gx, gy, gz], dim=-1)
