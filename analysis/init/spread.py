"""The spread across initializations: theory/spread.py's prediction against sweeps with many seeds.

For each (scheme, depth) of one or more sweep folders (``init_profiles.csv``, one row per seed), the
statistics whose mean mean-field theory predicts are read per seed in log10: g_0/g_L (the gradient
at the embedding over the top block's) and q_L (the last block's stream, or the aggregate before
its output norm). Their standard deviation across seeds is compared with the predicted one, the sum of
two parts: the weights' spread predicted at the seeds' mean inputs (q_0, ρ_0, ρ_g), and the mean
field's own spread over each seed's measured inputs (each seed reads its own text). The median is
compared with the mean-field mean and the predicted median.
A standard deviation's standard error comes from a seeded bootstrap over the seeds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from probes import point_name
from theory.spread import median_from_mean, predict_spread

TOLERANCE = 0.20  # the predicted sd within 20 % of the measured one (issue 30)
STATISTICS = ("log10_g0_over_gL", "log10_q_L")
COLUMNS = ["scheme", "depth", "width", "heads", "sequences", "seeds", "statistic", "predicted_sd",
           "predicted_sd_weights", "predicted_sd_text", "measured_sd",
           "measured_sd_se", "ratio", "within_tolerance", "mean_field", "predicted_median",
           "measured_median", "measured_median_se"]


def bootstrap_se(values: np.ndarray, stat: Callable[[np.ndarray], float], draws: int = 2000,
                 seed: int = 0) -> float:
    """Standard error of ``stat`` over resamples of ``values`` with replacement (seeded)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), (draws, len(values)))
    return float(np.std([stat(values[i]) for i in idx], ddof=1))


def per_seed(rows: pd.DataFrame, depth: int) -> pd.DataFrame:
    """One (scheme, depth)'s per-seed log10 statistics, measured and mean-field, and theory inputs."""
    last = point_name(depth - 1)
    out = []
    for seed, r in rows.groupby("seed"):
        idx = r.set_index(["point", "metric"])
        g = idx.loc[("embed", "grad_rel")]
        agg = (point_name(depth - 1, "pre_norm_sum"), "second_moment")
        q = idx.loc[agg] if agg in idx.index else idx.loc[(last, "second_moment")]
        out.append({"seed": seed,
                    "log10_g0_over_gL": math.log10(g["measured"]), "mf_g": g["theory"],
                    "log10_q_L": math.log10(q["measured"]), "mf_q": q["theory"],
                    "q0": idx.loc[("embed", "second_moment"), "measured"],
                    "rho0": idx.loc[("embed", "token_cosine"), "measured"],
                    "rho_g": idx.loc[(last, "grad_token_cosine"), "measured"]})
    return pd.DataFrame(out)


def spread_table(profiles: pd.DataFrame, config: dict, log: Callable[[str], None] = print
                 ) -> pd.DataFrame:
    """Predicted against measured spread and median, a row per scheme, depth and statistic."""
    shape = {k: config[k] for k in ("width", "heads", "ffn", "norm", "sigma", "attention") if k in config}
    rows = []
    for (scheme, depth), r in profiles.groupby(["scheme", "depth"], sort=False):
        depth = int(depth)
        seeds = per_seed(r, depth)
        inputs = {k: float(seeds[k].mean()) for k in ("q0", "rho0", "rho_g")}
        pred = predict_spread(scheme, depth=depth, seq_len=int(config["seq_len"]), **inputs, **shape)
        predicted = {"log10_g0_over_gL": (pred["var_ln_g"][0], pred["g"][0], "mf_g"),
                     "log10_q_L": (pred["var_ln_q"][depth], pred["q"][depth], "mf_q")}
        for stat, (var_ln, mean, mf_col) in predicted.items():
            v = seeds[stat].to_numpy(float)
            sd = float(np.std(v, ddof=1))
            # Var = E[Var | text] + Var(E | text): the weights' spread at the mean inputs, and
            # the mean field's own spread over each seed's measured text inputs
            weights = math.sqrt(var_ln) / math.log(10)
            text = float(np.std(np.log10(seeds[mf_col]), ddof=1))
            psd = math.hypot(weights, text)
            mean_field = float(np.log10(seeds[mf_col]).mean())
            rows.append({"scheme": scheme, "depth": depth, "width": int(config["width"]),
                         "heads": int(config["heads"]),
                         "sequences": int(config["batch_size"]) * int(config["batches"]),
                         "seeds": len(v), "statistic": stat,
                         "predicted_sd": psd, "predicted_sd_weights": weights,
                         "predicted_sd_text": text, "measured_sd": sd,
                         "measured_sd_se": bootstrap_se(v, lambda x: float(np.std(x, ddof=1))),
                         "ratio": psd / sd if sd > 0 else math.nan,
                         "within_tolerance": bool(sd > 0 and abs(psd / sd - 1) <= TOLERANCE),
                         "mean_field": mean_field,
                         "predicted_median": mean_field + math.log10(median_from_mean(1.0, var_ln)),
                         "measured_median": float(np.median(v)),
                         "measured_median_se": bootstrap_se(v, lambda x: float(np.median(x)))})
        log(f"  {scheme} L={depth} width {config['width']}: sd of log10 g0/gL predicted "
            f"{rows[-2]['predicted_sd']:.3f}, measured {rows[-2]['measured_sd']:.3f}")
    return pd.DataFrame(rows, columns=COLUMNS)


def read_grid(folder: Path) -> tuple[pd.DataFrame, dict]:
    """A sweep folder's init_profiles and config (ValueError naming what is missing)."""
    from analysis.init.sweep import read_profiles
    prof, cfg = folder / "init_profiles.csv", folder / "config.json"
    for f in (prof, cfg):
        if not f.is_file():
            raise ValueError(f"{folder} is not a sweep folder: no {f.name}")
    return read_profiles(prof), json.loads(cfg.read_text())


def growth_orders(table: pd.DataFrame) -> pd.DataFrame:
    """Per scheme and width: the exponent of median g_0/g_L in L, measured (fit to the medians,
    with its standard error from theirs) against the predicted medians' and the mean field's."""
    rows = []
    g = table[table["statistic"] == "log10_g0_over_gL"]
    for (scheme, width, seqs), r in g.groupby(["scheme", "width", "sequences"], sort=False):
        if len(r) < 3:
            continue
        x = np.log10(r["depth"].to_numpy(float))
        w = 1 / r["measured_median_se"].clip(lower=1e-6).to_numpy() ** 2
        fit = {}
        for col in ("measured_median", "predicted_median", "mean_field"):
            fit[col] = np.polyfit(x, r[col].to_numpy(float), 1, w=np.sqrt(w) if col == "measured_median" else None)[0]
        X = np.vstack([x, np.ones_like(x)]).T
        cov = np.linalg.inv(X.T @ (w[:, None] * X))
        se = math.sqrt(cov[0, 0])
        rows.append({"scheme": scheme, "width": int(width), "sequences": int(seqs), "depths": f"{int(r.depth.min())}…{int(r.depth.max())}",
                     "measured_median_exponent": fit["measured_median"], "measured_se": se,
                     "predicted_median_exponent": fit["predicted_median"],
                     "mean_field_exponent": fit["mean_field"],
                     "median_holds": bool(abs(fit["predicted_median"] - fit["measured_median"]) <= 2 * se),
                     "mean_field_holds": bool(abs(fit["mean_field"] - fit["measured_median"]) <= 2 * se)})
    return pd.DataFrame(rows)
