"""Theory against measurement: per-layer errors, whether theory lies in the measured spread, summaries.

Errors are relative, |theory − measured| / |measured|, for second moments and gradient ratios,
and absolute, |theory − measured|, for cosines (a relative error of a cosine near 0 says
nothing). The embedding rows (theory takes their measured q_0 and ρ_0 as input), the top
block's gradient ratio (1 by definition on both sides) and its gradient token cosine (an input,
ρ_g) are left out of the summaries.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

ERROR_KIND = {"second_moment": "relative", "grad_rel": "relative", "token_cosine": "absolute",
              "grad_token_cosine": "absolute", "layer_cosine": "absolute"}
# The targets: (scheme set, metric, site) -> (median, p99) bounds on the relative error.
# For normalized schemes the stream is 1 by construction: their forward test is the aggregate.
TARGETS = {("second_moment", "resid_post"): (0.02, 0.05), ("second_moment", "pre_norm_sum"): (0.02, 0.05),
           ("grad_rel", "resid_post"): (0.05, None)}
TARGET_SCHEMES = ("pre", "post", "span", "deepnorm")
SPREAD_Z = 2.0  # "inside the spread": within 2 standard errors (≈ 95% for a normal mean)


def site_of(point: pd.Series) -> pd.Series:
    """'embed', 'resid_post' or 'pre_norm_sum' from point names."""
    return point.str.rsplit(".", n=1).str[-1]


def aggregate(profiles: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per (scheme, depth, layer, point, metric), with its standard error.

    With several seeds the spread is the standard error across seeds (init randomness and data
    together); with one seed it is that seed's standard error over batches.
    """
    keys = ["scheme", "depth", "layer", "point", "metric"]
    g = profiles.groupby(keys, sort=False)
    out = g.agg(measured=("measured", "mean"), theory=("theory", "first"), seeds=("seed", "nunique"),
                seed_std=("measured", "std"), batch_spread=("spread", "mean")).reset_index()
    across = out["seed_std"] / np.sqrt(out["seeds"])
    out["spread"] = np.where(out["seeds"] > 1, across, out["batch_spread"])
    return out.drop(columns=["seed_std", "batch_spread"])


def add_errors(agg: pd.DataFrame) -> pd.DataFrame:
    """Add site, error kind, error and whether theory lies within SPREAD_Z spreads of the mean."""
    out = agg.copy()
    out["site"] = site_of(out["point"])
    out["error_kind"] = out["metric"].map(ERROR_KIND)
    diff = (out["theory"] - out["measured"]).abs()
    out["error"] = np.where(out["error_kind"] == "relative", diff / out["measured"].abs(), diff)
    out["within_spread"] = diff <= SPREAD_Z * out["spread"].fillna(0)
    return out


def comparable(errs: pd.DataFrame) -> pd.DataFrame:
    """The rows that count in summaries (see the module docstring)."""
    top = errs["point"] == "blocks." + (errs["depth"] - 1).astype(str) + ".resid_post"
    top_input = errs["metric"].isin(["grad_rel", "grad_token_cosine"]) & top  # inputs, not predictions
    keep = (errs["error_kind"].notna() & errs["theory"].notna() & (errs["site"] != "embed")
            & ~top_input)
    return errs[keep]


def error_summary(errs: pd.DataFrame) -> pd.DataFrame:
    """errors.csv: per scheme, metric and site — median, p90, p99 error, share within spread, n."""
    rows = comparable(errs).groupby(["scheme", "metric", "site"], sort=False)
    out = rows.agg(error_kind=("error_kind", "first"), median=("error", "median"),
                   p90=("error", lambda e: e.quantile(0.9)), p99=("error", lambda e: e.quantile(0.99)),
                   within_spread=("within_spread", "mean"), n=("error", "size")).reset_index()
    return out


def target_check(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (scheme, target): the bound, the measured error, and pass / fail."""
    rows = []
    for (metric, site), (med, p99) in TARGETS.items():
        for scheme in TARGET_SCHEMES:
            hit = summary[(summary["scheme"] == scheme) & (summary["metric"] == metric)
                          & (summary["site"] == site)]
            if hit.empty:
                continue
            h = hit.iloc[0]
            for stat, bound in (("median", med), ("p99", p99)):
                if bound is not None:
                    rows.append({"scheme": scheme, "metric": metric, "site": site, "statistic": stat,
                                 "target": bound, "error": h[stat], "passes": bool(h[stat] <= bound)})
    return pd.DataFrame(rows, columns=["scheme", "metric", "site", "statistic", "target", "error",
                                       "passes"])


def disagreements(errs: pd.DataFrame, limit: float = 0.05) -> pd.DataFrame:
    """Every compared row whose error exceeds ``limit`` and lies outside the measured spread."""
    c = comparable(errs)
    bad = c[(c["error"] > limit) & ~c["within_spread"]]
    return bad.sort_values("error", ascending=False)
