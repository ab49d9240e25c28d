"""build the testbed for a scheme and run one forward/backward batch from the corpus"""

from __future__ import annotations

import argparse

from analysis.cli import options

SHAPE = ("scheme", "depth", "width", "heads", "ffn", "norm", "moe", "sigma")


def defaults():
    """The ModelConfig whose values are the command's defaults (a span model, 128 tokens)."""
    from analysis.testbed.model import ModelConfig
    return ModelConfig(scheme="span", max_seq_len=128)


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, *SHAPE, config=defaults())
    options.add(p, "param", default=[])
    options.add(p, "dtype", default="float32",
                help="float32, bfloat16 or float64 (default: float32)")
    options.add(p, "seq_len", config=defaults())
    options.add(p, "batch", default=8)
    options.add(p, "corpus")
    options.add(p, "seed", default=0)
    options.add(p, "device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from analysis.infra.device import available_memory, resolve_device
    from analysis.testbed.inspect import model_check_text
    from analysis.testbed.memory import check_fits, check_time
    cfg = options.configure(defaults(), args)
    if args.batch < 1:
        raise ValueError(f"batch must be >= 1, got {args.batch}")
    dev = resolve_device(args.device)
    check_fits(cfg, args.batch, cfg.max_seq_len, available_memory(dev), str(dev))  # before building
    check_time([cfg], args.batch * cfg.max_seq_len, args.batch, str(dev),
               lower="--depth or --width")
    print(model_check_text(cfg, corpus=args.corpus, batch_size=args.batch, seed=args.seed,
                           device=args.device))
    return 0
