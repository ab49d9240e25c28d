"""Figures of the spread across initializations: predicted against measured standard deviation of
log10 g_0/g_L over depth, one panel per width; and the median against the mean field."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from figures.style import color, new_figure, save


def plot_spread(table: pd.DataFrame, folder: Path, fmt: str = "png") -> list[Path]:
    """spread_g.{fmt}: sd of log10 g0/gL against depth (measured ± 2 SE, predicted as a line);
    median_g.{fmt}: measured median ± 2 SE against the mean field and the predicted median."""
    g = table[table["statistic"] == "log10_g0_over_gL"]
    widths = sorted(g["width"].unique())
    paths = []
    for name, draw in (("spread_g", _sd), ("median_g", _median)):
        fig, axes = new_figure(len(widths), width=4.2, height=3.4)
        for ax, w in zip(axes, widths):
            for s, r in g[g["width"] == w].groupby("scheme", sort=False):
                draw(ax, r.sort_values("depth"), s)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("depth L")
            ax.set_title(f"width {w}")
        axes[0].legend(fontsize=7)
        paths.append(save(fig, Path(folder) / name, fmt))
    return paths


def _sd(ax, r: pd.DataFrame, s: str) -> None:
    c = color(s)
    ax.errorbar(r["depth"], r["measured_sd"], yerr=2 * r["measured_sd_se"], fmt="o", color=c, ms=4,
                capsize=2, label=f"{s} measured")
    ax.plot(r["depth"], r["predicted_sd"], "-", color=c, lw=1.2, label=f"{s} predicted")
    ax.set_yscale("log")
    ax.set_ylabel("sd of log10 g0/gL across seeds")


def _median(ax, r: pd.DataFrame, s: str) -> None:
    c = color(s)
    ax.errorbar(r["depth"], r["measured_median"], yerr=2 * r["measured_median_se"], fmt="o",
                color=c, ms=4, capsize=2, label=f"{s} median")
    ax.plot(r["depth"], r["mean_field"], "-", color=c, lw=1.2, label=f"{s} mean field")
    ax.plot(r["depth"], r["predicted_median"], ":", color=c, lw=1.2)
    ax.set_ylabel("log10 g0/gL (dotted: predicted median)")
