"""derive every scheme's moment recurrences, closed forms, asymptotic orders and claims; write theory.json, claims.csv"""

from __future__ import annotations

import argparse

from analysis.cli import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, "scheme", help="only this scheme (default: every registered scheme)")
    options.add(p, "latex")
    options.add(p, "out", shown="runs/theory")


def run(args: argparse.Namespace) -> int:
    from analysis.init.derivations import run as derive
    return derive(args)
