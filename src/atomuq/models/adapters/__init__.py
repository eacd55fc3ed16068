"""Third-party models through the atomuq model protocol.

Each adapter turns atomuq's Batch into the other package's input with the edge vectors rebuilt
in torch from batch.positions and batch.cell, so that conservative forces, virial stress and
the rotational gradient come from atomuq.models.derivatives like for the native model.
The packages are optional extras and imported only when an adapter is used:

- orb.py: Orb-v2 / Orb-v3 direct and conservative models (pip install 'atomuq[orb]').
- metatomic.py: metatomic models, e.g. PET / PET-MAD / UPET with their non-conservative force
  head (pip install 'atomuq[metatomic]').
- ase_calculator.py: any ASE calculator (energies and forces only; no autograd).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from atomuq.core.errors import AtomuqError


class MissingPackageError(AtomuqError, ImportError):
    """An optional package an adapter needs is not installed; the message names the atomuq extra."""


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or raise MissingPackageError saying which atomuq extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingPackageError(
            f"this model needs the optional package {module.split('.')[0]!r}, which is not installed "
            f"({exc}); install it with: pip install 'atomuq[{extra}]'"
        ) from exc
