"""A reference method: how to build its ASE calculator, its options, and what structures it accepts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.data import chemical_symbols

from atomuq.core.errors import InputError

#: what to run when a reference method's package is missing
INSTALL_HINT = "pip install 'atomuq[label]'"


@dataclass(frozen=True)
class ReferenceMethod:
    """A named reference method: how to build its ASE calculator and what it accepts."""

    name: str
    description: str
    factory: Callable[..., Calculator]  # module-level (picklable) when used with worker processes
    options: Mapping[str, Any] = field(default_factory=dict)
    periodic: bool = True  # accepts cells periodic in some direction
    molecular: bool = True  # accepts non-periodic structures
    elements: frozenset[int] | None = None  # None: any element
    package: str | None = None  # the pip package the calculator needs
    strict_options: bool = True  # reject options the calculator does not list in default_parameters
    aliases: tuple[str, ...] = ()  # other names of the same method (accepted in files written by earlier runs)

    def make_calculator(self) -> Calculator:
        """A fresh calculator; InputError with an install hint if its package is missing, or for unknown options."""
        try:
            calc = self.factory(**dict(self.options))
        except ImportError as exc:
            hint = f"install it with {INSTALL_HINT}" if self.package else "check that the module is installed"
            raise InputError(f"method {self.name}: cannot import {self.package or 'its calculator'} ({exc}); {hint}") from exc
        except TypeError as exc:
            raise InputError(f"method {self.name}: cannot build its calculator with options {dict(self.options)} "
                             f"({exc})") from exc
        known = getattr(calc, "default_parameters", None)
        if self.strict_options and self.options and known:
            unknown = sorted(set(self.options) - set(known))
            if unknown:  # ASE calculators store unknown keywords silently; say so instead
                raise InputError(f"method {self.name}: unknown option(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(known))}")
        return calc

    def with_options(self, options: Mapping[str, Any] | None) -> "ReferenceMethod":
        """The same method with extra calculator keyword options (they override the defaults)."""
        if not options:
            return self
        return dataclasses.replace(self, options={**dict(self.options), **dict(options)})

    def is_named(self, name: object) -> bool:
        """True when `name` (e.g. a file's label_method) is this method's name or one of its aliases."""
        return name == self.name or name in self.aliases

    def check(self, atoms: Atoms, where: str) -> None:
        """Raise InputError naming `where` if this method cannot handle the structure."""
        periodic = bool(np.any(atoms.pbc))
        if periodic and not self.periodic:
            raise InputError(f"{where}: method {self.name} handles molecules only (pbc=False); "
                             "use gfn1-xtb or emt for periodic cells, or set pbc=False")
        if not periodic and not self.molecular:
            raise InputError(f"{where}: method {self.name} needs a periodic cell; set a cell and pbc=True")
        if self.elements is not None:
            unknown = sorted(set(np.unique(atoms.numbers).tolist()) - set(self.elements))
            if unknown:
                names = ", ".join(chemical_symbols[z] for z in unknown)
                have = " ".join(chemical_symbols[z] for z in sorted(self.elements))
                raise InputError(f"{where}: element(s) {names} not supported by method {self.name} (it knows {have})")
