"""Worker processes (atomuq.core.workers): results and streamed messages, and workers that never outlive their parent.

Task functions live in tests/worker_tasks.py: a worker imports the module of its task, and this one imports the CLI.

The SIGKILL test starts the real `atomuq label --workers 2` command, kills it while its workers label,
and looks for survivors by process group (workers keep the group of the command even when orphaned).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.io import read, write
from typer.testing import CliRunner
from test_label_inputs import copper
from worker_tasks import exit_hard, fail_on_three, pid_then_sleep, square_with_messages

from atomuq.cli.main import app
from atomuq.core.workers import WATCHDOG_ENV, WorkerDied, run_tasks
from atomuq.reference.files import PartialFrames, partial_path

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
SRC = Path(__file__).resolve().parents[1] / "src"


# --------------------------------------------------------------------------------------------
# /proc helpers


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, process group, start time) of a process from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _alive(pid: int, start: int | None = None) -> bool:
    """True while the process runs (a zombie, or another process that reused the pid, counts as gone)."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X") and (start is None or st[3] == start)


def _group(pgid: int) -> dict[int, int]:
    """pid -> start time of every live process in process group `pgid`."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[2] == pgid and st[0] not in ("Z", "X"):
                out[int(entry)] = st[3]
    return out


def _children(pid: int) -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and (_stat(int(e)) or ("", -1))[1] == pid]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_gone(pids: dict[int, int], seconds: float) -> list[int]:
    """Wait until none of `pids` (pid -> start time) is alive; the ones still alive after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        left = [p for p, start in pids.items() if _alive(p, start)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _kill_group(pgid: int) -> None:
    """Clean-up for a failed test: SIGKILL what is left of the group this test started."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------------------------
# results and messages


@pytest.mark.parametrize("workers", [1, 2])
def test_every_result_comes_once_after_its_messages(workers):
    events = []
    tasks = [(x,) for x in range(8)]
    for k, (square, _pid) in run_tasks(square_with_messages, tasks, workers, on_message=events.append, window=1):
        mine = [m for m in events if m[0] == k]
        assert mine == [(k, 0), (k, 1), (k, 2)]  # all of this task's messages arrived first, in order
        assert square == k * k
        events.append(("result", k))
    assert sorted(e[1] for e in events if e[0] == "result") == list(range(8))
    assert len(events) == 8 * 4


def test_a_task_error_is_raised_here_and_a_dead_worker_is_named():
    with pytest.raises(ValueError, match="three is not allowed"):
        list(run_tasks(fail_on_three, [(x,) for x in range(6)], 2))
    with pytest.raises(WorkerDied, match="worker process died"):
        list(run_tasks(exit_hard, [(3,), (3,)], 2))


@linux_only
def test_leaving_early_kills_the_running_workers():
    pids: list[int] = []
    t0 = time.monotonic()
    results = run_tasks(pid_then_sleep, [(1.0,), (60.0,), (60.0,)], 2, on_message=pids.append)
    for _ in results:
        break  # the first (1-s) task is done; both workers are busy with 60-s tasks
    results.close()
    assert len(set(pids)) == 2 and time.monotonic() - t0 < 30  # did not wait for the 60-s tasks
    assert _wait_gone(dict.fromkeys(pids), 5.0) == []


@linux_only
def test_ctrl_c_while_waiting_kills_the_workers():
    pids: list[int] = []

    def on_message(pid: int) -> None:
        pids.append(pid)
        if len(pids) == 2:  # both workers are busy: the user presses Ctrl-C
            raise KeyboardInterrupt

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        for _ in run_tasks(pid_then_sleep, [(60.0,), (60.0,), (60.0,)], 2, on_message=on_message):
            pass  # pragma: no cover
    assert len(set(pids)) == 2 and time.monotonic() - t0 < 30
    assert _wait_gone(dict.fromkeys(pids), 5.0) == []


# --------------------------------------------------------------------------------------------
# death with the parent


WATCHDOG_SCRIPT = textwrap.dedent("""
    import sys, time
    from atomuq.core.workers import run_tasks
    for _ in run_tasks(time.sleep, [(600,), (600,)], 2):
        pass
""")


@linux_only
@pytest.mark.parametrize("mode", ["pdeathsig", "watchdog"])
def test_workers_die_when_their_parent_is_killed(mode):
    env = {**os.environ, "PYTHONPATH": str(SRC), WATCHDOG_ENV: "1" if mode == "watchdog" else "0"}
    proc = subprocess.Popen([sys.executable, "-c", WATCHDOG_SCRIPT], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while time.monotonic() < deadline and len(workers) < 2:
            workers = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)]
            time.sleep(0.1)
        assert len(workers) == 2, "the workers did not start"
        time.sleep(1.0)  # let them finish starting (their initializer sets up the parent-death handling)
        group = _group(proc.pid)
        assert set(workers) <= set(group)
        proc.kill()
        proc.wait()
        assert _wait_gone(group, 10.0) == []
    finally:
        _kill_group(proc.pid)


def _atomuq_command() -> list[str]:
    script = Path(sys.executable).with_name("atomuq")
    if script.is_file():
        return [sys.executable, str(script)]  # the installed console script, as a user runs it
    return [sys.executable, "-c", "import sys; from atomuq.cli.main import app; sys.argv[0] = 'atomuq'; app()"]


@linux_only
def test_sigkill_of_label_with_workers_leaves_no_worker_and_the_rerun_resumes(tmp_path):
    cells = copper(48, repeat=4)
    inp, out = tmp_path / "cells.extxyz", tmp_path / "labelled.extxyz"
    write(inp, cells)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [*_atomuq_command(), "label", str(inp), "-o", str(out), "--method", "emt", "--workers", "2"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if partial_path(out).exists() and partial_path(out).stat().st_size > 0:
                break  # the workers are labelling
            time.sleep(0.05)
        assert proc.poll() is None, f"label ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        workers = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)]
        group = _group(proc.pid)
        assert len(workers) == 2 and set(workers) <= set(group)
        proc.kill()
        proc.wait()
        survivors = _wait_gone(group, 10.0)
        assert survivors == [], f"still running after the kill: {[_cmdline(p) for p in survivors]}"
    finally:
        _kill_group(proc.pid)
        if proc.stderr:
            proc.stderr.close()
    assert not out.exists()
    kept = len(PartialFrames(partial_path(out)).load())
    assert 1 <= kept < len(cells)

    res = CliRunner().invoke(app, ["label", str(inp), "-o", str(out), "--method", "emt", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert f"resuming: {kept} of {len(cells)} structures already labelled" in res.output
    assert f"{kept} resumed, {len(cells) - kept} new" in res.output
    frames = read(out, ":")
    assert len(frames) == len(cells) and not partial_path(out).exists()
    for k in (0, len(cells) - 1):  # the first (resumed) and the last (new) frame carry the real EMT labels
        ref = cells[k].copy()
        ref.calc = EMT(asap_cutoff=True)
        np.testing.assert_allclose(frames[k].positions, cells[k].positions, atol=1e-7)
        assert frames[k].get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(frames[k].get_forces(), ref.get_forces(), atol=1e-6)  # extxyz keeps ~8 decimals


def test_sampling_in_workers_gives_the_frames_of_sampling_here(tmp_path):
    from atomuq.workflows.sample import SampleSettings, sample_structures

    cells = copper(2, repeat=4)
    for a in cells:
        del a[16:]  # 48-atom cells: cheap
    settings = SampleSettings((300.0, 900.0), steps=6, interval=3, seed=4)
    steps_here: list[int] = []
    steps_pool: list[int] = []
    here = sample_structures(cells, "emt", tmp_path / "here.extxyz", settings, workers=1, progress=steps_here.append)
    pool = sample_structures(cells, "emt", tmp_path / "pool.extxyz", settings, workers=2, progress=steps_pool.append)
    assert here.n_frames == pool.n_frames == 4 * 2 and sum(steps_here) == sum(steps_pool) == 4 * 6
    a, b = read(here.output, ":"), read(pool.output, ":")
    for x, y in zip(a, b):
        assert (x.info["md_trajectory"], x.info["md_frame"]) == (y.info["md_trajectory"], y.info["md_frame"])
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.get_forces(), y.get_forces())


def test_what_a_worker_imports_is_light_and_core_needs_no_reference_package():
    code = ("import sys, atomuq.core.workers, atomuq.reference, atomuq.reference.labels, atomuq.reference.files, "
            "atomuq.workflows.sample_trajectory; print(sorted(m for m in ('torch', 'tblite', 'pyscf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # a labelling or sampling worker starts without torch; packages load when used
    core = Path(SRC, "atomuq", "core")
    imports = re.compile(r"^\s*(from|import)\s+(tblite|pyscf|atomuq\.reference|atomuq\.workflows)\b", re.MULTILINE)
    for path in core.glob("*.py"):
        assert not imports.search(path.read_text()), path
