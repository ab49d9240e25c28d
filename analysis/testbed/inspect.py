"""Plain-text summaries for the `schemes` and `model` commands."""

from __future__ import annotations

import math
import time

import torch

from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import ModelConfig, build_model
from analysis.infra.device import resolve_device
from theory.schemes import SCHEMES, block_structure, get_scheme


def describe_calls(cfg_scheme: str, l: int, L: int, params: dict) -> str:
    """Block ``l`` of ``L`` as the sequence of vocabulary calls it makes."""
    structure = block_structure(get_scheme(cfg_scheme), l, L, params)
    parts = []
    for c in structure.calls:
        gains = ", ".join(f"{k}={v:.4g}" for k, v in c.gains.items() if v != 1)
        parts.append(f"{c.kind}({gains})" if gains else c.kind)
    return " → ".join(parts)


def schemes_text(only: str | None = None) -> str:
    """Every registered scheme (or just ``only``): formula, parameters, final norm, source."""
    names = [get_scheme(only).name] if only else list(SCHEMES)
    lines = []
    for name in names:
        s = SCHEMES[name]
        params = s.describe_params()
        lines.append(f"{name}")
        lines.append(f"  block       {s.formula}")
        lines.append(f"  parameters  {', '.join(f'{k} = {v}' for k, v in params.items()) or '—'}")
        lines.append(f"  final norm  {'yes' if s.final_norm else 'no'}")
        lines.append(f"  calls (l=1) {describe_calls(name, 1, 12, s.resolve(12))}   [at L = 12]")
        lines.append(f"  source      {s.source}")
        if s.notes:
            lines.append(f"  note        {s.notes}")
        lines.append("")
    return "\n".join(lines).rstrip()


def model_check_text(cfg: ModelConfig, corpus: str | None = None, batch_size: int = 8,
                     seed: int = 0, device: str = "cpu") -> str:
    """Build the testbed, run one forward/backward corpus batch, and summarise it."""
    if batch_size < 1:
        raise ValueError(f"batch must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    data = load_corpus(corpus)
    t0 = time.perf_counter()
    model = build_model(cfg, seed=seed, device=dev)
    t_build = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(seed)
    x, y = data.batch("train", batch_size, cfg.max_seq_len, generator=gen, device=dev)
    t0 = time.perf_counter()
    _, loss = model(x, y)
    loss.backward()
    t_step = time.perf_counter() - t0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).item()
    n_params = sum(p.numel() for p in model.parameters())
    b = model.blocks[0]
    lines = [
        f"scheme      {cfg.scheme}: {get_scheme(cfg.scheme).formula}",
        f"parameters  {', '.join(f'{k} = {v:.6g}' for k, v in b.params.items()) or '—'}"
        f"   (at L = {cfg.depth})",
        f"block 1     {describe_calls(cfg.scheme, 1, cfg.depth, b.params)}",
        f"model       L={cfg.depth} d={cfg.width} heads={cfg.heads} ffn={cfg.ffn} norm={cfg.norm} "
        f"{'MoE ' + str(cfg.experts) + ' experts top-' + str(cfg.top_k) if cfg.experts else 'dense'}"
        f"  {n_params / 1e6:.2f}M parameters, {cfg.dtype}, {dev}",
        f"corpus      {data.source}: {len(data.train):,} train / {len(data.val):,} val bytes",
        f"batch       {batch_size} × {cfg.max_seq_len} bytes",
        f"loss        {loss.item():.4f} nats = {loss.item() / math.log(2):.3f} bits/byte "
        f"(uniform: {math.log(cfg.vocab):.4f} nats)",
        f"grad norm   {grad_norm:.4g} ({'finite' if math.isfinite(grad_norm) else 'NOT FINITE'})",
        f"time        build {t_build:.2f} s, forward+backward {t_step:.2f} s",
    ]
    return "\n".join(lines)
