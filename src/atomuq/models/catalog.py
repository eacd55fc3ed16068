"""The catalog of bundled models (data/models/catalog.json): what each is for, and the model a command takes when
--model is not given.

Each bundled model file is one catalog entry: its domain (molecular: isolated molecules; materials: periodic
solids and liquids), its reference method, the data it was trained on, and, for an ensemble member, the model it
is a member of. The elements come from the model file itself, so the catalog cannot disagree with the weights.
The catalog lists models in order of preference; choose_model takes the first primary (non-member) model of the
input's domain that knows every element of the input, else the first primary model of any domain that does, and
says which and why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from ase.data import chemical_symbols

from atomuq.core.errors import InputError, ModelFileError
from atomuq.models.checkpoint import load_model
from atomuq.models.registry import bundled_dir

DOMAINS = ("molecular", "materials")
CATALOG_FILE = "catalog.json"


@dataclass(frozen=True)
class CatalogEntry:
    """One bundled model: name, file, domain, reference method, training data, elements (atomic numbers) and the
    primary model it is an ensemble member of (None for a primary model)."""

    name: str
    path: Path
    domain: str
    reference: str
    data: str
    elements: tuple[int, ...]
    member_of: str | None = None

    @property
    def symbols(self) -> str:
        """The elements as symbols, space separated."""
        return " ".join(chemical_symbols[z] for z in self.elements)

    def knows(self, numbers: Iterable[int]) -> bool:
        """Whether the model knows every atomic number given."""
        return set(numbers) <= set(self.elements)


def catalog(folder: Path | None = None) -> list[CatalogEntry]:
    """Every bundled model in order of preference, checked against the model files (ModelFileError if they differ)."""
    folder = bundled_dir() if folder is None else folder
    path = folder / CATALOG_FILE
    files = {p.stem: p for p in sorted(folder.glob("*.pt"))}
    stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in [*files.values(), path] if p.exists())
    return list(_read_catalog(path, tuple(files.items()), stamp))


@lru_cache(maxsize=4)
def _read_catalog(path: Path, files: tuple[tuple[str, Path], ...], stamp: tuple) -> tuple[CatalogEntry, ...]:
    try:
        rows = json.loads(path.read_text())["models"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{path}: not a readable model catalog ({type(exc).__name__}: {exc})") from exc
    by_file = dict(files)
    names = [row.get("name") for row in rows]
    unlisted = sorted(set(by_file) - set(names))
    missing = sorted(set(names) - set(by_file))
    if unlisted or missing:
        raise ModelFileError(f"{path}: the catalog and the model files differ (files not listed: {unlisted or 'none'}; "
                             f"listed without a file: {missing or 'none'}); add each bundled model to the catalog")
    entries = []
    for row in rows:
        if row.get("domain") not in DOMAINS:
            raise ModelFileError(f"{path}: model {row['name']}: domain {row.get('domain')!r}, expected one of {DOMAINS}")
        if row.get("member_of") is not None and row["member_of"] not in names:
            raise ModelFileError(f"{path}: model {row['name']} is a member of {row['member_of']!r}, which is not listed")
        model = load_model(by_file[row["name"]])
        entries.append(CatalogEntry(row["name"], by_file[row["name"]], row["domain"], row.get("reference", "-"),
                                    row.get("data", "-"), tuple(int(z) for z in model.config.elements),
                                    row.get("member_of")))
    return tuple(entries)


def input_domain(periodic: Iterable[bool]) -> str | None:
    """materials if every structure is periodic, molecular if none is, None (no preference) for a mix."""
    flags = list(periodic)
    if flags and all(flags):
        return "materials"
    if not any(flags):
        return "molecular"
    return None


@dataclass(frozen=True)
class ModelChoice:
    """The model chosen for an input: its catalog entry and a sentence saying why."""

    entry: CatalogEntry
    reason: str


def choose_model(numbers: Iterable[int], periodic: Iterable[bool], entries: list[CatalogEntry] | None = None
                 ) -> ModelChoice:
    """The bundled model for structures with these atomic numbers and periodicity (module doc), or an InputError
    naming the elements no bundled model knows."""
    numbers = sorted({int(z) for z in numbers})
    domain = input_domain(periodic)
    primaries = [e for e in (catalog() if entries is None else entries) if e.member_of is None]
    knowing = [e for e in primaries if e.knows(numbers)]
    symbols = " ".join(chemical_symbols[z] for z in numbers)
    kind = {"materials": "periodic", "molecular": "non-periodic", None: "mixed periodic and non-periodic"}[domain]
    for entry in knowing:
        if entry.domain == domain:
            return ModelChoice(entry, f"{entry.name}, the bundled {entry.domain} model that knows {symbols} "
                                      f"({kind} input)")
    if knowing:
        entry = knowing[0]
        return ModelChoice(entry, f"{entry.name}, the first bundled model that knows {symbols} ({entry.domain} model; "
                                  f"no bundled {domain or 'single-domain'} model knows them)")
    unknown = " ".join(chemical_symbols[z] for z in numbers if not any(z in e.elements for e in primaries))
    known = "; ".join(f"{e.name}: {e.symbols}" for e in primaries) or "none installed"
    what = f"element(s) {unknown}" if unknown else f"the combination {symbols}"
    raise InputError(f"{what} not supported by any bundled model ({known}); give --model a model that knows "
                     "them (atomuq models lists the bundled ones; --help of --model lists every spec form)")
