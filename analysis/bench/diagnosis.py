"""Speed of ``diagnose`` on two checkpoint shapes, against the floor of the same tokens.

Shapes (built from configs, random init, no download; saved as Hugging Face folders with
safetensors in a temporary folder): a 6-layer width-384 BERT encoder (the all-MiniLM-L6-v2 shape),
the 124M GPT-2-small shape and the SmolLM2-135M shape (a released GGUF adds its dequantization,
timed apart in the diagnosis notes), each over at most 64 × 256 tokens with the command's defaults
(16 backward, skip test on 4, re-initialized twin on 8, sampling stops at 5 % standard error).
The figure is the whole ``diagnose`` call: loading, text, probes, skip test, re-initialized
twin, theory, findings (not the figure and report). The floor is a plain forward of all 64
sequences plus forward/backward of the 16, in the same process, no probes: what the default
work would cost with nothing measured.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

SHAPES = {
    "bert-6x384": ("all-MiniLM-L6-v2 shape: BERT encoder, 6 blocks, width 384", 15.0),
    "gpt2-small": ("GPT-2-small shape: 12 blocks, width 768, 124M parameters", 30.0),
    "smollm2-135m": ("SmolLM2-135M shape: LLaMA, 30 blocks, width 576", 30.0),
}


def _model(name: str, transformers):
    torch.manual_seed(0)
    if name == "bert-6x384":
        return transformers.BertModel(transformers.BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536))
    if name == "smollm2-135m":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12,
                                                                n_positions=1024))


def floor_seconds(model, vocab: int, lm: bool) -> float:
    """Plain forward of 64 × 256 tokens (batches of 8) plus forward/backward of 16: no probes."""
    ids = torch.randint(0, vocab, (64, 256), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(16, 64, 8):
            getattr(model, "base_model", model)(input_ids=ids[s:s + 8])
    for s in range(0, 16, 8):
        out = model(input_ids=ids[s:s + 8], labels=ids[s:s + 8]) if lm else model(input_ids=ids[s:s + 8])
        (out.loss if lm else out.last_hidden_state.float().mean()).backward()
    return time.perf_counter() - t


def run(args: argparse.Namespace) -> None:
    try:
        import transformers
    except ImportError:
        raise ValueError("bench --diagnose needs transformers (pip install -e .[hf])") from None
    from analysis.diagnose.diagnosis import diagnose
    transformers.utils.logging.disable_progress_bar()

    for name, (what, target) in SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            model = _model(name, transformers)
            n = sum(p.numel() for p in model.parameters())
            model.save_pretrained(tmp)
            floor = floor_seconds(model.eval(), model.config.vocab_size, name != "bert-6x384")
            del model
            t = time.perf_counter()
            d = diagnose(tmp, sequences=64, seq_len=256, device=args.device)
            total = time.perf_counter() - t
        print(f"diagnose, {what} ({n / 1e6:.0f}M parameters): {total:.1f} s (load {d.meta['seconds_load']:.1f} s; "
              f"{d.meta['sequences_used']} of {d.meta['sequences']} sequences forward until converged, "
              f"{d.meta['grad_sequences']} backward, skip test on {d.meta['skip_sequences']}, re-initialized "
              f"on {d.meta['init_sequences']}); floor (plain forward of 64 + backward of 16) {floor:.1f} s: "
              f"×{total / floor:.2f}; {torch.get_num_threads()} threads on {args.device}; target ≤ {target:g} s")
