"""ASE calculator classes named MODULE:CLASS: the one parser and importer for every option that names one.

`--model ase:MODULE:CLASS`, `--ensemble ase:MODULE:CLASS` and `--method ase:MODULE:CLASS` all go
through here. Older spellings are read with a deprecation note: MODULE.CLASS (labelling's
`ase:MODULE.CLASS`) and a bare MODULE:CLASS (the old `--ensemble` form, see registry).
No torch, no atomuq model code: only importlib and ASE (reference layer; models import it from here).
"""

from __future__ import annotations

import importlib
from typing import Any

from ase.calculators.calculator import BaseCalculator

from atomuq.core.errors import AtomuqError, ModelFileError

EXAMPLE = "ase.calculators.emt:EMT"


def split_ase_class(path: str, where: str = "", error: type[AtomuqError] = ModelFileError) -> tuple[str, str, bool]:
    """(module, class name, old_spelling) from 'MODULE:CLASS', or from the deprecated 'MODULE.CLASS' (old_spelling True)."""
    module, sep, name = path.strip().partition(":")
    old = False
    if not sep:  # the labelling spelling MODULE.CLASS
        module, _, name = path.strip().rpartition(".")
        old = True
    if not module or not name or ":" in name:
        raise error(f"{where or path}: an ASE calculator class is written MODULE:CLASS, e.g. {EXAMPLE}")
    return module, name, old


def import_calculator_class(path: str, where: str = "", error: type[AtomuqError] = ModelFileError) -> type:
    """The class named by 'MODULE:CLASS' (or 'MODULE.CLASS'); `error` says what failed, naming `where`."""
    module_name, class_name, old = split_ase_class(path, where, error)
    where = where or path
    syntax = f" (an ASE calculator class is written MODULE:CLASS, e.g. {EXAMPLE})" if old else ""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise error(f"{where}: cannot import module {module_name} ({type(exc).__name__}: {exc}){syntax}") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise error(f"{where}: module {module_name} has no attribute {class_name}{syntax}")
    if not isinstance(cls, type):
        raise error(f"{where}: {module_name}:{class_name} is not a class; an ASE calculator class is written "
                    f"MODULE:CLASS, e.g. {EXAMPLE}")
    return cls


def build_calculator(
    path: str, where: str = "", error: type[AtomuqError] = ModelFileError, **options: Any
) -> BaseCalculator:
    """An instance of the calculator class 'MODULE:CLASS', built with `options` as keyword arguments."""
    cls = import_calculator_class(path, where, error)
    where = where or path
    if not issubclass(cls, BaseCalculator):
        raise error(f"{where}: {cls.__name__} is not an ASE calculator (not a subclass of ase's BaseCalculator)")
    try:
        return cls(**options)
    except Exception as exc:  # the calculator's own constructor failed
        raise error(f"{where}: {cls.__name__}() failed ({type(exc).__name__}: {exc})") from exc
