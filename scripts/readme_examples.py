"""Run the commands that README.md and docs/*.md show, on shipped inputs, and write their real output into them.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/readme_examples.py               # every example (about 5 min)
    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/readme_examples.py score attack  # some of them
    PYTHONPATH=src python scripts/readme_examples.py --options                       # only the option tables (seconds)
    PYTHONPATH=src python scripts/readme_examples.py --list                          # names, files, commands

A document holds two kinds of generated blocks, each between an opening and a closing marker that
this script rewrites (everything between them is replaced; write nothing by hand there):

- ``<!-- example:NAME -->`` ... ``<!-- /example -->``: a ``text`` code block with each command of the
  example (``$ command``) and its real output, from a run in the repository root with
  ``COLUMNS=150``. Progress bars are dropped, the repository path is shown as ``.``, and a command
  that is meant to fail ends with ``(exit status N)``. Long outputs are cut where the example says,
  and the cut is marked ``...``.
- ``<!-- options:COMMAND -->`` ... ``<!-- /options -->``: the table of a command's arguments and
  options, read from the CLI itself (``ltau-fit`` is ``atomuq ltau fit``).

tests/test_readme_commands.py reads the same blocks (with the functions below), checks that the
shown commands are the ones defined here and that the option tables are current, and runs every
shown command on tiny inputs. After changing the CLI, rerun this script (``--options`` is enough for
the tables; the examples whose output changed by name) and commit the documents.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
#: the documents holding generated blocks
DOCUMENTS = ("README.md", "docs/commands.md", "docs/third_party_models.md")
COLUMNS = 150
MEMBERS = "molecular-small,molecular-small-seed1,molecular-small-seed2,molecular-small-seed3,molecular-small-seed4"
DEMO = "src/atomuq/data/structures/molecular_demo.extxyz"

EXAMPLE_OPEN = re.compile(r"^<!-- example:(?P<name>[\w-]+) -->$")
EXAMPLE_CLOSE = "<!-- /example -->"
OPTIONS_OPEN = re.compile(r"^<!-- options:(?P<name>[\w-]+) -->$")
OPTIONS_CLOSE = "<!-- /options -->"
#: a fenced block right after this line is run by tests/test_readme_commands.py (bash: each command; python: the code)
CHECK_MARKER = "<!-- check -->"
EXIT_LINE = re.compile(r"^\(exit status (?P<rc>\d+)\)$")
PROGRESS_LINE = re.compile(r"━.*\d+/\d+.*\d+:\d\d")


Keep = Callable[[list[str]], list[str]]


@dataclasses.dataclass(frozen=True)
class Command:
    """One shown command: its text (``\\`` + newline continues a line, as in bash), expected exit status, output cut."""

    text: str
    expect: int = 0
    keep: Keep | None = None


@dataclasses.dataclass(frozen=True)
class Example:
    """Commands run in order in the repository root; `clean` globs (repository-relative) are removed first."""

    commands: tuple[Command, ...]
    clean: tuple[str, ...] = ()


def head(n: int, tail: int = 0) -> Keep:
    """Keep the first n lines (and the last `tail`), with ``...`` where lines were cut."""

    def keep(lines: list[str]) -> list[str]:
        if len(lines) <= n + tail:
            return lines
        return lines[:n] + ["..."] + (lines[-tail:] if tail else [])

    return keep


def rows(*patterns: str, first: int = 0, last: int = 0) -> Keep:
    """Keep the first and last lines and every line matching a pattern (table rows by name), ``...`` for gaps."""

    def keep(lines: list[str]) -> list[str]:
        out, cut = [], False
        for i, line in enumerate(lines):
            if i < first or i >= len(lines) - last or any(re.search(p, line) for p in patterns):
                out.append(line)
                cut = False
            elif not cut:
                out.append("...")
                cut = True
        return out

    return keep


def _attack_starts() -> Command:
    return Command(
        "python -c \"from ase.io import read, write; "
        "write('out/attack_start8.extxyz', read('data/molecular/test_300K.extxyz.gz', index='0:320:40'))\""
    )


EXAMPLES: dict[str, Example] = {
    "models": Example((Command("atomuq models"),)),
    "score": Example((Command(f"atomuq score {DEMO} -o out/demo_scored.extxyz --top 5"),), clean=("out/demo_scored.extxyz",)),
    "score-materials": Example(
        (
            Command("mkdir -p out"),
            Command(
                "python -c \"from ase.build import bulk; from ase.io import write; \\\n"
                "cells = [bulk('Cu', 'fcc', a=3.61, cubic=True).repeat(3), bulk('Si', 'diamond', a=5.43, cubic=True).repeat(2), \\\n"
                "bulk('MgO', 'rocksalt', a=4.21, cubic=True).repeat(2)]; [a.rattle(0.05, seed=i) for i, a in enumerate(cells)]; \\\n"
                "write('out/crystals.extxyz', cells)\""
            ),
            Command("atomuq score out/crystals.extxyz -o out/crystals_scored.extxyz"),
        ),
        clean=("out/crystals*",),
    ),
    "bad-input": Example(
        (
            Command("mkdir -p out"),
            Command(
                "python -c \"from ase.io import read, write; a = read('" + DEMO + "', ':2'); "
                "a[1].positions[2] = a[1].positions[0] + 0.05; write('out/broken.extxyz', a)\""
            ),
            Command("atomuq score out/broken.extxyz -o out/broken_scored.extxyz", expect=1),
            Command("ls out/broken_scored.extxyz", expect=2),
        ),
        clean=("out/broken*",),
    ),
    "ensemble": Example(
        (Command(f"atomuq score {DEMO} -o out/demo_ensemble.extxyz --top 3 \\\n    --ensemble {MEMBERS}"),),
        clean=("out/demo_ensemble.extxyz",),
    ),
    "attack": Example(
        (
            Command("mkdir -p out"),
            _attack_starts(),
            Command("atomuq attack out/attack_start8.extxyz -o out/attack.extxyz --kT 0.05 --steps 200 --top 4"),
        ),
        clean=("out/attack_start8.extxyz", "out/attack.extxyz", "out/attack.selected.extxyz"),
    ),
    "md": Example(
        (
            Command(
                f"atomuq md {DEMO} -o out/demo_md.extxyz --steps 400 --temperature 300 \\\n"
                '    --monitor "force_delta,every=10,max=1.5xmedian,action=rollback" \\\n'
                '    --monitor "temperature,every=10,max=1500,action=stop" --fallback mts --mts-inner 4',
                expect=3,  # a monitor stopped the run
            ),
            Command("grep -v ' ok$' out/demo_md.extxyz.log"),
            Command("atomuq drift out/demo_md.extxyz --plot out/demo_md.png"),
        ),
        clean=("out/demo_md*",),
    ),
    "bench": Example(
        (
            Command(
                "atomuq bench data/bench/adversarial_molecules.extxyz.gz data/bench/water_adversarial.extxyz.gz -o out/bench_adv \\\n"
                f"    --ensemble {MEMBERS} \\\n"
                "    --calibrate-on data/molecular/test_300K.extxyz.gz --cluster-key source_index",
                keep=rows(r"aspirin", r"stachyose", r"water_box", r"all \(pooled\)", r"coverage|held-back|extxyz\.gz:|wrote", first=4),
            ),
        ),
        clean=("out/bench_adv",),
    ),
    "improve-quick": Example(
        (Command("atomuq improve configs/improve_quick.toml", keep=rows(r"^generation", r"^training in", r"^epoch", last=10)),),
        clean=("out/improve_quick",),
    ),
    "label": Example(
        (Command(f"atomuq label {DEMO} -o out/demo_labelled.extxyz --method gfn2-xtb --workers 1"),),
        clean=("out/demo_labelled.extxyz*",),
    ),
    "sample": Example(
        (
            Command("mkdir -p out"),
            Command(
                "python -c \"from ase.io import read, write; "
                "write('out/naproxen.extxyz', read('data/molecular/heldout_300K.extxyz.gz', 0))\""
            ),
            Command(
                "atomuq sample out/naproxen.extxyz -o out/naproxen_md.extxyz --method gfn2-xtb -T 300 -T 1200 \\\n"
                "    --steps 40 --interval 20 --timestep 0.5 --seed 0 --workers 1"
            ),
        ),
        clean=("out/naproxen*",),
    ),
    "dft": Example(
        (
            Command("mkdir -p out"),
            Command("python -c \"from ase.build import molecule; from ase.io import write; write('out/water.extxyz', molecule('H2O'))\""),
            Command("atomuq label out/water.extxyz -o out/water_dft.extxyz --method dft-pbe --workers 1"),
        ),
        clean=("out/water*",),
    ),
    "train-quick": Example((Command("atomuq train configs/train_quick.toml"),), clean=("out/train_quick",)),
    "orb": Example(
        (
            Command("mkdir -p out"),
            Command(
                "python -c \"from atomuq.models.adapters.orb import new_orb_model, save_orb; "
                "save_orb(new_orb_model('orb-v3-direct', latent_dim=32, base_mlp_hidden_dim=64, head_mlp_hidden_dim=32, "
                "num_message_passing_steps=2), 'out/orb-v3-direct-small.pt')\""
            ),
            Command(f"atomuq score {DEMO} --model orb:out/orb-v3-direct-small.pt -o out/orb_scored.extxyz --top 3"),
        ),
        clean=("out/orb*",),
    ),
    "ltau": Example(
        (
            Command(
                "atomuq ltau fit --logs data/training/molecular-small/error_log --train data/molecular/train.extxyz.gz "
                "-o out/ltau.npz"
            ),
            Command("atomuq ltau score data/molecular/test_1200K.extxyz.gz -e out/ltau.npz -o out/ltau_1200.extxyz -k 5 --top 3"),
            Command(
                "atomuq ltau calibrate data/molecular/test_600K.extxyz.gz -e out/ltau.npz -o out/ltau_cal600.npz -k 5 "
                "--plot out/cal600.png"
            ),
            Command("atomuq ltau weights -e out/ltau.npz --scheme hard --lambda 4.5 -o out/ltau_weights.npy"),
        ),
        clean=("out/ltau*", "out/cal600.png"),
    ),
}


# ------------------------------------------------------------------------------------------ reading documents


@dataclasses.dataclass(frozen=True)
class Block:
    """A generated or checked block of a document: kind "example", "options" or "check", its name and its lines."""

    document: str
    kind: str
    name: str
    start: int  # index of the opening marker line
    end: int  # index of the closing marker line (check blocks: of the closing fence)
    lines: tuple[str, ...]  # the lines between the markers (check blocks: inside the fence)
    language: str = ""


def blocks(document: str, text: str | None = None) -> list[Block]:
    """Every example, options and check block of a document (repository-relative path) in order."""
    lines = (ROOT / document).read_text().splitlines() if text is None else text.splitlines()
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        for kind, opener, closer in (("example", EXAMPLE_OPEN, EXAMPLE_CLOSE), ("options", OPTIONS_OPEN, OPTIONS_CLOSE)):
            match = opener.match(line)
            if match:
                end = next((j for j in range(i + 1, len(lines)) if lines[j] == closer), None)
                if end is None:
                    raise ValueError(f"{document}:{i + 1}: {line} has no closing {closer}")
                out.append(Block(document, kind, match["name"], i, end, tuple(lines[i + 1 : end])))
                i = end
                break
        else:
            if line.strip() == CHECK_MARKER:
                fence = lines[i + 1] if i + 1 < len(lines) else ""
                if not fence.startswith("```"):
                    raise ValueError(f"{document}:{i + 1}: {CHECK_MARKER} must be followed by a fenced code block")
                end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
                if end is None:
                    raise ValueError(f"{document}:{i + 2}: unclosed code block")
                name = f"{Path(document).stem}-line-{i + 1}"
                out.append(Block(document, "check", name, i, end, tuple(lines[i + 2 : end]), fence[3:].strip()))
                i = end
        i += 1
    return out


def all_blocks() -> list[Block]:
    """The blocks of every document in DOCUMENTS."""
    return [b for doc in DOCUMENTS for b in blocks(doc)]


@dataclasses.dataclass(frozen=True)
class Shown:
    """A command as a document shows it and the exit status the document says it ends with."""

    text: str
    expect: int = 0


def shown_commands(block: Block) -> list[Shown]:
    """The commands of an example block (``$`` lines and their continuations) or of a bash check block."""
    if block.kind == "check" and block.language == "python":
        return [Shown("\n".join(block.lines))]
    body = [line for line in block.lines if not line.startswith("```")]
    out: list[Shown] = []
    i = 0
    while i < len(body):
        line = body[i]
        if block.kind == "example" and not line.startswith("$ "):
            match = EXIT_LINE.match(line)
            if match and out:
                out[-1] = dataclasses.replace(out[-1], expect=int(match["rc"]))
            i += 1
            continue
        text = line[2:] if block.kind == "example" else line.split(" #")[0].rstrip()
        if block.kind == "check" and (not text.strip() or text.lstrip().startswith("#")):
            i += 1
            continue
        parts = [text]
        while parts[-1].endswith("\\") and i + 1 < len(body):
            i += 1
            parts.append(body[i].split(" #")[0].rstrip() if block.kind == "check" else body[i])
        out.append(Shown("\n".join(parts)))
        i += 1
    return out


# ------------------------------------------------------------------------------------------ running examples


def environment() -> dict[str, str]:
    """The environment the examples run in: this interpreter's bin folder first on PATH, this tree's src."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT / "src")
    env.update(COLUMNS=str(COLUMNS), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), NO_COLOR="1", TERM="dumb", PYTHONUNBUFFERED="1")
    return env


def clean_output(raw: str) -> list[str]:
    """Output lines as shown: progress bars dropped, the repository path as ``.``, no trailing blanks."""
    text = raw.replace(f"{ROOT}/", "").replace(str(ROOT), ".")
    lines = [line.rstrip() for line in text.splitlines() if not PROGRESS_LINE.search(line)]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def run_example(name: str, example: Example) -> list[str]:
    """Run an example's commands in the repository root; the lines of its text block."""
    for pattern in example.clean:
        for path in glob.glob(str(ROOT / pattern)):
            shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink()
    lines = ["```text"]
    for command in example.commands:
        t0 = time.perf_counter()
        done = subprocess.run(["bash", "-c", command.text], cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # one stream: lines stay in the order printed
        output = clean_output(done.stdout)
        print(f"  {name}: {command.text.splitlines()[0][:90]} ... exit {done.returncode}, {time.perf_counter() - t0:.1f} s", flush=True)
        if done.returncode != command.expect:
            raise SystemExit(f"{name}: `{command.text}` exited {done.returncode}, expected {command.expect}:\n" + "\n".join(output))
        shown = command.text.splitlines()
        lines += [f"$ {shown[0]}", *shown[1:]]
        lines += command.keep(output) if command.keep else output
        if command.expect:
            lines.append(f"(exit status {command.expect})")
    return lines + ["```"]


# ------------------------------------------------------------------------------------------ option tables


def cli_command(name: str):
    """The click command of `atomuq NAME` (``ltau-fit``: ``atomuq ltau fit``)."""
    import typer

    from atomuq.cli.main import app

    command = typer.main.get_command(app)
    for part in name.split("-"):
        command = command.commands[part]
    return command


def cli_names() -> list[str]:
    """Every leaf command of the CLI as an options-block name (``score``, ``ltau-fit``, ...)."""
    import typer

    from atomuq.cli.main import app

    def walk(command, prefix: str) -> Iterator[str]:
        subs = getattr(command, "commands", None)
        if subs:
            for key, sub in subs.items():
                yield from walk(sub, f"{prefix}-{key}" if prefix else key)
        else:
            yield prefix

    return list(walk(typer.main.get_command(app), ""))


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def options_table(name: str) -> list[str]:
    """Markdown table of a command's arguments and options: name, default, meaning (from its help)."""
    command = cli_command(name)
    lines = [f"`atomuq {name.replace('-', ' ')}`: {_cell(command.help or '').split('. ')[0].rstrip('.')}.", "",
             "| argument / option | default | meaning |", "| --- | --- | --- |"]
    for param in command.params:
        if param.name == "help":
            continue
        if param.param_type_name == "argument":
            label = f"`{param.name.upper()}`" + (" ..." if param.nargs == -1 else "")
        else:
            label = ", ".join(f"`{o}`" for o in sorted(param.opts, key=len)) + (
                f" / `{param.secondary_opts[0]}`" if param.secondary_opts else ""
            )
        if param.required:
            default = "required"
        elif getattr(param, "is_flag", False):
            default = "off" if not param.default else "on"
        elif param.default in (None, (), []):
            default = "–"
        else:
            value = param.default
            default = "`" + (", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)) + "`"
        lines.append(f"| {label} | {default} | {_cell(getattr(param, 'help', '') or '')} |")
    return lines if len(lines) > 4 else lines[:2] + ["No arguments or options."]


# ------------------------------------------------------------------------------------------ writing documents


def rewrite(document: str, generated: dict[tuple[str, str], list[str]]) -> int:
    """Replace the body of each (kind, name) block of a document found in `generated`; returns how many changed."""
    path = ROOT / document
    lines = path.read_text().splitlines()
    changed = 0
    for block in reversed(blocks(document)):
        new = generated.get((block.kind, block.name))
        if new is not None and list(block.lines) != new:
            lines[block.start + 1 : block.end] = new
            changed += 1
    if changed:
        path.write_text("\n".join(lines) + "\n")
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="examples to run (default: all)")
    parser.add_argument("--options", action="store_true", help="only rewrite the option tables")
    parser.add_argument("--list", action="store_true", help="list the examples and where they are shown")
    args = parser.parse_args()
    found = all_blocks()
    if args.list:
        for name, example in EXAMPLES.items():
            where = ", ".join(b.document for b in found if b.kind == "example" and b.name == name) or "not shown"
            print(f"{name} ({where}):")
            for command in example.commands:
                print("    $ " + command.text.replace("\n", "\n      "))
        return
    unknown = sorted({b.name for b in found if b.kind == "example"} - set(EXAMPLES)) + sorted(set(args.names) - set(EXAMPLES))
    if unknown:
        raise SystemExit(f"no example named {', '.join(unknown)} in scripts/readme_examples.py")
    generated: dict[tuple[str, str], list[str]] = {}
    for block in found:
        if block.kind == "options":
            generated["options", block.name] = options_table(block.name)
    for document in DOCUMENTS:
        print(f"{document}: {rewrite(document, generated)} option table(s) rewritten")
    if args.options:
        return
    (ROOT / "out").mkdir(exist_ok=True)
    for name in dict.fromkeys(args.names or [b.name for b in found if b.kind == "example"]):
        block = {("example", name): run_example(name, EXAMPLES[name])}
        for document in DOCUMENTS:  # written at once: a later failure keeps what ran
            rewrite(document, block)


if __name__ == "__main__":
    main()
