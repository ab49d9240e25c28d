"""One optimizer step against the one-step theory: linearity, the weights' shares, width transfer.

``python -m analysis.width.onestep [--schemes pre,post,span] [--optimizers adam,sgd]
[--base-width 64] [--width 512] [--depth 4] [--seeds 0,1,2] [--depths 4,8,16,32]
[--depth-schemes pre,post,span,deepnorm] [--depth-width 256] [--out DIR]``

For each scheme, optimizer and seed, one step from init (Adam's first step, or plain SGD, at a lr
small enough for the linear regime), each block's change on a fixed batch with its own input held:
- ``linearity``: the change with every weight group stepped, against the sum of the changes with
  each group (q·k, v, o, up/gate, down, norm gains) stepped alone; their root-sum-square shows how
  aligned the groups' changes are;
- ``transfer``: the update size at ``--width`` against theory.step's law r ∝ η·d^e applied to the
  same block's update at ``--base-width`` (e from the optimizer and parametrization): the width
  dependence is theory's, the O(1) constant is measured at the base width. Compared as means
  over seeds (one seed's update at a small width scatters by 10–20 %), with the standard error;
- ``depth``: the median block's update at each of ``--depths`` (width ``--depth-width``), its
  log–log slope against theory.depth_orders' exponent, and the network's change (the last
  block's, upstream changes included) against its exponent.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from analysis.testbed.corpus import Corpus
from analysis.testbed.model import ModelConfig, build_model
from analysis.testbed.parametrization import lr_multipliers
from analysis.training.train import snapshot_blocks
from theory.claim_table import Claim, claims_frame
from theory.step import block_exponent

GROUPS = {"qk": (".q.", ".k."), "v": (".v.",), "o": (".o.",), "up": (".up.", ".gate."),
          "down": (".down.",), "norm": (".norms.",)}
LINEAR_LR = {"adam": 1e-4, "sgd": 1e-2}  # relative updates of a few %: first order holds
# The depth study's network change adds L blocks' changes: at LINEAR_LR it reaches O(1) by L = 64
# (span under Adam: 1.2, 5× too small for 10× the lr), so it steps 100× (Adam) and 1000× (SGD)
# less, in float64 for precision; changes then scale with the lr within 1 % at every depth ≤ 64.
DEPTH_LR = {"adam": 1e-6, "sgd": 1e-5}
DEPTH_DTYPE = "float64"
DEPTH_TOL = 0.1  # |measured − theory| of a depth exponent
DEPTH_METHOD = ("measured after one optimizer step from init (Adam lr 1e-6, SGD 1e-5, float64), "
                "across depths (log–log slope)")


def _group(name: str) -> str | None:
    return next((g for g, keys in GROUPS.items() if any(k in name for k in keys)), None)


class StepChanges(NamedTuple):
    """One step's changes on the fixed batch: each block's, its own input held (``blocks``), the
    block outputs before the step (``outs``), and the last block's relative change with every
    upstream change included (``network``)."""

    blocks: list[torch.Tensor]
    outs: list[torch.Tensor]
    network: float


def block_changes(mc: ModelConfig, optimizer: str, lr: float, seed: int, corpus: Corpus,
                  batch_size: int = 8, only: str | None = None) -> StepChanges:
    """The changes on the fixed batch after one step of the block weights in group ``only`` (all
    groups: None)."""
    model = build_model(mc, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = corpus.batch("train", batch_size, mc.max_seq_len, generator=gen)
    fixed = corpus.batch("val", batch_size, mc.max_seq_len,
                         generator=torch.Generator().manual_seed(20_000 + seed))[0]
    snap = snapshot_blocks(model, fixed)
    model(x, y)[1].backward()
    mult = lr_multipliers(model, optimizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("blocks.") or (only is not None and _group(name) != only):
                continue
            g = p.grad  # Adam's first step is lr·m̂/(√v̂ + eps) = lr·g/(|g| + eps)
            p -= lr * mult[name] * (g if optimizer == "sgd" else g / (g.abs() + 1e-8))
        changes = [(b(xi) - yo).float() for b, (xi, yo) in zip(model.blocks, snap)]
    last_before, last_after = snap[-1][1].float(), snapshot_blocks(model, fixed)[-1][1].float()
    network = float((last_after - last_before).norm() / last_before.norm())
    return StepChanges(changes, [yo.float() for _, yo in snap], network)


def linearity(mc: ModelConfig, optimizer: str, seed: int, corpus: Corpus) -> pd.DataFrame:
    """Per block: the update with every group stepped, the sum of the per-group changes, their
    root-sum-square, and each group's own share (all relative to the block output's norm)."""
    lr = LINEAR_LR[optimizer]
    full, outs, _ = block_changes(mc, optimizer, lr, seed, corpus)
    parts = {g: block_changes(mc, optimizer, lr, seed, corpus, only=g)[0] for g in GROUPS}
    rows = []
    for i, out in enumerate(outs):
        norm = out.norm()
        each = {g: float(parts[g][i].norm() / norm) for g in GROUPS}
        rows.append({"block": i, "update": float(full[i].norm() / norm),
                     "sum_of_groups": float(sum(parts[g][i] for g in GROUPS).norm() / norm),
                     "root_sum_square": float(np.sqrt(sum(v ** 2 for v in each.values()))),
                     **{f"share_{g}": v for g, v in each.items()}})
    return pd.DataFrame(rows)


def transfer(mc: ModelConfig, base_width: int, optimizer: str, seed: int,
             corpus: Corpus) -> pd.DataFrame:
    """Per block: the update at mc.width against theory's law from the same block at base_width."""
    lr = LINEAR_LR[optimizer]
    e = float(block_exponent(optimizer, mc.parametrization))
    sizes = {}
    for w in (base_width, mc.width):
        cfg = ModelConfig(**{**mc.to_dict(), "width": w})
        changes, outs, _ = block_changes(cfg, optimizer, lr, seed, corpus)
        sizes[w] = [float(c.norm() / o.norm()) for c, o in zip(changes, outs)]
    return pd.DataFrame({"block": range(mc.depth), "base": sizes[base_width],
                         "measured": sizes[mc.width],
                         "theory": [r * (mc.width / base_width) ** e for r in sizes[base_width]],
                         "exponent": e})


def depth_study(scheme: str, depths: list[int], width: int, optimizer: str, seed: int,
                corpus: Corpus, heads: int = 4, seq_len: int = 64) -> pd.DataFrame:
    """Every block's one-step update at each depth, and the network's (the last block's relative
    change, upstream changes included), at DEPTH_LR in DEPTH_DTYPE: the linear regime."""
    rows = []
    for L in depths:
        mc = ModelConfig(scheme=scheme, depth=L, width=width, heads=heads, max_seq_len=seq_len,
                         dtype=DEPTH_DTYPE)
        changes, outs, network = block_changes(mc, optimizer, DEPTH_LR[optimizer], seed, corpus)
        rows += [{"depth": L, "block": i, "update": float(c.norm() / o.norm()),
                  "network": network} for i, (c, o) in enumerate(zip(changes, outs))]
    return pd.DataFrame(rows)


def depth_slopes(study: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per scheme and optimizer: the log–log slope against depth of the median block's ``update``
    or of the ``network`` change (per seed, then mean and standard error), with each depth's
    seed mean."""
    rows = []
    for (scheme, opt), g in study.groupby(["scheme", "optimizer"], sort=False):
        med = g.groupby(["seed", "depth"])[column].median().reset_index()
        per_seed = [np.polyfit(np.log(s["depth"]), np.log(s[column]), 1)[0]
                    for _, s in med.groupby("seed")]
        se = float(np.std(per_seed, ddof=1) / np.sqrt(len(per_seed))) if len(per_seed) > 1 else np.nan
        rows.append({"scheme": scheme, "optimizer": opt, "slope": float(np.mean(per_seed)),
                     "slope_se": se, "by_depth": med.groupby("depth")[column].mean().to_dict()})
    return pd.DataFrame(rows)


def depth_claims(study: pd.DataFrame) -> pd.DataFrame:
    """Per scheme and optimizer: the log–log slopes of the median block's update and of the
    network's change against depth, against theory.depth_orders' exponents (within 0.1)."""
    rows = []
    for column, what in (("update", "the median block's one-step update"),
                         ("network", "the network's one-step change (last block, relative)")):
        if column not in study:
            continue  # a study from before the network column
        for r in depth_slopes(study, column).itertuples():
            k = _derived(r.scheme, r.optimizer, column)
            k_fixed = _derived(r.scheme, r.optimizer, column, fixed_width=True)
            between = (k is not None and k_fixed is not None and k != k_fixed
                       and abs(r.slope - float(k)) > DEPTH_TOL  # a failure the norms explain
                       and min(k, k_fixed) - DEPTH_TOL <= r.slope <= max(k, k_fixed) + DEPTH_TOL)
            note = (f"; between the d → ∞ exponent and the fixed-width one ({float(k_fixed):g}: "
                    "the norms' own gains stepped)" if between else "")
            statement = (f"theory.depth_orders has no depth exponent for {r.scheme} under "
                         f"{r.optimizer}" if k is None else
                         f"{what} under {r.optimizer} scales as L^{float(k):g} "
                         f"(theory.depth_orders), within {DEPTH_TOL}")
            name = "update" if column == "update" else "network_change"
            rows.append(Claim(f"{r.scheme}_{r.optimizer}_{name}_depth_exponent", r.scheme,
                              statement, DEPTH_METHOD,
                              "untested" if k is None else
                              "holds" if abs(r.slope - float(k)) <= DEPTH_TOL else "fails",
                              f"{'median block update' if column == 'update' else 'network change'} "
                              + ", ".join(f"L={L}: {v:.4g}" for L, v in r.by_depth.items()) + note,
                              {"optimizer": r.optimizer, "slope": r.slope,
                               "slope_se": r.slope_se,
                               "theory": np.nan if k is None else float(k),
                               "theory_fixed_width": np.nan if k_fixed is None else float(k_fixed)}))
    return claims_frame(rows)


def _derived(scheme: str, optimizer: str, column: str, fixed_width: bool = False):
    from theory.depth_orders import depth_orders
    try:
        d = depth_orders(scheme, optimizer)
    except ValueError:
        return None
    if column == "update":
        return d.block_fixed_width if fixed_width else d.block
    return d.network_fixed_width if fixed_width else d.network


def transfer_errors(tr: pd.DataFrame) -> pd.DataFrame:
    """Per scheme, optimizer and block: theory and measured means over seeds, the relative error
    of the means and its standard error (both sides' seed spreads)."""
    g = tr.groupby(["scheme", "optimizer", "block"], sort=False)
    out = g.agg(theory=("theory", "mean"), measured=("measured", "mean"),
                theory_sd=("theory", "std"), measured_sd=("measured", "std"),
                seeds=("seed", "count")).reset_index()
    out["error"] = out["theory"] / out["measured"] - 1
    rel = np.hypot(out["theory_sd"] / out["theory"], out["measured_sd"] / out["measured"])
    out["error_se"] = (1 + out["error"]) * rel / np.sqrt(out["seeds"])
    return out.drop(columns=["theory_sd", "measured_sd"])


def summarize(lin: pd.DataFrame, tr: pd.DataFrame) -> pd.DataFrame:
    """Per scheme and optimizer: linearity error, alignment of the groups' changes, and the width
    transfer's largest per-block error of the seed means with the largest standard error."""
    errors = transfer_errors(tr)
    rows = []
    for (scheme, opt), g in lin.groupby(["scheme", "optimizer"], sort=False):
        e = errors[(errors["scheme"] == scheme) & (errors["optimizer"] == opt)]
        rows.append({"scheme": scheme, "optimizer": opt,
                     "linearity_max_error": float((g["sum_of_groups"] / g["update"] - 1).abs().max()),
                     "sum_over_rss": float((g["sum_of_groups"] / g["root_sum_square"]).median()),
                     "transfer_max_abs_error": float(e["error"].abs().max()),
                     "transfer_max_se": float(e["error_se"].max()),
                     "within_10pct": bool((e["error"].abs() <= 0.10).all())})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis.width.onestep``: the same as `sigprop onestep` (analysis/cli/onestep.py)."""
    from analysis.cli import module_main
    return module_main("onestep", argv)


if __name__ == "__main__":
    sys.exit(main())
