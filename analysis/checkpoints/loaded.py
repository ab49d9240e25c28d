"""What every loader returns: a model ready to diagnose, and what is known about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn


@dataclass
class Loaded:
    """A model ready to diagnose, and what is known about it."""

    model: nn.Module
    kind: str  # 'sigprop', 'hf', 'state_dict', 'gguf'
    description: str
    vocab_size: int
    max_len: int | None
    loss_kind: str  # 'lm', 'masked-lm', 'surrogate'
    encode: Callable[[str], list[int]] | None = None  # the folder's tokenizer; None: bytes
    tokenizer: str = "bytes"
    decode: Callable[[list[int]], str] | None = None
    scheme: str | None = None  # sigprop scheme (exact theory) or None
    theory_shape: dict[str, Any] = field(default_factory=dict)  # width, heads, ffn, norm, …
    mask_token_id: int | None = None
    notes: list[str] = field(default_factory=list)
    nbytes: int = 0
    encoder: bool = False  # bidirectional attention (BERT-like), not a causal decoder
    rebuild: Callable[[], nn.Module] | None = None  # the same architecture, freshly initialized
    prefix_ids: list[int] = field(default_factory=list)  # what the tokenizer puts first (BOS, [CLS])
    tokenizer_size: int | None = None  # the tokenizer's number of tokens (None: bytes)
