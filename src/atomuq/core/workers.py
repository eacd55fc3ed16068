"""Worker processes that die with their parent: one helper that runs tasks in this process or in a pool.

``run_tasks(fn, tasks, workers)`` yields ``(k, fn(*tasks[k]))`` as tasks finish. With ``workers <= 1`` the
tasks run here, one after the other (one OpenMP thread unless OMP_NUM_THREADS is set); with more, in that
many fresh ('spawn') processes pinned to one thread each. A task may call ``send(message)`` to stream
values back while it runs (frames of a trajectory, progress); every message of a task reaches the
caller's ``on_message`` before the task's result is yielded, in the order it was sent.

Workers never outlive the process that started them, even when it is killed with SIGKILL:

- on Linux each worker asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``);
  the kernel ties that to the parent *thread* that started the worker: ``run_tasks`` starts every worker
  at its first step (the first submissions), in the thread that iterates it, and shuts the pool down
  before it returns, so the pool never outlives that thread;
- elsewhere (or when prctl is unavailable, or ATOMUQ_WORKER_WATCHDOG=1) a watchdog thread in each worker
  exits it within ``WATCHDOG_INTERVAL`` seconds of its parent pid changing;
- both re-check the parent right after they are set up, for a parent that died while the worker started;
- workers ignore SIGINT (the terminal sends Ctrl-C to the whole process group): the caller stops, and
  the pool is killed when the iteration ends early (an exception, Ctrl-C, or the generator closed).

Fresh 'spawn' processes are used rather than 'fork' (a forked child of a process holding threads or an
OpenMP pool can deadlock) and rather than 'forkserver' (its workers are children of the server process,
not of the caller, so the parent-death signal would follow the server). Workers started by the atomuq
command do not re-import it (``_lean_main``): they load what their tasks need, without torch.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import ctypes.util
import multiprocessing
import os
import queue as queue_module
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterator, Sequence, TypeVar

from atomuq.core.errors import AtomuqError

#: environment variables that pin worker processes to one thread (OpenMP, BLAS)
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: seconds between two checks of the parent pid by the portable watchdog
WATCHDOG_INTERVAL = 0.5
#: set to 1 to use the portable watchdog instead of prctl on Linux too (used by the tests)
WATCHDOG_ENV = "ATOMUQ_WORKER_WATCHDOG"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

R = TypeVar("R")


class WorkerDied(AtomuqError):
    """A worker process ended without returning its task (killed, out of memory, or a crash in native code)."""


# --------------------------------------------------------------------------------------------
# threads


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

    Used when reference calculations run in this process: tblite with two OpenMP threads on a busy
    machine was 5-10x slower than with one. Does nothing where libgomp cannot be loaded.
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


@contextlib.contextmanager
def _lean_main() -> Iterator[None]:
    """While workers start: when __main__ only launches atomuq's command (the console script), hide its file.

    A 'spawn' worker re-imports the parent's main script; atomuq's imports torch and every command
    (measured: 0.32 GB and 7 s per worker, against 0.07 GB and 1 s for what a labelling task needs).
    Tasks run by this module live in atomuq's modules, never in that script, so nothing is lost.
    """
    main, cli = sys.modules.get("__main__"), sys.modules.get("atomuq.cli.main")
    path = getattr(main, "__file__", None)
    if path is None or cli is None or getattr(main, "__spec__", None) is not None or \
            getattr(main, "app", None) is not getattr(cli, "app", object()):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


# --------------------------------------------------------------------------------------------
# death with the parent


def _parent_gone(parent_pid: int) -> bool:
    return os.getppid() != parent_pid


def _watchdog(parent_pid: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if _parent_gone(parent_pid):
            os._exit(1)


def die_with_parent(parent_pid: int, *, interval: float = WATCHDOG_INTERVAL) -> str:
    """Make this process exit when process `parent_pid` (its parent) dies; returns 'pdeathsig' or 'watchdog'.

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL). Elsewhere, or if that fails, or with ATOMUQ_WORKER_WATCHDOG=1:
    a daemon thread that exits the process within `interval` seconds of the parent pid changing.
    """
    how = "watchdog"
    if sys.platform.startswith("linux") and os.environ.get(WATCHDOG_ENV) != "1":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                how = "pdeathsig"
        except (OSError, AttributeError):
            pass
    if how == "watchdog":
        threading.Thread(target=_watchdog, args=(parent_pid, interval), name="atomuq-parent-watchdog",
                         daemon=True).start()
    if _parent_gone(parent_pid):  # the parent died before the signal or the watchdog was in place
        os._exit(1)
    return how


# --------------------------------------------------------------------------------------------
# inside a worker (or inside this process, for workers <= 1)

_STATE: dict[str, Any] = {"sink": None, "queue": None, "task": None, "sent": 0}


def send(message: Any) -> None:
    """From inside a task: pass `message` (picklable) to the caller's on_message before the task's result."""
    sink = _STATE["sink"]
    if sink is not None:  # in this process
        sink(message)
        return
    q = _STATE["queue"]
    if q is None:
        raise RuntimeError("send() is only available inside a task of run_tasks(..., on_message=...)")
    q.put((_STATE["task"], message))
    _STATE["sent"] += 1


def _init_worker(parent_pid: int, q: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    die_with_parent(parent_pid)
    _STATE.update(queue=q, sink=None)


def _run_in_worker(k: int, fn: Callable[..., Any], args: tuple) -> tuple[Any, int]:
    _STATE.update(task=k, sent=0)
    result = fn(*args)
    return result, _STATE["sent"]


# --------------------------------------------------------------------------------------------
# the caller's side


def run_tasks(
    fn: Callable[..., R],
    tasks: Sequence[tuple],
    workers: int = 1,
    *,
    on_message: Callable[[Any], None] | None = None,
    window: int = 4,
) -> Iterator[tuple[int, R]]:
    """Yield (k, fn(*tasks[k])) as tasks finish: here for workers <= 1, else in a pool of fresh processes.

    fn and the task arguments must be picklable (module-level functions) when workers >= 2;
    the caller needs a __main__ guard then. At most window x workers tasks are queued at a time. A task's
    exception is raised here. WorkerDied if a worker process dies. Leaving the iteration early (an
    exception, Ctrl-C, closing the generator) kills the workers at once.
    """
    workers = min(int(workers), len(tasks))
    if workers <= 1:
        yield from _run_here(fn, tasks, on_message)
        return
    yield from _run_in_pool(fn, tasks, workers, on_message, max(1, window) * workers)


def _run_here(fn: Callable[..., R], tasks: Sequence[tuple],
              on_message: Callable[[Any], None] | None) -> Iterator[tuple[int, R]]:
    with openmp_threads(1):
        for k, args in enumerate(tasks):
            saved = _STATE["sink"]
            _STATE["sink"] = on_message or (lambda message: None)
            try:
                result = fn(*args)
            finally:
                _STATE["sink"] = saved
            yield k, result


def _kill(pool: cf.ProcessPoolExecutor) -> None:
    """Kill the pool's processes now (used when the caller stops early; running tasks are abandoned)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            process.kill()


def _deliver(q: Any, on_message: Callable[[Any], None], received: Counter, limit: int = 1000) -> None:
    """Hand the queued messages to on_message (waiting up to 0.05 s for the first), counting them per task."""
    timeout: float | None = 0.05
    for _ in range(limit):
        try:
            k, message = q.get(timeout=timeout) if timeout else q.get_nowait()
        except queue_module.Empty:
            return
        on_message(message)
        received[k] += 1
        timeout = None


def _run_in_pool(fn: Callable[..., R], tasks: Sequence[tuple], workers: int,
                 on_message: Callable[[Any], None] | None, window: int) -> Iterator[tuple[int, R]]:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue() if on_message is not None else None
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                  initargs=(os.getpid(), q))
    pending: dict[cf.Future, int] = {}
    waiting: dict[int, tuple[R, int]] = {}  # finished tasks whose messages are still on the way
    received: Counter = Counter()
    next_task, clean = 0, False
    try:
        while next_task < len(tasks) or pending or waiting:
            while next_task < len(tasks) and len(pending) < window:
                with single_thread_env(), _lean_main():  # workers start inside submit(), in this thread
                    pending[pool.submit(_run_in_worker, next_task, fn, tuple(tasks[next_task]))] = next_task
                next_task += 1
            if q is not None:
                _deliver(q, on_message, received)
                done = [f for f in pending if f.done()]
            else:
                done = list(cf.wait(pending, return_when=cf.FIRST_COMPLETED)[0]) if pending else []
            for fut in done:
                k = pending.pop(fut)
                try:
                    waiting[k] = fut.result()
                except cf.process.BrokenProcessPool as exc:
                    raise WorkerDied(f"a worker process died ({exc})") from exc
            for k in sorted(waiting):
                if received[k] >= waiting[k][1]:
                    yield k, waiting.pop(k)[0]
        clean = True
    finally:
        if not clean:
            _kill(pool)
        pool.shutdown(wait=True, cancel_futures=True)
        if q is not None:
            q.close()
            q.cancel_join_thread()
