"""A finished grid's targets with E[1/q̂] in the norms' backward: what the seed-mean tables would read
if ``realized_norm`` were on.

Why: the mean over initializations of a product of independent per-block factors is the product
of their means, and each mean carries the norm's E[1/q̂] (theory/positional.py, ``_Ctx._jensen``)
whether the norm sits on the trunk or on a branch. The committed tables leave the term out
(``realized_norm`` off: its application to the typical value is not settled, docs/init.md). This
tool puts it in, per layer, for one rule, without measuring again: each seed's stored inputs are
predicted again with ``predict_positional(..., realized_norm=RULE)``, and the grid's errors and
targets are computed as ``report`` computes them (the sequence-averaged baseline is not predicted).

Writes ``--out``: ``errors.csv`` and ``targets.csv`` (``prediction`` = ``realized_<RULE>``).

    python tools/targets_realized_norm.py --grid runs/init-w256-all16 --rule all \
        --out results/init-w256-all16/norm_jensen/targets_all
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.init.compare import aggregate, error_summary, target_check  # noqa: E402
from analysis.init.pipeline import config_from_record  # noqa: E402
from analysis.init.sweep import (complete_points, predicted_rows, read_profiles,  # noqa: E402
                                 theory_inputs)
from analysis.testbed.model import ModelConfig  # noqa: E402
from theory.positional import predict_positional  # noqa: E402


def predict_one(cfg: ModelConfig, inputs: dict[str, float], rule: str) -> pd.DataFrame:
    """One seed's position-resolved profile with the term, as (point, metric, theory) rows."""
    return predicted_rows(cfg, partial(predict_positional, realized_norm=rule), "theory", **inputs)


def main() -> None:
    """Predict the grid again with the term and write its errors and targets."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", required=True, help="a finished sweep folder (init_profiles.csv, config.json)")
    p.add_argument("--rule", default="all", choices=["branch", "all"],
                   help="which norms divide by the realized power: the ones off the trunk, or all "
                        "(default)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    grid = Path(args.grid)
    cfg = config_from_record(grid / "config.json")
    profiles, problems = complete_points(read_profiles(grid / "init_profiles.csv"), cfg.seeds,
                                         keep_seeds=True)
    if problems:
        print(f"left out, not measured in full: {'; '.join(problems[:8])}")
    groups = list(profiles.groupby(["scheme", "depth", "seed"], sort=False))
    configs = [cfg.model_config(s, int(d)) for (s, d, _), _ in groups]
    inputs = [theory_inputs(rows, int(d)) for (_, d, _), rows in groups]
    t0, parts = time.perf_counter(), []
    with ProcessPoolExecutor(max(args.jobs, 1)) as pool:
        mapper = pool.map if args.jobs > 1 else map  # one job: in this process
        done = mapper(predict_one, configs, inputs, [args.rule] * len(groups))
        for k, (((s, d, seed), rows), theory) in enumerate(zip(groups, done), 1):
            parts.append(rows.drop(columns=["theory", "theory_averaged"], errors="ignore")
                         .merge(theory, on=["point", "metric"], how="left"))
            if k % 32 == 0 or k == len(groups):
                print(f"  {k}/{len(groups)} (scheme, depth, seed) predicted "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    errors = error_summary(aggregate(pd.concat(parts, ignore_index=True)))
    errors["prediction"] = f"realized_{args.rule}"
    targets = target_check(errors)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    errors.to_csv(out / "errors.csv", index=False)
    targets.to_csv(out / "targets.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(targets.to_string(index=False, float_format="%.3g"))


if __name__ == "__main__":
    main()
