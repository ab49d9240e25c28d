"""Which stream power a block's gradient factor reads: each token's own, or their mean.

Why: theory/spread.py first carried only the token mean of every realized power. A norm divides
each token by its own power, and PreNorm's gradient is concentrated on the first tokens, so a
block's factor d_l = ln g_{l−1}/g_l should follow the powers of the tokens that hold the gradient,
which fluctuate more than their mean. This measures, per seed on the spread study's sequence,
every token's stream power q_{l,t} and gradient power at every layer, and correlates each
block's factor with the deviation (from its mean over seeds) of ln q_{l−1} two ways: the token
mean's, and the tokens' own weighted by their mean share of the gradient power.

    python tools/spread_by_token.py --scheme pre --depth 64 --width 256 --seeds 32 \
        --out results/init-spread-attention/by_token.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.init.spread import SpreadConfig, study_sequence
from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import ModelConfig, build_model


def per_token_powers(cfg: ModelConfig, seed: int, x: torch.Tensor, y: torch.Tensor
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Stream power ‖x_t‖²/d and gradient power ‖∂loss/∂x_t‖² per layer (0: the embedding) and
    token, one forward and backward at init."""
    model = build_model(cfg, seed=seed)
    streams: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> None:
        t.retain_grad()
        streams.append(t)

    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, args: keep(args[0]))]
    hooks += [b.register_forward_hook(lambda m, i, out: keep(out)) for b in model.blocks]
    _, loss = model(x[None], y[None])
    loss.backward()
    for h in hooks:
        h.remove()
    q = np.stack([(t.detach()[0] ** 2).mean(-1).numpy() for t in streams])
    g = np.stack([(t.grad[0] ** 2).sum(-1).numpy() for t in streams])
    return q, g


def correlations(Q: np.ndarray, G: np.ndarray) -> pd.DataFrame:
    """Per block l: corr over seeds of d_l with the token mean's and with the gradient-weighted
    tokens' deviation of ln q_{l−1}. Q, G: seeds × layers × tokens."""
    lg = np.log(G.mean(-1))
    d = lg[:, :-1] - lg[:, 1:]
    psi = np.log(Q) - np.log(Q).mean(0)
    psi_mean = np.log(Q.mean(-1)) - np.log(Q.mean(-1)).mean(0)
    share = (G / G.sum(-1, keepdims=True)).mean(0)  # each layer's mean gradient share per token
    rows = []
    for l in range(1, Q.shape[1]):
        weighted = (share[l] * psi[:, l - 1]).sum(-1)
        rows.append(dict(block=l, first_token_share=float(share[l, 0]),
                         corr_token_mean=float(np.corrcoef(d[:, l - 1], psi_mean[:, l - 1])[0, 1]),
                         corr_gradient_weighted=float(np.corrcoef(d[:, l - 1], weighted)[0, 1]),
                         sd_ln_q_first_token=float(psi[:, l - 1, 0].std(ddof=1)),
                         sd_ln_q_token_mean=float(psi_mean[:, l - 1].std(ddof=1))))
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", default="pre")
    p.add_argument("--depth", type=int, default=64)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seeds", type=int, default=32)
    p.add_argument("--out", required=True, help="CSV of the per-block correlations (a point's rows replaced)")
    args = p.parse_args()
    study = SpreadConfig()
    x, y = study_sequence(load_corpus(None), study.seq_len)
    cfg = study.model(args.scheme, args.depth, args.width)
    Q, G = map(np.stack, zip(*(per_token_powers(cfg, s, x, y) for s in range(args.seeds))))
    table = correlations(Q, G).assign(scheme=args.scheme, depth=args.depth, width=args.width,
                                      seeds=args.seeds)
    L = args.depth
    for lo, hi in ((1, max(L // 16, 1)), (max(L // 16, 1) + 1, L // 4), (L // 4 + 1, L)):
        part = table[(table.block >= lo) & (table.block <= hi)]
        print(f"blocks {lo}-{hi}: corr(d_l, gradient-weighted ln q) {part.corr_gradient_weighted.mean():+.2f}, "
              f"corr(d_l, token-mean ln q) {part.corr_token_mean.mean():+.2f}; first token's share "
              f"{part.first_token_share.mean():.2f}")
    out = Path(args.out)
    old = pd.read_csv(out) if out.exists() else pd.DataFrame()
    if len(old):
        old = old[~((old.scheme == args.scheme) & (old.depth == L) & (old.width == args.width))]
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.concat([old, table], ignore_index=True).to_csv(out, index=False)


if __name__ == "__main__":
    main()
