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


def _harmonic_gradient_table() -> torch.Tensor:
    """(16, 3, 10) coefficients: d Y_a / d u_k = sum_m T[a, k, m] m(u), monomials m = 1 x y z xx yy zz xy xz yz."""
    pi = math.pi
    c1 = math.sqrt(3 / (4 * pi))
    k1, k2, k3 = 0.5 * math.sqrt(15 / pi), 0.25 * math.sqrt(5 / pi), 0.25 * math.sqrt(15 / pi)
    c9, c10 = 0.25 * math.sqrt(35 / (2 * pi)), 0.5 * math.sqrt(105 / pi)
    c11, c12, c14 = 0.25 * math.sqrt(21 / (2 * pi)), 0.25 * math.sqrt(7 / pi), 0.25 * math.sqrt(105 / pi)
    one, x, y, z, xx, yy, zz, xy, xz, yz = range(10)
    rows: list[tuple[dict, dict, dict]] = [
        ({}, {}, {}),  # l = 0
        ({}, {one: c1}, {}), ({}, {}, {one: c1}), ({one: c1}, {}, {}),  # y, z, x
        ({y: k1}, {x: k1}, {}),  # xy
        ({}, {z: k1}, {y: k1}),  # yz
        ({}, {}, {z: 6 * k2}),  # 3z² - 1
        ({z: k1}, {}, {x: k1}),  # xz
        ({x: 2 * k3}, {y: -2 * k3}, {}),  # x² - y²
        ({xy: 6 * c9}, {xx: 3 * c9, yy: -3 * c9}, {}),  # y (3x² - y²)
        ({yz: c10}, {xz: c10}, {xy: c10}),  # xyz
        ({}, {zz: 5 * c11, one: -c11}, {yz: 10 * c11}),  # y (5z² - 1)
        ({}, {}, {zz: 15 * c12, one: -3 * c12}),  # z (5z² - 3)
        ({zz: 5 * c11, one: -c11}, {}, {xz: 10 * c11}),  # x (5z² - 1)
        ({xz: 2 * c14}, {yz: -2 * c14}, {xx: c14, yy: -c14}),  # z (x² - y²)
        ({xx: 3 * c9, yy: -3 * c9}, {xy: -6 * c9}, {}),  # x (x² - 3y²)
    ]
    table = torch.zeros(16, 3, 10, dtype=torch.float64)
    for a, row in enumerate(rows):
        for k, terms in enumerate(row):
            for m, value in terms.items():
                table[a, k, m] = value
    return table


_HARMONIC_GRADIENT = _harmonic_gradient_table()


def spherical_harmonics_vjp(unit: torch.Tensor, grad: torch.Tensor, lmax: int = 3) -> torch.Tensor:
    """(E, 3): sum_a grad[:, a] dY_a/du of spherical_harmonics (its formulas as polynomials in the components of u,
    not restricted to the sphere: project onto the tangent plane for the gradient in the direction of a vector)."""
    size = (lmax + 1) ** 2
    x, y, z = unit.unbind(-1)
    monomials = torch.stack([torch.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z], dim=-1)
    table = _HARMONIC_GRADIENT[:size].to(unit).reshape(size, 30)
    return (grad.mm(table).view(-1, 3, 10) * monomials[:, None, :]).sum(-1)
