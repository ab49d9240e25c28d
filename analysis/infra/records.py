"""The JSON records that runs leave behind (settings, configs, campaign state), read with one-line
errors: a folder that holds a record of other settings is refused, never silently reused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``; None if there is none; ValueError naming a broken one."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})"
                         f"{': it is empty' if not e.doc.strip() else ''}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not valid JSON (not UTF-8 text)") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a JSON object (it holds a {type(record).__name__})")
    return record


def refuse_other(folder: Path, what: str, key: str, was: Any, now: Any) -> ValueError:
    """The error for a folder whose record has ``key = was`` where this run has ``now``."""
    return ValueError(f"{folder} holds {what} with {key} = {was}, not {now}: choose another --out "
                      "folder or the same settings")


def environment(device: str) -> dict[str, Any]:
    """Where a result was made: the code's git commit (None outside a repository; ``+dirty`` with
    uncommitted changes), torch and Python versions, the device's name, the host."""
    import platform
    import subprocess
    import sys

    import torch

    from analysis.infra.device import resolve_device
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    return {"git_commit": commit, "torch_version": torch.__version__,
            "python_version": sys.version.split()[0], "device": str(dev), "device_name": name,
            "host": platform.node()}
