"""`bench --width`: wall time of the default `coordcheck` and `lrsweep` against their floors."""

from __future__ import annotations

import argparse
import time

import torch

from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import build_model
from analysis.width import coordcheck, lrsweep
from analysis.width.steps import make_step_optimizer


def coordcheck_floor(cfg: coordcheck.CoordCheckConfig, corpus) -> float:
    """Seconds to build every model of the grid and take its k plain steps, nothing measured."""
    sc = cfg.step_config
    t0 = time.perf_counter()
    for s in cfg.schemes:
        for p in cfg.parametrizations:
            for w in cfg.widths:
                for seed in cfg.seeds:
                    mc = cfg.model_config(s, p, w)
                    model = build_model(mc, seed=seed, device=cfg.device)
                    opt = make_step_optimizer(model, sc)
                    data = torch.Generator().manual_seed(seed)
                    for _ in range(sc.steps):
                        x, y = corpus.batch("train", sc.batch_size, mc.max_seq_len, generator=data)
                        opt.zero_grad(set_to_none=True)
                        model(x, y)[1].backward()
                        opt.step()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> None:
    """Print the two commands' default wall times, their floors and the ratios."""
    corpus = load_corpus()
    print(f"beyond-init commands at their CPU defaults ({torch.get_num_threads()} threads)")
    cfg = coordcheck.PRESETS["cpu"]
    t0 = time.perf_counter()
    coordcheck.run(cfg, corpus, log=lambda m: None)
    wall = time.perf_counter() - t0
    floor = coordcheck_floor(cfg, corpus)
    models = len(cfg.widths) * len(cfg.seeds) * len(cfg.schemes) * len(cfg.parametrizations)
    print(f"  coordcheck: {wall:.1f} s (target ≤ 180 s); floor, the same {models} models built "
          f"and stepped {cfg.steps}× unmeasured: {floor:.1f} s (×{wall / floor:.2f})")
    lcfg = lrsweep.PRESETS["cpu"]
    t0 = time.perf_counter()
    raw = lrsweep.run(lcfg, corpus, log=lambda m: None)
    wall = time.perf_counter() - t0
    train = raw["train_s"].sum()
    print(f"  lrsweep: {wall:.1f} s (target ≤ 600 s); floor, its {int((raw['train_s'] > 0).sum())} "
          f"distinct runs' training steps: {train:.1f} s (×{wall / train:.2f}; validation "
          f"{raw['eval_s'].sum():.1f} s)")
