"""Theory against measurement: per-layer errors, whether theory lies in the measured spread, summaries.

Errors are relative, |theory − measured| / |measured|, for second moments and gradient ratios,
and absolute, |theory − measured|, for cosines (a relative error of a cosine near 0 says
nothing). The embedding rows (theory takes their measured q_0 and ρ_0 as input), the top
block's gradient ratio (1 by definition on both sides), its gradient token cosine (an input,
ρ_g) and its first-token gradient share (uniform by assumption) are left out of the summaries.

Two predictions are compared: ``theory`` (position-resolved, the primary one) and, where the
profiles carry it, ``theory_averaged`` (the sequence-averaged symbolic recurrence); summaries
have a ``prediction`` column, ``resolved`` or ``averaged``. The averaged recurrence is the
baseline: targets are checked for the predictions and carry its error beside them
(``averaged_error``), since a position average cannot carry a causal stack's gradient sink.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

ERROR_KIND = {"second_moment": "relative", "grad_rel": "relative", "token_cosine": "absolute",
              "grad_token_cosine": "absolute", "layer_cosine": "absolute",
              "grad_first_token": "relative"}
# The targets: (scheme set, metric, site) -> (median, p99) bounds on the relative error.
# For normalized schemes the stream is 1 by construction: their forward test is the aggregate.
TARGETS = {("second_moment", "resid_post"): (0.02, 0.05), ("second_moment", "pre_norm_sum"): (0.02, 0.05),
           ("grad_rel", "resid_post"): (0.05, None)}
SPREAD_Z = 2.0  # "inside the spread": within 2 standard errors (≈ 95% for a normal mean)
MEDIAN_SPREAD = math.sqrt(math.pi / 2)  # sample median's sd over the sample mean's, for normals


def site_of(point: pd.Series) -> pd.Series:
    """'embed', 'resid_post' or 'pre_norm_sum' from point names."""
    return point.str.rsplit(".", n=1).str[-1]


def aggregate(profiles: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per (scheme, depth, layer, point, metric), with its standard error, and
    the median over seeds (``measured_median``: the typical value, measurable where seeds scatter
    by decades and their mean is set by the luckiest) with the standard error of its logarithm
    (``measured_median_se_ln``, √(π/2)·sd(ln)/√n; NaN for one seed or a value ≤ 0).

    With several seeds the spread is the standard error across seeds (init randomness and data
    together); with one seed it is that seed's standard error over batches.
    """
    keys = ["scheme", "depth", "layer", "point", "metric"]
    ln = np.log(profiles["measured"].where(profiles["measured"] > 0))
    g = profiles.assign(ln_measured=ln).groupby(keys, sort=False)
    extra = {"theory_averaged": ("theory_averaged", "first")} if "theory_averaged" in profiles else {}
    out = g.agg(measured=("measured", "mean"), measured_median=("measured", "median"),
                theory=("theory", "first"), **extra,
                seeds=("seed", "nunique"), seed_std=("measured", "std"),
                ln_std=("ln_measured", "std"), ln_count=("ln_measured", "count"),
                rows=("measured", "size"),
                batch_spread=("spread", "mean")).reset_index()
    across = out["seed_std"] / np.sqrt(out["seeds"])
    out["spread"] = np.where(out["seeds"] > 1, across, out["batch_spread"])
    out["measured_median_se_ln"] = (MEDIAN_SPREAD * out["ln_std"] / np.sqrt(out["seeds"])).where(
        out["ln_count"] == out["rows"])
    return out.drop(columns=["seed_std", "ln_std", "ln_count", "rows", "batch_spread"])


def _t_dof(seeds: pd.Series) -> pd.Series:
    """Degrees of freedom of a mean's standard error: seeds − 1 across seeds; one seed's spread
    over batches is taken as normal (infinite)."""
    return pd.Series(np.where(seeds > 1, seeds - 1, np.inf), index=seeds.index)


def add_errors(agg: pd.DataFrame) -> pd.DataFrame:
    """Add site, error kind, error, whether theory lies within SPREAD_Z spreads of the mean, and
    the noise floor: the error an exactly right theory would show at its median, given the spread.

    With n seeds, (mean − truth)/SE follows Student's t with n − 1 degrees of freedom, so an exact
    theory's error has median t_{n−1}(0.75)·SE (0.82·SE for 3 seeds), 99th percentile
    t_{n−1}(0.995)·SE (9.9·SE for 3 seeds: a p99 target needs seeds), and lies within 2 SE with
    probability P(|t_{n−1}| ≤ 2) (0.82 for 3 seeds), not 0.95: both are reported beside the
    measured ones, so a target below the noise floor is told apart from a failing theory.
    """
    out = agg.copy()
    out["site"] = site_of(out["point"])
    out["error_kind"] = out["metric"].map(ERROR_KIND)
    diff = (out["theory"] - out["measured"]).abs()
    relative = out["error_kind"] == "relative"
    out["error"] = np.where(relative, diff / out["measured"].abs(), diff)
    out["within_spread"] = diff <= SPREAD_Z * out["spread"].fillna(0)
    dof = _t_dof(out["seeds"]) if "seeds" in out else pd.Series(np.inf, index=out.index)
    spread = out["spread"].fillna(0) / np.where(relative, out["measured"].abs(), 1.0)
    out["noise_floor"] = stats.t.ppf(0.75, dof) * spread
    out["noise_floor_p99"] = stats.t.ppf(0.995, dof) * spread
    out["within_expected"] = 2 * stats.t.cdf(SPREAD_Z, dof) - 1
    return out


def comparable(errs: pd.DataFrame) -> pd.DataFrame:
    """The rows that count in summaries (see the module docstring)."""
    top = errs["point"] == "blocks." + (errs["depth"] - 1).astype(str) + ".resid_post"
    top_input = (errs["metric"].isin(["grad_rel", "grad_token_cosine", "grad_first_token"])
                 & top)  # inputs, not predictions
    keep = (errs["error_kind"].notna() & errs["theory"].notna() & (errs["site"] != "embed")
            & ~top_input)
    return errs[keep]


PREDICTIONS = {"resolved": "theory", "averaged": "theory_averaged"}
BASELINE = "averaged"  # reported beside the targets, not checked against them


def error_summary(agg: pd.DataFrame) -> pd.DataFrame:
    """errors.csv: per prediction, scheme, metric and site — median, p90, p99 error, share
    within spread, n."""
    parts = []
    for name, column in PREDICTIONS.items():
        if column not in agg:
            continue
        errs = add_errors(agg.assign(theory=agg[column]))
        rows = comparable(errs).groupby(["scheme", "metric", "site"], sort=False)
        out = rows.agg(error_kind=("error_kind", "first"), median=("error", "median"),
                       p90=("error", lambda e: e.quantile(0.9)),
                       p99=("error", lambda e: e.quantile(0.99)),
                       within_spread=("within_spread", "mean"),
                       within_expected=("within_expected", "mean"),
                       noise_floor=("noise_floor", "median"),
                       noise_floor_p99=("noise_floor_p99", "median"),
                       n=("error", "size")).reset_index()
        parts.append(out.assign(prediction=name))
    out = pd.concat(parts, ignore_index=True)
    return out[["prediction"] + [c for c in out.columns if c != "prediction"]]


def target_check(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (prediction, scheme, target): the bound, the error, pass / fail, and the
    measurement's noise floor (that statistic of an exact theory's error at the typical spread,
    see add_errors); ``resolvable`` is False where that floor exceeds the bound, i.e. where more
    seeds, not a better theory, would be needed. The BASELINE prediction gets no rows of its own:
    where the summary holds it, its error for the same statistic stands beside each row."""
    columns = ["prediction", "scheme", "metric", "site", "statistic", "target", "error", "passes",
               "noise_floor", "resolvable"]
    baseline = summary[summary["prediction"] == BASELINE].set_index(["scheme", "metric", "site"])
    rows = []
    for prediction in summary["prediction"].unique():
        if prediction == BASELINE:
            continue
        for (metric, site), (med, p99) in TARGETS.items():
            for scheme in summary["scheme"].unique():
                hit = summary[(summary["prediction"] == prediction) & (summary["scheme"] == scheme)
                              & (summary["metric"] == metric) & (summary["site"] == site)]
                if hit.empty:
                    continue
                h = hit.iloc[0]
                for stat, bound in (("median", med), ("p99", p99)):
                    if bound is not None:
                        floor = h.get("noise_floor" if stat == "median" else "noise_floor_p99",
                                      np.nan)
                        base = baseline[stat].get((scheme, metric, site), np.nan)
                        rows.append({"prediction": prediction, "scheme": scheme, "metric": metric,
                                     "site": site, "statistic": stat, "target": bound,
                                     "error": h[stat], "passes": bool(h[stat] <= bound),
                                     "noise_floor": floor,
                                     "resolvable": bool(not floor > bound),
                                     f"{BASELINE}_error": base})
    if len(baseline):
        columns.append(f"{BASELINE}_error")
    return pd.DataFrame(rows, columns=columns)


def disagreements(errs: pd.DataFrame, limit: float = 0.05) -> pd.DataFrame:
    """Every compared row whose error exceeds ``limit`` and lies outside the measured spread."""
    c = comparable(errs)
    bad = c[(c["error"] > limit) & ~c["within_spread"]]
    return bad.sort_values("error", ascending=False)
