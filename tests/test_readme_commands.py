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

import importlib.util
import os
import re
import subprocess
import sys
import time
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

COMMAND_TIMEOUT = 180
SKIP_SLOW = os.environ.get("ATOMUQ_SKIP_SLOW_DOCS") == "1"
SLOW = (r"atomuq ltau fit",)
#: configs whose full run takes minutes to hours, and the quick version run instead (same keys, smallest sizes)
TINY_CONFIGS = {
    "configs/train_molecular.toml": "configs/train_quick.toml",
    "configs/train_molecular_noequigrad.toml": "configs/train_quick.toml",
    "configs/improve_molecular.toml": "configs/improve_quick.toml",
}
TINY_FRAMES = 4
CALIBRATION_FRAMES = 12  # --calibrate-on splits its file in thirds
STRUCTURE_SUFFIXES = (".extxyz", ".extxyz.gz", ".xyz", ".traj")
#: ltau fit matches its training file to the error log by SHA-256: these stay full size
REAL_AFTER = re.compile(r"(?:--train|--logs)\s+(\S+)")
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


def _tiny_structures(source: Path, target: Path, frames: int) -> None:
    atoms = read(source, ":")
    keep = np.unique(np.linspace(0, len(atoms) - 1, min(frames, len(atoms))).round().astype(int))
    write(target, [atoms[i] for i in keep], format="extxyz")


def _config_paths(config: Path) -> list[Path]:
    """Every string of a TOML config that names an existing file relative to the config's folder."""
    found = []

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and (config.parent / value).exists():
            found.append((config.parent / value).resolve())

    walk(tomllib.loads(config.read_text()))
    return found


class Sandbox:
    """A scratch folder with tiny copies of the repository files a command names, at the same relative paths."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "out").mkdir(parents=True, exist_ok=True)

    def prepare(self, command: str) -> None:
        real = {m for m in REAL_AFTER.findall(command)}
        calibration = set(re.findall(r"--calibrate-on\s+(\S+)", command))
        for rel in REPO_PATH.findall(command):
            frames = CALIBRATION_FRAMES if rel in calibration else TINY_FRAMES
            self.mirror(rel, full=rel in real, frames=frames)

    def mirror(self, rel: str, full: bool = False, frames: int = TINY_FRAMES) -> None:
        source, target = ROOT / rel, self.folder / rel
        if target.exists() or target.is_symlink() or not source.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix == ".toml":
            config = ROOT / TINY_CONFIGS.get(rel, rel)
            target.write_text(config.read_text())  # a real file: configs resolve their paths from their own folder
            for path in _config_paths(config):
                self.mirror(str(path.relative_to(ROOT)), frames=frames)
        elif full or source.is_dir() or rel.startswith("src/") or not rel.endswith(STRUCTURE_SUFFIXES):
            target.symlink_to(source)
        else:
            _tiny_structures(source, target, frames)

    def run(self, command: str, expect: int) -> float:
        """Run one command through bash in the sandbox; fail with its output unless it ends with `expect`."""
        self.prepare(command)
        t0 = time.perf_counter()
        done = subprocess.run(["bash", "-c", command], cwd=self.folder, env=examples.environment(), capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT)
        if done.returncode != expect:
            pytest.fail(f"`{command}` exited {done.returncode}, the document shows {expect}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return time.perf_counter() - t0


def _python_block(code: str) -> str:
    return "python - <<'ATOMUQ_DOC_PYTHON'\n" + code + "\nATOMUQ_DOC_PYTHON"


def _runnable(block) -> list[examples.Shown]:
    shown = examples.shown_commands(block)
    if block.kind == "check" and block.language == "python":
        return [examples.Shown(_python_block(shown[0].text))]
    return shown


BLOCKS = [b for b in examples.all_blocks() if b.kind in ("example", "check")]


def _make_demo() -> list[examples.Shown]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("demo:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(examples.Shown(line.strip().replace("$(VENV)/bin/", "")))
    return recipe


CASES = [pytest.param(_runnable(b), id=f"{b.document}:{b.name}",
                      marks=[pytest.mark.skipif(SKIP_SLOW, reason="ATOMUQ_SKIP_SLOW_DOCS=1")]
                      if any(re.search(p, s.text) for s in examples.shown_commands(b) for p in SLOW) else [])
         for b in BLOCKS]
CASES.append(pytest.param(_make_demo(), id="Makefile:demo"))


@pytest.mark.parametrize("commands", CASES)
def test_shown_commands_run_on_tiny_inputs(commands, tmp_path):
    assert commands, "a block marked for checking shows no command (run scripts/readme_examples.py)"
    sandbox = Sandbox(tmp_path)
    for command in commands:
        sandbox.run(shrink(command.text), command.expect)


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


def test_sandbox_cuts_data_files_and_swaps_long_configs(tmp_path):
    sandbox = Sandbox(tmp_path)
    sandbox.prepare("atomuq improve configs/improve_molecular.toml; atomuq score data/molecular/test_300K.extxyz.gz -o out/x.extxyz")
    assert (tmp_path / "configs/improve_molecular.toml").read_text() == (ROOT / "configs/improve_quick.toml").read_text()
    assert len(read(tmp_path / "data/molecular/test_300K.extxyz.gz", ":")) == TINY_FRAMES
    assert len(read(tmp_path / "data/improve/search_starts.extxyz.gz", ":")) == TINY_FRAMES
    assert shrink("atomuq attack x -o y --steps 200") == "atomuq attack x -o y --steps 4"
    assert shrink("atomuq md x -o y --steps 400") == "atomuq md x -o y --steps 400"
    assert shrink("atomuq md x -o y --steps 20000") == "atomuq md x -o y --steps 4"
    assert shrink("atomuq md x -o y --preset paper") == "atomuq md x -o y --preset paper --steps 4 --equilibration-steps 4"
