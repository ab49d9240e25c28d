"""learning-rate sweeps: loss after N steps over an lr grid at several depths and widths per scheme, the optimal lr of each, and transfer claims; resumes in its --out"""

from __future__ import annotations

import argparse
import math

from analysis.cli import options
from analysis.infra.files import write_csv
from analysis.cli.coordcheck import width_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, "preset", default="cpu",
                help="cpu: pre,span; depths 4…32 at width 64; widths 64…256 at depth 4 under "
                     "standard and mup; 7 lrs, 50 steps, 2 seeds (about 9 min on 2 cores); gpu: "
                     "pre,post,span, widths 128…1024, depths 6…96, 300 steps on cuda")
    width_options(p, "lrsweep", "for the width sweep; the depth sweep uses the first "
                                "(default: standard,mup)")
    options.add(p, "lrs", shown="5e-4 … 3.2e-2, factor 2")
    options.add(p, "widths", help="comma-separated increasing widths; the first is the depth "
                                  "sweep's and µP's base width (default: 64,128,256)")
    options.add(p, "depths", help="comma-separated increasing depths; the first is the width "
                                  "sweep's (default: 4,8,16,32)")
    options.add(p, "steps", shown="the preset's")
    options.add(p, "quiet")


def run(args: argparse.Namespace) -> int:
    from analysis.testbed.corpus import load_corpus
    from analysis.width.lrsweep import (EXECUTION_ONLY, PRESETS, claims, curves_table, optima,
                                        run as measure)
    cfg = options.preset_config(PRESETS, args)
    corpus = load_corpus(cfg.corpus)  # a bad corpus is refused before any folder is made
    out = options.claim(args, cfg, grows=EXECUTION_ONLY, default="runs/lrsweep")
    print(f"sigprop lrsweep → {out} ({len(cfg.runs())} curves × {len(cfg.lrs)} lrs × "
          f"{len(cfg.seeds)} seeds, {cfg.optimizer}, {cfg.steps} steps each)")
    raw = measure(cfg, corpus, out=out)
    # a curve whose best loss sits on the byte-frequency plateau stalled (as `train` calls it)
    plateau = 0.95 * corpus.unigram_bits() * math.log(2)
    table, best = curves_table(raw), optima(raw, plateau)
    cl = claims(best, cfg)
    write_csv(best, out / "optima.csv", index=False)
    write_csv(cl, out / "claims.csv", index=False)
    figs = write_report(cfg, table, best, cl, out, args.format)
    for r in cl.itertuples():
        print(f"  {r.status:8}  {r.claim}: {r.evidence}")
    print(f"training {raw['train_s'].sum():.0f} s, validation {raw['eval_s'].sum():.0f} s")
    print(f"wrote {out / 'lrsweep.csv'}, optima.csv, claims.csv, report.md and {len(figs)} figures")
    return 0


def write_report(cfg, table, best, cl, out, fmt: str) -> list:
    """Figures and report of a learning-rate sweep; the figure paths."""
    from figures.report import write_report as write
    from figures.width import lrsweep_figure
    p0, w0, d0 = cfg.parametrizations[0], cfg.widths[0], cfg.depths[0]
    figs = [lrsweep_figure(table[(table["parametrization"] == p0) & (table["width"] == w0)],
                           "depth", out / "figures" / "lr_vs_depth", fmt),
            lrsweep_figure(table[table["depth"] == d0], "width", out / "figures" / "lr_vs_width",
                           fmt)]
    blocks = [("h1", "sigprop learning-rate sweep"),
              ("p", f"{cfg.optimizer}, {cfg.steps} steps (warmup {cfg.warmup_frac:g}, cosine), "
                    f"batch {cfg.batch_size} × {cfg.seq_len}, seeds {', '.join(map(str, cfg.seeds))}"),
              ("h2", "Claims"), ("table", cl[["claim", "status", "evidence"]]),
              ("h2", "Optimal learning rates"), ("table", best),
              ("h2", "Figures"), *[("img", str(f.relative_to(out))) for f in figs]]
    write(blocks, out, "sigprop learning-rate sweep")
    return figs
