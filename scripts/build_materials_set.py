"""Build the materials reference set (GFN1-xTB, Γ point) as a resumable job queue driven by `atomuq label`.

Continue (or start) the build, two worker processes, low priority:
    nohup setsid nice -n 19 /work/main/.venv/bin/python scripts/build_materials_set.py --workers 2 \
        >> data/materials/build.log 2>&1 &
See the plan, or what is done, without running anything:
    python scripts/build_materials_set.py --plan        (or --status)
Smoke test (two small systems, a few frames, into out/materials_quick):
    python scripts/build_materials_set.py --quick --workers 2

What it does, from one seed (default 0):
1. Structures (scripts/crystals.py): the Force Delta paper's solids from published crystallographic data
   (ice XI, Mg17Al12, an ordered LGPS approximant, MOF-5), a liquid water box, a Cu(111) slab with CO, and ten
   elemental and binary prototypes; each labelled as a supercell of at least about 32 atoms (Γ point only).
2. One `relax` job per system (tier 0): this script, run as a subprocess with `--relax-one`, relaxes the supercell
   with tblite's ASE calculator (GFN1-xTB, the same options as the labels): BFGS on positions and cell
   (ase.filters.FrechetCellFilter) for crystals, positions only for the water box and the slab. The relaxed
   lattice goes into the state file next to the cited one, with the relative difference of a, b, c and pass/fail
   against crystals.LATTICE_TOLERANCE (5 %). The relaxed cell is the base of the system's frames unless the
   relaxation ran away (DIVERGED_*; then the cited cell is); half of the strained cells are made around the cited
   cell either way.
3. Label jobs (`atomuq label --method gfn1-xtb`, energy, forces and stress), each a chunk of at most CHUNK frames
   of one system, family and split: thermal frames at 300-1200 K (Gaussian rattles sigma = sqrt(kB T / K_SPRING)
   with a small random cell strain), strained cells (2-5 %, isotropic or a random symmetric tensor, plus a 300 K
   rattle), vacancies (a neutral unit removed: an atom, a Schottky formula unit, an H2O molecule, Li2S) and, where
   ASE's EMT covers every element (Al, Cu), frames of short EMT Langevin MD (EMT drives sampling only; no EMT
   energy is kept: one reference level).
4. Splits by job, never by frame: within each group (system, family, temperature) about 15 % of the frames are
   `test`, 10 % `val` (their own jobs and seeds), the rest `train`; EMT MD trajectories are split whole.
   The held-out system (HELDOUT, MgO) has every frame in split `heldout`.
5. Each job writes its own compressed shard OUT/shards/<system>/<job>.extxyz.gz once, atomically; OUT/state.json
   lists done jobs (frames, SCF failures, CPU seconds, relaxation results). A rerun skips done jobs; a killed job
   reruns from the `atomuq label` command's own resume file under OUT/work/ (not committed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_queue import (Running, acquire_lock, atomuq_command, check_exit, finished, launch, load_state, lower_priority,  # noqa: E402
                         export_splits, progress, read_failures, read_frames, say, sync_manifest, write_json,
                         write_shard)
from crystals import LATTICE_TOLERANCE, SYSTEMS, System  # noqa: E402

METHOD = "gfn1-xtb"
#: tblite options of every label command and relaxation (written out, though most are tblite's defaults)
TBLITE_OPTIONS = {"charge": 0, "multiplicity": 1, "accuracy": 1.0, "electronic_temperature": 300.0,
                  "max_iterations": 250}
HELDOUT = ("mgo",)
K_SPRING = 6.0  # eV/Å², Einstein spring of the thermal rattles: sigma = sqrt(kB T / K) = 0.066 Å at 300 K
K_SPRING_H = 24.0  # eV/Å², for hydrogen (O-H, C-H bonds are stiff): half the displacement
K_SPRING_LIGHT = 15.0  # eV/Å², for B C N O F (stiff covalent bonds: C-O, C-C, Si-O): 0.63 x the displacement
KB = 8.617333e-5  # eV/K
#: a relaxation is stopped as run away when the energy falls by more than this per atom, or the volume changes more
#: (Al relaxed without a guard: a real minimum at +13 % in a, -0.51 eV/atom, volume x1.46; SrTiO3 falls
#: -0.63, -1.33 eV/atom in its first two steps and on to -4.8 until the SCF fails)
DIVERGED_EV_PER_ATOM, DIVERGED_VOLUME = 1.0, 0.7
#: a relaxed lattice further than this from the cited one (Al: +17 %) is GFN1-xTB's error, not a structure to
#: sample around: the cited cell is the base then
BASE_LATTICE_LIMIT = 0.10
#: the neutral unit a vacancy removes (first symbol chosen at random, the rest nearest to it)
VACANCY_UNIT = {"si": ["Si"], "al": ["Al", "Al"], "cu": ["Cu", "Cu"], "mg": ["Mg"], "mgo": ["Mg", "O"],
                "nacl": ["Na", "Cl"], "lif": ["Li", "F"], "tio2_rutile": ["Ti", "O", "O"], "kmgf3": ["K", "F"],
                "quartz": ["Si", "O", "O"], "ice": ["O", "H", "H"], "mg17al12": ["Mg"], "lgps": ["S", "Li", "Li"]}
#: cost model (one core, fitted to the first jobs): seconds per single point ~ SP_SECONDS_64 x (atoms / 64)^SP_EXPONENT
#: plus one command start
SP_SECONDS_64, SP_EXPONENT, STARTUP_SECONDS = 2.5, 2.0, 4.0
RELAX_STEP_FACTOR = 0.7  # a relaxation step costs about 0.7 single points (the SCF restarts from the last one)


@dataclass(frozen=True)
class Plan:
    """Frames per family and system (held-out and large systems get fewer), chunk size, relaxation limits."""

    temperatures: tuple[float, ...] = (300.0, 450.0, 600.0, 750.0, 900.0, 1200.0)
    thermal: int = 80  # frames per temperature
    strain: int = 120
    vacancy: int = 80
    md_temperatures: tuple[float, ...] = (300.0, 600.0, 900.0, 1200.0)
    md_frames: int = 60  # EMT MD frames per temperature (Al, Cu)
    heldout_thermal: int = 25
    heldout_strain: int = 40
    heldout_vacancy: int = 25
    large_thermal: int = 50  # MOF-5, water box
    large_strain: int = 60
    water_temperatures: tuple[float, ...] = (300.0, 450.0, 600.0, 900.0)
    chunk: int = 16  # frames per label job
    relax_steps: int = 120
    relax_steps_large: int = 50
    relax_fmax: float = 0.05  # eV/Å
    relax_stress_GPa: float = 0.1  # and every stress component below this (the cell filter is scaled so)
    md_timestep: float = 2.0  # fs, EMT MD
    md_burn_in: int = 250
    md_interval: int = 25


FULL = Plan()
QUICK = Plan(temperatures=(300.0, 1200.0), md_temperatures=(300.0,), thermal=4, strain=4, vacancy=3, md_frames=3, chunk=4, relax_steps=3,
             relax_steps_large=2, md_burn_in=20, md_interval=5)
QUICK_SYSTEMS = ("si", "al")
LARGE = ("mof5", "water")


# ---------------------------------------------------------------------------------------------
# jobs


@dataclass
class Job:
    id: str
    kind: str  # relax | label
    system: str
    family: str  # relax | thermal | strain | vacancy | md
    temperature: float  # K (thermal, md; 300 for strain; vacancy frames draw 300 or 600)
    split: str  # train | val | test | heldout | relax
    seed: int
    frames: int  # frames planned
    output: str  # shard path relative to OUT
    depends_on: list[str]
    atoms: int
    est_core_seconds: float
    tier: int
    md_trajectory: int = -1  # md: which trajectory of the temperature (frames [start, start+frames) of it)
    md_start: int = 0
    command_args: list[str] = field(default_factory=list)


def single_point_seconds(n_atoms: int) -> float:
    """Estimated GFN1-xTB single-point seconds on one core for a cell of n_atoms."""
    return SP_SECONDS_64 * (n_atoms / 64.0) ** SP_EXPONENT


def job_seed(seed: int, key: str) -> int:
    """A seed from the build seed and a name (job id or trajectory), independent of the job's place in the queue."""
    return int(np.random.SeedSequence([seed, zlib.crc32(key.encode())]).generate_state(1)[0])


def split_sizes(n: int, heldout: bool) -> list[tuple[str, int]]:
    """(split, frames) of a group of n frames: about 15 % test, 10 % val, the rest train (all heldout if held out)."""
    if heldout:
        return [("heldout", n)]
    n_test, n_val = max(1, round(0.15 * n)), max(1, round(0.10 * n))
    return [("train", n - n_test - n_val), ("val", n_val), ("test", n_test)]


def label_args() -> list[str]:
    """Arguments after INPUT -o OUTPUT of every label command."""
    args = ["label"]
    opts = ["--method", METHOD, "--workers", "1"]
    for k, v in TBLITE_OPTIONS.items():
        opts += ["--option", f"{k}={json.dumps(v)}"]
    return args + opts


def plan_jobs(systems: list[System], plan: Plan, seed: int) -> list[Job]:
    """Every job of the set, in queue order (tier, then held-out first, then cheapest first)."""
    jobs: list[Job] = []
    for s in systems:
        n_atoms = len(s.supercell())
        sp = single_point_seconds(n_atoms)
        steps = plan.relax_steps_large if s.name in LARGE else plan.relax_steps
        relax_id = f"{s.name}.relax"
        jobs.append(Job(relax_id, "relax", s.name, "relax", 0.0, "relax", seed, 1, f"shards/relax/{s.name}.extxyz.gz",
                        [], n_atoms, round(steps * 0.5 * RELAX_STEP_FACTOR * sp + STARTUP_SECONDS, 1),
                        2 if s.name in LARGE else 0))  # the two expensive relaxations after the first labels
        heldout = s.role == "heldout" or s.name in HELDOUT
        temps = plan.water_temperatures if s.name == "water" else plan.temperatures
        if heldout:
            n_th, n_st, n_va = plan.heldout_thermal, plan.heldout_strain, plan.heldout_vacancy
        elif s.name in LARGE:
            n_th, n_st, n_va = plan.large_thermal, plan.large_strain, 0
        else:
            n_th, n_st, n_va = plan.thermal, plan.strain, plan.vacancy
        groups: list[tuple[str, float, int]] = [("thermal", t, n_th) for t in temps]
        groups.append(("strain", 300.0, n_st))
        if s.vacancies and n_va:
            groups.append(("vacancy", 300.0, n_va))
        for family, temp, n in groups:
            for split, n_split in split_sizes(n, heldout):
                for k, start in enumerate(range(0, n_split, plan.chunk)):
                    m = min(plan.chunk, n_split - start)
                    jid = f"{s.name}.{family}{int(temp) if family == 'thermal' else ''}.{split}.{k}"
                    if family == "thermal" and temp <= 300.0:
                        tier = 1 if (split != "train" or k == 0) else 2
                    elif family in ("thermal", "strain") and temp <= 600.0:
                        tier = 2
                    else:
                        tier = 3
                    jobs.append(Job(jid, "label", s.name, family, temp, split,
                                    job_seed(seed, jid), m,
                                    f"shards/{s.name}/{jid}.extxyz.gz", [relax_id], n_atoms,
                                    round(m * sp + STARTUP_SECONDS, 1), tier, command_args=label_args()))
        if s.emt_md and not heldout:
            for temp in plan.md_temperatures:
                n = plan.md_frames
                n_test = max(1, round(0.2 * n))
                for traj, (split, n_split) in enumerate([("train", n - n_test), ("test", n_test)]):
                    for k, start in enumerate(range(0, n_split, plan.chunk)):
                        m = min(plan.chunk, n_split - start)
                        jid = f"{s.name}.md{int(temp)}.{split}.{k}"
                        jobs.append(Job(jid, "label", s.name, "md", temp, split,
                                        job_seed(seed, f"{s.name}.md{int(temp)}.trajectory{traj}"),
                                        m, f"shards/{s.name}/{jid}.extxyz.gz", [relax_id], n_atoms,
                                        round(m * sp + STARTUP_SECONDS, 1), 3, md_trajectory=traj, md_start=start,
                                        command_args=label_args()))
    order = {j.id: i for i, j in enumerate(jobs)}
    jobs.sort(key=lambda j: (j.tier, j.kind != "relax", j.split != "heldout", j.atoms if j.kind == "relax" else 0,
                             j.est_core_seconds, order[j.id]))
    return jobs


# ---------------------------------------------------------------------------------------------
# frames


def random_strain(rng: np.random.Generator, magnitude: float, isotropic: bool) -> np.ndarray:
    """A symmetric strain tensor: isotropic ±magnitude, or random with largest component ±magnitude."""
    if isotropic:
        return np.eye(3) * magnitude * rng.choice([-1.0, 1.0])
    e = rng.normal(size=(3, 3))
    e = 0.5 * (e + e.T)
    return e * magnitude / np.abs(e).max()


def strained(atoms, eps: np.ndarray):
    """A copy of `atoms` with cell and positions deformed by (1 + eps)."""
    out = atoms.copy()
    out.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + eps), scale_atoms=True)
    return out


def rattled(atoms, rng: np.random.Generator, temperature: float):
    """A copy with Gaussian displacements of sigma = sqrt(kB T / K) Å per Cartesian component.

    K is K_SPRING, K_SPRING_H for H and K_SPRING_LIGHT for B-F."""
    out = atoms.copy()
    light = (out.numbers >= 5) & (out.numbers <= 9)
    spring = np.where(out.numbers == 1, K_SPRING_H, np.where(light, K_SPRING_LIGHT, K_SPRING))
    sigma = np.sqrt(KB * temperature / spring)
    out.positions += rng.normal(size=out.positions.shape) * sigma[:, None]
    out.info["rattle_sigma_A"] = round(float(np.sqrt(KB * temperature / K_SPRING)), 5)
    if (out.numbers == 1).any():
        out.info["rattle_sigma_H_A"] = round(float(np.sqrt(KB * temperature / K_SPRING_H)), 5)
    if light.any():
        out.info["rattle_sigma_BCNOF_A"] = round(float(np.sqrt(KB * temperature / K_SPRING_LIGHT)), 5)
    return out


def remove_vacancy(atoms, unit: list[str], rng: np.random.Generator):
    """A copy with one neutral unit removed: a random atom of unit[0], then the nearest atom of each further symbol."""
    symbols = np.array(atoms.get_chemical_symbols())
    first = int(rng.choice(np.flatnonzero(symbols == unit[0])))
    removed = [first]
    d = atoms.get_distances(first, range(len(atoms)), mic=True)
    for sym in unit[1:]:
        cand = [i for i in np.argsort(d) if symbols[i] == sym and i not in removed]
        removed.append(int(cand[0]))
    keep = np.ones(len(atoms), dtype=bool)
    keep[removed] = False
    out = atoms[keep]
    out.info["vacancy_removed"] = ",".join(symbols[removed])
    if int(out.numbers.sum()) % 2:
        raise ValueError(f"vacancy unit {unit} leaves an odd electron count")
    return out


def emt_trajectory(base, temperature: float, seed: int, n_frames: int, plan: Plan) -> list:
    """Frames of ASE EMT Langevin MD in the base cell (NVT): burn-in, then one every md_interval steps."""
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = base.copy()
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, plan.md_timestep * units.fs, temperature_K=temperature, friction=0.02, rng=rng, fixcm=False)
    dyn.run(plan.md_burn_in)
    frames = []
    for k in range(n_frames):
        dyn.run(plan.md_interval)
        f = atoms.copy()
        f.calc = None
        f.info.update(md_step=plan.md_burn_in + (k + 1) * plan.md_interval, md_seed=seed,
                      kinetic_temperature=round(float(atoms.get_temperature()), 1))
        frames.append(f)
    return frames


def make_frames(job: Job, base, plan: Plan, cited=None) -> list:
    """The job's structures (deterministic from its seed and the base cell), each tagged with its provenance.

    Strained cells: half around the base, half (k % 4 in 2, 3) around the `cited` cell when one is given and the
    base is the relaxed cell, so that both the GFN1-xTB minimum and the published lattice are covered."""
    rng = np.random.default_rng(job.seed)
    out = []
    if job.family == "md":
        n_traj = job.md_start + job.frames
        traj = emt_trajectory(base, job.temperature, job.seed, n_traj, plan)[job.md_start:]
        for f in traj:
            f.info.update(temperature=job.temperature)
            out.append(f)
    for k in range(job.frames if job.family != "md" else 0):
        if job.family == "thermal":
            scale = 0.005 if job.temperature <= 300 else 0.01
            eps = random_strain(rng, scale * rng.uniform(0, 1), isotropic=False)
            f = rattled(strained(base, eps), rng, job.temperature)
            f.info.update(temperature=job.temperature, strain_max=round(float(np.abs(eps).max()), 5))
        elif job.family == "strain":
            mag = rng.uniform(0.02, 0.05)
            iso = bool(k % 2 == 0)
            eps = random_strain(rng, mag, isotropic=iso)
            around = cited if (cited is not None and k % 4 >= 2 and base.info.get("base") == "relaxed") else base
            f = rattled(strained(around, eps), rng, 300.0)
            f.info["base"] = around.info.get("base", "cited")
            f.info.update(temperature=300.0, strain_kind="isotropic" if iso else "random", strain_max=round(mag, 5),
                          strain_voigt=" ".join(f"{x:.5f}" for x in eps[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]))
        elif job.family == "vacancy":
            temp = 300.0 if k % 2 == 0 else 600.0
            f = rattled(remove_vacancy(base, VACANCY_UNIT[job.system], rng), rng, temp)
            f.info.update(temperature=temp)
        else:
            raise ValueError(f"unknown family {job.family}")
        out.append(f)
    for k, f in enumerate(out):
        f.wrap()
        f.info.setdefault("base", base.info.get("base", "cited"))
        f.info.update(system=job.system, family=job.family, split=job.split, job=job.id, source=f"{job.id}:{k}")
    return out


def relaxed_is_base(relax: dict) -> bool:
    """Whether a relaxation result gives the base of the frames: it did not run away, lattice within the limit."""
    if not relax or relax.get("diverged"):
        return False
    return max((abs(x) for x in relax.get("rel_diff_abc", [0.0])), default=0.0) <= BASE_LATTICE_LIMIT


def base_structure(system: System, out: Path, state: dict):
    """The relaxed supercell unless its relaxation ran away or its lattice is off by more than BASE_LATTICE_LIMIT
    (then the cited one); info['base'] says which."""
    entry = state["done"].get(f"{system.name}.relax", {})
    cited = system.supercell()
    if relaxed_is_base(entry.get("relax", {})) and entry.get("output"):
        relaxed = read_frames(out / entry["output"])[0]
        relaxed.calc = None
        atoms = cited.copy()
        atoms.set_cell(relaxed.cell)
        atoms.positions = relaxed.positions
        atoms.info["base"] = "relaxed"
        return atoms
    cited.info["base"] = "cited"
    return cited


# ---------------------------------------------------------------------------------------------
# relaxation (this script as a subprocess: tblite's ASE calculator directly)


def conventional_cellpar(system: System, supercell_cell: np.ndarray) -> list[float]:
    """The conventional lattice (a, b, c, alpha, beta, gamma) deformed as the supercell was relaxed from the cited one."""
    from ase.geometry import cell_to_cellpar

    cited_super = np.asarray(system.supercell().cell)
    deform = np.linalg.solve(cited_super, np.asarray(supercell_cell))  # relaxed = cited @ deform (row vectors)
    conv = _conventional(system)
    return [round(float(x), 4) for x in cell_to_cellpar(conv @ deform)]


def _conventional(system: System) -> np.ndarray:
    """The cited conventional cell of a system (from its unit cell's spacegroup cellpar when it is primitive)."""
    from ase.geometry import cellpar_to_cell

    cell = system.unit_cell().cell
    lat = system.cited_lattice
    if len(lat) == 1:
        return np.eye(3) * lat[0]
    if len(lat) == 3 and abs(cell.cellpar()[5] - 120) < 1e-3:
        return cellpar_to_cell([lat[0], lat[1], lat[2], 90, 90, 120])
    return np.diag(lat)


class Diverged(RuntimeError):
    """A relaxation ran away (energy or volume far from the start): the cited structure stays the base."""


def relax_one(name: str, result_dir: Path, plan: Plan) -> None:
    """Relax a system's supercell with GFN1-xTB (tblite ASE); write result_dir/relaxed.extxyz and relax.json."""
    from ase.calculators.calculator import CalculationFailed
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.filters import FrechetCellFilter
    from ase.io import write
    from ase.optimize import BFGS
    from tblite.ase import TBLite

    warnings.filterwarnings("ignore", message="logm result may be inaccurate")  # scipy, inside FrechetCellFilter
    system = SYSTEMS[name]
    atoms = system.supercell()
    atoms.calc = TBLite(method="GFN1-xTB", verbosity=0, **TBLITE_OPTIONS)
    steps = plan.relax_steps_large if name in LARGE else plan.relax_steps
    if system.relax == "cell":
        # the filter's cell "forces" are virial / exp_cell_factor: this factor makes fmax mean a stress of
        # relax_stress_GPa (the default, the atom count, would stop at about 0.5 GPa for ice)
        cell_factor = max(1.0, plan.relax_stress_GPa / 160.21766 * atoms.get_volume() / plan.relax_fmax)
        target = FrechetCellFilter(atoms, exp_cell_factor=cell_factor)
    else:
        target = atoms
    path: list[list[float]] = []
    v_start = atoms.get_volume()

    def record() -> None:
        f = np.linalg.norm(atoms.get_forces(), axis=1).max()
        energy = float(atoms.get_potential_energy())
        path.append([round(energy, 4), round(atoms.get_volume() / v_start, 4),
                     round(float(f), 3), round(float(np.abs(atoms.get_stress()).max() * 160.21766), 3)])
        drop = (energy - path[0][0]) / len(atoms)
        if drop < -DIVERGED_EV_PER_ATOM or abs(path[-1][1] - 1) > DIVERGED_VOLUME:
            raise Diverged(f"energy {drop:+.2f} eV/atom, volume x{path[-1][1]:.3f} after {len(path) - 1} steps")

    t0 = time.process_time()
    opt = BFGS(target, logfile=str(result_dir / "relax.log"), trajectory=None)
    opt.attach(record, interval=1)
    diverged = ""
    try:
        converged = bool(opt.run(fmax=plan.relax_fmax, steps=steps))
    except Diverged as exc:
        converged, diverged = False, str(exc)
    except CalculationFailed as exc:  # the SCF failed on the way (e.g. atoms run together): report, start again
        converged, diverged = False, f"SCF failed after {len(path)} steps: {str(exc).splitlines()[0][:200]}"
        atoms.set_cell(system.supercell().cell)
        atoms.positions = system.supercell().positions
    energy = float(atoms.get_potential_energy())
    forces = atoms.get_forces()
    stress = atoms.get_stress()
    result = {"system": name, "mode": system.relax, "converged": converged, "steps": int(opt.nsteps),
              "max_steps": steps, "fmax_eV_A": plan.relax_fmax, "energy_eV": round(energy, 6),
              "max_force_eV_A": round(float(np.linalg.norm(forces, axis=1).max()), 4),
              "max_stress_GPa": round(float(np.abs(stress).max() * 160.21766), 3),
              "cpu_seconds": round(time.process_time() - t0, 1), "diverged": diverged,
              "path_energy_volume_fmax_stressGPa": path[:: max(1, len(path) // 20)] + path[-1:]}
    v0 = system.supercell().get_volume()
    result["volume_change"] = round(atoms.get_volume() / v0 - 1, 4)
    if system.relax == "cell" and system.cited_lattice:
        cited = [round(float(x), 4) for x in _cellpar_of(_conventional(system))]
        relaxed = conventional_cellpar(system, atoms.cell)
        diff = [round(r / c - 1, 4) for r, c in zip(relaxed[:3], cited[:3])]
        within = bool(max(abs(x) for x in diff) <= LATTICE_TOLERANCE)
        result.update(cited_abc=cited[:3], relaxed_abc=relaxed[:3], relaxed_angles=relaxed[3:], rel_diff_abc=diff,
                      tolerance=LATTICE_TOLERANCE, within_tolerance=within, lattice_ok=within and converged)
    frame = atoms.copy()
    frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces, stress=stress)
    frame.info.update(system=name, family="relax", split="relax", label_method=METHOD, relax_converged=converged)
    write(result_dir / "relaxed.extxyz", frame, format="extxyz")
    (result_dir / "relax.json").write_text(json.dumps(result))


def _cellpar_of(cell: np.ndarray) -> list[float]:
    from ase.geometry import cell_to_cellpar

    return list(cell_to_cellpar(cell))


# ---------------------------------------------------------------------------------------------
# running


def start_job(job: Job, plan: Plan, out: Path, state: dict, quick: bool) -> Running:
    """Write the job's input (deterministic, so the command's resume file stays valid) and start its command."""
    key = hashlib.sha256(json.dumps(asdict(job), sort_keys=True).encode()).hexdigest()[:10]
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{job.id}.log"
    if job.kind == "relax":
        rdir = work / f"{job.id}.{key}"
        rdir.mkdir(exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--relax-one", job.system, "--relax-out", str(rdir)]
        if quick:
            cmd.append("--quick")
        work_in, work_out, n_input = rdir, rdir / "relax.json", 1
    else:
        from ase.io import write

        cited = SYSTEMS[job.system].supercell()
        cited.info["base"] = "cited"
        structures = make_frames(job, base_structure(SYSTEMS[job.system], out, state), plan, cited)
        work_in = work / f"{job.id}.{key}.in.extxyz"
        work_out = work / f"{job.id}.{key}.extxyz"
        tmp = work_in.with_name(work_in.name + ".tmp.extxyz")
        write(tmp, structures, format="extxyz")
        os.replace(tmp, work_in)
        cmd = atomuq_command() + [job.command_args[0], str(work_in), "-o", str(work_out), *job.command_args[1:]]
        n_input = len(structures)
    if work_out.exists():  # finished earlier, killed before its shard was written: no need to run again
        cmd = ["true"]
    proc = launch(cmd, log)
    return Running(job, proc, work_in, work_out, log, time.perf_counter(), n_input)


def finish_job(r: Running, out: Path, cpu_seconds: float, returncode: int) -> dict:
    """Tag the command's output and write the shard; return the state entry (or raise RuntimeError)."""
    job = r.job
    check_exit(r, returncode)
    entry: dict = {}
    if job.kind == "relax":
        result = json.loads(r.work_out.read_text())
        frames = read_frames(r.work_in / "relaxed.extxyz")
        entry.update(relax=result, base="relaxed" if relaxed_is_base(result) else "cited")
        failures: list = []
    else:
        frames = read_frames(r.work_out)
        failures = read_failures(r.work_out)
    for f in frames:
        f.positions[:] = np.round(f.positions, 6)  # stored precision 1e-6 Å and 1e-5 eV/Å
        f.calc.results["forces"] = np.round(f.calc.results["forces"], 5)
        if job.kind == "label" and "stress" not in f.calc.results:
            raise RuntimeError(f"{job.id}: a frame has no stress (the label command writes stress for periodic cells)")
    sha = write_shard(out / job.output, frames) if frames else ""
    entry.update({"frames": len(frames) if job.kind == "label" else 0, "scf_failures": len(failures),
                  "failures": [str(x.get("error", x))[:200] for x in failures][:5], "structures_in": r.n_input,
                  "cpu_seconds": round(cpu_seconds, 2), "wall_seconds": round(time.perf_counter() - r.t0, 2),
                  "output": job.output if frames else None, "sha256": sha,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return entry


def clean_work(r: Running) -> None:
    """Remove a finished job's files under OUT/work (after its state entry is written)."""
    import shutil

    if r.job.kind == "relax":
        shutil.rmtree(r.work_in, ignore_errors=True)
    else:
        for p in (r.work_in, r.work_out, r.work_out.with_name(r.work_out.name + ".failures.jsonl")):
            p.unlink(missing_ok=True)
    r.log.unlink(missing_ok=True)


def run_queue(jobs: list[Job], plan: Plan, out: Path, workers: int, max_jobs: int | None, stop_at: float | None,
              quick: bool) -> None:
    """Run jobs whose dependencies are done, `workers` at a time, updating OUT/state.json after each."""
    state_path = out / "state.json"
    lock = acquire_lock(out)  # noqa: F841 (held until this process ends)
    state = load_state(state_path)
    state["failed"] = {}  # failed jobs are tried again on every run
    running: dict[str, Running] = {}
    started = 0
    n_total = len(jobs)
    while True:
        stopping = (max_jobs is not None and started >= max_jobs) or (stop_at is not None and time.time() > stop_at)
        if not stopping:
            for j in jobs:
                if len(running) >= workers:
                    break
                if j.id in state["done"] or j.id in running or j.id in state["failed"]:
                    continue
                if not all(d in state["done"] for d in j.depends_on):
                    continue
                try:
                    r = start_job(j, plan, out, state, quick)
                except Exception as exc:  # an input that cannot be made: record, go on
                    state["failed"][j.id] = {"error": f"input: {type(exc).__name__}: {exc}"[:300]}
                    write_json(state_path, state)
                    say(f"FAILED {j.id} (input): {exc}")
                    continue
                running[j.id] = r
                started += 1
                say(f"start {j.id} ({j.kind}, {r.n_input} structures of {j.atoms} atoms, est {j.est_core_seconds:.0f} core-s)")
        if not running:
            break
        time.sleep(1.0)
        for jid, r, cpu in finished(running):
            try:
                entry = finish_job(r, out, cpu, r.proc.returncode)
            except Exception as exc:
                state["failed"][jid] = {"error": str(exc)[:500]}
                say(f"FAILED {jid}: {exc}")
            else:
                state["done"][jid] = entry
                extra = ""
                if "relax" in entry:
                    rx = entry["relax"]
                    extra = (f" relax converged={rx['converged']} in {rx['steps']} steps, volume {rx['volume_change']:+.3f}"
                             + (f", DIVERGED: {rx['diverged']}" if rx.get("diverged") else "")
                             + (f", a/b/c {rx['rel_diff_abc']} within {rx['tolerance']}: {rx['within_tolerance']}"
                                if "rel_diff_abc" in rx else ""))
                say(f"done {jid}: {entry['frames']} frames ({entry['scf_failures']} SCF failures), {cpu:.0f} CPU s;{extra} "
                    f"{len(state['done'])}/{n_total} jobs, {sum(e['frames'] for e in state['done'].values())} frames")
            write_json(state_path, state)
            if jid in state["done"]:
                clean_work(r)
    left = [j.id for j in jobs if j.id not in state["done"]]
    say(f"stopped: {len(state['done'])}/{n_total} jobs done, {len(left)} left ({len(state['failed'])} failed)")


# ---------------------------------------------------------------------------------------------


def system_record(s: System) -> dict:
    """What the manifest says about a system: source, cell sizes, space group, role."""
    unit, sup = s.unit_cell(), s.supercell()
    return {"name": s.name, "group": s.group, "source": s.source, "formula": s.formula, "spacegroup": s.spacegroup,
            "unit_atoms": len(unit), "atoms": len(sup), "repeat": list(s.repeat), "relax": s.relax,
            "role": "heldout" if s.name in HELDOUT else s.role, "emt_md": s.emt_md,
            "cited_lattice": list(s.cited_lattice), "elements": sorted(set(sup.get_chemical_symbols())),
            "notes": s.notes}


def manifest_of(systems: list[System], jobs: list[Job], plan: Plan, seed: int, quick: bool) -> dict:
    """The manifest: settings, systems with their sources, every job."""
    versions = {p: version(p) for p in ("ase", "tblite", "spglib", "numpy")}
    splits: dict[str, int] = {}
    for j in jobs:
        if j.kind == "label":
            splits[j.split] = splits.get(j.split, 0) + j.frames
    return {
        "description": "materials reference set, GFN1-xTB (tblite, Γ point); built by scripts/build_materials_set.py",
        "seed": seed, "quick": quick, "method": METHOD, "tblite_options": TBLITE_OPTIONS, "kpoints": "Gamma only",
        "plan": asdict(plan), "heldout_systems": list(HELDOUT), "lattice_tolerance": LATTICE_TOLERANCE,
        "rattle": {"k_spring_eV_A2": K_SPRING, "k_spring_H_eV_A2": K_SPRING_H, "k_spring_BCNOF_eV_A2": K_SPRING_LIGHT,
                   "sigma_A": "sqrt(kB T / k_spring) per Cartesian component"},
        "vacancy_units": VACANCY_UNIT,
        "cost_model": {"single_point_seconds_64_atoms": SP_SECONDS_64, "exponent": SP_EXPONENT,
                       "startup_seconds": STARTUP_SECONDS, "relax_step_factor": RELAX_STEP_FACTOR},
        "versions": versions,
        "totals": {"systems": len(systems), "jobs": len(jobs), "frames_expected": sum(splits.values()),
                   "frames_by_split": splits, "est_core_hours": round(sum(j.est_core_seconds for j in jobs) / 3600, 2)},
        "systems": [system_record(s) for s in systems],
        "jobs": [asdict(j) for j in jobs],
    }


def status_report(manifest: dict, out: Path) -> str:
    """Jobs done / total, frames, CPU seconds per frame per system, lattice checks, projected remaining core-hours."""
    pr = progress(manifest, out)
    jobs, done, frames, cpu, est_left, ratio = pr.jobs, pr.done, pr.frames, pr.cpu, pr.est_left, pr.ratio
    lines = [pr.jobs_line(),
             f"frames labelled: {frames} of {manifest['totals']['frames_expected']} planned "
             f"({sum(v.get('scf_failures', 0) for v in done.values())} SCF failures)",
             f"CPU time so far: {cpu / 3600:.2f} core-hours; measured / estimated cost {ratio:.2f}",
             f"projected remaining: {est_left * ratio / 3600:.2f} core-hours ({est_left / 3600:.2f} estimated x {ratio:.2f})",
             "system: label jobs done/total, frames, CPU s per frame (command start-up included); relaxation"]
    for s in manifest["systems"]:
        name = s["name"]
        mine = [k for k, j in jobs.items() if j["system"] == name and j["kind"] == "label"]
        d = [k for k in mine if k in done]
        fr = sum(done[k]["frames"] for k in d)
        c = sum(done[k]["cpu_seconds"] for k in d)
        rx = done.get(f"{name}.relax", {}).get("relax")
        if rx is None:
            rtxt = "not yet"
        elif "rel_diff_abc" in rx:
            rtxt = (f"a/b/c relaxed {rx['relaxed_abc']} vs cited {rx['cited_abc']}: {[f'{100 * x:+.1f}%' for x in rx['rel_diff_abc']]}"
                    f" {'within' if rx['within_tolerance'] else 'OUTSIDE'} {100 * rx['tolerance']:.0f}%, "
                    f"converged={rx['converged']} ({rx['steps']} steps)" + (f", diverged: {rx['diverged']}" if rx.get("diverged") else ""))
        else:
            rtxt = f"positions relaxed, converged={rx['converged']} ({rx['steps']} steps)"
        if rx is not None:
            rtxt += f"; frames around the {'relaxed' if relaxed_is_base(rx) else 'cited'} cell"
        per = f"{c / fr:.1f}" if fr else "-"
        lines.append(f"  {name} ({s['atoms']} atoms, {s['role']}): {len(d)}/{len(mine)}, {fr}, {per}; {rtxt}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="commands run at once, one core each (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every perturbation and MD (default 0)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default data/materials)")
    ap.add_argument("--quick", action="store_true", help="two systems, a few frames, into out/materials_quick")
    ap.add_argument("--plan", action="store_true", help="write the manifest and print the plan; run nothing")
    ap.add_argument("--status", action="store_true", help="print jobs done, frames, cost so far and projected; run nothing")
    ap.add_argument("--export", type=Path, default=None, metavar="DIR",
                    help="write the done frames per split (and split_system) as DIR/*.extxyz.gz for training; run nothing")
    ap.add_argument("--max-jobs", type=int, default=None, help="start at most this many jobs, then stop")
    ap.add_argument("--hours", type=float, default=None, help="start no new job after this many hours")
    ap.add_argument("--relax-one", default=None, help=argparse.SUPPRESS)  # internal: the relax job's subprocess
    ap.add_argument("--relax-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    lower_priority()
    plan = QUICK if args.quick else FULL
    if args.relax_one:
        relax_one(args.relax_one, args.relax_out, plan)
        return
    out = args.out or (ROOT / ("out/materials_quick" if args.quick else "data/materials"))
    out.mkdir(parents=True, exist_ok=True)
    systems = [SYSTEMS[n] for n in (QUICK_SYSTEMS if args.quick else SYSTEMS)]
    jobs = plan_jobs(systems, plan, args.seed)
    manifest = json.loads(json.dumps(manifest_of(systems, jobs, plan, args.seed, args.quick)))  # as read back
    manifest_path = out / "manifest.json"
    sync_manifest(manifest_path, manifest, args.seed)
    if args.status:
        print(status_report(manifest, out))
        return
    if args.export:
        print("\n".join(export_splits(manifest, out, args.export, by="system")))
        return
    t = manifest["totals"]
    say(f"plan: {t['jobs']} jobs, {t['frames_expected']} frames expected {t['frames_by_split']}, "
        f"about {t['est_core_hours']} core-hours")
    if args.plan:
        return
    stop_at = time.time() + 3600 * args.hours if args.hours else None
    run_queue(jobs, plan, out, max(1, args.workers), args.max_jobs, stop_at, args.quick)


if __name__ == "__main__":
    main()
