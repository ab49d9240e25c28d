"""spread across initializations: many seeds on one sequence against theory/spread.py; resumable"""

from __future__ import annotations

import argparse

from analysis.cli import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    from analysis.init.spread import SpreadConfig
    cfg = SpreadConfig()
    for name in ("schemes", "depths", "widths", "seeds"):  # lists as one would type them
        options.add(p, name, default=",".join(map(str, getattr(cfg, name))))
    options.add(p, "seq_len", config=cfg)
    options.add(p, "corpus")
    options.output(p, "runs/spread")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from analysis.infra.files import write_csv
    from analysis.init.spread import SpreadConfig, run_study
    from analysis.testbed.corpus import load_corpus
    from figures.spread import plot_spread
    cfg = options.configure(SpreadConfig(), args)
    cfg.validate()
    corpus = load_corpus(args.corpus)
    out = options.claim(args, cfg)
    log = (lambda line: None) if args.quiet else print
    table, orders = run_study(cfg, corpus, out, log=log)
    write_csv(table, out / "spread.csv", index=False)
    write_csv(orders, out / "growth_orders.csv", index=False)
    plot_spread(table, out / "figures", fmt=args.format)
    g = table[table["statistic"] == "log10_g0_over_gL"]
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(g[["scheme", "width", "depth", "seeds", "predicted_sd", "measured_sd", "measured_sd_se",
                 "within_tolerance"]].to_string(index=False, float_format="%.3f"))
        if not orders.empty:
            print(orders.to_string(index=False, float_format="%.3f"))
    print(f"wrote {out}/spread.csv, growth_orders.csv, per_seed.csv, figures/")
    return 0
