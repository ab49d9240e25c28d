"""train a grid of schemes × depths with probes; write CSVs, figures and train.md"""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis.infra import progress
from analysis.cli import options
from analysis.infra.files import write_csv, write_text

PRESETS = {  # what `train` runs when a flag is not given, by device type (as the flags write it)
    "cpu": dict(schemes="pre,post,span,deepnorm", depths="2,4", width=64, heads=4, seq_len=64,
                batch=8, tokens=32_768, lr=2e-3),
    "cuda": dict(schemes="pre,post,span,deepnorm", depths="6,12,24,48,96,192", width=256, heads=4,
                 seq_len=256, batch=32, tokens=20_000_000, lr=1e-3),
}
GRID = ("schemes", "depths", "seeds", "scheme", "depth", "seed")  # a grid folder grows by these
OPTIMIZER = ("grad_clip", "beta1", "beta2", "weight_decay", "decay_embeddings", "warmup",
             "min_lr_ratio", "stall_fraction", "stall_share", "log_every")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from analysis.testbed.model import ModelConfig
    from analysis.training.train import TrainConfig
    by_device = dict(schemes="pre,post,span,deepnorm", depths="2,4 on cpu; 6,...,192 on cuda",
                     width="64 on cpu, 256 on cuda", heads="4", seq_len="64 on cpu, 256 on cuda",
                     batch="8 on cpu, 32 on cuda", tokens="32768 on cpu, 2e7 on cuda",
                     lr="2e-3 on cpu, 1e-3 on cuda")  # as PRESETS
    for name in PRESETS["cpu"]:
        options.add(p, name, shown=by_device[name])
    options.add(p, "moe", "ffn", "norm", config=ModelConfig())
    options.add(p, "corpus")
    options.add(p, "device", config=TrainConfig())
    options.add(p, "seeds", default="0")
    options.add(p, "tie_embeddings", "dropout", config=ModelConfig())
    options.add(p, "parametrization", config=ModelConfig(), choices=["standard", "mup"])
    options.add(p, "base_width", config=ModelConfig())
    options.add(p, *OPTIMIZER, config=TrainConfig())  # the defaults, stated once: the dataclasses'
    options.add(p, "tensorboard")
    options.add(p, "parallel", default=1,
                help="runs trained at once in worker processes, sharing the device (default: 1)")
    options.add(p, "ddp", "fsdp")
    options.output(p, "runs/<timestamp>", quiet=False,
                   help="output folder; an existing grid there resumes (default: runs/<timestamp>)")
    options.add(p, "compile", help="train under torch.compile, block by block (default: on cuda "
                                   "only)")
    options.add(p, "quiet")


def run(args: argparse.Namespace) -> int:
    from analysis.infra.device import resolve_device
    from analysis.testbed.corpus import load_corpus
    from analysis.testbed.model import ModelConfig
    from analysis.training.grid import train_grid
    from analysis.training.train import TrainConfig

    options.check_format(args.format)  # before the grid trains, not after it
    preset = PRESETS[resolve_device(args.device).type]
    given = {k: v for k, v in vars(args).items() if v is not None}
    values = {**preset, **given}  # a flag given, else the device's preset, else the dataclass
    depths, seeds = options.value(values, "depths"), options.value(values, "seeds")
    schemes = list(options.value(values, "schemes"))
    base = options.configure(ModelConfig(), values, scheme=schemes[0], depth=depths[0])
    tc = options.configure(TrainConfig(), values, seed=seeds[0])
    tc.validate(base.max_seq_len)  # before any folder is made
    from dataclasses import replace

    from analysis.testbed.memory import check_time
    grid = [replace(base, scheme=s, depth=d) for s in schemes for d in depths]
    for mc in grid:
        mc.validate()
    check_time(grid, tc.tokens, tc.batch_size, tc.device)  # work beyond days: refused up front
    given_corpus = load_corpus(args.corpus) if args.corpus else None  # a bad one: before a folder
    if tc.tensorboard:
        from analysis.training.runlog import summary_writer_class
        summary_writer_class()  # a missing tensorboard package is refused before any training
    world, log = join_ranks(args)
    if world.size > 1:
        from analysis.infra.distributed import check_same, from_main
        check_same({k: v for k, v in vars(args).items() if k != "func"}, world)
        out = Path(from_main(str(options.claim(args, base, tc, grows=GRID)) if world.main
                             else None, world))
    else:
        out = options.claim(args, base, tc, grows=GRID)
    args.out = str(out)  # every rank: what an interruption names, with the command that resumes
    corpus = given_corpus if given_corpus is not None else load_corpus(None)
    try:
        runs, profiles = train_grid(schemes, depths, base, tc, corpus, out, parallel=args.parallel,
                                    seeds=seeds, world=world, ddp=args.ddp, fsdp=args.fsdp,
                                    log=log)
    finally:
        from analysis.infra.distributed import leave
        leave()
    if not world.main:
        return 0
    figs = grid_report(out, runs, profiles, args.format, corpus.unigram_bits())
    print(f"wrote {out / 'train_runs.csv'}, {out / 'train_profiles.csv'}, {out / 'claims.csv'}, "
          f"{out / 'train.md'} and {len(figs)} figures")
    return 0


def join_ranks(args: argparse.Namespace):
    """(world, log) of a `train` under torchrun: --ddp trains each run on every rank, else the
    ranks split the grid; rank 0 speaks (other ranks of a split grid print their own runs'
    lines, marked). Outside torchrun: the world of one, and --ddp is refused."""
    from analysis.infra.distributed import SINGLE, join, launched_by_torchrun
    together = args.ddp or args.fsdp  # every run on every rank
    if args.ddp and args.fsdp:
        raise ValueError("--ddp and --fsdp are two ways to train a run on every rank: choose one")
    if not (together or launched_by_torchrun()):
        return SINGLE, progress.say
    world = join(args.device, "--fsdp" if args.fsdp else "--ddp" if args.ddp
                 else "a grid across ranks")
    if world.main:
        return world, progress.say
    progress.configure(quiet=progress.is_quiet() or together, bars=False)  # one terminal: no bars
    return world, lambda message: progress.say(f"[rank {world.rank}] {message}")


def grid_report(out, runs, profiles, fmt: str, unigram_bpb: float) -> list:
    """Figures, claims.csv and train.md of a training grid folder (``unigram_bpb``: the corpus's
    byte entropy, the plateau a stalled run sits on); the figure paths."""
    from analysis.training.claims import check_training_claims
    from analysis.training.grid import curves
    from figures.report import to_markdown
    from figures.train import (loss_curves, loss_vs_depth, profiles_init_vs_end, run_loss_figure,
                               training_blocks, update_sizes)
    every = curves(out)
    for run_name, curve in every.groupby("run"):  # each run's own figure, redrawn when it changed
        folder = out / "runs" / run_name
        figure = (folder / "loss").with_suffix(f".{fmt}")
        if not figure.exists() or figure.stat().st_mtime < (folder / "result.json").stat().st_mtime:
            run_loss_figure(curve, figure, fmt, unigram_bpb)
    figs = [loss_vs_depth(runs, out / "figures" / "train_loss_vs_depth", fmt),
            loss_curves(every, out / "figures" / "train_loss_curves", fmt, unigram_bpb)]
    if len(profiles):
        kinds = profiles["moe"].unique()
        kind = "dense" if "dense" in kinds else kinds[0]
        deepest = int(profiles[profiles["moe"] == kind]["depth"].max())
        figs.append(profiles_init_vs_end(profiles, out / "figures" / "train_profiles", deepest, fmt,
                                         moe=kind))
        if (profiles["metric"] == "update_size").any():
            figs.append(update_sizes(profiles, out / "figures" / "train_update_sizes", deepest, fmt,
                                     moe=kind))
    claims = check_training_claims(runs, profiles, unigram_bpb)
    write_csv(claims, out / "claims.csv", index=False)
    write_text(out / "train.md", to_markdown(training_blocks(runs, figs, out, claims)))
    return figs
