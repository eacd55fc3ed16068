"""GFN2-xTB and GFN1-xTB through tblite (an optional extra): molecules, and periodic cells at the Γ point."""

from __future__ import annotations

import functools
from typing import Any

from ase.calculators.calculator import Calculator

from atomuq.reference.method import ReferenceMethod

#: elements tblite's GFN parametrisations cover (H to Rn)
XTB_ELEMENTS = frozenset(range(1, 87))


def tblite_calculator(method: str, **options: Any) -> Calculator:
    """tblite's ASE calculator for `method` ('GFN2-xTB' or 'GFN1-xTB'), silent, with tblite keyword options."""
    from tblite.ase import TBLite  # optional dependency, imported lazily

    return TBLite(**{"method": method, "verbosity": 0, **options})


GFN2_XTB = ReferenceMethod(
    "gfn2-xtb", "GFN2-xTB (tblite), molecules", functools.partial(tblite_calculator, "GFN2-xTB"),
    elements=XTB_ELEMENTS, package="tblite")
GFN1_XTB = ReferenceMethod(
    "gfn1-xtb", "GFN1-xTB (tblite), periodic cells at the Γ point and molecules",
    functools.partial(tblite_calculator, "GFN1-xTB"), elements=XTB_ELEMENTS, package="tblite")
