"""Speed figure of ``diagnose``: a GPT-2-small-shaped checkpoint (124M parameters) over 64 × 256 tokens.

The model is built from a config (random init, no download), saved as a Hugging Face folder with
safetensors into a temporary folder, and diagnosed with the command's defaults (64 sequences of
256 tokens forward, 16 of them backward). The figure is the whole ``diagnose`` call: loading,
text, probes, theory, findings (not writing the figure and report).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def run(args: argparse.Namespace) -> None:
    try:
        import transformers
    except ImportError:
        raise ValueError("bench --diagnose needs transformers (pip install -e .[hf])") from None
    from analysis.diagnose.diagnosis import diagnose
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024)
        model = transformers.GPT2LMHeadModel(cfg)
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        t = time.perf_counter()
        d = diagnose(tmp, sequences=64, seq_len=256, device=args.device)
        total = time.perf_counter() - t
    print(f"diagnose, GPT-2-small shape ({n / 1e6:.0f}M parameters, {d.meta['blocks']} blocks), "
          f"{d.meta['sequences']} × {d.meta['seq_len']} tokens forward, {d.meta['grad_sequences']} "
          f"backward, {torch.get_num_threads()} threads on {args.device}: {total:.1f} s "
          f"(load {d.meta['seconds_load']:.1f} s; target ≤ 60 s on CPU)")
