"""The diagnosis figure and report section; reads DataFrames only (the per-layer table, the findings)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from figures.report import Block
from figures.style import PALETTE, new_figure, save


def diagnosis_figure(table: pd.DataFrame, thresholds: dict[str, float], path: str | Path,
                     fmt: str = "png", title: str = "") -> Path:
    """Four panels over the layers: stream growth, token cosine / effective rank, turn angle, gradient."""
    t = table[table["point"] != "final"]
    x = t["layer"].to_numpy()
    fig, axes = new_figure(4, width=3.6, height=3.2)
    meas, theo = PALETTE[0], PALETTE[1]

    ax = axes[0]
    ax.semilogy(x, t["q_rel"], "o-", color=meas, ms=3, label="measured")
    if t["theory_q_rel"].notna().any():
        ax.semilogy(x, t["theory_q_rel"], "--", color=theo, label="theory at init")
    ax.set(xlabel="layer (−1 = embedding)", ylabel="E[x²] / E[x²]_embed", title="stream second moment")
    ax.legend(fontsize=7)

    ax = axes[1]
    ax.plot(x, t["token_cosine"], "o-", color=meas, ms=3, label="token cosine")
    if t["theory_token_cosine"].notna().any():
        ax.plot(x, t["theory_token_cosine"], "--", color=theo, label="theory at init")
    ax.axhline(thresholds["collapse_cosine"], color="k", lw=0.8, ls=":", label="collapse threshold")
    ax.set(xlabel="layer", ylabel="mean cosine between tokens", title="rank collapse", ylim=(-0.05, 1.05))
    if t["effective_rank"].notna().any():
        ax2 = ax.twinx()
        ax2.plot(x, t["effective_rank"], "s-", color=PALETTE[2], ms=2, lw=0.8, label="effective rank")
        ax2.set_ylabel("effective rank", color=PALETTE[2])
        ax2.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="lower left")

    ax = axes[2]
    b = t[t["layer"] >= 0]
    ax.bar(b["layer"], b["angle_deg"], color=meas, label="measured")
    if b["theory_angle_deg"].notna().any():
        ax.plot(b["layer"], b["theory_angle_deg"], "o--", color=theo, ms=3, label="theory at init")
    ax.axhline(thresholds["redundant_angle_deg"], color="k", lw=0.8, ls=":", label="redundancy threshold")
    ax.set(xlabel="block", ylabel="degrees", title="turn of the stream per block")
    ax.legend(fontsize=7)

    ax = axes[3]
    g = t["grad_rel"].where(t["grad_rel"] > 0)
    if g.notna().any():
        ax.semilogy(x, g, "o-", color=meas, ms=3, label="measured")
    if t["theory_grad_rel"].notna().any():
        ax.semilogy(x, t["theory_grad_rel"].where(t["theory_grad_rel"] > 0), "--", color=theo,
                    label="theory at init")
    ax.set(xlabel="layer", ylabel="g_l / g_L", title="gradient profile")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save(fig, path, fmt)


def diagnosis_blocks(meta: dict, verdict: str, findings: pd.DataFrame, table: pd.DataFrame,
                     figure: str | None, notes: list[str]) -> list[Block]:
    """The report's diagnosis section."""
    th = pd.DataFrame([{"threshold": k, "value": v["value"], "meaning": v["meaning"]}
                       for k, v in meta["thresholds"].items()])
    cols = ["layer", "point", "second_moment", "growth", "token_cosine", "effective_rank",
            "dong_residual", "angle_deg", "grad_rel", "q_rel", "theory_q_rel", "theory_token_cosine",
            "theory_angle_deg", "theory_grad_rel"]
    blocks: list[Block] = [
        ("h1", "Diagnosis"),
        ("p", f"Checkpoint: {meta['path']} — {meta['model']}."),
        ("p", f"Blocks: {meta['layout']}. Text: {meta['text']}; {meta['sequences']} sequences × "
              f"{meta['seq_len']} tokens forward, {meta['grad_sequences']} backward with the "
              f"{meta['loss']} loss."),
        ("h2", f"Verdict: {verdict}"),
        ("table", findings[["severity", "message"]]),
    ]
    if figure:
        blocks.append(("img", figure))
    blocks += [("h2", "Per layer"), ("table", table[[c for c in cols if c in table]]),
               ("p", "Theory columns are what signal-propagation theory predicts for this placement "
                     "at initialization, fed with the measured embedding statistics; a trained "
                     "model is expected to differ from them."),
               ("h2", "Thresholds"), ("table", th)]
    if notes:
        blocks += [("h2", "Notes"), ("md", "\n".join(notes))]
    return blocks
