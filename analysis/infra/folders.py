"""Output folders: made, and proved writable, before any work goes into them."""

from __future__ import annotations

import os
import time
from pathlib import Path


def writable_dir(path: str | os.PathLike | None) -> Path:
    """``path`` (default: runs/<timestamp>) created and checked writable; ValueError naming it."""
    out = Path(path) if path else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").touch()
        (out / ".write_test").unlink()
    except OSError as e:
        raise ValueError(f"output folder {out} is not writable ({e.strerror})") from None
    return out
