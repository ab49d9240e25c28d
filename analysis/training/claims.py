"""Claims checked on trained models: the seed paper's training-time claims as verdicts.

Reads a grid's ``train_runs.csv`` and ``train_profiles.csv`` (any grid: the CPU one, the GPU
campaign's) and returns rows of the shared claims table (theory.claim_table: claim, scheme,
statement, method, status, evidence). Thresholds are stated in the statement. With several seeds a
comparison uses the spread across seeds (standard error of the mean); a band must hold for every
seed. A claim whose scheme, depths or seeds were not trained is 'untested', never dropped.

Claims (SpanNorm, arXiv 2601.22580, unless cited otherwise):
- stability: a scheme trains at every depth at one shared learning rate and warmup without
  diverging or stalling (the run's status, analysis.training.train: its training loss stayed
  above 0.95 × the entropy of the corpus's byte frequencies, the plateau of a model that learned
  which bytes are common and no context; in tables older than statuses, the final validation
  loss above STALL × that entropy). Cut runs are not results yet and are left out;
- depth efficiency: validation loss against log2 depth (slope with its standard error); span
  gains from depth at least as much as pre, and span ≤ pre at the deepest depth (dense, MoE);
- collapse after training: pre's last-half blocks turn the stream less than its first-half
  blocks (angular distance, Gromov et al. 2024, arXiv 2403.17887), tokens stay distinct (token
  cosine at the last block), effective rank keeps a quarter of its init value, span's is not
  below pre's;
- gradient balance during training: g_0/g_L within a band at init, middle and end;
- update size: per-block relative update (DeepNet's "model update", arXiv 2203.00555) within a
  stated ratio across the blocks of the deepest model, at every measured step.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd

from theory.claim_table import Claim, claims_frame

METHOD = "measured after training"
STALL = 0.95  # final validation loss above 0.95 × the corpus's unigram entropy: learned no context
GRADIENT_BAND = 10.0  # g_0/g_L within [1/10, 10]
UPDATE_RATIO = 3.0  # max/min per-block update size across the stack
COSINE_COLLAPSED = 0.9  # token cosine at the last block at or above this: tokens alike
RANK_KEPT = 0.25  # effective rank after training below a quarter of its init value: collapsed
RANK_COLLAPSED = 2.0  # an effective rank below 2: one direction carries the stream, whatever it was at init


def _kinds(runs: pd.DataFrame) -> list[str]:
    return sorted(runs["moe"].unique(), key=lambda k: (k != "dense", k))


def stability(runs: pd.DataFrame, scheme: str, kind: str, unigram_bpb: float) -> tuple[str, str]:
    """Every run of ``scheme`` trains: no divergence, final validation loss below STALL × the
    unigram entropy ``unigram_bpb`` (bits/byte)."""
    r = runs[(runs["scheme"] == scheme) & (runs["moe"] == kind)]
    if not len(r):
        return "untested", f"no {kind} run of {scheme}"
    bad = []
    for row in r.itertuples():
        # the run's own status, or its final loss on the plateau (a run can learn for a while,
        # escape the status rule, and end back on the plateau)
        stalled = ((row.status == "stalled" if "status" in r else False)
                   or row.final_val_bpb > STALL * unigram_bpb)
        if bool(row.diverged):
            bad.append(f"L={row.depth} seed {row.seed} diverged at step {row.divergence_step}")
        elif stalled:
            bad.append(f"L={row.depth} seed {row.seed} stalled at {row.final_val_bpb:.3f} bits/byte")
    lrs = sorted(r["lr"].unique())
    head = (f"{len(r)} runs, depths {', '.join(map(str, sorted(r['depth'].unique())))}, "
            f"lr {', '.join(f'{v:g}' for v in lrs)}")
    head += f"; unigram entropy {unigram_bpb:.3f} bits/byte"
    return ("fails" if bad else "holds"), head + ("; " + "; ".join(bad) if bad else "; all trained")


def unstable(runs: pd.DataFrame, scheme: str, kind: str, unigram_bpb: float) -> tuple[str, str]:
    """The converse claim (PostNorm is unstable at depth): holds if a run diverged or stalled."""
    status, evidence = stability(runs, scheme, kind, unigram_bpb)
    return {"holds": "fails", "fails": "holds"}.get(status, status), evidence


def depth_slope(runs: pd.DataFrame, scheme: str, kind: str) -> tuple[float, float, int]:
    """Slope of final validation bits/byte against log2 depth over the non-diverged runs, its
    standard error (OLS over every seed's run), and the number of depths."""
    r = runs[(runs["scheme"] == scheme) & (runs["moe"] == kind) & ~runs["diverged"].astype(bool)]
    r = r[np.isfinite(r["final_val_bpb"])]
    depths = r["depth"].nunique()
    if depths < 2:
        return math.nan, math.nan, depths
    x, y = np.log2(r["depth"].to_numpy(float)), r["final_val_bpb"].to_numpy(float)
    slope, icept = np.polyfit(x, y, 1)
    resid = y - (icept + slope * x)
    dof = len(x) - 2
    se = math.sqrt((resid ** 2).sum() / dof / ((x - x.mean()) ** 2).sum()) if dof > 0 else math.nan
    return float(slope), se, depths


def gains_from_depth(runs: pd.DataFrame, kind: str, a: str = "span", b: str = "pre") -> tuple[str, str]:
    """``a`` gains from depth at least as much as ``b``: slope_a ≤ slope_b + 2·SE of the difference."""
    (sa, ea, na), (sb, eb, nb) = depth_slope(runs, a, kind), depth_slope(runs, b, kind)
    if min(na, nb) < 3:
        return "untested", f"needs ≥ 3 trained depths of {a} and {b} ({kind}), got {na} and {nb}"
    se = math.hypot(ea, eb) if np.isfinite(ea) and np.isfinite(eb) else 0.0
    ok = sa <= sb + 2 * se
    return ("holds" if ok else "fails",
            f"bits/byte per doubling of depth: {a} {sa:+.3f} ± {ea:.3f}, {b} {sb:+.3f} ± {eb:.3f} "
            f"(difference {sa - sb:+.3f} ± {se:.3f})")


def deepest_difference(runs: pd.DataFrame, kind: str, a: str, b: str) -> dict | None:
    """At the deepest depth both ``a`` and ``b`` trained (``kind``): the depth, each scheme's runs,
    the schemes with a diverged seed, and the difference of the seed-mean final losses (a − b)
    with its standard error; None if there is no such depth."""
    r = runs[(runs["moe"] == kind) & runs["scheme"].isin([a, b])]
    common = set(r[r["scheme"] == a]["depth"]) & set(r[r["scheme"] == b]["depth"])
    if not common:
        return None
    d = max(common)
    va, vb = (r[(r["scheme"] == s) & (r["depth"] == d)] for s in (a, b))
    diverged = [s for s, v in ((a, va), (b, vb)) if v["diverged"].astype(bool).any()]
    se = math.hypot(*(v["final_val_bpb"].std() / math.sqrt(len(v)) if len(v) > 1 else 0.0
                      for v in (va, vb)))
    return {"depth": d, "a": va, "b": vb, "diverged": diverged, "se": se,
            "diff": va["final_val_bpb"].mean() - vb["final_val_bpb"].mean()}


def better_at_deepest(runs: pd.DataFrame, kind: str, a: str = "span", b: str = "pre") -> tuple[str, str]:
    """``a``'s final validation loss ≤ ``b``'s at the deepest depth both trained (within 2 SE)."""
    c = deepest_difference(runs, kind, a, b)
    if c is None:
        return "untested", f"no depth where both {a} and {b} trained ({kind})"
    d, va, vb, se = c["depth"], c["a"], c["b"], c["se"]
    if c["diverged"]:
        return ("holds" if c["diverged"] == [b] else "fails",
                f"L={d}: {', '.join(c['diverged'])} diverged in some seed")
    ma, mb = va["final_val_bpb"].mean(), vb["final_val_bpb"].mean()
    ok = ma <= mb + 2 * se
    return ("holds" if ok else "fails",
            f"L={d}: {a} {ma:.4f} vs {b} {mb:.4f} bits/byte (difference {ma - mb:+.4f} ± {se:.4f}, "
            f"{len(va)} and {len(vb)} seeds)")


def _deepest(profiles: pd.DataFrame, scheme: str, kind: str) -> pd.DataFrame:
    p = profiles[(profiles["scheme"] == scheme) & (profiles["moe"] == kind)]
    return p[p["depth"] == p["depth"].max()] if len(p) else p


def _per_layer(p: pd.DataFrame, metric: str, tag: str) -> pd.DataFrame:
    """Block-output rows of ``metric`` at ``tag``: layer × seed → mean."""
    rows = p[(p["metric"] == metric) & (p["tag"] == tag) & (p["site"] == "resid_post")]
    return rows.pivot_table(index="layer", columns="seed", values="mean")


def deep_layers_change_little(profiles: pd.DataFrame, scheme: str, kind: str) -> tuple[str, str]:
    """After training, ``scheme``'s last-half blocks turn the stream less than its first-half
    blocks (mean angular distance arccos(cos(x_{l-1}, x_l))/π), in every seed."""
    p = _deepest(profiles, scheme, kind)
    t = _per_layer(p, "layer_cosine", "end") if len(p) else pd.DataFrame()
    if len(t) < 4:
        return "untested", f"needs a trained {kind} {scheme} model of ≥ 4 blocks with profiles"
    ang = np.arccos(t.clip(-1, 1)) / np.pi
    half = len(ang) // 2
    first, last = ang.iloc[:half].mean(), ang.iloc[half:].mean()
    ok = bool((last < first).all())
    return ("holds" if ok else "fails",
            f"L={int(p['depth'].iloc[0])}, angular distance per block, first half vs last half, per "
            f"seed: " + "; ".join(f"{f:.3f} vs {l:.3f}" for f, l in zip(first, last)))


def tokens_stay_distinct(profiles: pd.DataFrame, scheme: str, kind: str) -> tuple[str, str]:
    """After training, the last block's token cosine stays below COSINE_COLLAPSED in every seed."""
    p = _deepest(profiles, scheme, kind)
    t = _per_layer(p, "token_cosine", "end") if len(p) else pd.DataFrame()
    i = _per_layer(p, "token_cosine", "init") if len(p) else pd.DataFrame()
    if not len(t):
        return "untested", f"no profiles of a trained {kind} {scheme} model"
    last, start = t.iloc[-1], (i.iloc[-1] if len(i) else None)
    ok = bool((last < COSINE_COLLAPSED).all())
    init = f" (at init {start.mean():.3f})" if start is not None else ""
    return ("holds" if ok else "fails",
            f"L={int(p['depth'].iloc[0])}: last-block token cosine after training "
            f"{', '.join(f'{v:.3f}' for v in last)}{init}")


def rank_not_collapsed(profiles: pd.DataFrame, scheme: str, kind: str) -> tuple[str, str]:
    """After training, the last block's effective rank keeps ≥ RANK_KEPT of its value at init
    (a random stream's rank at init is high by construction; training lowers it) and stays
    ≥ RANK_COLLAPSED, every seed: a stream collapsed already at init (deep PostNorm) has not kept
    its rank by staying collapsed."""
    p = _deepest(profiles, scheme, kind)
    t = _per_layer(p, "effective_rank", "end") if len(p) else pd.DataFrame()
    i = _per_layer(p, "effective_rank", "init") if len(p) else pd.DataFrame()
    if not len(t) or not len(i):
        return "untested", f"no effective-rank profiles of a trained {kind} {scheme} model"
    end, start = t.iloc[-1], i.iloc[-1]
    ok = bool(((end >= RANK_KEPT * start) & (end >= RANK_COLLAPSED)).all())
    collapsed = " (below 2: collapsed)" if (end < RANK_COLLAPSED).any() else ""
    return ("holds" if ok else "fails",
            f"L={int(p['depth'].iloc[0])}: last-block effective rank init → end per seed: "
            + "; ".join(f"{a:.1f} → {b:.1f}" for a, b in zip(start, end)) + collapsed)


def rank_not_below(profiles: pd.DataFrame, kind: str, a: str = "span", b: str = "pre") -> tuple[str, str]:
    """After training, ``a``'s last-block effective rank ≥ ``b``'s at the deepest common depth
    (within 2 SE across seeds)."""
    ends = {}
    for s in (a, b):
        p = _deepest(profiles, s, kind)
        t = _per_layer(p, "effective_rank", "end") if len(p) else pd.DataFrame()
        if not len(t):
            return "untested", f"no effective-rank profiles of a trained {kind} {s} model"
        ends[s] = (int(p["depth"].iloc[0]), t.iloc[-1])
    if ends[a][0] != ends[b][0]:
        return "untested", f"deepest {a} (L={ends[a][0]}) and {b} (L={ends[b][0]}) differ"
    va, vb = ends[a][1], ends[b][1]
    se = math.hypot(*(v.std() / math.sqrt(len(v)) if len(v) > 1 else 0.0 for v in (va, vb)))
    ok = va.mean() >= vb.mean() - 2 * se
    return ("holds" if ok else "fails",
            f"L={ends[a][0]}: last-block effective rank after training {a} {va.mean():.2f}, "
            f"{b} {vb.mean():.2f} (± {se:.2f})")


def gradient_band(profiles: pd.DataFrame, scheme: str, kind: str) -> tuple[str, str]:
    """g_0/g_L (embedding over last block, gradient second moment) within [1/B, B] at every
    measured point of training (init, middle, end), every seed, the deepest model."""
    p = _deepest(profiles, scheme, kind)
    g = p[p["metric"] == "grad_second_moment"] if len(p) else p
    if not len(g):
        return "untested", f"no gradient profiles of a trained {kind} {scheme} model"
    L = int(p["depth"].iloc[0])
    ratios = []
    for (tag, seed), rows in g.groupby(["tag", "seed"]):
        emb = rows[rows["point"] == "embed"]["mean"]
        top = rows[rows["point"] == f"blocks.{L - 1}.resid_post"]["mean"]
        if len(emb) and len(top) and top.iloc[0] > 0:
            ratios.append((tag, seed, float(emb.iloc[0] / top.iloc[0])))
    if not ratios:
        return "untested", "the embedding or last block has no gradient"
    ok = all(1 / GRADIENT_BAND <= r <= GRADIENT_BAND for _, _, r in ratios)
    by_tag: dict[str, list[str]] = {}
    for tag, _, r in sorted(ratios, key=lambda t: ({"init": 0, "end": 2}.get(t[0], 1), t[1])):
        by_tag.setdefault(tag, []).append(f"{r:.3g}")
    return ("holds" if ok else "fails", f"L={L}: g_0/g_L per seed: "
            + "; ".join(f"{tag} {', '.join(v)}" for tag, v in by_tag.items()))


def update_spread(profiles: pd.DataFrame, scheme: str, kind: str) -> tuple[str, str]:
    """At every measured step, the deepest model's per-block update sizes (mean over seeds) are
    within UPDATE_RATIO of each other (max/min)."""
    p = _deepest(profiles, scheme, kind)
    u = p[p["metric"] == "update_size"] if len(p) else p
    if not len(u):
        return "untested", f"no update sizes of a trained {kind} {scheme} model"
    parts, ok = [], True
    for tag in sorted(u["tag"].unique(), key=lambda s: int(str(s).removeprefix("step"))):
        per_block = u[u["tag"] == tag].groupby("layer")["mean"].mean()
        ratio = float(per_block.max() / per_block.min()) if per_block.min() > 0 else math.inf
        ok &= ratio <= UPDATE_RATIO
        parts.append(f"{tag}: {per_block.min():.3g} … {per_block.max():.3g} (max/min {ratio:.3g})")
    return ("holds" if ok else "fails",
            f"L={int(p['depth'].iloc[0])}, per-block update size " + "; ".join(parts))


BASE_SCHEMES = ("pre", "post", "span", "deepnorm")
RUN_KEYS = ("scheme", "depth", "moe", "seed")  # what names one run in runs and in profiles


def registry(kinds: list[str], unigram_bpb: float, extra: tuple[str, ...] = ()
             ) -> list[tuple[str, str, str, Callable]]:
    """(claim, scheme, statement, check(runs, profiles)) for every training claim and FFN kind;
    ``extra``: more schemes (a reading, a scheme of one's own) that get every per-scheme claim,
    stable training included."""
    schemes = BASE_SCHEMES + tuple(s for s in extra if s not in BASE_SCHEMES)
    claims = []
    for kind in kinds:
        k = f" ({kind})"
        for s in (s for s in schemes if s != "post"):
            claims.append((f"{s}_trains_stably_{kind}", s,
                           f"{s} trains at every depth at one lr without diverging or stalling "
                           f"(final loss < {STALL} × the unigram entropy){k}",
                           lambda r, p, s=s, kind=kind: stability(r, s, kind, unigram_bpb)))
        claims.append((f"post_unstable_{kind}", "post",
                        f"post diverges or stalls at some depth at the shared lr{k}",
                        lambda r, p, kind=kind: unstable(r, "post", kind, unigram_bpb)))
        claims.append((f"span_gains_from_depth_{kind}", "span",
                       f"span's loss falls with depth at least as fast as pre's (slope per doubling "
                       f"within 2 SE){k}", lambda r, p, kind=kind: gains_from_depth(r, kind)))
        claims.append((f"span_rank_not_below_pre_{kind}", "span",
                       f"after training, span's last-block effective rank ≥ pre's (within 2 SE){k}",
                       lambda r, p, kind=kind: rank_not_below(p, kind)))
        claims.append((f"span_not_worse_than_pre_deepest_{kind}", "span",
                       f"span's final validation loss ≤ pre's at the deepest depth (within 2 SE){k}",
                       lambda r, p, kind=kind: better_at_deepest(r, kind)))
        for s in schemes:
            claims += [
                (f"{s}_deep_blocks_turn_less_{kind}", s,
                 f"after training, {s}'s last-half blocks turn the stream less than its first-half "
                 f"blocks (angular distance){k}",
                 lambda r, p, s=s, kind=kind: deep_layers_change_little(p, s, kind)),
                (f"{s}_tokens_distinct_{kind}", s,
                 f"after training, {s}'s last-block token cosine < {COSINE_COLLAPSED}{k}",
                 lambda r, p, s=s, kind=kind: tokens_stay_distinct(p, s, kind)),
                (f"{s}_rank_not_collapsed_{kind}", s,
                 f"after training, {s}'s last-block effective rank ≥ {RANK_KEPT:g} × its value at "
                 f"init and ≥ {RANK_COLLAPSED:g}{k}", lambda r, p, s=s, kind=kind: rank_not_collapsed(p, s, kind)),
                (f"{s}_gradient_band_{kind}", s,
                 f"{s}'s g_0/g_L stays within [1/{GRADIENT_BAND:g}, {GRADIENT_BAND:g}] at init, "
                 f"middle and end of training{k}",
                 lambda r, p, s=s, kind=kind: gradient_band(p, s, kind)),
                (f"{s}_update_size_even_{kind}", s,
                 f"{s}'s per-block update sizes are within ×{UPDATE_RATIO:g} of each other at "
                 f"every measured step{k}",
                 lambda r, p, s=s, kind=kind: update_spread(p, s, kind)),
            ]
    return claims


def check_training_claims(runs: pd.DataFrame, profiles: pd.DataFrame, unigram_bpb: float
                          ) -> pd.DataFrame:
    """claims.csv rows for a trained grid: every training claim about a scheme the grid trained,
    with status and evidence (a claim about a scheme not in the grid is no result of it);
    ``unigram_bpb``: the corpus's byte entropy (Corpus.unigram_bits), a stalled run's plateau."""
    trained = set(runs["scheme"]) if "scheme" in runs else set()
    if "status" in runs:  # a cut run has not finished: no evidence either way yet, nor its profiles
        cut = runs.loc[runs["status"] == "cut", [c for c in RUN_KEYS if c in runs]]
        runs = runs[runs["status"] != "cut"]
        if len(cut) and len(profiles) and set(cut.columns) <= set(profiles.columns):
            hit = profiles.merge(cut.drop_duplicates(), on=list(cut.columns), how="left", indicator=True)
            profiles = profiles[(hit["_merge"] == "left_only").to_numpy()]
    return claims_frame(Claim(claim, scheme, statement, METHOD, *check(runs, profiles))
                        for claim, scheme, statement, check in registry(_kinds(runs) or ["dense"],
                                                                        unigram_bpb, tuple(sorted(trained)))
                        if scheme in trained)
