"""collapse diagnosis of a checkpoint: sigprop run, Hugging Face folder or cached id, GGUF file, or state_dict + --config"""

from __future__ import annotations

import argparse
import sys

from analysis.infra import progress
from analysis.cli import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, "path", help="checkpoint.pt / run folder, a Hugging Face model folder or a model id "
                                "already in the local cache, a .gguf file, or a state_dict file "
                                "(.safetensors, .pt, .bin) with --config")
    options.add(p, "config", "tokenizer")
    options.measurement(p, "diagnose")
    options.add(p, "fail_on", "blocks", "quiet")


def run(args: argparse.Namespace) -> int:
    import time

    from analysis.diagnose.diagnosis import diagnose
    from analysis.diagnose.findings import THRESHOLDS, Verdict
    from analysis.diagnose.report import save, text_report
    from figures.diagnose import diagnosis_blocks, diagnosis_figure
    from figures.report import write_report
    options.check_format(args.format)
    if args.blocks is not None and not args.blocks.strip(" ."):
        raise ValueError(f"--blocks is empty ('{args.blocks}'): give the module path of the "
                         "blocks' ModuleList, as named in model.named_modules()")
    out = options.claim(args, default=f"runs/diagnose-{time.strftime('%Y%m%d-%H%M%S')}")
    d = diagnose(args.path, blocks=args.blocks, config=args.config, tokenizer=args.tokenizer,
                 log=progress.say_err, **options.measurement_settings(args))
    files = save(d, out)
    fig = diagnosis_figure(d.table, {k: v for k, (v, _) in THRESHOLDS.items()},
                           out / "figures" / "diagnosis", args.format, d.verdict,
                           d.meta["max_effective_rank"])
    files += [fig, *write_report(diagnosis_blocks(d.meta, d.verdict, d.findings, d.table,
                                                  str(fig.relative_to(out)), d.notes),
                                 out, "sigprop diagnosis")]
    print(text_report(d))
    print("wrote " + ", ".join(str(f) for f in files))
    if args.fail_on and d.level >= Verdict[args.fail_on.upper()]:
        print(f"--fail-on {args.fail_on}: verdict {d.level.name}, exit status 1", file=sys.stderr)
        return 1
    return 0
