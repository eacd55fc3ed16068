"""The --ensemble option: member specs to loaded members, checked against the structures before any work."""

from __future__ import annotations

from typing import Sequence

from atomuq.core.io import Record
from atomuq.models.members import resolve_member
from atomuq.uq.ensemble import Member, check_members


def split_specs(values: Sequence[str] | None) -> list[str]:
    """Member specs from repeated and/or comma-separated option values."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


def load_ensemble(
    values: Sequence[str] | None, records: Sequence[Record], forces: str, device: str
) -> tuple[list[Member] | None, list[str] | None]:
    """(members, names) for --ensemble values, or (None, None) when the option was not given."""
    specs = split_specs(values)
    if not specs:
        return None, None
    members = [resolve_member(spec, device=device) for spec in specs]
    numbers = {int(z) for rec in records for z in set(rec.atoms.numbers.tolist())}
    check_members(members, numbers, forces, specs)
    return members, specs
