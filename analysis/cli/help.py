"""Every command's --help as Markdown, for the docs: ``markdown()``.

    python -m analysis.cli.help > commands.md
"""

from __future__ import annotations

import argparse
import os
import sys


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_texts(prog: str = "sigprop", width: int = 100) -> dict[str, str]:
    """{command: its --help text} ('' for the top level), as a terminal ``width`` wide shows it."""
    from analysis.cli import build_parser
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps to $COLUMNS
    try:
        parser = build_parser(prog)
        texts = {"": parser.format_help()}
        texts.update({name: p.format_help() for name, p in _subparsers(parser).items()})
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return texts


def markdown(prog: str = "sigprop", heading: str = "##") -> str:
    """Every command's --help, each under its own heading, as Markdown."""
    parts = []
    for name, text in help_texts(prog).items():
        title = f"`{prog} {name}`" if name else f"`{prog}`"
        parts.append(f"{heading} {title}\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(markdown())
