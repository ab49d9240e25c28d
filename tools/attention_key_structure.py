"""Why the first block's attention output is predicted too alike across tokens on text.

Why: on text PreNorm's and LNS's stream token cosine is predicted 0.015–0.020 high at L = 32
(docs/init.md). This takes PreNorm's first block at init on the spread study's sequence,
``--seeds`` seeds, and compares the token cosine of the block's output with the theory's, and the
token cosine and power of its attention output, measured, with four predictions from the same
realized input covariance S (the normed embedding): theory/positional.py's
attention map; the exact softmax over sampled logits (``--draws`` heads of q·k/√d_h with q, k
Gaussian of token covariance S, the values at their mean), which is what the map approximates;
and both again for S made exchangeable (every off-diagonal entry replaced by their mean). The map's
pattern moments assume exchangeable keys (E P_si = 1/s); the text's repeated bytes make some keys
alike, so their logits move together.

    python tools/attention_key_structure.py --seeds 32 --out results/init-attention-keys/block1.csv
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.init.spread import SpreadConfig, study_sequence, text_covariances
from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import build_model
from theory import positional as P
from theory.spread import sample_patterns


def covariance(t: torch.Tensor) -> np.ndarray:
    """Token covariance (per coordinate) of a T × d activation."""
    a = t.double().numpy()
    return a @ a.T / a.shape[1]


def block1(cfg, seed: int, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token covariances of block 1's attention input and output, and of the block's output."""
    model = build_model(cfg, seed=seed)
    seen = {}
    hooks = [model.blocks[0].attns[0].register_forward_hook(
                 lambda m, i, o: seen.update(inp=i[0][0].detach(), out=o[0].detach())),
             model.blocks[0].register_forward_hook(lambda m, i, o: seen.update(stream=o[0].detach()))]
    with torch.no_grad():
        model(x[None])
    for h in hooks:
        h.remove()
    return covariance(seen["inp"]), covariance(seen["out"]), covariance(seen["stream"])


def exact_softmax(S: np.ndarray, head_dim: int, draws: int, seed: int) -> np.ndarray:
    """E[P S Pᵀ] over ``draws`` sampled causal heads for input covariance S."""
    P_ = sample_patterns(S, head_dim, 1.0, "causal", seed, draws=draws)
    return np.mean(P_ @ S @ P_.transpose(0, 2, 1), axis=0)


def exchangeable(S: np.ndarray) -> np.ndarray:
    """S with every off-diagonal entry replaced by their mean (the diagonal kept)."""
    T = S.shape[0]
    out = np.full((T, T), (S.sum() - np.trace(S)) / (T * (T - 1)))
    np.fill_diagonal(out, np.diag(S))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seeds", type=int, default=32)
    p.add_argument("--draws", type=int, default=500, help="sampled heads per exact-softmax estimate")
    p.add_argument("--out", required=True, help="CSV: one row per seed")
    args = p.parse_args()
    study = SpreadConfig()
    x, y = study_sequence(load_corpus(None), study.seq_len)
    cfg = study.model("pre", 1, args.width)
    head_dim = args.width // cfg.heads
    cov0, grad_top = text_covariances(x, y, cfg.embed_std)
    stream_theory = P.predict_positional("pre", depth=1, seq_len=study.seq_len, width=args.width,
                                         heads=cfg.heads, cov0=cov0, grad_top=grad_top)["rho"][1]
    rows = []
    for seed in range(args.seeds):
        S, K, stream = block1(cfg, seed, x)
        Su = exchangeable(S)
        preds = {"map": P.attention(S, sigma=cfg.sigma, width=args.width)[0],
                 "exact_softmax": exact_softmax(S, head_dim, args.draws, seed),
                 "exchangeable_map": P.attention(Su, sigma=cfg.sigma, width=args.width)[0],
                 "exchangeable_exact_softmax": exact_softmax(Su, head_dim, args.draws, seed)}
        row = dict(seed=seed, measured_cosine=P.mean_cosine(K), measured_power=float(np.trace(K)) / len(K),
                   stream_measured_cosine=P.mean_cosine(stream), stream_theory_cosine=stream_theory)
        for name, M in preds.items():
            row[f"{name}_cosine"] = P.mean_cosine(M)
            row[f"{name}_power"] = float(np.trace(M)) / len(M)
        rows.append(row)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    n = len(table)
    print(f"block 1, {n} seeds, width {args.width}: mean token cosine of the attention output "
          "(and of the block's output, the stream)")
    for col in [c for c in table if c.endswith("_cosine")]:
        se = table[col].std(ddof=1) / math.sqrt(n)
        print(f"  {col[:-7]:28s} {table[col].mean():.4f} ± {se:.4f}")


if __name__ == "__main__":
    main()
