"""Figures of the SpanNorm readings study: the optimal lr against depth beside the one-step
theory's slope, the one-step changes against depth, and the trained loss against depth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from figures.style import color, new_figure, save


def drift_figure(optima: pd.DataFrame, drift: pd.DataFrame, path: Path, fmt: str = "png") -> Path:
    """One panel per scheme: log2 optimal lr against depth (± 2 SE over seeds; open markers where
    the optimum is not resolved), the weighted fit, and theory's slope through the first depth."""
    schemes = list(dict.fromkeys(optima["scheme"]))
    cols = min(4, len(schemes))
    rows = -(-len(schemes) // cols)
    fig, axes = new_figure(cols, width=3.0, height=2.7, nrows=rows)
    for ax in axes[len(schemes):]:
        ax.set_visible(False)
    lo, hi = optima["log2_best_lr"].min() - 0.7, optima["log2_best_lr"].max() + 0.7
    d = drift.set_index("scheme")
    for ax, s in zip(axes, schemes):
        ax.set_ylim(lo, hi)  # one scale: drifts compare by eye
        g = optima[optima["scheme"] == s].sort_values("depth")
        ok = g["inside_grid"].astype(bool) & ~g["stalled"].astype(bool)
        c = color(s)
        ax.errorbar(g["depth"][ok], g["log2_best_lr"][ok], yerr=2 * g["log2_se"][ok].fillna(0),
                    fmt="o", color=c, ms=4, capsize=2, label="measured")
        if (~ok).any():
            ax.plot(g["depth"][~ok], g["log2_best_lr"][~ok], "o", mfc="none", color=c, ms=5,
                    label="stalled / at the grid's edge")
        x = np.array([g["depth"].min(), g["depth"].max()], float)
        first = g[ok].iloc[0] if ok.any() else g.iloc[0]
        pred = d.loc[s, "predicted"] if s in d.index else 0.0
        ax.plot(x, first["log2_best_lr"] + pred * np.log2(x / first["depth"]), "--", color="0.4",
                lw=1, label=f"theory {pred:+.2g}/doubling")
        if s in d.index and np.isfinite(d.loc[s, "drift"]):
            ax.plot(x, first["log2_best_lr"] + d.loc[s, "drift"] * np.log2(x / first["depth"]),
                    "-", color=c, lw=1, alpha=0.6, label=f"fit {d.loc[s, 'drift']:+.2f}")
        ax.set_xscale("log", base=2)
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("depth L")
        ax.set_ylabel("log2 optimal lr")
        ax.legend(fontsize=6)
    fig.suptitle("optimal learning rate against depth (Adam): measured, fit, and one-step theory",
                 fontsize=9)
    return save(fig, path, fmt)


def onestep_figure(study: pd.DataFrame, path: Path, fmt: str = "png") -> Path:
    """Two panels per optimizer: the median block's update and the network's change against
    depth, one line per scheme (mean over seeds, ± 2 SE)."""
    from theory.depth_orders import depth_orders
    opts = list(dict.fromkeys(study["optimizer"]))
    fig, axes = new_figure(2 * len(opts), width=3.2, height=3.0)
    i = 0
    for opt in opts:
        for column, title in (("update", "median block update"), ("network", "network change")):
            ax = axes[i]
            i += 1
            for s, g in study[study["optimizer"] == opt].groupby("scheme", sort=False):
                per = g.groupby(["seed", "depth"])[column].median().reset_index()
                m = per.groupby("depth")[column].agg(["mean", "std", "count"])
                se = (m["std"] / np.sqrt(m["count"])).fillna(0)
                ax.errorbar(m.index, m["mean"], yerr=2 * se, fmt="o-", ms=3, lw=1, color=color(s),
                            label=s, capsize=2)
                k = getattr(depth_orders(s, opt), "block" if column == "update" else "network")
                x = np.array([m.index.min(), m.index.max()], float)
                ax.plot(x, m["mean"].iloc[0] * (x / x[0]) ** float(k), ":", color=color(s), lw=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{title}, {opt}", fontsize=9)
            ax.set_xlabel("depth L")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("one step from init against depth: measured (points) and theory.depth_orders' "
                 "slope (dotted)", fontsize=9)
    return save(fig, path, fmt)


def grid_figure(runs: pd.DataFrame, path: Path, fmt: str = "png",
                plateau_bpb: float | None = None) -> Path:
    """Final validation bits/byte against depth, one panel per dense / MoE, one line per scheme
    (its lr in the legend; mean over seeds, each seed a dot, a stalled run a cross; a diverged
    run is left out), and the stall threshold ``plateau_bpb`` dashed."""
    kinds = sorted(runs["moe"].unique(), key=lambda k: (k != "dense", k))
    fig, axes = new_figure(len(kinds), width=4.6, height=3.6)
    for ax, kind in zip(axes, kinds):
        r = runs[(runs["moe"] == kind) & ~runs["diverged"].astype(bool)]
        for s, g in r.groupby("scheme", sort=False):
            m = g.groupby("depth")["final_val_bpb"].mean()
            ax.plot(m.index, m.values, "-", color=color(s), lw=1.2,
                    label=f"{s} (lr {g['lr'].iloc[0]:g})")
            stalled = g["status"].eq("stalled") if "status" in g else pd.Series(False, g.index)
            if plateau_bpb is not None:
                stalled |= g["final_val_bpb"] > plateau_bpb
            ax.plot(g["depth"][~stalled], g["final_val_bpb"][~stalled], "o", color=color(s), ms=3,
                    alpha=0.7)
            ax.plot(g["depth"][stalled], g["final_val_bpb"][stalled], "x", color=color(s), ms=5)
        if plateau_bpb is not None:
            ax.axhline(plateau_bpb, ls="--", color="0.5", lw=0.8)
            ax.text(0.01, plateau_bpb, "stalled above", va="bottom", fontsize=7, color="0.4",
                    transform=ax.get_yaxis_transform())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("depth L")
        ax.set_ylabel("final validation bits/byte")
        ax.set_title(kind, fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("trained at each scheme's lr tuned at the shallowest depth (× : stalled run)",
                 fontsize=9)
    return save(fig, path, fmt)
