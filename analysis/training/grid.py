"""A grid of training runs (schemes × depths, dense or MoE), resumable, with probes at fixed fractions.

Layout of ``out_dir``: ``runs/<name>/`` per run (checkpoint, result.json, profiles.csv), and the
grid's tables ``train_runs.csv`` and ``train_profiles.csv`` gathered from every finished run in
the folder, so a dense and an MoE grid written to one folder share their tables. A killed grid
resumes: finished runs are read back, an unfinished one continues from its checkpoint.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from analysis.budget import Cut, Interrupted, past
from analysis.device import available_memory, resolve_device
from analysis.records import read_record
from analysis.testbed.memory import check_all_fit
from analysis.testbed.corpus import Corpus
from analysis.testbed.model import ModelConfig, Testbed
from analysis.training.train import TrainConfig, check_same_run, run_settings, train_run
from probes import Probe

PROFILE_METRICS = ["second_moment", "grad_second_moment", "token_cosine", "layer_cosine",
                   "effective_rank"]
PROFILE_POINTS = ["embed", "blocks.*.pre_norm_sum", "blocks.*.resid_post"]
RUN_COLUMNS = ["scheme", "depth", "width", "moe", "tokens", "final_val_bpb", "diverged",
               "divergence_step", "tokens_per_s", "mfu"]
# after RUN_COLUMNS and the run's folder name: the first training loss and the mean of the last
# 10 (nats), then every other setting that changes a result
SETTING_COLUMNS = ["first_train_loss", "final_train_loss", "seed", "heads", "ffn", "norm", "sigma", "max_seq_len", "batch_size", "lr",
                   "min_lr_ratio", "warmup_frac", "weight_decay", "beta1", "beta2", "grad_clip",
                   "spike_factor", "scheme_params", "corpus"]


def run_name(mc: ModelConfig, seed: int = 0) -> str:
    """Folder name of a run: scheme, depth, width, dense or MoE, seed. Its settings.json holds
    every other setting, and a run folder of other settings is refused, never reused."""
    return f"{mc.scheme}-L{mc.depth}-d{mc.width}-{moe_label(mc.experts, mc.top_k)}-s{seed}"


def moe_label(experts: int, top_k: int) -> str:
    """'dense', or 'moe{E}k{k}'."""
    return f"moe{experts}k{top_k}" if experts else "dense"


def probe_profiler(run_dir: Path, batches: int = 2) -> Callable:
    """A profiler for ``train_run`` that probes ``batches`` fixed batches and appends to profiles.csv."""
    path = run_dir / "profiles.csv"

    def profile(model: Testbed, tag: str, step: int, batch_fn) -> None:
        with Probe(model, metrics=PROFILE_METRICS, points=PROFILE_POINTS) as p:
            for _ in range(batches):
                x, y = batch_fn()
                _, loss = model(x, y)
                loss.backward()
        frame = p.frame().assign(tag=tag, step=step)
        old = pd.read_csv(path) if path.exists() else None
        if old is not None:  # a resumed run measures a tag again: keep the newest
            old = old[old["tag"] != tag]
        pd.concat([old, frame]).to_csv(path, index=False)

    return profile


def train_grid(schemes: list[str], depths: list[int], base: ModelConfig, tc: TrainConfig,
               corpus: Corpus, out_dir: str | Path, log: Callable[[str], None] = print,
               parallel: int = 1, verbose_workers: bool = True, deadline: float | None = None,
               seeds: list[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train every (scheme, depth, seed) of the grid into ``out_dir``; return (runs, profiles).

    ``seeds`` (default: ``tc.seed`` alone) seed each run's init and data order.

    ``parallel`` > 1 trains that many runs at once in worker processes (one device shared), which
    print their progress prefixed with the run's name unless ``verbose_workers`` is False. At
    ``deadline`` (time.time()) running runs checkpoint, no new one starts, the tables of the
    finished runs are written and analysis.budget.Cut is raised; a re-run resumes.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    out_dir = Path(out_dir)
    seeds = [tc.seed] if seeds is None else list(seeds)
    if not seeds or not schemes or not depths:
        raise ValueError("the " + ("seed" if not seeds else "scheme" if not schemes else "depth")
                         + " list is empty")
    for name, values in (("schemes", list(schemes)), ("depths", list(depths)), ("seeds", seeds)):
        twice = sorted({v for v in values if values.count(v) > 1}, key=values.index)
        if twice:  # the same run twice: one folder, and rows counted twice in every statistic
            raise ValueError(f"{name} must be distinct, got {', '.join(map(str, twice))} more "
                             f"than once in {','.join(map(str, values))}")
    configs = [(replace(base, scheme=s, depth=d), replace(tc, seed=seed))
               for s in schemes for d in depths for seed in seeds]
    for mc, _ in configs:
        mc.validate()
    tc.validate(base.max_seq_len)
    t_grid = time.perf_counter()
    todo = []
    for i, (mc, tcs) in enumerate(configs, 1):
        folder = out_dir / "runs" / run_name(mc, tcs.seed)
        if folder.exists():  # kept or resumed only if it is the same run
            if (folder / "result.json").exists() and not (folder / "settings.json").exists():
                raise ValueError(f"{folder} holds a run without its settings.json (an older "
                                 "sigprop): choose another --out folder")
            check_same_run(folder, run_settings(mc, tcs, corpus))
        if (folder / "result.json").exists():
            log(f"[{i}/{len(configs)}] {folder.name}: finished earlier, kept")
        else:
            todo.append((mc, tcs))
    workers = parallel if len(todo) > 1 else 1
    free = available_memory(resolve_device(tc.device)) / workers  # runs side by side share it
    check_all_fit([mc for mc, _ in todo], tc.batch_size, free,  # refuse before training
                  f"{tc.device} (per run, {workers} at once)", training=True)
    jobs = [(mc, tcs, corpus, out_dir / "runs" / run_name(mc, tcs.seed), workers, verbose_workers,
             deadline) for mc, tcs in todo]
    unfinished = []
    if workers > 1:
        # several small models at once keep a GPU busy that one alone leaves idle
        log(f"training {len(todo)} runs, {parallel} at a time")
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=parallel, mp_context=ctx) as pool:
            for job, r in zip(jobs, pool.map(_train_one, jobs)):
                log(f"  {job[3].name}: {_outcome(r)}")
                if r is None:
                    unfinished.append(job[3].name)
    else:
        for k, job in enumerate(jobs, 1):
            if past(deadline):
                unfinished += [j[3].name for j in jobs[k - 1:]]
                break
            log(f"[{k}/{len(jobs)}] {job[3].name}: training {tc.tokens:,} tokens on {tc.device}")
            try:
                r = _train_one(job, log)
            except Interrupted as e:  # Ctrl-C: the run stopped at a checkpoint; keep the tables
                runs, profiles = collect(out_dir)
                runs.to_csv(out_dir / "train_runs.csv", index=False)
                profiles.to_csv(out_dir / "train_profiles.csv", index=False)
                raise Interrupted(f"{len(configs) - len(jobs) + k - 1} of {len(configs)} runs "
                                  f"finished; {e}") from None
            log(f"    {_outcome(r)}")
            if r is None:
                unfinished += [j[3].name for j in jobs[k - 1:]]
                break
    log(f"grid {'cut' if unfinished else 'done'} in {time.perf_counter() - t_grid:.0f} s")
    runs, profiles = collect(out_dir)
    runs.to_csv(out_dir / "train_runs.csv", index=False)
    profiles.to_csv(out_dir / "train_profiles.csv", index=False)
    if unfinished:
        raise Cut(f"{len(unfinished)} of {len(configs)} runs not finished ({', '.join(unfinished)}); "
                  "the same command resumes them")
    return runs, profiles


def _train_one(job: tuple, log: Callable[[str], None] = print) -> dict | None:
    """One run of the grid (top-level, so worker processes can call it); None if cut."""
    mc, tc, corpus, run_dir, workers, verbose, deadline = job
    if workers > 1:  # a worker process: name the run in its lines, share the CPU cores
        log = ((lambda s, name=run_dir.name: print(f"[{name}] {s.strip()}", flush=True)) if verbose
               else (lambda s: None))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return train_run(mc, tc, corpus, run_dir, profiler=probe_profiler(run_dir), log=log,
                         deadline=deadline)
    except Cut as e:
        log(f"    {e}")
        return None
    except torch.OutOfMemoryError:
        raise ValueError(f"out of memory training {run_dir.name} on {tc.device}: lower --batch, "
                         f"--seq-len or --width, drop the deepest depths, or lower --parallel") from None


def _outcome(r: dict | None) -> str:
    if r is None:
        return "cut at the deadline (checkpoint kept)"
    if r["diverged"]:
        return f"DIVERGED at step {r['divergence_step']}: {r['divergence_reason']}"
    return f"val {r['final_val_bpb']:.3f} bits/byte, {r['tokens_per_s']:,.0f} tokens/s"


def _finished(out_dir: str | Path) -> Iterator[tuple[Path, dict, str]]:
    """(run folder, result.json content, dense/MoE label) of every finished run, in name order."""
    for result in sorted(Path(out_dir).glob("runs/*/result.json")):
        r = read_record(result)
        lacking = [k for k in ("scheme", "depth", "width", "experts", "top_k", "train_loss",
                               "val_loss") if k not in r]
        if lacking:
            raise ValueError(f"{result} lacks {', '.join(lacking)}: not a finished run's result "
                             "(remove that run's folder to train it again)")
        yield result.parent, r, moe_label(r["experts"], r["top_k"])


def collect(out_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runs and profiles tables of every finished run under ``out_dir/runs``."""
    rows, profiles = [], []
    for folder, r, label in _finished(out_dir):
        s = r.get("settings", {})
        flat = {**s.get("model", {}), **s.get("train", {}), "corpus": s.get("corpus")}
        flat["scheme_params"] = json.dumps(flat.get("scheme_params", {}), sort_keys=True)
        losses = [v for _, v in r.get("train_loss", [])]
        flat["first_train_loss"] = losses[0] if losses else None
        flat["final_train_loss"] = float(np.mean(losses[-10:])) if losses else None  # last 10 steps
        rows.append({**{k: r.get(k) for k in RUN_COLUMNS if k != "moe"}, "moe": label,
                     "run": folder.name, **{k: flat.get(k) for k in SETTING_COLUMNS}})
        prof = folder / "profiles.csv"
        meta = dict(scheme=r["scheme"], depth=r["depth"], width=r["width"], moe=label,
                    seed=flat.get("seed", 0))
        if prof.exists():
            profiles.append(pd.read_csv(prof).assign(**meta))
        if r.get("updates"):
            upd = pd.DataFrame(r["updates"], columns=["step", "layer", "mean"])
            profiles.append(upd.assign(point=[f"blocks.{i}" for i in upd["layer"]],
                                       metric="update_size", tag="step" + upd["step"].astype(str),
                                       count=1, **meta))
    runs = pd.DataFrame(rows, columns=RUN_COLUMNS + ["run"] + SETTING_COLUMNS)
    runs = runs.sort_values(["moe", "scheme", "depth", "seed"], ignore_index=True)
    prof = pd.concat(profiles, ignore_index=True) if profiles else pd.DataFrame()
    return runs, prof


def curves(out_dir: str | Path) -> pd.DataFrame:
    """Loss curves of every finished run: run, scheme, depth, moe, split, seed, step, loss (nats)."""
    frames = []
    for folder, r, label in _finished(out_dir):
        for split in ("train", "val"):
            pts = r[f"{split}_loss"]
            if pts:
                f = pd.DataFrame(pts, columns=["step", "loss"])
                frames.append(f.assign(run=folder.name, scheme=r["scheme"], depth=r["depth"],
                                       moe=label, split=split,
                                       seed=r.get("settings", {}).get("train", {}).get("seed", 0)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["step", "loss", "run", "scheme", "depth", "moe", "split", "seed"])

