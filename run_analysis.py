"""sigprop command line: ``python run_analysis.py COMMAND …``, the same as the ``sigprop``
console script. The commands live in analysis/cli/ (one module each)."""

from __future__ import annotations

import sys

from analysis.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
