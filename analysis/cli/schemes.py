"""list the registered normalization schemes"""

from __future__ import annotations

import argparse

from analysis.cli import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, "scheme", help="show only this scheme")


def run(args: argparse.Namespace) -> int:
    from analysis.testbed.inspect import schemes_text
    print(schemes_text(args.scheme))
    return 0
