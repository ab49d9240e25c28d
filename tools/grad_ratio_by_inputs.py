"""g_0/g_L at init against the mean field from two descriptions of the same input: the sequence's
exact token covariances, or the uniform summary (q_0, ρ_0, ρ_g) the init grid feeds the theory.

Why: on the init grid the seed mean of PreNorm's and Peri-LN's g_0/g_L lies 1.2–1.4× above
theory at L = 256 … 1024 (docs/init.md). The grid predicts each seed from three measured numbers,
the embedding's second moment and token cosine and the top gradient's token cosine, as if every
pair of tokens were alike. This measures ``--seeds`` seeds on the spread study's one sequence and
predicts from both descriptions, to tell a missing term of the theory from a summary of its
inputs that loses what the text's structure (repeated bytes, repeated targets) does.

    python tools/grad_ratio_by_inputs.py --seeds 16 --out results/init-inputs/grad_ratio_by_inputs.csv \
        pre:2 peri:2 pre:64 peri:64 pre:512 peri:512
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.init.spread import SpreadConfig, probed_at_init, study_sequence, text_covariances
from analysis.testbed.corpus import load_corpus
from probes import point_name
from theory.positional import predict_positional


def point(scheme: str, depth: int, width: int, seeds: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Measured log10 g_0/g_L over seeds on the sequence (x, y), and the mean field from exact and
    from uniform inputs."""
    study = SpreadConfig()
    cfg = study.model(scheme, depth, width)
    cov0, grad_top = text_covariances(x, y, cfg.embed_std)
    g, uniform = [], []
    kw = dict(depth=depth, seq_len=study.seq_len, width=width, heads=cfg.heads)
    for seed in range(seeds):
        m = probed_at_init(cfg, seed, x, y)
        g.append(math.log10(m[("embed", "grad_rel")]))
        summary = dict(q0=m[("embed", "second_moment")], rho0=m[("embed", "token_cosine")],
                       rho_g=m[(point_name(depth - 1), "grad_token_cosine")])
        uniform.append(math.log10(predict_positional(scheme, **summary, **kw)["g"][0]))
    g = np.array(g)
    exact = math.log10(predict_positional(scheme, cov0=cov0, grad_top=grad_top, **kw)["g"][0])
    return dict(scheme=scheme, depth=depth, width=width, seeds=seeds,
                measured_mean=float(g.mean()), measured_mean_se=float(g.std(ddof=1) / math.sqrt(seeds)),
                measured_median=float(np.median(g)), exact_inputs=exact,
                uniform_inputs=float(np.mean(uniform)),
                ratio_exact=10 ** (g.mean() - exact), ratio_uniform=10 ** (g.mean() - np.mean(uniform)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("points", nargs="+", help="SCHEME:DEPTH, e.g. pre:512")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--out", required=True, help="CSV to write (rows are written as they finish)")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x, y = study_sequence(load_corpus(None), SpreadConfig().seq_len)  # read once for every point
    rows = []
    for spec in args.points:
        scheme, depth = spec.split(":")
        r = point(scheme, int(depth), args.width, args.seeds, x, y)
        rows.append(r)
        pd.DataFrame(rows).to_csv(out, index=False)
        print(f"{scheme} L={depth}: log10 g_0/g_L {r['measured_mean']:.3f} ± {r['measured_mean_se']:.3f}; "
              f"exact inputs {r['exact_inputs']:.3f} (measured ×{r['ratio_exact']:.2f}), uniform "
              f"{r['uniform_inputs']:.3f} (×{r['ratio_uniform']:.2f})", flush=True)


if __name__ == "__main__":
    main()
