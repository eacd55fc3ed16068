"""Train the shipped models of the new reference sets on one GPU inside a fixed wall-clock budget.

One lease of a GPU machine is short (minutes), so everything that trains runs at once, one process each
(small graph networks leave a GPU mostly idle; several processes keep it busy):

  materials_gpu       configs/train_materials.toml, as many epochs (<= --max-epochs) as the budget allows:
                      a probe epoch on the validation frames, run under the members' load, sets the count
                      before the real run starts (its cosine schedule needs the count up front)
  materials_member1-5 the same config at 64 wide and 2 layers, seeds 1-5, 20 epochs (ensemble baseline)
  molecular_broad_member4-5  configs/train_molecular_broad.toml's members 4 and 5 (1-3 are committed)

Every run saves a resumable state after each epoch; a run still going at the deadline is killed and
resumes later with the same `atomuq train` command (scripts/train_new_models.sh lists them). Writes
--summary (JSON: epochs per run, seconds, the probe's numbers, what was killed).

    PYTHONPATH=src python scripts/gpu_train.py --budget-s 420 --device cuda --summary gpu_train.json
    PYTHONPATH=src python scripts/gpu_train.py --budget-s 120 --device cpu --dry-run   # the logic, tiny
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMBER = ["--set", "model.latent=64", "--set", "model.hidden=64", "--set", "model.confidence_hidden=64",
          "--set", "model.num_layers=2"]


@dataclass
class Run:
    """One `atomuq train` process: its name, arguments and outcome."""

    name: str
    args: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    start: float = 0.0
    seconds: float = 0.0
    status: str = "not started"
    epochs_done: int = 0
    extra: dict = field(default_factory=dict)


def train_cmd(config: str, device: str, *extra: str) -> list[str]:
    """The CLI command of one training run."""
    return [sys.executable, "-m", "atomuq.cli.main", "train", str(ROOT / config), "--device", device, *extra]


def launch(run: Run, env: dict[str, str]) -> None:
    """Start one run in the background, its output to its log."""
    run.log.parent.mkdir(parents=True, exist_ok=True)
    run.start = time.perf_counter()
    with run.log.open("w") as f:
        f.write(" ".join(run.args) + "\n")
        f.flush()
        run.proc = subprocess.Popen(run.args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    run.status = "running"


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run folder's metrics.csv, one per completed epoch (none before the first)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def finished_run(run_dir: Path) -> bool:
    """True when a run folder's metrics.csv lists every epoch its config_resolved.json plans (its best.pt is final)."""
    try:
        planned = int(json.loads((run_dir / "config_resolved.json").read_text())["epochs"])
    except (OSError, ValueError, KeyError):
        return False
    return (run_dir / "best.pt").exists() and len(metrics_rows(run_dir)) >= planned


def finished_members(specs: list[str] | tuple[str, ...], root: Path) -> list[str]:
    """The model specs of an ensemble that can be used now: catalog names as given, and each checkpoint RUN/best.pt
    (relative to root) only when its run finished training (finished_run), as an absolute path."""
    return [spec if not spec.endswith(".pt") else str(root / spec) for spec in specs
            if not spec.endswith(".pt") or finished_run((root / spec).parent)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, required=True, help="wall seconds from start to the last kill")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-epochs", type=int, default=40, help="the materials model's most epochs")
    ap.add_argument("--min-epochs", type=int, default=4)
    ap.add_argument("--member-epochs", type=int, default=20)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--logs", type=Path, default=ROOT / "logs")
    ap.add_argument("--summary", type=Path, default=ROOT / "gpu_train.json")
    ap.add_argument("--main-name", default="materials_gpu",
                    help="run folder (under --runs) of the materials model; runs/materials holds the 8-epoch CPU run")
    ap.add_argument("--no-members", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny: 1-epoch members on the validation files")
    args = ap.parse_args()
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    mat_val = str(ROOT / "out/materials/val.extxyz.gz")
    tiny = ["--set", f'data.train=["{mat_val}"]'] if args.dry_run else []
    member_epochs = 1 if args.dry_run else args.member_epochs

    members: list[Run] = []
    if not args.no_members:
        for seed in (1, 2, 3, 4, 5):
            name = f"materials_member{seed}"
            members.append(Run(name, train_cmd("configs/train_materials.toml", args.device, "--seed", str(seed),
                                               "--epochs", str(member_epochs), "--run-dir", str(args.runs / name),
                                               "--set", f"error_log.last_epochs={member_epochs}", *MEMBER, *tiny),
                               args.logs / f"gpu_{name}.log"))
        if not args.dry_run:
            for seed in (4, 5):  # members 1-3 are committed
                name = f"molecular_broad_member{seed}"
                members.append(Run(name, train_cmd("configs/train_molecular_broad.toml", args.device, "--seed", str(seed),
                                                   "--epochs", str(member_epochs), "--run-dir", str(args.runs / name),
                                                   *MEMBER), args.logs / f"gpu_{name}.log"))
    for run in members:
        launch(run, env)

    # probe: one epoch of the main recipe on the validation frames (train = validation), under the members' load
    probe_dir = Path("/tmp/atomuq_gpu_probe")
    shutil.rmtree(probe_dir, ignore_errors=True)
    probe = Run("probe", train_cmd("configs/train_materials.toml", args.device, "--epochs", "1", "--run-dir",
                                   str(probe_dir), "--set", f'data.train=["{mat_val}"]'), args.logs / "gpu_probe.log")
    launch(probe, env)
    try:
        probe.proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        probe.proc.kill()
        probe.proc.wait()
    probe.seconds = time.perf_counter() - probe.start
    if probe.proc.returncode != 0:
        print(f"probe failed (exit {probe.proc.returncode}); see {probe.log}", flush=True)
        print(probe.log.read_text()[-3000:], flush=True)
        epochs = 0
    else:
        first = float(metrics_rows(probe_dir)[0]["wall_time_s"])  # epoch 1 as the run measured it
        setup = probe.seconds - first
        # one epoch = steps over the training frames + evaluation of training and validation frames; the probe
        # stepped and evaluated 630 frames and evaluated them again as validation: 5.5x for 4,194 + 630
        est_epoch = first * 5.5
        est_setup = setup * 2.0
        left = deadline - time.perf_counter() - est_setup - 10.0
        epochs = max(args.min_epochs, min(args.max_epochs, math.floor(left / (1.1 * est_epoch))))
        if args.dry_run:
            epochs = 1
        probe.extra = {"probe_epoch_s": first, "probe_setup_s": setup, "estimated_epoch_s": est_epoch,
                       "estimated_setup_s": est_setup, "seconds_left": left}
        print(f"probe: epoch {first:.1f} s on 630 frames, setup {setup:.1f} s -> {epochs} epochs "
              f"(estimated {est_epoch:.1f} s each, {left:.0f} s left)", flush=True)
    runs = list(members)
    if epochs:
        last = max(1, epochs // 2)
        main_run = Run(args.main_name, train_cmd("configs/train_materials.toml", args.device, "--epochs", str(epochs),
                                              "--run-dir", str(args.runs / args.main_name),
                                              "--set", f"error_log.last_epochs={last}", *tiny),
                       args.logs / "gpu_materials.log", extra={"epochs": epochs, "last_epochs": last})
        launch(main_run, env)
        runs.insert(0, main_run)

    while time.perf_counter() < deadline:
        for r in runs:
            if not r.seconds and r.proc.poll() is not None:
                r.seconds = time.perf_counter() - r.start
        if all(r.seconds for r in runs):
            break
        time.sleep(2.0)
    for r in runs:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()
            r.status = "killed at the deadline (resumable)"
        else:
            r.status = "finished" if r.proc.returncode == 0 else f"failed (exit {r.proc.returncode})"
        r.seconds = r.seconds or time.perf_counter() - r.start
        r.epochs_done = len(metrics_rows(args.runs / r.name))
        print(f"{r.name:28s} {r.status:36s} {r.epochs_done:3d} epochs {r.seconds:7.1f} s", flush=True)
        if not r.status.startswith(("finished", "killed")):
            print(r.log.read_text()[-2000:], flush=True)
    summary = {"device": args.device, "budget_s": args.budget_s, "total_s": time.perf_counter() - t0,
               "probe": {"seconds": probe.seconds, **probe.extra},
               "runs": [{"name": r.name, "status": r.status, "epochs_done": r.epochs_done, "seconds": r.seconds,
                         "command": " ".join(r.args[2:]), **r.extra} for r in runs]}
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    # what to bring back: each run's folder without last.pt (best.pt and the state hold the weights), and without
    # train_state.pt once the run finished
    keep = [os.path.relpath(p, ROOT) for r in runs for p in sorted((args.runs / r.name).rglob("*"))
            if p.is_file() and p.name != "last.pt" and not (p.name == "train_state.pt" and r.status == "finished")]
    args.summary.with_suffix(".files").write_text("\n".join(keep) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
