"""rebuild the report of a run folder from its CSVs"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.cli import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, "run_dir")
    options.add(p, "format", default="png")
    options.add(p, "theory", help="recompute both theories' predictions and the derived claims "
                                  "with this code from the stored measurements (their inputs q0, "
                                  "rho0, rho_g are in init_profiles.csv), then compare; "
                                  "init_profiles.csv is rewritten")


def run(args: argparse.Namespace) -> int:
    from analysis.cli.sweep import write_report
    from analysis.infra.folders import annotate
    from analysis.init.pipeline import load_tables, save_tables
    options.check_format(args.format)
    if Path(args.run_dir).is_dir():  # locked, and a sweep's, before minutes of theory
        annotate(args.run_dir, ("sweep",), "report")
    tables, cfg, theory = load_tables(args.run_dir, warn=lambda s: print(s, file=sys.stderr),
                                      theory_again=args.theory)
    out = Path(args.run_dir)
    save_tables(tables, cfg, theory, out)
    write_report(tables, theory, out, args.format)
    return 0
