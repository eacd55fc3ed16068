"""The --model and --ensemble options: one model spec (atomuq.models.registry) to loaded models, checked before any work."""

from __future__ import annotations

from typing import Sequence


from atomuq.cli.common import note
from atomuq.core.errors import InputError
from atomuq.core.io import Record
from atomuq.core.validate import check_records
from atomuq.models.catalog import catalog, choose_model
from atomuq.models.protocol import AtomisticModel
from atomuq.models.registry import DEFAULT_MODEL, normalise_spec, resolve_model
from atomuq.uq.ensemble import check_members


def chosen_spec(spec: str | None, records: Sequence[Record] | None) -> str:
    """The --model value, or when it is not given the bundled model for the records' elements and periodicity
    (models.catalog.choose_model, said on stderr), or the default model without records."""
    if spec is not None:
        return spec
    if not records:
        return DEFAULT_MODEL
    try:
        choice = choose_model({int(z) for rec in records for z in rec.atoms.numbers},
                              (bool(rec.atoms.pbc.any()) for rec in records))
    except InputError:  # name the first structure with an element no bundled model knows, as check_records does
        known = sorted({z for entry in catalog() if entry.member_of is None for z in entry.elements})
        check_records(records, known, min_distance=0.0, knower="any bundled model; give --model one that knows it")
        raise
    note(f"--model not given: using {choice.reason}")
    return choice.entry.name


def load_model_option(spec: str | None, device: str, records: Sequence[Record] | None = None) -> AtomisticModel:
    """The model a --model value names (None: chosen_spec's choice for the records); a deprecated spelling is
    read with a note on stderr."""
    canonical, deprecation = normalise_spec(chosen_spec(spec, records))
    if deprecation:
        note(deprecation)
    return resolve_model(canonical, device=device)


def split_specs(values: Sequence[str] | None) -> list[str]:
    """Member specs from repeated and/or comma-separated option values."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


def resolve_members(specs: Sequence[str], device: str) -> list[AtomisticModel]:
    """Each spec through the model resolver, as --model; a deprecated spelling is read with a note on stderr."""
    return [load_model_option(spec, device) for spec in specs]


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
