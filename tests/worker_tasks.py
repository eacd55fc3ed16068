"""Task functions for tests/test_workers.py, in a module of their own so worker processes import little to run them."""

from __future__ import annotations

import os
import time

from atomuq.core.workers import send


def square_with_messages(x: int) -> tuple[int, int]:
    """x², this process's pid; sends (x, 0), (x, 1), (x, 2) first."""
    for i in range(3):
        send((x, i))
    return x * x, os.getpid()


def fail_on_three(x: int) -> int:
    """x, or ValueError for 3."""
    if x == 3:
        raise ValueError("three is not allowed")
    return x


def pid_then_sleep(seconds: float) -> int:
    """Send this process's pid, sleep `seconds`, return the pid."""
    send(os.getpid())
    time.sleep(seconds)
    return os.getpid()


def exit_hard(code: int) -> None:
    """End the process at once, as a crash in native code would."""
    os._exit(code)
