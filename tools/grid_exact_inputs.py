"""A finished init grid against the mean field from its own sequences' exact token covariances.

Why: the grid predicts each seed from three measured numbers (q_0, ρ_0 and the top gradient's
ρ_g), as if every pair of tokens were alike. On one sequence that uniform summary moved PreNorm's
g_0/g_L at L = 512 by ×0.83 and the exact covariances predicted it within 1 % ± 11 %
(tools/grad_ratio_by_inputs.py, results/init-inputs). This decides it on the grid itself: every
seed's batches are drawn again from the seed's generator, exactly as the sweep drew them (nothing
is measured again), each sequence is predicted by theory/positional.py from its exact
covariances (analysis/init/spread.py, text_covariances: the embedding's, embed_std²/2·(same-byte
indicator + I), and the top gradient's, the same-target indicator), and the probes' statistics,
means over the tokens and sequences of the batch, are compared with the mean of those
predictions. Each sequence's top gradient power is the same at init (p ≈ uniform), so the mean of
the sequences' g_l/g_L is the batch's.

Writes ``--out``: ``targets.csv`` (the grid's targets with this prediction, ``prediction`` =
exact_inputs, beside the stored uniform-summary one, ``prediction`` = resolved), ``errors.csv``
(the same for every metric and site) and ``gradient_ratio.csv`` (per scheme and depth: log10
g_0/g_L measured, mean over seeds ± SE, and both predictions).

    python tools/grid_exact_inputs.py --grid runs/init-w256-all16 --out results/init-w256-all16/exact_inputs
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.init.compare import aggregate, error_summary, target_check
from analysis.init.pipeline import config_from_record
from analysis.init.spread import text_covariances
from analysis.init.sweep import batch_generator, complete_points, prediction_rows, read_profiles
from analysis.testbed.corpus import load_corpus
from theory.positional import predict_positional


def sequences(corpus, seed: int, batches: int, batch_size: int, seq_len: int) -> list[tuple]:
    """The (x, y) sequences the sweep's seed read: its generator, drawn in the sweep's order."""
    gen = batch_generator(seed)
    out = []
    for _ in range(batches):
        x, y = corpus.batch("train", batch_size, seq_len, generator=gen)
        out += list(zip(x, y))
    return out


def exact_theory(cfg, covs: list[tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """The mean over sequences of the position-resolved profile from each one's covariances."""
    frames = [prediction_rows(predict_positional(cfg.scheme, depth=cfg.depth, seq_len=cfg.max_seq_len,
                                                 scheme_params=cfg.scheme_params, cov0=c0,
                                                 grad_top=gt, **cfg.shape_fields()),
                              cfg.depth, "theory")
              for c0, gt in covs]
    return pd.concat(frames).groupby(["point", "metric"], sort=False)["theory"].mean().reset_index()


def check_reconstruction(profiles: pd.DataFrame, covs: dict, width: int) -> None:
    """Refuse sequences that are not the ones the sweep read: each seed's measured embedding token
    cosine must match the redrawn sequences' expected one within what the random embedding table
    moves it: 1/√(d·sequences), about four times the largest difference on the 16-seed grid at
    d = 256 (0.008 over 8 sequences), where the seeds' expected cosines range over 0.02 … 0.15."""
    embed = profiles[(profiles["point"] == "embed") & (profiles["metric"] == "token_cosine")]
    measured = embed.groupby("seed")["measured"].mean()
    expected = pd.Series({s: np.mean([(c.sum() - np.trace(c)) / (len(c) * (len(c) - 1)) / np.mean(np.diag(c))
                                      for c, _ in cs]) for s, cs in covs.items()})
    diff = (measured - expected[measured.index]).abs()
    print(f"embedding token cosine, measured against the redrawn sequences': largest difference "
          f"{diff.max():.4f} over {len(diff)} seeds (expected {expected.min():.3f}…{expected.max():.3f})")
    if diff.max() > 1 / math.sqrt(width * len(next(iter(covs.values())))):
        raise SystemExit("error: the redrawn sequences are not the sweep's (another corpus or "
                         "Python's standard library?): its embedding token cosine differs by "
                         f"{diff.max():.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", required=True, help="a finished sweep folder (init_profiles.csv, config.json)")
    p.add_argument("--schemes", help="comma-separated subset of the grid's schemes (default: all)")
    p.add_argument("--out", required=True, help="folder to write the three CSVs into")
    args = p.parse_args()
    grid = Path(args.grid)
    cfg = config_from_record(grid / "config.json")
    profiles, problems = complete_points(read_profiles(grid / "init_profiles.csv"), cfg.seeds)
    if problems:
        print(f"left out, not measured in full: {'; '.join(problems[:8])}")
    if args.schemes:
        profiles = profiles[profiles["scheme"].isin(args.schemes.split(","))]
    corpus = load_corpus(cfg.corpus)
    base = cfg.model_config(cfg.schemes[0], cfg.depths[0])
    covs = {s: [text_covariances(x, y, base.embed_std)
                for x, y in sequences(corpus, s, cfg.batches, cfg.batch_size, cfg.seq_len)]
            for s in cfg.seeds}
    check_reconstruction(profiles, covs, base.width)
    parts, t0 = [], time.perf_counter()
    groups = profiles.groupby(["scheme", "depth", "seed"], sort=False)
    for k, ((scheme, depth, seed), rows) in enumerate(groups, 1):
        theory = exact_theory(replace(base, scheme=scheme, depth=int(depth)), covs[int(seed)])
        parts.append(rows.drop(columns="theory_averaged").rename(columns={"theory": "theory_uniform"})
                     .merge(theory, on=["point", "metric"], how="left"))
        if k % 16 == 0 or k == groups.ngroups:
            print(f"  {k}/{groups.ngroups} (scheme, depth, seed) predicted from exact inputs "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    exact = pd.concat(parts, ignore_index=True)
    summaries = []
    for name, column in (("exact_inputs", "theory"), ("resolved", "theory_uniform")):
        agg = aggregate(exact.drop(columns=[c for c in ("theory", "theory_uniform") if c != column])
                        .rename(columns={column: "theory"}))
        summaries.append(error_summary(agg).assign(prediction=name))
    errors = pd.concat(summaries, ignore_index=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    errors.to_csv(out / "errors.csv", index=False)
    targets = target_check(errors)
    targets.to_csv(out / "targets.csv", index=False)
    g = exact[(exact["metric"] == "grad_rel") & (exact["point"] == "embed")]
    ratio = g.assign(measured=np.log10(g["measured"]), theory=np.log10(g["theory"]),
                     theory_uniform=np.log10(g["theory_uniform"])).groupby(
        ["scheme", "depth"], sort=False).agg(
        seeds=("seed", "nunique"), measured_log10=("measured", "mean"),
        measured_log10_se=("measured", lambda v: v.std(ddof=1) / math.sqrt(len(v))),
        exact_inputs_log10=("theory", "mean"), uniform_log10=("theory_uniform", "mean")).reset_index()
    ratio["ratio_exact"] = 10 ** (ratio["measured_log10"] - ratio["exact_inputs_log10"])
    ratio["ratio_uniform"] = 10 ** (ratio["measured_log10"] - ratio["uniform_log10"])
    ratio.to_csv(out / "gradient_ratio.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(ratio.to_string(index=False, float_format="%.3g"))
        print(targets.to_string(index=False, float_format="%.3g"))


if __name__ == "__main__":
    main()
