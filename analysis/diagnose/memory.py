"""Will the diagnosis fit in memory? An estimate of its peak, made before the weights are read.

The peak is the weights plus the largest of what runs on them (the trained model is freed before
its re-initialized twin is built, so the two never coexist):

- **weights**: parameters × bytes per element (float32, or bfloat16 with ``--dtype``);
- **loading**: GGUF files are dequantized by transformers into a full state dict before the model
  takes it, so loading one holds the weights twice;
- **backward**: what autograd keeps per token and block for the stream's gradient (parameters need
  none): about 8 stream-wide and 4 FFN-wide vectors — norm inputs and outputs, q, k, v, the
  attention and branch outputs; the FFN's gate, up, activation and product;
- **logits**: at most ``CHUNK_BYTES`` of them at a time (the chunked loss), about three copies
  (logits, their softmax, its gradient).

A diagnosis whose estimate exceeds ``MEMORY_FRACTION`` of the available memory is refused in one
line, naming the estimate and the memory, before anything is loaded. The estimate is checked
against measured peaks by ``bench --diagnose``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from analysis.infra.device import available_memory
from analysis.diagnose.passes import CHUNK_BYTES

MEMORY_FRACTION = 0.9  # of the available memory: the estimate already counts the activations
BYTES = {"float32": 4, "bfloat16": 2}
OVERHEAD = 0.6e9  # the interpreter, torch, transformers and the tokenizer, resident before any weight
# Activations one backward pass may keep: the backward sequences run in micro-batches under it (the
# same tokens and work, in smaller passes), so a deep, wide model's backward stays within ~1 GB.
BACKWARD_BUDGET = 1e9


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know of a model."""

    parameters: int
    depth: int
    width: int
    ffn: int
    vocab: int


@dataclass(frozen=True)
class Need:
    """The estimated peak, in bytes, and its parts."""

    weights: float
    loading: float
    backward: float
    logits: float

    @property
    def total(self) -> float:
        return OVERHEAD + self.weights + max(self.loading, self.backward + self.logits)

    def describe(self) -> str:
        gb = lambda v: f"{v / 1e9:.2f} GB"  # noqa: E731
        return (f"{gb(self.total)} (weights {gb(self.weights)}, then the larger of loading "
                f"{gb(self.loading)} and backward {gb(self.backward)} + logits {gb(self.logits)}, "
                f"plus {gb(OVERHEAD)} for the libraries)")


def backward_per_sequence(shape: Shape, seq_len: int, dtype: str) -> float:
    """Bytes autograd keeps for one sequence's backward to the stream (module docstring)."""
    return seq_len * shape.depth * (8 * shape.width + 4 * shape.ffn) * BYTES[dtype]


def backward_batch(shape: Shape, seq_len: int, dtype: str, batch: int) -> int:
    """Sequences per backward pass: ``batch``, or fewer where their activations would pass BACKWARD_BUDGET."""
    return max(1, min(batch, int(BACKWARD_BUDGET // max(backward_per_sequence(shape, seq_len, dtype), 1))))


def need(shape: Shape, dtype: str, batch: int, seq_len: int, gguf: bool) -> Need:
    """The estimated peak of diagnosing a model of ``shape`` (module docstring)."""
    e = BYTES[dtype]
    weights = shape.parameters * e
    tokens = batch * seq_len
    backward = backward_batch(shape, seq_len, dtype, batch) * backward_per_sequence(shape, seq_len, dtype)
    logits = 3 * min(CHUNK_BYTES, 4 * tokens * shape.vocab)
    return Need(weights=weights, loading=weights if gguf else 0.0, backward=backward, logits=logits)


def check(n: Need | None, device: torch.device) -> None:
    """Refuse, in one line, a diagnosis whose estimated peak does not fit in ``device``'s memory."""
    if n is None:
        return
    avail = available_memory(device)
    if n.total > MEMORY_FRACTION * avail:
        raise ValueError(f"the diagnosis would need about {n.describe()}, but {avail / 1e9:.2f} GB of "
                         f"memory is available on {device} (limit {MEMORY_FRACTION:.0%} of it): use "
                         "--dtype bfloat16 (half the weights), a smaller --batch, or a larger machine")


def shape_of(model: torch.nn.Module, blocks: list[str], width: int, vocab: int) -> Shape:
    """A loaded model's shape: its blocks, and its FFN width read off block 0's widest weight."""
    first = model.get_submodule(blocks[0])
    dims = [max(p.shape) for p in first.parameters() if p.dim() == 2]
    return Shape(parameters=sum(p.numel() for p in model.parameters()), depth=len(blocks), width=width,
                 ffn=max(dims, default=4 * width), vocab=vocab)


def estimate_before_loading(path: str | os.PathLike, dtype: str, batch: int, seq_len: int) -> Need | None:
    """The estimate from a checkpoint's header or config alone, or None where neither tells the shape."""
    p = Path(path)
    try:
        if p.is_file() and (p.suffix.lower() == ".gguf"):
            return need(_gguf_shape(p), dtype, batch, seq_len, gguf=True)
        if p.is_dir() and (p / "config.json").is_file():
            return need(_hf_shape(p / "config.json"), dtype, batch, seq_len, gguf=False)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None  # the loader names what is wrong with the file
    return None


def _gguf_shape(path: Path) -> Shape:
    from analysis.checkpoints.gguf import gguf_header
    meta, tensors, _ = gguf_header(path)
    arch = meta["general.architecture"]
    width = int(meta[f"{arch}.embedding_length"])
    return Shape(parameters=sum(math.prod(s) for _, s, _, _ in tensors), depth=int(meta[f"{arch}.block_count"]),
                 width=width, ffn=int(meta.get(f"{arch}.feed_forward_length", 4 * width)),
                 vocab=int(meta.get("tokenizer.ggml.tokens", 0)))


def _hf_shape(config_path: Path) -> Shape:
    c = json.loads(config_path.read_text())
    c = c.get("text_config", c)
    width = int(c.get("hidden_size") or c.get("n_embd") or c["d_model"])
    depth = int(c.get("num_hidden_layers") or c.get("n_layer") or c["num_layers"])
    ffn = int(c.get("intermediate_size") or c.get("n_inner") or 4 * width)
    vocab = int(c.get("vocab_size", 0))
    heads_kv = int(c.get("num_key_value_heads") or c.get("num_attention_heads") or c.get("n_head") or 1)
    heads = int(c.get("num_attention_heads") or c.get("n_head") or 1)
    attn = width * width * 2 + 2 * width * (width * heads_kv // heads)
    mlp = (3 if "llama" in str(c.get("model_type")) or "qwen" in str(c.get("model_type")) else 2) * width * ffn
    head = 0 if c.get("tie_word_embeddings", True) else vocab * width
    return Shape(parameters=depth * (attn + mlp) + vocab * width + head, depth=depth, width=width, ffn=ffn,
                 vocab=vocab)
