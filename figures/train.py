"""Training figures and the training section of the report, from the grid's tables."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from figures.style import color, new_figure, save


def loss_vs_depth(runs: pd.DataFrame, path: Path, fmt: str = "png") -> Path:
    """Final validation bits/byte against depth per scheme: the mean over seeds with ± 2 standard
    errors; one panel per dense/MoE; × marks a depth where a seed diverged."""
    kinds = sorted(runs["moe"].unique(), key=lambda k: (k != "dense", k))
    fig, axes = new_figure(len(kinds))
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


def loss_curves(curves: pd.DataFrame, path: Path, fmt: str = "png") -> Path:
    """Validation loss against step, one line per run (every seed), colour by scheme, shade by
    depth."""
    val = curves[curves["split"] == "val"]
    kinds = sorted(val["moe"].unique(), key=lambda k: (k != "dense", k)) or ["dense"]
    fig, axes = new_figure(len(kinds))
    depths = sorted(val["depth"].unique())
    if "seed" not in val:
        val = val.assign(seed=0)
    for ax, kind in zip(axes, kinds):
        groups = val[val["moe"] == kind].groupby(["scheme", "depth", "seed"], sort=False)
        for (scheme, depth, seed), g in groups:  # a line per run; one legend entry per seed group
            shade = 0.35 + 0.65 * (depths.index(depth) + 1) / len(depths)
            first = seed == val[(val["scheme"] == scheme) & (val["depth"] == depth)]["seed"].min()
            ax.plot(g["step"] + 1, g["loss"] / math.log(2), color=color(scheme), alpha=shade,
                    label=f"{scheme} L={depth}" if first else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss (bits/byte)")
        ax.set_title(f"loss curves ({kind})")
        ax.legend(fontsize=6, ncol=2)
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
    """Report blocks: the runs table, which runs diverged, the training claims, and the figures
    (relative to ``base``)."""
    table = runs[[c for c in ("scheme", "depth", "moe", "seed", "tokens", "final_val_bpb",
                              "diverged", "divergence_step", "tokens_per_s", "mfu") if c in runs]]
    diverged = runs[runs["diverged"].astype(bool)]
    summary = f"{len(diverged)} of {len(runs)} runs diverged" + (
        ": " + ", ".join(f"{r.scheme} L={r.depth} ({r.moe}) at step {r.divergence_step}"
                         for r in diverged.itertuples()) if len(diverged) else "") + "."
    blocks = [("h2", "Training"), ("table", table), ("p", summary)]
    if claims is not None and len(claims):
        counts = claims["status"].value_counts()
        blocks += [("h3", "Claims after training"),
                   ("p", f"{counts.get('holds', 0)} hold, {counts.get('fails', 0)} fail, "
                         f"{counts.get('untested', 0)} untested (every setting of every run is in "
                         "train_runs.csv)."),
                   ("table", claims[["claim", "status", "evidence"]])]
    return blocks + [("img", p.relative_to(base).as_posix()) for p in figures]
