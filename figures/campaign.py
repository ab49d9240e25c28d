"""The campaign's summary report: its verdicts first, then each stage's status and time, its
tables and main figures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.training.campaign import STAGES
from figures.analysis_report import targets_line
from figures.report import Block, Summary, status_class, write_report

# The performance targets the campaign measures against (docs/benchmarks.md).
TARGET_PROBE_OVERHEAD = 0.05  # compiled, probed over unprobed step time, minus 1
TARGET_MFU = 0.45

SECTIONS = [  # table name, heading, figure beside it (relative to the campaign folder)
    ("dense", "Dense training grid", "dense/figures/train_loss_vs_depth.png"),
    ("probe_overhead", "Probe overhead", None),
    ("throughput", "Training throughput", None),
    ("moe", "MoE training grid", "moe/figures/train_loss_vs_depth.png"),
    ("init_targets", "Init sweep: theory against measurement", "init/figures/gradient_ratio_vs_depth.png"),
    ("readings", "SpanNorm readings at depth (compare with the dense grid's span and pre)", None),
]
DETAILS = {"dense": "dense/train.md", "moe": "moe/train.md", "init_targets": "init/report.md"}


def _grid_verdict(name: str, runs: pd.DataFrame) -> str:
    """One line on a training grid: the best finished run at each depth, and what did not train."""
    best = []
    for depth, ok in runs[runs["status"] == "ok"].groupby("depth"):
        r = ok.loc[ok["final_val_bpb"].idxmin()]
        best.append(f"L = {depth} {r['scheme']} {r['final_val_bpb']:.3f}")
    bad = [f"{r.scheme} L = {r.depth} {r.status}" for r in runs.itertuples() if r.status != "ok"]
    return (f"{name}: best final validation loss (bits/byte) " + (", ".join(best) or "none finished")
            + ("; not ok: " + ", ".join(bad) if bad else "; every run ok") + ".")


def _reading_verdict(scheme: str, runs: pd.DataFrame) -> str:
    """One line on one reading across depth: its final loss at each depth, or how it ended."""
    cells = [f"L = {r.depth} {r.final_val_bpb:.3f}" if r.status == "ok" else f"L = {r.depth} {r.status}"
             for r in runs.sort_values("depth").itertuples()]
    return f"Reading {scheme} (bits/byte): " + ", ".join(cells) + "."


RUN_COLUMNS = {"scheme", "depth", "status", "final_val_bpb"}


def verdicts(tables: dict[str, pd.DataFrame]) -> list[str]:
    """The report's opening lines: each measured stage's result against its target or claims."""
    lines = [_grid_verdict(heading, tables[name]) for name, heading in
             (("dense", "Dense grid"), ("moe", "MoE grid"))
             if RUN_COLUMNS <= set(tables.get(name, ())) and len(tables[name])]
    if RUN_COLUMNS <= set(tables.get("readings", ())):
        lines += [_reading_verdict(scheme, g) for scheme, g in tables["readings"].groupby("scheme")]
    if {"mode", "overhead", "overhead_q1", "overhead_q3"} <= set(tables.get("probe_overhead", ())):
        for r in tables["probe_overhead"].itertuples():
            target = (f" (target ≤ {100 * TARGET_PROBE_OVERHEAD:.0f} %: "
                      f"{'holds' if r.overhead <= TARGET_PROBE_OVERHEAD else 'fails'})"
                      if r.mode == "compiled" else "")
            lines.append(f"Probe overhead, {r.mode}: {100 * r.overhead:+.0f} % (quartiles "
                         f"{100 * r.overhead_q1:+.0f} … {100 * r.overhead_q3:+.0f} %){target}.")
    if "mfu" in tables.get("throughput", ()):
        mfu = float(tables["throughput"]["mfu"].iloc[0])
        lines.append(f"Training MFU {100 * mfu:.1f} % (target ≥ {100 * TARGET_MFU:.0f} %: "
                     f"{'holds' if mfu >= TARGET_MFU else 'fails'}).")
    init = targets_line(tables["init_targets"]) if "init_targets" in tables else None
    if init:
        lines.append(f"Init sweep: {init[0].lower()}{init[1:]}.")
    return lines


def campaign_blocks(out: Path, state: dict, tables: dict[str, pd.DataFrame]) -> list[Block]:
    """Report blocks: the verdicts, settings, the stage table, then each stage's table and figure."""
    s = state["settings"]
    shown = [name for name in STAGES if name in state["selected"] or name in state["stages"]]
    stages = pd.DataFrame([(name, state["stages"].get(name, "not started"),
                            round(state["seconds"].get(name, 0.0) / 60, 2))
                           for name in shown], columns=["stage", "status", "minutes"])
    tally = stages["status"].value_counts()
    pending = [f"{r.stage} ({r.status})" for r in stages.itertuples() if r.status != "done"]
    summary = Summary(title="Stages:", counts=[(f"{n} {st}", n, "holds" if st == "done" else
                                                status_class(st) or "untested")
                                               for st, n in tally.items()],
                      lines=verdicts(tables) + (["Not done: " + ", ".join(pending) +
                                                 ". The same command resumes them."] if pending else []))
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
