"""Device names → torch devices, with one-line errors: shared by every command that runs a model."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    """A torch device, or ValueError if it is unknown or absent here."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}' (try cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available here: use "
                         "--device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device '{name}' (cpu or cuda)")
    return dev


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes free on ``device`` now: the GPU's free memory, or the host's MemAvailable (total
    physical memory as a fallback)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def synchronize(device: str | torch.device) -> None:
    """Wait for the work queued on ``device`` (a GPU runs asynchronously; a CPU needs no wait),
    so that a clock read next times the work, not its issuing."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
