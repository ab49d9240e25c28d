"""Time budgets: long work stops cleanly at a deadline, keeping what it finished.

A deadline is a ``time.time()`` value (it crosses process boundaries, unlike perf_counter). Work
that reaches one saves its state and raises :class:`Cut`; a re-run resumes from there.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator


class Cut(Exception):
    """Work stopped at its deadline; what finished is saved and a re-run resumes the rest."""


def past(deadline: float | None, reserve: float = 0.0) -> bool:
    """Whether less than ``reserve`` seconds are left before ``deadline`` (never, without one)."""
    return deadline is not None and time.time() + reserve >= deadline


def left(deadline: float | None) -> float:
    """Seconds left before ``deadline`` (infinite without one)."""
    return float("inf") if deadline is None else deadline - time.time()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the work stopped where it can resume: the message says what was kept."""


@contextmanager
def deferred_interrupt(log=print) -> Iterator[dict]:
    """While inside, a first Ctrl-C (SIGINT) only sets ``flag["set"]``, for the work to stop at its
    next safe point (a checkpoint); a second one interrupts at once (KeyboardInterrupt). Outside
    the main thread, or where SIGINT is ignored, nothing is installed and the flag stays unset."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = signal.getsignal(signal.SIGINT)
    if old in (signal.SIG_IGN, None):
        yield flag
        return

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True
        log("  Ctrl-C: stopping at the end of this step with a checkpoint (Ctrl-C again: at once)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)
