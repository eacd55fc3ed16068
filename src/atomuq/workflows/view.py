"""An interactive viewer of scored structures: chemiscope's input built from the result-key registry, and one
self-contained HTML page that runs the chemiscope viewer shipped in the chemiscope wheel.

Every registered numeric result on the structures becomes a chemiscope property under its registry name, unit
and description (per-structure keys for the map and table, per-atom ``*_atoms`` keys for colouring the atoms);
per-atom force vectors become arrows. Nothing is fetched over the network: the page carries the viewer's
JavaScript and the data.
"""

from __future__ import annotations

import gzip
import html
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np

from atomuq.core.errors import AtomuqError, InputError
from atomuq.core.io import Record, atomic_path
from atomuq.core.schema import (ARRAYS, ATOM, INFO, PROVENANCE_KEYS, REGISTRY, STRUCTURE, Key, SchemaError, check_value,
                                written_by_atomuq)
from atomuq.workflows.score import structure_tag

#: the per-atom key that colours the atoms unless the user chooses another: u_i
DEFAULT_COLOR = "force_delta_atoms"
#: the map's axes and colour, first present wins: U_Δ against the error it predicts (methods.md 1)
MAP_X = ("force_delta", "ensemble_std", "ltau_uncertainty", "confidence_error", "force_delta_max", "step", "model_energy")
MAP_Y = ("eps_nc", "eps_ensemble", "eps_c", "ensemble_std", "ltau_expected_error", "ltau_uncertainty_max",
         "force_delta_max", "energy_drift", "temperature", "model_energy")
MAP_COLOR = ("eps_c", "ensemble_std", "ltau_uncertainty", "force_delta_max", "confidence_error", "model_energy")
#: per-atom force vectors drawn as arrows (off until chosen in the viewer), and their length in Å per eV/Å
ARROW_KEYS = ("forces_direct", "forces_conservative", "forces_ensemble_mean")
ARROW_SCALE = 0.3
#: palette of the atom colours (chemiscope's names), low values dark, high values bright; the scale runs from 0 to
#: this percentile of the colouring key over all atoms (a few outliers would otherwise leave every other atom dark)
ATOM_PALETTE = "viridis"
COLOR_PERCENTILE = 99.0
#: text keys never shown as properties (md_state is a long base64 blob; provenance goes to the metadata)
HIDDEN_TEXT = ("md_state", *PROVENANCE_KEYS)
#: where the JavaScript of chemiscope's viewer lies inside the chemiscope wheel
VIEWER_JS = ("sphinx", "static", "chemiscope.min.js")
#: properties the viewer adds (not result keys): name -> (unit, description)
VIEWER_PROPERTIES = {
    "index": ("", "0-based position of the structure in the viewed files"),
    "formula": ("", "chemical formula"),
    "label": ("", "label from the structure's own info keys (molecule, name, config_type, ...)"),
}
ENVIRONMENT_CUTOFF = 3.5  # Å, the neighbourhood chemiscope highlights around a chosen atom


class ViewerMissing(AtomuqError):
    """chemiscope, which carries the viewer, is not installed."""


def require_chemiscope() -> ModuleType:
    """The chemiscope module, or ViewerMissing saying how to install it."""
    try:
        import chemiscope
    except ImportError:
        raise ViewerMissing("atomuq view needs the chemiscope package (>= 1.1): pip install 'atomuq[view]'") from None
    return chemiscope


@dataclass
class ViewData:
    """chemiscope's input (a JSON-ready dict) and what it shows."""

    dataset: dict[str, Any]
    color: str | None
    color_max: float
    structure_keys: list[str]
    atom_keys: list[str]
    n_structures: int


# ------------------------------------------------------------------------------------------- checks


def _result_keys(atoms: Any) -> list[str]:
    """Registered result keys on a structure (provenance and source keys excluded)."""
    skip = (*PROVENANCE_KEYS, "source_file", "source_index")
    return [name for name, key in REGISTRY.items() if name not in skip and
            ((key.store == INFO and name in atoms.info) or (key.store == ARRAYS and name in atoms.arrays))]


def check_scored(records: Sequence[Record]) -> None:
    """InputError naming the first structure without atomuq results (and saying to run atomuq score first),
    or with a registered result of the wrong shape or not finite."""
    for rec in records:
        atoms = rec.atoms
        if not written_by_atomuq(atoms) or not _result_keys(atoms):
            raise InputError(f"{rec.where}: no atomuq results on this structure; run `atomuq score {rec.source} "
                             f"-o SCORED.extxyz` first and view the scored file")
        for name in _result_keys(atoms):
            key = REGISTRY[name]
            value = atoms.info[name] if key.store == INFO else atoms.arrays[name]
            try:
                check_value(key, value, len(atoms))
            except (SchemaError, TypeError, ValueError) as exc:
                raise InputError(f"{rec.where}: {exc}; score the structure again") from None


def _shown(key: Key, level: str) -> bool:
    """Whether a registered key becomes a chemiscope property at this level (numbers and short text)."""
    if key.level != level or key.store not in (INFO, ARRAYS) or key.name in HIDDEN_TEXT:
        return False
    return key.shape in ("", "int") or (level == STRUCTURE and key.shape in ("text", "bool"))


def per_atom_keys(records: Sequence[Record]) -> list[str]:
    """Registered per-atom numeric keys present on at least one structure, in registry order."""
    return [name for name, key in REGISTRY.items()
            if _shown(key, ATOM) and any(name in rec.atoms.arrays for rec in records)]


def choose_color(records: Sequence[Record], color: str | None) -> str | None:
    """The per-atom key that colours the atoms: `color` (InputError unless it is a registered per-atom number on
    every structure), else u_i where every structure has it, else the first such key, else None (elements)."""
    complete = [name for name in per_atom_keys(records) if all(name in rec.atoms.arrays for rec in records)]
    if color is None:
        if DEFAULT_COLOR in complete:
            return DEFAULT_COLOR
        return complete[0] if complete else None
    choices = ", ".join(complete) or "none (the atoms are coloured by element without --color)"
    key = REGISTRY.get(color)
    if key is None or not _shown(key, ATOM):
        raise InputError(f"--color {color}: not a per-atom atomuq result key; per-atom keys on these structures: "
                         f"{choices}")
    missing = next((rec for rec in records if color not in rec.atoms.arrays), None)
    if missing is not None:
        raise InputError(f"--color {color}: {missing.where} has no {color}; keys on every structure: {choices}")
    return color


# ------------------------------------------------------------------------------------------- properties


def _described(key: Key, missing: int, total: int) -> str:
    """The registry description, with the orientation and how many structures lack the value."""
    text = key.description
    if key.orientation and key.orientation != "not a score":
        text += f" ({key.orientation})"
    if missing:
        text += f"; not computed for {missing} of {total} structures (shown as NaN)"
    return text


def _structure_value(key: Key, info: dict) -> Any:
    """One structure's value of a per-structure key as chemiscope takes it (NaN or '' where absent)."""
    if key.name not in info:
        return "" if key.shape in ("text", "bool") else math.nan
    value = info[key.name]
    if key.shape == "bool":
        return "yes" if bool(value) else "no"
    return str(value) if key.shape == "text" else float(value)


def structure_properties(records: Sequence[Record]) -> dict[str, dict[str, Any]]:
    """chemiscope properties of the structures: the viewer's index, formula and label, then every registered
    per-structure number or short text present on any structure (units and descriptions from the registry)."""
    n = len(records)
    props: dict[str, dict[str, Any]] = {}

    def viewer(name: str, values: list) -> None:
        unit, description = VIEWER_PROPERTIES[name]
        props[name] = {"target": "structure", "values": values, "units": unit, "description": description}

    viewer("index", list(range(n)))
    viewer("formula", [rec.atoms.get_chemical_formula() for rec in records])
    labels = [structure_tag(rec.atoms) for rec in records]
    if any(labels):
        viewer("label", labels)
    for name, key in REGISTRY.items():
        if not _shown(key, STRUCTURE):
            continue
        have = sum(name in rec.atoms.info for rec in records)
        if have == 0:
            continue
        values = [_structure_value(key, rec.atoms.info) for rec in records]
        props[name] = {"target": "structure", "values": values, "units": key.unit,
                       "description": _described(key, n - have, n)}
    return props


def atom_properties(records: Sequence[Record]) -> dict[str, dict[str, Any]]:
    """chemiscope per-atom properties: every registered per-atom number present on any structure (NaN for the
    atoms of structures without it), concatenated over the structures in order."""
    props: dict[str, dict[str, Any]] = {}
    n = len(records)
    for name in per_atom_keys(records):
        key = REGISTRY[name]
        parts = [np.asarray(rec.atoms.arrays[name], dtype=float).reshape(-1) if name in rec.atoms.arrays
                 else np.full(len(rec.atoms), math.nan) for rec in records]
        missing = sum(name not in rec.atoms.arrays for rec in records)
        props[name] = {"target": "atom", "values": np.concatenate(parts), "units": key.unit,
                       "description": _described(key, missing, n)}
    return props


def force_arrows(records: Sequence[Record], chemiscope: ModuleType) -> dict[str, dict[str, Any]]:
    """Arrow shapes (ARROW_SCALE Å per eV/Å) of the registered per-atom force vectors present on every structure."""
    shapes = {}
    atoms = [rec.atoms for rec in records]
    for name in ARROW_KEYS:
        if all(name in a.arrays for a in atoms):
            shapes[name] = chemiscope.ase_vectors_to_arrows(atoms, name, target="atom", scale=ARROW_SCALE, radius=0.06)
    return shapes


def _first(preferred: Sequence[str], available: Sequence[str], taken: Sequence[str] = ()) -> str | None:
    return next((name for name in preferred if name in available and name not in taken), None)


def color_scale_max(values: np.ndarray) -> float:
    """Top of the atom colour scale (the key's unit): the COLOR_PERCENTILE-th percentile of the finite values,
    or their maximum where that is 0, or 1 where every value is 0."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 1.0
    top = float(np.percentile(finite, COLOR_PERCENTILE))
    return top if top > 0 else (float(finite.max()) if finite.max() > 0 else 1.0)


def view_settings(structure_props: dict[str, dict[str, Any]], color: str | None, color_max: float,
                  periodic: bool) -> dict[str, Any]:
    """chemiscope settings: map of U_Δ against ε_nc (or the nearest keys present), atoms coloured by `color`,
    opening on the structure of largest U_Δ."""
    numeric = [name for name, p in structure_props.items() if not any(isinstance(v, str) for v in p["values"])]
    x = _first(MAP_X, numeric) or "index"
    y = _first(MAP_Y, numeric, (x,)) or _first(numeric, numeric, (x,)) or x
    map_settings: dict[str, Any] = {"x": {"property": x}, "y": {"property": y}}
    map_color = _first(MAP_COLOR, numeric, (x, y))
    if map_color is not None:
        map_settings["color"] = {"property": map_color}
    structure: dict[str, Any] = {"unitCell": periodic, "environments": {"activated": False}}
    if color is not None:
        structure["color"] = {"property": color, "transform": "linear", "min": 0.0, "max": color_max,
                              "palette": ATOM_PALETTE}
    settings: dict[str, Any] = {"target": "structure", "map": map_settings, "structure": [structure]}
    first = least_trusted(structure_props)
    if first is not None:
        settings["pinned"] = [first]
    return settings


def least_trusted(structure_props: dict[str, dict[str, Any]]) -> int | None:
    """Index of the structure the page opens on: the largest U_Δ (force_delta), None without force_delta."""
    values = structure_props.get("force_delta", {}).get("values")
    if not values or all(math.isnan(v) for v in values):
        return None
    return int(np.nanargmax(np.asarray(values, dtype=float)))


def _metadata(records: Sequence[Record], name: str, color: str | None) -> dict[str, Any]:
    """Dataset name and a description naming the files, the models and the atom colouring."""
    def distinct(key: str) -> str:
        return ", ".join(sorted({str(rec.atoms.info[key]) for rec in records if key in rec.atoms.info})) or "-"

    sources = ", ".join(dict.fromkeys(rec.source for rec in records))
    colouring = (f"atoms coloured by {color} ({REGISTRY[color].unit}): {REGISTRY[color].description}" if color
                 else "atoms coloured by element (no per-atom result on every structure)")
    description = (f"{len(records)} structures from {sources}; model {distinct('atomuq_model')} (weights "
                   f"{distinct('atomuq_model_fingerprint')}), atomuq {distinct('atomuq_version')}; {colouring}. "
                   "Keys: docs/output_keys.md.")
    return {"name": name, "description": description}


def view_data(records: Sequence[Record], color: str | None = None, name: str | None = None) -> ViewData:
    """chemiscope's input for scored structures (checked with check_scored first): every structure, the map and
    table of per-structure results, atoms coloured by `color` (default u_i, force_delta_atoms)."""
    chemiscope = require_chemiscope()
    if not records:
        raise InputError("no structures to view")
    check_scored(records)
    color = choose_color(records, color)
    atoms = [rec.atoms for rec in records]
    s_props, a_props = structure_properties(records), atom_properties(records)
    color_max = color_scale_max(a_props[color]["values"]) if color else 1.0
    periodic = any(a.pbc.any() for a in atoms)
    environments = chemiscope.all_atomic_environments(atoms, cutoff=ENVIRONMENT_CUTOFF) if a_props else None
    dataset = chemiscope.create_input(
        structures=atoms, properties={**s_props, **a_props}, environments=environments,
        shapes=force_arrows(records, chemiscope) or None,
        settings=view_settings(s_props, color, color_max, periodic),
        metadata=_metadata(records, name or Path(records[0].source).name, color))
    return ViewData(dataset, color, color_max, list(s_props), list(a_props), len(records))


# ------------------------------------------------------------------------------------------- writing


def write_chemiscope_json(data: ViewData, path: str | Path) -> Path:
    """Write chemiscope's input file (gzip-compressed when path ends in .gz), atomically, for chemiscope's tools."""
    path = Path(path)
    text = json.dumps(data.dataset)  # NaN for missing values, as chemiscope itself writes them
    with atomic_path(path) as tmp:
        if path.suffix == ".gz":
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed:
                packed.write(text.encode("utf-8"))
        else:
            Path(tmp).write_text(text, encoding="utf-8")
    return path


def viewer_javascript() -> str:
    """chemiscope's viewer (chemiscope.min.js) as shipped in the chemiscope wheel."""
    require_chemiscope()
    script = resources.files("chemiscope").joinpath(*VIEWER_JS)
    if not script.is_file():
        raise ViewerMissing(f"this chemiscope has no {'/'.join(VIEWER_JS)}; install chemiscope >= 1.1")
    text = script.read_text(encoding="utf-8")
    if "</script" in text.lower() or "<script" in text.lower():
        raise ViewerMissing("this chemiscope's viewer cannot be inlined in a page (it contains a script tag)")
    return text


def _json_for_page(dataset: dict[str, Any]) -> str:
    """The dataset as JSON that is safe inside a <script> element: NaN as null (the page turns it back into
    NaN), and '<', '>', '&' escaped so no text of the data can close the element."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    text = json.dumps(clean(dataset), allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


#: content security policy of the page: nothing may be loaded from anywhere but the page itself
CSP = ("default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
       "img-src data: blob:; font-src data:; worker-src blob:; connect-src data: blob:")

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="atomuq {version} with chemiscope {chemiscope_version}">
<title>{title}</title>
<style>
html, body {{ margin: 0; height: 100%; font-family: sans-serif; }}
body {{ display: flex; flex-direction: column; }}
#atomuq-header {{ padding: 6px 12px; font-size: 13px; color: #333; border-bottom: 1px solid #ddd; }}
#atomuq-header b {{ font-size: 15px; }}
#atomuq-error {{ display: none; padding: 8px 12px; background: #f2dede; color: #a94442; }}
#atomuq-viewer {{ flex: 1; display: flex; min-height: 0; padding: 6px; gap: 8px; }}
#atomuq-left, #atomuq-right {{ flex: 1; display: flex; flex-direction: column; min-width: 0; min-height: 0; }}
#atomuq-structure {{ flex: 1; min-height: 0; position: relative; }}
#atomuq-map {{ flex: 1; min-height: 0; display: flex; flex-direction: column; }}
#atomuq-map > div:first-child {{ flex: 1; min-height: 0; height: auto !important; }}
#atomuq-info {{ flex-shrink: 0; }}
</style>
</head>
<body>
<div id="atomuq-header"><b>{title}</b> &mdash; {summary}</div>
<div id="atomuq-error"></div>
<div id="atomuq-viewer">
  <div id="atomuq-left"><div id="atomuq-meta"></div><div id="atomuq-map"></div></div>
  <div id="atomuq-right"><div id="atomuq-structure"></div><div id="atomuq-info"></div></div>
</div>
<script>
{javascript}
</script>
<script type="application/json" id="atomuq-dataset">{dataset}</script>
<script>
(function () {{
  function fail(message) {{
    var box = document.getElementById("atomuq-error");
    box.textContent = "the viewer could not start: " + message;
    box.style.display = "block";
    document.body.setAttribute("data-atomuq-viewer", "failed");
  }}
  try {{
    var text = document.getElementById("atomuq-dataset").textContent;
    var dataset = JSON.parse(text, function (key, value) {{ return value === null ? NaN : value; }});
    var warnings = new Chemiscope.Warnings();
    warnings.addHandler(function (message) {{ console.warn("chemiscope: " + message); }});
    var config = {{map: "atomuq-map", info: "atomuq-info", meta: "atomuq-meta", structure: "atomuq-structure"}};
    Chemiscope.DefaultVisualizer.load(config, dataset, warnings).then(function (viewer) {{
      window.atomuqViewer = viewer;
      document.body.setAttribute("data-atomuq-viewer", "loaded");
    }}, function (error) {{ fail(String(error && error.message || error)); }});
  }} catch (error) {{ fail(String(error && error.message || error)); }}
}})();
</script>
</body>
</html>
"""


def page_html(data: ViewData, title: str) -> str:
    """One self-contained HTML page: chemiscope's viewer (from the chemiscope wheel) and the data, no network."""
    chemiscope = require_chemiscope()
    import atomuq

    colouring = (f"atoms coloured by {data.color} (0 to {data.color_max:.3g} {REGISTRY[data.color].unit}, the "
                 f"{COLOR_PERCENTILE:g}th percentile; higher values saturate)" if data.color else "atoms coloured by element")
    first = data.dataset["settings"].get("pinned", [0])[0]
    opened = " (largest U_Δ)" if "pinned" in data.dataset["settings"] else ""
    summary = (f"{data.n_structures} structures; showing structure {first}{opened}; {colouring}; click a point of "
               "the map to show its structure")
    return _PAGE.format(csp=CSP, version=html.escape(atomuq.__version__),
                        chemiscope_version=html.escape(str(chemiscope.__version__)), title=html.escape(title),
                        summary=html.escape(summary), javascript=viewer_javascript(),
                        dataset=_json_for_page(data.dataset))


def write_page(data: ViewData, path: str | Path, title: str) -> Path:
    """Write the self-contained HTML page atomically."""
    path = Path(path)
    text = page_html(data, title)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path
