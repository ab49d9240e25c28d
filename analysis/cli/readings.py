"""the SpanNorm readings study: five readings of arXiv 2601.22580 and two baselines, one step, lr across depth, a training grid, verdicts; resumable"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from analysis.cli import options

STAGE_HELP = ("comma-separated subset of onestep, lrsweep, scan, grid, moe, verdicts "
              "(default: all, in that order)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, "preset", default="cpu", choices=["cpu", "tiny"],
                help="cpu: width 64, L = 4 … 64, 2 seeds, 393,216 tokens per grid run (about 4 "
                     "core-hours: 2 h on 2 cores, split with --schemes; docs/span-readings.md); tiny: the same stages at toy sizes, a "
                     "minute (default: cpu)")
    options.add(p, "stages", help=STAGE_HELP)
    options.add(p, "schemes", help="comma-separated subset of the study's schemes, to split "
                                   "the work over processes (default: all seven)")
    options.add(p, "out", help="the study's folder, one subfolder per stage; a study there "
                               "resumes (default: runs/span-readings)")
    options.add(p, "results", shown="OUT/verdicts")
    options.add(p, "format", default="png")
    options.add(p, "quiet")


def run(args: argparse.Namespace) -> int:
    from analysis.cli import run_subcommand
    from analysis.training.readings import PRESETS, STAGES, run_stage
    from analysis.training.readings_verdicts import build
    plan = PRESETS[args.preset]
    options.check_format(args.format)
    stages = list(options.value(args, "stages") or (*STAGES, "verdicts"))
    unknown = [s for s in stages if s not in (*STAGES, "verdicts")]
    if unknown:
        raise ValueError(f"--stages: unknown stage '{unknown[0]}' (known: "
                         f"{', '.join((*STAGES, 'verdicts'))})")
    schemes = tuple(options.value(args, "schemes") or plan.schemes)
    strangers = [s for s in schemes if s not in plan.schemes]
    if strangers:
        raise ValueError(f"--schemes: '{strangers[0]}' is not in the study (its schemes: "
                         f"{', '.join(plan.schemes)})")
    root = options.claim(args, plan, grows=("stages", "schemes", "results"),
                         default="runs/span-readings")
    quiet = ["--quiet"] if args.quiet else []
    t0 = time.perf_counter()
    for stage in stages:
        print(f"sigprop readings: stage {stage} ({', '.join(schemes)}) → {root} "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        if stage == "verdicts":
            results = Path(args.results) if args.results else root / "verdicts"
            table = build(root, results, plan, args.format)
            counts = table["status"].value_counts().to_dict()
            print(f"wrote {results / 'verdicts.csv'} ({', '.join(f'{v} {k}' for k, v in counts.items())}), "
                  f"lr_drift.csv, train_runs.csv, readings.md and figures")
        else:
            run_stage(stage, root, plan, lambda argv: run_subcommand([*argv, *quiet]), schemes)
    return 0
