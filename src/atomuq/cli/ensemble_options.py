"""The --ensemble option: member specs (the one model spec of --model) to loaded members, checked before any work."""

from __future__ import annotations

from typing import Sequence

from atomuq.cli.common import note
from atomuq.core.io import Record
from atomuq.models.protocol import AtomisticModel
from atomuq.models.registry import normalise_spec, resolve_model, spec_help
from atomuq.uq.ensemble import check_members


def ensemble_help() -> str:
    """Help text of --ensemble, listing every model-spec form."""
    return ("Ensemble members, each named like --model (repeat the option or separate by commas): "
            f"{spec_help(one_line=True)}.")


def split_specs(values: Sequence[str] | None) -> list[str]:
    """Member specs from repeated and/or comma-separated option values."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


def resolve_members(specs: Sequence[str], device: str) -> list[AtomisticModel]:
    """Each spec through the model resolver; a deprecated spelling is read with a note on stderr."""
    members = []
    for spec in specs:
        canonical, deprecation = normalise_spec(spec)
        if deprecation:
            note(deprecation)
        members.append(resolve_model(canonical, device=device))
    return members


def load_ensemble(
    values: Sequence[str] | None, records: Sequence[Record], forces: str, device: str
) -> tuple[list[AtomisticModel] | None, list[str] | None]:
    """(members, names) for --ensemble values, or (None, None) when the option was not given."""
    specs = split_specs(values)
    if not specs:
        return None, None
    members = resolve_members(specs, device)
    numbers = {int(z) for rec in records for z in set(rec.atoms.numbers.tolist())}
    check_members(members, numbers, forces, specs)
    return members, specs
