"""Init-sweep figures: theory lines against measured points with error bars (± 2 standard errors).

Solid lines: the position-resolved theory; dotted: the sequence-averaged recurrence, where the
profiles carry it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from figures.style import color, legend, new_figure, save

Z = 2.0  # error bars: ± 2 standard errors of the measured mean


def _at_top(agg: pd.DataFrame, metric: str, site: str = "resid_post") -> pd.DataFrame:
    """Rows of ``metric`` at the last block of each depth."""
    top = "blocks." + (agg["depth"] - 1).astype(str) + f".{site}"
    return agg[(agg["metric"] == metric) & (agg["point"] == top)]


def _theory_lines(ax, x: pd.Series, g: pd.DataFrame, scheme: str) -> None:
    ax.plot(x, g["theory"], "-", color=color(scheme), alpha=0.8, label=f"{scheme} theory")
    if "theory_averaged" in g:
        ax.plot(x, g["theory_averaged"], ":", color=color(scheme), alpha=0.7, lw=1.2,
                label=f"{scheme} averaged")


def _versus_depth(ax, rows: pd.DataFrame, ylabel: str, log_y: bool) -> None:
    for scheme, g in rows.groupby("scheme", sort=False):
        g = g.sort_values("depth")
        _theory_lines(ax, g["depth"], g, scheme)
        ax.errorbar(g["depth"], g["measured"], yerr=Z * g["spread"].fillna(0), fmt="o",
                    color=color(scheme), ms=4, capsize=2, label=f"{scheme} measured")
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("depth L (blocks)")
    ax.set_ylabel(ylabel)
    legend(ax, fontsize=6, ncol=2)


def variance_vs_depth(agg: pd.DataFrame, path: Path, fmt: str = "png") -> Path:
    """Last-layer second moment against L: the stream, and the aggregate before the output norm."""
    fig, (a, b) = new_figure(2)
    _versus_depth(a, _at_top(agg, "second_moment"), "last-block stream second moment E[x_L²]", True)
    a.set_title("stream second moment vs depth")
    pre = _at_top(agg, "second_moment", "pre_norm_sum")
    _versus_depth(b, pre, "last-block aggregate E[s_L²]", True)
    b.set_title("aggregate before the output norm vs depth")
    return save(fig, path, fmt)


def gradient_ratio_vs_depth(agg: pd.DataFrame, path: Path, fmt: str = "png") -> Path:
    """g_0 / g_L: gradient second moment at the embedding over that at the last block."""
    rows = agg[(agg["metric"] == "grad_rel") & (agg["point"] == "embed")]
    fig, (ax,) = new_figure(1, width=5.5)
    _versus_depth(ax, rows, "g₀ / g_L (embedding / last block)", True)
    ax.axhline(1, color="grey", lw=0.8, ls=":")
    ax.set_title("end-to-end gradient ratio vs depth")
    return save(fig, path, fmt)


def rank_collapse_vs_depth(agg: pd.DataFrame, path: Path, fmt: str = "png") -> Path:
    """Token cosine ρ at the last block against L (1 = every token alike: rank collapse)."""
    fig, (a, b) = new_figure(2)
    _versus_depth(a, _at_top(agg, "token_cosine"), "last-block token cosine ρ_L", False)
    a.set_title("rank collapse vs depth (ρ → 1)")
    _versus_depth(b, _at_top(agg, "layer_cosine"), "cos(x_{L-1}, x_L) of the last block", False)
    b.set_title("last block's input/output cosine (→ 1: it changes nothing)")
    return save(fig, path, fmt)


def profiles_at_depth(agg: pd.DataFrame, depth: int, path: Path, fmt: str = "png") -> Path:
    """Per-layer q_l, g_l / g_L, ρ_l and cos(x_{l-1}, x_l) at one depth, theory overlaid."""
    panels = [("second_moment", "stream second moment E[x_l²]", True),
              ("grad_rel", "g_l / g_L (gradient second moment)", True),
              ("token_cosine", "token cosine ρ_l", False),
              ("layer_cosine", "cos(x_{l-1}, x_l)", False)]
    fig, axes = new_figure(4, width=3.8)
    sub = agg[(agg["depth"] == depth) & ~agg["point"].str.endswith("pre_norm_sum")]
    for ax, (metric, label, log_y) in zip(axes, panels):
        for scheme, g in sub[sub["metric"] == metric].groupby("scheme", sort=False):
            g = g.sort_values("layer")
            l = g["layer"] + 1  # block index l; the embedding is l = 0
            _theory_lines(ax, l, g, scheme)
            ax.errorbar(l, g["measured"], yerr=Z * g["spread"].fillna(0), fmt="o", ms=2.5,
                        color=color(scheme), capsize=1.5, label=f"{scheme} measured")
        ax.set_xlabel("block l (0 = embedding)")
        ax.set_ylabel(label)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(f"{label.split(' (')[0]} at L = {depth}")
    legend(axes[0], fontsize=6, ncol=2)
    return save(fig, path, fmt)
