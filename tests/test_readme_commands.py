"""The documentation stays true: the commands README.md and docs/*.md show still run, their option tables match the CLI.

- Every generated example block shows the commands scripts/readme_examples.py defines, and every option table
  equals the one the CLI gives now (fix both by rerunning the script; see docs/development.md).
- Every command shown (example blocks, fenced blocks marked ``<!-- check -->``, the recipe of ``make demo``) runs
  through bash, on tiny inputs, in a scratch folder that mirrors the repository paths it names: structure files
  under data/ cut to a few frames, the long configs swapped for their quick versions, step counts shrunk, DFT on
  H2 with a minimal basis; it must end with the exit status the document shows (0 unless it says otherwise),
  within COMMAND_TIMEOUT seconds.
- Relative links between the documents point to files and headings that exist.

Slow blocks (the LTAU fit reads the 43,385 committed training atoms) are skipped with ATOMUQ_SKIP_SLOW_DOCS=1.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from ase.io import read, write

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_examples", ROOT / "scripts" / "readme_examples.py")
examples = sys.modules.setdefault("readme_examples", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(examples)

COMMAND_TIMEOUT = 300  # one command, on a busy machine
SKIP_SLOW = os.environ.get("ATOMUQ_SKIP_SLOW_DOCS") == "1"
#: blocks run side by side (each one's commands in order): one per core, at most 2 by default
WORKERS = int(os.environ.get("ATOMUQ_DOC_WORKERS", min(2, os.cpu_count() or 1)))
SLOW = (r"atomuq ltau fit",)
#: what a block needs installed: (pattern in its commands, importable module)
REQUIRES = ((r"dft-pbe", "pyscf"), (r"gfn\d-xtb|atomuq (improve|sample)", "tblite"), (r"orb:|adapters\.orb", "orb_models"))
#: configs whose full run takes minutes to hours, and the quick config whose sizes replace theirs (paths stay)
TINY_CONFIGS = {
    "configs/train_molecular.toml": "configs/train_quick.toml",
    "configs/train_molecular_noequigrad.toml": "configs/train_quick.toml",
    "configs/improve_molecular.toml": "configs/improve_quick.toml",
}
TINY_FRAMES = 4
CONFIG_FRAMES = 8  # files a config names (training sets with a validation split, search starts)
CALIBRATION_FRAMES = 60  # --calibrate-on splits its file in thirds; a 0.95 bound needs 19 in its third (57)
STRUCTURE_SUFFIXES = (".extxyz", ".extxyz.gz", ".xyz", ".traj")
#: ltau fit matches its training file to the error log by SHA-256: these stay full size
REAL_AFTER = re.compile(r"(?:--train|--logs)\s+(\S+)")
MIRRORED = ("data/", "src/", "configs/", "docs/", "scripts/")
REPO_PATH = re.compile(r"(?<![\w/.])((?:data|src|configs|docs|scripts)/[\w./+-]*\w)")
#: (steps a shown command keeps, steps it gets instead when it shows more): an MD run of 400 steps takes seconds and
#: shows its monitors act; an adversarial search costs second derivatives per step
STEPS = {"atomuq md": (400, 4), "atomuq attack": (4, 4), "atomuq sample": (2, 2)}


def shrink(command: str) -> str:
    """The tiny version of a shown command: fewer steps, a minimal DFT basis on H2, short MD."""
    keep, instead = next((steps for name, steps in STEPS.items() if command.startswith(name)), (None, None))
    if keep is not None:
        command = re.sub(r"--steps (\d+)", lambda m: f"--steps {m[1] if int(m[1]) <= keep else instead}", command)
    command = re.sub(r"--interval \d+", "--interval 1", command)
    command = re.sub(r"--bootstrap \d+", "--bootstrap 50", command)
    command = command.replace("--method dft-pbe", "--method dft-pbe --option basis=sto-3g").replace("molecule('H2O')", "molecule('H2')")
    if re.match(r"atomuq md ", command) and "--steps" not in command:
        command += " --steps 4" + (" --equilibration-steps 4" if "--preset paper" in command else "")
    return command


_TINY_DIR = Path(tempfile.mkdtemp(prefix="atomuq-doc-tiny-"))
atexit.register(shutil.rmtree, _TINY_DIR, ignore_errors=True)
_TINY: dict[tuple[str, int], Path] = {}
_TINY_LOCK = threading.Lock()


def _tiny_structures(source: Path, target: Path, frames: int) -> None:
    """`frames` structures spread evenly over the source file, written once per session and copied."""
    with _TINY_LOCK:
        key = (str(source), frames)
        if key not in _TINY:
            atoms = read(source, ":")
            keep = np.unique(np.linspace(0, len(atoms) - 1, min(frames, len(atoms))).round().astype(int))
            _TINY[key] = _TINY_DIR / f"{len(_TINY)}-{source.name}"  # same suffixes: .gz is written compressed
            write(_TINY[key], [atoms[i] for i in keep], format="extxyz")
    shutil.copyfile(_TINY[key], target)


def _names_a_file(config: Path, value) -> bool:
    return isinstance(value, str) and "/" in value and (config.parent / value).resolve().is_relative_to(ROOT)


def _is_path_value(config: Path, value) -> bool:
    """A path or a list of paths (relative to the config's folder)."""
    return _names_a_file(config, value[0] if isinstance(value, list) and value else value)


def _config_paths(config: Path, table: dict) -> list[Path]:
    """Every string of a config table that names a repository path relative to the config's folder."""
    found = []
    for value in table.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                found += _config_paths(config, item)
            elif _names_a_file(config, item):
                found.append((config.parent / item).resolve())
    return found


def overlay(real: dict, quick: dict, config: Path) -> dict:
    """`real` with the sizes of `quick`: every key of quick replaces real's, except paths and run_dir."""
    out = dict(real)
    for key, value in quick.items():
        if isinstance(value, dict) and isinstance(real.get(key), dict):
            out[key] = overlay(real[key], value, config)
        elif key != "run_dir" and not _is_path_value(config, value):
            out[key] = value
    return out


def to_toml(table: dict, prefix: str = "") -> str:
    """A TOML document of nested dicts of strings, numbers, booleans and lists of them (JSON spells those as TOML does)."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in table.items() if not isinstance(value, dict)]
    for key, value in table.items():
        if isinstance(value, dict):
            name = f"{prefix}.{key}" if prefix else key
            lines += ["", f"[{name}]", to_toml(value, name)]
    return "\n".join(lines)


class CommandFailed(Exception):
    """A shown command that did not end as its document says."""


class Sandbox:
    """A scratch folder with tiny copies of the repository files a command names, at the same relative paths."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "out").mkdir(parents=True, exist_ok=True)

    def prepare(self, command: str) -> None:
        real = set(REAL_AFTER.findall(command))
        calibration = set(re.findall(r"--calibrate-on\s+(\S+)", command))
        for rel in REPO_PATH.findall(command):
            self.mirror(rel, full=rel in real, frames=CALIBRATION_FRAMES if rel in calibration else TINY_FRAMES)

    def mirror(self, rel: str, full: bool = False, frames: int = TINY_FRAMES) -> None:
        """Put the repository path `rel` into the sandbox: a tiny copy, a config with quick sizes, or a link."""
        source, target = ROOT / rel, self.folder / rel
        if not rel.startswith(MIRRORED) or target.exists() or target.is_symlink() or not source.exists():
            return  # outputs (out/ ...) are never shared with the repository
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix == ".toml":
            table = tomllib.loads(source.read_text())
            if rel in TINY_CONFIGS:
                table = overlay(table, tomllib.loads((ROOT / TINY_CONFIGS[rel]).read_text()), source)
            target.write_text(to_toml(table))  # a real file: a config resolves its paths from its own folder
            for path in _config_paths(source, table):
                self.mirror(str(path.relative_to(ROOT)), frames=CONFIG_FRAMES)
        elif full or source.is_dir() or rel.startswith("src/") or not rel.endswith(STRUCTURE_SUFFIXES):
            target.symlink_to(source)
        else:
            _tiny_structures(source, target, frames)

    def run(self, command: str, expect: int) -> None:
        """Run one command through bash in the sandbox; CommandFailed unless it ends with `expect`."""
        self.prepare(command)
        try:
            done = subprocess.run(["bash", "-c", command], cwd=self.folder, env=examples.environment(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CommandFailed(f"`{command}` ran past {COMMAND_TIMEOUT} s") from None
        if done.returncode != expect:
            raise CommandFailed(f"`{command}` exited {done.returncode}, the document shows {expect}:\n{done.stdout[-4000:]}")


@dataclasses.dataclass(frozen=True)
class Case:
    """The commands of one block (or of the make demo recipe), run in order in one sandbox."""

    id: str
    commands: tuple[examples.Shown, ...]
    slow: bool = False
    missing: str | None = None  # a module the commands need that is not installed


def _python_block(code: str) -> str:
    return "python - <<'ATOMUQ_DOC_PYTHON'\n" + code + "\nATOMUQ_DOC_PYTHON"


def _case(case_id: str, shown: list[examples.Shown]) -> Case:
    text = "\n".join(s.text for s in shown)
    missing = next((module for pattern, module in REQUIRES if re.search(pattern, text) and importlib.util.find_spec(module) is None), None)
    return Case(case_id, tuple(shown), any(re.search(p, text) for p in SLOW), missing)


def _block_case(block) -> Case:
    shown = examples.shown_commands(block)
    if block.kind == "check" and block.language == "python":
        shown = [examples.Shown(_python_block(shown[0].text))]
    return _case(f"{block.document}:{block.name}", shown)


def _make_demo() -> Case:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("demo:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(examples.Shown(line.strip().replace("$(VENV)/bin/", "")))
    return _case("Makefile:demo", recipe)


BLOCKS = [b for b in examples.all_blocks() if b.kind in ("example", "check")]
CASES = [_block_case(b) for b in BLOCKS] + [_make_demo()]


def _runs(case: Case) -> bool:
    return not (case.slow and SKIP_SLOW) and case.missing is None


def run_case(case: Case, folder: Path) -> str | None:
    """Run a case's commands (shrunk) in a new sandbox; None when all ended as shown, else what went wrong."""
    sandbox = Sandbox(folder)
    try:
        for command in case.commands:
            sandbox.run(shrink(command.text), command.expect)
    except CommandFailed as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def case_futures(request, tmp_path_factory):
    """Every selected case submitted at once, run WORKERS at a time (one core each); case id -> future of None or its
    failure. Each test waits for its own case only, so the time (and pytest's per-test timeout) is spread over them."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_shown_commands_run_on_tiny_inputs"]
    pool = ThreadPoolExecutor(max_workers=max(1, WORKERS))
    yield {case.id: pool.submit(run_case, case, tmp_path_factory.mktemp("doc")) for case in selected if _runs(case)}
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_shown_commands_run_on_tiny_inputs(case, case_futures):
    if case.missing:
        pytest.skip(f"needs {case.missing}")
    if case.slow and SKIP_SLOW:
        pytest.skip("slow; ATOMUQ_SKIP_SLOW_DOCS=1")
    assert case.commands, "a block marked for checking shows no command (run scripts/readme_examples.py)"
    failure = case_futures[case.id].result()
    assert failure is None, failure


def test_examples_show_the_commands_the_script_defines():
    shown = {}
    for block in BLOCKS:
        if block.kind == "example":
            assert block.name in examples.EXAMPLES, f"{block.document}: no example {block.name!r} in scripts/readme_examples.py"
            shown[block.name] = [(s.text, s.expect) for s in examples.shown_commands(block)]
            defined = [(c.text, c.expect) for c in examples.EXAMPLES[block.name].commands]
            assert shown[block.name] == defined, (
                f"{block.document} example {block.name!r} is out of date: "
                f"rerun `python scripts/readme_examples.py {block.name}`"
            )
    assert set(shown) == set(examples.EXAMPLES), f"examples not shown in any document: {set(examples.EXAMPLES) - set(shown)}"


def test_option_tables_match_the_cli():
    tables = {b.name: b for doc in examples.DOCUMENTS for b in examples.blocks(doc) if b.kind == "options"}
    assert set(examples.cli_names()) <= set(tables), (
        f"commands without an option table in docs/commands.md: {sorted(set(examples.cli_names()) - set(tables))}"
    )
    stale = [name for name, block in tables.items() if list(block.lines) != examples.options_table(name)]
    assert not stale, f"option tables out of date: {stale}; rerun `python scripts/readme_examples.py --options`"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve():
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("*/*.md"))]
    broken = []
    for doc in documents:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
            elif anchor and file.suffix == ".md":
                anchors = {_slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), flags=re.M)}
                if anchor not in anchors:
                    broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_sandbox_cuts_data_files_and_gives_long_configs_quick_sizes(tmp_path):
    sandbox = Sandbox(tmp_path)
    sandbox.prepare("atomuq improve configs/improve_molecular.toml; atomuq score data/molecular/heldout_1200K.extxyz.gz -o out/x.extxyz")
    real = tomllib.loads((ROOT / "configs/improve_molecular.toml").read_text())
    quick = tomllib.loads((ROOT / "configs/improve_quick.toml").read_text())
    tiny = tomllib.loads((tmp_path / "configs/improve_molecular.toml").read_text())
    assert tiny["search"]["starts"] == real["search"]["starts"] and tiny["evaluate"]["test"] == real["evaluate"]["test"]
    assert tiny["run_dir"] == real["run_dir"] and tiny["finetune"]["replay"] == real["finetune"]["replay"]
    assert tiny["search"]["n_starts"] == quick["search"]["n_starts"] and tiny["finetune"]["epochs"] == quick["finetune"]["epochs"]
    assert len(read(tmp_path / "data/molecular/heldout_1200K.extxyz.gz", ":")) == TINY_FRAMES
    assert len(read(tmp_path / "data/improve/search_starts.extxyz.gz", ":")) == CONFIG_FRAMES
    assert not (tmp_path / "out" / "improve_molecular").exists()  # outputs stay in the sandbox, never linked
    assert shrink("atomuq attack x -o y --steps 200") == "atomuq attack x -o y --steps 4"
    assert shrink("atomuq md x -o y --steps 400") == "atomuq md x -o y --steps 400"
    assert shrink("atomuq md x -o y --steps 20000") == "atomuq md x -o y --steps 4"
    assert shrink("atomuq md x -o y --preset paper") == "atomuq md x -o y --preset paper --steps 4 --equilibration-steps 4"
