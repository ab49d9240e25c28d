"""coordinate check (as microsoft/mup's): coordinate sizes over the first steps against width, per scheme and parametrization, with the one-step theory's slopes"""

from __future__ import annotations

import argparse
import time

from analysis.cli import options
from analysis.infra.files import write_csv


def width_options(p: argparse.ArgumentParser, command: str, parametrizations: str) -> None:
    """What `coordcheck` and `lrsweep` share: schemes, parametrizations, optimizer, shape, seeds,
    corpus, device and output."""
    options.add(p, "schemes", shown="the preset's")
    options.add(p, "parametrizations", help=f"comma-separated: standard, mup, mup-nomult; "
                                            f"{parametrizations}")
    options.add(p, "optimizer", shown="adam")
    options.add(p, "heads", "seq_len", "batch", "seeds", shown="the preset's")
    options.add(p, "corpus")
    options.add(p, "device", shown="the preset's")
    options.output(p, f"runs/{command}" + ("-<timestamp>" if command == "coordcheck" else ""),
                   quiet=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, "preset", default="cpu",
                help="cpu: pre,span × standard,mup, widths 64…1024, depth 4, 3 steps, 2 seeds "
                     "(about 1½ min on 2 cores); gpu: pre,post,span, widths 128…4096, depth 8, "
                     "5 steps, 3 seeds on cuda")
    width_options(p, "coordcheck", "the width sweep's (default: standard,mup; mup-nomult is µP "
                                   "without the readout multiplier, deliberately broken)")
    options.add(p, "lr", help="base learning rate (default: adam 1e-3, sgd 0.05); µP's "
                              "multipliers apply on top")
    options.add(p, "widths", "depth", "steps", shown="the preset's")
    options.add(p, "base_width", help="the width at which µP equals standard (default: the "
                                      "smallest width of the preset)")
    options.add(p, "quiet")


def run(args: argparse.Namespace) -> int:
    from analysis.testbed.corpus import load_corpus
    from analysis.width.coordcheck import PRESETS, claims, run as measure, slopes
    cfg = options.preset_config(PRESETS, args)
    corpus = load_corpus(cfg.corpus)  # a bad corpus is refused before any folder is made
    out = options.claim(args, cfg, default=f"runs/coordcheck-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"sigprop coordcheck → {out} ({len(cfg.schemes)} schemes × {len(cfg.parametrizations)} "
          f"parametrizations × {len(cfg.widths)} widths × {len(cfg.seeds)} seeds, "
          f"{cfg.optimizer} lr {cfg.step_config.lr:g}, {cfg.steps} steps)")
    raw = measure(cfg, corpus)
    sl = slopes(raw)
    cl = claims(sl)
    write_csv(raw, out / "coordcheck.csv", index=False)
    write_csv(sl, out / "slopes.csv", index=False)
    write_csv(cl, out / "claims.csv", index=False)
    figs = write_report(cfg, raw, cl, out, args.format)
    for r in cl.itertuples():
        print(f"  {r.status:5}  {r.claim}: {r.evidence}")
    print(f"wrote {out / 'coordcheck.csv'}, slopes.csv, claims.csv, report.md and {len(figs)} figures")
    return 0


def write_report(cfg, raw, cl, out, fmt: str) -> list:
    """Figures and report of a coordinate check; the figure paths."""
    import sympy

    from figures.report import write_report as write
    from figures.width import coordcheck_figure
    from theory.step import update_law
    figs = [coordcheck_figure(raw, s, m, out / "figures" / f"coordcheck_{s}_{m}", fmt)
            for s in cfg.schemes for m in ("change_rms", "update")]
    laws = [(p, sympy.latex(update_law(cfg.optimizer, p))) for p in cfg.parametrizations]
    blocks = [("h1", "sigprop coordinate check"),
              ("p", f"{cfg.optimizer}, lr {cfg.step_config.lr:g}, widths "
                    f"{', '.join(map(str, cfg.widths))}, depth {cfg.depth}, {cfg.steps} steps, "
                    f"seeds {', '.join(map(str, cfg.seeds))}. One-step theory (theory/step.py): "
                    "a block's relative update r grows with width d as"),
              *[("math", rf"\text{{{p}: }} r = {law}") for p, law in laws],
              ("h2", "Claims"), ("table", cl[["claim", "status", "evidence"]]),
              ("h2", "Figures"), *[("img", str(f.relative_to(out))) for f in figs]]
    write(blocks, out, "sigprop coordinate check")
    return figs
