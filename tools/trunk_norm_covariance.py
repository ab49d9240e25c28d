"""Is a trunk norm's 1/q̂ independent of the gradient power its block passes back? Monte Carlo.

Why: theory/positional.py's ``realized_norm`` raises a norm's backward by Q·E[1/q̂], assuming
the gradient it scales does not covary with the realized power q̂ of the norm's input. For a
norm on a branch that holds (the branch's weights are not in q̂). For a norm on the trunk,
y = N(x + β·F(x)), the same weights make F(x), inside q̂, and J_F, in the backward
g_x = (I + β·J_Fᵀ)·P·g_y/√q̂, so E[|g_x|²] = E[N/q̂] with N = |g_x|²·q̂ need not be
E[N]·E[1/q̂]. Here the block is the FFN half of a PostNorm block (β = 1) or a down-weighted one
(β < 1, SpanNorm's and DeepNorm's branches), its input a LayerNorm's output, the gradient at its
output independent Gaussian; per token, over seeds × tokens:

- ``jensen``: Q·E[1/q̂] − 1, the term realized_norm adds;
- ``covariance``: E[N/q̂]/(E[N]·E[1/q̂]) − 1, what independence leaves out, with its jackknife
  standard error over seeds.

    python tools/trunk_norm_covariance.py --out results/init-spread/trunk_norm_covariance.csv
"""

from __future__ import annotations

import argparse
import math

import pandas as pd
import torch


def sample(d: int, beta: float, seeds: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Per seed, the token means of |g_x|²/d, |g_x|²·q̂/d, 1/q̂ and q̂ (seeds × 4)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(seeds):
        w1 = torch.randn(4 * d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        w2 = torch.randn(d, 4 * d, generator=gen, dtype=torch.float64) / math.sqrt(4 * d)
        x = torch.nn.functional.layer_norm(
            torch.randn(tokens, d, generator=gen, dtype=torch.float64), (d,)).requires_grad_(True)
        z = x + beta * (torch.nn.functional.gelu(x @ w1.T) @ w2.T)
        q = z.detach().var(dim=1, unbiased=False)  # what the LayerNorm divides by
        g = torch.randn(tokens, d, generator=gen, dtype=torch.float64)
        (torch.nn.functional.layer_norm(z, (d,)) * g).sum().backward()
        gx = (x.grad ** 2).mean(1)
        out.append(torch.stack([gx, gx * q, 1 / q, q]).mean(1))
    return torch.stack(out)


def covariance(per_seed: torch.Tensor) -> tuple[float, float, float]:
    """(jensen, covariance, covariance's jackknife SE) from sample()'s per-seed means."""
    def terms(m: torch.Tensor) -> tuple[float, float]:
        return float(m[2] * m[3] - 1), float(m[0] / (m[1] * m[2]) - 1)

    n = per_seed.shape[0]
    jensen, cov = terms(per_seed.mean(0))
    total = per_seed.sum(0)
    jack = torch.tensor([terms((total - per_seed[i]) / (n - 1))[1] for i in range(n)])
    se = math.sqrt((n - 1) / n * float(((jack - jack.mean()) ** 2).sum()))
    return jensen, cov, se


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="64,256", help="comma-separated widths d")
    p.add_argument("--betas", default="1,0.25", help="comma-separated branch scales β")
    p.add_argument("--seeds", type=int, default=300, help="independent draws of the weights")
    p.add_argument("--tokens", type=int, default=256, help="tokens per draw")
    p.add_argument("--out", required=True, help="the CSV to write")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for d in (int(w) for w in args.widths.split(",")):
        for beta in (float(b) for b in args.betas.split(",")):
            jensen, cov, se = covariance(sample(d, beta, args.seeds, args.tokens))
            rows.append({"width": d, "beta": beta, "seeds": args.seeds, "tokens": args.tokens,
                         "jensen": jensen, "covariance": cov, "covariance_se": se})
            print(f"d={d} β={beta}: Q·E[1/q̂] − 1 = {jensen:.5f}, "
                  f"E[N/q̂]/(E N·E[1/q̂]) − 1 = {cov:+.5f} ± {se:.5f}", flush=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
