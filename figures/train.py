"""Training figures and the training section of the report, from the grid's tables."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import EngFormatter

from figures.report import Summary, claims_summary
from figures.style import color, new_figure, save


def loss_vs_depth(runs: pd.DataFrame, path: Path, fmt: str = "png") -> Path:
    """Final validation bits/byte against depth per scheme: the mean over seeds with ± 2 standard
    errors; one panel per dense/MoE; × marks a depth where a seed diverged."""
    if "status" in runs:  # a cut run has no final loss yet
        runs = runs[runs["status"] != "cut"]
    kinds = sorted(runs["moe"].unique(), key=lambda k: (k != "dense", k))
    fig, axes = new_figure(max(1, len(kinds)))
    if not kinds:  # every run cut (or none recorded): a panel that says so, not no figure
        axes[0].text(0.5, 0.5, "no run has finished yet", ha="center", va="center",
                     transform=axes[0].transAxes)
        axes[0].set_title("validation loss vs depth")
        axes[0].set_axis_off()
    for ax, kind in zip(axes, kinds):
        sub = runs[runs["moe"] == kind]
        for scheme, g in sub.groupby("scheme", sort=False):
            ok = g[~g["diverged"].astype(bool)].groupby("depth")["final_val_bpb"]
            mean, se = ok.mean(), (ok.std() / ok.count() ** 0.5).fillna(0)
            ax.errorbar(mean.index, mean, yerr=2 * se, fmt="o-", color=color(scheme), capsize=3,
                        label=f"{scheme} ({g['seed'].nunique() if 'seed' in g else 1} seeds)")
            bad = sorted(g[g["diverged"].astype(bool)]["depth"].unique())
            if bad:
                top = mean.max() if len(mean) else 8.0
                ax.plot(bad, [top] * len(bad), "x", color=color(scheme), ms=9, mew=2,
                        label=f"{scheme} diverged")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("depth L (blocks)")
        ax.set_ylabel("final validation loss (bits/byte)")
        ax.set_title(f"validation loss vs depth ({kind})")
        ax.legend(fontsize=8)
    return save(fig, path, fmt)


STATUS_STYLE = {"ok": "-", "stalled": "--", "diverged": "-", "cut": ":"}


def _tokens_axis(ax, curves: pd.DataFrame) -> None:
    """A top axis in tokens, where every run of the panel has the same tokens per step."""
    per_step = (curves["tokens"] / curves["step"]).dropna().round().unique()
    if len(per_step) == 1 and per_step[0] > 0:
        k = float(per_step[0])
        top = ax.secondary_xaxis("top", functions=(lambda s: s * k, lambda t: t / k))
        top.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1.6M
        top.set_xlabel("tokens")


def _draw_run(ax, g: pd.DataFrame, colour: str, alpha: float, label: str | None) -> None:
    """One run: its smoothed training loss as a line (dashed if stalled, dotted if cut), its
    validation points as dots, × where it diverged."""
    status = g["status"].iloc[0]
    train, val = g[g["split"] == "train"], g[g["split"] == "val"]
    finite = train[np.isfinite(train["loss"])]
    ax.plot(finite["step"], finite["loss"] / math.log(2), STATUS_STYLE.get(status, "-"),
            color=colour, alpha=alpha, lw=1.2,
            label=None if label is None else label + ("" if status == "ok" else f" ({status})"))
    ax.plot(val["step"], val["loss"] / math.log(2), "o", ms=3, color=colour, alpha=alpha)
    if status == "diverged" and len(finite):
        ax.plot(finite["step"].iloc[-1], finite["loss"].iloc[-1] / math.log(2), "x", ms=9,
                mew=2, color=colour)


def _plateau(ax, plateau_bpb: float | None) -> None:
    if plateau_bpb is not None:
        ax.axhline(plateau_bpb, color="0.5", ls=":", lw=1,
                   label=f"unigram entropy {plateau_bpb:.2f}")


def loss_curves(curves: pd.DataFrame, path: Path, fmt: str = "png",
                plateau_bpb: float | None = None) -> Path:
    """Loss against optimizer step (tokens on top), a line per run: smoothed training loss, dots
    at validation; colour by scheme, shade by depth; stalled runs dashed, diverged ones end in ×,
    cut ones dotted; one panel per dense/MoE. ``plateau_bpb``: the corpus's unigram entropy, the
    plateau a stalled run sits on, drawn dotted."""
    kinds = sorted(curves["moe"].unique(), key=lambda k: (k != "dense", k)) or ["dense"]
    fig, axes = new_figure(len(kinds))
    depths = sorted(curves["depth"].unique())
    for ax, kind in zip(axes, kinds):
        sub = curves[curves["moe"] == kind]
        labelled = set()
        for (scheme, depth, _), g in sub.groupby(["scheme", "depth", "run"], sort=False):
            shade = 0.35 + 0.65 * (depths.index(depth) + 1) / len(depths)
            name = f"{scheme} L={depth}"
            _draw_run(ax, g, color(scheme), shade, None if name in labelled else name)
            labelled.add(name)
        _plateau(ax, plateau_bpb)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (bits/byte)")
        ax.set_title(f"loss curves ({kind}): lines train, dots validation", fontsize=8)
        ax.legend(fontsize=6, ncol=2)
        _tokens_axis(ax, sub)
    return save(fig, path, fmt)


def run_loss_figure(curve: pd.DataFrame, path: Path, fmt: str = "png",
                    plateau_bpb: float | None = None) -> Path:
    """One run's loss against optimizer step and tokens: smoothed training loss and validation."""
    fig, (ax,) = new_figure(1)
    scheme, status = curve["scheme"].iloc[0], curve["status"].iloc[0]
    _draw_run(ax, curve, color(scheme), 1.0, "train (smoothed)")
    ax.plot([], [], "o", ms=3, color=color(scheme), label="validation")
    _plateau(ax, plateau_bpb)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (bits/byte)")
    ax.set_title(f"{curve['run'].iloc[0]}: {status}", fontsize=9)
    ax.legend(fontsize=7)
    _tokens_axis(ax, curve)
    return save(fig, path, fmt)


def _over_seeds(g: pd.DataFrame) -> pd.DataFrame:
    """Per layer: the mean over seeds with its standard error (one seed: its own spread)."""
    if "seed" not in g or g["seed"].nunique() < 2:
        return g.sort_values("layer")
    by = g.groupby("layer")["mean"]
    return pd.DataFrame({"layer": by.mean().index, "mean": by.mean().values,
                         "spread": (by.std() / by.count() ** 0.5).values})


def profiles_init_vs_end(profiles: pd.DataFrame, path: Path, depth: int, fmt: str = "png",
                         moe: str = "dense") -> Path:
    """Per-layer stream second moment, gradient second moment and token cosine at init and end,
    for the runs of one FFN kind (``moe``: 'dense' or an MoE label such as 'moe8k2')."""
    panels = [("second_moment", "stream second moment E[x²]", True),
              ("grad_second_moment", "gradient second moment E[g²]", True),
              ("token_cosine", "token cosine ρ", False)]
    fig, axes = new_figure(len(panels), width=4.2)
    sub = profiles[(profiles["depth"] == depth) & (profiles["moe"] == moe)
                   & profiles["point"].astype(str).str.endswith("resid_post")]
    for ax, (metric, label, log) in zip(axes, panels):
        for (scheme, tag), g in sub[sub["metric"] == metric].groupby(["scheme", "tag"], sort=False):
            if tag not in ("init", "end"):
                continue
            g = _over_seeds(g)
            ax.errorbar(g["layer"] + 1, g["mean"], yerr=g["spread"].fillna(0), color=color(scheme),
                        ls="-" if tag == "end" else ":", label=f"{scheme} {tag}")
        ax.set_xlabel("block l")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.set_title(f"L={depth}: init (dotted) vs end of training")
        ax.legend(fontsize=6)
    return save(fig, path, fmt)


def update_sizes(profiles: pd.DataFrame, path: Path, depth: int, fmt: str = "png",
                 moe: str = "dense") -> Path:
    """Each block's relative update size (one optimizer step, its own input held fixed) at every
    measured step, per scheme, at ``depth``: the mean over seeds."""
    sub = profiles[(profiles["metric"] == "update_size") & (profiles["depth"] == depth)
                   & (profiles["moe"] == moe)]
    schemes = list(dict.fromkeys(sub["scheme"])) or ["none"]
    fig, axes = new_figure(len(schemes), width=3.6)
    for ax, scheme in zip(axes, schemes):
        g = sub[sub["scheme"] == scheme]
        steps = sorted(g["tag"].unique(), key=lambda s: int(s.removeprefix("step")))
        for k, tag in enumerate(steps):
            by = g[g["tag"] == tag].groupby("layer")["mean"].mean()
            ax.plot(by.index + 1, by.values, "o-", ms=3, color=color(scheme),
                    alpha=0.4 + 0.6 * (k + 1) / len(steps), label=f"step {tag.removeprefix('step')}")
        ax.set_yscale("log")
        ax.set_xlabel("block l")
        ax.set_ylabel("relative update ‖ΔB(x)‖/‖B(x)‖")
        ax.set_title(f"{scheme}, L={depth}")
        ax.legend(fontsize=7)
    return save(fig, path, fmt)


def training_blocks(runs: pd.DataFrame, figures: list[Path], base: Path,
                    claims: pd.DataFrame | None = None) -> list:
    """Report blocks: the verdict summary (the training claims, each run's status: diverged,
    stalled, cut), the figures (relative to ``base``), then the runs and claims tables."""
    table = runs[[c for c in ("scheme", "depth", "moe", "seed", "status", "tokens", "final_val_bpb",
                              "final_val_loss", "final_train_loss", "divergence_step",
                              "tokens_per_s", "mfu", "wall_s") if c in runs]]
    status = runs["status"] if "status" in runs else runs["diverged"].map(
        {True: "diverged", False: "ok"})
    counts = status.value_counts()
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "diverged", "stalled", "cut")
                        if counts.get(s, 0) or s in ("ok", "diverged")) + f" of {len(runs)} runs."
    for s in ("diverged", "stalled", "cut"):
        bad = runs[status == s]
        if len(bad):
            summary += f" {s.capitalize()}: " + ", ".join(
                f"{r.scheme} L={r.depth} ({r.moe})" + (f" at step {r.divergence_step}"
                                                       if s == "diverged" else "")
                for r in bad.itertuples()) + "."
    figs = [("img", p.relative_to(base).as_posix()) for p in figures]
    if claims is not None and len(claims):
        verdict = claims_summary(claims, [f"Runs: {summary}"], what="claims after training")
        return [("h2", "Training"), verdict, *figs, ("h3", "Runs"), ("table", table),
                ("h3", "Claims after training"),
                ("p", "Every setting of every run is in train_runs.csv."),
                ("table", claims[["claim", "status", "evidence"]])]
    return [("h2", "Training"), ("summary", Summary(lines=[f"Runs: {summary}"])), *figs,
            ("h3", "Runs"), ("table", table)]
