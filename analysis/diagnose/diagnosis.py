"""Collapse diagnosis of any checkpoint: probes over N sequences, per-layer table, findings.

``diagnose(path, …)`` loads the checkpoint (``analysis.diagnose.loading``: never runs code from it),
cuts the text into N windows of T tokens, runs every window forward through the probed model
(``probes.Probe``) and the first ``grad_sequences`` of them backward with the model's own loss,
and turns the per-layer statistics into findings, each with its threshold (``THRESHOLDS``).

Loss for the backward pass: sigprop testbeds and Hugging Face causal LMs use their next-token
cross-entropy; masked LMs (BERT, RoBERTa) their masked-LM loss on a fixed 15 % of positions
(replaced by the mask token); a model without a head (``AutoModel``) uses a **surrogate**,
mean(h_L²) of the last hidden state, which probes how gradients travel back through the blocks
but not what a real task loss would send. Parameters are frozen during the diagnosis: gradients
are taken with respect to the stream only (cheaper; the gradient profile is the same).

Theory: where the placement is pre or post (or the checkpoint is a sigprop testbed, whose exact
scheme is known), ``theory.solve.predict_profile`` gives what an untrained model of that shape
would show **at initialization**, fed with the measured embedding statistics. A trained model is
expected to differ from it; the comparison is context, not a pass/fail test.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.diagnose.loading import Loaded, load
from analysis.device import resolve_device
from probes import Probe, confirm_placement, locate

# Every threshold a finding uses, with what it means (also written to diagnosis.json).
THRESHOLDS: dict[str, tuple[float, str]] = {
    "collapse_cosine": (0.99, "mean cosine between distinct tokens of a sequence at or above which "
                              "the tokens are treated as (nearly) one vector: rank collapse"),
    "aligned_cosine": (0.9, "token cosine at or above which tokens are strongly aligned: partial "
                            "collapse, or a shared offset direction (anisotropy) common in trained models"),
    "redundant_angle_deg": (2.0, "a block that turns each token's stream vector by less than this many "
                                 "degrees barely changes it: likely redundant (Gromov et al. 2024)"),
    "stream_growth": (1e4, "growth of the stream's second moment from the embedding to the last block "
                           "above which activations are treated as exploding"),
    "grad_vanish": (1e-3, "g_0/g_L (gradient second moment at the embedding over the last block) "
                          "below which gradients vanish on the way back"),
    "grad_explode": (1e3, "g_0/g_L above which gradients explode on the way back"),
}
METRICS = ("second_moment", "variance", "max_abs", "token_cosine", "dong_residual", "effective_rank",
           "layer_cosine", "angular_distance", "grad_second_moment", "grad_token_cosine")


@dataclass
class Diagnosis:
    """What ``diagnose`` found: per-layer table, findings, and everything needed to reproduce it."""

    table: pd.DataFrame
    findings: pd.DataFrame  # id, severity, layers, value, threshold, message
    meta: dict[str, Any]
    verdict: str
    notes: list[str] = field(default_factory=list)


# --- text -------------------------------------------------------------------------------------

def _text_bytes(text: str | None, need: int) -> tuple[bytes, str]:
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


def token_windows(loaded: Loaded, text: str | None, n: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """``n`` windows of ``seq_len + 1`` token ids, evenly spaced over the text (deterministic)."""
    per = seq_len + 1
    raw, source = _text_bytes(text, max(n * per * 8, 1 << 16))
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
    return windows.clamp_(0, loaded.vocab_size - 1), how


# --- running the model ------------------------------------------------------------------------

def _loss(loaded: Loaded, model, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    x, y = w[:, :-1], w[:, 1:]
    if loaded.scheme is not None:  # a sigprop testbed: its own next-token loss
        return model(x, y)[1]
    if loaded.loss_kind == "lm":
        return model(input_ids=x, labels=x).loss
    if loaded.loss_kind == "masked-lm":
        pick = torch.rand(x.shape, generator=gen) < 0.15
        pick[:, 0] |= ~pick.any(1)  # at least one masked position per sequence
        labels = torch.where(pick, x, torch.full_like(x, -100))
        mask_id = loaded.mask_token_id if loaded.mask_token_id is not None else 0
        inp = torch.where(pick, torch.full_like(x, mask_id), x)
        return model(input_ids=inp, labels=labels).loss
    out = model(input_ids=x)
    return out.last_hidden_state.float().square().mean()  # the documented surrogate


def _forward_only(loaded: Loaded, model, w: torch.Tensor) -> None:
    x = w[:, :-1]
    if loaded.scheme is not None:
        model(x)
    else:  # the stream only: skip the LM head (a third of GPT-2-small's forward cost)
        getattr(model, "base_model", model)(input_ids=x)


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


def _probe_run(loaded: Loaded, layout, windows: torch.Tensor, grad_n: int, batch: int,
               metrics: tuple[str, ...], device: torch.device) -> tuple[pd.DataFrame, list[float]]:
    model = loaded.model
    gen = torch.Generator().manual_seed(0)
    losses: list[float] = []
    first = model.get_submodule(layout.blocks[0])
    handle = _grad_on_stream(first)
    try:
        with Probe(model, metrics=list(metrics), layout=layout) as probe:
            for s in range(0, len(windows), batch):
                w = windows[s:s + batch].to(device)
                if s < grad_n:
                    loss = _loss(loaded, model, w, gen)
                    losses.append(float(loss.detach()))
                    if loss.requires_grad:
                        loss.backward()
                else:
                    with torch.no_grad():
                        _forward_only(loaded, model, w)
        return probe.frame(), losses
    finally:
        handle.remove()


def run_probes(loaded: Loaded, windows: torch.Tensor, grad_n: int, batch: int, device: torch.device,
               blocks: str | None, skip_svd: bool, notes: list[str]):
    """(probe frame, layout, losses); locates the blocks and checks the placement with one forward."""
    model = loaded.model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        layout = locate(model, blocks=blocks)
    except ValueError as e:
        raise ValueError(f"{e} (command line: --blocks PATH)") from None
    check = windows[:2, :-1].to(device)
    try:
        layout = confirm_placement(model, layout, check) if loaded.scheme else \
            confirm_placement(model, layout, input_ids=check)
    except ValueError as e:
        raise ValueError(f"the blocks found do not look like residual blocks: {e}. Families tried: "
                         "sigprop testbed, BERT/RoBERTa/ELECTRA, DistilBERT, GPT-2, GPT-NeoX, "
                         "LLaMA/Mistral/Qwen2, then the longest uniform ModuleList; point at the "
                         "blocks with --blocks PATH (a ModuleList as named in model.named_modules())") from None
    metrics = tuple(m for m in METRICS if not (skip_svd and m == "effective_rank"))
    try:
        frame, losses = _probe_run(loaded, layout, windows, grad_n, batch, metrics, device)
    except RuntimeError as e:  # an SVD on non-finite activations does not converge
        if "effective_rank" not in metrics:
            raise
        notes.append(f"effective rank skipped: {str(e).splitlines()[0][:120]}")
        frame, losses = _probe_run(loaded, layout, windows, grad_n, batch,
                                   tuple(m for m in metrics if m != "effective_rank"), device)
    return frame, layout, losses


# --- per-layer table --------------------------------------------------------------------------

def layer_table(frame: pd.DataFrame, layout) -> pd.DataFrame:
    """One row per stream point (embed, each block's output, final): the diagnosis metrics."""
    wide = frame.pivot_table(index="point", columns="metric", values="mean", aggfunc="first")
    L = len(layout.blocks)
    rows = []
    for layer, point, module in ([(-1, "embed", "embedding")] +
                                 [(i, f"blocks.{i}.resid_post", layout.blocks[i]) for i in range(L)] +
                                 [(L, "final", layout.final or "(last block output)")]):
        r = wide.loc[point] if point in wide.index else pd.Series(dtype=float)
        row = {"layer": layer, "point": point, "module": module}
        for m in METRICS:
            row[m] = float(r.get(m, math.nan))
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
    g = t["grad_second_moment"].to_numpy()
    g_last = g[L] if L >= 1 and g[L] else math.nan  # the last block's output (theory's l = L)
    t["grad_rel"] = g / g_last
    return t.drop(columns=["angular_distance", "layer_cosine"])


def weight_scale(model: torch.nn.Module, block_paths: tuple[str, ...]) -> float:
    """σ such that the blocks' weight matrices look like N(0, σ²/fan_in): median of std·√fan_in.

    Used to put a foreign model on the theory's scale (GPT-2 and BERT initialize with std 0.02,
    not 1/√fan_in). Linear weights are [out, in]; GPT-2's Conv1D stores [in, out].
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


def add_theory(t: pd.DataFrame, loaded: Loaded, layout, seq_len: int, notes: list[str]) -> str | None:
    """Add theory_* columns (at initialization) where the placement is known; returns the scheme used."""
    scheme = loaded.scheme or (layout.placement if layout.placement in ("pre", "post") else None)
    for c in ("theory_q_rel", "theory_token_cosine", "theory_angle_deg", "theory_grad_rel"):
        t[c] = math.nan
    if scheme is None:
        notes.append(f"no theory comparison: placement '{layout.placement}' has no single scheme")
        return None
    shape = dict(loaded.theory_shape)
    if loaded.scheme is None:  # a foreign model: put the theory on its weights' scale
        shape["sigma"] = weight_scale(loaded.model, layout.blocks)
        notes.append(f"theory for a foreign model uses σ = {shape['sigma']:.3g}, the median "
                     "std·√fan_in of its block weights (the theory's weights are N(0, σ²/fan_in))")
    L = len(layout.blocks)
    emb, top = t.iloc[0], t.iloc[L]
    if not all(np.isfinite([emb.second_moment, emb.token_cosine])) or not shape.get("width") or not shape.get("heads"):
        notes.append("no theory comparison: the embedding statistics or the width/heads are unknown")
        return None
    rho_g = float(top.grad_token_cosine) if np.isfinite(top.grad_token_cosine) else 0.0
    try:
        from theory.solve import predict_profile
        keep = {k: shape[k] for k in ("width", "heads", "ffn", "norm", "sigma", "embed_std", "experts",
                                      "top_k", "scheme_params") if k in shape}
        pred = predict_profile(scheme, depth=L, seq_len=seq_len, q0=float(emb.second_moment),
                               rho0=float(np.clip(emb.token_cosine, 0.0, 0.999)), rho_g=rho_g, **keep)
    except Exception as e:  # theory is context: never let it stop a diagnosis
        notes.append(f"no theory comparison: {type(e).__name__}: {str(e)[:120]}")
        return None
    idx = np.arange(L + 1)  # table rows 0..L are embed (l = 0) and blocks (l = 1..L)
    t.loc[idx, "theory_q_rel"] = pred["q"] / pred["q"][0]
    t.loc[idx, "theory_token_cosine"] = pred["rho"]
    t.loc[idx, "theory_angle_deg"] = np.degrees(np.arccos(np.clip(pred["cos"], -1, 1)))
    t.loc[idx, "theory_grad_rel"] = pred["g"]
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


def findings(t: pd.DataFrame, bad_weights: list[tuple[str, int]], losses: list[float],
             layout, loaded: Loaded, theory_scheme: str | None) -> list[dict[str, Any]]:
    """Findings with severity (critical / warning / info), threshold and a plain-words message."""
    out: list[dict[str, Any]] = []

    def add(fid, severity, message, layers="", value=math.nan, threshold=math.nan):
        out.append(dict(id=fid, severity=severity, layers=layers, value=value, threshold=threshold,
                        message=message))

    L = len(layout.blocks)
    blocks = t[(t.layer >= 0) & (t.layer < L)]
    if bad_weights:
        total = sum(n for _, n in bad_weights)
        add("non_finite_weights", "critical",
            f"{total} weight value(s) are NaN or inf, in {len(bad_weights)} tensor(s) (first: "
            f"{bad_weights[0][0]}): the checkpoint is damaged and its outputs are meaningless",
            value=float(total), threshold=0.0)
    q = t["second_moment"].to_numpy()
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
        er = f"; effective rank {last.effective_rank:.1f}" if np.isfinite(last.effective_rank) else ""
        if rho >= thr_c:
            first = int(blocks.loc[blocks.token_cosine >= thr_c, "layer"].min())
            add("rank_collapse", "critical",
                f"token cosine {rho:.3f} at the last block (≥ {thr_c}){er}: rank collapse — the tokens "
                f"of a sequence have become (nearly) the same vector, from block {first} on",
                layers=f"{first}-{L - 1}", value=rho, threshold=thr_c)
        elif rho >= thr_a:
            dong = f", Dong residual {last.dong_residual:.2f}" if np.isfinite(last.dong_residual) else ""
            add("tokens_aligned", "warning",
                f"token cosine {rho:.3f} at the last block (≥ {thr_a}){er}{dong}: tokens strongly "
                "aligned — partial rank collapse, or a shared direction (anisotropy) that trained "
                "models often have; not full collapse", value=rho, threshold=thr_a)
    thr_r = THRESHOLDS["redundant_angle_deg"][0]
    ang = blocks[np.isfinite(blocks.angle_deg)]
    red = sorted(int(v) for v in ang.loc[ang.angle_deg < thr_r, "layer"])
    if red:
        worst = float(ang.angle_deg.min())
        add("redundant_blocks", "warning",
            f"{_span(red)} turn the stream by less than {thr_r:g}° (smallest {worst:.2f}°): likely "
            f"redundant — removing them would change the stream little ({len(red)} of {L} blocks)",
            layers=",".join(map(str, red)), value=worst, threshold=thr_r)
    thr_g = THRESHOLDS["stream_growth"][0]
    if len(blocks) and np.isfinite(q[0]) and q[0] > 0 and np.isfinite(last.second_moment):
        growth = float(last.second_moment / q[0])
        if growth > thr_g:
            big = int(blocks.loc[blocks.growth.idxmax(), "layer"]) if blocks.growth.notna().any() else L - 1
            add("stream_explodes", "warning",
                f"the stream's second moment grows ×{growth:.3g} from the embedding to the last block "
                f"(> ×{thr_g:g}); the largest single step is at block {big}",
                layers=str(big), value=growth, threshold=thr_g)
    g0, gL = t.iloc[0].grad_second_moment, t.iloc[L].grad_second_moment if L else math.nan
    if np.isfinite(g0) and np.isfinite(gL) and gL > 0:
        ratio = float(g0 / gL)
        lo, hi = THRESHOLDS["grad_vanish"][0], THRESHOLDS["grad_explode"][0]
        if ratio < lo:
            add("gradients_vanish", "warning",
                f"g_0/g_L = {ratio:.3g} (< {lo:g}): gradients shrink on the way back to the "
                "embedding; early blocks learn slowly" if ratio > 0 else
                f"g_0/g_L = 0 (< {lo:g}): no gradient reaches the embedding at all — some block "
                "cuts the backward path", value=ratio, threshold=lo)
        elif ratio > hi:
            add("gradients_explode", "warning",
                f"g_0/g_L = {ratio:.3g} (> {hi:g}): gradients grow on the way back to the embedding",
                value=ratio, threshold=hi)
    add("placement", "info", f"norm placement: {layout.placement} ({layout.describe()})")
    if theory_scheme is not None and last is not None:
        top = t.iloc[L]
        parts = []
        if np.isfinite(top.theory_token_cosine):
            parts.append(f"token cosine at the last block {top.theory_token_cosine:.3f} "
                         f"(measured {last.token_cosine:.3f})")
        if np.isfinite(top.theory_q_rel):
            parts.append(f"stream growth q_L/q_0 ×{top.theory_q_rel:.3g} (measured ×{last.q_rel:.3g})")
        g_theory = t.iloc[0].theory_grad_rel
        if np.isfinite(g_theory):
            parts.append(f"g_0/g_L {g_theory:.3g} (measured {t.iloc[0].grad_rel:.3g})")
        what = (f"the sigprop scheme '{theory_scheme}'" if loaded.scheme else
                f"an idealised {theory_scheme}-norm stack of the same depth, width and heads")
        add("theory_at_init", "info",
            f"theory at initialization for {what}: " + "; ".join(parts) +
            ". A trained model is expected to differ from its initialization: a gap is context, "
            "not a failure" + (" (post-norm at init itself drives tokens towards collapse with "
                               "depth)" if theory_scheme == "post" else ""))
    return out


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


# --- the whole diagnosis ----------------------------------------------------------------------

def diagnose(path: str, *, text: str | None = None, sequences: int = 64, seq_len: int = 256,
             grad_sequences: int = 16, batch: int = 8, blocks: str | None = None,
             config: str | None = None, device: str = "cpu") -> Diagnosis:
    """Load ``path`` and diagnose it (see the module docstring); ValueError on unusable input."""
    if sequences < 1 or seq_len < 2 or batch < 1 or grad_sequences < 0:
        raise ValueError(f"--sequences ({sequences}) and --batch ({batch}) must be >= 1, --seq-len "
                         f"({seq_len}) >= 2 and --grad-sequences ({grad_sequences}) >= 0")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    loaded = load(path, config)
    notes = list(loaded.notes)
    t_load = time.perf_counter() - t0
    if loaded.max_len is not None and seq_len > loaded.max_len:
        notes.append(f"--seq-len {seq_len} cut to the model's maximum {loaded.max_len}")
        seq_len = loaded.max_len
    windows, text_how = token_windows(loaded, text, sequences, seq_len)
    bad_weights = non_finite_weights(loaded.model)
    try:
        frame, layout, losses = run_probes(loaded, windows, min(grad_sequences, sequences), batch, dev,
                                           blocks, bool(bad_weights), notes)
    except (RuntimeError, IndexError, TypeError, KeyError, AttributeError, MemoryError) as e:
        first = (str(e).splitlines() or [""])[0][:300]
        raise ValueError(f"the model did not run on the text ({type(e).__name__}: {first})") from None
    t = layer_table(frame, layout)
    scheme = add_theory(t, loaded, layout, seq_len, notes)
    found = findings(t, bad_weights, losses, layout, loaded, scheme)
    meta = dict(path=str(path), kind=loaded.kind, model=loaded.description, loss=loaded.loss_kind,
                loss_value=float(np.mean(losses)) if losses else None,
                text=text_how, sequences=sequences, seq_len=seq_len,
                grad_sequences=min(grad_sequences, sequences), device=str(dev),
                blocks=len(layout.blocks), block_paths=[layout.blocks[0], layout.blocks[-1]],
                placement=layout.placement, layout=layout.describe(), theory_scheme=scheme,
                parameters=sum(p.numel() for p in loaded.model.parameters()),
                thresholds={k: {"value": v, "meaning": m} for k, (v, m) in THRESHOLDS.items()},
                seconds_load=round(t_load, 2), seconds_total=round(time.perf_counter() - t0, 2))
    fdf = pd.DataFrame(found, columns=["id", "severity", "layers", "value", "threshold", "message"])
    return Diagnosis(table=t, findings=fdf, meta=meta, verdict=verdict(found), notes=notes)


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


TABLE_COLUMNS = ["layer", "second_moment", "growth", "token_cosine", "effective_rank", "angle_deg",
                 "grad_rel", "theory_q_rel", "q_rel", "theory_token_cosine"]


def text_report(d: Diagnosis) -> str:
    """The stdout summary: model, layout, the per-layer table, findings, verdict."""
    cols = [c for c in TABLE_COLUMNS if c in d.table]
    tab = d.table[cols].copy()
    tab.insert(1, "where", d.table["point"].str.replace(".resid_post", "", regex=False))
    lines = [f"model: {d.meta['model']}", f"blocks: {d.meta['layout']}",
             f"text: {d.meta['text']}; {d.meta['sequences']} × {d.meta['seq_len']} tokens forward, "
             f"{d.meta['grad_sequences']} backward ({d.meta['loss']} loss)", "",
             tab.to_string(index=False, float_format=lambda v: f"{v:.4g}"), "", "findings:"]
    for r in d.findings.itertuples():
        lines.append(f"  [{r.severity}] {r.message}")
    lines += [f"  note: {n}" for n in d.notes]
    lines += ["", f"verdict: {d.verdict}  ({d.meta['seconds_total']:.1f} s)"]
    return "\n".join(lines)
