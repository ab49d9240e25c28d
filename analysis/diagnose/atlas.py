"""The atlas: several checkpoints diagnosed alike and laid side by side against relative depth.

``collect`` runs ``diagnose`` on each checkpoint (sigprop runs, Hugging Face folders, GGUF files)
with the same settings and stacks the per-layer tables, with the checkpoint's name, placement,
depth and relative depth (l + 1)/L. ``atlas_claims`` checks claims about trained models on them,
in the claims format of ``analysis.training.claims`` (claim, scheme, statement, method, status,
evidence), each threshold stated in its statement:

- **deep blocks contribute less** (pre-norm; Xiong et al. 2020, the "curse of depth"): the mean
  relative contribution of the last third of the blocks is below the first third's by more than
  twice their combined standard error;
- **deep blocks are cheap to skip** (Gromov et al. 2024, arXiv 2403.17887): skipping one of the
  last third of the blocks costs less than SKIP_CHEAP nats (median over those blocks) and less
  than skipping one of the first third;
- **post-norm contributions stay flat**: the largest block's relative contribution is within
  FLAT_RATIO of the smallest's.
A claim whose placement does not apply to a checkpoint is not listed; one whose quantity was not
measured (no real loss for the skip test) is 'untested'.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from analysis import progress
from analysis.diagnose.diagnosis import diagnose, thirds
from analysis.training.claims import COLUMNS

METHOD = "measured on the checkpoint"
SKIP_CHEAP = 0.05  # nats
FLAT_RATIO = 3.0


def checkpoint_name(path: str) -> str:
    """A readable name: the folder's (or file's stem), or its parent's where it is generic ('model')."""
    p = Path(path)
    p = p.parent if p.name in ("model", "checkpoint.pt", "model.safetensors") else p
    return p.stem if p.suffix in (".gguf", ".safetensors", ".pt", ".bin") else p.name


def collect(paths: list[str], *, log: Callable[[str], None] = progress.say, **settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(layers, checkpoints): every checkpoint's per-layer table stacked, and one row per checkpoint."""
    names = [checkpoint_name(p) for p in paths]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two checkpoints would share the name {dup[0]}: give distinct folders")
    layers, checkpoints = [], []
    bar = progress.bar(len(paths), "atlas", unit="checkpoint", leave=False)
    for i, (path, name) in enumerate(zip(paths, names), 1):
        log(f"[{i}/{len(paths)}] {path}")
        d = diagnose(path, **settings)
        bar.update()
        L = d.meta["blocks"]
        t = d.table.copy()
        t.insert(0, "checkpoint", name)
        t.insert(1, "placement", d.meta["placement"])
        t.insert(2, "depth", L)
        t.insert(3, "verdict", d.verdict.split(":")[0])
        t.insert(4, "relative_depth", (t["layer"] + 1) / L)
        layers.append(t)
        checkpoints.append(dict(checkpoint=name, path=str(path), model=d.meta["model"],
                                placement=d.meta["placement"], depth=L, loss=d.meta["loss"],
                                loss_value=d.meta["loss_value"], verdict=d.verdict,
                                findings=";".join(d.findings["id"]), seq_len=d.meta["seq_len"],
                                sequences=d.meta["sequences_used"], seconds=d.meta["seconds_total"]))
    bar.close()
    return pd.concat(layers, ignore_index=True), pd.DataFrame(checkpoints)


def _blocks(t: pd.DataFrame) -> pd.DataFrame:
    return t[(t["layer"] >= 0) & (t["layer"] < t["depth"])].sort_values("layer")


def _mean_se(b: pd.DataFrame, col: str) -> tuple[float, float]:
    """Mean over blocks and its standard error from the per-block standard errors."""
    v = b[col].to_numpy(dtype=float)
    se = b[f"{col}_se"].to_numpy(dtype=float) if f"{col}_se" in b else np.zeros_like(v)
    return float(np.mean(v)), float(np.sqrt(np.nansum(se ** 2)) / len(v))


def deep_blocks_contribute_less(b: pd.DataFrame) -> tuple[str, str]:
    """Last third's mean relative contribution below the first third's by > 2 combined SE."""
    first, last = thirds(b)
    (m1, s1), (m3, s3) = _mean_se(first, "branch_rel_median"), _mean_se(last, "branch_rel_median")
    if not (np.isfinite(m1) and np.isfinite(m3)):
        return "untested", "no relative contribution measured"
    se = math.hypot(s1, s3)
    status = "holds" if m1 - m3 > 2 * se else "fails"
    return status, (f"first third {m1:.3g} ± {s1:.2g}, last third {m3:.3g} ± {s3:.2g} "
                    f"(difference {m1 - m3:+.3g}, {abs(m1 - m3) / se:.1f} standard errors)" if se > 0 else
                    f"first third {m1:.3g}, last third {m3:.3g}")


def deep_blocks_cheap_to_skip(b: pd.DataFrame) -> tuple[str, str]:
    """Median skip loss change over the last third < SKIP_CHEAP nats and below the first third's."""
    if "skip_loss_delta" not in b or not b["skip_loss_delta"].notna().any():
        return "untested", "no loss change measured (the surrogate loss, or the skip test was off)"
    first, last = thirds(b)
    d1, d3 = float(first["skip_loss_delta"].median()), float(last["skip_loss_delta"].median())
    status = "holds" if d3 < SKIP_CHEAP and d3 < d1 else "fails"
    return status, (f"median loss change when one block is skipped: last third {d3:+.3g} nats, first "
                    f"third {d1:+.3g} nats (largest in the last third {last['skip_loss_delta'].max():+.3g})")


def post_contributions_flat(b: pd.DataFrame) -> tuple[str, str]:
    """Largest over smallest relative contribution ≤ FLAT_RATIO."""
    v = b["branch_rel_median"].to_numpy(dtype=float)
    if not np.isfinite(v).any() or np.nanmin(v) <= 0:
        return "untested", "no positive relative contribution measured"
    ratio = float(np.nanmax(v) / np.nanmin(v))
    return ("holds" if ratio <= FLAT_RATIO else "fails"), (
        f"contribution from {np.nanmin(v):.3g} to {np.nanmax(v):.3g} across {len(v)} blocks: ×{ratio:.3g}")


def atlas_claims(layers: pd.DataFrame) -> pd.DataFrame:
    """Claims about trained models, per checkpoint where its placement applies (module docstring)."""
    rows = []
    for name, t in layers.groupby("checkpoint", sort=False):
        b, placement = _blocks(t), t["placement"].iloc[0]
        checks = []
        if placement == "pre":
            checks += [("deep_blocks_contribute_less", "the last third of the blocks contributes less "
                        "than the first third (mean relative contribution, by > 2 standard errors)",
                        deep_blocks_contribute_less)]
        if placement == "post":
            checks += [("post_contributions_flat", f"relative contributions stay within ×{FLAT_RATIO:g} "
                        "across the blocks", post_contributions_flat)]
        checks += [("deep_blocks_cheap_to_skip", f"skipping one of the last third of the blocks costs "
                    f"< {SKIP_CHEAP:g} nats (median) and less than one of the first third",
                    deep_blocks_cheap_to_skip)]
        for claim, statement, fn in checks:
            status, evidence = fn(b)
            rows.append(dict(claim=f"{claim}:{name}", scheme=placement, statement=f"{name}: {statement}",
                             method=METHOD, status=status, evidence=evidence))
    return pd.DataFrame(rows, columns=COLUMNS)


def summary(layers: pd.DataFrame) -> pd.DataFrame:
    """Per checkpoint: robust stream growth, contribution first/last third, smallest skip change, largest peak."""
    rows = []
    for name, t in layers.groupby("checkpoint", sort=False):
        b = _blocks(t)
        first, last = thirds(b)
        rows.append(dict(checkpoint=name, depth=int(t["depth"].iloc[0]),
                         q_growth_median=float(b["q_rel_median"].iloc[-1]),
                         contribution_first_third=float(first["branch_rel_median"].mean()),
                         contribution_last_third=float(last["branch_rel_median"].mean()),
                         skip_change_min=float(b["skip_out_change"].min()) if "skip_out_change" in b else math.nan,
                         token_cosine_last=float(b["token_cosine"].iloc[-1]),
                         effective_rank_u_last=float(b["effective_rank_normalized"].iloc[-1]),
                         peak_ratio_max=float(b["peak_ratio"].max()) if "peak_ratio" in b else math.nan,
                         grad_scale_free_0=float(t["grad_scale_free"].iloc[0])))
    return pd.DataFrame(rows)
