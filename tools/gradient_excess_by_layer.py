"""Where along the stack a grid's measured g_l/g_L parts from theory, and how much of it the forward
error could carry.

Why: on the 16-seed grid PreNorm's and Peri-LN's g_0/g_L lie ×1.2–1.3 above theory at L = 256
(docs/init.md), with the grid's uniform input summary and with each sequence's exact covariances
alike (tools/grid_exact_inputs.py). This reads, per layer, the seeds' mean of log10(measured /
theory) of g_l/g_L with its standard error: an excess made in the first blocks is flat along
the stack above them, one made block by block grows from the top down. Beside it, an upper bound
on what the forward error passes to the gradient: a PreNorm-like block's gradient factor
ln(g_{l−1}/g_l) falls with its input's power q no faster than 1/q, so a relative forward error
δq/q at the block's input moves it by at most −δq/q times the factor; summed over the blocks,
with the theory's factors and the measured δq/q, that bounds the share of the excess the forward
error carries.

    python tools/gradient_excess_by_layer.py --grid runs/init-w256-all16 --schemes pre,peri \
        --depths 32,64,128,256 --out results/init-w256-all16/gradient_excess_by_layer.csv
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.init.sweep import read_profiles

SITES = ("embed", "resid_post")


def stack(profiles: pd.DataFrame, scheme: str, depth: int) -> pd.DataFrame:
    """Per layer (-1 = embedding … depth − 1): the seeds' mean log10(measured/theory) of g_l/g_L
    with its SE, and the mean relative forward error of the stream."""
    rows = profiles[(profiles["scheme"] == scheme) & (profiles["depth"] == depth)]
    rows = rows[rows["point"].str.rsplit(".", n=1).str[-1].isin(SITES)]
    g = rows[rows["metric"] == "grad_rel"]
    g = g.assign(log_ratio=np.log10(g["measured"] / g["theory"])).groupby("layer").agg(
        grad_log10_excess=("log_ratio", "mean"), grad_log10_excess_se=("log_ratio", "sem"),
        theory_g=("theory", "mean"))
    q = rows[rows["metric"] == "second_moment"]
    q = q.assign(rel=q["measured"] / q["theory"] - 1).groupby("layer").agg(forward_error=("rel", "mean"))
    return g.join(q).reset_index().assign(scheme=scheme, depth=depth)


def forward_bound(layers: pd.DataFrame) -> float:
    """Upper bound on log10 of the g_0/g_L factor the forward error carries (see the docstring)."""
    ln_g = np.log(layers["theory_g"].to_numpy())
    factors = ln_g[:-1] - ln_g[1:]  # block l's ln(g_{l-1}/g_l), its input the layer above
    return float(-np.sum(factors * layers["forward_error"].to_numpy()[:-1]) / math.log(10))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", required=True, help="a finished sweep folder (init_profiles.csv)")
    p.add_argument("--schemes", required=True, help="comma-separated schemes")
    p.add_argument("--depths", required=True, help="comma-separated depths")
    p.add_argument("--out", required=True, help="CSV: one row per scheme, depth and layer")
    args = p.parse_args()
    profiles = read_profiles(Path(args.grid) / "init_profiles.csv")
    parts = []
    print("scheme depth  g_0/g_L excess (± SE)  forward error's bound  excess at layer L/8, L/2")
    for scheme in args.schemes.split(","):
        for depth in map(int, args.depths.split(",")):
            layers = stack(profiles, scheme, depth)
            if layers.empty:
                raise SystemExit(f"error: {args.grid} has no {scheme} at L = {depth}")
            bound = forward_bound(layers)
            parts.append(layers.assign(forward_bound_log10=bound))
            at = layers.set_index("layer")["grad_log10_excess"]
            top = layers.iloc[0]
            print(f"{scheme:6s} {depth:5d}  ×{10 ** top.grad_log10_excess:.3f} "
                  f"(± {top.grad_log10_excess_se:.3f} decades)  ×{10 ** bound:.3f}  "
                  f"×{10 ** at[depth // 8 - 1]:.3f}, ×{10 ** at[depth // 2 - 1]:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(parts, ignore_index=True).to_csv(out, index=False)


if __name__ == "__main__":
    main()
