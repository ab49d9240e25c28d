"""PreNorm's spread across seeds by attention kind, heads and width, against theory/spread.py.

Why: at width 256 the spread theory under-predicts PreNorm's sd of log10 g_0/g_L by 15-30 %
(docs/theory.md). If the missing noise were the heads' softmax patterns, uniform attention (no
patterns) would close the gap; it widens it instead. Each configuration measures ``--seeds`` seeds
on the spread study's fixed sequence and predicts with every noise kind, with the token means'
noises alone (no per-token channel), then with each kind alone (its per-token part included).

    python tools/spread_by_attention.py --depth 64 --seeds 32 --out results/init-spread-attention/by_attention.csv \
        256:4:causal 256:1:causal 256:4:uniform 64:1:uniform 1024:16:causal

``--predict-only`` keeps the measurements already in ``--out`` and predicts them again.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.init.spread import SpreadConfig, measure_point, study_sequence, text_covariances
from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import ModelConfig
from theory.spread import NOISES, predict_spread

SEQ_LEN = SpreadConfig().seq_len  # the spread study's sequence


def sd_log10(var_ln: float) -> float:
    """The standard deviation of log10 from the variance of ln."""
    return math.sqrt(var_ln) / math.log(10)


def measure(width: int, heads: int, attention: str, depth: int, seeds: int, x: torch.Tensor,
            y: torch.Tensor) -> dict:
    """One configuration: the measured sd of log10 g_0/g_L and of log10 q_L."""
    cfg = ModelConfig(scheme="pre", depth=depth, width=width, heads=heads, max_seq_len=SEQ_LEN,
                      attention=attention)
    measured = measure_point(cfg, list(range(seeds)), x, y)
    g, q = measured["log10_g0_over_gL"].to_numpy(), measured["log10_q_L"].to_numpy()
    sd_g = float(np.std(g, ddof=1))
    return dict(width=width, heads=heads, attention=attention, depth=depth, seeds=len(g),
                measured_sd=sd_g, measured_sd_se=sd_g / math.sqrt(2 * (len(g) - 1)),
                q_measured_sd=float(np.std(q, ddof=1)))


def predict(row: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The row with the theory's sd: every noise, the token means' alone (no per-token channel),
    and each kind alone with its per-token part."""
    cov0, grad_top = text_covariances(x, y, 1.0)
    depth = int(row["depth"])
    kw = dict(depth=depth, seq_len=SEQ_LEN, width=int(row["width"]), heads=int(row["heads"]),
              attention=row["attention"], cov0=cov0, grad_top=grad_top)
    pred = predict_spread("pre", **kw)
    out = dict(row, predicted_sd=sd_log10(pred["var_ln_g"][0]),
               q_predicted_sd=sd_log10(pred["var_ln_q"][depth]))
    out["ratio"] = out["predicted_sd"] / out["measured_sd"]
    out["q_ratio"] = out["q_predicted_sd"] / out["q_measured_sd"]
    kinds = [k for k in NOISES if k != "tokens"]
    out["token_means_only"] = sd_log10(predict_spread("pre", noises=tuple(kinds), **kw)["var_ln_g"][0])
    for kind in kinds:  # each noise kind alone: its share of the predicted spread
        out[f"only_{kind}"] = sd_log10(predict_spread("pre", noises=(kind, "tokens"), **kw)["var_ln_g"][0])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="WIDTH:HEADS:ATTENTION, e.g. 256:4:causal")
    p.add_argument("--depth", type=int, default=64)
    p.add_argument("--seeds", type=int, default=32)
    p.add_argument("--out", required=True, help="CSV to write (rows are appended as they finish)")
    p.add_argument("--predict-only", action="store_true",
                   help="keep the measurements already in --out, predict them again")
    args = p.parse_args()
    x, y = study_sequence(load_corpus(None), SEQ_LEN)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.predict_only:
        for r in pd.read_csv(out).to_dict("records"):
            done[f"{r['width']}:{r['heads']}:{r['attention']}"] = r
    rows = []
    for spec in args.configs:
        width, heads, attention = spec.split(":")
        measured = done.get(spec) or measure(int(width), int(heads), attention, args.depth,
                                             args.seeds, x, y)
        rows.append(predict(measured, x, y))
        pd.DataFrame(rows).to_csv(out, index=False)
        r = rows[-1]
        print(f"{spec}: measured {r['measured_sd']:.3f} ± {r['measured_sd_se']:.3f}, predicted "
              f"{r['predicted_sd']:.3f} (ratio {r['ratio']:.2f})", flush=True)


if __name__ == "__main__":
    main()
