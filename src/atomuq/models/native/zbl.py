"""ZBL universal screened-nuclear repulsion, switched off smoothly at the covalent-radius sum."""

from __future__ import annotations

import torch
from ase.data import covalent_radii

from atomuq.models.native.basis import polynomial_envelope

COULOMB_EV_ANGSTROM = 14.399645  # e^2 / (4 pi eps0) in eV Å
BOHR_ANGSTROM = 0.529177
_PHI_C = (0.18175, 0.50986, 0.28022, 0.02817)
_PHI_D = (3.19980, 0.94229, 0.40290, 0.20162)


class ZBLRepulsion(torch.nn.Module):
    """Pair energy E_ij = (Z_i Z_j e^2 / r) phi(r / a) * envelope(r; r_cov,i + r_cov,j), non-learnable."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("radii", torch.tensor(covalent_radii, dtype=torch.get_default_dtype()), persistent=False)

    def forward(self, r: torch.Tensor, zi: torch.Tensor, zj: torch.Tensor) -> torch.Tensor:
        """(E,) distances in Å and atomic numbers -> (E,) pair energies in eV.

        Each pair is counted once per direction: halve when summing a full neighbour list.
        """
        zi_f, zj_f = zi.to(r.dtype), zj.to(r.dtype)
        a = 0.8854 * BOHR_ANGSTROM / (zi_f**0.23 + zj_f**0.23)
        x = r / a
        phi = sum(c * torch.exp(-d * x) for c, d in zip(_PHI_C, _PHI_D))
        r_max = (self.radii.to(r.dtype)[zi] + self.radii.to(r.dtype)[zj])
        envelope = polynomial_envelope(r / r_max, 1.0, p=6)
        return COULOMB_EV_ANGSTROM * zi_f * zj_f / r * phi * envelope
