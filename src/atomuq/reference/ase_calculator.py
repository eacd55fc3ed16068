"""Any ASE calculator class as a reference method: ``ase:MODULE:CLASS`` (the syntax of ``--model`` too).

The older form ``ase:MODULE.CLASS`` (class after the last dot) is still read, with a note that it is
deprecated; a method given that way is named by its new spelling, and an interrupted labelling run
started under the old name still resumes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

from ase.calculators.calculator import Calculator

from atomuq.core.errors import InputError
from atomuq.reference.ase_class import import_calculator_class, split_ase_class
from atomuq.reference.method import ReferenceMethod

PREFIX = "ase:"
#: how an ASE calculator class is written, with an example
SPEC_FORM = "ase:MODULE:CLASS, e.g. ase:ase.calculators.emt:EMT"


def split_class_spec(spec: str) -> tuple[str, str, bool]:
    """(module, class name, deprecated) of 'ase:MODULE:CLASS' (or the deprecated 'ase:MODULE.CLASS'); InputError if neither."""
    rest = spec.strip()[len(PREFIX):] if spec.strip().startswith(PREFIX) else spec.strip()
    try:
        return split_ase_class(rest, f"--method {spec}", InputError)
    except InputError:
        raise InputError(f"--method {spec}: write {SPEC_FORM}") from None


def ase_class_calculator(module: str, name: str, **options: Any) -> Calculator:
    """Import `name` from `module` and build it with keyword `options`."""
    return import_calculator_class(f"{module}:{name}")(**options)


def ase_method(spec: str, options: Mapping[str, Any] | None = None,
               log: Callable[[str], None] | None = None) -> ReferenceMethod:
    """The ReferenceMethod of an ASE calculator class spec; InputError if it cannot be imported.

    log (if given) receives a note when the deprecated dotted spelling is used.
    """
    module, name, deprecated = split_class_spec(spec)
    canonical = f"{PREFIX}{module}:{name}"
    if deprecated and log is not None:
        log(f"--method {spec.strip()}: the dotted form is deprecated; write {canonical}")
    cls = import_calculator_class(f"{module}:{name}", f"--method {spec}", InputError)
    if not callable(cls):
        raise InputError(f"--method {spec}: {module}:{name} is not a calculator class")
    return ReferenceMethod(canonical, f"ASE calculator {module}:{name}", functools.partial(ase_class_calculator, module, name),
                           options=dict(options or {}), package=module.split(".")[0], strict_options=False,
                           aliases=(f"{PREFIX}{module}.{name}",))
