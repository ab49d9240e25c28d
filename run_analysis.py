"""sigprop command line: parses arguments and calls analysis/ and figures/."""

from __future__ import annotations

import argparse
import sys


def _cmd_schemes(args: argparse.Namespace) -> int:
    from analysis.inspect import schemes_text
    print(schemes_text(args.scheme))
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from analysis.inspect import model_check_text
    from analysis.model import ModelConfig
    experts, top_k = _parse_moe(args.moe)
    cfg = ModelConfig(scheme=args.scheme, depth=args.depth, width=args.width, heads=args.heads,
                      max_seq_len=args.seq_len, ffn=args.ffn, norm=args.norm, sigma=args.sigma,
                      experts=experts, top_k=top_k, dtype=args.dtype,
                      scheme_params=_parse_params(args.param))
    print(model_check_text(cfg, corpus=args.corpus, batch_size=args.batch, seed=args.seed,
                           device=args.device))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if not (args.theory or args.probes):
        args.theory = args.probes = True
    if args.theory:
        from analysis.bench_theory import run as bench_theory
        bench_theory(args)
    if args.probes:
        from analysis.bench_probes import run as bench_probes
        bench_probes(args)
    return 0


def _parse_moe(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 2
    try:
        experts, top_k = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--moe takes E,k (experts, top-k), got '{text}'") from None
    return experts, top_k


def _parse_params(items: list[str]) -> dict[str, float]:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            params[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ValueError(f"--param takes NAME=NUMBER, got '{item}'")
    return params


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="run_analysis.py",
        description="sigprop: signal propagation in deep Transformers, theory against measurement.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("schemes", help="list the registered normalization schemes")
    p.add_argument("--scheme", help="show only this scheme")
    p.set_defaults(func=_cmd_schemes)

    p = sub.add_parser("model", help="build the testbed for a scheme and run one forward/backward "
                                     "batch from the corpus")
    p.add_argument("--scheme", default="span", help="registered scheme (default: span)")
    p.add_argument("--depth", type=int, default=12, help="number of blocks L (default: 12)")
    p.add_argument("--width", type=int, default=256, help="model width d (default: 256)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    p.add_argument("--ffn", default="gelu", help="gelu, relu or swiglu (default: gelu)")
    p.add_argument("--norm", default="layernorm", help="layernorm or rmsnorm (default: layernorm)")
    p.add_argument("--moe", metavar="E,k", help="mixture of E experts, top-k routing (default: dense)")
    p.add_argument("--sigma", type=float, default=1.0, help="init: weights ~ N(0, σ²/fan_in) (default: 1)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override a scheme parameter, e.g. --param beta=0.1 (repeatable)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float64 (default: float32)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--batch", type=int, default=8, help="sequences in the batch (default: 8)")
    p.add_argument("--corpus", help="text file or folder (default: the Python standard library)")
    p.add_argument("--seed", type=int, default=0, help="init and batch seed (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.set_defaults(func=_cmd_model)

    p = sub.add_parser("bench", help="print speed figures (see README, Benchmarks)")
    p.add_argument("--theory", action="store_true", help="time deriving and evaluating the recurrences")
    p.add_argument("--probes", action="store_true", help="time a probed training step against an unprobed one")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for unusable input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
