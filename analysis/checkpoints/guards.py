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


RESAVE = "Re-save the weights as safetensors or as a plain state_dict of tensors"
PICKLE_HEAD = 1 << 24  # bytes of a plain pickle read to find its imports (its tensors come after)


def refuse_pickle(path: Path, imports: str | None, advice: str = RESAVE) -> ValueError:
    """The refusal of a pickle that would import ``imports`` (a global outside torch's allow-list)."""
    what = f"it asks to import '{imports}'" if imports else "it needs objects outside torch's allow-list"
    return ValueError(f"{path} refused: loading this pickle would run code ({what}); "
                      "sigprop loads torch files only with torch.load(weights_only=True) and never "
                      f"executes code from a checkpoint. {advice[:1].upper()}{advice[1:]}")


def not_torch_file(path: Path, detail: str, advice: str | None = None) -> ValueError:
    """The refusal of a file that is no torch checkpoint: random bytes, cut short, another format."""
    return ValueError(f"{path} is not a readable torch file: it is corrupt or not a torch checkpoint "
                      f"at all ({detail}){'; ' + advice if advice else ''}")


def pickle_imports(path: Path) -> tuple[list[str], str | None]:
    """(the globals the plain pickle at ``path`` would import, why it is no pickle or None), read
    with pickletools, which only parses: nothing is imported or run."""
    import io
    import pickletools
    try:
        with open(path, "rb") as f:
            head = f.read(PICKLE_HEAD)
    except OSError as e:
        return [], f"unreadable: {e.strerror}"
    imports, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(head)):
            if op.name in ("GLOBAL", "INST"):
                imports.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                imports.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception as e:  # noqa: BLE001 (any parse failure: not a pickle, or cut short)
        return imports, f"its bytes are no pickle: {first_line(e, 120)}"
    return imports, None


def refuse_unpicklable(path: Path, e: Exception, advice: str | None = None,
                       files: list[Path] | None = None) -> ValueError:
    """Why torch.load(weights_only=True) refused ``path`` (``files``: the torch files it read, by
    default ``path``): a pickle that would run code (it imports a global outside torch's
    allow-list), or a file that is no torch checkpoint at all (random bytes, cut short)."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global: ([\w.]+)", text)
    if m:
        return refuse_pickle(path, m.group(1), advice or RESAVE)
    why = None
    for f in files or [path]:
        if f.is_file() and not zipfile.is_zipfile(f):  # a zip's pickle torch has read itself
            imports, why = pickle_imports(f)
            if imports and why is None:  # a whole pickle that imports: code would run
                return refuse_pickle(path, imports[0], advice or RESAVE)
    op = re.search(r"Unsupported operand (\d+)", text)
    detail = why or (f"byte {op.group(1)} is no pickle instruction torch reads" if op else first_line(e, 160))
    return not_torch_file(path, detail, advice)


def _first_sentence(e: BaseException) -> str:
    text = first_line(e, 300)
    return f"{type(e).__name__}: {text.split('. ')[0][:200]}"


def torch_load(path: Path, advice: str | None = None) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a one-line ValueError;
    ``advice``: what to do, ending the refusal (default: re-save the weights)."""
    check_fits(path.stat().st_size, str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise refuse_unpicklable(path, e, advice) from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError, TypeError,
            AttributeError, IndexError, KeyError, UnicodeDecodeError, MemoryError,
            OverflowError) as e:
        raise not_torch_file(path, _first_sentence(e), advice) from None


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


def shape_mismatch(expected: dict[str, torch.Size], sd: dict[str, torch.Tensor],
                   described: str) -> str | None:
    """The first weight ``sd`` holds in another shape than ``expected``, as a phrase naming both
    shapes (``described``: what the expected shapes come from, e.g. "cfg.json describes"), or None."""
    for name, shape in expected.items():
        if name in sd and tuple(sd[name].shape) != tuple(shape):
            return (f"weight {name} has shape {list(sd[name].shape)} in the file but "
                    f"{list(shape)} in the model {described}")
    return None


def check_weights(expected: dict[str, torch.Size], sd: Any, source: Path, described: str) -> None:
    """Refuse ``sd`` unless it is a mapping of exactly the names of ``expected`` to finite tensors
    of their shapes; the ValueError names the first weight that differs (lacking, extra, another
    shape, not finite) and both shapes."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{source}: its weights are no mapping of names to tensors "
                         f"(found {type(sd).__name__})")
    missing = [n for n in expected if n not in sd]
    extra = [n for n in sd if n not in expected]
    reason = shape_mismatch(expected, sd, described)
    if reason is None and missing:
        reason = (f"{len(missing)} weight(s) of the model {described} are not in the file "
                  f"(first: {missing[0]})")
    if reason is None and extra:
        reason = f"{len(extra)} weight(s) in the file that the model {described} lacks (first: {extra[0]})"
    if reason is None:
        reason = non_finite(sd)
    if reason:
        raise ValueError(f"{source}: {reason}")


def non_finite(tensors: dict[str, Any]) -> str | None:
    """The first floating-point tensor of ``tensors`` holding NaN or infinity, as a phrase, or None."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            return f"weight {name} holds {bad} non-finite value(s) (NaN or infinity)"
    return None


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: Path, strict: bool,
              config: Path | str | None = None) -> list[str]:
    """Load ``sd`` into ``model`` (built from ``config``, named in the refusals); notes of what was
    left out where not ``strict``; ValueError naming the first weight that does not fit."""
    described = f"{Path(config).name} describes" if config else "the config describes"
    reason = shape_mismatch({k: v.shape for k, v in model.state_dict().items()}, sd, described)
    if reason:
        raise ValueError(f"{source}: weights do not fit the architecture: {reason}; is the config "
                         "the right one?")
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches the check above did not see
        first = str(e).splitlines()
        raise ValueError(f"{source}: weights do not fit the architecture ({' '.join(first[1:3]).strip()[:300]})") from None
    notes = []
    if missing:
        if strict or len(missing) > len(sd) // 2:
            raise ValueError(f"{source}: {len(missing)} weights of the model {described} are missing "
                             f"from the file (first: {missing[0]}); is the config the right one?")
        notes.append(f"{len(missing)} weights missing from the file (left at init): {', '.join(missing[:3])}")
    if unexpected:
        if strict:
            raise ValueError(f"{source}: {len(unexpected)} weights in the file that the model "
                             f"{described} lacks (first: {unexpected[0]}); is the config the right one?")
        notes.append(f"{len(unexpected)} weights in the file unused: {', '.join(unexpected[:3])}")
    return notes
