"""mkdocs hook: the committed studies under results/ become pages of the site at build time.

Nothing from results/ is copied into docs/. For every folder results/<study>/ the hook adds, to
mkdocs' file list only:

- a generated page ``results/<study>/index.md``: a short introduction (STUDIES below), the
  study's own report (report.md or train.md) with its headings moved one level down and its
  LaTeX blocks shown as code (the site loads no MathJax, so it needs no network at view time),
  every figure the report does not already show, and every CSV: small ones as Markdown tables,
  large ones as their first rows and a download link;
- the study's figures (*.png), tables (*.csv), JSON records and other Markdown files
  (PROVENANCE.md, samples.md), read straight from results/ when the site is built.

It also appends a "Results" section listing the studies to the navigation.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
REPORTS = ("report.md", "train.md", "readings.md")
COPIED = {".png", ".csv", ".json", ".md"}
FULL_ROWS = 40  # CSVs up to this many rows are shown whole
HEAD_ROWS = 12  # larger ones: this many rows, then a download link

# One line per study: what it is and the docs page that discusses it.
STUDIES = {
    "init-cpu-w256": "The main initialization grid: all eight schemes, width 256, L = 2 … 1024, "
                     "3 seeds. Discussed in [Initialization](../../init.md).",
    "init-cpu-w512": "The width-512 grid of four schemes to L = 256 (its tables predate the "
                     "alignment term and the noise-floor columns). See [Initialization](../../init.md).",
    "init-fidelity": "Seed study, sublayer audit and cosine statistic for pre and post at L = 32, "
                     "16 seeds, on text and random bytes. See [Initialization](../../init.md).",
    "init-fidelity-w512": "The fidelity study of pre at width 512, 12 seeds, on text. "
                          "See [Initialization](../../init.md).",
    "init-fidelity-144": "The fidelity study of pre at L = 32, 144 seeds, on text: the forward "
                         "excess measured again. See [Initialization](../../init.md).",
    "init-fidelity-144-redrawn": "The same with a token embedding table drawn afresh for every "
                                 "sequence (`--redraw-embedding`). See [Initialization](../../init.md).",
    "init-spread": "The spread across initializations: 32 seeds on one sequence, post, b2t, pre, "
                   "span, L = 16 … 256, widths 64 and 256, against theory/spread.py; "
                   "`typical_drift.csv`: the median against the norms' E[1/q̂] and the "
                   "log-normal drift (`tools/typical_drift.py`); `trunk_norm_covariance.csv`: "
                   "a trunk norm's 1/q̂ against the gradient its block passes back "
                   "(`tools/trunk_norm_covariance.py`). "
                   "See [Theory](../../theory.md#the-spread-across-initializations).",
    "init-spread-attention": "PreNorm's spread across 32 seeds at L = 64 by attention kind, heads "
                             "and width, against theory/spread.py with every noise kind and each "
                             "alone (`tools/spread_by_attention.py`); and `by_layer/`: each "
                             "block's own gradient factor per seed, for pre, post, span and b2t, "
                             "the split of the spread into the blocks' own variances and their "
                             "covariances, and where the median parts from the mean field (top "
                             "block, first block, the blocks between; `tools/spread_by_layer.py`); and `by_token.csv`: "
                             "which stream power each block's gradient factor follows, each "
                             "token's or their mean (`tools/spread_by_token.py`). "
                             "See [Theory](../../theory.md#the-spread-across-initializations).",
    "init-w256-mixln-lns16": "Mix-LN and LNS at width 256, L = 2 … 256, 16 seeds: the grid's "
                             "targets met where they can be resolved. See [Initialization](../../init.md).",
    "init-w256-all16": "All eight schemes at width 256, L = 2 … 256, 16 seeds: the targets of "
                       "the position-resolved theory on the seed mean (`targets.csv`), and g_l/g_L's "
                       "median across seeds against theory, tested over depths with the seeds' noise "
                       "(`typical_*.csv`, from `fidelity --grid`); `exact_inputs/`: the same grid "
                       "against the mean field from each sequence's exact covariances "
                       "(`tools/grid_exact_inputs.py`); `gradient_excess_by_layer.csv`: where along "
                       "the stack pre's and peri's g_l/g_L part from theory "
                       "(`tools/gradient_excess_by_layer.py`). "
                       "See [Initialization](../../init.md#the-typical-value-across-seeds).",
    "init-inputs": "g_0/g_L of pre and peri at L = 2, 64, 512 on one sequence, 16 seeds, against "
                   "the mean field from the sequence's exact covariances and from the grid's "
                   "uniform summary of them (`tools/grad_ratio_by_inputs.py`). "
                   "See [Initialization](../../init.md).",
    "init-attention-keys": "Block 1's attention output at init, 32 seeds on one sequence: its "
                           "token cosine measured, from theory/positional.py's map, and from the "
                           "exact softmax over sampled heads, for the realized input and for it "
                           "made exchangeable (`tools/attention_key_structure.py`). "
                           "See [Initialization](../../init.md).",
    "init-w256-deep16": "g_0/g_L of pre and peri at L = 512 and 1024, width 256, 16 seeds "
                        "(the per-seed values, and the median against theory with the spread "
                        "theory's noise floor; `exact_inputs/`: against the mean field from each "
                        "sequence's exact covariances; the profiles are not committed). "
                        "See [Initialization](../../init.md).",
    "init-fidelity-mixln-lns-48": "The fidelity study of Mix-LN and LNS at L = 32, 48 seeds. "
                                  "See [Initialization](../../init.md).",
    "init-fidelity-mixln-lns": "The fidelity study of Mix-LN and LNS at L = 32, 8 seeds. "
                               "See [Initialization](../../init.md).",
    "train-cpu": "The CPU training grid: pre, post, span, deepnorm at L = 4 … 32, dense and MoE, "
                 "2 seeds, 128 steps. See [Training](../../training.md).",
    "train-cpu-nanogpt-shape": "nanoGPT's CPU shape at 4 and 16 blocks: a stalled PostNorm, caught. "
                               "See [Training](../../training.md).",
    "onestep-cpu": "One optimizer step against the theory: linearity, width transfer and depth. "
                   "See [Width and depth transfer](../../width.md).",
    "coordcheck-cpu-adam": "Coordinate check under Adam: standard, µP and a broken µP. "
                           "See [Width and depth transfer](../../width.md).",
    "coordcheck-cpu-sgd": "Coordinate check under SGD: standard, µP and a broken µP. "
                          "See [Width and depth transfer](../../width.md).",
    "lrsweep-cpu": "Learning-rate sweeps across depth and width. "
                   "See [Width and depth transfer](../../width.md).",
    "span-readings": "SpanNorm's readings against the paper's claims: one step, lr across depth, "
                     "a training grid dense and MoE to L = 64, 2 seeds; the verdict table. "
                     "See [SpanNorm's readings](../../span-readings.md).",
    "diagnose-minilm": "`diagnose` of all-MiniLM-L6-v2 on English text. "
                       "See [Diagnose and atlas](../../diagnose.md).",
    "diagnose-smollm2": "`diagnose` of SmolLM2-135M-Instruct (Q4_1 GGUF) on English text. "
                        "See [Diagnose and atlas](../../diagnose.md).",
    "diagnose-calibration": "The checkpoints that fixed `diagnose`'s redundancy thresholds. "
                            "See [Diagnose and atlas](../../diagnose.md).",
    "gpu-h200": "The GPU campaign on a lent H200 (two sessions): the dense grid to L = 96, the MoE "
                "grid and SpanNorm's two deciding readings (width 256, 4 M tokens per run), probe "
                "overhead, MFU, the init sweep at width 1024 (pre, post, span, deepnorm to L = 512), "
                "and two released models diagnosed on the GPU against their CPU diagnoses "
                "(`released/`). See [The GPU campaign](../../campaign.md#on-an-h200-2026-12-04).",
    "released": "The atlas of released models: four GPU-trained models at 6 to 30 blocks beside "
                "the toolkit's own CPU runs. Where each comes from: [PROVENANCE](PROVENANCE.md). "
                "See [Diagnose and atlas](../../diagnose.md).",
}


def _studies() -> list[Path]:
    return sorted(p for p in RESULTS.iterdir() if p.is_dir()) if RESULTS.is_dir() else []


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(path: Path) -> str:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return "*(empty)*\n"
    header, body = rows[0], rows[1:]
    shown = body if len(body) <= FULL_ROWS else body[:HEAD_ROWS]
    out = io.StringIO()
    out.write("| " + " | ".join(_cell(h) for h in header) + " |\n")
    out.write("|" + "---|" * len(header) + "\n")
    for row in shown:
        row = row + [""] * (len(header) - len(row))
        out.write("| " + " | ".join(_cell(c) for c in row[: len(header)]) + " |\n")
    if len(shown) < len(body):
        out.write(f"\nFirst {len(shown)} of {len(body)} rows.\n")
    return out.getvalue()


def _report(text: str) -> str:
    """Headings one level down; $$ … $$ blocks as code (no MathJax on this site)."""
    out, fence, math = [], False, False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```") and not math:
            fence = not fence
        elif stripped == "$$" and not fence:
            math = not math
            out.append("```latex" if math else "```")
            continue
        elif not fence and not math and line.startswith("#"):
            line = "#" + line
        elif not fence and not math and line.startswith("|"):
            line = re.sub(r"(?<=[\w)])\*(?=[\w(])", r"\\*", line)  # L*q: a product, not emphasis
        out.append(line)
    return "\n".join(out) + "\n"


def _page(study: Path) -> str:
    name = study.name
    parts = [f"# {name}\n", STUDIES.get(name, "A committed study.") + "\n",
             f"The files are in the repository's `results/{name}/`.\n"]
    report = next((study / r for r in REPORTS if (study / r).is_file()), None)
    shown_figures = set()
    if report is not None:
        text = report.read_text(encoding="utf-8")
        shown_figures = {f.relative_to(study).as_posix() for f in study.rglob("*.png")
                         if f.relative_to(study).as_posix() in text}
        parts.append(f"## {report.name}\n\n" + _report(text))
    figures = [f for f in sorted(study.rglob("*.png"))
               if f.relative_to(study).as_posix() not in shown_figures]
    if figures:
        parts.append("## Figures\n")
        for f in figures:
            rel = f.relative_to(study).as_posix()
            parts.append(f"`{rel}`\n\n![{rel}]({rel})\n")
    csvs = sorted(study.rglob("*.csv"))
    if csvs:
        parts.append("## Tables\n")
        for f in csvs:
            rel = f.relative_to(study).as_posix()
            parts.append(f"### {rel}\n\n[download {rel}]({rel})\n\n" + _table(f))
    others = [f for f in sorted(study.rglob("*")) if f.suffix in {".md", ".json"}
              and f != report]
    if others:
        parts.append("## Other files\n\n" + "\n".join(
            f"- [{f.relative_to(study).as_posix()}]({f.relative_to(study).as_posix()})"
            for f in others) + "\n")
    return "\n".join(parts)


def on_config(config):
    nav = config.get("nav")
    if nav is not None and _studies():
        nav.append({"Results": ["results/index.md"] + [
            {s.name: f"results/{s.name}/index.md"} for s in _studies()]})
    return config


def on_files(files, config):
    # every command's --help, generated from the one parser the command line uses
    from analysis.cli.help import markdown
    files.append(File.generated(config, "cli.md", content="# Command-line reference\n\nEvery command's "
                                "`--help`, generated from the parser at build time.\n\n" + markdown()))
    for study in _studies():
        files.append(File.generated(config, f"results/{study.name}/index.md",
                                    content=_page(study)))
        for f in sorted(study.rglob("*")):
            if f.is_file() and f.suffix in COPIED:
                rel = f.relative_to(RESULTS).as_posix()
                if f.name in REPORTS and f.parent == study:
                    continue  # shown inside the generated page
                files.append(File.generated(config, f"results/{rel}", abs_src_path=str(f)))
    return files
