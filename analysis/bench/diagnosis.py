"""Speed and memory of ``diagnose``, each figure beside its floor.

Shapes (built from configs with random weights, saved as Hugging Face folders; nothing is
downloaded): the all-MiniLM-L6-v2 shape (BERT, 6 blocks, width 384), the SmolLM2-135M shape
(LLaMA, 30 blocks, width 576), and a model whose LM head costs more than its blocks (LLaMA, 16
blocks, width 512, vocabulary 256 000). ``--diagnose-path`` adds real checkpoints (a released
GGUF). Each is diagnosed with the command's defaults in a process of its own, so that its peak
resident memory is its own.

The **floor** is the plain work the statistics need, timed in the same process with no hooks:
- forward: the trunk (embedding, blocks, final norm; no LM head) over the sequences the
  diagnosis used;
- backward: the loss (the head in chunks of positions) and its backward to the stream, over the
  backward sequences;
- skip test: one trunk pass over the skip sequences for the unskipped baseline, (L − 1)/2 more
  for the blocks after each skipped one (on average), and the head on the sampled positions L + 1
  times: timed as one trunk pass and one head pass, then scaled (an estimate, said so);
- re-initialized twin: building it, and its forward and backward passes.
Loading has a floor of its own: the library's own reading of the file (safetensors ``load_file``,
or gguf's reader and dequantizer over every tensor).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import torch

from analysis.infra.device import synchronize

SHAPES = {
    "bert-6x384": "all-MiniLM-L6-v2 shape: BERT encoder, 6 blocks, width 384",
    "smollm2-135m": "SmolLM2-135M shape: LLaMA, 30 blocks, width 576, vocabulary 49 152",
    "head-heavy": "LM head over blocks: LLaMA, 16 blocks, width 512, vocabulary 256 000",
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
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=512, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8,
        intermediate_size=1536, vocab_size=256_000, max_position_embeddings=4096, tie_word_embeddings=False))


def _timed(fn, device: torch.device = torch.device("cpu")) -> float:
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def load_floor(path: str) -> float:
    """The library's own reading of the weights (no model built)."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        import gguf

        def read():
            reader = gguf.GGUFReader(str(p))
            for t in reader.tensors:
                gguf.dequantize(t.data, t.tensor_type)
        return _timed(read)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    if files:
        from safetensors.torch import load_file
        return _timed(lambda: [load_file(str(f)) for f in files])
    return float("nan")


def compute_floor(path: str, meta: dict) -> dict[str, float]:
    """Seconds of the plain passes the diagnosis's statistics need (module docstring)."""
    from analysis.checkpoints import load
    from analysis.diagnose.diagnosis import DTYPES
    from analysis.diagnose.measure import grad_on_stream
    from analysis.diagnose.passes import Passes
    from analysis.diagnose.text import text_bytes, token_windows
    from probes import locate
    # the floor runs where the diagnosis ran, in its dtype: a CUDA diagnosis against a CPU floor
    # would compare two machines
    dev, dtype = torch.device(meta["device"]), DTYPES[meta["dtype"]]
    loaded = load(path)
    n, T, batch = meta["sequences"], meta["seq_len"], 8
    raw, source = text_bytes(None, max(n * (T + 1) * 8, 1 << 16))
    windows, _ = token_windows(loaded, raw, source, n, T)
    windows = windows.to(dev)
    model = loaded.model.to(dev, dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    passes = Passes.of(loaded, model, windows[:1, :-1])
    block0 = locate(model).blocks[0]
    L = meta["blocks"]

    def forward(ps: Passes, w: torch.Tensor) -> None:
        with torch.no_grad():
            for s in range(0, len(w), batch):
                ps.stream(w[s:s + batch])

    def backward(ps: Passes, m, w: torch.Tensor, b: int) -> None:
        hook = grad_on_stream(m.get_submodule(block0))
        gen = torch.Generator().manual_seed(0)
        for s in range(0, len(w), b):
            ps.loss_backward(w[s:s + b], gen)
        hook.remove()

    g = meta["grad_sequences_used"]
    out = {"forward": _timed(lambda: forward(passes, windows[g:meta["sequences_used"]]), dev),
           "backward": _timed(lambda: backward(passes, model, windows[:g], meta["grad_batch"]), dev)}
    skip = windows[:meta["skip_sequences"]]
    if len(skip):
        with torch.no_grad():
            trunk = _timed(lambda: forward(passes, skip), dev)
            both = _timed(lambda: [passes.sequence_losses(skip[s:s + batch], meta["skip_positions"])
                                   for s in range(0, len(skip), batch)], dev)
        head = max(both - trunk, 0.0)
        out["skip"] = trunk * (1 + (L - 1) / 2) + head * (L + 1)
    if meta["init_sequences"] and loaded.rebuild is not None:
        del passes, model
        loaded.model = None
        k = meta["init_sequences"]
        t = time.perf_counter()
        twin = loaded.rebuild().to(dev, dtype)
        for p in twin.parameters():
            p.requires_grad_(False)
        tp = Passes.of(loaded, twin)
        forward(tp, windows[:k])
        backward(tp, twin, windows[:min(meta["grad_sequences"], max(1, k // 2))], max(1, min(batch, k // 4)))
        synchronize(dev)
        out["init"] = time.perf_counter() - t
    return out


def _case(path: str, device: str) -> dict:
    """One diagnosis in a process of its own: its stages, peak memory, and floors."""
    from analysis.diagnose.diagnosis import diagnose
    t = time.perf_counter()
    d = diagnose(path, device=device)
    total = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = torch.cuda.max_memory_allocated() if torch.device(d.meta["device"]).type == "cuda" else None
    return dict(total=total, peak=peak, gpu_peak=gpu, meta=d.meta, floor=compute_floor(path, d.meta), load_floor=load_floor(path))


def measure(path: str, device: str) -> dict:
    """``_case`` in a spawned process (its peak resident memory is then its own; errors come back)."""
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_case, path, device).result()


def report(what: str, r: dict) -> str:
    """One bench line: the diagnosis's stages beside their floors, and its peak memory."""
    m, f = r["meta"], r["floor"]
    s = m["seconds"]
    measured = s.get("probe", 0) + s.get("skip", 0) + s.get("init", 0)
    floor = sum(f.values())
    weights = m["parameters"] * (2 if m.get("dtype") == "bfloat16" else 4)
    parts = ", ".join(f"{k} {s.get(k, 0):.1f} s (floor {f[k]:.1f})" for k in ("skip", "init") if k in f)
    gpu = "" if r.get("gpu_peak") is None else f", GPU peak {r['gpu_peak'] / 1e9:.2f} GB"
    return (f"diagnose, {what} ({m['parameters'] / 1e6:.0f}M parameters, {m['blocks']} blocks): {r['total']:.1f} s — "
            f"load {s.get('load', 0):.1f} s (library floor {r['load_floor']:.1f} s); measuring {measured:.1f} s against "
            f"a floor of {floor:.1f} s, ×{measured / floor:.2f} (probe {s.get('probe', 0):.1f} s, floor "
            f"{f['forward'] + f['backward']:.1f}; {parts}); {m['sequences_used']} of {m['sequences']} sequences "
            f"forward, {m['grad_sequences_used']} of {m['grad_sequences']} backward; peak memory {r['peak'] / 1e9:.2f} GB (estimate "
            f"{m['memory_estimate_gb']:.2f} GB; float32 weights {weights / 1e9:.2f} GB, target ≤ 1.5 × weights "
            f"+ 2 GB = {(1.5 * weights + 2e9) / 1e9:.2f} GB){gpu}; {torch.get_num_threads()} threads on {m['device']}")


def run(args: argparse.Namespace) -> None:
    try:
        import transformers
    except ImportError:
        raise ValueError("bench --diagnose needs transformers (pip install -e .[hf])") from None
    transformers.utils.logging.disable_progress_bar()
    for path in getattr(args, "diagnose_path", None) or []:
        if not Path(path).exists():
            raise ValueError(f"--diagnose-path {path} does not exist")
        print(report(Path(path).name, measure(path, args.device)), flush=True)
    for name, what in SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            model = _model(name, transformers)
            model.save_pretrained(tmp)
            del model
            print(report(what, measure(tmp, args.device)), flush=True)
