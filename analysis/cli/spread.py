"""spread across initializations: predicted (theory/spread.py) against sweeps of many seeds"""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis.cli import options
from analysis.infra.files import write_csv


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("grids", nargs="+", metavar="RUN_DIR",
                   help="sweep folders (init_profiles.csv with ≥ 2 seeds per point), e.g. "
                        "one per width")
    options.output(p, "runs/spread")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from analysis.init.spread import growth_orders, read_grid, spread_table
    from figures.spread import plot_spread
    grids = [read_grid(Path(g)) for g in args.grids]  # every folder checked before any work
    for (prof, _), g in zip(grids, args.grids):
        few = prof.groupby(["scheme", "depth"])["seed"].nunique()
        if (few < 2).any():
            raise ValueError(f"{g}: a spread needs ≥ 2 seeds per point, {few.idxmin()} has {few.min()}")
    out = options.claim(args)
    log = (lambda line: None) if args.quiet else print
    table = pd.concat([spread_table(prof, cfg, log=log) for prof, cfg in grids], ignore_index=True)
    orders = growth_orders(table)
    write_csv(table, out / "spread.csv", index=False)
    write_csv(orders, out / "growth_orders.csv", index=False)
    plot_spread(table, out / "figures", fmt=args.format)
    g = table[table["statistic"] == "log10_g0_over_gL"]
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(g[["scheme", "width", "depth", "seeds", "predicted_sd", "measured_sd", "measured_sd_se",
                 "within_tolerance"]].to_string(index=False, float_format="%.3f"))
        print(orders.to_string(index=False, float_format="%.3f"))
    print(f"wrote {out}/spread.csv, growth_orders.csv, figures/")
    return 0
