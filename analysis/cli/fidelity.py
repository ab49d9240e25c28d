"""seed study and sublayer audit: where init theory and measurement part, and why (analysis.init.fidelity)"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from analysis.cli import options
from analysis.infra.files import write_csv


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, "schemes", default="pre,post")
    options.add(p, "depth", default=32)
    options.add(p, "seeds", default="24", help="number of init seeds, 0…N-1 (default: 24)")
    options.add(p, "width", default=256)
    options.add(p, "heads", default=4)
    options.add(p, "seq_len", default=64)
    options.add(p, "corpora", default="text,random")
    options.add(p, "out", default="runs/fidelity")
    options.add(p, "grid")
    options.add(p, "spread_only")
    options.add(p, "redraw_embedding")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from analysis.init.fidelity import (gradient_spread, random_corpus, seed_study,
                                        sublayer_audit, summarize)
    from analysis.testbed.corpus import load_corpus
    from analysis.testbed.model import ModelConfig
    if args.grid:
        return grid_spread(Path(args.grid), args)
    if args.spread_only:
        raise ValueError("--spread-only goes with --grid RUN_DIR (it writes that sweep's spread)")
    schemes = list(options.value(args, "schemes"))  # not empty, nothing twice
    names = list(options.value(args, "corpora"))
    unknown = [c for c in names if c not in ("text", "random")]
    if unknown:
        raise ValueError(f"unknown corpus {unknown[0]} (known: text, random)")
    try:
        n_seeds = int(args.seeds)
    except ValueError:
        raise ValueError(f"--seeds takes a number of seeds, got '{args.seeds}'") from None
    if n_seeds < 2:
        raise ValueError(f"--seeds must be >= 2 for a standard error, got {n_seeds}")
    base = options.configure(ModelConfig(), args, scheme=schemes[0])
    for s in schemes:
        replace(base, scheme=s).validate()
    out = options.claim(args)
    make = {"text": lambda: load_corpus(None), "random": random_corpus}
    corpora = {name: make[name]() for name in names}
    seeds = list(range(n_seeds))
    studies, audits, cosines = [], [], []
    t0 = time.perf_counter()
    for scheme in schemes:
        cfg = replace(base, scheme=scheme)
        for name, corpus in corpora.items():
            def log(line: str) -> None:  # one line rewritten in place on a terminal
                print(f"  {scheme} on {name}:{line[3:]}", end="\r", flush=True)
            live = log if sys.stdout.isatty() else None
            studies.append(seed_study(cfg, seeds, corpus, log=live,
                                      redraw_embedding=args.redraw_embedding).assign(corpus=name))
            audit, cos = sublayer_audit(cfg, seeds, corpus, log=live)
            audits.append(audit.assign(corpus=name))
            cosines.append(cos.assign(corpus=name))
            print(f"  {scheme} on {name}: {len(seeds)} seeds done ({time.perf_counter() - t0:.0f} s)"
                  + " " * 10, flush=True)
    study, audit, cos = (pd.concat(x, ignore_index=True) for x in (studies, audits, cosines))
    summary = summarize(study, audit)
    for name, frame in (("seed_study", study), ("audit", audit), ("cosine_statistic", cos),
                        ("summary", summary)):
        write_csv(frame, out / f"{name}.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_rows", 100):
        print(summary.round(4).to_string(index=False))
    print(f"wrote {out}/seed_study.csv, audit.csv, cosine_statistic.csv, summary.csv "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


def grid_spread(grid: Path, args: argparse.Namespace) -> int:
    """--grid: a finished sweep's seed spread and its typical value against theory, nothing measured."""
    import pandas as pd

    from analysis.init.fidelity import gradient_spread
    from analysis.init.pipeline import config_from_record
    from analysis.init.sweep import complete_points, read_profiles
    from analysis.init.typical import (by_depth, growth_orders, predicted_sd, typical_errors,
                                       typical_targets)
    lacking = [n for n in ("init_profiles.csv", "config.json") if not (grid / n).is_file()]
    if lacking:
        raise ValueError(f"--grid {grid} is not a finished sweep folder: it lacks "
                         f"{' and '.join(lacking)} (both written by `sweep`)")
    profiles = read_profiles(grid / "init_profiles.csv")
    cfg = config_from_record(grid / "config.json")
    profiles, problems = complete_points(profiles, cfg.seeds)
    if problems:
        print(f"warning: left out, not measured in full: {'; '.join(problems[:8])}")
    if not len(profiles):
        raise ValueError(f"{grid / 'init_profiles.csv'} has no grid point measured for every seed")
    out = options.claim(args)
    t0 = time.perf_counter()
    spread = gradient_spread(profiles)
    if cfg.experts or args.spread_only:
        write_csv(spread, out / "gradient_spread.csv", index=False)
        why = "--spread-only" if args.spread_only else "the spread theory covers dense FFNs, not MoE"
        print(f"wrote {out}/gradient_spread.csv; the typical value is not compared ({why})")
        return 0
    errs = typical_errors(profiles, predicted_sd(profiles, cfg.model_config(cfg.schemes[0], cfg.depths[0])))
    depths = by_depth(errs)
    targets = typical_targets(errs, depths)
    orders = growth_orders(depths, cfg.width)
    for name, frame in (("gradient_spread", spread), ("typical_targets", targets),
                        ("typical_by_depth", depths), ("typical_orders", orders)):
        write_csv(frame, out / f"{name}.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(depths.to_string(index=False, float_format="%.3g"))
        print(targets.to_string(index=False, float_format="%.3g"))
        print(orders.to_string(index=False, float_format="%.3g"))
    print(f"wrote {out}/gradient_spread.csv, typical_targets.csv, typical_by_depth.csv, "
          f"typical_orders.csv in {time.perf_counter() - t0:.0f} s")
    return 0
