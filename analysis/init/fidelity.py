"""Where init theory and measurement part, and why: a seed study and a sublayer audit.

``python -m analysis.init.fidelity`` (``--help`` for options) writes into ``--out``:

- ``seed_study.csv``: per scheme, corpus, layer and metric, the measured mean over many seeds
  with its standard error, the position-resolved theory (each seed's own inputs, averaged) and
  z = (theory − measured)/SE. Two corpora: the default text and i.i.d. uniform random bytes. The
  random bytes are the control for the text's token-identity structure (a byte repeated in a
  window makes those two tokens' embeddings correlated, cosine ½ at init), which the theory's
  single input ρ_0 cannot represent.
- ``audit.csv``: every sublayer of every block, its measured output (second moment and mean
  off-diagonal token covariance) against theory's map of the *measured* input Gram matrix, each
  sequence's own and the mean over sequences; backward the same for the input gradient's Gram
  given the measured output gradient's ("grad q", "grad offdiag"). A map that is right given its input shows z ≈ 0
  here even where the propagated profile drifts; the two columns tell the theory's error apart
  from the cost of propagating mean statistics through nonlinear maps (Jensen).
- ``cosine_statistic.csv``: per block output, the probes' token cosine (mean over sequences of
  the mean pairwise cosine) against the cosine of the mean Gram matrix (what theory predicts).
- ``summary.csv``: per study and metric, median relative or absolute error, median |z| and the
  mean z (its sign: theory above or below).

With ``--grid RUN_DIR`` nothing is measured: from a finished sweep's init_profiles.csv it writes
``gradient_spread.csv`` (g_0/g_L of every seed and its spread in log10) and the typical value
against theory, tested over depths with the seeds' noise (analysis/init/typical.py):
``typical_targets.csv``, ``typical_by_depth.csv`` and ``typical_orders.csv``.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import numpy as np
import pandas as pd
import torch

from analysis.init.sweep import batch_generator, measure, theory_inputs, theory_rows, to_rows
from analysis.testbed.corpus import Corpus
from analysis.testbed.model import ModelConfig, build_model
from probes.metrics import token_cosine
from theory import positional

METRICS = {"second_moment": "relative", "grad_rel": "relative", "token_cosine": "absolute",
           "layer_cosine": "absolute"}


def random_corpus(n_bytes: int = 1 << 21, seed: int = 0) -> Corpus:
    """I.i.d. uniform bytes: no token repeats a window beyond chance (1/256 per pair)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, n_bytes, dtype=np.uint8)
    cut = int(0.9 * n_bytes)
    return Corpus(data[:cut], data[cut:], "random bytes", [], [])


def seed_study(cfg: ModelConfig, seeds: list[int], corpus: Corpus, batches: int = 2,
               batch_size: int = 4, log: Callable[[str], None] | None = None,
               redraw_embedding: bool = False) -> pd.DataFrame:
    """Per layer and metric: measured mean ± SE over ``seeds``, theory, z."""
    measured, theory = [], []
    for k, seed in enumerate(seeds, 1):
        if log:
            log(f"    seed study: seed {k}/{len(seeds)}")
        rows = to_rows(measure(cfg, seed, corpus, batches, batch_size,
                               redraw_embedding=redraw_embedding), cfg.depth)
        th = theory_rows(cfg, **theory_inputs(rows, cfg.depth))
        rows = rows[rows["metric"].isin(list(METRICS))]
        measured.append(rows.set_index(["layer", "point", "metric"])["measured"])
        theory.append(rows.merge(th, on=["point", "metric"]).set_index(
            ["layer", "point", "metric"])["theory"])
    m, t = pd.concat(measured, axis=1), pd.concat(theory, axis=1)
    out = pd.DataFrame({"measured": m.mean(axis=1), "se": m.std(axis=1) / math.sqrt(len(seeds)),
                        "theory": t.mean(axis=1)}).reset_index()
    out = out[out["layer"] >= 0]
    out["site"] = out["point"].str.rsplit(".", n=1).str[-1]
    out["z"] = (out["theory"] - out["measured"]) / out["se"]
    return out.assign(scheme=cfg.scheme, depth=cfg.depth, seeds=len(seeds))


def _maps(cfg: ModelConfig) -> dict[str, Callable[[np.ndarray, dict], tuple]]:
    """Theory's sublayer maps by kind: (input Gram, gains) → (output Gram, backward map)."""
    st = positional.Setting(cfg.width, cfg.max_seq_len, cfg.sigma, cfg.ffn, cfg.norm, cfg.experts,
                            cfg.top_k, cfg.attention)
    width = {"width": cfg.width} if cfg.attention == "causal" else {}
    attention = positional.ATTENTION[cfg.attention]
    return {"attn": lambda S, g: attention(S, sigma=cfg.sigma, **g, **width),
            "ffn": lambda S, g: positional.ffn(S, st, g.get("in_gain", 1.0), g.get("out_gain", 1.0))}


def _grams(X: torch.Tensor, width: int) -> np.ndarray:
    return (torch.einsum("bsd,btd->bst", X, X) / width).numpy()


def _record(model: torch.nn.Module, seen: dict) -> list:
    """Hooks that keep every sublayer's input, output and their gradients, and every block's
    output, keyed (block, name, kind, gains)."""
    hooks = []
    for i, block in enumerate(model.blocks):
        mods = {"attn": list(block.attns), "ffn": list(block.ffns)}
        used = {"attn": 0, "ffn": 0}
        for c in (c for c in block.structure.calls if c.kind in mods):
            j = used[c.kind]
            used[c.kind] += 1
            key = (i, f"{c.kind}{j}", c.kind, tuple(sorted(c.init_gains.items())))
            entry = seen.setdefault(key, {"x": [], "y": [], "gx": [], "gy": []})

            def fwd(m, inp, out, entry=entry):
                entry["x"].append(inp[0].detach())
                entry["y"].append(out.detach())

            def bwd(m, grad_in, grad_out, entry=entry):
                entry["gx"].append(grad_in[0].detach())
                entry["gy"].append(grad_out[0].detach())
            hooks += [mods[c.kind][j].register_forward_hook(fwd),
                      mods[c.kind][j].register_full_backward_hook(bwd)]
        entry = seen.setdefault((i, "out", "stream", ()), {"y": []})
        hooks.append(block.register_forward_hook(
            lambda m, inp, out, entry=entry: entry["y"].append(out.detach())))
    return hooks


def sublayer_audit(cfg: ModelConfig, seeds: list[int], corpus: Corpus, batches: int = 2,
                   batch_size: int = 4, log: Callable[[str], None] | None = None
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(audit, cosine statistic): every sublayer's measured output Gram (forward) and input
    gradient Gram (backward) against theory's maps of its measured input Gram and output
    gradient Gram; every block output's probe cosine against the cosine of its mean Gram."""
    maps = _maps(cfg)
    off = ~np.eye(cfg.max_seq_len, dtype=bool)
    stats_of = {"q": lambda A: float(np.mean(np.diag(A))), "offdiag": lambda A: float(A[off].mean())}
    rows, cos_rows = [], []
    for k, seed in enumerate(seeds, 1):
        if log:
            log(f"    audit: seed {k}/{len(seeds)}")
        model = build_model(cfg, seed=seed).double()
        seen: dict[tuple, dict] = {}
        hooks = _record(model, seen)
        gen = batch_generator(seed)
        for _ in range(batches):
            x, y = corpus.batch("train", batch_size, cfg.max_seq_len, generator=gen)
            model(x, y)[1].backward()
        for h in hooks:
            h.remove()
        for (i, name, kind, gains), e in seen.items():
            Y = torch.cat(e["y"])
            if kind == "stream":
                cos_rows.append({"seed": seed, "block": i, "probe": float(token_cosine(Y)),
                                 "gram": positional.mean_cosine(_grams(Y, cfg.width).mean(0))})
                continue
            S_in, K_out = _grams(torch.cat(e["x"]), cfg.width), _grams(Y, cfg.width)
            # each batch's backward follows its forward: gradients are in batch order too
            G_out, G_in = _grams(torch.cat(e["gy"]), cfg.width), _grams(torch.cat(e["gx"]), cfg.width)
            fn, g = maps[kind], dict(gains)
            per_seq = [fn(S, g) for S in S_in]
            forward = np.mean([k for k, _ in per_seq], 0)
            backward = np.mean([bw(G) for (_, bw), G in zip(per_seq, G_out)], 0)
            of_mean = fn(S_in.mean(0), g)
            measured = {"forward": K_out.mean(0), "backward": G_in.mean(0)}
            theory = {"forward": (forward, of_mean[0]),
                      "backward": (backward, of_mean[1](G_out.mean(0)))}
            for direction in ("forward", "backward"):
                for stat, f in stats_of.items():
                    rows.append({"seed": seed, "block": i, "sublayer": name,
                                 "stat": stat if direction == "forward" else f"grad {stat}",
                                 "input_cosine": positional.mean_cosine(S_in.mean(0)),
                                 "measured": f(measured[direction]),
                                 "theory_per_sequence": f(theory[direction][0]),
                                 "theory_mean_gram": f(theory[direction][1])})
    audit = pd.DataFrame(rows).groupby(["block", "sublayer", "stat"]).agg(
        input_cosine=("input_cosine", "mean"), measured=("measured", "mean"),
        se=("measured", lambda v: v.std() / math.sqrt(len(v))),
        theory_per_sequence=("theory_per_sequence", "mean"),
        theory_mean_gram=("theory_mean_gram", "mean")).reset_index()
    audit["z"] = (audit["theory_per_sequence"] - audit["measured"]) / audit["se"]
    cos = pd.DataFrame(cos_rows).groupby("block")[["probe", "gram"]].mean().reset_index()
    cos["gram_minus_probe"] = cos["gram"] - cos["probe"]
    return audit.assign(scheme=cfg.scheme), cos.assign(scheme=cfg.scheme)


def gradient_spread(profiles: pd.DataFrame) -> pd.DataFrame:
    """Per scheme and depth of a sweep's init_profiles: g_0/g_L of every seed, their mean (what
    theory predicts), their geometric mean and the standard deviation of log10 across seeds.

    g_0/g_L is a product of L random per-block factors, so its logarithm's variance grows ∝ L/d
    (Hanin & Nica 2019, arXiv 1812.05994): where that spread reaches decades, the mean of a few
    seeds is set by the luckiest one and no mean-field prediction can be tested by it.
    """
    g = profiles[(profiles["metric"] == "grad_rel") & (profiles["point"] == "embed")]
    rows = []
    for (scheme, depth), r in g.groupby(["scheme", "depth"], sort=False):
        v = r["measured"].to_numpy(float)
        logs = np.log10(v[v > 0])
        rows.append({"scheme": scheme, "depth": int(depth), "seeds": len(v),
                     "per_seed": " ".join(f"{x:.3g}" for x in v), "mean": v.mean(),
                     "geometric_mean": 10 ** logs.mean() if len(logs) else np.nan,
                     "log10_sd": logs.std(ddof=1) if len(logs) > 1 else np.nan,
                     "theory": r["theory"].mean()})
    return pd.DataFrame(rows)


def summarize(study: pd.DataFrame, audit: pd.DataFrame) -> pd.DataFrame:
    """Median error, median |z| and mean z per study and metric (sublayer kind and stat)."""
    rows = []
    for (scheme, corpus, metric, site), g in study.groupby(["scheme", "corpus", "metric", "site"]):
        g = g[np.isfinite(g["z"])]
        err = (g["theory"] - g["measured"]).abs()
        if METRICS[metric] == "relative":
            err = err / g["measured"].abs()
        rows.append({"study": "seed_study", "scheme": scheme, "corpus": corpus,
                     "what": metric if site == "resid_post" else f"{metric} ({site})",
                     "median_error": err.median(), "median_abs_z": g["z"].abs().median(),
                     "mean_z": g["z"].mean(), "n": len(g)})
    audit = audit.assign(kind=audit["sublayer"].str.rstrip("0123456789"))
    for (scheme, corpus, kind, stat), g in audit.groupby(["scheme", "corpus", "kind", "stat"]):
        rel = (g["theory_per_sequence"] / g["measured"] - 1)
        rows.append({"study": "audit", "scheme": scheme, "corpus": corpus, "what": f"{kind} {stat}",
                     "median_error": rel.abs().median(), "median_abs_z": g["z"].abs().median(),
                     "mean_z": g["z"].mean(), "n": len(g),
                     "pooled_bias": g["theory_per_sequence"].sum() / g["measured"].sum() - 1,
                     "jensen": g["theory_mean_gram"].sum() / g["theory_per_sequence"].sum() - 1})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis.init.fidelity``: the same as `sigprop fidelity` (analysis/cli/fidelity.py)."""
    from analysis.cli import module_main
    return module_main("fidelity", argv)


if __name__ == "__main__":
    sys.exit(main())
