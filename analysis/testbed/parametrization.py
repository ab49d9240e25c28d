"""How each parameter's learning rate scales with width: the standard parametrization and µP.

µP (Yang & Hu, Tensor Programs IV/V, arXiv 2011.14522, 2203.03466; microsoft/mup's MuAdam and
MuSGD) sorts parameters by how many of their dimensions grow with width:

- matrix-like (both dimensions grow: a block's q, k, v, o, up, gate, down): Adam's learning rate
  × 1/width_mult, SGD's × 1 (fan_out/fan_in does not change);
- vector-like (one dimension grows: token and position embeddings, norm gains, the readout):
  Adam's × 1, SGD's × width_mult.

The forward half of µP (attention logits scaled by 1/d_head, the readout's 1/width_mult output
multiplier and its weights' σ²/base_width variance) lives in the model (``ModelConfig
.parametrization``); this module gives the optimizer its half, so a model and its optimizer
cannot disagree. Under the standard parametrization every multiplier is 1. Depth scaling is the
scheme's own: its init gains and forward constants live in the model, and its learning-rate
gains (``op.attn(v, lr=, out_lr=)``, e.g. ``span_dlr``'s depth-µP rates) multiply in here.
"""

from __future__ import annotations

import torch
from torch import nn

from analysis.testbed.model import Testbed

OPTIMIZERS = ("adam", "sgd")
_MATRIX_LIKE = (".q.", ".k.", ".v.", ".o.", ".up.", ".gate.", ".down.")


def is_matrix_like(name: str) -> bool:
    """Whether parameter ``name`` of a testbed has both dimensions ∝ width (a block's linear)."""
    return name.startswith("blocks.") and name.endswith(".weight") and any(
        part in name for part in _MATRIX_LIKE)


def scheme_lr_gains(model: nn.Module) -> dict[str, float]:
    """The scheme's own learning-rate multipliers (``op.attn(..., lr=, out_lr=)``,
    ``op.norm(v, lr=)``), by parameter name."""
    return {f"{name}.{p}": float(m.lr_gain) for name, m in model.named_modules()
            if getattr(m, "lr_gain", 1.0) != 1.0 for p, _ in m.named_parameters(recurse=False)}


def lr_multipliers(model: Testbed, optimizer: str = "adam") -> dict[str, float]:
    """Each parameter's learning-rate multiplier for ``optimizer`` ('adam' or 'sgd'): the
    parametrization's width rule times the scheme's depth rule (1 for most schemes)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{optimizer}' (known: {', '.join(OPTIMIZERS)})")
    m = model.cfg.width_mult
    depth = scheme_lr_gains(model)
    if optimizer == "adam":
        width = {n: (1 / m if is_matrix_like(n) else 1.0) for n, _ in model.named_parameters()}
    else:
        width = {n: (1.0 if is_matrix_like(n) else m) for n, _ in model.named_parameters()}
    return {n: w * depth.get(n, 1.0) for n, w in width.items()}


EMBEDDINGS = ("tok_embed.weight", "pos_embed.weight")  # a tied head is tok_embed itself


def param_groups(model: Testbed, optimizer: str = "adam", weight_decay: float = 0.0,
                 decay_embeddings: bool = True) -> list[dict]:
    """Parameter groups, one per (lr multiplier, decayed or not), each with ``lr_mult``.

    Weight decay applies to tensors of dim ≥ 2 (never to norm gains and biases), embeddings
    included unless ``decay_embeddings`` is False (then the block matrices and an untied head
    alone, as in most LM baselines); a training loop sets each group's ``lr`` to the schedule's
    value × its ``lr_mult``.
    """
    mults = lr_multipliers(model, optimizer)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        decay = p.dim() >= 2 and (decay_embeddings or name not in EMBEDDINGS)
        groups.setdefault((mults[name], decay), []).append(p)
    return [{"params": ps, "lr_mult": mult, "weight_decay": weight_decay if decay else 0.0}
            for (mult, decay), ps in groups.items()]


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate to ``lr`` × its ``lr_mult`` (1 where it has none)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
