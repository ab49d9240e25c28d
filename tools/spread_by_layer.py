"""Where a scheme's spread of log10 g_0/g_L comes from: per-block factors, and their correlation.

Why: theory/spread.py composes each block's O(1/d) fluctuation assuming blocks are independent
(except for the embedding's noise, which every block shares). Then the variance of
log10 g_0/g_L = Σ_l log10(g_{l-1}/g_l) is the sum of the blocks' own variances. This measures,
over many seeds on the spread study's fixed sequence, each block's factor d_l = log10 g_{l-1}/g_l
per seed, and splits the measured variance of the sum into Σ_l Var(d_l) (what independent blocks
would give) and 2·Σ_{l<m} Cov(d_l, d_m) (what they cannot). It also correlates the total with the
stream's realized token cosine, a quantity every later block reads.

    python tools/spread_by_layer.py --scheme pre --depth 64 --width 256 --seeds 32 \
        --out results/init-spread-attention/by_layer/pre_L64_w256.csv \
        --summary results/init-spread-attention/by_layer/summary.csv

It also places the median's offset from the mean field: in the top block's factor (which takes
the LM head's gradient), in the first block's (which reads the embedding), or in the blocks
between; and, with --embedding-draws, how far the realized embedding alone moves the mean-field
median.

(Redrawing only the embedding, or only the blocks, does not split the spread: new inputs to
fixed weights are as random, relative to those weights, as new weights; either alone gives
nearly the whole spread.)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.init.typical import MEDIAN_SPREAD
from analysis.init.spread import SpreadConfig, probed_at_init, study_sequence, text_covariances
from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import ModelConfig
from probes import point_name
from theory.spread import NOISES, predict_spread


def per_layer(cfg: ModelConfig, seeds: list[int], x: torch.Tensor, y: torch.Tensor) -> pd.DataFrame:
    """Per seed and layer l = 0..L (0: the embedding): log10 g_l/g_L, the stream's token cosine and the first token's share of the gradient power."""
    L, rows = cfg.depth, []
    points = ["embed"] + [point_name(l) for l in range(L)]
    for seed in seeds:
        m = probed_at_init(cfg, seed, x, y)
        for l, point in enumerate(points):
            rows.append(dict(seed=seed, layer=l, log10_g=math.log10(m[(point, "grad_rel")]),
                             token_cosine=m[(point, "token_cosine")],
                             grad_first_token=m[(point, "grad_first_token")]))
        print(f"  seed {seed}: log10 g_0/g_L {rows[-L - 1]['log10_g']:.3f}", flush=True)
    return pd.DataFrame(rows)


def covariance_share(factors: np.ndarray) -> float:
    """1 − Σ_l Var(d_l) / Var(Σ_l d_l): the share of the total's variance that is covariance."""
    total = float(np.var(factors.sum(1), ddof=1))
    return 1 - float(np.var(factors, axis=0, ddof=1).sum()) / total if total > 0 else math.nan


def decompose(frame: pd.DataFrame, draws: int = 1000) -> dict:
    """The variance of the total split into the blocks' own variances and their covariances
    (the share's standard error by bootstrap over seeds)."""
    g = frame.pivot(index="seed", columns="layer", values="log10_g").to_numpy()
    factors = g[:, :-1] - g[:, 1:]  # d_l = log10 g_{l-1}/g_l, blocks 1..L
    total = g[:, 0] - g[:, -1]
    own = float(np.var(factors, axis=0, ddof=1).sum())
    rng = np.random.default_rng(0)
    boot = [covariance_share(factors[rng.integers(0, len(factors), len(factors))]) for _ in range(draws)]
    boot = [b for b in boot if not math.isnan(b)]  # a resample of one repeated seed has no spread
    cos = frame.pivot(index="seed", columns="layer", values="token_cosine").to_numpy()
    mid = cos.shape[1] // 2
    sd = float(np.std(total, ddof=1))
    return dict(seeds=len(total), measured_sd=sd, measured_sd_se=sd / math.sqrt(2 * (len(total) - 1)),
                independent_sd=math.sqrt(own), covariance_share=covariance_share(factors),
                covariance_share_se=float(np.std(boot, ddof=1)) if len(boot) > 1 else math.nan,
                adjacent_corr=float(np.mean([np.corrcoef(factors[:, i], factors[:, i + 1])[0, 1]
                                             for i in range(factors.shape[1] - 1)])),
                corr_total_mid_cosine=float(np.corrcoef(total, cos[:, mid])[0, 1]),
                corr_total_last_cosine=float(np.corrcoef(total, cos[:, -1])[0, 1]),
                **({} if "grad_first_token" not in frame else first_token_correlations(frame, total)))


def median_offsets(frame: pd.DataFrame, g_mean_field: np.ndarray) -> dict:
    """Where the median of log10 g_0/g_L parts from the mean field: the top block's factor, the
    first block's (which reads the embedding), and the blocks between, each the seeds' median
    less the mean field's, with the median's standard error (√(π/2)·sd/√n)."""
    g = frame.pivot(index="seed", columns="layer", values="log10_g").to_numpy()
    mf = np.log10(g_mean_field)
    parts = {"top": (g[:, -2] - g[:, -1], mf[-2] - mf[-1]),
             "first": (g[:, 0] - g[:, 1], mf[0] - mf[1]),
             "between": (g[:, 1] - g[:, -2], mf[1] - mf[-2]),
             "total": (g[:, 0] - g[:, -1], mf[0] - mf[-1])}
    out = {}
    for name, (per_seed, mean_field) in parts.items():
        out[f"median_offset_{name}"] = float(np.median(per_seed)) - mean_field
        out[f"median_offset_{name}_se"] = MEDIAN_SPREAD * float(np.std(per_seed, ddof=1)) / math.sqrt(len(per_seed))
    return out


def first_token_correlations(frame: pd.DataFrame, total: np.ndarray) -> dict:
    """Correlation of the total with the first token's share of the gradient power (the sink
    that concentrates PreNorm's gradient) at the embedding and mid-stack."""
    share = frame.pivot(index="seed", columns="layer", values="grad_first_token").to_numpy()
    mid = share.shape[1] // 2
    return dict(corr_total_embed_grad_first=float(np.corrcoef(total, np.log(share[:, 0]))[0, 1]),
                corr_total_mid_grad_first=float(np.corrcoef(total, np.log(share[:, mid]))[0, 1]))


def embedding_draws(scheme: str, cfg: ModelConfig, x: torch.Tensor, grad_top: np.ndarray,
                    draws: int, g_mean_field: float) -> dict:
    """The mean-field log10 g_0/g_L over realized embeddings: its sd, and its median less the
    mean field's from the embedding's mean covariance (``g_mean_field``). Each draw samples the
    byte and position vectors (N(0, embed_std²/2) a coordinate, as the testbed), takes their exact
    token covariance K̂_0 = X Xᵀ/d, and runs positional.py from it. Every order of the
    embedding's fluctuation, its token cosines included, with the blocks at their mean."""
    from theory.positional import predict_positional
    rng, s, T = np.random.default_rng(0), cfg.embed_std / math.sqrt(2), len(x)
    values = []
    for _ in range(draws):
        X = rng.normal(0, s, (cfg.vocab, cfg.width))[x.numpy()] + rng.normal(0, s, (T, cfg.width))
        g = predict_positional(scheme, depth=cfg.depth, seq_len=T, width=cfg.width, heads=cfg.heads,
                               cov0=X @ X.T / cfg.width, grad_top=grad_top)["g"][0]
        values.append(math.log10(g))
    return {"embedding_draws_sd": float(np.std(values, ddof=1)),
            "embedding_draws_median_offset": float(np.median(values)) - math.log10(g_mean_field)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", default="pre")
    p.add_argument("--depth", type=int, default=64)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seeds", type=int, default=32)
    p.add_argument("--embedding-draws", type=int, default=0,
                   help="also the mean-field theory over this many realized embeddings")
    p.add_argument("--out", required=True, help="CSV of the per-seed, per-layer measurements "
                   "(read back, not measured again, where it exists)")
    p.add_argument("--summary", help="CSV to which this point's decomposition row is added")
    args = p.parse_args()
    study = SpreadConfig()  # the spread study's sequence length and heads
    x, y = study_sequence(load_corpus(None), study.seq_len)
    cfg = study.model(args.scheme, args.depth, args.width)
    out = Path(args.out)
    frame = pd.read_csv(out) if out.exists() else per_layer(cfg, list(range(args.seeds)), x, y)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    cov0, grad_top = text_covariances(x, y, cfg.embed_std)
    r = decompose(frame)
    for suffix, noises in (("", NOISES), ("_token_means", tuple(k for k in NOISES if k != "tokens"))):
        pred = predict_spread(args.scheme, depth=args.depth, seq_len=study.seq_len, width=args.width,
                              heads=cfg.heads, cov0=cov0, grad_top=grad_top, noises=noises)
        r[f"predicted_sd{suffix}"] = math.sqrt(pred["var_ln_g"][0]) / math.log(10)
        r[f"predicted_independent_sd{suffix}"] = math.sqrt(np.nansum(pred["var_ln_block"][1:])) / math.log(10)
    r.update(median_offsets(frame, pred["g"]))
    if args.embedding_draws:
        r.update(embedding_draws(args.scheme, cfg, x, grad_top, args.embedding_draws, pred["g"][0]))
    for k, v in r.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    if args.summary:
        row = pd.DataFrame([dict(scheme=args.scheme, depth=args.depth, width=args.width, **r)])
        path = Path(args.summary)
        old = pd.read_csv(path) if path.exists() else pd.DataFrame()
        if len(old):
            old = old[~((old.scheme == args.scheme) & (old.depth == args.depth) & (old.width == args.width))]
        pd.concat([old, row], ignore_index=True).to_csv(path, index=False)


if __name__ == "__main__":
    main()
