"""Init sweep: schemes × depths × seeds measured with probes, and theory at the same configuration.

The result is one tidy table, ``init_profiles.csv``: scheme, depth, seed, layer, point, metric,
measured, spread, theory, theory_averaged. ``theory`` is the position-resolved prediction
(theory/positional.py), ``theory_averaged`` the sequence-averaged symbolic recurrence
(theory/interpreter.py); the comparison reports both. ``layer`` follows the probes: -1 is the embedding, i = 0..L-1 is block
i (``blocks.{i}``, the block l = i + 1 of the theory). Metrics:

- ``second_moment`` at ``embed``, ``blocks.{i}.resid_post`` and ``blocks.{i}.pre_norm_sum``
  (theory q_l and the aggregate q before the output norm)
- ``grad_rel``: E[(∂loss/∂x)²] at the point over its value at the last block's output (theory g_l)
- ``token_cosine``: mean cosine of distinct tokens (theory ρ_l)
- ``layer_cosine``: cos(x_{l-1}, x_l) of a block's input and output (theory cos)
- ``grad_token_cosine``: token cosine of the gradient (theory ρ_g; its value at the top block is
  the theory's input, like q_0 and ρ_0 at the embedding)
- ``grad_first_token``: the first token's gradient power over the token mean (resolved theory
  g_first; the averaged recurrence has no positions: NaN)
- ``grad_second_moment``, ``dong_residual``: measured only (theory NaN)

``spread`` is the standard error of the measured mean over the probe's batches (one seed).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import numpy as np
import pandas as pd
import torch

from analysis.testbed.corpus import Corpus
from analysis.testbed.model import ModelConfig, build_model
from probes import Probe
from theory.positional import predict_positional
from theory.solve import predict_profile

PROBE_METRICS = ["second_moment", "grad_second_moment", "grad_token_cosine", "grad_first_token",
                 "token_cosine", "layer_cosine", "dong_residual"]
COLUMNS = ["scheme", "depth", "seed", "layer", "point", "metric", "measured", "spread", "theory",
           "theory_averaged"]


def measure(cfg: ModelConfig, seed: int, corpus: Corpus, batches: int, batch_size: int,
            device: str = "cpu") -> pd.DataFrame:
    """Probe frame of the testbed at init over ``batches`` corpus batches (forward and backward)."""
    model = build_model(cfg, seed=seed, device=device)
    gen = torch.Generator().manual_seed(1_000 + seed)
    with Probe(model, metrics=PROBE_METRICS) as p:
        for _ in range(batches):
            x, y = corpus.batch("train", batch_size, cfg.max_seq_len, generator=gen, device=device)
            _, loss = model(x, y)
            loss.backward()
            model.zero_grad(set_to_none=True)
    return p.frame()


def to_rows(frame: pd.DataFrame, depth: int) -> pd.DataFrame:
    """Probe frame → measured rows, with the gradient normalized by its value at the top block."""
    keep = frame[frame["site"].isin(["embed", "resid_post", "pre_norm_sum"])]
    rows = keep[["layer", "point", "metric", "mean", "spread"]].rename(
        columns={"mean": "measured"})
    g = rows[rows["metric"] == "grad_second_moment"]
    top = g[g["point"] == f"blocks.{depth - 1}.resid_post"]["measured"].iloc[0]
    rel = g.assign(metric="grad_rel", measured=g["measured"] / top, spread=g["spread"] / top)
    return pd.concat([rows, rel], ignore_index=True)


PREDICTIONS = {"theory": predict_positional, "theory_averaged": predict_profile}


def theory_rows(cfg: ModelConfig, q0: float, rho0: float, rho_g: float) -> pd.DataFrame:
    """Both theories' per-layer predictions for ``cfg``, as rows matching the measured ones.

    ``theory``: the position-resolved interpretation (theory/positional.py), the one compared;
    ``theory_averaged``: the sequence-averaged symbolic recurrence (theory/interpreter.py).
    """
    frames = []
    for column, predict in PREDICTIONS.items():
        pred = predict(cfg.scheme, depth=cfg.depth, seq_len=cfg.max_seq_len,
                       scheme_params=cfg.scheme_params, q0=q0, rho0=rho0, rho_g=rho_g,
                       **cfg.shape_fields())
        rows = []
        for l in range(cfg.depth + 1):
            point = "embed" if l == 0 else f"blocks.{l - 1}.resid_post"
            for metric, key in (("second_moment", "q"), ("token_cosine", "rho"), ("grad_rel", "g"),
                                ("grad_token_cosine", "rg"), ("layer_cosine", "cos"),
                                ("grad_first_token", "g_first")):
                rows.append((point, metric, pred[key][l] if key in pred else np.nan))
            if l > 0 and np.isfinite(pred["q_agg"][l]):
                rows.append((f"blocks.{l - 1}.pre_norm_sum", "second_moment", pred["q_agg"][l]))
        frames.append(pd.DataFrame(rows, columns=["point", "metric", column]).set_index(["point", "metric"]))
    return pd.concat(frames, axis=1).reset_index()


def init_sweep(schemes: list[str], depths: list[int], seeds: list[int], base: ModelConfig,
               corpus: Corpus, batches: int = 2, batch_size: int = 4, device: str = "cpu",
               log: Callable[[str], None] = print) -> pd.DataFrame:
    """Measure and predict every (scheme, depth, seed); the tidy init_profiles table."""
    configs = [replace(base, scheme=s, depth=d) for s in schemes for d in depths]
    for cfg in configs:
        cfg.validate()
    parts = []
    t0 = time.perf_counter()
    for k, cfg in enumerate(configs, 1):
        t = time.perf_counter()
        for seed in seeds:
            rows = to_rows(measure(cfg, seed, corpus, batches, batch_size, device), cfg.depth)
            embed = rows[rows["point"] == "embed"].set_index("metric")["measured"]
            top = rows[rows["point"] == f"blocks.{cfg.depth - 1}.resid_post"].set_index("metric")
            theory = theory_rows(cfg, q0=embed["second_moment"], rho0=embed["token_cosine"],
                                 rho_g=top.loc["grad_token_cosine", "measured"])
            rows = rows.merge(theory, on=["point", "metric"], how="left")
            parts.append(rows.assign(scheme=cfg.scheme, depth=cfg.depth, seed=seed))
        log(f"  [{k}/{len(configs)}] {cfg.scheme} L={cfg.depth}: {len(seeds)} seeds in "
            f"{time.perf_counter() - t:.1f} s (total {time.perf_counter() - t0:.0f} s)")
    return pd.concat(parts, ignore_index=True)[COLUMNS]
