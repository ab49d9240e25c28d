"""The diagnosis figure and report section; reads DataFrames only (the per-layer table, the findings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from figures.report import Block, Summary, claims_summary, status_class
from figures.style import PALETTE, color, new_figure, save

TRAINED, INIT, THEORY = PALETTE[0], PALETTE[1], PALETTE[7]
# released models: colours apart from the schemes' palette, each its own
RELEASED_COLOURS = ["#8c564b", "#7f7f7f", "#bcbd22", "#000000", "#9467bd", "#843c39", "#637939"]
BF16_STEP = 2.0 ** -8  # a block update below this share of the stream is mostly rounded away in bfloat16


def _below(ax) -> None:
    """A legend under the axes, never over the data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncol=2, frameon=False)


def _lines(ax, x, t: pd.DataFrame, col: str, log: bool = False, theory: str | None = None,
           raw: tuple[str, str] | None = None) -> None:
    """The trained column, its re-initialized twin, the theory for the re-initialized model, and
    (``raw``: column, label) the non-robust trained statistic, thin, for comparison."""
    plot = ax.semilogy if log else ax.plot
    series = [(col, "o-", TRAINED, "trained"), (f"init_{col}", "s-", INIT, "re-initialized"),
              (theory or f"theory_{col}", "--", THEORY, "theory (re-initialized)")]
    if raw:
        series.append((raw[0], ":", TRAINED, raw[1]))
    for name, style, colour, label in series:
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
    robust = "q_rel_median" in t and t["q_rel_median"].notna().any()
    _lines(ax, x, t, "q_rel_median" if robust else "q_rel", log=True, theory="theory_q_rel",
           raw=("q_rel", "trained, mean over tokens") if robust else None)
    ax.set(xlabel="layer (−1 = embedding)", ylabel="median token's ‖x‖² / the embedding's",
           title="stream second moment")
    _below(ax)

    ax = axes[1]
    _lines(ax, x, t, "token_cosine")
    ax.axhline(thresholds["collapse_cosine"], color="k", lw=0.8, ls=":", label="collapse threshold")
    ax.set(xlabel="layer", ylabel="mean cosine between tokens", title="token cosine (rank collapse)",
           ylim=(-0.05, 1.05))
    _below(ax)

    ax = axes[2]
    robust = "effective_rank_normalized" in t and t["effective_rank_normalized"].notna().any()
    _lines(ax, x, t, "effective_rank_normalized" if robust else "effective_rank",
           raw=("effective_rank", "trained, raw tokens") if robust else None)
    if max_rank:
        ax.axhline(max_rank, color="k", lw=0.8, ls=":", label=f"largest possible ({max_rank})")
    ax.set(xlabel="layer", ylabel="effective rank (unit-norm tokens)", title="effective rank of a sequence")
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
        ax.axhline(BF16_STEP, color=PALETTE[3], lw=0.9, ls="--",
                   label="bfloat16 rounding step (precision headroom 1)")
        ax.set_yscale("log")
    ax.set(xlabel="block", ylabel="relative size", title="what each block adds")
    _below(ax)

    ax = axes[4]
    robust = "grad_scale_free" in t and t["grad_scale_free"].notna().any()
    _lines(ax, x, t, "grad_scale_free" if robust else "grad_rel", log=True,
           theory="theory_grad_scale_free" if robust else "theory_grad_rel",
           raw=("grad_rel", "trained, g_l/g_L") if robust else None)
    ax.set(xlabel="layer", ylabel="‖∂L/∂x_l‖·‖x_l‖, over the last block's" if robust else "g_l / g_L",
           title="gradient profile (scale-free)" if robust else "gradient profile")
    _below(ax)
    if title:
        fig.suptitle(title, fontsize=9)
    return save(fig, path, fmt)


def diagnosis_blocks(meta: dict, verdict: str, findings: pd.DataFrame, table: pd.DataFrame,
                     figure: str | None, notes: list[str]) -> list[Block]:
    """The report's diagnosis section."""
    th = pd.DataFrame([{"threshold": k, "value": v["value"], "meaning": v["meaning"]}
                       for k, v in meta["thresholds"].items()])
    cols = ["layer", "point", "second_moment", "growth", "q_rel", "q_rel_median", "first_token_second_moment",
            "massive_ratio", "peak_token", "peak_coordinate", "token_cosine", "effective_rank",
            "effective_rank_normalized", "dong_residual", "angle_deg", "branch_rel", "branch_rel_median",
            "skip_out_change", "skip_loss_delta", "precision_headroom", "fp16_range_headroom", "grad_rel", "grad_scale_free", "init_q_rel",
            "init_token_cosine", "init_effective_rank_normalized", "init_branch_rel_median", "init_grad_rel",
            "theory_q_rel", "theory_token_cosine", "theory_grad_rel", "theory_grad_scale_free"]
    glossary = pd.DataFrame([{"column": k, "meaning": v} for k, v in meta.get("glossary", {}).items()])
    serious = findings[findings["severity"] != "info"] if "severity" in findings else findings.iloc[:0]
    info = len(findings) - len(serious)
    summary = Summary(title="Verdict:", counts=[(verdict, 1, status_class(verdict) or "untested")],
                      lines=[f"{r.severity}: {r.message}" for r in serious.itertuples()]
                      + ([f"{info} informational finding{'s' if info != 1 else ''} in the table below."]
                         if info else []))
    blocks: list[Block] = [
        ("h1", "Diagnosis"),
        ("summary", summary),
        ("p", f"Checkpoint: {meta['path']} — {meta['model']}."),
        ("p", f"Blocks: {meta['layout']}. Branch outputs: {meta.get('branches', 'n/a')}. Text: "
              f"{meta['text']}; {meta.get('sequences_used', meta['sequences'])} sequences × {meta['seq_len']} tokens forward, "
              f"{meta.get('grad_sequences_used', meta['grad_sequences'])} backward with the {meta['loss']} loss; skip test on "
              f"{meta.get('skip_sequences', 0)} sequences; the re-initialized model on "
              f"{meta.get('init_sequences', 0)}."),
    ]
    if figure:
        blocks.append(("img", figure))
    blocks += [("h2", "Findings"), ("table", findings[["severity", "message"]])]
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


ATLAS_PANELS = (  # column, y label, log scale, has an init twin
    ("q_rel_median", "median token's ‖x‖² / the embedding's", True, True),
    ("branch_rel_median", "relative contribution (median token)", True, True),
    ("angle_deg", "turn of the stream per block (degrees)", False, True),
    ("effective_rank_normalized", "effective rank (unit-norm tokens)", False, True),
    ("grad_scale_free", "‖∂L/∂x_l‖·‖x_l‖ over the last block's", True, True),
    ("skip_loss_delta", "loss change when the block is skipped (nats)", False, False),
    ("precision_headroom", "precision headroom (bfloat16 rounding steps)", True, False),
)


def _atlas_styles(layers: pd.DataFrame) -> dict[str, tuple[str, float, str]]:
    """Per checkpoint: (colour, line width, legend label). A toolkit scheme keeps its colour and its
    depths go from thin to thick; each released model gets a colour of its own and a thick line."""
    first = layers.drop_duplicates("checkpoint").set_index("checkpoint")
    origin = first["origin"] if "origin" in first else pd.Series("released", index=first.index)
    scheme = first["scheme"] if "scheme" in first else first["placement"]
    styles, k = {}, 0
    released = [n for n in first.index if origin[n] != "toolkit"]
    for name in released:
        styles[name] = (RELEASED_COLOURS[k % len(RELEASED_COLOURS)], 2.2, f"{name} (L={first.loc[name, 'depth']})")
        k += 1
    for sch, names in first[origin == "toolkit"].groupby(scheme[origin == "toolkit"], sort=False):
        depths = sorted(names["depth"])
        for name, row in names.iterrows():
            width = 0.6 + 1.4 * depths.index(row["depth"]) / max(len(depths) - 1, 1)
            styles[name] = (color(sch), width, f"toolkit {sch}, L = {', '.join(map(str, depths))} (thin → thick)")
    return styles


def atlas_figure(layers: pd.DataFrame, path: str | Path, fmt: str = "png") -> Path:
    """Seven panels against relative depth; dashed: the same re-initialized; the eighth holds the legend."""
    fig, axes = new_figure(4, width=3.4, height=3.1, nrows=2)
    styles = _atlas_styles(layers)
    for ax, (col, label, log, twin) in zip(axes, ATLAS_PANELS):
        for name, (colour, width, _) in styles.items():
            t = layers[(layers["checkpoint"] == name) & (layers["point"] != "final")]
            if col in t and t[col].notna().any():
                v = t[col].where(t[col] > 0) if log else t[col]
                ax.plot(t["relative_depth"], v, "-", lw=width, color=colour, alpha=0.9)
            if twin and f"init_{col}" in t and t[f"init_{col}"].notna().any():
                v = t[f"init_{col}"].where(t[f"init_{col}"] > 0) if log else t[f"init_{col}"]
                ax.plot(t["relative_depth"], v, "--", lw=0.6, color=colour, alpha=0.6)
        if log:
            ax.set_yscale("log")
        if col == "skip_loss_delta":
            ax.set_yscale("symlog", linthresh=1e-3)
        if col == "precision_headroom":
            ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set(xlabel="relative depth (l + 1) / L", ylabel=label)
    from matplotlib.lines import Line2D
    seen = dict.fromkeys(label for _, _, label in styles.values())
    handles = [Line2D([], [], color=next(c for c, w, lb in styles.values() if lb == label),
                      lw=2.0) for label in seen]
    handles.append(Line2D([], [], color="k", ls="--", lw=0.8))
    axes[-1].axis("off")
    axes[-1].legend(handles, [*seen, "dashed: re-initialized twin"], loc="center", fontsize=7, frameon=False)
    return save(fig, path, fmt)


def atlas_blocks(checkpoints: pd.DataFrame, claims: pd.DataFrame, figure: str | None,
                 summary: pd.DataFrame) -> list[Block]:
    """The atlas report: the verdict summary (claims, checkpoints' verdicts), the figure, then the
    claims, checkpoints and per-checkpoint tables."""
    verdicts = checkpoints["verdict"].astype(str).str.split(":").str[0]
    tally = verdicts.value_counts()
    line = f"{len(checkpoints)} checkpoints: " + ", ".join(f"{n} {v}" for v, n in tally.items())
    unwell = checkpoints[verdicts != "HEALTHY"]
    if len(unwell):
        line += " — not healthy: " + ", ".join(
            f"{r.checkpoint} ({str(r.verdict).split(':')[0]})" for r in unwell.itertuples())
    blocks: list[Block] = [("h1", "Atlas"), claims_summary(claims, [line + "."])]
    if figure:
        blocks.append(("img", figure))
    blocks += [("h2", "Claims on the trained checkpoints"), ("table", claims),
               ("h2", "Checkpoints"),
               ("table", checkpoints[["checkpoint", "model", "placement", "depth", "verdict", "seconds"]]),
               ("h2", "Per checkpoint"), ("table", summary)]
    return blocks
