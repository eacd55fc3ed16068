"""The job-queue pieces shared by the reference-set builders (scripts/build_broad_molecular_set.py,
scripts/build_materials_set.py): shard and JSON files, the run lock, state.json, `atomuq` subprocesses.

File formats (kept byte-for-byte: running builds and later sessions continue from them): shards are gzip extxyz
(mtime 0, level 9) written once, atomically; manifest.json and state.json are JSON with one line per entry
(dumps_lines); OUT/work/run.lock is held with flock while a build runs.
"""

from __future__ import annotations

import ctypes
import fcntl
import gzip
import hashlib
import io
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]


def say(msg: str) -> None:
    """Log one line with the time (UTC)."""
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# files


def extxyz_bytes(frames: list) -> bytes:
    """Frames as gzip-compressed extxyz (mtime 0, so the bytes depend on the frames only)."""
    from ase.io import write

    buf = io.StringIO()
    write(buf, frames, format="extxyz")
    return gzip.compress(buf.getvalue().encode(), compresslevel=9, mtime=0)


def write_shard(path: Path, frames: list) -> str:
    """Write frames atomically (temporary file, then rename); return the sha256 of the bytes."""
    data = extxyz_bytes(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def dumps_lines(obj: dict) -> str:
    """JSON with one line per entry of each top-level list or dict (small diffs when one job changes)."""
    parts = []
    for key, value in obj.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            body = ",\n".join("  " + json.dumps(v, separators=(",", ":")) for v in value)
            parts.append(f" {json.dumps(key)}: [\n{body}\n ]")
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in value.items())
            parts.append(f" {json.dumps(key)}: {{\n{body}\n }}")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically, one line per entry (dumps_lines)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps_lines(obj))
    os.replace(tmp, path)


def read_frames(path: Path) -> list:
    """Every frame of an extxyz file (compressed or not)."""
    from ase.io import read

    return list(read(path, ":"))


def export_splits(manifest: dict, out: Path, dest: Path, by: str) -> list[str]:
    """Concatenate the done shards of label jobs into DEST per split (SPLIT.extxyz.gz) and per split and job field
    `by` (SPLIT_VALUE.extxyz.gz: the stage of a molecular job, the system of a materials job), in manifest order."""
    state = json.loads((out / "state.json").read_text())
    groups: dict[str, list] = {}
    for job in manifest["jobs"]:
        entry = state["done"].get(job["id"])
        if not entry or not entry.get("output") or job["split"] == "relax":
            continue
        frames = read_frames(out / entry["output"])
        groups.setdefault(job["split"], []).extend(frames)
        groups.setdefault(f"{job['split']}_{job[by]}", []).extend(frames)
    lines = []
    for name, frames in sorted(groups.items()):
        write_shard(dest / f"{name}.extxyz.gz", frames)
        lines.append(f"{dest / name}.extxyz.gz: {len(frames)} frames")
    return lines


def read_failures(work_out: Path) -> list:
    """The entries of a command's `<output>.failures.jsonl` next to work_out (empty when there is none)."""
    failures_file = work_out.with_name(work_out.name + ".failures.jsonl")
    if not failures_file.exists():
        return []
    return [json.loads(line) for line in failures_file.read_text().splitlines() if line.strip()]


def load_state(state_path: Path) -> dict:
    """OUT/state.json as a dict ({"done": {}, "failed": {}} when there is none yet)."""
    return json.loads(state_path.read_text()) if state_path.exists() else {"done": {}, "failed": {}}


def machine() -> dict:
    """Platform, Python version and core count of this machine."""
    return {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}


# ---------------------------------------------------------------------------------------------
# running


def acquire_lock(out: Path) -> IO[str]:
    """Hold OUT/work/run.lock (flock) so only one build runs on OUT; exit with a message when another holds it."""
    (out / "work").mkdir(parents=True, exist_ok=True)
    lock = open(out / "work" / "run.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when this process ends, however it ends
    except BlockingIOError:
        raise SystemExit(f"another build is running on {out} (holds {lock.name}); wait for it or stop it first") from None
    return lock


def atomuq_command() -> list[str]:
    """The `atomuq` console script next to this Python (so the same environment), else on PATH."""
    exe = Path(sys.executable).with_name("atomuq")
    return [str(exe)] if exe.exists() else ["atomuq"]


def _die_with_parent() -> None:
    try:  # Linux: the command gets SIGTERM when this script dies, so no orphan keeps writing
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def child_env() -> dict:
    """Environment of every command: one thread, this checkout's src first on PYTHONPATH."""
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start cmd in ROOT with child_env(), appending a timestamped header and its output to log."""
    with open(log, "ab") as fh:
        fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} {' '.join(cmd)}\n".encode())
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT,
                                preexec_fn=_die_with_parent)


@dataclass
class Running:
    job: Any
    proc: subprocess.Popen
    work_in: Path
    work_out: Path
    log: Path
    t0: float
    n_input: int


def check_exit(r: Running, returncode: int) -> None:
    """Raise RuntimeError (exit code and the log's last lines) when the command failed or wrote no output."""
    if returncode != 0 or not r.work_out.exists():
        tail = r.log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"exit {returncode}: {' | '.join(tail)}")


def finished(running: dict[str, Running]) -> Iterator[tuple[str, Running, float]]:
    """Yield (job id, Running, CPU seconds) for each command that has ended, removing it from running."""
    for jid, r in list(running.items()):
        pid, status, usage = os.wait4(r.proc.pid, os.WNOHANG)
        if pid == 0:
            continue
        r.proc.returncode = os.waitstatus_to_exitcode(status)
        del running[jid]
        yield jid, r, usage.ru_utime + usage.ru_stime


@dataclass
class Progress:
    state: dict  # OUT/state.json
    jobs: dict  # job id -> manifest entry
    done: dict  # job id -> state entry, done jobs of this manifest
    frames: int
    cpu: float  # CPU seconds of the done jobs
    est_left: float  # estimated core-seconds of the jobs not done
    ratio: float  # measured / estimated cost of the done jobs


    def jobs_line(self) -> str:
        """'jobs done: N / M (K failed in the last run)'."""
        return f"jobs done: {len(self.done)} / {len(self.jobs)} ({len(self.state.get('failed', {}))} failed in the last run)"


def progress(manifest: dict, out: Path) -> Progress:
    """Done jobs, frames, CPU seconds and the measured / estimated cost ratio of a manifest's jobs (OUT/state.json)."""
    state = load_state(out / "state.json")
    jobs = {j["id"]: j for j in manifest["jobs"]}
    done = {k: v for k, v in state["done"].items() if k in jobs}
    cpu = sum(v.get("cpu_seconds", 0.0) for v in done.values())
    est_done = sum(jobs[k]["est_core_seconds"] for k in done)
    est_left = sum(j["est_core_seconds"] for k, j in jobs.items() if k not in done)
    return Progress(state, jobs, done, sum(v["frames"] for v in done.values()), cpu, est_left, cpu / est_done if est_done else 1.0)


def sync_manifest(manifest_path: Path, manifest: dict, seed: int, changed: str = "", note_versions: bool = False) -> None:
    """Write manifest (given as read back: lists, not tuples) to manifest_path, keeping the first run's versions and machine.

    A manifest of another seed or plan stops the script; the file is rewritten only when the job list changed
    (say "the job list changed{changed}"); note_versions logs when this run's versions or machine differ.
    """
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("seed") != seed or old.get("plan") != manifest["plan"]:
            raise SystemExit(f"{manifest_path}: written with another seed or plan; use --seed {old.get('seed')} "
                             f"or another --out")
        # the first run's versions and machine stay; the file is rewritten only when the job list changed
        same = {k: v for k, v in old.items() if k not in ("versions", "machine")} == \
            {k: v for k, v in manifest.items() if k not in ("versions", "machine")}
        if note_versions and (old.get("versions"), old.get("machine")) != (manifest["versions"], machine()):
            say(f"note: this run uses {manifest['versions']} on {machine()['platform']}; "
                f"the manifest records the first run's ({old.get('versions')})")
        manifest["versions"], manifest["machine"] = old.get("versions"), old.get("machine")
        if not same:
            say(f"{manifest_path}: the job list changed{changed}; rewriting it, done jobs are kept")
            write_json(manifest_path, manifest)
    else:
        manifest["machine"] = machine()
        write_json(manifest_path, manifest)


def lower_priority() -> None:
    """Run this process at the lowest priority (nice 19) with one OpenMP thread."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)  # lowest priority: other work keeps the CPU first
    except (OSError, AttributeError):
        pass
    os.environ["OMP_NUM_THREADS"] = "1"
