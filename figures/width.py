"""Figures of the first steps across width: the coordinate check (microsoft/mup's style: one panel
per step, coordinate size against width, one line per layer) and learning-rate sweeps."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from figures.style import color, new_figure, save

LABELS = {"act_rms": "activation RMS", "change_rms": "RMS change since init",
          "update": "per-block update size"}


def coordcheck_figure(raw: pd.DataFrame, scheme: str, metric: str, path: Path,
                      fmt: str = "png") -> Path:
    """Rows: parametrizations; columns: steps; lines: sites (blocks light to dark, logits black),
    mean over seeds."""
    rows = raw[raw["scheme"] == scheme]
    pars = list(dict.fromkeys(rows["parametrization"]))
    steps = sorted(rows["step"].unique())
    fig, axes = plt.subplots(len(pars), len(steps), figsize=(2.8 * len(steps), 2.5 * len(pars)),
                             squeeze=False, sharex=True)
    sites = list(dict.fromkeys(rows["site"]))
    blocks = [s for s in sites if s != "head"]
    shades = plt.cm.viridis(np.linspace(0.1, 0.85, max(1, len(blocks))))
    for i, par in enumerate(pars):
        for j, step in enumerate(steps):
            ax = axes[i][j]
            g = rows[(rows["parametrization"] == par) & (rows["step"] == step)]
            mean = g.groupby(["site", "width"], sort=False)[metric].mean().reset_index()
            for site in sites:
                s = mean[mean["site"] == site].sort_values("width")
                if s[metric].notna().any():
                    c = "black" if site == "head" else shades[blocks.index(site)]
                    ax.plot(s["width"], s[metric], "o-", ms=3, lw=1.2, color=c,
                            label="logits" if site == "head" else site)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.set_title(f"{par}, step {step}", fontsize=8)
            if j == 0:
                ax.set_ylabel(LABELS[metric], fontsize=8)
            if i == len(pars) - 1:
                ax.set_xlabel("width", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"coordinate check: {scheme}, {rows['optimizer'].iloc[0]} "
                 f"(lr {rows['lr'].iloc[0]:g}); flat lines = width-independent", fontsize=9)
    return save(fig, path, fmt)


def lrsweep_figure(table: pd.DataFrame, by: str, path: Path, fmt: str = "png") -> Path:
    """Final loss against lr, one panel per scheme × parametrization, one line per ``by`` value
    (width or depth), ± 2 standard errors over seeds; each curve's optimum marked."""
    panels = list(dict.fromkeys(zip(table["scheme"], table["parametrization"])))
    fig, axes = new_figure(len(panels), width=4.2)
    for ax, (scheme, par) in zip(axes, panels):
        g = table[(table["scheme"] == scheme) & (table["parametrization"] == par)]
        values = sorted(g[by].unique())
        shades = plt.cm.viridis(np.linspace(0.1, 0.85, max(1, len(values))))
        for shade, v in zip(shades, values):
            s = g[g[by] == v].sort_values("lr")
            ax.errorbar(s["lr"], s["loss"], yerr=2 * s["loss_se"].fillna(0), fmt="o-", ms=3,
                        lw=1.2, capsize=2, color=shade, label=f"{by} {v}")
            best = s.loc[s["loss"].idxmin()]
            ax.plot(best["lr"], best["loss"], "*", ms=10, color=shade, mec="black", mew=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("validation loss after N steps (nats)")
        ax.set_title(f"{scheme} ({par})", color=color(scheme))
        ax.legend(fontsize=6)
    return save(fig, path, fmt)
