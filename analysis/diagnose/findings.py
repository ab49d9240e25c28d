"""Findings from the per-layer table, each with the threshold it used (``THRESHOLDS``), and the
verdict: the worst of them."""

from __future__ import annotations

import enum
import functools
import math
from typing import Any, Callable

import numpy as np
import pandas as pd

from analysis.checkpoints import Loaded
from analysis.diagnose import headroom

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


# --- verdict ---------------------------------------------------------------------------------

@functools.total_ordering
class Verdict(enum.Enum):
    """How bad the worst finding is; members compare by severity (``HEALTHY < ... < UNUSABLE``)."""

    HEALTHY = 0
    WARNINGS = 1
    COLLAPSED = 2
    UNUSABLE = 3

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Verdict):
            return NotImplemented
        return self.value < other.value


def verdict(found: list[dict[str, Any]]) -> tuple[Verdict, str]:
    """The worst finding: its verdict, and one line in plain words (``"COLLAPSED: token collapse"``)."""
    crit = [f for f in found if f["severity"] == "critical"]
    warn = [f for f in found if f["severity"] == "warning"]
    if any(f["id"].startswith("non_finite") for f in crit):
        level, why = Verdict.UNUSABLE, "non-finite weights or activations"
    elif crit:
        level, why = Verdict.COLLAPSED, "; ".join(f["id"].replace("_", " ") for f in crit)
    elif warn:
        level, why = Verdict.WARNINGS, "; ".join(f["id"].replace("_", " ") for f in warn)
    else:
        level, why = Verdict.HEALTHY, "no collapse, redundancy, explosion or vanishing gradient found"
    return level, f"{level.name}: {why}"
