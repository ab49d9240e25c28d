"""A bare state_dict with ``config=`` pointing at a JSON file: a sigprop ``ModelConfig`` dict (has
``scheme``) or a Hugging Face config.json (has ``model_type``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from analysis.checkpoints.guards import LOAD_DTYPE, load_into, read_json
from analysis.checkpoints.hf import finish_hf, hf_config, hf_head_class
from analysis.checkpoints.loaded import Loaded
from analysis.checkpoints.sigprop import sigprop_model


def load_state_dict_with_config(sd: dict[str, torch.Tensor], config_path: Path, source: Path,
                                tokenizer: str | os.PathLike | None = None) -> Loaded:
    """A bare state_dict and a JSON config (sigprop ModelConfig dict, or a Hugging Face config.json)."""
    data = read_json(config_path)
    if "scheme" in data and "model_type" not in data:
        loaded = sigprop_model(data, sd, source, config_path)
        loaded.kind = "state_dict"
        return loaded
    if "model_type" not in data:
        raise ValueError(f"config {config_path} is neither a sigprop ModelConfig (no 'scheme') nor a "
                         "Hugging Face config (no 'model_type')")
    config = hf_config(data, config_path)
    cls, loss_kind = hf_head_class(config)
    try:
        model = cls.from_config(config, trust_remote_code=False)
    except Exception as e:
        raise ValueError(f"{config_path}: could not build {config.model_type} ({str(e)[:200]})") from None
    # HF state_dicts may be saved from the bare model or with its head: try both prefixes
    base = getattr(model, "base_model_prefix", "")
    if base and not any(k.startswith(base + ".") for k in sd) and any(
            k.startswith(base + ".") for k in model.state_dict()):
        sd = {(k if k.startswith(("lm_head", "cls.", "embed_out")) else f"{base}.{k}"): v for k, v in sd.items()}
    notes = load_into(model, sd, source, strict=False, config=config_path)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.to(LOAD_DTYPE.get())
    desc = (f"{type(model).__name__} ({config.model_type}) built from {config_path.name}, weights "
            f"from {source.name}")
    dirs = [Path(tokenizer)] if tokenizer else [source.parent, config_path.parent]
    return finish_hf(model, config, cls, loss_kind, desc,
                      sum(t.numel() * t.element_size() for t in sd.values()), dirs,
                      tokenizer is not None, notes)
