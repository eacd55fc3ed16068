"""Reference methods by name: the shipped ones (gfn2-xtb, gfn1-xtb, emt, dft-pbe) and ``ase:MODULE:CLASS``."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from atomuq.core.errors import InputError
from atomuq.reference.ase_calculator import PREFIX, ase_method
from atomuq.reference.dft import DFT_PBE
from atomuq.reference.emt import EMT_METHOD
from atomuq.reference.method import ReferenceMethod
from atomuq.reference.xtb import GFN1_XTB, GFN2_XTB

#: every named reference method
METHODS: dict[str, ReferenceMethod] = {m.name: m for m in (GFN2_XTB, GFN1_XTB, EMT_METHOD, DFT_PBE)}


def available_methods() -> dict[str, str]:
    """Name and description of every registered method (plus the ase:MODULE:CLASS form)."""
    out = {name: m.description for name, m in METHODS.items()}
    out["ase:MODULE:CLASS"] = "any ASE calculator class, built with no arguments plus --option values"
    return out


def get_method(spec: str | ReferenceMethod, options: Mapping[str, Any] | None = None,
               log: Callable[[str], None] | None = None) -> ReferenceMethod:
    """Resolve a method name (or ase:MODULE:CLASS) to a ReferenceMethod; InputError if unknown or not importable.

    log (if given) receives one-line notes (a deprecated spelling).
    """
    if isinstance(spec, ReferenceMethod):
        return spec.with_options(options)
    key = spec.strip()
    if key.lower() in METHODS:
        return METHODS[key.lower()].with_options(options)
    if key.startswith(PREFIX):
        return ase_method(key, options, log)
    known = ", ".join(available_methods())
    raise InputError(f"unknown reference method {spec!r}; choose one of: {known}")
