"""Ensemble members by name: a bundled model, a model file, or an ASE calculator given as module:Class."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from ase.calculators.calculator import BaseCalculator

from atomuq.core.errors import ModelFileError
from atomuq.models.protocol import AtomisticModel
from atomuq.models.registry import bundled_models, resolve_model


def load_ase_calculator(spec: str) -> BaseCalculator:
    """Import module and instantiate Class (no arguments) from 'module:Class'; ModelFileError says what failed."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ModelFileError(f"{spec}: an ASE calculator is given as module:Class, e.g. ase.calculators.emt:EMT")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise ModelFileError(f"{spec}: cannot import module {module_name} ({type(exc).__name__}: {exc})") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ModelFileError(f"{spec}: module {module_name} has no attribute {class_name}")
    try:
        calculator = cls()
    except Exception as exc:  # the calculator's own constructor failed
        raise ModelFileError(f"{spec}: {class_name}() failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(calculator, BaseCalculator):
        raise ModelFileError(f"{spec}: {class_name} is not an ASE calculator (got {type(calculator).__name__})")
    return calculator


def resolve_member(spec: str, device: str | torch.device = "cpu") -> AtomisticModel | BaseCalculator:
    """A bundled model name or model file (an atomuq model), else module:Class (an ASE calculator)."""
    if spec in bundled_models() or Path(spec).exists():
        return resolve_model(spec, device=device)
    if ":" in spec:
        return load_ase_calculator(spec)
    raise ModelFileError(
        f"{spec}: not a bundled model ({', '.join(bundled_models()) or 'none installed'}), "
        "not an existing model file, and not an ASE calculator given as module:Class"
    )
