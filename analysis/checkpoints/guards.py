"""The checks every loader shares; each failure is a ``ValueError`` with a one-line reason.

Memory (``check_fits``), torch files only through ``torch.load(weights_only=True)``, safetensors,
JSON configs, state_dicts and whether they fit an architecture; and ``LOAD_DTYPE``, the weights'
type while a ``load()`` runs.
"""

from __future__ import annotations

import contextvars
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.infra.device import available_memory

MEMORY_FRACTION = 0.8  # refuse weights larger than this share of the available memory
# The weights' type while a load() runs: every loader reads it, so it is stated once, in load()
LOAD_DTYPE: contextvars.ContextVar[torch.dtype] = contextvars.ContextVar("load_dtype", default=torch.float32)


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first message line (its type's name if it has none), cut to ``limit`` characters."""
    return (str(e).splitlines() or [type(e).__name__])[0][:limit]


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def check_fits(nbytes: int, what: str) -> None:
    """Refuse weights that would not fit in memory, with both sizes."""
    avail = available_memory()
    if nbytes > MEMORY_FRACTION * avail:
        raise ValueError(f"{what} holds {_gb(nbytes)} of weights but only {_gb(avail)} of memory is "
                         f"available (limit {MEMORY_FRACTION:.0%} of it, leaving room for activations); "
                         "run on a machine with more memory")


def refuse_pickle(path: Path, e: Exception) -> ValueError:
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global: ([\w.]+)", text)
    what = f"it asks to import '{m.group(1)}'" if m else "it needs objects outside torch's allow-list"
    return ValueError(f"{path} refused: loading this pickle would run code ({what}); "
                      "sigprop loads torch files only with torch.load(weights_only=True) and never "
                      "executes code from a checkpoint. Re-save the weights as safetensors or as a "
                      "plain state_dict of tensors")


def torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a one-line ValueError."""
    check_fits(path.stat().st_size, str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) or "GLOBAL" in str(e):
            raise refuse_pickle(path, e) from None
        raise ValueError(f"{path} is not a readable torch file (corrupt pickle: {str(e).splitlines()[0]})") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError, TypeError,
            AttributeError, IndexError, KeyError, UnicodeDecodeError) as e:
        first = first_line(e)
        raise ValueError(f"{path} is not a readable torch file ({type(e).__name__}: {first})") from None


def safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a state_dict (no code can run: the format is tensors and a JSON header)."""
    check_fits(path.stat().st_size, str(path))
    try:
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    except ImportError:
        raise ValueError("reading .safetensors needs the safetensors package (pip install -e .[hf])") from None
    except Exception as e:  # SafetensorError and friends: corrupt header or truncated data
        first = first_line(e)
        raise ValueError(f"{path} is not a readable safetensors file ({first})") from None


def state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state_dict (a mapping of names to tensors), found "
                         f"{type(obj).__name__}")
    return obj


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} holds {type(data).__name__}, not a JSON object")
    return data


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: Path, strict: bool) -> list[str]:
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).splitlines()
        raise ValueError(f"{source}: weights do not fit the architecture ({' '.join(first[1:3]).strip()[:300]})") from None
    notes = []
    if missing:
        if strict or len(missing) > len(sd) // 2:
            raise ValueError(f"{source}: {len(missing)} weights missing for this architecture "
                             f"(first: {missing[0]}); is the config the right one?")
        notes.append(f"{len(missing)} weights missing from the file (left at init): {', '.join(missing[:3])}")
    if unexpected:
        if strict:
            raise ValueError(f"{source}: {len(unexpected)} unexpected weights (first: {unexpected[0]})")
        notes.append(f"{len(unexpected)} weights in the file unused: {', '.join(unexpected[:3])}")
    return notes
