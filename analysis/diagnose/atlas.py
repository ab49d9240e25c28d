"""The atlas: several checkpoints diagnosed alike and laid side by side against relative depth.

``collect`` runs ``diagnose`` on each checkpoint (sigprop runs, Hugging Face folders, GGUF files)
with the same settings and stacks the per-layer tables, with the checkpoint's name, placement,
depth and relative depth (l + 1)/L. ``atlas_claims`` checks claims about trained models on them,
in the claims format of ``analysis.training.claims`` (claim, scheme, statement, method, status,
evidence), each threshold stated in its statement:

- **deep blocks contribute less** (pre-norm; Xiong et al. 2020, the "curse of depth"): the mean
  relative contribution of the last third of the blocks is below the first third's by more than
  twice their combined standard error;
- **deep blocks are cheap to skip** (Gromov et al. 2024, arXiv 2403.17887): skipping one of the
  last third of the blocks costs less than SKIP_CHEAP nats (median over those blocks) and less
  than skipping one of the first third;
- **post-norm contributions stay flat**: the largest block's relative contribution is within
  FLAT_RATIO of the smallest's.
A claim whose placement does not apply to a checkpoint is not listed; one whose quantity was not
measured (no real loss for the skip test) is 'untested'.

Claims across the checkpoints (``cross_claims``), each checkpoint weighted once:

- **massive activations** appear in pre-norm decoders and not in post-norm encoders (Sun et al.
  2024): every pre-norm decoder's largest activation is ≥ MASSIVE × its median token's RMS at some
  block, and no post-norm encoder's is;
- **precision headroom falls with depth** in pre-norm models: the last third's mean bfloat16
  headroom is below the first third's in every pre-norm checkpoint;
- **deep blocks get cheaper to skip as models deepen** (Gromov et al. 2024): within one family
  (each toolkit scheme; the released models), over its healthy checkpoints with a real loss, the
  deepest third's median skip cost in nats falls with depth (Spearman's rank correlation below
  zero with an exact one-sided permutation p-value ≤ SIGNIFICANCE; a falling trend with a larger
  p-value is 'untested'; the first third's cost beside it). A ratio of the two is not used: the
  first third's cost is near zero in several toolkit runs, which makes the ratio meaningless.

Massive activations are checked per origin (released, toolkit): they come with long training at
scale, which the toolkit's 128-step CPU runs do not have.

Weighting: a mean over all blocks of a pre-norm stack would be decided by its first blocks, whose
stream is small and whose raw statistics are largest; every claim therefore compares thirds of
the stack (first against last, equal weight per block within a third) of scale-free quantities
(relative contribution, headroom, skip cost in nats), never a mean of raw second moments.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from analysis.infra import progress
from analysis.diagnose.diagnosis import diagnose
from analysis.diagnose.findings import thirds
from theory.claim_table import Claim, claims_frame

METHOD = "measured on the checkpoint"
SKIP_CHEAP = 0.05  # nats
FLAT_RATIO = 3.0
MASSIVE = 100.0  # largest |x| over the median token's RMS (diagnose's massive_ratio threshold)
SIGNIFICANCE = 0.05  # a trend across depths holds only with a one-sided p-value at most this


def checkpoint_name(path: str) -> str:
    """A readable name: the folder's (or file's stem), or its parent's where it is generic ('model')."""
    p = Path(path)
    p = p.parent if p.name in ("model", "checkpoint.pt", "model.safetensors") else p
    return p.stem if p.suffix in (".gguf", ".safetensors", ".pt", ".bin") else p.name


def collect(paths: list[str], *, log: Callable[[str], None] = progress.say, texts: dict[str, str] | None = None,
            **settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(layers, checkpoints): every checkpoint's per-layer table stacked, and one row per checkpoint.
    ``texts``: a text file per path, in place of ``settings['text']`` (prose for English models, code for code models)."""
    texts = texts or {}
    unknown = sorted(set(texts) - set(paths))
    if unknown:
        raise ValueError(f"--text-for names {unknown[0]}, which is not one of the checkpoints given")
    names = [checkpoint_name(p) for p in paths]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two checkpoints would share the name {dup[0]}: give distinct folders")
    layers, checkpoints = [], []
    bar = progress.bar(len(paths), "atlas", unit="checkpoint", leave=False)
    for i, (path, name) in enumerate(zip(paths, names), 1):
        log(f"[{i}/{len(paths)}] {path}")
        d = diagnose(path, **{**settings, "text": texts.get(path, settings.get("text"))})
        bar.update()
        L = d.meta["blocks"]
        t = d.table.copy()
        t.insert(0, "checkpoint", name)
        t.insert(1, "placement", d.meta["placement"])
        t.insert(2, "depth", L)
        t.insert(3, "verdict", d.verdict.split(":")[0])
        t.insert(4, "relative_depth", (t["layer"] + 1) / L)
        t.insert(5, "encoder", bool(d.meta["encoder"]))
        t.insert(6, "loss", d.meta["loss"])
        t.insert(7, "origin", "toolkit" if d.meta["kind"] == "sigprop" else "released")
        t.insert(8, "scheme", d.meta["theory_scheme"] if d.meta["kind"] == "sigprop" else "released")
        layers.append(t)
        checkpoints.append(dict(checkpoint=name, path=str(path), model=d.meta["model"],
                                placement=d.meta["placement"], depth=L, loss=d.meta["loss"],
                                loss_value=d.meta["loss_value"], verdict=d.verdict,
                                findings=";".join(d.findings["id"]), text=d.meta["text"], seq_len=d.meta["seq_len"],
                                sequences=d.meta["sequences_used"], seconds=d.meta["seconds_total"]))
    bar.close()
    return pd.concat(layers, ignore_index=True), pd.DataFrame(checkpoints)


def _blocks(t: pd.DataFrame) -> pd.DataFrame:
    return t[(t["layer"] >= 0) & (t["layer"] < t["depth"])].sort_values("layer")


def _mean_se(b: pd.DataFrame, col: str) -> tuple[float, float]:
    """Mean over blocks and its standard error from the per-block standard errors."""
    v = b[col].to_numpy(dtype=float)
    se = b[f"{col}_se"].to_numpy(dtype=float) if f"{col}_se" in b else np.zeros_like(v)
    return float(np.mean(v)), float(np.sqrt(np.nansum(se ** 2)) / len(v))


def deep_blocks_contribute_less(b: pd.DataFrame) -> tuple[str, str]:
    """Last third's mean relative contribution below the first third's by > 2 combined SE."""
    first, last = thirds(b)
    (m1, s1), (m3, s3) = _mean_se(first, "branch_rel_median"), _mean_se(last, "branch_rel_median")
    if not (np.isfinite(m1) and np.isfinite(m3)):
        return "untested", "no relative contribution measured"
    se = math.hypot(s1, s3)
    status = "holds" if m1 - m3 > 2 * se else "fails"
    return status, (f"first third {m1:.3g} ± {s1:.2g}, last third {m3:.3g} ± {s3:.2g} "
                    f"(difference {m1 - m3:+.3g}, {abs(m1 - m3) / se:.1f} standard errors)" if se > 0 else
                    f"first third {m1:.3g}, last third {m3:.3g}")


def deep_blocks_cheap_to_skip(b: pd.DataFrame) -> tuple[str, str]:
    """Median skip loss change over the last third < SKIP_CHEAP nats and below the first third's."""
    if "skip_loss_delta" not in b or not b["skip_loss_delta"].notna().any():
        return "untested", "no loss change measured (the surrogate loss, or the skip test was off)"
    first, last = thirds(b)
    d1, d3 = float(first["skip_loss_delta"].median()), float(last["skip_loss_delta"].median())
    status = "holds" if d3 < SKIP_CHEAP and d3 < d1 else "fails"
    return status, (f"median loss change when one block is skipped: last third {d3:+.3g} nats, first "
                    f"third {d1:+.3g} nats (largest in the last third {last['skip_loss_delta'].max():+.3g})")


def post_contributions_flat(b: pd.DataFrame) -> tuple[str, str]:
    """Largest over smallest relative contribution ≤ FLAT_RATIO."""
    v = b["branch_rel_median"].to_numpy(dtype=float)
    if not np.isfinite(v).any() or np.nanmin(v) <= 0:
        return "untested", "no positive relative contribution measured"
    ratio = float(np.nanmax(v) / np.nanmin(v))
    return ("holds" if ratio <= FLAT_RATIO else "fails"), (
        f"contribution from {np.nanmin(v):.3g} to {np.nanmax(v):.3g} across {len(v)} blocks: ×{ratio:.3g}")


def atlas_claims(layers: pd.DataFrame) -> pd.DataFrame:
    """Claims about trained models, per checkpoint where its placement applies (module docstring)."""
    rows = []
    for name, t in layers.groupby("checkpoint", sort=False):
        b, placement = _blocks(t), t["placement"].iloc[0]
        checks = []
        if placement == "pre":
            checks += [("deep_blocks_contribute_less", "the last third of the blocks contributes less "
                        "than the first third (mean relative contribution, by > 2 standard errors)",
                        deep_blocks_contribute_less)]
        if placement == "post":
            checks += [("post_contributions_flat", f"relative contributions stay within ×{FLAT_RATIO:g} "
                        "across the blocks", post_contributions_flat)]
        checks += [("deep_blocks_cheap_to_skip", f"skipping one of the last third of the blocks costs "
                    f"< {SKIP_CHEAP:g} nats (median) and less than one of the first third",
                    deep_blocks_cheap_to_skip)]
        for claim, statement, fn in checks:
            status, evidence = fn(b)
            rows.append(Claim(f"{claim}:{name}", placement, f"{name}: {statement}", METHOD, status,
                              evidence))
    per_checkpoint = claims_frame(rows)
    return pd.concat([per_checkpoint, cross_claims(layers)], ignore_index=True)


def _claim(claim: str, statement: str, status: str, evidence: str) -> Claim:
    return Claim(claim, "across", statement, METHOD, status, evidence)


def massive_in_pre_decoders_not_post_encoders(layers: pd.DataFrame, origin: str) -> Claim:
    """Every pre-norm decoder of ``origin`` reaches MASSIVE at some block; no post-norm encoder does."""
    of = layers[layers.origin == origin] if "origin" in layers else layers
    peak = of.groupby("checkpoint", sort=False).agg(placement=("placement", "first"), encoder=("encoder", "first"),
                                                    peak=("peak_ratio", "max"))
    pre = peak[(peak.placement == "pre") & ~peak.encoder]
    post = peak[(peak.placement == "post") & peak.encoder]
    statement = (f"{origin} checkpoints: massive activations (largest |x| ≥ ×{MASSIVE:g} the median token's RMS) "
                 "appear in every pre-norm decoder and in no post-norm encoder")
    claim = f"massive_in_pre_decoders:{origin}"
    if not len(pre):
        return _claim(claim, statement, "untested", f"no pre-norm decoder among the {origin} checkpoints")
    ok = bool((pre.peak >= MASSIVE).all() and (post.peak < MASSIVE).all())
    ev = "decoders: " + "; ".join(f"{n} ×{v:.3g}" for n, v in pre.peak.items())
    if len(post):
        ev += " | encoders: " + "; ".join(f"{n} ×{v:.3g}" for n, v in post.peak.items())
    return _claim(claim, statement, "holds" if ok else "fails", ev)


def headroom_falls_with_depth_in_pre(layers: pd.DataFrame) -> Claim:
    """In every pre-norm checkpoint the last third's mean precision headroom is below the first third's."""
    statement = ("the bfloat16 precision headroom of the last third of the blocks is below the first third's "
                 "in every pre-norm checkpoint (mean per third)")
    rows = []
    for name, t in layers[layers.placement == "pre"].groupby("checkpoint", sort=False):
        first, last = thirds(_blocks(t))
        rows.append((name, float(first.precision_headroom.mean()), float(last.precision_headroom.mean())))
    if not rows:
        return _claim("headroom_falls_with_depth_pre", statement, "untested", "no pre-norm checkpoint")
    ok = all(b < a for _, a, b in rows)
    return _claim("headroom_falls_with_depth_pre", statement, "holds" if ok else "fails",
                  "; ".join(f"{n}: ×{a:.3g} → ×{b:.3g}" for n, a, b in rows))


def skip_costs(t: pd.DataFrame) -> tuple[float, float]:
    """Median skip cost (nats) of the first and of the deepest third of the blocks."""
    first, last = thirds(_blocks(t))
    return float(first.skip_loss_delta.median()), float(last.skip_loss_delta.median())


def deep_skip_cheaper_with_depth(layers: pd.DataFrame, group: str) -> Claim:
    """Within one family (a toolkit scheme, or the released models): the deepest third's median skip
    cost falls as depth grows (Spearman ρ < 0 over the healthy checkpoints with a real loss)."""
    from scipy.stats import spearmanr
    statement = (f"{group}: the deepest third's median skip cost (nats) falls as the depth grows, over the healthy "
                 f"checkpoints with a real loss (Spearman ρ < 0, one-sided p ≤ {SIGNIFICANCE:g}); the first "
                 "third's is given beside it")
    claim = f"deep_skip_cheaper_with_depth:{group}"
    ok = layers[(layers.scheme == group) & (layers.verdict != "COLLAPSED") & (layers.loss != "surrogate")]
    pts = sorted((int(t.depth.iloc[0]), *skip_costs(t), name) for name, t in ok.groupby("checkpoint", sort=False)
                 if "skip_loss_delta" in t and t.skip_loss_delta.notna().any())
    if len({p[0] for p in pts}) < 3:
        return _claim(claim, statement, "untested", f"needs ≥ 3 distinct depths of healthy checkpoints with a real "
                      f"loss, has {len({p[0] for p in pts})}")
    depths, deep = [d for d, *_ in pts], [c for _, _, c, _ in pts]
    rho = float(spearmanr(depths, deep)[0])
    p = _rank_p(depths, deep, rho)
    ev = (f"Spearman ρ = {rho:+.2f} (one-sided p = {p:.2g}, exact over the {math.factorial(len(pts))} "
          f"orderings, {len(pts)} checkpoints); deepest / first third by depth: "
          + "; ".join(f"L={d} {c:+.3g} / {first:+.3g}" for d, first, c, _ in pts))
    # a falling trend that so few depths cannot tell from chance decides nothing
    status = "fails" if rho >= 0 else "holds" if p <= SIGNIFICANCE else "untested"
    return _claim(claim, statement, status, ev if status != "untested" else ev + f"; p > {SIGNIFICANCE:g}: "
                  "too few depths to tell the trend from chance")


def _rank_p(x: list[float], y: list[float], rho: float) -> float:
    """One-sided permutation p-value of a Spearman ρ this low (exact: every ordering of y; n ≤ 8)."""
    import itertools

    from scipy.stats import spearmanr
    if len(y) > 8:
        return float(spearmanr(x, y, alternative="less")[1])
    perms = list(itertools.permutations(y))
    return sum(float(spearmanr(x, p)[0]) <= rho + 1e-12 for p in perms) / len(perms)


def cross_claims(layers: pd.DataFrame) -> pd.DataFrame:
    """The claims across checkpoints (module docstring)."""
    origins = list(dict.fromkeys(layers["origin"])) if "origin" in layers else ["all"]
    groups = list(dict.fromkeys(layers["scheme"])) if "scheme" in layers else []
    rows = [massive_in_pre_decoders_not_post_encoders(layers, o) for o in origins]
    rows.append(headroom_falls_with_depth_in_pre(layers))
    rows += [deep_skip_cheaper_with_depth(layers, g) for g in groups]
    return claims_frame(rows)


def summary(layers: pd.DataFrame) -> pd.DataFrame:
    """Per checkpoint: robust stream growth, contribution first/last third, smallest skip change, largest peak."""
    rows = []
    for name, t in layers.groupby("checkpoint", sort=False):
        b = _blocks(t)
        first, last = thirds(b)
        rows.append(dict(checkpoint=name, depth=int(t["depth"].iloc[0]),
                         q_growth_median=float(b["q_rel_median"].iloc[-1]),
                         contribution_first_third=float(first["branch_rel_median"].mean()),
                         contribution_last_third=float(last["branch_rel_median"].mean()),
                         skip_change_min=float(b["skip_out_change"].min()) if "skip_out_change" in b else math.nan,
                         token_cosine_last=float(b["token_cosine"].iloc[-1]),
                         effective_rank_u_last=float(b["effective_rank_normalized"].iloc[-1]),
                         peak_ratio_max=float(b["peak_ratio"].max()) if "peak_ratio" in b else math.nan,
                         precision_headroom_min=float(b["precision_headroom"].min()) if "precision_headroom" in b else math.nan,
                         skip_cost_first_third=skip_costs(t)[0] if "skip_loss_delta" in b else math.nan,
                         skip_cost_last_third=skip_costs(t)[1] if "skip_loss_delta" in b else math.nan,
                         grad_scale_free_0=float(t["grad_scale_free"].iloc[0])))
    return pd.DataFrame(rows)
