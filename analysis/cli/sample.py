"""text generated from a checkpoint (as nanoGPT's sample.py): sigprop run, Hugging Face folder, state_dict + --config, GGUF"""

from __future__ import annotations

import argparse

from analysis.cli import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, "path")
    options.add(p, "prompt", default="def ")
    options.add(p, "tokens", default=200, help="new tokens to generate (default: 200)")
    options.add(p, "temperature", default=0.8)
    options.add(p, "top_k", default=40)
    options.add(p, "seed", default=0, help="seed of the draws (default: 0)")
    options.add(p, "device", default="cpu")
    options.add(p, "config")
    options.add(p, "tokenizer", help="folder holding the tokenizer to use (default: the model "
                                     "folder's own; else bytes)")


def run(args: argparse.Namespace) -> int:
    from analysis.sampling import sample_text
    print(sample_text(args.path, args.prompt, tokens=args.tokens, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed, device=args.device, config=args.config,
                      tokenizer=args.tokenizer))
    return 0
