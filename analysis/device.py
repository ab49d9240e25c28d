"""Device names → torch devices, with one-line errors: shared by every command that runs a model."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """A torch device, or ValueError if it is unknown or absent here."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}' (try cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device '{name}' (cpu or cuda)")
    return dev
