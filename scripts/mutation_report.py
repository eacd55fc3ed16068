"""A small mutation tester for atomuq's formula modules, and the report of its results.

Why not mutmut 3: it maps tests to functions by running the whole selected suite under tracing and
re-imports per mutant; on this project (torch import ~10 s, a few slow integration files) a warm
fork server is an order of magnitude cheaper. This driver:

1. imports atomuq, torch and the test modules once (pytest --collect-only in this process);
2. enumerates mutants of each target function with AST operator swaps (see `Sites`):
   + - * / ** swaps and dropped operands, comparison boundary shifts and negations, numeric constants +-1,
   True/False swaps, removed unary minus / `not`, and/or swaps, swapped first two call arguments,
   sum/mean, min/max, argmin/argmax, any/all swaps, sqrt/abs/exp/log dropped, side="left"/"right" and
   reduce="amin"/"amax" swaps. Nothing inside `raise` statements or f-strings (error-message text) is mutated;
   argument defaults are not mutated;
3. for each mutant forks a child that replaces the function's __code__ in place (so every `from x import f`
   reference sees the mutant), runs pytest on the target's test files with -x, and exits with pytest's code;
   the parent kills a child that runs past its timeout (counted as killed).

Usage (from the repository root, with PYTHONPATH=src):

    nice -n 19 python scripts/mutation_report.py run atomuq.uq.confidence --phase before
    nice -n 19 python scripts/mutation_report.py run atomuq.uq.confidence --phase after   # new tests, on survivors
    python scripts/mutation_report.py report            # per-module table and the survivors

Results go to mutants/<module>.<phase>.jsonl (mutants/ is git-ignored).
"""

from __future__ import annotations

import __future__
import argparse
import ast
import copy
import importlib
import importlib.util
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "mutants"

#: module -> functions to mutate (None: every function and method) and the test files of each phase.
#: "before" are the existing tests that import the module (slow integration files left out, see the doc);
#: "after" are the new formula tests, run on the survivors of "before".
#: the tests of tests/test_ltau.py that exercise the formulas without training a model (the others train one)
LTAU_FORMULA_TESTS = [f"tests/test_ltau.py::{name}" for name in (
    "test_confidence_is_the_direct_count_with_less_or_equal", "test_mean_and_spread_over_runs",
    "test_histogram_cdf_is_exact_at_edges_and_mean_within_bin_resolution",
    "test_probabilities_that_generate_the_outcomes_are_calibrated",
    "test_fitted_scale_recovers_the_scale_that_generated_the_errors")]
#: the tests of tests/test_evaluate.py that call each evaluate module (the plotting test left out: matplotlib, no formula)
def evaluate_tests(keywords: str) -> list[str]:
    return ["tests/test_evaluate.py", "-k", f"({keywords} or bad_input or bad_files) and not plots"]

#: the conformance suite over the models defined here (native, pair); orb, metatomic and EMT take minutes per mutant
CONFORMANCE_LOCAL = "not orb-v3 and not metatomic-pet and not ase-emt"

TARGETS: dict[str, dict] = {
    "atomuq.uq.force_delta": dict(functions=None, before=["tests/test_derivatives.py"],
                                  after=["tests/test_formulas_uq.py"]),
    "atomuq.uq.confidence": dict(functions=None, before=["tests/test_adapter_orb.py"],
                                 after=["tests/test_formulas_uq.py"]),
    "atomuq.models.derivatives": dict(functions=None,
                                      before=["tests/test_derivatives.py", "tests/test_conformance.py", "-k", CONFORMANCE_LOCAL],
                                      after=["tests/test_formulas_derivatives.py"]),
    "atomuq.uq.ensemble": dict(functions=["EnsemblePrediction.mean_forces", "EnsemblePrediction.mean_energy",
                                          "evaluate_ensemble", "ensemble_uncertainty"],
                               before=["tests/test_ensemble.py::test_ensemble_std_equals_numpy_over_members",
                                       "tests/test_ensemble.py::test_identical_members_have_zero_std_and_ase_members_agree",
                                       "tests/test_ensemble.py::test_ase_calculator_members_equal_numpy",
                                       "tests/test_ensemble.py::test_direct_mode_refuses_a_conservative_only_member",
                                       "tests/test_ensemble.py::test_library_errors"],
                               after=["tests/test_formulas_uq.py"]),
    "atomuq.uq.equigrad": dict(functions=None, before=["tests/test_derivatives.py"],
                               after=["tests/test_formulas_derivatives.py"]),
    "atomuq.uq.ltau.distribution": dict(functions=None, before=LTAU_FORMULA_TESTS, after=["tests/test_formulas_ltau.py"]),
    "atomuq.uq.ltau.calibration": dict(functions=None, before=LTAU_FORMULA_TESTS, after=["tests/test_formulas_ltau.py"]),
    "atomuq.uq.evaluate.ranking": dict(functions=None, before=evaluate_tests("spearman or roc or bootstrap"),
                                       after=["tests/test_formulas_evaluate.py"]),
    "atomuq.uq.evaluate.calibration": dict(functions=None,
                                           before=evaluate_tests("calibration or calibrated or confident or miscalibration"),
                                           after=["tests/test_formulas_evaluate.py"]),
    "atomuq.uq.evaluate.conformal": dict(functions=None, before=evaluate_tests("conformal"),
                                         after=["tests/test_formulas_evaluate.py"]),
    "atomuq.uq.evaluate.bootstrap": dict(functions=None, before=evaluate_tests("bootstrap"),
                                         after=["tests/test_formulas_evaluate.py"]),
    "atomuq.core.neighbors": dict(functions=None, before=["tests/test_neighbors.py"],
                                  after=["tests/test_formulas_core.py"]),
    "atomuq.core.validate": dict(functions=["closest_contacts"], before=["tests/test_attack.py", "-k", "contact"],
                                 after=["tests/test_formulas_core.py"]),
    "atomuq.core.batch": dict(functions=None, before=["tests/test_neighbors.py", "tests/test_derivatives.py"],
                              after=["tests/test_formulas_core.py"]),
}

BINOP_SWAPS = {ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Div], ast.Div: [ast.Mult],
               ast.Pow: [ast.Mult], ast.FloorDiv: [ast.Div], ast.Mod: [ast.FloorDiv]}
CMP_SWAPS = {ast.Lt: [ast.LtE, ast.GtE], ast.LtE: [ast.Lt, ast.Gt], ast.Gt: [ast.GtE, ast.LtE],
             ast.GtE: [ast.Gt, ast.Lt], ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq], ast.Is: [ast.IsNot],
             ast.IsNot: [ast.Is], ast.In: [ast.NotIn], ast.NotIn: [ast.In]}
NAME_SWAPS = {"sum": "mean", "mean": "sum", "min": "max", "max": "min", "argmin": "argmax", "argmax": "argmin",
              "amin": "amax", "amax": "amin", "minimum": "maximum", "maximum": "minimum", "any": "all", "all": "any",
              "floor": "ceil", "ceil": "floor"}
DROPPED_CALLS = {"sqrt", "abs", "exp", "log"}
STRING_SWAPS = {"left": "right", "right": "left", "amin": "amax", "amax": "amin", "sum": "mean", "mean": "sum"}
OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.FloorDiv: "//", ast.Mod: "%",
       ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is",
       ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.And: "and", ast.Or: "or"}


@dataclass
class Mutant:
    """One mutation: function qualname, the k-th site of the walk, the alternative there, and a description."""

    module: str
    function: str
    site: int
    alt: int
    line: int
    description: str

    @property
    def key(self) -> str:
        return f"{self.function}:{self.site}:{self.alt}"


def _skipped_nodes(fn: ast.AST) -> set[int]:
    """ids of nodes inside raise statements, f-strings and docstrings (message text, not formulas)."""
    skip: set[int] = set()
    for node in ast.walk(fn):
        if isinstance(node, (ast.Raise, ast.JoinedStr, ast.Assert)):
            skip.update(id(n) for n in ast.walk(node))
    body = getattr(fn, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        skip.add(id(body[0].value))
    return skip


def _parents(fn: ast.AST) -> dict[int, tuple[ast.AST, str, int | None]]:
    out = {}
    for parent in ast.walk(fn):
        for field, value in ast.iter_fields(parent):
            if isinstance(value, list):
                for i, child in enumerate(value):
                    if isinstance(child, ast.AST):
                        out[id(child)] = (parent, field, i)
            elif isinstance(value, ast.AST):
                out[id(value)] = (parent, field, None)
    return out


def _replace(parents: dict, node: ast.AST, new: ast.AST) -> None:
    parent, field, index = parents[id(node)]
    if index is None:
        setattr(parent, field, new)
    else:
        getattr(parent, field)[index] = new


def _body_nodes(fn: ast.FunctionDef) -> list[ast.AST]:
    """Nodes of the function body in a fixed order (decorators, arguments and defaults excluded)."""
    out = []
    for stmt in fn.body:
        out.extend(ast.walk(stmt))
    return out


def sites(fn: ast.FunctionDef) -> list[tuple[ast.AST, list[tuple[str, object]]]]:
    """Per body node (walk order), the mutations that apply: (description, how) pairs."""
    skip = _skipped_nodes(fn)
    parents = _parents(fn)
    out = []
    for node in _body_nodes(fn):
        if id(node) in skip:
            out.append((node, []))
            continue
        alts: list[tuple[str, object]] = []
        if isinstance(node, (ast.BinOp, ast.AugAssign)):
            for new in BINOP_SWAPS.get(type(node.op), []):
                alts.append((f"`{OPS[type(node.op)]}` -> `{OPS[new]}`", ("op", new)))
            if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
                alts.append((f"drop `{OPS[type(node.op)]} {ast.unparse(node.right)[:40]}`", ("left",)))
        elif isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                for new in CMP_SWAPS.get(type(op), []):
                    alts.append((f"`{OPS[type(op)]}` -> `{OPS[new]}`", ("cmp", k, new)))
        elif isinstance(node, ast.BoolOp):
            new = ast.Or if isinstance(node.op, ast.And) else ast.And
            alts.append((f"`{OPS[type(node.op)]}` -> `{OPS[new]}`", ("op", new)))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not, ast.Invert)):
            alts.append((f"removed unary `{ast.unparse(node)[:1]}`", ("operand",)))
        elif isinstance(node, ast.Constant) and id(node) not in skip:
            v = node.value
            parent = parents.get(id(node), (None, None, None))[0]
            if isinstance(v, bool):
                alts.append((f"`{v}` -> `{not v}`", ("const", not v)))
            elif isinstance(v, (int, float)):
                alts.append((f"`{v!r}` -> `{v + 1!r}`", ("const", v + 1)))
                alts.append((f"`{v!r}` -> `{v - 1!r}`", ("const", v - 1)))
            elif isinstance(v, str) and v in STRING_SWAPS and isinstance(parent, (ast.keyword, ast.Call)):
                alts.append((f"`{v!r}` -> `{STRING_SWAPS[v]!r}`", ("const", STRING_SWAPS[v])))
        elif isinstance(node, ast.Attribute) and node.attr in NAME_SWAPS and isinstance(node.ctx, ast.Load):
            alts.append((f"`.{node.attr}` -> `.{NAME_SWAPS[node.attr]}`", ("attr", NAME_SWAPS[node.attr])))
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in DROPPED_CALLS and len(node.args) == 1 and not node.keywords:
                alts.append((f"dropped `{name}(...)`", ("unwrap",)))
            pos = [a for a in node.args if not isinstance(a, ast.Starred)]
            if len(pos) >= 2 and len(pos) == len(node.args) and ast.dump(pos[0]) != ast.dump(pos[1]):
                alts.append((f"swapped arguments of `{ast.unparse(node.func)[:30]}`", ("swap",)))
        out.append((node, alts))
    return out


def apply(fn: ast.FunctionDef, site: int, alt: int) -> ast.FunctionDef:
    """A copy of fn with the alt-th mutation at the site-th body node."""
    fn = copy.deepcopy(fn)
    node, alts = sites(fn)[site]
    how = alts[alt][1]
    parents = _parents(fn)
    kind = how[0]
    if kind == "op":
        node.op = how[1]()
    elif kind == "left":
        _replace(parents, node, node.left)
    elif kind == "cmp":
        node.ops[how[1]] = how[2]()
    elif kind == "operand":
        _replace(parents, node, node.operand)
    elif kind == "const":
        node.value = how[1]
    elif kind == "attr":
        node.attr = how[1]
    elif kind == "unwrap":
        _replace(parents, node, node.args[0])
    elif kind == "swap":
        node.args[0], node.args[1] = node.args[1], node.args[0]
    return ast.fix_missing_locations(fn)


def functions(tree: ast.Module, wanted: list[str] | None) -> dict[str, ast.FunctionDef]:
    """Top-level functions and methods of top-level classes by qualname."""
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{node.name}.{item.name}"] = item
    if wanted is not None:
        out = {k: v for k, v in out.items() if k in wanted}
    return out


def mutants(module: str, wanted: list[str] | None) -> tuple[list[Mutant], dict[str, ast.FunctionDef]]:
    """Every mutant of the wanted functions of a module."""
    path = importlib.util.find_spec(module).origin
    tree = ast.parse(Path(path).read_text())
    fns = functions(tree, wanted)
    out = []
    for qual, fn in fns.items():
        for s, (node, alts) in enumerate(sites(fn)):
            for a, (desc, _) in enumerate(alts):
                out.append(Mutant(module, qual, s, a, getattr(node, "lineno", fn.lineno), desc))
    return out, fns


def live_function(module: str, qual: str):
    """The function object whose __code__ a mutant replaces."""
    obj = importlib.import_module(module)
    parts = qual.split(".")
    for p in parts[:-1]:
        obj = getattr(obj, p)
    raw = obj.__dict__[parts[-1]] if len(parts) > 1 else getattr(obj, parts[-1])
    if isinstance(raw, property):
        raw = raw.fget
    if isinstance(raw, (classmethod, staticmethod)):
        raw = raw.__func__
    while hasattr(raw, "__wrapped__"):
        raw = raw.__wrapped__
    return raw


def install(mutant: Mutant, fn_node: ast.FunctionDef) -> None:
    """Replace the live function's code by the mutant's."""
    target = live_function(mutant.module, mutant.function)
    node = apply(fn_node, mutant.site, mutant.alt)
    node.decorator_list = []
    mod = importlib.import_module(mutant.module)
    code = compile(ast.Module(body=[node], type_ignores=[]), mod.__file__, "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    namespace = dict(mod.__dict__)
    exec(code, namespace)
    new_code = namespace[node.name].__code__
    if new_code.co_freevars != target.__code__.co_freevars:
        raise RuntimeError("closure mismatch")
    target.__code__ = new_code


def run_child(tests: list[str], mutant: Mutant | None, fn_node, timeout: float) -> tuple[str, float]:
    """Fork, install the mutant, run pytest; 'killed', 'survived', 'timeout' or 'invalid', and the seconds taken."""
    import pytest

    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            if mutant is not None:
                try:
                    install(mutant, fn_node)
                except Exception:
                    os._exit(99)
            rc = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", *tests])
            os._exit(int(rc))
        except BaseException:
            os._exit(98)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - start
        time.sleep(0.05)
    seconds = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    if code == 99:
        return "invalid", seconds
    if code == 0:
        return "survived", seconds
    if code == 5:  # no tests collected: a configuration error, not a kill
        raise SystemExit(f"no tests collected from {tests}")
    return "killed", seconds


def results_path(module: str, phase: str) -> Path:
    return OUT / f"{module}.{phase}.jsonl"


def load(module: str, phase: str) -> dict[str, dict]:
    path = results_path(module, phase)
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {f"{r['function']}:{r['site']}:{r['alt']}": r for r in rows}


def run(module: str, phase: str, only: list[str] | None, fresh: bool, redo_timeouts: bool = False,
        redo_survivors: bool = False) -> None:
    """Run every mutant of a module (phase after: only the survivors of phase before)."""
    import pytest

    cfg = TARGETS[module]
    tests = cfg[phase]
    OUT.mkdir(exist_ok=True)
    all_mutants, fns = mutants(module, cfg["functions"])
    if phase == "after":
        before = load(module, "before")
        all_mutants = [m for m in all_mutants if before.get(m.key, {}).get("status") == "survived"]
    if only:
        all_mutants = [m for m in all_mutants if m.function in only]
    path = results_path(module, phase)
    done = {} if fresh else load(module, phase)
    if fresh and path.exists():
        path.unlink()
    if redo_timeouts:  # a timeout under heavy load may be a slow survivor: run those again with 3x the time
        done = {k: r for k, r in done.items() if r["status"] != "timeout"}
    if redo_survivors:  # after new tests were added: run the survivors again
        done = {k: r for k, r in done.items() if r["status"] != "survived"}
    todo = [m for m in all_mutants if m.key not in done]
    # import the test modules (and everything they import) once, here, so children start warm
    rc = pytest.main(["-q", "--collect-only", "-p", "no:cacheprovider", "-o", "addopts=", *tests])
    if rc != 0:
        raise SystemExit(f"collection failed for {tests}")
    status, base = run_child(tests, None, None, timeout=900)
    if status != "survived":
        raise SystemExit(f"the unmutated tests do not pass ({status}): {tests}")
    timeout = (9 if redo_timeouts else 3) * base + 10
    print(f"{module} [{phase}]: {len(todo)} mutants to run ({len(all_mutants)} in all), baseline {base:.1f} s", flush=True)
    with path.open("a") as fh:
        for k, m in enumerate(todo):
            status, seconds = run_child(tests, m, fns[m.function], timeout)
            row = asdict(m) | {"status": status, "seconds": round(seconds, 2)}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            print(f"[{k + 1}/{len(todo)}] {status:8s} {m.function} L{m.line} {m.description}", flush=True)


def show(module: str, key: str) -> str:
    """The mutated line of a mutant, for the report."""
    cfg = TARGETS[module]
    _, fns = mutants(module, cfg["functions"])
    qual, site, alt = key.rsplit(":", 2)
    fn = fns[qual]
    node = sites(fn)[int(site)][0]
    mutated = apply(fn, int(site), int(alt))
    line = getattr(node, "lineno", fn.lineno)
    compound = (ast.FunctionDef, ast.If, ast.For, ast.While, ast.With, ast.Try)
    simple = [st for st in ast.walk(mutated) if isinstance(st, ast.stmt) and not isinstance(st, compound)
              and st.lineno <= line <= st.end_lineno]
    if simple:
        text = ast.unparse(max(simple, key=lambda st: st.lineno))
    else:
        heads = [st for st in ast.walk(mutated) if isinstance(st, (ast.If, ast.While, ast.For))
                 and st.lineno <= line <= (st.iter if isinstance(st, ast.For) else st.test).end_lineno]
        st = max(heads, key=lambda st: st.lineno)
        text = "for ... in " + ast.unparse(st.iter) if isinstance(st, ast.For) else "if " + ast.unparse(st.test)
    return " ".join(text.split())[:160]


#: survivors of both phases, classified by hand: "module function Lline description" -> (class, why)
EQUIVALENT = "equivalent"
NOT_FORMULA = "not a formula"
CLASSIFIED: dict[str, tuple[str, str]] = {}


def _classify(prefix: str, kind: str, why: str, *items: str) -> None:
    for item in items:
        CLASSIFIED[f"{prefix} {item}"] = (kind, why)


LAST_AXIS = "`-1` -> `1` as the last axis of an array that is always 2-D here"
_classify("atomuq.uq.force_delta force_delta", EQUIVALENT, LAST_AXIS + " ((N, 3) forces, (B, 6) stresses)",
          "L49 removed unary `-`", "L55 removed unary `-`", "L59 removed unary `-`")
_classify("atomuq.uq.confidence confidence", EQUIVALENT, LAST_AXIS + " ((N, K) logits and probabilities)",
          "L18 removed unary `-`", "L21 removed unary `-`")
_classify("atomuq.models.derivatives to_voigt", EQUIVALENT, "transpose(1, 2) and transpose(2, 1) are the same operation",
          "L53 swapped arguments of `matrix.transpose`")
_classify("atomuq.models.derivatives evaluate", EQUIVALENT, "transpose(1, 2) and transpose(2, 1) are the same operation",
          "L124 swapped arguments of `w.transpose`")
_classify("atomuq.uq.ensemble ensemble_uncertainty", EQUIVALENT, LAST_AXIS + " ((N, 3) forces)",
          "L118 removed unary `-`", "L125 removed unary `-`")
_classify("atomuq.uq.equigrad energy_spread_under_rotations", EQUIVALENT,
          "conservative=True also computes -dE/dr, but the energies read are the same (only slower)", "L35 `False` -> `True`")
_classify("atomuq.uq.ltau.distribution error_histogram", EQUIVALENT,
          "reshape(-2, k): numpy treats any negative size as the one unknown dimension", "L111 `1` -> `2`")
_classify("atomuq.uq.ltau.distribution cdf_at", EQUIVALENT,
          "cumsum over one more column (the overflow) leaves columns 0..last unchanged, and only those are read",
          "L135 `1` -> `2`")
_classify("atomuq.uq.ltau.distribution cdf_at", EQUIVALENT,
          "frac leaves [0, 1] only for t below edges[0] or above edges[-1], where the two np.where lines overwrite the result",
          "L138 `0.0` -> `-1.0`", "L138 `1.0` -> `2.0`")


#: mutations that are equivalent wherever they occur
GENERIC = {
    "swapped arguments of `np.clip`": "np.clip(lo, x, hi) = min(max(lo, x), hi) = np.clip(x, lo, hi): max is symmetric",
    "swapped arguments of `min`": "min is symmetric",
    "swapped arguments of `max`": "max is symmetric",
}
_classify("atomuq.uq.ltau.distribution cdf_at", EQUIVALENT, "the final np.clip(result, 0, 1) maps -1 to 0",
          "L140 `0.0` -> `-1.0`")
_classify("atomuq.uq.ltau.distribution cdf_at", EQUIVALENT,
          "at t = edges[-1] the interpolation gives cumulative[last - 1] + 1.0 * p[last], the same sum as cumulative[last]",
          "L141 `>=` -> `>`")
_classify("atomuq.uq.ltau.distribution cdf_at", EQUIVALENT,
          "the result is a sum of non-negative probabilities, never below 0", "L142 `0.0` -> `-1.0`")
_classify("atomuq.uq.ltau.calibration reliability_curve", EQUIVALENT,
          "p >= 0 is checked, so int(p * n_bins) is never below 0 and the lower clip bound never acts", "L54 `0` -> `-1`")
_classify("atomuq.uq.ltau.calibration fit_scale", EQUIVALENT, "the Brier score (p - hit)^2 is symmetric in its arguments",
          "L99 swapped arguments of `brier_score`", "L106 swapped arguments of `brier_score`")
_classify("atomuq.uq.ltau.calibration fit_scale", EQUIVALENT,
          "a negative xatol never stops the bounded search early: it runs to maxiter and returns a minimum at least as good",
          "L103 `0.0001` -> `-0.9999`")
_classify("atomuq.uq.evaluate.ranking spearman_rows", EQUIVALENT, "Pearson correlation is symmetric in x and y",
          "L28 swapped arguments of `_pearson_rows`")
_classify("atomuq.uq.evaluate.ranking spearman", EQUIVALENT, "Spearman correlation is symmetric in its two arguments",
          "L40 swapped arguments of `spearman_rows`")
_classify("atomuq.uq.evaluate.ranking spearman", EQUIVALENT,
          "all values equal values[0] exactly when all equal values[1] (or values[-1])", "L36 `0` -> `1`", "L36 `0` -> `-1`")
_classify("atomuq.uq.evaluate.ranking roc_auc_rows", EQUIVALENT,
          "with an empty class the rank formula is 0/0, NaN already, so the NaN mask at > 0 or >= 0 (> -1) gives the same",
          "L76 `>` -> `>=`", "L76 `0` -> `-1`")
_classify("atomuq.uq.evaluate.calibration _observed_rows", EQUIVALENT,
          "reshape(-2, n): numpy treats any negative size as the one unknown dimension", "L136 `1` -> `2`")
_classify("atomuq.uq.evaluate.calibration _observed_rows", EQUIVALENT, "`axis=-1` -> `axis=1` on hist, which is always 2-D",
          "L141 removed unary `-`")
_classify("atomuq.uq.evaluate.bootstrap bootstrap_ci", EQUIVALENT,
          "every array was just checked to have the same length, so data[-1] has the length of data[0]", "L82 `0` -> `-1`")
_classify("atomuq.uq.evaluate.bootstrap _group_bootstrap", EQUIVALENT,
          "every array was checked to have the same length, so data[-1] has the shape of data[0]", "L123 `0` -> `-1`")
_classify("atomuq.core.neighbors Graph.num_edges", EQUIVALENT, "centers is 1-D: shape[0] is shape[-1]", "L34 `0` -> `-1`")
_classify("atomuq.core.neighbors build_graph", EQUIVALENT,
          "reshape(-2, 3): numpy treats any negative size as the one unknown dimension", "L71 `1` -> `2`")
_classify("atomuq.core.validate closest_contacts", EQUIVALENT,
          "a larger neighbour cutoff only adds pairs beyond the sum of radii (ratio >= 1), which never count",
          "L78 `2` -> `3`")
_classify("atomuq.core.validate closest_contacts", EQUIVALENT,
          "a full neighbour list always has an even number of edges (i -> j and j -> i, or S and -S for an image of "
          "itself), so == 1 never holds; without the early return (== -1) an empty graph gives inf everywhere, "
          "hence None for every structure, the same result", "L79 `0` -> `1`", "L79 `0` -> `-1`")
_classify("atomuq.core.validate closest_contacts", EQUIVALENT, LAST_AXIS + " ((E, 3) edge vectors)",
          "L81 removed unary `-`")
_classify("atomuq.core.validate closest_contacts", EQUIVALENT, "dim 0 of the 1-D per-edge ratios is dim -1",
          "L86 `0` -> `-1`")
_classify("atomuq.core.validate closest_contacts", EQUIVALENT,
          "the mirrored edge j -> i (shift -S) has bit-for-bit the same ratio, so another matching edge is the same pair, "
          "possibly as (j, i); the order within the pair is not specified", "L93 `0` -> `1`", "L93 `0` -> `-1`")
FIRST_AXIS_1D = "dim 0 of a 1-D tensor is dim -1"
_classify("atomuq.core.batch Batch.num_structures", EQUIVALENT, FIRST_AXIS_1D, "L52 `0` -> `-1`")
_classify("atomuq.core.batch Batch.ptr", EQUIVALENT, FIRST_AXIS_1D, "L71 `0` -> `-1`")
_classify("atomuq.core.batch Batch.select", EQUIVALENT, FIRST_AXIS_1D + " (sizes, ptr, starts, numbers, fixed)",
          "L98 `0` -> `-1`", "L99 `0` -> `-1`", "L101 `0` -> `-1`", "L102 `0` -> `-1`", "L105 `0` -> `-1`", "L110 `0` -> `-1`")
_classify("atomuq.uq.ltau.calibration fit_scale", EQUIVALENT,
          "a wider bracket (two grid points instead of one) for the bounded refinement still contains the neighbours' "
          "interval, and the refined point is kept only when its area is lower, so the fitted area is not worse",
          "L101 `1` -> `2`")
_classify("atomuq.uq.evaluate.conformal ConformalCalibrator.coverage", EQUIVALENT,
          "the scores go through normaliser right after, which refuses an empty array with the same message",
          "L105 `1` -> `0`")
_classify("atomuq.uq.evaluate.bootstrap bootstrap_ci", EQUIVALENT,
          "the chunk size only sets how many resamples are drawn per call (memory); here numpy's Generator.integers gives "
          "the same stream in chunks of 1 and 2 (the test that draws one resample at a time passes with either); another "
          "split could only change which random resamples are drawn, not the method", "L98 `1` -> `2`")


def _status(module: str, key: str, row: dict, after: dict) -> tuple[str, str]:
    if after.get(key, {}).get("status") in ("killed", "timeout"):
        return "killed by a new test", ""
    if row["description"] in GENERIC:
        return EQUIVALENT, GENERIC[row["description"]]
    found = CLASSIFIED.get(f"{module} {row['function']} L{row['line']} {row['description']}")
    return found if found else ("surviving", "unclassified")


def report(modules: list[str], survivors: bool) -> None:
    """Per module: mutants, killed by the existing tests, killed after adding the new tests, equivalent, not a formula."""
    print("| module | mutants | killed before | survived before | killed by new tests | killed after | equivalent "
          "| not a formula | unclassified |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lists = []
    for module in modules:
        before = load(module, "before")
        if not before:
            continue
        after = load(module, "after")
        valid = {k: r for k, r in before.items() if r["status"] != "invalid"}
        killed_before = sum(r["status"] in ("killed", "timeout") for r in valid.values())
        survived = [k for k, r in valid.items() if r["status"] == "survived"]
        classes = [(k, *_status(module, k, valid[k], after)) for k in survived]
        count = {c: sum(1 for _, cls, _ in classes if cls == c) for c in
                 ("killed by a new test", EQUIVALENT, NOT_FORMULA, "surviving")}
        print(f"| {module} | {len(valid)} | {killed_before} | {len(survived)} | {count['killed by a new test']} "
              f"| {killed_before + count['killed by a new test']} | {count[EQUIVALENT]} | {count[NOT_FORMULA]} "
              f"| {count['surviving']} |")
        lists.append((module, classes, valid))
    if survivors:
        for module, classes, valid in lists:
            print(f"\n### {module}\n")
            for key, cls, why in sorted(classes, key=lambda c: (valid[c[0]]["line"], c[0])):
                r = valid[key]
                line = show(module, key).replace("|", "\\|")
                print(f"- L{r['line']} `{r['function']}` {r['description']} (`{line}`): **{cls}**" + (f", {why}" if why else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("modules", nargs="+")
    p.add_argument("--phase", choices=("before", "after"), default="before")
    p.add_argument("--only", nargs="*", help="function qualnames")
    p.add_argument("--fresh", action="store_true", help="forget earlier results of this phase")
    p.add_argument("--redo-survivors", action="store_true", help="run the mutants that survived this phase again")
    p.add_argument("--redo-timeouts", action="store_true", help="run the mutants that timed out again, with 3x the time")
    p = sub.add_parser("list")
    p.add_argument("modules", nargs="+")
    p = sub.add_parser("report")
    p.add_argument("modules", nargs="*")
    p.add_argument("--survivors", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    if args.cmd == "run":
        for module in args.modules:
            run(module, args.phase, args.only, args.fresh, args.redo_timeouts, args.redo_survivors)
    elif args.cmd == "list":
        for module in args.modules:
            ms, _ = mutants(module, TARGETS[module]["functions"])
            for m in ms:
                print(f"{m.function} L{m.line} {m.description}")
            print(f"{module}: {len(ms)} mutants")
    else:
        report(args.modules or list(TARGETS), args.survivors)


if __name__ == "__main__":
    main()
