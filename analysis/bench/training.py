"""`bench --train`: training throughput and MFU of one shape, and a small grid run in parallel."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import tempfile
import time

import torch

import analysis.training.train as train_module
from analysis.infra import progress
from analysis.training.runlog import NullRunLog, RunLog

from analysis.bench.probe_overhead import SHAPES
from analysis.infra.device import resolve_device
from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import ModelConfig
from analysis.training.grid import train_grid
from analysis.training.train import TrainConfig, peak_flops, train_run


def throughput(shape: str, device: str, steps: int = 30, warmup: int = 10,
               compile: bool | None = None, compile_backend: str = "inductor") -> dict:
    """Median step time (over windows of 5 steps after ``warmup``), tokens/s and MFU of the pre-norm
    testbed at ``shape``."""
    overrides, batch = SHAPES[shape][:2]
    mc = ModelConfig(scheme="pre", **overrides)
    tc = TrainConfig(tokens=(steps + warmup) * batch * mc.max_seq_len, batch_size=batch,
                     device=device, evals=1, eval_batches=1, checkpoints=1, profile_fractions=(),
                     timing_warmup=warmup, check_every=5,  # windows of 5 steps after warm-up
                     compile=compile, compile_backend=compile_backend)
    with tempfile.TemporaryDirectory() as tmp:
        r = train_run(mc, tc, load_corpus(), tmp, log=lambda s: None)
    step = statistics.median(s / n for _, n, s in r["timed_windows"])
    tps = batch * mc.max_seq_len / step
    return {"shape": shape, "step_s": step, "tokens_per_s": tps,
            "mfu": tps * r["flops_per_token"] / peak_flops(resolve_device(device))}


def grid_speedup(device: str, parallel: int, tokens: int = 8192) -> dict:
    """Wall time of a small-width depth grid run one by one against ``parallel`` at a time."""
    base = ModelConfig(scheme="pre", depth=2, width=64, heads=4, max_seq_len=64)
    tc = TrainConfig(tokens=tokens, batch_size=8, device=device, evals=1, eval_batches=1,
                     checkpoints=1)
    depths = [2, 4, 6, 8]
    corpus = load_corpus()
    walls = {}
    for p in (1, parallel):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            train_grid(["pre"], depths, base, tc, corpus, tmp, log=lambda s: None, parallel=p,
                       verbose_workers=False)
            walls[p] = time.perf_counter() - t0
    total = tokens * len(depths)
    return {"runs": len(depths), "sequential_tokens_per_s": total / walls[1],
            "parallel_tokens_per_s": total / walls[parallel], "speedup": walls[1] / walls[parallel]}


def logging_overhead(device: str, repeats: int = 5, steps: int = 400,
                     tensorboard: bool = False) -> dict:
    """What live progress and logging cost at the default `train` shape (cpu preset, depth 4):
    the median over ``repeats`` interleaved pairs of runs of the wall time per step with the
    bar drawn (to /dev/null) and train_log.csv written, against the same run logging nothing;
    and the time spent inside the logger per step, against the median step (opening and closing
    the files once per run is reported apart)."""
    mc = ModelConfig(scheme="pre", depth=4, width=64, heads=4, max_seq_len=64)
    tc = TrainConfig(tokens=steps * 8 * 64, batch_size=8, lr=2e-3, device=device, evals=1,
                     eval_batches=1, checkpoints=1, profile_fractions=(), tensorboard=tensorboard)
    corpus = load_corpus()
    walls: dict[str, list[float]] = {"logged": [], "floor": []}
    inside, setup, step_s = [], [], []
    try:  # the bar is drawn, into /dev/null
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), \
                progress.configured(quiet=False, bars=True):
            for _ in range(repeats):
                for kind in ("logged", "floor"):
                    train_module.RunLog = RunLog if kind == "logged" else NullRunLog
                    with tempfile.TemporaryDirectory() as tmp:
                        r = train_run(mc, tc, corpus, tmp, log=lambda s: None)
                    walls[kind].append(r["wall_s"] / r["steps"])
                    if kind == "logged":
                        inside.append(r["log_s"] / r["steps"])
                        setup.append(r["log_setup_s"])
                        step_s.append(statistics.median(s / n for _, n, s in r["timed_windows"]))
    finally:
        train_module.RunLog = RunLog
    logged, floor = statistics.median(walls["logged"]), statistics.median(walls["floor"])
    ratios = [a / b for a, b in zip(walls["logged"], walls["floor"])]
    return {"steps": steps, "repeats": repeats, "logged_ms": 1000 * logged, "floor_ms": 1000 * floor,
            "ratio": statistics.median(ratios), "ratio_spread": (min(ratios), max(ratios)),
            "inside_ms": 1000 * statistics.median(inside), "setup_ms": 1000 * statistics.median(setup),
            "inside_share": statistics.median(inside) / statistics.median(step_s)}


def run(args: argparse.Namespace) -> None:
    """Print the training benchmark."""
    device = args.device
    shape = getattr(args, "shape", None) or ("gpt2" if resolve_device(device).type == "cuda" else "small")
    dev_name = torch.cuda.get_device_name() if resolve_device(device).type == "cuda" else "CPU"
    print(f"training throughput on {dev_name} ({torch.get_num_threads()} threads), pre-norm testbed")
    t = throughput(shape, device, compile=getattr(args, "compile", None))
    mfu = "—" if t["mfu"] != t["mfu"] else f"{100 * t['mfu']:.1f}%"
    overrides, batch = SHAPES[shape][:2]
    print(f"  shape {shape} (L={overrides['depth']} d={overrides['width']} T={overrides['max_seq_len']} "
          f"B={batch}): median step {1000 * t['step_s']:.1f} ms, {t['tokens_per_s']:,.0f} tokens/s, MFU {mfu}")
    for tb in (False, True):
        if tb and importlib.util.find_spec("tensorboard") is None:
            print("  logging with --tensorboard: not measured (tensorboard is not installed)")
            continue
        o = logging_overhead(device, tensorboard=tb)
        print(f"  progress and logging{' with TensorBoard' if tb else ''} ({o['steps']} steps, "
              f"{o['repeats']} pairs): {o['logged_ms']:.2f} ms/step against {o['floor_ms']:.2f} "
              f"without (median ratio ×{o['ratio']:.3f}, range {o['ratio_spread'][0]:.3f}–"
              f"{o['ratio_spread'][1]:.3f}); inside the logger {1000 * o['inside_ms']:.1f} µs/step, "
              f"{100 * o['inside_share']:.2f} % of the median step, plus {o['setup_ms']:.0f} ms "
              "once per run to open and close its files")
    parallel = getattr(args, "parallel", None) or 2
    g = grid_speedup(device, parallel)
    print(f"  depth grid of {g['runs']} small runs: one by one {g['sequential_tokens_per_s']:,.0f} "
          f"tokens/s, {parallel} at a time {g['parallel_tokens_per_s']:,.0f} tokens/s "
          f"(×{g['speedup']:.2f} wall-clock)")
