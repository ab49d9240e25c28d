"""The campaign's summary report: each stage's status and time, its tables, its main figures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from figures.report import Block, Summary, status_class, write_report

SECTIONS = [  # table name, heading, figure beside it (relative to the campaign folder)
    ("dense", "Dense training grid", "dense/figures/train_loss_vs_depth.png"),
    ("probe_overhead", "Probe overhead", None),
    ("throughput", "Training throughput", None),
    ("moe", "MoE training grid", "moe/figures/train_loss_vs_depth.png"),
    ("init_targets", "Init sweep: theory against measurement", "init/figures/gradient_ratio_vs_depth.png"),
    ("readings", "SpanNorm readings at depth (compare with the dense grid's span and pre)", None),
]
DETAILS = {"dense": "dense/train.md", "moe": "moe/train.md", "init_targets": "init/report.md"}


def campaign_blocks(out: Path, state: dict, tables: dict[str, pd.DataFrame]) -> list[Block]:
    """Report blocks: settings, the stage table, then each stage's table and figure."""
    s = state["settings"]
    stages = pd.DataFrame([(name, state["stages"].get(name, "not started"),
                            round(state["seconds"].get(name, 0.0) / 60, 2))
                           for name in state["selected"]], columns=["stage", "status", "minutes"])
    tally = stages["status"].value_counts()
    pending = [f"{r.stage} ({r.status})" for r in stages.itertuples() if r.status != "done"]
    summary = Summary(title="Stages:", counts=[(f"{n} {st}", n, "holds" if st == "done" else
                                                status_class(st) or "untested")
                                               for st, n in tally.items()],
                      lines=["Not done: " + ", ".join(pending) + ". The same command resumes them."]
                      if pending else [])
    blocks: list[Block] = [
        ("h1", "sigprop campaign"),
        ("summary", summary),
        ("p", f"Device {s['device']}, compile {'on (' + s['compile_backend'] + ')' if s['compile'] else 'off'}"
              f", {'tiny rehearsal sizes' if s['tiny'] else 'full sizes'}; each stage's sizes are in "
              "campaign.json (settings.plan)."),
        ("table", stages)]
    for name, heading, figure in SECTIONS:
        if name not in tables:
            continue
        blocks += [("h2", heading), ("table", tables[name])]
        status = tables[name].get("status")  # a training grid's runs table
        if status is not None and not (status != "cut").any():  # a grid cut before any run ended
            cut = f" ({len(status)} cut, kept at their checkpoints)" if len(status) else ""
            blocks.append(("p", f"No training run has finished yet{cut}: nothing to draw; the "
                                "same command resumes the grid."))
            figure = None
        if figure and (out / figure).exists():
            blocks.append(("img", figure))
        if name in DETAILS and (out / DETAILS[name]).exists():
            blocks.append(("p", f"Details: [{DETAILS[name]}]({DETAILS[name]})."))
    return blocks


def write_campaign_report(out: Path, state: dict, tables: dict[str, pd.DataFrame]) -> Path:
    """Write report.md and report.html into ``out``; the Markdown path."""
    md, _ = write_report(campaign_blocks(out, state, tables), out, "sigprop campaign")
    return md
