"""Reference labelling: energy (eV), forces (eV/Å) and stress (eV/Å³) from a real reference method via ASE calculators.

Methods (``METHODS``, or ``ase:MODULE.CLASS`` for any ASE calculator class):

- ``gfn2-xtb``: GFN2-xTB through tblite, for molecules.
- ``gfn1-xtb``: GFN1-xTB through tblite, for periodic cells (Γ point only: use supercells).
- ``emt``: ASE's effective-medium theory for metals (``asap_cutoff=True``, the asap3 convention).
- ``dft-pbe``: PBE DFT through PySCF (6-31G*, density fitting), for small molecular validation sets.

Labels are stored the ASE way: a SinglePointCalculator holding energy, forces and (for cells
periodic in all three directions) stress, plus ``info['label_method']``. Labelling is resumable:
every finished frame is appended to ``OUTPUT.partial`` at once; a rerun skips what is there and
the final file is written atomically in input order. Frames whose calculation fails are reported,
skipped and recorded in ``OUTPUT.failures.jsonl``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, Calculator, all_changes
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols
from ase.io import read, write

from atomuq.core.errors import AtomuqError, InputError
from atomuq.core.io import Record, atomic_path, write_structures
from atomuq.core.validate import DEFAULT_MIN_DISTANCE, check_structure

#: result keys written as labels, with units
LABEL_KEYS = {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å³ (Voigt xx yy zz yz xz xy)"}
#: keys removed from a structure before new labels are attached (they would contradict them)
STALE_KEYS = ("energy", "free_energy", "forces", "stress", "energies", "label_method")
#: environment variables that pin worker processes to one thread (OpenMP, BLAS)
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
INSTALL_HINT = "pip install 'atomuq[label]'"


class LabellingError(AtomuqError):
    """Labelling could not go on (no frame could be labelled, a worker died); the message says what to do."""


# --------------------------------------------------------------------------------------------
# reference methods


@dataclass(frozen=True)
class ReferenceMethod:
    """A named reference method: how to build its ASE calculator and what it accepts."""

    name: str
    description: str
    factory: Callable[..., Calculator]  # module-level (picklable) when used with worker processes
    options: Mapping[str, Any] = field(default_factory=dict)
    periodic: bool = True  # accepts cells periodic in some direction
    molecular: bool = True  # accepts non-periodic structures
    elements: frozenset[int] | None = None  # None: any element
    package: str | None = None  # the pip package the calculator needs
    strict_options: bool = True  # reject options the calculator does not list in default_parameters

    def make_calculator(self) -> Calculator:
        """A fresh calculator; InputError with an install hint if its package is missing, or for unknown options."""
        try:
            calc = self.factory(**dict(self.options))
        except ImportError as exc:
            hint = f"install it with {INSTALL_HINT}" if self.package else "check that the module is installed"
            raise InputError(f"method {self.name}: cannot import {self.package or 'its calculator'} ({exc}); {hint}") from exc
        except TypeError as exc:
            raise InputError(f"method {self.name}: cannot build its calculator with options {dict(self.options)} "
                             f"({exc})") from exc
        known = getattr(calc, "default_parameters", None)
        if self.strict_options and self.options and known:
            unknown = sorted(set(self.options) - set(known))
            if unknown:  # ASE calculators store unknown keywords silently; say so instead
                raise InputError(f"method {self.name}: unknown option(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(known))}")
        return calc

    def with_options(self, options: Mapping[str, Any] | None) -> "ReferenceMethod":
        """The same method with extra calculator keyword options (they override the defaults)."""
        if not options:
            return self
        return dataclasses.replace(self, options={**dict(self.options), **dict(options)})

    def check(self, atoms: Atoms, where: str) -> None:
        """Raise InputError naming `where` if this method cannot handle the structure."""
        periodic = bool(np.any(atoms.pbc))
        if periodic and not self.periodic:
            raise InputError(f"{where}: method {self.name} handles molecules only (pbc=False); "
                             "use gfn1-xtb or emt for periodic cells, or set pbc=False")
        if not periodic and not self.molecular:
            raise InputError(f"{where}: method {self.name} needs a periodic cell; set a cell and pbc=True")
        if self.elements is not None:
            unknown = sorted(set(np.unique(atoms.numbers).tolist()) - set(self.elements))
            if unknown:
                names = ", ".join(chemical_symbols[z] for z in unknown)
                have = " ".join(chemical_symbols[z] for z in sorted(self.elements))
                raise InputError(f"{where}: element(s) {names} not supported by method {self.name} (it knows {have})")


def _tblite(method: str, **options: Any) -> Calculator:
    from tblite.ase import TBLite  # optional dependency, imported lazily

    return TBLite(**{"method": method, "verbosity": 0, **options})


def _emt(**options: Any) -> Calculator:
    from ase.calculators.emt import EMT

    return EMT(**{"asap_cutoff": True, **options})


def _pyscf_dft(**options: Any) -> Calculator:
    import pyscf  # noqa: F401  (fail early, with the install hint, when pyscf is missing)

    return PySCFDFT(**options)


def _ase_class(module: str, name: str, **options: Any) -> Calculator:
    return getattr(importlib.import_module(module), name)(**options)


def _emt_elements() -> frozenset[int]:
    from ase.calculators.emt import parameters

    return frozenset(chemical_symbols.index(s) for s in parameters)


class PySCFDFT(Calculator):
    """Kohn-Sham DFT for molecules through PySCF: energy in eV and forces in eV/Å (restricted, or unrestricted for odd electron counts)."""

    implemented_properties = ["energy", "free_energy", "forces"]
    default_parameters = {
        "xc": "pbe", "basis": "6-31g*", "density_fit": True, "charge": 0, "spin": None,
        "conv_tol": 1e-9, "max_cycle": 100, "grid_level": 3,
    }

    def calculate(self, atoms: Atoms | None = None, properties: Sequence[str] = ("energy",),
                  system_changes: Sequence[str] = all_changes) -> None:
        """Run the SCF and the analytic gradient; CalculationFailed when the SCF does not converge."""
        from ase.units import Bohr, Hartree
        from pyscf import dft, gto

        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        if a.pbc.any():
            raise CalculationFailed("PySCFDFT handles molecules only (pbc=False)")
        p = self.parameters
        charge = int(p.charge)
        spin = int(p.spin) if p.spin is not None else int((int(a.numbers.sum()) - charge) % 2)
        mol = gto.M(atom=[(s, tuple(x)) for s, x in zip(a.get_chemical_symbols(), a.positions)],
                    unit="Angstrom", basis=p.basis, charge=charge, spin=spin, verbose=0)
        mf = dft.RKS(mol) if spin == 0 else dft.UKS(mol)
        mf.xc = p.xc
        mf.conv_tol = p.conv_tol
        mf.max_cycle = p.max_cycle
        mf.grids.level = p.grid_level
        if p.density_fit:
            mf = mf.density_fit()
        energy = mf.kernel()
        if not mf.converged:
            raise CalculationFailed(f"PySCF {p.xc}/{p.basis} SCF did not converge in {p.max_cycle} cycles")
        gradient = mf.nuc_grad_method().kernel()
        self.results["energy"] = self.results["free_energy"] = float(energy) * Hartree
        self.results["forces"] = -np.asarray(gradient) * Hartree / Bohr


_XTB_ELEMENTS = frozenset(range(1, 87))

METHODS: dict[str, ReferenceMethod] = {
    "gfn2-xtb": ReferenceMethod(
        "gfn2-xtb", "GFN2-xTB (tblite), molecules", functools.partial(_tblite, "GFN2-xTB"),
        elements=_XTB_ELEMENTS, package="tblite"),
    "gfn1-xtb": ReferenceMethod(
        "gfn1-xtb", "GFN1-xTB (tblite), periodic cells at the Γ point and molecules",
        functools.partial(_tblite, "GFN1-xTB"), elements=_XTB_ELEMENTS, package="tblite"),
    "emt": ReferenceMethod(
        "emt", "ASE effective-medium theory, metals (asap_cutoff=True)", _emt, elements=_emt_elements()),
    "dft-pbe": ReferenceMethod(
        "dft-pbe", "PBE/6-31G* with density fitting (PySCF), molecules", _pyscf_dft, periodic=False,
        package="pyscf"),
}


def available_methods() -> dict[str, str]:
    """Name and description of every registered method (plus the ase:MODULE.CLASS form)."""
    out = {name: m.description for name, m in METHODS.items()}
    out["ase:MODULE.CLASS"] = "any ASE calculator class, built with no arguments plus --option values"
    return out


def get_method(spec: str | ReferenceMethod, options: Mapping[str, Any] | None = None) -> ReferenceMethod:
    """Resolve a method name (or ase:MODULE.CLASS) to a ReferenceMethod; InputError if unknown or not importable."""
    if isinstance(spec, ReferenceMethod):
        return spec.with_options(options)
    key = spec.strip()
    if key.lower() in METHODS:
        return METHODS[key.lower()].with_options(options)
    if key.startswith("ase:"):
        path = key[4:]
        module, _, name = path.rpartition(".")
        if not module or not name:
            raise InputError(f"--method {spec}: write ase:MODULE.CLASS, e.g. ase:ase.calculators.emt.EMT")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise InputError(f"--method {spec}: cannot import {name} from {module} ({type(exc).__name__}: {exc})") from exc
        if not callable(cls):
            raise InputError(f"--method {spec}: {path} is not a calculator class")
        return ReferenceMethod(key, f"ASE calculator {path}", functools.partial(_ase_class, module, name),
                               options=dict(options or {}), package=module.split(".")[0], strict_options=False)
    known = ", ".join(available_methods())
    raise InputError(f"unknown reference method {spec!r}; choose one of: {known}")


# --------------------------------------------------------------------------------------------
# one structure


def compute_labels(atoms: Atoms, calc: Calculator) -> dict[str, Any]:
    """Energy (eV), forces (N, 3) eV/Å and, for fully periodic cells, stress (6,) eV/Å³ from `calc`."""
    a = atoms.copy()
    a.calc = calc
    results: dict[str, Any] = {"energy": float(a.get_potential_energy()),
                               "forces": np.array(a.get_forces(apply_constraint=False), dtype=float)}
    if a.pbc.all() and "stress" in getattr(calc, "implemented_properties", ()):
        results["stress"] = np.array(a.get_stress(voigt=True, apply_constraint=False), dtype=float)
    if not np.isfinite(results["energy"]) or not np.isfinite(results["forces"]).all() or (
            "stress" in results and not np.isfinite(results["stress"]).all()):
        raise CalculationFailed("the calculator returned NaN or infinite energy, forces or stress")
    return results


def attach_labels(atoms: Atoms, results: Mapping[str, Any], method: str) -> Atoms:
    """A copy of `atoms` carrying `results` as a SinglePointCalculator and info['label_method']."""
    out = atoms.copy()
    for key in STALE_KEYS:
        out.info.pop(key, None)
        out.arrays.pop(key, None)
    out.calc = SinglePointCalculator(out, **{k: v for k, v in results.items() if k in LABEL_KEYS})
    out.info["label_method"] = method
    return out


def results_of(atoms: Atoms) -> dict[str, Any]:
    """The label results (energy, forces, stress) a structure carries in its calculator."""
    res = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    return {k: res[k] for k in LABEL_KEYS if k in res}


def structure_hash(atoms: Atoms, *extra: Any) -> str:
    """A fingerprint string of numbers, positions, cell and pbc (plus `extra` values), to match resumed frames."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(atoms.numbers, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(atoms.positions, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(atoms.cell.array, dtype=np.float64).tobytes())
    h.update(np.asarray(atoms.pbc, dtype=bool).tobytes())
    for value in extra:
        h.update(repr(value).encode())
    return "h" + h.hexdigest()[:24]  # the letter keeps extxyz from reading it as a number


# --------------------------------------------------------------------------------------------
# files: compressed atomic output, append-only partial files, failure logs

def partial_path(output: str | Path) -> Path:
    """Where unfinished work for `output` is kept: OUTPUT.partial."""
    return Path(str(output) + ".partial")


def failures_path(output: str | Path) -> Path:
    """The failure log beside `output`: OUTPUT.failures.jsonl (one JSON object per failed frame)."""
    return Path(str(output) + ".failures.jsonl")


class PartialFrames:
    """An append-only extended XYZ file: each frame is written whole and flushed, so a killed run keeps every finished frame."""

    def __init__(self, path: str | Path, fsync_interval: float = 1.0) -> None:
        self.path = Path(path)
        self.fsync_interval = fsync_interval
        self._fh: io.TextIOBase | None = None
        self._last_sync = 0.0

    def load(self, log: Callable[[str], None] | None = None) -> list[Atoms]:
        """Every complete frame in the file; an incomplete last frame (killed while writing) is cut off."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        good = _complete_prefix(data)
        if good < len(data):
            if log:
                log(f"{self.path}: dropped an incomplete last frame ({len(data) - good} bytes, interrupted while "
                    "writing); that structure is done again")
            with open(self.path, "r+b") as fh:
                fh.truncate(good)
        if good == 0:
            return []
        try:
            frames = read(io.StringIO(data[:good].decode("utf-8")), index=":", format="extxyz")
        except Exception as exc:
            raise InputError(f"{self.path}: cannot read the unfinished-work file ({type(exc).__name__}: {exc}); "
                             "delete it to start over") from exc
        return list(frames)

    def rewrite(self, frames: Sequence[Atoms]) -> None:
        """Replace the file's content by `frames` atomically (used to drop unusable frames on resume)."""
        self.close()
        if frames:
            write_structures(self.path, frames)
        elif self.path.exists():
            self.path.unlink()

    def append(self, atoms: Atoms) -> None:
        """Append one frame in a single write and flush it (fsync at most every fsync_interval seconds)."""
        buf = io.StringIO()
        write(buf, atoms, format="extxyz")
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(buf.getvalue())
        self._fh.flush()
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_interval:
            os.fsync(self._fh.fileno())
            self._last_sync = now

    def close(self) -> None:
        """Flush, sync and close the file."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        """Close and delete the file (after the final output is in place)."""
        self.close()
        if self.path.exists():
            self.path.unlink()


def _complete_prefix(data: bytes) -> int:
    """Length in bytes of the run of complete extended XYZ frames at the start of `data`."""
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    starts = np.concatenate([[0], newlines + 1])  # start offset of every line
    line, good = 0, 0
    while line < len(newlines):
        try:
            natoms = int(data[starts[line]:newlines[line]])
        except ValueError:
            break
        last = line + natoms + 1  # the comment line, then natoms atom lines
        if last >= len(newlines):
            break
        good = int(newlines[last]) + 1
        line = last + 1
    return good


@dataclass
class LabelFailure:
    """A structure whose reference calculation failed."""

    source: str
    index: int  # index within its file
    position: int  # position in the whole input (all files)
    method: str
    error: str

    @property
    def where(self) -> str:
        """Human-readable location: file and structure index."""
        return f"{self.source} structure {self.index}"


def write_failures(path: str | Path, failures: Sequence[Any]) -> Path | None:
    """Write failure records as JSON lines atomically; with none, remove a stale log and return None."""
    path = Path(path)
    if not failures:
        if path.exists():
            path.unlink()
        return None
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for f in failures:
            fh.write(json.dumps(dataclasses.asdict(f)) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# worker processes


@contextlib.contextmanager
def single_thread_env() -> Iterator[None]:
    """Set SINGLE_THREAD_ENV while worker processes are started (they inherit it), then restore."""
    saved = {k: os.environ.get(k) for k in SINGLE_THREAD_ENV}
    os.environ.update(SINGLE_THREAD_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def openmp_threads(n: int = 1) -> Iterator[None]:
    """Limit this thread's OpenMP (libgomp) threads to n unless OMP_NUM_THREADS is set, then restore.

    Used when labelling in this process: tblite with two OpenMP threads on a busy machine was 5-10x
    slower than with one. Does nothing where libgomp cannot be loaded.
    """
    lib = None
    if "OMP_NUM_THREADS" not in os.environ:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("gomp") or "libgomp.so.1")
            saved = int(lib.omp_get_max_threads())
            lib.omp_set_num_threads(n)
        except (OSError, AttributeError):
            lib = None
    try:
        yield
    finally:
        if lib is not None:
            lib.omp_set_num_threads(saved)


def worker_pool(workers: int, initializer: Callable[..., None] | None = None,
                initargs: tuple = ()) -> cf.ProcessPoolExecutor:
    """A pool of `workers` fresh ('spawn') processes; call it inside single_thread_env()."""
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=initializer, initargs=initargs)


_WORKER_METHOD: ReferenceMethod | None = None


def _init_label_worker(method: ReferenceMethod) -> None:
    global _WORKER_METHOD
    _WORKER_METHOD = method


def label_one(method: ReferenceMethod, atoms: Atoms) -> tuple[dict[str, Any] | None, str | None, float]:
    """Label one structure with a fresh calculator: (results, None, seconds) or (None, error text, seconds)."""
    t0 = time.perf_counter()
    try:
        results = compute_labels(atoms, method.make_calculator())
        return results, None, time.perf_counter() - t0
    except Exception as exc:  # any calculator failure is recorded for this frame, never fatal for the run
        text = str(exc).strip().splitlines()
        return None, f"{type(exc).__name__}: {text[0] if text else ''}"[:500], time.perf_counter() - t0


def _label_task(position: int, atoms: Atoms) -> tuple[int, dict[str, Any] | None, str | None, float]:
    assert _WORKER_METHOD is not None
    return (position, *label_one(_WORKER_METHOD, atoms))


def _run_label_tasks(method: ReferenceMethod, records: Sequence[Record], todo: Sequence[int],
                     workers: int) -> Iterator[tuple[int, dict[str, Any] | None, str | None, float]]:
    """Yield (position, results, error, seconds) as frames finish, in this process (workers <= 1) or in a pool."""
    workers = min(workers, len(todo))
    if workers <= 1:
        with openmp_threads(1):
            for pos in todo:
                yield (pos, *label_one(method, records[pos].atoms))
        return
    queue = list(todo)[::-1]
    window = 4 * workers
    with single_thread_env(), worker_pool(workers, _init_label_worker, (method,)) as pool:
        pending: set[cf.Future] = set()
        try:
            while queue or pending:
                while queue and len(pending) < window:
                    pos = queue.pop()
                    pending.add(pool.submit(_label_task, pos, records[pos].atoms))
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        except cf.process.BrokenProcessPool as exc:
            raise LabellingError(f"a labelling worker process died ({exc}); finished frames are kept: "
                                 "rerun the same command to resume, or use --workers 1 to see the crash") from exc
        finally:
            for fut in pending:
                fut.cancel()


# --------------------------------------------------------------------------------------------
# labelling many structures


@dataclass
class LabelReport:
    """What a labelling run did."""

    output: Path
    n_input: int
    n_labelled: int  # frames in the output (resumed ones included)
    n_resumed: int  # frames taken from OUTPUT.partial of an earlier run
    failures: list[LabelFailure]
    complete: bool  # False when stopped by `limit`: the partial file is kept for a later run
    seconds: float  # wall time of this call
    calc_seconds: float  # summed calculator time of the frames done in this call
    failures_log: Path | None = None

    @property
    def n_new(self) -> int:
        """Frames labelled in this call."""
        return self.n_labelled - self.n_resumed


def as_records(structures: Sequence[Record] | Sequence[Atoms], source: str = "<input>") -> list[Record]:
    """Records for a list of Records or of Atoms (the latter named `source`, indexed from 0)."""
    return [s if isinstance(s, Record) else Record(s, source, k) for k, s in enumerate(structures)]


def label_structures(
    structures: Sequence[Record] | Sequence[Atoms],
    method: str | ReferenceMethod,
    output: str | Path,
    *,
    workers: int = 1,
    options: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    on_failure: Callable[[LabelFailure], None] | None = None,
    log: Callable[[str], None] | None = None,
    limit: int | None = None,
    min_distance: float = DEFAULT_MIN_DISTANCE,
) -> LabelReport:
    """Label structures with energy (eV), forces (eV/Å), stress (eV/Å³) and write `output` in input order, resumably.

    workers <= 1 runs in this process (one OpenMP thread unless OMP_NUM_THREADS is set); workers >= 2 starts
    that many fresh processes with one thread each (a few seconds to start; the caller needs a __main__ guard).
    progress(n) is called as n more structures are finished (resumed ones first); on_failure for each failed
    frame; log with one-line notes. limit stops after that many new frames (the partial file stays).
    """
    t_start = time.perf_counter()
    records = as_records(structures)
    ref = get_method(method, options)
    output = Path(output)
    if not records:
        raise InputError("no structures to label")
    for rec in records:
        check_structure(rec.atoms, rec.where, None, min_distance)
        ref.check(rec.atoms, rec.where)
    ref.make_calculator()  # fail now, not once per frame, if the package or an option is wrong
    hashes = [structure_hash(r.atoms, sorted(ref.options.items())) for r in records]  # options count too

    partial = PartialFrames(partial_path(output))
    done: dict[int, dict[str, Any]] = {}
    for k, frame in enumerate(partial.load(log)):
        pos = frame.info.get("label_position")
        if frame.info.get("label_method") != ref.name:
            raise InputError(f"{partial.path}: frame {k} was labelled with {frame.info.get('label_method')!r}, not "
                             f"{ref.name!r}; rerun with that method or delete {partial.path} to start over")
        if not isinstance(pos, (int, np.integer)) or not 0 <= pos < len(records) or frame.info.get("label_hash") != hashes[pos]:
            raise InputError(f"{partial.path}: frame {k} does not match structure {pos} of the input (the input or the "
                             f"method options changed since the interrupted run); use the same input and options or "
                             f"delete {partial.path} to start over")
        done.setdefault(int(pos), results_of(frame))
    n_resumed = len(done)
    if n_resumed:
        if log:
            log(f"resuming: {n_resumed} of {len(records)} structures already labelled in {partial.path}")
        if progress:
            progress(n_resumed)

    todo = [p for p in range(len(records)) if p not in done]
    if limit is not None:
        todo = todo[: max(0, limit)]
    failures: list[LabelFailure] = []
    calc_seconds = 0.0
    try:
        for pos, results, error, seconds in _run_label_tasks(ref, records, todo, workers):
            calc_seconds += seconds
            rec = records[pos]
            if results is None:
                failure = LabelFailure(rec.source, rec.index, pos, ref.name, error or "unknown error")
                failures.append(failure)
                if on_failure:
                    on_failure(failure)
            else:
                slim = Atoms(rec.atoms.numbers, rec.atoms.positions, cell=rec.atoms.cell, pbc=rec.atoms.pbc)
                frame = attach_labels(slim, results, ref.name)
                frame.info.update(label_position=pos, label_hash=hashes[pos])
                partial.append(frame)
                done[pos] = results
            if progress:
                progress(1)
    finally:
        partial.close()
        failures.sort(key=lambda f: f.position)
        flog = write_failures(failures_path(output), failures) if failures else None

    complete = len(done) + len(failures) == len(records)
    if complete:
        if not done:
            partial.remove()
            raise LabellingError(f"no structure could be labelled with {ref.name}; see {flog} for the errors")
        frames = [attach_labels(records[p].atoms, done[p], ref.name) for p in sorted(done)]
        write_structures(output, frames)
        partial.remove()
        if not failures:
            write_failures(failures_path(output), [])  # remove a stale log of an earlier run
    return LabelReport(output, len(records), len(done), n_resumed, failures, complete,
                       time.perf_counter() - t_start, calc_seconds, flog)
