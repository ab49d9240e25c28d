"""Collapse diagnosis of any checkpoint: probes over N sequences, per-layer table, findings.

``diagnose(path, …)`` loads the checkpoint (``analysis.checkpoints``: never runs code from it),
cuts the text into N windows of T tokens, runs every window forward through the probed model
(``probes.Probe``) and the first ``grad_sequences`` of them backward with the model's own loss,
measures what each block adds (``analysis.diagnose.contribution``: relative contribution of its
branches, and the skip test on ``skip_sequences`` windows), and turns the per-layer statistics
into findings, each with its threshold (``THRESHOLDS``).

Loss for the backward pass: sigprop testbeds and Hugging Face causal LMs use their next-token
cross-entropy; masked LMs (BERT, RoBERTa) their masked-LM loss on a fixed 15 % of positions
(replaced by the mask token); a model without a head (``AutoModel``) uses a **surrogate**, a
random linear readout mean(⟨h_L, z⟩) of the last hidden state with z ~ N(0, 1) fixed by a seed:
its top gradient is white noise, as the init theory assumes, and it probes how gradients travel
back through the blocks but not what a real task loss would send. (mean(h_L²) would not do: a
final LayerNorm without affine makes it constant, so no gradient would flow.) Parameters are frozen during the diagnosis: gradients
are taken with respect to the stream only (cheaper; the gradient profile is the same).

What training changed: the same architecture, **re-initialized** by its own initializer (the
sigprop testbed's, or the Hugging Face family's ``_init_weights``), is measured on the first
``init_sequences`` windows beside the trained one (``init_*`` columns). The init theory
(``theory.solve.predict_profile``) is compared with that re-initialized model, where its
assumptions (Gaussian weights at init, a known placement) hold, never with the trained one.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from analysis.checkpoints import load
from analysis.infra.device import resolve_device
from analysis.diagnose import headroom, memory
from analysis.diagnose.contribution import branch_outputs, skip_test
from analysis.diagnose.findings import THRESHOLDS, Verdict, findings, verdict
from analysis.diagnose.measure import SKIP_POSITIONS, TOLERANCE, find_layout, measure, non_finite_weights
from analysis.diagnose.passes import Passes
from analysis.diagnose.report import GLOSSARY
from analysis.diagnose.table import INIT_COLUMNS, add_theory, final_is_norm, layer_table
from analysis.diagnose.text import text_bytes, token_windows, tokenizer_mismatch


@dataclass
class Diagnosis:
    """What ``diagnose`` found: per-layer table, findings, and everything needed to reproduce it."""

    table: pd.DataFrame
    findings: pd.DataFrame  # id, severity, layers, value, threshold, message
    meta: dict[str, Any]
    verdict: str  # the verdict line, e.g. 'COLLAPSED: token collapse'
    level: Verdict
    notes: list[str] = field(default_factory=list)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _max_rank(seq_len: int, width: int | None) -> int:
    """The largest effective rank the probe can report: min(sampled tokens, width)."""
    from probes.metrics import SAMPLE_TOKENS  # the token sample the probe's rank metrics take
    return min(seq_len, SAMPLE_TOKENS, width or seq_len)


def diagnose(path: str, *, text: str | None = None, sequences: int = 64, seq_len: int = 256,
             grad_sequences: int = 16, batch: int = 8, blocks: str | None = None,
             config: str | None = None, tokenizer: str | None = None, skip_sequences: int = 4,
             skip_positions: int = SKIP_POSITIONS, init_sequences: int = 8, tolerance: float = TOLERANCE,
             dtype: str = "float32", device: str = "cpu",
             log: Callable[[str], None] | None = None) -> Diagnosis:
    """Load ``path`` and diagnose it (see the module docstring); ValueError on unusable input."""
    if not (0 <= tolerance < 1) or not math.isfinite(tolerance):
        raise ValueError(f"--tolerance must be in [0, 1), got {tolerance}")
    if sequences < 1 or seq_len < 2 or batch < 1 or min(grad_sequences, skip_sequences, init_sequences,
                                                          skip_positions) < 0:
        raise ValueError(f"--sequences ({sequences}) and --batch ({batch}) must be >= 1, --seq-len "
                         f"({seq_len}) >= 2, --grad-sequences ({grad_sequences}), --skip-sequences "
                         f"({skip_sequences}), --skip-positions ({skip_positions}) and --init-sequences "
                         f"({init_sequences}) >= 0")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    t0 = time.perf_counter()
    clock = Stopwatch()
    say = (lambda m: log(f"[{time.perf_counter() - t0:5.1f} s] {m}")) if log else (lambda m: None)
    dev = resolve_device(device)
    say(f"loading {path}")
    need = memory.estimate_before_loading(path, dtype, batch, seq_len)
    memory.check(need, dev)  # before minutes of loading
    loaded = load(path, config, tokenizer, DTYPES[dtype])
    notes = list(loaded.notes)
    if dtype != "float32":
        notes.append(f"weights and activations in {dtype} (--dtype): half the memory, and every "
                     f"statistic carries {dtype}'s rounding (relative resolution "
                     f"{headroom.FORMATS[dtype].resolution:.2g}) on top of the weights' own")
    clock.lap("load")
    if loaded.max_len is not None and seq_len > loaded.max_len:
        notes.append(f"--seq-len {seq_len} cut to the model's maximum {loaded.max_len}")
        seq_len = loaded.max_len
    raw, source = text_bytes(text, max(sequences * (seq_len + 1) * 8, 1 << 16))  # read once
    windows, text_how = token_windows(loaded, raw, source, sequences, seq_len)
    if text is None:
        mismatch = tokenizer_mismatch(loaded, raw[:4000].decode("utf-8", errors="replace"))
        if mismatch:
            notes.append(mismatch)
    bad_weights = non_finite_weights(loaded.model)
    parameters = sum(p.numel() for p in loaded.model.parameters())
    native = headroom.native_format(loaded.model)
    model = loaded.model.to(dev, DTYPES[dtype])
    grad_n = min(grad_sequences, sequences)
    failures = (RuntimeError, IndexError, TypeError, KeyError, AttributeError, MemoryError)
    try:
        layout = find_layout(loaded, model, windows, blocks, dev)
        branches, branch_how = branch_outputs(model, layout)
        final_norm = final_is_norm(layout, model)
        shape = memory.shape_of(model, layout.blocks, int(loaded.theory_shape.get("width") or 0), loaded.vocab_size)
        if need is None:  # a sigprop checkpoint: its shape is known once loaded
            need = memory.need(shape, dtype, batch, seq_len, gguf=False)
            memory.check(need, dev)
        grad_batch = memory.backward_batch(shape, seq_len, dtype, batch)
        passes = Passes.of(loaded, model, windows[:1, :-1].to(dev))
        if passes.note:
            notes.append(passes.note)
        clock.lap("load")
        say(f"probing {len(layout.blocks)} blocks: {sequences} × {seq_len} tokens forward, {grad_n} backward")
        frame, contrib, losses, used, grad_used = measure(passes, layout, branches, windows, grad_n, batch,
                                                          dev, tolerance, grad_batch)
        clock.lap("probe")
        if grad_used < grad_n:
            notes.append(f"backward passes stopped after {grad_used} of {grad_n} sequences: the gradient's "
                         f"second moment had a standard error within {tolerance:.0%} of its value at every point "
                         f"(its token cosine: or {tolerance / 5:.3g} absolute)")
        if used < len(windows):
            notes.append(f"sampling stopped after {used} of {len(windows)} sequences: every point's second "
                         f"moment, token cosine, effective rank and turn angle had a standard error within "
                         f"{tolerance:.0%} of its value (cosine and angle/π: or {tolerance / 5:.3g} "
                         "absolute); --tolerance 0 runs them all")
        skip = None
        if skip_sequences:
            skip = skip_test(model, layout, windows[:skip_sequences].to(dev),
                             functools.partial(passes.sequence_losses, positions=skip_positions), batch, say)
        clock.lap("skip")
        t = layer_table(frame, layout, contrib, skip, model)
        # the trained model is done: free it before the twin is built, so the two never coexist
        del model, passes
        loaded.model = None
        init_model, init_frame, init_contrib = None, None, None
        if init_sequences and loaded.rebuild is not None:
            say(f"re-initialized model: {min(init_sequences, sequences)} sequences")
            init_model = loaded.rebuild().to(dev, DTYPES[dtype])
            init_batch = max(1, min(batch, init_sequences // 4))  # ≥ 4 batches: a standard error
            init_frame, init_contrib, *_ = measure(Passes.of(loaded, init_model, windows[:1, :-1].to(dev)),
                                                     layout, branches,
                                                     windows[:init_sequences],
                                                     min(grad_n, max(1, init_sequences // 2)), init_batch, dev,
                                                     grad_batch=min(init_batch, grad_batch))
        clock.lap("init")
    except failures as e:
        first = (str(e).splitlines() or [""])[0][:300]
        raise ValueError(f"the model did not run on the text ({type(e).__name__}: {first})") from None
    say("findings")
    if init_frame is not None:
        ti = layer_table(init_frame, layout, init_contrib, None, init_model)
        for c in INIT_COLUMNS:
            if c in ti:
                t[f"init_{c}"] = ti[c].to_numpy()
    elif loaded.rebuild is None:
        notes.append("no re-initialized comparison: this checkpoint kind cannot be rebuilt")
    headroom.add_columns(t)
    scheme = add_theory(t, loaded, layout, init_model, seq_len, notes)
    found = findings(t, bad_weights, losses, layout, loaded, scheme, final_norm,
                     native or (dtype if dtype != "float32" else None))
    clock.lap("findings")
    meta = dict(path=str(path), kind=loaded.kind, model=loaded.description, loss=loaded.loss_kind,
                loss_value=float(np.mean(losses)) if losses else None,
                text=text_how, sequences=sequences, sequences_used=used, tolerance=tolerance,
                seq_len=seq_len, grad_sequences=grad_n, grad_sequences_used=grad_used,
                skip_sequences=min(skip_sequences, sequences), skip_positions=skip_positions,
                init_sequences=min(init_sequences, sequences) if init_model is not None else 0,
                grad_batch=grad_batch, device=str(dev), dtype=dtype, native_format=native, encoder=loaded.encoder,
                blocks=len(layout.blocks), block_paths=[layout.blocks[0], layout.blocks[-1]],
                branches=branch_how, placement=layout.placement, layout=layout.describe(),
                stream_readers=headroom.raw_readers(layout, final_norm),
                theory_scheme=scheme, parameters=parameters,
                max_effective_rank=_max_rank(seq_len, loaded.theory_shape.get("width")),
                thresholds={k: {"value": v, "meaning": m} for k, (v, m) in THRESHOLDS.items()},
                glossary=GLOSSARY, seconds=clock.laps(), memory_estimate_gb=round(need.total / 1e9, 3),
                seconds_load=round(clock.total("load"), 2), seconds_total=round(time.perf_counter() - t0, 2))
    fdf = pd.DataFrame(found, columns=["id", "severity", "layers", "value", "threshold", "message"])
    level, line = verdict(found)
    return Diagnosis(table=t, findings=fdf, meta=meta, verdict=line, level=level, notes=notes)


class Stopwatch:
    """Seconds spent per stage (load, probe, skip, init, findings), summed over its laps."""

    def __init__(self) -> None:
        self._last, self._spent = time.perf_counter(), {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self._spent[stage] = self._spent.get(stage, 0.0) + now - self._last
        self._last = now

    def total(self, stage: str) -> float:
        return self._spent.get(stage, 0.0)

    def laps(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self._spent.items()}
