"""The per-layer table: one row per stream point from the probes' statistics, the re-initialized
model's columns beside it, and the init theory's."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from analysis.checkpoints import Loaded
from analysis.diagnose.measure import METRICS, SPREAD_METRICS


def layer_table(frame: pd.DataFrame, layout, contrib: pd.DataFrame | None = None,
                skip: pd.DataFrame | None = None, model=None) -> pd.DataFrame:
    """One row per stream point (embed, each block's output, the final norm if any): the diagnosis metrics."""
    wide = frame.pivot_table(index="point", columns="metric", values="mean", aggfunc="first")
    se = frame.pivot_table(index="point", columns="metric", values="spread", aggfunc="first")
    L = len(layout.blocks)
    rows = []
    for layer, point, module in ([(-1, "embed", "embedding")] +
                                 [(i, f"blocks.{i}.resid_post", layout.blocks[i]) for i in range(L)] +
                                 ([(L, "final", layout.final)] if final_is_norm(layout, model) else [])):
        r = wide.loc[point] if point in wide.index else pd.Series(dtype=float)
        row = {"layer": layer, "point": point, "module": module}
        for m in METRICS:
            row[m] = float(r.get(m, math.nan))
        for m in SPREAD_METRICS:  # standard error over batches, to compare against
            row[f"{m}_se"] = float(se.loc[point].get(m, math.nan)) if point in se.index else math.nan
        pre = f"blocks.{layer}.pre_norm_sum"
        row["pre_norm_second_moment"] = float(wide.loc[pre, "second_moment"]) if pre in wide.index else math.nan
        rows.append(row)
    t = pd.DataFrame(rows)
    t["angle_deg"] = t["angular_distance"] * 180.0
    q = t["second_moment"].to_numpy()
    t["growth"] = np.r_[math.nan, q[1:] / np.where(q[:-1] == 0, math.nan, q[:-1])]
    t.loc[t.point == "final", "growth"] = math.nan
    q0 = q[0] if q[0] else math.nan
    t["q_rel"] = q / q0
    qm = t["median_token_second_moment"].to_numpy()
    t["q_rel_median"] = qm / (qm[0] if qm[0] else math.nan)
    g = t["grad_second_moment"].to_numpy()
    g_last = g[L] if L >= 1 and g[L] else math.nan  # the last block's output (theory's l = L)
    t["grad_rel"] = g / g_last
    scale_free = np.sqrt(g * qm)
    t["grad_scale_free"] = scale_free / (scale_free[L] if L >= 1 and scale_free[L] else math.nan)
    t = t.drop(columns=["angular_distance", "layer_cosine"])
    for extra in (contrib, skip):
        if extra is not None and len(extra):
            t = t.merge(extra, on="layer", how="left")
    return t


def final_is_norm(layout, model: torch.nn.Module | None) -> bool:
    """Whether the head reads the stream through a final norm (not absent, not an Identity)."""
    return layout.final is not None and not (
        model is not None and isinstance(model.get_submodule(layout.final), torch.nn.Identity))


INIT_COLUMNS = ("q_rel", "q_rel_median", "token_cosine", "token_cosine_se", "effective_rank",
                "effective_rank_normalized", "angle_deg", "grad_rel", "grad_scale_free", "branch_rel_median",
                "grad_token_cosine", "second_moment")


def weight_scale(model: torch.nn.Module, block_paths: tuple[str, ...]) -> float:
    """σ such that the blocks' weight matrices look like N(0, σ²/fan_in): median of std·√fan_in.

    Used to put a re-initialized foreign model on the theory's scale (GPT-2 and BERT initialize
    with std 0.02, not 1/√fan_in). Linear weights are [out, in]; GPT-2's Conv1D stores [in, out].
    """
    vals = []
    for path in block_paths:
        for mod in model.get_submodule(path).modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2 and w.numel() > 1 and w.is_floating_point():
                fan_in = w.shape[0] if type(mod).__name__ == "Conv1D" else w.shape[1]
                std = float(w.detach().float().std())
                if math.isfinite(std) and std > 0:
                    vals.append(std * math.sqrt(fan_in))
    return float(np.median(vals)) if vals else 1.0


def add_theory(t: pd.DataFrame, loaded: Loaded, layout, init_model, seq_len: int,
               notes: list[str]) -> str | None:
    """theory_* columns: the init theory for the re-initialized model, fed its measured embedding."""
    scheme = loaded.scheme or (layout.placement if layout.placement in ("pre", "post", "peri") else None)
    for c in ("theory_q_rel", "theory_token_cosine", "theory_angle_deg", "theory_grad_rel",
              "theory_grad_scale_free"):
        t[c] = math.nan
    if init_model is None:
        notes.append("no theory comparison: it needs the re-initialized model (--init-sequences > 0)")
        return None
    if scheme is None:
        notes.append(f"no theory comparison: placement '{layout.placement}' has no single scheme")
        return None
    shape = dict(loaded.theory_shape)
    if loaded.scheme is None:  # a foreign family's initializer: put the theory on its scale
        shape["sigma"] = weight_scale(init_model, layout.blocks)
        notes.append(f"theory for the re-initialized foreign model uses σ = {shape['sigma']:.3g}, the "
                     "median std·√fan_in of its block weights (the theory's weights are N(0, σ²/fan_in); "
                     "the family's initializer may give each matrix its own σ, and biases and "
                     "embedding norms are outside the theory)")
    L = len(layout.blocks)
    q0, rho0 = t.iloc[0].init_second_moment, t.iloc[0].init_token_cosine
    if not all(np.isfinite([q0, rho0])) or not shape.get("width") or not shape.get("heads"):
        notes.append("no theory comparison: the embedding statistics or the width/heads are unknown")
        return None
    if shape.get("parametrization", "standard") != "standard":  # µP scales the logits otherwise
        notes.append(f"no theory comparison: the init theory covers the standard parametrization, "
                     f"this model is {shape['parametrization']} (attention logits × 1/d_head)")
        return None
    rho_g = t.iloc[L].init_grad_token_cosine
    if not np.isfinite(rho_g):
        notes.append("the theory's gradient profile assumes ρ_g = 0 at the top: no backward pass "
                     "measured the gradient's token cosine (--grad-sequences 0)")
    rho_g = float(rho_g) if np.isfinite(rho_g) else 0.0
    try:
        import dataclasses

        from theory.shape import Shape
        from theory.solve import predict_profile
        known = {f.name for f in dataclasses.fields(Shape)} | {"scheme_params"}
        if "attention" in shape and "attention" not in known:
            notes.append("theory uses causal attention: this theory has no bidirectional attention")
        keep = {k: v for k, v in shape.items() if k in known}
        pred = predict_profile(scheme, depth=L, seq_len=seq_len, q0=float(q0),
                               rho0=float(np.clip(rho0, 0.0, 1.0)), rho_g=rho_g, **keep)
    except Exception as e:  # theory is context: never let it stop a diagnosis
        notes.append(f"no theory comparison: {type(e).__name__}: {str(e)[:120]}")
        return None
    idx = np.arange(L + 1)  # table rows 0..L are embed (l = 0) and blocks (l = 1..L)
    t.loc[idx, "theory_q_rel"] = pred["q"] / pred["q"][0]
    t.loc[idx, "theory_token_cosine"] = pred["rho"]
    t.loc[idx, "theory_angle_deg"] = np.degrees(np.arccos(np.clip(pred["cos"], -1, 1)))
    t.loc[idx, "theory_grad_rel"] = pred["g"]
    free = np.sqrt(np.asarray(pred["g"]) * np.asarray(pred["q"]))  # the scale-free form, as measured
    t.loc[idx, "theory_grad_scale_free"] = free / free[L]
    return scheme
