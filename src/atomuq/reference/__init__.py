"""Reference methods (tblite GFN2/GFN1-xTB, ASE's EMT, PySCF DFT, any ASE calculator class) and their files."""

from atomuq.reference.method import INSTALL_HINT, ReferenceMethod
from atomuq.reference.registry import METHODS, available_methods, get_method

__all__ = ["INSTALL_HINT", "METHODS", "ReferenceMethod", "available_methods", "get_method"]
