"""sigprop's own run: ``checkpoint.pt`` (train.py's format), or a ModelConfig dict with a state_dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from analysis.checkpoints.guards import load_into, state_dict_of, torch_load
from analysis.checkpoints.loaded import Loaded


def load_sigprop(path: Path) -> Loaded:
    """sigprop's own ``checkpoint.pt`` (train.py's format)."""
    obj = torch_load(path)
    if not (isinstance(obj, dict) and "model_config" in obj and "model" in obj):
        raise ValueError(f"{path} is not a sigprop checkpoint (no 'model' and 'model_config' keys)")
    return sigprop_from(obj, path)


def sigprop_model(mc_dict: dict[str, Any], sd: dict[str, torch.Tensor], source: Path,
                  config: Path | str = "its model_config") -> Loaded:
    """A testbed built from ``mc_dict`` (read from ``config``) holding the weights ``sd``."""
    from analysis.testbed.model import ModelConfig, build_model
    try:
        mc = ModelConfig(**mc_dict)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {config} is not a valid sigprop ModelConfig ({e})") from None
    try:
        model = build_model(mc)
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. a width given as text
        raise ValueError(f"{source}: {config} does not build a sigprop testbed "
                         f"({type(e).__name__}: {str(e)[:160]})") from None
    load_into(model, sd, source, strict=True, config=config)
    return Loaded(model=model, kind="sigprop", rebuild=lambda: build_model(mc, seed=0),
                  description=f"sigprop testbed: scheme {mc.scheme}, depth {mc.depth}, width {mc.width}, "
                              f"heads {mc.heads}, ffn {mc.ffn}, norm {mc.norm}",
                  vocab_size=mc.vocab, max_len=mc.max_seq_len, loss_kind="lm", scheme=mc.scheme,
                  theory_shape=dict(width=mc.width, heads=mc.heads, ffn=mc.ffn, norm=mc.norm,
                                    sigma=mc.sigma, embed_std=mc.embed_std, experts=mc.experts,
                                    top_k=mc.top_k, scheme_params=dict(mc.scheme_params),
                                    **({"attention": mc.attention} if hasattr(mc, "attention") else {}),
                                    **({"parametrization": mc.parametrization}
                                       if mc.parametrization != "standard" else {})),
                  nbytes=sum(t.numel() * t.element_size() for t in sd.values()))


def sigprop_from(obj: dict[str, Any], path: Path) -> Loaded:
    if not isinstance(obj.get("model_config"), dict):
        raise ValueError(f"{path}: model_config is not a dict")
    return sigprop_model(obj["model_config"], state_dict_of(obj["model"], path), path)
