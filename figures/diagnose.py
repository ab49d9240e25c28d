"""The diagnosis figure and report section; reads DataFrames only (the per-layer table, the findings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from figures.report import Block
from figures.style import PALETTE, new_figure, save

TRAINED, INIT, THEORY = PALETTE[0], PALETTE[1], PALETTE[7]


def _below(ax) -> None:
    """A legend under the axes, never over the data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncol=2, frameon=False)


def _lines(ax, x, t: pd.DataFrame, col: str, log: bool = False) -> None:
    """The trained column, its re-initialized twin and the theory for the re-initialized model."""
    plot = ax.semilogy if log else ax.plot
    for name, style, colour, label in ((col, "o-", TRAINED, "trained"),
                                       (f"init_{col}", "s-", INIT, "re-initialized"),
                                       (f"theory_{col}", "--", THEORY, "theory (re-initialized)")):
        if name in t and t[name].notna().any():
            v = t[name].where(t[name] > 0) if log else t[name]
            plot(x, v, style, color=colour, ms=3, lw=1.2 if name == col else 1.0, label=label)


def diagnosis_figure(table: pd.DataFrame, thresholds: dict[str, float], path: str | Path,
                     fmt: str = "png", title: str = "", max_rank: int | None = None) -> Path:
    """Five panels over the layers: stream growth, token cosine, effective rank, block contribution, gradient."""
    t = table
    x = t["layer"].to_numpy()
    fig, axes = new_figure(5, width=3.3, height=3.6)

    ax = axes[0]
    _lines(ax, x, t, "q_rel", log=True)
    ax.set(xlabel="layer (−1 = embedding)", ylabel="E[x²] / E[x²] at the embedding",
           title="stream second moment")
    _below(ax)

    ax = axes[1]
    _lines(ax, x, t, "token_cosine")
    ax.axhline(thresholds["collapse_cosine"], color="k", lw=0.8, ls=":", label="collapse threshold")
    ax.set(xlabel="layer", ylabel="mean cosine between tokens", title="token cosine (rank collapse)",
           ylim=(-0.05, 1.05))
    _below(ax)

    ax = axes[2]
    _lines(ax, x, t, "effective_rank")
    if max_rank:
        ax.axhline(max_rank, color="k", lw=0.8, ls=":", label=f"largest possible ({max_rank})")
    ax.set(xlabel="layer", ylabel="effective rank", title="effective rank of a sequence")
    ax.set_ylim(bottom=0)
    _below(ax)

    ax = axes[3]
    b = t[(t["layer"] >= 0) & t.get("branch_rel_median", pd.Series(np.nan, index=t.index)).notna()] \
        if "branch_rel_median" in t else t.iloc[0:0]
    if len(b):
        ax.bar(b["layer"], b["branch_rel_median"], color=TRAINED, alpha=0.8, label="contribution, trained")
        if "init_branch_rel_median" in b and b["init_branch_rel_median"].notna().any():
            ax.plot(b["layer"], b["init_branch_rel_median"], "s-", color=INIT, ms=3,
                    label="contribution, re-initialized")
        if "skip_out_change" in b and b["skip_out_change"].notna().any():
            ax.errorbar(b["layer"], b["skip_out_change"], yerr=b.get("skip_out_change_se"), fmt="D",
                        color=PALETTE[2], ms=3, label="output change when skipped")
        ax.axhline(thresholds["redundant_contribution"], color="k", lw=0.8, ls=":",
                   label="redundancy thresholds")
        ax.axhline(thresholds["redundant_skip"], color="k", lw=0.8, ls=":")
        ax.set_yscale("log")
    ax.set(xlabel="block", ylabel="relative size", title="what each block adds")
    _below(ax)

    ax = axes[4]
    _lines(ax, x, t, "grad_rel", log=True)
    ax.set(xlabel="layer", ylabel="g_l / g_L", title="gradient profile")
    _below(ax)
    if title:
        fig.suptitle(title, fontsize=9)
    return save(fig, path, fmt)


def diagnosis_blocks(meta: dict, verdict: str, findings: pd.DataFrame, table: pd.DataFrame,
                     figure: str | None, notes: list[str]) -> list[Block]:
    """The report's diagnosis section."""
    th = pd.DataFrame([{"threshold": k, "value": v["value"], "meaning": v["meaning"]}
                       for k, v in meta["thresholds"].items()])
    cols = ["layer", "point", "second_moment", "growth", "q_rel", "token_cosine", "effective_rank",
            "dong_residual", "angle_deg", "branch_rel", "branch_rel_median", "skip_out_change",
            "skip_loss_delta", "grad_rel", "init_q_rel", "init_token_cosine", "init_effective_rank",
            "init_branch_rel_median", "init_grad_rel", "theory_q_rel", "theory_token_cosine",
            "theory_grad_rel"]
    glossary = pd.DataFrame([{"column": k, "meaning": v} for k, v in meta.get("glossary", {}).items()])
    blocks: list[Block] = [
        ("h1", "Diagnosis"),
        ("p", f"Checkpoint: {meta['path']} — {meta['model']}."),
        ("p", f"Blocks: {meta['layout']}. Branch outputs: {meta.get('branches', 'n/a')}. Text: "
              f"{meta['text']}; {meta.get('sequences_used', meta['sequences'])} sequences × {meta['seq_len']} tokens forward, "
              f"{meta['grad_sequences']} backward with the {meta['loss']} loss; skip test on "
              f"{meta.get('skip_sequences', 0)} sequences; the re-initialized model on "
              f"{meta.get('init_sequences', 0)}."),
        ("h2", f"Verdict: {verdict}"),
        ("table", findings[["severity", "message"]]),
    ]
    if figure:
        blocks.append(("img", figure))
    blocks += [("h2", "Per layer"), ("table", table[[c for c in cols if c in table and table[c].notna().any()]]),
               ("p", f"Effective rank is at most {meta.get('max_effective_rank', 'min(T, d)')} here "
                     "(the sampled tokens per sequence, or the width if smaller). init_* columns are the "
                     "same architecture re-initialized by its own initializer and measured on the same "
                     "text: the difference is what training changed. theory_* columns are the init "
                     "theory for that re-initialized model, where its assumptions hold.")]
    if len(glossary):
        blocks += [("h2", "Columns"), ("table", glossary)]
    blocks += [("h2", "Thresholds"), ("table", th)]
    if notes:
        blocks += [("h2", "Notes"), ("md", "\n".join(f"- {n}" for n in notes))]
    return blocks
