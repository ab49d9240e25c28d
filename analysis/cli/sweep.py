"""init sweep: measure schemes × depths × seeds, compare with theory, write CSVs, figures and the report"""

from __future__ import annotations

import argparse

from analysis.cli import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, "preset", default="cpu",
                help="cpu: width 256, depths 2…256, 3 seeds; gpu: width 1024, depths 2…1024 on "
                     "cuda (default: cpu)")
    options.add(p, "schemes", "depths", "seeds", "width", "heads", "seq_len", "batch", "batches",
                shown="the preset's")
    options.add(p, "corpus")
    options.add(p, "device", shown="the preset's")
    options.output(p, "runs/<timestamp>", quiet=False)
    options.add(p, "compile", help="probed models run under torch.compile, the probe entered "
                                   "first (default: off; a fresh compile per model)")
    options.add(p, "quiet")


def run(args: argparse.Namespace) -> int:
    from analysis.init.pipeline import PRESETS, analyse, save_tables
    cfg = options.preset_config(PRESETS, args)
    out = options.claim(args, cfg)
    print(f"sigprop analysis → {out}")
    tables, theory = analyse(cfg, out=out)
    save_tables(tables, cfg, theory, out)
    write_report(tables, theory, out, args.format)
    return 0


def write_report(tables, theory: dict, out, fmt: str) -> None:
    """The comparison report of a sweep folder (figures, report.md and its page); prints the
    claims' tally."""
    from analysis.init.compare import aggregate
    from analysis.infra.records import read_record
    from figures.analysis_report import write
    config = read_record(out / "config.json")
    md, page = write(tables, aggregate(tables["init_profiles"]), config, theory, out, fmt)
    from theory.claim_table import tally
    print(tally(tables["claims"]).line())
    from analysis.init.pipeline import other_schemes_command
    rest, cmd = other_schemes_command(config or {})
    if rest:
        print(f"not run: {', '.join(rest)}; for their claims: {cmd}")
    print(f"wrote {md} and {page}")
