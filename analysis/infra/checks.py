"""Checks of settings, each with its one message: shared by the config dataclasses (their
``validate()``) and the command line's converters (analysis.cli.options), so the API and the
command line refuse the same input alike (the command line names the option, ``--widths``; the
API the field, ``widths``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable


def check_list(values: Iterable, name: str, *, increasing: bool = False,
               text: str | None = None) -> None:
    """Refuse an empty list, a value listed twice, and (``increasing``) values out of order.
    ``text``: the list as the user wrote it (default: its values joined by commas)."""
    values = list(values)
    shown = text if text is not None else ",".join(map(str, values))
    if not values:
        raise ValueError(f"{name} is empty")
    seen = set()
    for v in values:
        if v in seen:  # a run measured twice and counted twice (a slope fit weighted, a mean)
            raise ValueError(f"{name} must be distinct: it lists {v:g} twice ('{shown}')"
                             if isinstance(v, float) else
                             f"{name} must be distinct: it lists {v} twice ('{shown}')")
        seen.add(v)
    if increasing and values != sorted(values):
        raise ValueError(f"{name} must be increasing, got '{shown}'")


def check_int(value, name: str, least: int | None = 1) -> None:
    """Refuse what is not an integer (2.5, True, '3') or is below ``least``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if least is not None and value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")


def check_number(value, name: str, lo: float = -math.inf, hi: float = math.inf, *,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    """Refuse a value that is not a finite number in the interval from ``lo`` to ``hi`` (each
    end included unless ``lo_open`` / ``hi_open``)."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value)
          and (lo < value if lo_open else lo <= value)
          and (value < hi if hi_open else value <= hi))
    if ok:
        return
    if math.isinf(hi):
        where = f" {'>' if lo_open else '>='} {lo:g}" if math.isfinite(lo) else ""
    elif math.isinf(lo):
        where = f" {'<' if hi_open else '<='} {hi:g}"
    else:
        where = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    raise ValueError(f"{name} must be a finite number{where}, got {value!r}")


FAST_BACKENDS = ("inductor", "eager", "aot_eager")  # known without importing torch._dynamo (~2 s)


def check_compile_backend(name: str) -> None:
    """Refuse a torch.compile backend torch does not know (torch._dynamo.list_backends with
    its debug and experimental ones, and those installed packages register)."""
    if name in FAST_BACKENDS:
        return
    from torch._dynamo import list_backends
    if name not in list_backends(exclude_tags=()):
        shown = sorted({*list_backends(), *FAST_BACKENDS})
        raise ValueError(f"unknown torch.compile backend '{name}' (known: {', '.join(shown)})")
