"""The GPU path, end to end: `--device cuda` through score, md, train, LTAU, and Force Delta steps per second.

Run by scripts/gpu_check.sh (which installs what is missing first); by hand, from the repository root:

    PYTHONPATH=src python scripts/gpu_check.py [--cpu-dry-run] [--out DIR] [--work DIR]

Each check runs the atomuq CLI in a subprocess, as a user would (`python -m atomuq.cli.main ...`):
  score   the bundled demo set (30 molecules) on the device and on the cpu; U_Δ and energies compared
  md      a few hundred NVE steps of one demo molecule with the default (safe) monitors
  train   one epoch of configs/train_molecular.toml (1,053 training frames) from scratch
  ltau    `ltau fit` on that run's error log and `ltau score` of a held-out file, both on the device;
          atomuq's LTAU index is CPU faiss; where faiss with GPU support imports (in this Python, or
          from FAISS_GPU_PATH), an exact search of the same descriptors on the GPU is compared with it
  speed   for every bundled model, a periodic water box of about 1,000 atoms: direct-only steps and
          Force Delta steps (forces by autograd, u_i, U_Δ) per second, the neighbour list included
          (built on the cpu by vesin every step), and the neighbour list's own time
Writes to --out (default $OUT, else ./gpu_out): summary.json, summary.md and steps.log (every command
and its output); scratch files go to --work. --cpu-dry-run runs everything on the cpu at tiny sizes
to test this script where there is no GPU: its numbers are cpu numbers and the summary says so.
Without --cpu-dry-run and without CUDA it stops at the environment check and reports that: nothing
here is ever measured on one device and reported as another.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src/atomuq/data/structures/molecular_demo.extxyz"


@dataclass(frozen=True)
class Sizes:
    """What each check runs: the full GPU check, or the tiny cpu dry run."""

    device: str
    md_steps: int
    train_config: Path
    ltau_input: Path
    box_atoms: int
    speed_steps: int
    speed_warmup: int


FULL = Sizes("cuda", 400, ROOT / "configs/train_molecular.toml", ROOT / "data/molecular/heldout_300K.extxyz.gz",
             1000, 50, 5)
DRY = Sizes("cpu", 10, ROOT / "configs/train_quick.toml", DEMO, 96, 2, 1)


@dataclass
class Check:
    """One check's outcome: ok (None: not applicable here), wall seconds, numbers and notes."""

    name: str
    ok: bool | None = False
    seconds: float = 0.0
    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Runner:
    """Runs CLI commands with PYTHONPATH=src, appending each command and its output to steps.log."""

    def __init__(self, out: Path, work: Path) -> None:
        self.log_path = out / "steps.log"
        self.work = work
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                    "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}

    def log(self, text: str) -> None:
        with self.log_path.open("a") as f:
            f.write(text.rstrip("\n") + "\n")

    def atomuq(self, *args: str, timeout: float = 600) -> tuple[int, str, float]:
        """(exit code, output, seconds) of `python -m atomuq.cli.main ARGS`."""
        cmd = [sys.executable, "-m", "atomuq.cli.main", *map(str, args)]
        self.log(f"\n$ {shlex.join(cmd)}")
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, output = 124, f"{exc.stdout or ''}{exc.stderr or ''}\n(timed out after {timeout:g} s)"
        seconds = time.perf_counter() - start
        self.log(output)
        self.log(f"(exit {code}, {seconds:.1f} s)")
        return code, output, seconds


def last_lines(text: str, n: int = 3) -> str:
    """The last n non-empty lines of a command's output, for a failed check's note."""
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:])


def environment(device: str) -> Check:
    """torch, CUDA, the GPU, faiss; ok when the device asked for is usable."""
    import torch

    c = Check("environment")
    v = c.values
    v.update(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
             cuda_available=torch.cuda.is_available(), device=device)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        v.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                 capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        v["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        v["nvidia_smi"] = f"not available ({type(exc).__name__})"
    try:
        import faiss

        v["faiss"] = faiss.__version__
        v["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError as exc:
        v["faiss"] = f"missing ({exc})"
    try:
        v["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        v["commit"] = "unknown"
    c.ok = device.startswith("cpu") or torch.cuda.is_available()
    if not c.ok:
        c.notes.append(f"CUDA is not available to torch {torch.__version__} (a CPU build, or no GPU/driver): "
                       "no GPU check was run")
    return c


def read_info(path: Path, keys: tuple[str, ...]) -> list[dict[str, float]]:
    """Per-structure info values of an extxyz file."""
    from ase.io import read

    return [{k: float(a.info[k]) for k in keys if k in a.info} for a in read(path, ":")]


def check_score(run: Runner, s: Sizes) -> Check:
    """`atomuq score` on the device and on the cpu: same U_Δ and energies to float32 round-off."""
    c = Check("score")
    out_dev, out_cpu = run.work / f"score_{s.device}.extxyz", run.work / "score_cpu_reference.extxyz"
    code, text, c.seconds = run.atomuq("score", DEMO, "-o", out_dev, "--device", s.device)
    if code != 0:
        c.notes.append(f"exit {code}: {last_lines(text)}")
        return c
    keys = ("force_delta", "model_energy", "eps_nc")
    dev = read_info(out_dev, keys)
    c.values["structures"] = len(dev)
    if s.device != "cpu":
        code_cpu, text_cpu, _ = run.atomuq("score", DEMO, "-o", out_cpu, "--device", "cpu")
        if code_cpu != 0:
            c.notes.append(f"cpu reference failed, exit {code_cpu}: {last_lines(text_cpu)}")
            return c
        ref = read_info(out_cpu, keys)
        for k in keys:
            rel = [abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for a, b in zip(dev, ref) if k in a and k in b]
            if rel:
                c.values[f"max_rel_diff_{k}_vs_cpu"] = max(rel)
        worst = max((v for k, v in c.values.items() if k.startswith("max_rel_diff")), default=0.0)
        c.ok = len(ref) == len(dev) and worst < 1e-3
        if not c.ok:
            c.notes.append(f"device and cpu differ by up to {worst:.2e} (relative)")
    else:
        c.ok = len(dev) > 0 and all("force_delta" in d for d in dev)
    return c


def check_md(run: Runner, s: Sizes) -> Check:
    """`atomuq md` for s.md_steps NVE steps with direct forces and the default monitors."""
    c = Check("md")
    traj = run.work / f"md_{s.device}.extxyz"
    code, text, c.seconds = run.atomuq("md", DEMO, "-o", traj, "--steps", s.md_steps, "--temperature", 300,
                                       "--traj-every", max(1, s.md_steps // 10), "--device", s.device, "--overwrite")
    run_json = Path(f"{traj}.run.json")
    if run_json.is_file():
        record = json.loads(run_json.read_text())
        result = record.get("result", record)
        c.values.update({k: result[k] for k in ("status", "step", "frames", "rollbacks", "reason") if k in result})
    c.values["steps_asked"] = s.md_steps
    c.values["steps_per_s_incl_startup"] = s.md_steps / c.seconds if c.seconds else None
    c.ok = code == 0 and c.values.get("status") == "completed"
    if not c.ok:
        c.notes.append(f"exit {code}, status {c.values.get('status')}: {last_lines(text)}")
    return c


def check_train(run: Runner, s: Sizes) -> Check:
    """`atomuq train CONFIG --epochs 1` on the device, into a fresh run folder."""
    c = Check("train")
    run_dir = run.work / "train"
    code, text, c.seconds = run.atomuq("train", s.train_config, "--epochs", 1, "--device", s.device,
                                       "--run-dir", run_dir, timeout=900)
    c.values["config"] = str(s.train_config.relative_to(ROOT))
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        rows = metrics.read_text().strip().splitlines()
        header, last = rows[0].split(","), rows[-1].split(",")
        c.values.update({k: _number(v) for k, v in zip(header, last) if k in ("epoch", "val_forces_mae", "train_loss",
                                                                               "loss", "seconds", "time_s")})
    c.ok = code == 0 and (run_dir / "best.pt").is_file() and (run_dir / "error_log").is_dir()
    if not c.ok:
        c.notes.append(f"exit {code}: {last_lines(text)}")
    return c


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def training_files(config: Path) -> list[Path]:
    """The [data] train files of a training configuration, resolved against its folder."""
    import tomllib

    data = tomllib.loads(config.read_text())["data"]["train"]
    return [(config.parent / p).resolve() for p in data]


def check_ltau(run: Runner, s: Sizes) -> Check:
    """`atomuq ltau fit` on the one-epoch run's error log, then `ltau score`, both on the device."""
    c = Check("ltau")
    if importlib.util.find_spec("faiss") is None:
        c.ok = None
        c.notes.append("not run: faiss does not import here (pip install faiss-cpu, or carry its wheel)")
        return c
    run_dir = run.work / "train"
    if not (run_dir / "best.pt").is_file():
        c.notes.append("skipped: the train check left no model")
        return c
    estimator, scored = run.work / "ltau.npz", run.work / "ltau_scored.extxyz"
    train_args = [a for p in training_files(s.train_config) for a in ("--train", p)]
    code, text, t_fit = run.atomuq("ltau", "fit", "--logs", run_dir / "error_log", *train_args, "--model",
                                   run_dir / "best.pt", "-o", estimator, "--device", s.device)
    if code != 0:
        c.notes.append(f"fit: exit {code}: {last_lines(text)}")
        c.seconds = t_fit
        return c
    code, text, t_score = run.atomuq("ltau", "score", s.ltau_input, "-e", estimator, "--model", run_dir / "best.pt",
                                     "-o", scored, "--device", s.device)
    c.seconds = t_fit + t_score
    c.values.update(fit_s=t_fit, score_s=t_score, input=str(s.ltau_input.relative_to(ROOT)))
    if code != 0:
        c.notes.append(f"score: exit {code}: {last_lines(text)}")
        return c
    from ase.io import read

    frames = read(scored, ":")
    c.values["structures_scored"] = len(frames)
    c.ok = bool(frames) and all("ltau_uncertainty" in a.info for a in frames)
    c.notes.append("atomuq's LTAU index (atomuq.uq.ltau.index) searches with CPU faiss whatever --device is")
    return c


FAISS_GPU_SEARCH = r"""
import json, sys, time
import numpy as np
import faiss
base, queries, k = np.load(sys.argv[1]), np.load(sys.argv[2]), int(sys.argv[3])
out = {"faiss": faiss.__version__, "gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0}
cpu = faiss.IndexFlatL2(base.shape[1]); cpu.add(base)
t = time.perf_counter(); d_cpu, i_cpu = cpu.search(queries, k); out["cpu_search_s"] = time.perf_counter() - t
if out["gpus"] > 0:
    res = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(res, 0, cpu)
    gpu.search(queries[:10], k)
    t = time.perf_counter(); d_gpu, i_gpu = gpu.search(queries, k); out["gpu_search_s"] = time.perf_counter() - t
    out["same_neighbours"] = float((i_gpu == i_cpu).mean())
    out["max_rel_distance_diff"] = float(np.max(np.abs(d_gpu - d_cpu) / np.maximum(np.abs(d_cpu), 1e-12)))
print(json.dumps(out))
"""


def check_faiss_gpu(run: Runner, s: Sizes) -> Check:
    """Exact nearest-neighbour search of the run's descriptors with faiss on the GPU against CPU faiss, if faiss has GPUs."""
    import numpy as np
    from ase.io import read

    from atomuq.models.registry import resolve_model
    from atomuq.workflows.ltau import compute_descriptors

    c = Check("faiss_gpu")
    if importlib.util.find_spec("faiss") is None and not os.environ.get("FAISS_GPU_PATH"):
        c.ok = None
        c.notes.append("not run: no faiss here")
        return c
    model_file = run.work / "train" / "best.pt"
    if not model_file.is_file():
        c.notes.append("skipped: the train check left no model")
        return c
    start = time.perf_counter()
    model = resolve_model(str(model_file), device=s.device)
    base = compute_descriptors(model, [a for p in training_files(s.train_config) for a in read(p, ":")])
    queries = compute_descriptors(model, read(s.ltau_input, ":"))
    np.save(run.work / "base.npy", base)
    np.save(run.work / "queries.npy", queries)
    env = dict(run.env)
    if os.environ.get("FAISS_GPU_PATH"):
        env["PYTHONPATH"] = os.pathsep.join([os.environ["FAISS_GPU_PATH"], env["PYTHONPATH"]])
    cmd = [sys.executable, "-c", FAISS_GPU_SEARCH, str(run.work / "base.npy"), str(run.work / "queries.npy"), "1"]
    run.log(f"\n$ faiss search of {len(queries)} descriptors in {len(base)} (FAISS_GPU_PATH="
            f"{os.environ.get('FAISS_GPU_PATH', '')})")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    run.log(proc.stdout + proc.stderr)
    c.seconds = time.perf_counter() - start
    c.values.update(reference_atoms=len(base), query_atoms=len(queries))
    if proc.returncode != 0:
        c.notes.append(f"faiss search failed: {last_lines(proc.stderr)}")
        return c
    c.values.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    if c.values.get("gpus", 0) > 0:
        c.ok = c.values["same_neighbours"] > 0.999
    else:
        c.ok = None  # not a failure of atomuq: reported as not applicable
        c.notes.append("faiss has no GPU support here (faiss-cpu): LTAU used CPU faiss only")
    return c


def time_steps(name: str, atoms: Any, device: str, steps: int, warmup: int) -> dict[str, float]:
    """Steps per second of one bundled model on one structure: direct-only, Force Delta, and the neighbour list alone."""
    import torch

    from atomuq.core.batch import Batch
    from atomuq.core.neighbors import build_graph
    from atomuq.models.derivatives import evaluate
    from atomuq.models.registry import resolve_model
    from atomuq.uq.force_delta import force_delta

    model = resolve_model(name, device=device)
    batch = Batch.from_atoms([atoms], device=device, dtype=model.dtype)
    cuda = batch.device.type == "cuda"

    def direct() -> None:
        with torch.inference_mode():
            model(batch)

    def with_force_delta() -> None:
        force_delta(evaluate(model, batch, conservative=True).detach(), batch)

    def neighbours() -> None:
        build_graph(batch, model.cutoff, model.config.max_neighbors)

    def per_second(fn) -> float:
        for _ in range(warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - t)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    row = {"direct_steps_per_s": per_second(direct), "force_delta_steps_per_s": per_second(with_force_delta),
           "neighbour_list_per_s": per_second(neighbours)}
    row["force_delta_over_direct_time"] = row["direct_steps_per_s"] / row["force_delta_steps_per_s"]
    row["neighbour_list_share_of_force_delta_step"] = row["force_delta_steps_per_s"] / row["neighbour_list_per_s"]
    if cuda:
        row["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def check_speed(s: Sizes) -> Check:
    """Direct-only and Force Delta steps per second on a ~1,000-atom water box for every bundled model; on a GPU
    also the default model on the cpu in the same run (a few steps), for the speed-up."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_force_delta import water_box

    from atomuq.models.registry import DEFAULT_MODEL, bundled_models

    c = Check("speed")
    start = time.perf_counter()
    atoms = water_box(s.box_atoms)
    c.values.update(atoms=len(atoms), steps=s.speed_steps, warmup=s.speed_warmup, models={})
    for name in bundled_models():
        c.values["models"][name] = time_steps(name, atoms, s.device, s.speed_steps, s.speed_warmup)
    if s.device != "cpu" and DEFAULT_MODEL in c.values["models"]:
        cpu = time_steps(DEFAULT_MODEL, atoms, "cpu", steps=5, warmup=1)
        gpu = c.values["models"][DEFAULT_MODEL]
        c.values["cpu_baseline"] = {"model": DEFAULT_MODEL, "torch_threads": torch.get_num_threads(), "steps": 5, **cpu}
        c.values["force_delta_speedup_over_cpu"] = gpu["force_delta_steps_per_s"] / cpu["force_delta_steps_per_s"]
        c.values["direct_speedup_over_cpu"] = gpu["direct_steps_per_s"] / cpu["direct_steps_per_s"]
    c.seconds = time.perf_counter() - start
    c.ok = bool(c.values["models"]) and all(r["force_delta_steps_per_s"] > 0 for r in c.values["models"].values())
    return c


def markdown(checks: list[Check], s: Sizes, dry: bool, total_s: float, command: str) -> str:
    """summary.md: what ran, on what, with every number."""
    env = checks[0].values
    lines = ["# atomuq GPU check" + (" — CPU DRY RUN (no GPU numbers)" if dry else ""), "",
             f"Command: `{command}`", "",
             f"Device `{s.device}`; {env.get('gpu', 'no GPU')}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}); "
             f"Python {env.get('python')}; faiss {env.get('faiss')}; commit {env.get('commit')}; total {total_s:.0f} s.", ""]
    if dry:
        lines += ["This was `--cpu-dry-run`: every step on the cpu at tiny sizes, to test the script's logic. "
                  "None of these numbers is a GPU result.", ""]
    lines += ["| check | ok | seconds | numbers | notes |", "|---|---|---|---|---|"]
    for c in checks:
        values = {k: v for k, v in c.values.items() if k not in ("models", "cpu_baseline")}
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        lines.append(f"| {c.name} | {_status(c.ok)} | {c.seconds:.1f} | {shown} | {'; '.join(c.notes)} |")
    speed = next((c for c in checks if c.name == "speed" and c.values.get("models")), None)
    if speed:
        lines += ["", f"Steps per second on a {speed.values['atoms']}-atom periodic water box ({s.device}, "
                  f"{speed.values['steps']} timed steps after {speed.values['warmup']} warm-up; the neighbour list, "
                  "built on the cpu, included):", "",
                  "| model | direct steps/s | Force Delta steps/s | Force Delta / direct time | neighbour list share | peak GPU MiB |",
                  "|---|---|---|---|---|---|"]
        for name, r in speed.values["models"].items():
            lines.append(f"| {name} | {r['direct_steps_per_s']:.1f} | {r['force_delta_steps_per_s']:.1f} | "
                         f"{r['force_delta_over_direct_time']:.2f} | {r['neighbour_list_share_of_force_delta_step']:.0%} | "
                         f"{_fmt(r.get('peak_gpu_memory_mib', '-'))} |")
        base = speed.values.get("cpu_baseline")
        if base:
            lines.append(f"| {base['model']} on the cpu ({base['torch_threads']} threads, {base['steps']} steps) | "
                         f"{base['direct_steps_per_s']:.1f} | {base['force_delta_steps_per_s']:.1f} | "
                         f"{base['force_delta_over_direct_time']:.2f} | "
                         f"{base['neighbour_list_share_of_force_delta_step']:.0%} | - |")
    return "\n".join(lines) + "\n"


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else "ok" if ok else "FAILED"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="everything on the cpu at tiny sizes (tests the logic)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_out"))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a fresh one under /tmp, removed at the end)")
    parser.add_argument("--device", default=None, help="override the device (cuda:1; or cpu at full size, a cpu baseline)")
    parser.add_argument("--only", nargs="+", choices=["score", "md", "train", "ltau", "faiss", "speed"], default=None)
    args = parser.parse_args()
    sizes = DRY if args.cpu_dry_run else FULL
    if args.device:
        sizes = dataclasses.replace(sizes, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="atomuq_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    (args.out / "steps.log").write_text("")
    run = Runner(args.out, work)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    start = time.perf_counter()
    checks = [environment(sizes.device)]
    order = ["score", "md", "train", "ltau", "faiss", "speed"]
    wanted = set(args.only or order)
    if wanted & {"ltau", "faiss"}:
        wanted.add("train")  # they use the model and error log of the one-epoch run
    wanted = [name for name in order if name in wanted]
    steps = {"score": lambda: check_score(run, sizes), "md": lambda: check_md(run, sizes),
             "train": lambda: check_train(run, sizes), "ltau": lambda: check_ltau(run, sizes),
             "faiss": lambda: check_faiss_gpu(run, sizes), "speed": lambda: check_speed(sizes)}
    if checks[0].ok:
        for name in wanted:
            try:
                checks.append(steps[name]())
            except Exception as exc:  # one broken check must not hide the others' results
                import traceback

                run.log(traceback.format_exc())
                checks.append(Check(name, notes=[f"{type(exc).__name__}: {exc}"]))
            c = checks[-1]
            print(f"{c.name:12s} {_status(c.ok):6s} {c.seconds:7.1f} s  {'; '.join(c.notes)}", flush=True)
    total = time.perf_counter() - start
    summary = {"dry_run": args.cpu_dry_run, "device": sizes.device, "command": command, "total_s": total,
               "all_ok": all(c.ok is not False for c in checks), "checks": [c.__dict__ for c in checks]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (args.out / "summary.md").write_text(markdown(checks, sizes, args.cpu_dry_run, total, command))
    print((args.out / "summary.md").read_text())
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
