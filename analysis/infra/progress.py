"""Live progress for long work: tqdm bars on a terminal, plain lines otherwise, nothing when quiet.

One switch for the whole process, set by the command line (``--quiet``): long work calls ``say``
for an event worth a line (a run's evaluation, a finished grid point) and ``bar`` for a progress
bar. Bars are drawn only when stderr is a terminal; a log file gets the event lines alone. Lines
go through ``tqdm.write``, which prints them above any open bar instead of breaking it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm

_settings = {"quiet": False, "bars": None}  # bars None: only when stderr is a terminal


def configure(quiet: bool = False, bars: bool | None = None) -> None:
    """Silence every line and bar (``quiet``), or force bars on or off (None: on a terminal)."""
    _settings.update(quiet=quiet, bars=bars)


@contextmanager
def configured(quiet: bool = False, bars: bool | None = None) -> Iterator[None]:
    """``configure`` inside the block only (the bench draws its bars into /dev/null)."""
    before = dict(_settings)
    configure(quiet, bars)
    try:
        yield
    finally:
        _settings.update(before)


def is_quiet() -> bool:
    """Whether progress output is silenced."""
    return bool(_settings["quiet"])


def bars_on() -> bool:
    """Whether progress bars are drawn (not quiet, and stderr a terminal unless forced)."""
    if _settings["quiet"]:
        return False
    forced = _settings["bars"]
    return bool(sys.stderr.isatty()) if forced is None else bool(forced)


def say(message: str, stderr: bool = False) -> None:
    """Print one progress line (above any open bar) on stdout or ``stderr``, unless quiet."""
    if not _settings["quiet"]:
        stream = sys.stderr if stderr else sys.stdout
        tqdm.write(message, file=stream)
        stream.flush()


def say_err(message: str) -> None:
    """``say`` on stderr: progress of a command whose stdout is its result (diagnose)."""
    say(message, stderr=True)


def bar(total: int, desc: str, unit: str = "step", initial: int = 0, leave: bool = True,
        position: int | None = None) -> tqdm:
    """A progress bar with rate and ETA; a no-op bar where bars are off."""
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                position=position, disable=not bars_on(), dynamic_ncols=True, mininterval=0.5,
                file=sys.stderr)
