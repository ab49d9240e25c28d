"""What a growing stream threatens: readers that take it without a norm, and the number format.

A residual stream that grows by 10⁴ is not by itself a failure. In a pre-norm or Peri-LN stack
every branch reads N(x) and the head reads the final norm's output, so no computation sees the
stream's scale; the growth is a property of the placement. It threatens two things only:

- **a raw reader**: a branch whose input has no norm (OLMo 2's post-branch placement, a stack
  with no norms) or a head with no final norm reads the grown stream as it is;
- **the number format**: the largest activation against the format's range (float16 overflows
  at 65 504), and each block's update against the format's resolution. A block adds an update u
  to a stream x stored with relative rounding step ε (bfloat16: 2⁻⁸); where ‖u‖/‖x‖ < ε the update
  is smaller than the rounding of the stream it is added to, and most of it is rounded away. The
  **precision headroom** of a block is its relative contribution over ε: how many rounding steps
  its update spans (per token, as a norm ratio: a coordinate's share varies around it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch


@dataclass(frozen=True)
class Format:
    """A floating-point storage format: its largest finite value and its unit roundoff 2^-p."""

    largest: float
    resolution: float


FORMATS = {
    "float32": Format(float(torch.finfo(torch.float32).max), 2.0 ** -24),
    "bfloat16": Format(float(torch.finfo(torch.bfloat16).max), 2.0 ** -8),
    "float16": Format(float(torch.finfo(torch.float16).max), 2.0 ** -11),
}
PRECISION_FORMAT = "bfloat16"  # the headroom column's format: what large models train and run in
FP16 = FORMATS["float16"]


def native_format(model: torch.nn.Module) -> str | None:
    """The format the checkpoint was made for ('bfloat16', 'float16', 'float32'), or None if unknown."""
    cfg = getattr(model, "config", None)
    if cfg is not None:  # Hugging Face: the config's dtype (transformers 5) or torch_dtype
        d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        name = str(d).replace("torch.", "") if d is not None else None
        return name if name in FORMATS else None
    cfg = getattr(model, "cfg", None)  # the sigprop testbed
    name = getattr(cfg, "dtype", None)
    return name if name in FORMATS else None


def add_columns(t: pd.DataFrame) -> None:
    """precision_headroom (bfloat16) and fp16_range_headroom, per block, in place."""
    eps = FORMATS[PRECISION_FORMAT].resolution
    t["precision_headroom"] = t["branch_rel_median"] / eps if "branch_rel_median" in t else np.nan
    t["fp16_range_headroom"] = FP16.largest / t["peak_abs"] if "peak_abs" in t else np.nan


def raw_readers(layout, final_is_norm: bool) -> list[str]:
    """What reads the stream without a norm: 'head', 'block i' (its branches); ['unknown'] if not known.

    Block i's branches read the stream raw unless they have a norm on their input, or block
    i − 1 ends in a norm (post-norm: the stream it hands on is normalized). Block 0 reads the
    embedding, before any growth, so it is not counted.
    """
    L = len(layout.blocks)
    kinds = layout.branch_norms()
    post = [n is not None for n in layout.output_norms]
    if not kinds and not all(post):
        return ["unknown"]
    readers = [f"block {i}" for i in range(1, L)
               if not post[i - 1] and not (kinds and kinds[i] in ("pre", "both"))]
    if not (final_is_norm or post[-1]):
        readers.append("head")
    return readers


def describe_readers(readers: list[str]) -> str:
    """'the head and the branches of blocks 1–5' from ``raw_readers``' list."""
    blocks = [r for r in readers if r.startswith("block")]
    parts = []
    if "head" in readers:
        parts.append("the head (no final norm)")
    if blocks:
        parts.append(f"the branches of {len(blocks)} block(s) from {blocks[0]} (no norm on their input)")
    return " and ".join(parts)
