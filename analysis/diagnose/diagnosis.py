"""Collapse diagnosis of any checkpoint: probes over N sequences, per-layer table, findings.

``diagnose(path, …)`` loads the checkpoint (``analysis.diagnose.loading``: never runs code from it),
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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from analysis import progress
from analysis.device import resolve_device
from analysis.diagnose.contribution import ContributionMeter, branch_outputs, skip_test
from analysis.diagnose.loading import Loaded, load
from analysis.diagnose.outliers import PeakMeter
from analysis.diagnose import headroom, memory
from analysis.diagnose.passes import Passes
from probes import Probe, confirm_placement, locate

# Every threshold a finding uses, with what it means (also written to diagnosis.json). The
# redundancy thresholds were calibrated on trained models (README "Diagnose: calibration").
THRESHOLDS: dict[str, tuple[float, str]] = {
    "collapse_cosine": (0.99, "mean cosine between distinct tokens of a sequence at or above which "
                              "the tokens are treated as (nearly) one vector: rank collapse"),
    "aligned_cosine": (0.9, "token cosine at or above which tokens are strongly aligned: partial "
                            "collapse, or a shared offset direction (anisotropy) common in trained models"),
    "redundant_contribution": (0.02, "relative contribution (median token's ‖branch outputs‖/‖block "
                                     "input‖) below which a block's branches add little next to the stream "
                                     "(an info finding: a grown stream makes any branch look small; only the "
                                     "skip test calls a block redundant)"),
    "redundant_skip": (0.01, "relative change of the head input when the block is skipped below "
                             "which removing the block changes the model's output little (Gromov "
                             "et al. 2024): a redundant block"),
    "stream_growth": (1e4, "growth of the median token's second moment from block 0's output to the "
                           "last block's above which the stream has grown a lot: a warning where a branch "
                           "or the head reads it without a norm, or it overflows the checkpoint's float16; "
                           "an info finding where every reader normalizes it"),
    "massive_ratio": (100.0, "largest |activation| over the median token's RMS at or above which a block "
                             "output carries massive activations (Sun et al. 2024: ~10³ in trained LLMs)"),
    "grad_vanish": (1e-3, "g_0/g_L (gradient second moment at the embedding over the last block) "
                          "below which gradients vanish on the way back, if the scale-free ratio agrees"),
    "grad_explode": (1e3, "g_0/g_L above which gradients explode on the way back, if the scale-free "
                          "ratio (gradient RMS × stream RMS) agrees"),
}
SPREAD_METRICS = ("second_moment", "token_cosine", "effective_rank")
METRICS = ("second_moment", "median_token_second_moment", "first_token_second_moment", "variance", "max_abs",
           "massive_ratio", "token_cosine", "dong_residual", "effective_rank", "effective_rank_normalized",
           "layer_cosine", "angular_distance", "grad_second_moment", "grad_token_cosine")
# What every column of the per-layer table means (report glossary, diagnosis.json).
GLOSSARY: dict[str, str] = {
    "layer": "−1 the embedding (input of block 0), i the output of block i, L the head input after a final norm",
    "point": "the probe point's stable name (embed, blocks.{i}.resid_post, final)",
    "module": "the module whose output the row measures",
    "variance": "per-token variance over coordinates, averaged (E[x²] minus the squared token mean)",
    "pre_norm_second_moment": "E[x²] of the sum entering a block's output norm (post-norm blocks only)",
    "second_moment": "E[x²] of the stream over tokens and coordinates",
    "growth": "second_moment over the previous row's: how much this block scales the stream",
    "q_rel": "second_moment over the embedding's",
    "median_token_second_moment": "the median token's ‖x_t‖²/d: the stream's size robust to a few massive tokens",
    "q_rel_median": "median_token_second_moment over the embedding's (the robust stream growth)",
    "first_token_second_moment": "the first token's ‖x_0‖²/d (the attention-sink position), kept apart",
    "massive_ratio": "largest |x_ti| over the median token's RMS (≥ 100: massive activations)",
    "peak_abs": "largest |x_ti| at the block's output over the sequences",
    "peak_ratio": "the same over the median token's RMS (largest over batches)",
    "peak_token": "token position of the largest activation (commonest over batches)",
    "peak_coordinate": "its coordinate (commonest over batches)",
    "peak_share": "share of batches whose largest activation sits at that (token, coordinate)",
    "effective_rank_normalized": "effective rank of the tokens scaled to unit norm: one massive "
                                 "token counts as one direction, not as the whole spectrum",
    "token_cosine": "mean cosine between distinct tokens of a sequence (1: all tokens one vector)",
    "dong_residual": "‖X − mean token‖/‖X‖ per sequence (Dong et al. 2021); 0 at rank collapse",
    "effective_rank": "exp(entropy of the normalised singular values) of a sequence's [T, d] "
                      "matrix (Roy & Vetterli 2007); at most min(T, d) of the sampled tokens",
    "angle_deg": "mean angle between a token's stream vector before and after the block",
    "branch_rel": "relative contribution: ‖attention out‖⊕‖FFN out‖ over ‖block input‖ per token "
                  "(before any output norm, ⊕ the root of the sum of squares), mean over tokens",
    "branch_rel_median": "the same for the median token (one outlier token cannot move it)",
    "skip_out_change": "‖h' − h‖/‖h‖ of the head input h when this block is replaced by the identity",
    "skip_loss_delta": "loss change in nats when this block is skipped (NaN with the surrogate loss)",
    "grad_rel": "gradient second moment over the last block's (g_l/g_L)",
    "grad_scale_free": "‖∂L/∂x_l‖·‖x_l‖ (gradient RMS × median token's RMS) over the last block's: "
                       "the gradient profile with the stream's scale taken out",
    "grad_second_moment": "E[(∂loss/∂x)²] at this point (scales with the loss's reduction: compare ratios)",
    "grad_token_cosine": "token cosine of the gradient ∂loss/∂x",
    "max_abs": "largest |x| at this point",
    "precision_headroom": "relative contribution over bfloat16's rounding step 2⁻⁸: how many rounding steps of "
                          "the stream the block's update spans (below 1: stored in bfloat16, most of it is "
                          "rounded away)",
    "fp16_range_headroom": "float16's largest value (65 504) over the block output's largest |x|: below 1, "
                           "the stream overflows float16",
    "init_*": "the same quantity in the same architecture re-initialized (what training changed)",
    "theory_*": "the init theory for the re-initialized model (theory.solve.predict_profile)",
    "*_se": "standard error of the column before it (over batches, or over sequences for skip_*)",
}


@dataclass
class Diagnosis:
    """What ``diagnose`` found: per-layer table, findings, and everything needed to reproduce it."""

    table: pd.DataFrame
    findings: pd.DataFrame  # id, severity, layers, value, threshold, message
    meta: dict[str, Any]
    verdict: str
    notes: list[str] = field(default_factory=list)


# --- text -------------------------------------------------------------------------------------

def text_bytes(text: str | None, need: int) -> tuple[bytes, str]:
    """The first ``need`` bytes of ``--text`` (or the default corpus's validation split) and where from."""
    if text is None:
        from analysis.testbed.corpus import load_corpus
        corpus = load_corpus()
        data = corpus.split("val")
        return bytes(data[:need]), f"default corpus ({corpus.source}), validation split"
    p = Path(text)
    if not p.is_file():
        raise ValueError(f"--text {p} is not a file")
    try:
        with p.open("rb") as f:
            return f.read(need), str(p)
    except OSError as e:
        raise ValueError(f"--text {p} is not readable ({e.strerror})") from None


ROUND_TRIP_LOSS = 0.02  # share of characters a tokenizer may change before the text counts as foreign


def tokenizer_mismatch(loaded: Loaded, sample: str) -> str | None:
    """Why ``sample`` (Python source) is foreign to the tokenizer, or None: what the round trip loses."""
    if loaded.encode is None or loaded.decode is None:
        return None
    sample = sample[:4000]
    back = loaded.decode(loaded.encode(sample))
    import difflib
    changed = 1.0 - difflib.SequenceMatcher(None, sample, back, autojunk=False).ratio()
    lost = []
    if "\n" in sample and "\n" not in back:
        lost.append("line breaks")
    if sample != sample.lower() and back == back.lower():
        lost.append("upper case")
    if changed <= ROUND_TRIP_LOSS and not lost:
        return None
    return (f"the default text is Python source, and this tokenizer does not keep it: a round trip "
            f"changes {changed:.0%} of the characters{' (loses ' + ', '.join(lost) + ')' if lost else ''}; "
            "it was made for natural language, so the model sees text unlike what it was trained on: "
            "pass --text FILE with text of the model's own domain")


def token_windows(loaded: Loaded, raw: bytes, source: str, n: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """``n`` windows of ``seq_len + 1`` token ids, evenly spaced over the text ``raw`` (deterministic)."""
    per = seq_len + 1
    if loaded.encode is not None:
        ids = loaded.encode(raw.decode("utf-8", errors="replace"))
        how = f"{source}, tokenized by {loaded.tokenizer}"
    else:
        ids = [b % loaded.vocab_size for b in raw]  # bytes, folded into the vocabulary
        how = f"{source}, bytes (mod vocabulary {loaded.vocab_size})"
    ids = torch.tensor(ids, dtype=torch.long)
    if len(ids) < per:
        raise ValueError(f"the text gives {len(ids)} tokens, fewer than one window of --seq-len + 1 = {per}")
    if len(ids) < n * per:
        how += f"; only {len(ids)} tokens for {n} windows of {per}: windows overlap"
    starts = torch.linspace(0, len(ids) - per, n).round().long()
    windows = ids[starts[:, None] + torch.arange(per)]
    if loaded.prefix_ids:  # trained with BOS/[CLS] first: an attention sink that behaves otherwise without it
        k = len(loaded.prefix_ids)
        windows[:, :k] = torch.tensor(loaded.prefix_ids)
        how += f"; each window starts with the tokenizer's own prefix {loaded.prefix_ids} (BOS / [CLS]), as in training"
    return windows.clamp_(0, loaded.vocab_size - 1), how


# --- running the model ------------------------------------------------------------------------

def _grad_on_stream(block: torch.nn.Module):
    """A pre-hook making block 0's input require grad, so frozen models still give stream gradients."""
    def hook(module, args, kwargs):
        if not torch.is_grad_enabled():
            return None
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            x = args[0] if args[0].requires_grad else args[0].detach().requires_grad_()
            return (x, *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            h = kwargs["hidden_states"]
            kwargs = dict(kwargs, hidden_states=h if h.requires_grad else h.detach().requires_grad_())
            return args, kwargs
        return None
    return block.register_forward_pre_hook(hook, with_kwargs=True)


def non_finite_weights(model: torch.nn.Module) -> list[tuple[str, int]]:
    """(name, count) of every parameter or buffer holding NaN or ±inf."""
    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append((name, n))
    return bad


def find_layout(loaded: Loaded, model, windows: torch.Tensor, blocks: str | None, device: torch.device):
    """The blocks and their placement, checked with one forward pass."""
    try:
        layout = locate(model, blocks=blocks)
    except ValueError as e:
        raise ValueError(f"{e} (command line: --blocks PATH)") from None
    check = windows[:2, :-1].to(device)
    try:
        return confirm_placement(model, layout, check) if loaded.scheme else \
            confirm_placement(model, layout, input_ids=check)
    except ValueError as e:
        raise ValueError(f"the blocks found do not look like residual blocks: {e}. Families tried: "
                         "sigprop testbed, BERT/RoBERTa/ELECTRA, DistilBERT, GPT-2, GPT-NeoX, "
                         "LLaMA/Mistral/Qwen2, then the longest uniform ModuleList; point at the "
                         "blocks with --blocks PATH (a ModuleList as named in model.named_modules())") from None


# Sampling stops early once every point's statistics are this precise: standard error over
# batches at most TOLERANCE of the value, or, for the bounded ones near 0 (cosine, angle / π),
# at most TOLERANCE / 5 absolute. Per-batch values vary with the text windows, so the error falls
# slowly: on all-MiniLM-L6-v2 and English text it is 2–4 % after 24 sequences and still 2–3 %
# after 64; the thresholds the findings use are far coarser than 5 %.
CONVERGED_METRICS = ("second_moment", "token_cosine", "effective_rank", "angular_distance")
# The backward passes stop the same way, on the gradient's second moment and token cosine at every
# point: the --grad-sequences are a ceiling, as --sequences is for the forward ones.
GRAD_CONVERGED_METRICS = ("grad_second_moment", "grad_token_cosine")
BOUNDED = ("token_cosine", "angular_distance", "grad_token_cosine")
TOLERANCE, MIN_BATCHES = 0.05, 3
# The skip test's loss is taken on this many positions per sequence (a sample of its own per
# sequence; the sample's spread is inside the standard error over sequences): the LM head, which
# may cost more than all the blocks, runs on a quarter of a 256-token window.
SKIP_POSITIONS = 64


def converged(frame: pd.DataFrame, tolerance: float, metrics: tuple[str, ...] = CONVERGED_METRICS) -> bool:
    """Whether every converge-checked statistic's standard error is within ``tolerance`` (see above)."""
    f = frame[frame["metric"].isin(metrics)]
    if not len(f) or f["count"].min() < MIN_BATCHES:
        return False
    ok = (f["spread"] <= tolerance * f["mean"].abs()) | (
        f["metric"].isin(BOUNDED) & (f["spread"] <= tolerance / 5))
    return bool(ok.all())


def measure(passes: Passes, layout, branches: list[list[str]], windows: torch.Tensor,
            grad_n: int, batch: int, device: torch.device, tolerance: float = 0.0, grad_batch: int | None = None
            ) -> tuple[pd.DataFrame, pd.DataFrame, list[float], int]:
    """(probe frame, contribution frame, losses, windows used): the first ``grad_n`` windows forward
    and backward, then forward only until every statistic has converged (``tolerance`` > 0) or the
    windows run out."""
    model = passes.model
    for p in model.parameters():
        p.requires_grad_(False)  # gradients with respect to the stream only
    gen = torch.Generator().manual_seed(0)
    losses: list[float] = []
    metrics = [m for m in METRICS if grad_n or not m.startswith("grad_")]
    handle = _grad_on_stream(model.get_submodule(layout.blocks[0]))
    used, grad_used, grad_done = 0, 0, False
    try:
        # the rank metrics' eigensolves on forward-only passes alone, where there will be some
        with Probe(model, metrics=metrics, layout=layout, sampled_without_grad_only=len(windows) > grad_n) as probe, \
                ContributionMeter(model, layout, branches) as meter, PeakMeter(model, layout) as peaks:
            bar = progress.bar(len(windows), "probing", unit="seq", leave=False)
            for s in range(0, len(windows), batch):
                w = windows[s:s + batch].to(device)
                step = grad_batch or len(w)  # micro-batches: the activations autograd keeps stay bounded
                for m in range(0, len(w), step):
                    part = w[m:m + step]
                    if s + m < grad_n and not grad_done:
                        losses.append(passes.loss_backward(part, gen))
                        grad_used += len(part)
                        grad_done = tolerance > 0 and converged(probe.frame(), tolerance, GRAD_CONVERGED_METRICS)
                    else:
                        with torch.no_grad():
                            passes.stream(part)
                used = s + len(w)
                bar.update(len(w))
                if tolerance > 0 and used >= grad_n and used < len(windows) and converged(probe.frame(), tolerance):
                    break
            bar.close()
        per_block, peak = meter.frame(), peaks.frame()
        if len(peak):
            per_block = per_block.merge(peak, on="layer", how="left")
        return probe.frame(), per_block, losses, used, grad_used
    finally:
        handle.remove()


# --- per-layer table --------------------------------------------------------------------------

def layer_table(frame: pd.DataFrame, layout, contrib: pd.DataFrame | None = None,
                skip: pd.DataFrame | None = None, model=None) -> pd.DataFrame:
    """One row per stream point (embed, each block's output, the final norm if any): the diagnosis metrics."""
    wide = frame.pivot_table(index="point", columns="metric", values="mean", aggfunc="first")
    se = frame.pivot_table(index="point", columns="metric", values="spread", aggfunc="first")
    L = len(layout.blocks)
    rows = []
    for layer, point, module in ([(-1, "embed", "embedding")] +
                                 [(i, f"blocks.{i}.resid_post", layout.blocks[i]) for i in range(L)] +
                                 ([(L, "final", layout.final)] if final_is_norm(layout, model) else [])):
        r = wide.loc[point] if point in wide.index else pd.Series(dtype=float)
        row = {"layer": layer, "point": point, "module": module}
        for m in METRICS:
            row[m] = float(r.get(m, math.nan))
        for m in SPREAD_METRICS:  # standard error over batches, to compare against
            row[f"{m}_se"] = float(se.loc[point].get(m, math.nan)) if point in se.index else math.nan
        pre = f"blocks.{layer}.pre_norm_sum"
        row["pre_norm_second_moment"] = float(wide.loc[pre, "second_moment"]) if pre in wide.index else math.nan
        rows.append(row)
    t = pd.DataFrame(rows)
    t["angle_deg"] = t["angular_distance"] * 180.0
    q = t["second_moment"].to_numpy()
    t["growth"] = np.r_[math.nan, q[1:] / np.where(q[:-1] == 0, math.nan, q[:-1])]
    t.loc[t.point == "final", "growth"] = math.nan
    q0 = q[0] if q[0] else math.nan
    t["q_rel"] = q / q0
    qm = t["median_token_second_moment"].to_numpy()
    t["q_rel_median"] = qm / (qm[0] if qm[0] else math.nan)
    g = t["grad_second_moment"].to_numpy()
    g_last = g[L] if L >= 1 and g[L] else math.nan  # the last block's output (theory's l = L)
    t["grad_rel"] = g / g_last
    scale_free = np.sqrt(g * qm)
    t["grad_scale_free"] = scale_free / (scale_free[L] if L >= 1 and scale_free[L] else math.nan)
    t = t.drop(columns=["angular_distance", "layer_cosine"])
    for extra in (contrib, skip):
        if extra is not None and len(extra):
            t = t.merge(extra, on="layer", how="left")
    return t


def final_is_norm(layout, model: torch.nn.Module | None) -> bool:
    """Whether the head reads the stream through a final norm (not absent, not an Identity)."""
    return layout.final is not None and not (
        model is not None and isinstance(model.get_submodule(layout.final), torch.nn.Identity))


INIT_COLUMNS = ("q_rel", "q_rel_median", "token_cosine", "token_cosine_se", "effective_rank",
                "effective_rank_normalized", "angle_deg", "grad_rel", "grad_scale_free", "branch_rel_median",
                "grad_token_cosine", "second_moment")


def weight_scale(model: torch.nn.Module, block_paths: tuple[str, ...]) -> float:
    """σ such that the blocks' weight matrices look like N(0, σ²/fan_in): median of std·√fan_in.

    Used to put a re-initialized foreign model on the theory's scale (GPT-2 and BERT initialize
    with std 0.02, not 1/√fan_in). Linear weights are [out, in]; GPT-2's Conv1D stores [in, out].
    """
    vals = []
    for path in block_paths:
        for mod in model.get_submodule(path).modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2 and w.numel() > 1 and w.is_floating_point():
                fan_in = w.shape[0] if type(mod).__name__ == "Conv1D" else w.shape[1]
                std = float(w.detach().float().std())
                if math.isfinite(std) and std > 0:
                    vals.append(std * math.sqrt(fan_in))
    return float(np.median(vals)) if vals else 1.0


def add_theory(t: pd.DataFrame, loaded: Loaded, layout, init_model, seq_len: int,
               notes: list[str]) -> str | None:
    """theory_* columns: the init theory for the re-initialized model, fed its measured embedding."""
    scheme = loaded.scheme or (layout.placement if layout.placement in ("pre", "post", "peri") else None)
    for c in ("theory_q_rel", "theory_token_cosine", "theory_angle_deg", "theory_grad_rel",
              "theory_grad_scale_free"):
        t[c] = math.nan
    if init_model is None:
        notes.append("no theory comparison: it needs the re-initialized model (--init-sequences > 0)")
        return None
    if scheme is None:
        notes.append(f"no theory comparison: placement '{layout.placement}' has no single scheme")
        return None
    shape = dict(loaded.theory_shape)
    if loaded.scheme is None:  # a foreign family's initializer: put the theory on its scale
        shape["sigma"] = weight_scale(init_model, layout.blocks)
        notes.append(f"theory for the re-initialized foreign model uses σ = {shape['sigma']:.3g}, the "
                     "median std·√fan_in of its block weights (the theory's weights are N(0, σ²/fan_in); "
                     "the family's initializer may give each matrix its own σ, and biases and "
                     "embedding norms are outside the theory)")
    L = len(layout.blocks)
    q0, rho0 = t.iloc[0].init_second_moment, t.iloc[0].init_token_cosine
    if not all(np.isfinite([q0, rho0])) or not shape.get("width") or not shape.get("heads"):
        notes.append("no theory comparison: the embedding statistics or the width/heads are unknown")
        return None
    if shape.get("parametrization", "standard") != "standard":  # µP scales the logits otherwise
        notes.append(f"no theory comparison: the init theory covers the standard parametrization, "
                     f"this model is {shape['parametrization']} (attention logits × 1/d_head)")
        return None
    rho_g = t.iloc[L].init_grad_token_cosine
    if not np.isfinite(rho_g):
        notes.append("the theory's gradient profile assumes ρ_g = 0 at the top: no backward pass "
                     "measured the gradient's token cosine (--grad-sequences 0)")
    rho_g = float(rho_g) if np.isfinite(rho_g) else 0.0
    try:
        import dataclasses

        from theory.shape import Shape
        from theory.solve import predict_profile
        known = {f.name for f in dataclasses.fields(Shape)} | {"scheme_params"}
        if "attention" in shape and "attention" not in known:
            notes.append("theory uses causal attention: this theory has no bidirectional attention")
        keep = {k: v for k, v in shape.items() if k in known}
        pred = predict_profile(scheme, depth=L, seq_len=seq_len, q0=float(q0),
                               rho0=float(np.clip(rho0, 0.0, 1.0)), rho_g=rho_g, **keep)
    except Exception as e:  # theory is context: never let it stop a diagnosis
        notes.append(f"no theory comparison: {type(e).__name__}: {str(e)[:120]}")
        return None
    idx = np.arange(L + 1)  # table rows 0..L are embed (l = 0) and blocks (l = 1..L)
    t.loc[idx, "theory_q_rel"] = pred["q"] / pred["q"][0]
    t.loc[idx, "theory_token_cosine"] = pred["rho"]
    t.loc[idx, "theory_angle_deg"] = np.degrees(np.arccos(np.clip(pred["cos"], -1, 1)))
    t.loc[idx, "theory_grad_rel"] = pred["g"]
    free = np.sqrt(np.asarray(pred["g"]) * np.asarray(pred["q"]))  # the scale-free form, as measured
    t.loc[idx, "theory_grad_scale_free"] = free / free[L]
    return scheme


# --- findings ---------------------------------------------------------------------------------

def _span(layers: list[int]) -> str:
    """'blocks 3–5, 8' from sorted block indices."""
    if not layers:
        return ""
    parts, start, prev = [], layers[0], layers[0]
    for v in layers[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}" if start == prev else f"{start}–{prev}")
        if v is not None:
            start = prev = v
    return ("block " if len(layers) == 1 else "blocks ") + ", ".join(parts)


def _fmt(v: float, spec: str = ".3g") -> str:
    return format(v, spec) if np.isfinite(v) else "n/a"


def findings(t: pd.DataFrame, bad_weights: list[tuple[str, int]], losses: list[float],
             layout, loaded: Loaded, theory_scheme: str | None, final_norm: bool = True,
             native: str | None = None) -> list[dict[str, Any]]:
    """Findings with severity (critical / warning / info), threshold and a plain-words message."""
    out: list[dict[str, Any]] = []

    def add(fid, severity, message, layers="", value=math.nan, threshold=math.nan):
        out.append(dict(id=fid, severity=severity, layers=layers, value=value, threshold=threshold,
                        message=message))

    L = len(layout.blocks)
    blocks = t[(t.layer >= 0) & (t.layer < L)]
    has_init = "init_q_rel" in t and t["init_q_rel"].notna().any()
    if bad_weights:
        total = sum(n for _, n in bad_weights)
        add("non_finite_weights", "critical",
            f"{total} weight value(s) are NaN or inf, in {len(bad_weights)} tensor(s) (first: "
            f"{bad_weights[0][0]}): the checkpoint is damaged and its outputs are meaningless",
            value=float(total), threshold=0.0)
    bad = [int(r.layer) for r in t.itertuples() if not np.isfinite(r.second_moment)]
    if bad:
        where = "the embedding" if bad[0] < 0 else f"block {bad[0]}"
        add("non_finite_activations", "critical",
            f"activations are NaN or inf from {where} on: every statistic after it is undefined",
            layers=str(bad[0]), value=float(len(bad)), threshold=0.0)
    if losses and not all(np.isfinite(losses)):
        add("non_finite_loss", "critical", "the loss is NaN or inf: no usable gradient profile")

    thr_c, thr_a = THRESHOLDS["collapse_cosine"][0], THRESHOLDS["aligned_cosine"][0]
    last = blocks.iloc[-1] if len(blocks) else None
    if last is not None and np.isfinite(last.token_cosine):
        rho = float(last.token_cosine)
        er = (f"; effective rank of unit-norm tokens {last.effective_rank_normalized:.1f}"
              if np.isfinite(last.effective_rank_normalized) else "")
        at_init = (f"; the re-initialized model gives {last.init_token_cosine:.3f}"
                   if has_init and np.isfinite(last.init_token_cosine) else "")
        if rho >= thr_c:
            first = int(blocks.loc[blocks.token_cosine >= thr_c, "layer"].min())
            add("rank_collapse", "critical",
                f"token cosine {rho:.3f} at the last block (≥ {thr_c}){er}{at_init}: rank collapse — "
                f"the tokens of a sequence have become (nearly) the same vector, from block {first} on",
                layers=f"{first}-{L - 1}", value=rho, threshold=thr_c)
        elif rho >= thr_a:
            dong = f", Dong residual {last.dong_residual:.2f}" if np.isfinite(last.dong_residual) else ""
            add("tokens_aligned", "warning",
                f"token cosine {rho:.3f} at the last block (≥ {thr_a}){er}{dong}{at_init}: tokens "
                "strongly aligned — partial rank collapse, or a shared direction (anisotropy) that "
                "trained models often have; not full collapse", value=rho, threshold=thr_a)
    _redundancy_findings(blocks, L, add)
    _growth_findings(blocks, L, has_init, lambda: headroom.raw_readers(layout, final_norm), native, add)
    _precision_findings(blocks, L, native, add)
    g0, gL = t.iloc[0].grad_second_moment, t.iloc[L].grad_second_moment if L else math.nan
    if np.isfinite(g0) and np.isfinite(gL) and gL > 0:
        ratio, free = float(g0 / gL), float(t.iloc[0].grad_scale_free)
        lo, hi = THRESHOLDS["grad_vanish"][0], THRESHOLDS["grad_explode"][0]
        init = (f"; {t.iloc[0].init_grad_rel:.3g} in the re-initialized model"
                if has_init and np.isfinite(t.iloc[0].init_grad_rel) else "")
        scale = f"scale-free (gradient RMS × stream RMS) {_fmt(free)}"
        # a raw ratio alone can be the stream's scale (a growing stream has small gradients): the
        # scale-free ratio must agree before it reads as a training failure
        if ratio < lo and not free >= lo:
            add("gradients_vanish", "warning",
                f"g_0/g_L = {ratio:.3g} (< {lo:g}), {scale}{init}: gradients shrink on the way back to "
                "the embedding; early blocks learn slowly" if ratio > 0 else
                f"g_0/g_L = 0 (< {lo:g}): no gradient reaches the embedding at all — some block "
                "cuts the backward path", value=ratio, threshold=lo)
        elif ratio > hi and not free <= hi:
            add("gradients_explode", "warning",
                f"g_0/g_L = {ratio:.3g} (> {hi:g}), {scale}{init}: gradients grow on the way back to "
                "the embedding", value=ratio, threshold=hi)
        elif not lo <= ratio <= hi:
            add("gradient_scale", "info",
                f"g_0/g_L = {ratio:.3g} is outside [{lo:g}, {hi:g}] but the scale-free ratio is {_fmt(free)}: "
                "the gradient follows the stream's scale (a larger stream gets smaller gradients), "
                "not a vanishing or exploding backward pass", value=ratio, threshold=hi if ratio > hi else lo)
    thr_m = THRESHOLDS["massive_ratio"][0]
    if "peak_ratio" in blocks and (blocks["peak_ratio"] >= thr_m).any():
        hit = blocks[blocks["peak_ratio"] >= thr_m]
        first, top = hit.iloc[0], hit.loc[hit["peak_ratio"].idxmax()]
        add("massive_activations", "info",
            f"massive activations from block {int(first.layer)} on ({len(hit)} of {L} blocks): up to "
            f"|x| = {top.peak_abs:.3g}, ×{top.peak_ratio:.3g} the median token's RMS (≥ ×{thr_m:g}), "
            f"commonest at token {int(top.peak_token)}, coordinate {int(top.peak_coordinate)} "
            f"({top.peak_share:.0%} of batches). A known trait of trained LLMs (attention sinks; Sun et "
            "al. 2024): the stream growth and ranks above are read through the median token and "
            "unit-norm tokens so that these few values do not decide them",
            layers=f"{int(first.layer)}-{int(hit.layer.iloc[-1])}", value=float(top.peak_ratio), threshold=thr_m)
    add("placement", "info", f"norm placement: {layout.placement} ({layout.describe()})")
    if has_init and last is not None:
        add("training_changed", "info", "what training changed (trained vs re-initialized, same text): "
            + _changes(t, blocks, L))
    if theory_scheme is not None and has_init:
        add("theory_at_init", "info", _theory_message(t, L, theory_scheme, loaded))
    return out


def _loss_within_noise(r) -> bool:
    """The skip's loss change is not told apart from zero: |Δ| ≤ 2 standard errors."""
    d, se = r.get("skip_loss_delta", math.nan), r.get("skip_loss_delta_se", math.nan)
    return bool(np.isfinite(d) and np.isfinite(se) and se > 0 and abs(d) <= 2 * se)


def redundant_blocks(blocks: pd.DataFrame) -> list[int]:
    """Blocks the skip test shows to matter little: the head input barely moves without them, or
    they add little to the stream and the loss change is within its noise. No skip test, no verdict."""
    if "skip_out_change" not in blocks:
        return []
    thr_s, thr_b = THRESHOLDS["redundant_skip"][0], THRESHOLDS["redundant_contribution"][0]
    small = blocks["branch_rel_median"] < thr_b if "branch_rel_median" in blocks else blocks["layer"] < -1
    return sorted(int(r.layer) for (_, r), little in zip(blocks.iterrows(), small)
                  if r.skip_out_change < thr_s or (little and _loss_within_noise(r)))


def _skip_words(r) -> str:
    return (f"skip changes the head input by {_fmt(r.get('skip_out_change', math.nan))}"
            + (f" and the loss by {_fmt(r.skip_loss_delta, '+.3g')} ± {_fmt(r.skip_loss_delta_se, '.2g')} nats"
               if np.isfinite(r.get("skip_loss_delta", math.nan)) else ""))


def _redundancy_findings(blocks: pd.DataFrame, L: int, add: Callable) -> None:
    """redundant_blocks (warning: the skip test agrees) and small_contribution (info: it does not, or did not run)."""
    thr_b, thr_s = THRESHOLDS["redundant_contribution"][0], THRESHOLDS["redundant_skip"][0]
    red = redundant_blocks(blocks)
    rows = blocks.set_index("layer")
    if red:
        parts = [f"block {i}: contribution {_fmt(rows.loc[i].get('branch_rel_median', math.nan))}, "
                 + _skip_words(rows.loc[i]) for i in red]
        add("redundant_blocks", "warning",
            f"{_span(red)} can be removed at little cost ({len(red)} of {L} blocks; skip test: the head input "
            f"moves < {thr_s:g}, or a contribution < {thr_b:g} whose loss change is within 2 standard "
            "errors of zero): likely redundant — "
            + "; ".join(parts[:4]) + ("; …" if len(parts) > 4 else ""),
            layers=",".join(map(str, red)), value=float(rows.loc[red, "skip_out_change"].min()), threshold=thr_s)
    if "branch_rel_median" not in blocks:
        return
    small = [int(v) for v in blocks.loc[blocks["branch_rel_median"] < thr_b, "layer"] if int(v) not in red]
    if not small:
        return
    tested = "skip_out_change" in blocks and blocks["skip_out_change"].notna().any()
    parts = [f"block {i}: contribution {_fmt(rows.loc[i].branch_rel_median)}"
             + (", " + _skip_words(rows.loc[i]) if tested else "") for i in small]
    add("small_contribution", "info",
        f"{_span(small)} add little next to the stream (relative contribution < {thr_b:g}, {len(small)} of {L} "
        "blocks), " + ("but skipping them changes the output: they matter (a grown stream makes any "
                       "branch look small) — " if tested else
                       "and the skip test did not run (--skip-sequences 0), so whether they matter is "
                       "not known — ") + "; ".join(parts[:4]) + ("; …" if len(parts) > 4 else ""),
        layers=",".join(map(str, small)), value=float(rows.loc[small, "branch_rel_median"].min()), threshold=thr_b)


def _growth_findings(blocks: pd.DataFrame, L: int, has_init: bool, raw_readers: Callable[[], list[str]],
                     native: str | None, add: Callable) -> None:
    """stream_explodes (warning) where the grown stream is read raw or overflows its format; else stream_grows (info)."""
    if not len(blocks):
        return
    thr_g = THRESHOLDS["stream_growth"][0]
    last = blocks.iloc[-1]
    # robust (the median token) and scale-free (from block 0's output: an embedding's own scale is
    # arbitrary, e.g. LLaMA-family embeddings sit ~100× below the stream block 0 writes)
    growth = float(last.q_rel_median / blocks["q_rel_median"].iloc[0])
    if not (np.isfinite(growth) and growth > thr_g):
        return
    steps = blocks["q_rel_median"].to_numpy()[1:] / blocks["q_rel_median"].to_numpy()[:-1]
    big = int(blocks["layer"].iloc[1 + int(np.nanargmax(steps))]) if np.isfinite(steps).any() else L - 1
    what = (f"the median token's second moment grows ×{growth:.3g} from block 0's output to the last "
            f"block's (> ×{thr_g:g}; from the embedding ×{last.q_rel_median:.3g}, the mean over tokens "
            f"×{last.q_rel:.3g}); the largest single step is at block {big}")
    if has_init:
        init = blocks["init_q_rel_median"]
        what += f"; ×{init.iloc[-1] / init.iloc[0]:.3g} in the re-initialized model"
    readers = raw_readers()
    peak = float(blocks["peak_abs"].max()) if "peak_abs" in blocks else math.nan
    overflow = native == "float16" and peak > headroom.FP16.largest
    if readers == ["unknown"]:
        add("stream_explodes", "warning", f"{what}; which modules read the stream without a norm is not "
            "known for this placement, so the growth is treated as a threat", layers=str(big), value=growth,
            threshold=thr_g)
    elif readers or overflow:
        threat = [f"it is read without a norm by {headroom.describe_readers(readers)}"] if readers else []
        if overflow:
            threat.append(f"its largest activation {peak:.3g} exceeds float16's range "
                          f"({headroom.FP16.largest:g}), the checkpoint's own format")
        add("stream_explodes", "warning", f"{what}: " + "; ".join(threat), layers=str(big), value=growth,
            threshold=thr_g)
    else:
        room = (f"; its largest activation {peak:.3g} is {headroom.FP16.largest / peak:.3g}× below "
                f"float16's largest value" if np.isfinite(peak) and peak <= headroom.FP16.largest else
                f"; its largest activation {peak:.3g} would overflow float16 (bfloat16 and float32 hold it)"
                if np.isfinite(peak) else "")
        add("stream_grows", "info", f"{what}. Every reader normalizes it (each branch reads N(x), the head "
            f"reads the final norm), so the growth is a property of the placement, not a failure; what it "
            f"costs is precision (see precision headroom){room}", layers=str(big), value=growth, threshold=thr_g)


def _precision_findings(blocks: pd.DataFrame, L: int, native: str | None, add: Callable) -> None:
    """precision_headroom: the smallest block update over the stream's rounding step; a warning only
    where it is below 1 in the checkpoint's own 16-bit format."""
    if "precision_headroom" not in blocks or not blocks["precision_headroom"].notna().any():
        return
    fmt = native if native in ("bfloat16", "float16") else headroom.PRECISION_FORMAT
    eps = headroom.FORMATS[fmt].resolution
    room = blocks["branch_rel_median"] / eps
    worst = int(blocks.loc[room.idxmin(), "layer"])
    first, last = thirds(blocks.assign(room=room))
    below = [int(v) for v in blocks.loc[room < 1, "layer"]]
    what = (f"smallest {fmt} precision headroom ×{room.min():.3g} at block {worst} (relative contribution "
            f"{blocks['branch_rel_median'].min():.3g} against {fmt}'s rounding step {eps:.3g}); mean "
            f"×{first['room'].mean():.3g} over the first third of the blocks, ×{last['room'].mean():.3g} over the last")
    if below and native == fmt:
        add("precision_headroom", "warning", f"{what}: in its own format ({fmt}) the updates of {_span(below)} "
            "are smaller than the rounding step of the stream they are added to, and are mostly rounded away",
            layers=",".join(map(str, below)), value=float(room.min()), threshold=1.0)
    else:
        tail = (f"; stored in {fmt}, the updates of {_span(below)} would be mostly rounded away" if below else
                f"; every block's update spans at least one {fmt} rounding step of the stream")
        add("precision_headroom", "info", what + tail, layers=str(worst), value=float(room.min()), threshold=1.0)


def thirds(blocks: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The first and the last third of the blocks (at least one block each)."""
    k = max(1, len(blocks) // 3)
    return blocks.iloc[:k], blocks.iloc[-k:]


def _thirds_means(blocks: pd.DataFrame, col: str) -> tuple[float, float]:
    """Mean of ``col`` over the first and the last third of the blocks (NaN where none is finite)."""
    finite = blocks[col].where(np.isfinite(blocks[col]))  # NaN and ±inf left out; pandas skips NaN
    first, last = thirds(finite)
    return float(first.mean()), float(last.mean())


def _changes(t: pd.DataFrame, blocks: pd.DataFrame, L: int) -> str:
    last = blocks.iloc[-1]
    parts = [f"token cosine at the last block {_fmt(last.token_cosine)} vs {_fmt(last.init_token_cosine)}",
             f"effective rank of unit-norm tokens {_fmt(last.effective_rank_normalized)} vs "
             f"{_fmt(last.init_effective_rank_normalized)}",
             f"median token's stream growth ×{_fmt(last.q_rel_median)} vs ×{_fmt(last.init_q_rel_median)}",
             f"g_0/g_L {_fmt(t.iloc[0].grad_rel)} vs {_fmt(t.iloc[0].init_grad_rel)} (scale-free "
             f"{_fmt(t.iloc[0].grad_scale_free)} vs {_fmt(t.iloc[0].init_grad_scale_free)})"]
    if "branch_rel_median" in blocks and blocks["branch_rel_median"].notna().any():
        a, b = _thirds_means(blocks, "branch_rel_median")
        ia, ib = _thirds_means(blocks, "init_branch_rel_median")
        parts.append(f"relative contribution, first vs last third of the blocks, {_fmt(a)} → "
                     f"{_fmt(b)} (re-initialized {_fmt(ia)} → {_fmt(ib)})")
    return "; ".join(parts)


def _theory_message(t: pd.DataFrame, L: int, scheme: str, loaded: Loaded) -> str:
    top = t.iloc[L]
    what = (f"the sigprop scheme '{scheme}'" if loaded.scheme else
            f"an idealised {scheme}-norm stack of the same depth, width and heads")
    attn = loaded.theory_shape.get("attention", "causal")
    gap, se = top.theory_token_cosine - top.init_token_cosine, top.init_token_cosine_se
    within = (f"{abs(gap) / se:.1f} standard errors: " + ("within" if abs(gap) <= 2 * se else "outside")
              + " the spread" if np.isfinite(gap) and np.isfinite(se) and se > 0 else "no spread measured")
    parts = [f"token cosine at the last block {_fmt(top.theory_token_cosine)} (measured "
             f"{_fmt(top.init_token_cosine)} ± {_fmt(se, '.2g')}, over batches of one initialization; "
             f"off by {_fmt(gap, '+.3g')}, {within})",
             f"q_L/q_0 ×{_fmt(top.theory_q_rel)} (measured ×{_fmt(top.init_q_rel)})",
             f"g_0/g_L {_fmt(t.iloc[0].theory_grad_rel)} (measured {_fmt(t.iloc[0].init_grad_rel)})"]
    return (f"init theory for {what} ({attn} attention) against the same architecture re-initialized, "
            "where its assumptions hold: " + "; ".join(parts))


SEVERITY_ORDER = {"unusable": 3, "collapsed": 2, "warnings": 1, "healthy": 0}


def verdict(found: list[dict[str, Any]]) -> str:
    """One line: the worst finding, in plain words."""
    crit = [f for f in found if f["severity"] == "critical"]
    warn = [f for f in found if f["severity"] == "warning"]
    if any(f["id"].startswith("non_finite") for f in crit):
        return "UNUSABLE: non-finite weights or activations"
    if crit:
        return "COLLAPSED: " + "; ".join(f["id"].replace("_", " ") for f in crit)
    if warn:
        return "WARNINGS: " + "; ".join(f["id"].replace("_", " ") for f in warn)
    return "HEALTHY: no collapse, redundancy, explosion or vanishing gradient found"


def verdict_level(v: str) -> str:
    """'unusable', 'collapsed', 'warnings' or 'healthy' from a verdict line."""
    return v.split(":", 1)[0].lower()


# --- the whole diagnosis ----------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
    return Diagnosis(table=t, findings=fdf, meta=meta, verdict=verdict(found), notes=notes)


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


def glossary_for(column: str) -> str | None:
    """The glossary entry explaining ``column`` (exact name, else an init_/theory_/_se pattern)."""
    import fnmatch
    return GLOSSARY.get(column) or next((v for k, v in GLOSSARY.items() if fnmatch.fnmatch(column, k)), None)


def _max_rank(seq_len: int, width: int | None) -> int:
    """The largest effective rank the probe can report: min(sampled tokens, width)."""
    from probes.metrics import SAMPLE_TOKENS  # the token sample the probe's rank metrics take
    return min(seq_len, SAMPLE_TOKENS, width or seq_len)


def save(d: Diagnosis, out: Path) -> list[Path]:
    """diagnosis.json (meta, verdict, findings, per-layer table) and diagnosis.csv (the table)."""
    import json

    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    doc = dict(d.meta, verdict=d.verdict, notes=d.notes,
               findings=[{k: clean(v) for k, v in r.items()} for r in d.findings.to_dict("records")],
               layers=[{k: clean(v) for k, v in r.items()} for r in d.table.to_dict("records")])
    js, csv = out / "diagnosis.json", out / "diagnosis.csv"
    js.write_text(json.dumps(doc, indent=1, default=float))
    d.table.to_csv(csv, index=False)
    return [js, csv]


TABLE_COLUMNS = ["layer", "second_moment", "q_rel_median", "token_cosine", "effective_rank_normalized",
                 "angle_deg", "branch_rel_median", "skip_out_change", "skip_loss_delta", "grad_rel",
                 "grad_scale_free", "peak_ratio", "precision_headroom", "init_token_cosine", "init_branch_rel_median"]
SHORT = {"branch_rel_median": "contrib", "skip_out_change": "skip_out", "skip_loss_delta": "skip_loss",
         "init_token_cosine": "init_cos", "init_branch_rel_median": "init_contrib", "q_rel_median": "q_med",
         "token_cosine": "tok_cos", "effective_rank_normalized": "eff_rank_u", "second_moment": "E[x²]",
         "grad_scale_free": "grad_sf", "peak_ratio": "peak", "precision_headroom": "bf16_room"}


def text_report(d: Diagnosis) -> str:
    """The stdout summary: model, layout, the per-layer table, findings, verdict."""
    cols = [c for c in TABLE_COLUMNS if c in d.table and d.table[c].notna().any()]
    tab = d.table[cols].rename(columns=SHORT)
    tab.insert(1, "where", d.table["point"].str.replace(".resid_post", "", regex=False))
    lines = [f"model: {d.meta['model']}", f"blocks: {d.meta['layout']}",
             f"text: {d.meta['text']}; {d.meta['sequences_used']} × {d.meta['seq_len']} tokens forward, "
             f"{d.meta.get('grad_sequences_used', d.meta['grad_sequences'])} backward ({d.meta['loss']} loss), skip test on "
             f"{d.meta['skip_sequences']}, re-initialized model on {d.meta['init_sequences']}", "",
             tab.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
             f"(q_med: median token's E[x²] over the embedding's; eff_rank_u: effective rank of unit-norm "
             f"tokens, at most {d.meta['max_effective_rank']}; contrib: median token's relative contribution; "
             "grad_sf: scale-free gradient; peak: largest |x| over the median token's RMS; bf16_room: "
             "contribution over bfloat16's rounding step (below 1: mostly rounded away); init_*: the "
             "re-initialized model; every column: diagnosis.json 'glossary')",
             "", "findings:"]
    for r in d.findings.itertuples():
        lines.append(f"  [{r.severity}] {r.message}")
    lines += [f"  note: {n}" for n in d.notes]
    lines += ["", f"verdict: {d.verdict}  ({d.meta['seconds_total']:.1f} s)"]
    return "\n".join(lines)
