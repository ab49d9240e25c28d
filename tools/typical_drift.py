"""The typical value of g_0/g_L across seeds to O(L/d): the norms' E[1/q̂] against the log-normal drift.

Why: across 32 seeds on one sequence (results/init-spread/spread.csv) the median of g_0/g_L follows
the mean field, not the log-normal median the spread theory implies (mean·e^{−Var/2}: at width
64, L = 256, PostNorm's median 10^1.05 against 10^−2.87). Both are O(L/d) drifts of a product of
L random factors. The mean field takes each factor's mean with the norms' 1/Q, where a norm
divides by its input's realized power q̂ and E[1/q̂] > 1/Q (theory/positional.py, _Ctx._jensen):
the mean of the product is raised by that Jensen factor at every norm, and the median lies
e^{−Var(ln g)/2} below the mean. This tool puts the two together:

    median = g_0/g_L with E[1/q̂] at the norms × e^{−Var(ln g_0/g_L)/2}

with Var from the spread theory (spread.csv's ``predicted_sd``) and E[1/q̂] either at the norms
off the trunk (``branch``) or at every norm (``all``), and compares each with the measured
median (z: the log10 difference over the median's bootstrap standard error).

    python tools/typical_drift.py --spread results/init-spread --out results/init-spread/typical_drift.csv
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from analysis.init.spread import heads_of, study_sequence, text_covariances
from analysis.testbed.corpus import load_corpus
from theory import positional as P

STATISTIC = "log10_g0_over_gL"
RULES = ("branch", "all")  # which norms divide by the realized power (positional.REALIZED_NORM)


def drift_table(spread: pd.DataFrame, seq_len: int) -> pd.DataFrame:
    """Per (scheme, width, depth) of the spread study: the measured median of log10 g_0/g_L and
    the predictions of it, each with its z."""
    x, y = study_sequence(load_corpus(None), seq_len)
    cov0, grad_top = text_covariances(x, y, embed_std=1.0)
    rows = []
    for _, r in spread[spread["statistic"] == STATISTIC].iterrows():
        kw = dict(depth=int(r.depth), seq_len=seq_len, width=int(r.width),
                  heads=heads_of(int(r.width)), cov0=cov0, grad_top=grad_top)
        mean_field = math.log10(P.predict_positional(r.scheme, **kw)["g"][0])
        if abs(mean_field - r.mean_field) > 1e-6:
            raise ValueError(f"{r.scheme} L={r.depth} width {r.width}: the mean field here "
                             f"({mean_field:.6f}) is not spread.csv's ({r.mean_field:.6f}); "
                             "run the spread study again with this code")
        drift = (r.predicted_sd * math.log(10)) ** 2 / 2 / math.log(10)  # e^{−Var/2} in log10
        row = {"scheme": r.scheme, "width": int(r.width), "depth": int(r.depth), "seeds": int(r.seeds),
               "measured_median": r.measured_median, "measured_median_se": r.measured_median_se,
               "mean_field": mean_field, "lognormal_median": mean_field - drift}
        for rule in RULES:
            raised = math.log10(P.predict_positional(r.scheme, realized_norm=rule, **kw)["g"][0])
            row[f"jensen_{rule}"] = raised - mean_field
            row[f"{rule}_median"] = raised - drift
        for name in ("mean_field", "lognormal_median", *(f"{rule}_median" for rule in RULES)):
            row[f"z_{name.removesuffix('_median')}"] = (r.measured_median - row[name]) / r.measured_median_se
        rows.append(row)
        print(f"{r.scheme} width {int(r.width)} L={int(r.depth)}: measured {r.measured_median:.3f}, "
              f"mean field {mean_field:.3f}, all {row['all_median']:.3f}", flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spread", required=True, help="a spread study's folder (spread.csv, sigprop.json)")
    p.add_argument("--seq-len", type=int, default=64, help="the study's sequence length")
    p.add_argument("--out", required=True, help="the CSV to write")
    args = p.parse_args()
    table = drift_table(pd.read_csv(Path(args.spread) / "spread.csv"), args.seq_len)
    table.to_csv(args.out, index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.round(3).to_string(index=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
