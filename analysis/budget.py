"""Time budgets: long work stops cleanly at a deadline, keeping what it finished.

A deadline is a ``time.time()`` value (it crosses process boundaries, unlike perf_counter). Work
that reaches one saves its state and raises :class:`Cut`; a re-run resumes from there.
"""

from __future__ import annotations

import time


class Cut(Exception):
    """Work stopped at its deadline; what finished is saved and a re-run resumes the rest."""


def past(deadline: float | None, reserve: float = 0.0) -> bool:
    """Whether less than ``reserve`` seconds are left before ``deadline`` (never, without one)."""
    return deadline is not None and time.time() + reserve >= deadline


def left(deadline: float | None) -> float:
    """Seconds left before ``deadline`` (infinite without one)."""
    return float("inf") if deadline is None else deadline - time.time()
