"""one optimizer step against the one-step theory: linearity, the weights' shares, width transfer, depth (analysis.width.onestep)"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from analysis.cli import options
from analysis.infra.files import write_csv


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, "schemes", default="pre,post,span")
    options.add(p, "optimizers", default="adam,sgd")
    options.add(p, "parametrization", default="standard")
    options.add(p, "base_width", default=64, help="the width whose update, scaled by theory's "
                                                  "law, predicts --width's (default: 64)")
    options.add(p, "width", default=512)
    options.add(p, "depth", default=4)
    options.add(p, "heads", default=4)
    options.add(p, "seq_len", default=64)
    options.add(p, "seeds", default="0,1,2")
    options.add(p, "depths", default="4,8,16,32", help="the depth study's depths (default: "
                                                       "4,8,16,32)")
    options.add(p, "depth_schemes", default="pre,post,span,deepnorm")
    options.add(p, "depth_width", default=256)
    options.add(p, "out", default="runs/onestep")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from analysis.testbed.corpus import load_corpus
    from analysis.testbed.model import ModelConfig
    from analysis.width.onestep import (LINEAR_LR, depth_claims, depth_study, linearity,
                                        summarize, transfer, transfer_errors)
    from theory.claim_table import claims_frame
    from theory.step import block_exponent
    schemes, optimizers, seeds, depths, depth_schemes = (  # each: not empty, nothing twice
        list(options.value(args, name)) for name in ("schemes", "optimizers", "seeds", "depths",
                                                     "depth_schemes"))
    for s in depth_schemes:
        ModelConfig(scheme=s, depth=1, width=args.depth_width, heads=args.heads)
    bad = [o for o in optimizers if o not in LINEAR_LR]
    if bad:
        raise ValueError(f"unknown optimizer '{bad[0]}' (known: {', '.join(LINEAR_LR)})")
    configs = {s: options.configure(ModelConfig(), args, scheme=s) for s in schemes}
    for o in optimizers:
        block_exponent(o, args.parametrization)
    if not seeds or args.base_width >= args.width:
        raise ValueError("needs at least one seed and --base-width below --width")
    out = options.claim(args)
    corpus, lin, tr, t0 = load_corpus(), [], [], time.perf_counter()
    for s, mc in configs.items():
        for o in optimizers:
            for seed in seeds:
                meta = {"scheme": s, "optimizer": o, "seed": seed, "lr": LINEAR_LR[o]}
                lin.append(linearity(mc, o, seed, corpus).assign(**meta))
                tr.append(transfer(mc, args.base_width, o, seed, corpus).assign(**meta))
            print(f"  {s} {o}: {len(seeds)} seeds [{time.perf_counter() - t0:.0f} s]", flush=True)
    study = []
    for s in depth_schemes:
        for o in optimizers:
            for seed in seeds:
                study.append(depth_study(s, depths, args.depth_width, o, seed, corpus, args.heads,
                                         args.seq_len).assign(scheme=s, optimizer=o, seed=seed))
            print(f"  depth study {s} {o}: depths {args.depths} [{time.perf_counter() - t0:.0f} s]",
                  flush=True)
    study = pd.concat(study, ignore_index=True) if study else pd.DataFrame()
    claims = depth_claims(study) if len(study) else claims_frame([])
    write_csv(study, Path(out) / "depth.csv", index=False)
    write_csv(claims, Path(out) / "depth_claims.csv", index=False)
    lin, tr = pd.concat(lin, ignore_index=True), pd.concat(tr, ignore_index=True)
    summary = summarize(lin, tr)
    write_csv(lin, Path(out) / "linearity.csv", index=False)
    write_csv(tr, Path(out) / "transfer.csv", index=False)
    write_csv(transfer_errors(tr), Path(out) / "transfer_errors.csv", index=False)
    write_csv(summary, Path(out) / "summary.csv", index=False)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if len(claims):
        print(claims[["claim", "slope", "slope_se", "theory", "status"]].to_string(
            index=False, float_format=lambda v: f"{v:+.2f}"))
    print(f"wrote {out}/linearity.csv, transfer.csv, transfer_errors.csv, summary.csv, depth.csv, "
          "depth_claims.csv")
    return 0
