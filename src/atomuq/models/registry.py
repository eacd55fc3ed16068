"""One model-spec resolver: every option that names a model (--model, --ensemble members) goes through resolve_model.

A spec is, in this order:

- a bundled model name (the files in atomuq/data/models), or a registered short name
  (register_name: public pretrained models that ship with their package);
- PREFIX:REST for a registered prefix (register_spec): orb:PATH, metatomic:PATH,
  ase:MODULE:CLASS, and whatever else is registered (fairchem:PATH, ...);
- a path to an atomuq model file (.pt, written by atomuq train).

Older spellings are still read, with a deprecation note (normalise_spec): ase:MODULE.CLASS and
the old --ensemble form MODULE:CLASS both mean ase:MODULE:CLASS. spec_help() lists every form;
the CLI help of --model and --ensemble is generated from it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from atomuq.core.errors import ModelFileError
from atomuq.models.checkpoint import load_model
from atomuq.models.protocol import AtomisticModel

DEFAULT_MODEL = "molecular-small"

Device = str | torch.device


@dataclass(frozen=True)
class SpecForm:
    """One way of naming a model: syntax as shown in help, what it is, and how to load it.

    load(rest, device) gets the text after "PREFIX:" (for a short name, the empty string).
    extra: the atomuq extra that installs the package the loader needs (None: always there).
    """

    syntax: str
    description: str
    load: Callable[[str, Device], AtomisticModel]
    extra: str | None = None

    def help(self) -> str:
        """The description with the install hint of its extra (plain text: escape it for rich markup)."""
        return self.description + (f"; needs pip install 'atomuq[{self.extra}]'" if self.extra else "")


#: registered spec prefixes, PREFIX -> form of PREFIX:REST
SPEC_PREFIXES: dict[str, SpecForm] = {}
#: registered short names (public pretrained models), NAME -> form
SHORT_NAMES: dict[str, SpecForm] = {}


def register_spec(prefix: str, syntax: str, description: str, load: Callable[[str, Device], AtomisticModel],
                  extra: str | None = None) -> None:
    """Make PREFIX:REST a model spec everywhere (--model, --ensemble); load(rest, device) builds the model."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", prefix):
        raise ValueError(f"a spec prefix is a lower-case word, got {prefix!r}")
    SPEC_PREFIXES[prefix] = SpecForm(syntax, description, load, extra)


def register_name(name: str, description: str, load: Callable[[str, Device], AtomisticModel],
                  extra: str | None = None) -> None:
    """Make NAME a model spec everywhere (a public pretrained model); load("", device) builds the model."""
    if ":" in name or not name:
        raise ValueError(f"a short model name has no ':' and is not empty, got {name!r}")
    SHORT_NAMES[name] = SpecForm(name, description, load, extra)


def bundled_dir() -> Path:
    """Folder holding the bundled model files."""
    return Path(str(resources.files("atomuq") / "data" / "models"))


def bundled_models() -> dict[str, Path]:
    """Name -> path of every bundled model file."""
    folder = bundled_dir()
    return {p.stem: p for p in sorted(folder.glob("*.pt"))} if folder.is_dir() else {}


# --------------------------------------------------------------------------------------------
# the built-in prefixes (adapters imported only when used)


def _load_orb(rest: str, device: Device) -> AtomisticModel:
    from atomuq.models.adapters.orb import load_orb

    path = Path(rest)
    architecture, sep, tail = rest.partition(":")
    if not path.exists() and sep:
        return load_orb(tail, architecture, device=device)
    return load_orb(path, device=device)


def _load_metatomic(rest: str, device: Device) -> AtomisticModel:
    from atomuq.models.adapters.metatomic import load_metatomic

    return load_metatomic(rest, device=device)


def _load_fairchem(rest: str, device: Device) -> AtomisticModel:
    from atomuq.models.adapters.fairchem import load_fairchem

    return load_fairchem(rest, device=device)


def _load_chgnet(rest: str, device: Device) -> AtomisticModel:
    from atomuq.models.adapters.pretrained import load_chgnet

    return load_chgnet(device=device)


def _load_sevennet(rest: str, device: Device) -> AtomisticModel:
    from atomuq.models.adapters.pretrained import load_sevennet

    return load_sevennet("sevennet-0", device=device)


def _load_ase(rest: str, device: Device) -> AtomisticModel:
    from atomuq.models.adapters.ase_calculator import calculator_model

    return calculator_model(rest)


register_spec("orb", "orb:PATH or orb:ARCHITECTURE:PATH",
              "orb-models weights file; ARCHITECTURE (e.g. orb-v3-direct-20-omat) when the file name does not tell",
              _load_orb, extra="orb")
register_spec("metatomic", "metatomic:PATH", "an exported metatomic model, e.g. PET-MAD", _load_metatomic,
              extra="metatomic")
register_spec("fairchem", "fairchem:PATH",
              "a fairchem-core 2.x direct-force model (eSEN, UMA) saved by atomuq's fairchem adapter (save_fairchem)",
              _load_fairchem, extra="fairchem")
register_name("chgnet", "CHGNet 0.3.0 (MPtrj, PBE+U; weights in the chgnet package): conservative only, no Force Delta",
              _load_chgnet, extra="pretrained")
register_name("sevennet-0", "SevenNet-0 (MPtrj, PBE+U; weights in the sevenn package): conservative only, no Force Delta",
              _load_sevennet, extra="pretrained")
register_spec("ase", "ase:MODULE:CLASS",
              "an ASE calculator class built without arguments, e.g. ase:ase.calculators.emt:EMT (no Force Delta)",
              _load_ase)


# --------------------------------------------------------------------------------------------
# resolving

_OLD_CLASS_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def normalise_spec(spec: str) -> tuple[str, str | None]:
    """(the spec in today's syntax, a deprecation note or None) for an old spelling of ase:MODULE:CLASS."""
    spec = spec.strip()
    if Path(spec).exists() or spec in bundled_models() or spec in SHORT_NAMES:
        return spec, None
    prefix, _, rest = spec.partition(":")
    if prefix == "ase" and rest and ":" not in rest and "." in rest:
        module, _, name = rest.rpartition(".")
        new = f"ase:{module}:{name}"
        return new, f"{spec}: ase:MODULE.CLASS is deprecated; write {new}"
    if prefix not in SPEC_PREFIXES and _OLD_CLASS_SPEC.fullmatch(spec):
        new = f"ase:{spec}"
        return new, f"{spec}: an ASE calculator as MODULE:CLASS is deprecated; write {new}"
    return spec, None


def resolve_model(spec: str | None = None, device: Device = "cpu") -> AtomisticModel:
    """Any model spec (spec_help lists them; None: the default bundled model) -> a model in eval mode.

    A deprecated spelling gives a FutureWarning; the CLI shows normalise_spec's note instead.
    """
    name, note = normalise_spec(spec or DEFAULT_MODEL)
    if note:
        warnings.warn(note, FutureWarning, stacklevel=2)
    models = bundled_models()
    if name in models:
        return load_model(models[name], device=device)
    if name in SHORT_NAMES:
        return SHORT_NAMES[name].load("", device)
    prefix, sep, rest = name.partition(":")
    if sep and prefix in SPEC_PREFIXES and not Path(name).exists():
        form = SPEC_PREFIXES[prefix]
        if not rest:
            raise ModelFileError(f"{name}: expected {form.syntax}")
        return form.load(rest, device)
    path = Path(name)
    if path.exists():
        return load_model(path, device=device)
    raise ModelFileError(f"{name}: neither a bundled model nor an existing model file nor another model spec; "
                         f"a model is named by {spec_help(one_line=True)}")


def spec_forms() -> list[tuple[str, str]]:
    """(syntax, description with install hint) of every way to name a model, in the order they are tried."""
    names = ", ".join(bundled_models()) or "none installed"
    rows = [("NAME", f"a bundled model: {names}")]
    rows += [(name, form.help()) for name, form in SHORT_NAMES.items()]
    rows += [(form.syntax, form.help()) for form in SPEC_PREFIXES.values()]
    rows.append(("PATH", "an atomuq model file (.pt) written by atomuq train"))
    return rows


def spec_help(one_line: bool = False) -> str:
    """Help text of every model-spec form: one per line, or (one_line) 'SYNTAX (what); ...' for option help.

    Plain text: it contains square brackets (atomuq[orb]), so escape it (rich.markup.escape) before
    handing it to a renderer that reads markup, such as typer's help.
    """
    rows = spec_forms()
    if one_line:
        return "; ".join(f"{syntax} ({text})" for syntax, text in rows)
    width = max(len(syntax) for syntax, _ in rows)
    return "\n".join(f"{syntax:<{width}}  {text}" for syntax, text in rows)
