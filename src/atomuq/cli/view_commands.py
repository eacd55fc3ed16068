"""`atomuq view`: an interactive page (chemiscope) of scored structures, and chemiscope's own input file."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from atomuq.cli.common import console, fail, note, user_errors
from atomuq.core.io import read_structures
from atomuq.core.paths import check_output_file
from atomuq.workflows.view import DEFAULT_COLOR, require_chemiscope, view_data, write_chemiscope_json, write_page

CHEMISCOPE_SUFFIXES = (".json", ".json.gz")


def _check_outputs(output: Optional[Path], chemiscope_json: Optional[Path]) -> None:
    """Before any work: at least one output, distinct, writable, chemiscope's file named .json or .json.gz."""
    if output is None and chemiscope_json is None:
        fail("give -o VIEW.html (the page) and/or --chemiscope OUT.json.gz (chemiscope's input)")
    if chemiscope_json is not None and not str(chemiscope_json).endswith(CHEMISCOPE_SUFFIXES):
        fail(f"--chemiscope {chemiscope_json}: chemiscope's tools read .json or .json.gz files; name it so")
    if output is not None and chemiscope_json is not None and output.resolve() == chemiscope_json.resolve():
        fail(f"-o and --chemiscope are the same file ({output}); give two names")
    for path, flag in ((output, "--output"), (chemiscope_json, "--chemiscope")):
        if path is not None and check_output_file(path, flag):
            note(f"{path} exists and will be replaced")


def view(
    inputs: List[Path] = typer.Argument(..., help="Scored structure files (outputs of atomuq score, ltau score, attack, md)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="The page: one self-contained HTML file (no network)."),
    chemiscope_json: Optional[Path] = typer.Option(
        None, "--chemiscope", help="Also write chemiscope's input (.json or .json.gz) for chemiscope's own tools."),
    color: Optional[str] = typer.Option(
        None, "--color", help=f"Per-atom result key that colours the atoms (default {DEFAULT_COLOR}, u_i in eV/Å)."),
    title: Optional[str] = typer.Option(None, "--title", help="Title of the page (default: the first file's name)."),
) -> None:
    """Interactive viewer: every structure, atoms coloured by u_i, a map and table of U_Δ, ε_nc, ε_c, LTAU, ensembles."""
    with user_errors():
        require_chemiscope()
        _check_outputs(output, chemiscope_json)
        records = read_structures(inputs)
        name = title or Path(inputs[0]).name
        data = view_data(records, color, name)
        if data.color is None:
            note("no per-atom result is on every structure: the atoms are coloured by element")
        if output is not None:
            write_page(data, output, name)
            console.print(f"wrote {output}: {data.n_structures} structures, atoms coloured by "
                          f"{data.color or 'element'}; open it in a browser (works offline)", highlight=False)
        if chemiscope_json is not None:
            write_chemiscope_json(data, chemiscope_json)
            console.print(f"wrote {chemiscope_json} (chemiscope input: chemiscope.show_input, chemiscope.org)",
                          highlight=False)
