"""The report: one list of blocks rendered twice, as report.md and as a self-contained report.html.

A block is a (kind, payload) pair: ("h1" | "h2" | "h3", text), ("p", text), ("table", DataFrame),
("img", path relative to the report), ("math", LaTeX), ("md", raw Markdown kept as preformatted
text in HTML). No network: the HTML loads nothing from outside (LaTeX stays as source).
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

Block = tuple[str, object]


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v != v:
            return "—"
        return f"{v:.4g}"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    cells = [[_fmt(v).replace("|", "\\|") for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def to_markdown(blocks: list[Block]) -> str:
    """Render blocks as Markdown."""
    out = []
    for kind, payload in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + str(payload))
        elif kind == "p" or kind == "md":
            out.append(str(payload))
        elif kind == "table":
            out.append(markdown_table(payload))
        elif kind == "img":
            out.append(f"![{Path(str(payload)).stem}]({payload})")
        elif kind == "math":
            out.append(f"$$\n{payload}\n$$")
        else:
            raise ValueError(f"unknown report block kind '{kind}'")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;font-size:13px;margin:.5em 0}td,th{border:1px solid
#ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}img{max-width:100%}pre{background:
#f7f7f7;padding:.5em;overflow-x:auto}.fails{color:#b00020;font-weight:bold}"""


def to_html(blocks: list[Block], title: str) -> str:
    """Render blocks as one self-contained HTML page."""
    body = []
    for kind, payload in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(str(payload))}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(str(payload))}</p>")
        elif kind == "md":
            body.append(f"<pre>{html.escape(str(payload))}</pre>")
        elif kind == "table":
            df = payload.copy()
            body.append(df.map(_fmt).to_html(index=False, escape=True))
        elif kind == "img":
            body.append(f'<p><img src="{html.escape(str(payload))}" alt="{html.escape(Path(str(payload)).stem)}"></p>')
        elif kind == "math":
            body.append(f"<pre>{html.escape(str(payload))}</pre>")
        else:
            raise ValueError(f"unknown report block kind '{kind}'")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(blocks: list[Block], folder: str | Path, title: str) -> tuple[Path, Path]:
    """Write report.md and report.html into ``folder``."""
    folder = Path(folder)
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(to_markdown(blocks))
    page.write_text(to_html(blocks, title))
    return md, page
