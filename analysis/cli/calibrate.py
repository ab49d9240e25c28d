"""calibrate diagnose's thresholds: its per-block measures on many trained checkpoints at once (analysis.diagnose.calibration)"""

from __future__ import annotations

import argparse
import sys

from analysis.cli import options
from analysis.infra.files import write_csv


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, "paths", help="checkpoints (sigprop runs, Hugging Face folders)")
    options.add(p, "out", required=True,
                help="folder for blocks.csv, checkpoints.csv, summary.csv")
    options.add(p, "text")
    options.add(p, "sequences", default=16)
    options.add(p, "seq_len", default=64)
    options.add(p, "skip_sequences", default=8)


def run(args: argparse.Namespace) -> int:
    from analysis.diagnose.calibration import calibrate, summary
    out = options.claim(args)
    blocks, ckpts = calibrate(args.paths, text=args.text, sequences=args.sequences,
                              seq_len=args.seq_len, skip_sequences=args.skip_sequences,
                              log=lambda m: print(m, file=sys.stderr))
    write_csv(blocks, out / "blocks.csv", index=False, float_format="%.6g")
    write_csv(ckpts, out / "checkpoints.csv", index=False)
    table = summary(blocks)
    write_csv(table, out / "summary.csv", index=False, float_format="%.4g")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {out}/blocks.csv, checkpoints.csv, summary.csv")
    return 0
