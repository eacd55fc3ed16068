"""ASE's effective-medium theory for metals, with the asap3 cutoff convention (asap_cutoff=True)."""

from __future__ import annotations

from typing import Any

from ase.calculators.calculator import Calculator
from ase.data import chemical_symbols

from atomuq.reference.method import ReferenceMethod


def emt_calculator(**options: Any) -> Calculator:
    """ASE's EMT calculator with asap_cutoff=True unless `options` say otherwise."""
    from ase.calculators.emt import EMT

    return EMT(**{"asap_cutoff": True, **options})


def emt_elements() -> frozenset[int]:
    """Atomic numbers EMT has parameters for."""
    from ase.calculators.emt import parameters

    return frozenset(chemical_symbols.index(s) for s in parameters)


EMT_METHOD = ReferenceMethod(
    "emt", "ASE effective-medium theory, metals (asap_cutoff=True)", emt_calculator, elements=emt_elements())
