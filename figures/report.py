"""The report: one list of blocks rendered twice, as report.md and as a self-contained report.html.

A block is a (kind, payload) pair: ("h1" | "h2" | "h3", text), ("p", text), ("table", DataFrame),
("img", path relative to the report), ("math", LaTeX), ("md", raw Markdown kept as preformatted
text in HTML), ("summary", Summary): the verdict box a report opens with (counts by status, the
failed items named, a few lines). No network: the HTML loads nothing from outside (LaTeX stays as
source).

Tables in HTML: text columns left-aligned, numbers right-aligned; a cell of a status-like column
(status, verdict, severity) carries its class (holds green, fails red, untested grey, warn amber);
an evidence cell longer than LONG characters (any other text cell beyond 3 × LONG) is a
collapsible <details> showing its start. Markdown keeps every cell's full text. In a summary's
lines `backticks` mark code (a command).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.infra.files import write_text
from theory.claim_table import tally

Block = tuple[str, object]

LONG = 120  # characters: a longer evidence cell is collapsed in HTML
COLLAPSE_COLUMNS = ("evidence",)  # other text columns collapse only beyond 3 × LONG
STATUS_COLUMNS = ("status", "verdict", "severity")
CELL_CLASS = {  # first word of a status-like cell → its class
    "holds": "holds", "ok": "holds", "healthy": "holds", "yes": "holds",
    "fails": "fails", "diverged": "fails", "collapsed": "fails", "unusable": "fails", "critical": "fails",
    "warnings": "warn", "warning": "warn",
    "untested": "untested", "stalled": "untested", "cut": "untested", "info": "untested",
    "not": "untested",  # "not started"
}


@dataclass
class Summary:
    """The verdict box: a ``title``, ``counts`` (label, number, class: holds | fails | untested |
    warn), ``named`` (label, names, class): e.g. the failed claims, and plain ``lines``."""

    title: str = ""
    counts: list[tuple[str, int, str]] = field(default_factory=list)
    named: list[tuple[str, list[str], str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def status_class(text: str) -> str | None:
    """The class of a status-like text by its first word (``HEALTHY: …`` → holds), or None."""
    words = str(text).split(":")[0].split()
    return CELL_CLASS.get(words[0].lower()) if words else None


def claims_summary(claims: pd.DataFrame, lines: list[str] = (), what: str = "claims") -> Block:
    """("summary", …) of a claims table: holds / fails / untested counted, the failed and the
    untested named (a claim name shared by two rows gets the first word of its method)."""
    counts = tally(claims)._asdict()
    twice = claims["claim"].duplicated(keep=False)

    def names(status: str) -> list[str]:
        rows = claims[claims["status"] == status]
        return [f"{r.claim} ({str(r.method).split(',')[0].split()[0]})"
                if twice[i] and "method" in claims else str(r.claim) for i, r in rows.iterrows()]

    s = Summary(title=f"{what.capitalize()}:", counts=[(f"{counts['holds']} hold", counts["holds"], "holds"),
                        (f"{counts['fails']} fail", counts["fails"], "fails"),
                        (f"{counts['untested']} untested", counts["untested"], "untested")],
                lines=list(lines))
    for status, label in (("fails", "Failed"), ("untested", "Untested")):
        if counts[status]:
            s.named.append((label, _grouped(names(status)), status))
    return ("summary", s)


def _grouped(names: list[str], most: int = 8) -> list[str]:
    """``names``, or beyond ``most`` the ones named claim:subject counted per claim (claim × n)."""
    if len(names) <= most:
        return names
    heads: dict[str, list[str]] = {}
    for n in names:
        heads.setdefault(n.split(":")[0], []).append(n)
    return [group[0] if len(group) == 1 else f"{h} × {len(group)}" for h, group in heads.items()]


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


def _summary_markdown(s: Summary) -> str:
    head = " ".join(x for x in (s.title, " · ".join(label for label, _, _ in s.counts)) if x)
    out = [f"> **{head}**"] if head else []
    out += [f"> {label}: " + ", ".join(f"`{n}`" for n in names) + "." for label, names, _ in s.named]
    out += [f"> {line}" for line in s.lines]
    return "\n>\n".join(out)


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
        elif kind == "summary":
            out.append(_summary_markdown(payload))
        else:
            raise ValueError(f"unknown report block kind '{kind}'")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}.table{overflow-x:auto;margin:.5em 0}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}th{background:#f3f3f3}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
img{max-width:100%}pre{background:#f7f7f7;padding:.5em;overflow-x:auto}
details summary{cursor:pointer;color:#444}code{font-size:.95em;background:#eee;padding:0 .2em}details[open] summary{color:#888}
.holds{color:#1b7a2b;font-weight:bold}.fails{color:#b00020;font-weight:bold}.untested{color:#777}
.warn{color:#a65e00;font-weight:bold}
.summary{border:1px solid #ccc;border-left:6px solid #888;background:#fafafa;padding:.4em 1em;
margin:1em 0}.summary.bad{border-left-color:#b00020}.summary.good{border-left-color:#1b7a2b}
.summary p{margin:.4em 0}.counts{font-size:1.25em}.counts span{margin-right:1em}"""


def _cell(col: str, v: object, numeric: bool) -> str:
    text = _fmt(v)
    attrs = ' class="num"' if numeric else ""
    if col.lower() in STATUS_COLUMNS and status_class(text):
        attrs = f' class="{status_class(text)}"'
    if not numeric and len(text) > (LONG if col.lower() in COLLAPSE_COLUMNS else 3 * LONG):
        cut = text[:LONG - 20].rsplit(" ", 1)[0]
        body = (f"<details><summary>{html.escape(cut)} …</summary>{html.escape(text)}</details>")
    else:
        body = html.escape(text)
    return f"<td{attrs}>{body}</td>"


def html_table(df: pd.DataFrame) -> str:
    """An HTML table: text left, numbers right, status cells classed, long text collapsible."""
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
               for c in df.columns]
    num = ' class="num"'
    head = "".join(f"<th{num if n else ''}>{html.escape(str(c))}</th>"
                   for c, n in zip(df.columns, numeric))
    rows = ["<tr>" + "".join(_cell(str(c), v, n) for c, v, n in zip(df.columns, row, numeric)) + "</tr>"
            for row in df.itertuples(index=False)]
    return (f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>\n'
            + "\n".join(rows) + "\n</tbody></table></div>")


def _code_spans(text: str) -> str:
    """Escaped text with `backtick` spans as <code>."""
    parts = html.escape(text).split("`")
    if len(parts) % 2 == 0:  # an unmatched backtick: plain text
        return html.escape(text)
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _summary_html(s: Summary) -> str:
    tone = ("bad" if any(n and cls == "fails" for _, n, cls in s.counts)
            else "good" if s.counts else "")
    out = [f'<div class="summary {tone}">']
    if s.counts or s.title:
        out.append('<p class="counts">' + (f"<b>{html.escape(s.title)}</b> " if s.title else "") + "".join(
            f'<span class="{cls}">{html.escape(label)}</span>' for label, _, cls in s.counts) + "</p>")
    out += [f'<p><span class="{cls}">{html.escape(label)}:</span> '
            + ", ".join(f"<code>{html.escape(n)}</code>" for n in names) + ".</p>"
            for label, names, cls in s.named]
    out += [f"<p>{_code_spans(line)}</p>" for line in s.lines]
    return "\n".join(out + ["</div>"])


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
            body.append(html_table(payload))
        elif kind == "img":
            body.append(f'<p><img src="{html.escape(str(payload))}" alt="{html.escape(Path(str(payload)).stem)}"></p>')
        elif kind == "math":
            body.append(f"<pre>{html.escape(str(payload))}</pre>")
        elif kind == "summary":
            body.append(_summary_html(payload))
        else:
            raise ValueError(f"unknown report block kind '{kind}'")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(blocks: list[Block], folder: str | Path, title: str) -> tuple[Path, Path]:
    """Write report.md and report.html into ``folder``."""
    folder = Path(folder)
    md, page = folder / "report.md", folder / "report.html"
    write_text(md, to_markdown(blocks))
    write_text(page, to_html(blocks, title))
    return md, page
