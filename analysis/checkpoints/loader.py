"""Which kind a path holds (a file, a folder, a Hugging Face id), and handing it to that kind's loader."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from analysis.checkpoints.gguf import is_gguf, load_gguf, split_part
from analysis.checkpoints.guards import LOAD_DTYPE, safetensors_load, state_dict_of, torch_load
from analysis.checkpoints.hf import (HF_WEIGHTS, attach_tokenizer, load_hf_folder, looks_like_hub_id,
                                     resolve_hub_id)
from analysis.checkpoints.loaded import Loaded
from analysis.checkpoints.sigprop import load_sigprop, sigprop_from
from analysis.checkpoints.state_dict import load_state_dict_with_config

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# a sharded Hugging Face checkpoint's parts (one model with its index, never several)
HF_SHARD = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")
MAX_LISTED = 6  # models named in the refusal of a folder holding several (a GGUF repo holds dozens)


@dataclass
class _Found:
    """One model a folder holds: the file that names it alone, and what it is."""

    path: Path
    what: str


def folder_models(folder: Path) -> list[_Found]:
    """Every model ``folder`` holds at its top level; a sharded checkpoint or a split GGUF is one."""
    files = {f.name: f for f in sorted(folder.iterdir()) if f.is_file()}
    found = []
    hf = [n for n in HF_WEIGHTS if n in files] if "config.json" in files else []
    if hf:
        found.append(_Found(files["config.json"], f"a Hugging Face model with {hf[0]}"))
    if "checkpoint.pt" in files:
        found.append(_Found(files["checkpoint.pt"], "a sigprop run"))
    found += _gguf_models(files)
    # shards are one model's parts, never models of their own; without config.json they name no
    # architecture, while a single model.safetensors is still a state_dict to pass with --config
    parts = _index_names(files) | {n for n in files if HF_SHARD.fullmatch(n)}
    parts |= set(HF_WEIGHTS) if hf else set()
    found += [_Found(files[name], "a bare state_dict: add --config") for name in files
              if name.endswith(".safetensors") and name not in parts
              and not _mistral_copy(name, files, bool(hf))]
    return found


def _gguf_models(files: dict[str, Path]) -> list[_Found]:
    """The GGUF files among ``files``; the parts of one split GGUF count as one (its first part)."""
    found, splits = [], {}
    for name, path in files.items():
        if not name.lower().endswith(".gguf"):
            continue
        part = split_part(name)
        if part is None:
            found.append(_Found(path, "GGUF"))
        else:
            prefix = name[:-len("-00001-of-00001.gguf")]
            splits.setdefault((prefix, part[1]), []).append(path)
    found += [_Found(min(paths), f"part 1 of a GGUF split in {count} parts")
              for (_, count), paths in splits.items()]
    return found


def _index_names(files: dict[str, Path]) -> set[str]:
    """The shard files every ``*.index.json`` among ``files`` lists (an unreadable index lists none)."""
    names: set[str] = set()
    for name, path in files.items():
        if name.endswith(".index.json"):
            try:
                names |= {str(v) for v in json.loads(path.read_text()).get("weight_map", {}).values()}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
                pass  # transformers reports a broken index when it loads the folder
    return names


def _mistral_copy(name: str, files: dict[str, Path], hf: bool) -> bool:
    """Mistral's repos ship their own format's copy of the same weights (params.json +
    consolidated.safetensors) beside the Hugging Face files: not a second model."""
    return hf and name.startswith("consolidated") and "params.json" in files


def _load_folder(folder: Path, config: str | os.PathLike | None,
                 tokenizer: str | os.PathLike | None) -> Loaded:
    """The one model ``folder`` holds; a folder holding none or several is refused."""
    found = folder_models(folder)
    if len(found) > 1:
        listed = "; ".join(f"{f.path.name} ({f.what})" for f in found[:MAX_LISTED])
        more = f"; and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""
        raise ValueError(f"folder {folder} holds {len(found)} models: {listed}{more}; pass one of these "
                         f"files instead of the folder, e.g. {found[0].path}")
    if found and found[0].path.name == "checkpoint.pt":
        return load_sigprop(found[0].path)
    if found:
        return _load_file(found[0].path, config, tokenizer)
    refuse_sigprop_output(folder)
    if (folder / "config.json").is_file():
        return load_hf_folder(folder, tokenizer)  # refused there: config.json without weights
    below = sorted(folder.rglob("checkpoint.pt"))[:3]
    hint = f"; checkpoints below it: {', '.join(str(b.parent) for b in below)}" if below else ""
    raise ValueError(f"folder {folder} holds neither config.json (a Hugging Face model folder) nor "
                     f"checkpoint.pt (a sigprop run) nor a .gguf or .safetensors file{hint}")


def sigprop_output(folder: Path) -> str | None:
    """The sigprop command whose results ``folder`` holds (its stamp ``sigprop.json``, else the
    files it writes: config.json and init_profiles.csv of a sweep, runs/ of a train grid, …), or
    None: results, never a model, however much they look like one (a sweep's config.json)."""
    from analysis.infra.folders import STAMP, owner_of_unstamped
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        stamp = None
    command = stamp.get("command") if isinstance(stamp, dict) else None
    if isinstance(command, str) and command:
        return command
    owner = owner_of_unstamped(folder)
    if owner is None and (folder / "runs").is_dir() and any((folder / "runs").glob("*/settings.json")):
        owner = "train"  # a grid's folder before its tables were written
    return owner


def refuse_sigprop_output(folder: Path, file: Path | None = None) -> None:
    """Refuse a folder of sigprop's results (or ``file``, one of its files) given as a model:
    name what it is and the run folders below it, which hold checkpoints."""
    command = sigprop_output(folder)
    what = f"{file} is a file of" if file else f"{folder} is"
    if command is None:
        if file is None and (folder / "settings.json").is_file() and (
                (folder / "train_log.csv").is_file() or (folder / "result.json").is_file()):
            raise ValueError(f"{folder} is a sigprop run folder without its checkpoint.pt (deleted, or "
                             "the run stopped before its first checkpoint): train it again, or give "
                             "another run folder or checkpoint.pt")
        return
    below = sorted(folder.rglob("checkpoint.pt"))[:1]
    example = (f", e.g. {below[0].parent}" if below else
               " (`train` and `campaign` write one per run, in OUT/runs/NAME/)")
    raise ValueError(f"{what} a sigprop {command} folder (results), not a checkpoint; give a run "
                     f"folder or checkpoint.pt{example}")


# --- loading ----------------------------------------------------------------------------------

def load(path: str | os.PathLike, config: str | os.PathLike | None = None,
         tokenizer: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> Loaded:
    """Load ``path`` (see the module docstring); raises ValueError with a reason on any bad input.

    ``tokenizer``: a folder (or tokenizer.json) to tokenize the text with; by default the model
    folder's own, or for a bare state_dict the tokenizer beside the weights or the config.
    ``dtype``: the weights' type once loaded (float32; bfloat16 halves them, GGUF dequantized
    straight into it).
    """
    if tokenizer is not None and not Path(tokenizer).exists():
        raise ValueError(f"--tokenizer {tokenizer} does not exist")
    p, hub_id = locate(path)
    if not os.access(p, os.R_OK):
        raise ValueError(f"checkpoint path {p} is not readable (permission denied)")
    token = LOAD_DTYPE.set(dtype)
    try:
        loaded = _load_folder(p, config, tokenizer) if p.is_dir() else _load_file(p, config, tokenizer)
    finally:
        LOAD_DTYPE.reset(token)
    loaded.model.to(dtype)
    if tokenizer is not None and loaded.encode is None:  # a sigprop testbed: bytes unless told
        attach_tokenizer(loaded, tokenizer)
    if hub_id:
        loaded.notes.insert(0, f"{hub_id} read from the local Hugging Face cache: {p}")
    return loaded


def locate(path: str | os.PathLike) -> tuple[Path, str | None]:
    """(the local path, the Hugging Face id it was resolved from or None); ValueError if neither."""
    p = Path(path)
    if p.exists():
        return p, None
    if looks_like_hub_id(os.fspath(path)):  # only where no such local path exists: a path wins
        return resolve_hub_id(os.fspath(path)), os.fspath(path)
    raise ValueError(f"checkpoint path {p} does not exist")


def _load_file(p: Path, config: str | os.PathLike | None,
               tokenizer: str | os.PathLike | None) -> Loaded:
    """One checkpoint file; a folder's ``config.json`` names that folder's Hugging Face model."""
    if p.stat().st_size == 0:
        raise ValueError(f"{p} is empty")
    if p.name == "config.json" or p.suffix.lower() not in (".safetensors", ".gguf", *TORCH_SUFFIXES):
        refuse_sigprop_output(p.parent, p)  # a table or record of sigprop's results
    if p.name == "config.json":
        return load_hf_folder(p.parent, tokenizer)
    if p.suffix.lower() == ".gguf" or is_gguf(p):
        return load_gguf(p, tokenizer)
    if p.suffix == ".safetensors":
        sd, obj = safetensors_load(p), None
    elif p.suffix in TORCH_SUFFIXES or config is None:
        obj = torch_load(p)
        if isinstance(obj, dict) and "model_config" in obj and config is None:
            return sigprop_from(obj, p)
        sd = state_dict_of(obj, p)
    else:
        raise ValueError(f"unknown checkpoint file type '{p.suffix}' (known: .safetensors, "
                         f"{', '.join(TORCH_SUFFIXES)}, .gguf)")
    if config is None:
        raise ValueError(f"{p} is a bare state_dict ({len(sd)} tensors) with no architecture: pass "
                         "--config CONFIG.json (a sigprop ModelConfig dict or a Hugging Face config.json)")
    return load_state_dict_with_config(sd, Path(config), p, tokenizer)
