"""print speed figures and the component maps' accuracy (see README, Benchmarks)"""

from __future__ import annotations

import argparse
import importlib

from analysis.cli import options

# benchmark flag → its module in analysis/bench/ (each has run(args))
BENCHMARKS = {"theory": "recurrences", "probes": "probe_overhead", "train": "training",
              "diagnose": "diagnosis", "components": "components", "width": "width"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, "theory", help="time deriving and evaluating the recurrences")
    options.add(p, "probes", "shape", "train")
    options.add(p, "parallel", default=2,
                help="runs at once in the --train grid comparison (default: 2)")
    options.add(p, "diagnose", "diagnose_path", "components", "bench_width")
    options.add(p, "device", default="cpu")
    options.add(p, "compile", help="--probes: also time compiled copies (default: on); --train: "
                                   "train compiled (default: on cuda only)")


def run(args: argparse.Namespace) -> int:
    if args.parallel < 1:  # checked before any part runs, whichever parts are asked for
        raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
    for flag in [f for f in BENCHMARKS if getattr(args, f)] or BENCHMARKS:  # no flag: every one
        importlib.import_module(f"analysis.bench.{BENCHMARKS[flag]}").run(args)
    return 0
