"""A grid of training runs (schemes × depths, dense or MoE), resumable, with probes at fixed fractions.

Layout of ``out_dir``: ``runs/<name>/`` per run (settings.json, checkpoint, train_log.csv,
result.json, profiles.csv, loss figure), and the grid's tables ``train_runs.csv`` (a row per run,
with its status, every setting and where it ran) and ``train_profiles.csv`` gathered from every
run in the folder, so a dense and an MoE grid written to one folder share their tables. A killed
grid resumes: finished runs are read back, an unfinished one continues from its checkpoint.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import fields, replace
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import torch

from analysis.infra import files, progress
from analysis.infra.budget import Cut, Interrupted, past
from analysis.infra.device import available_memory, resolve_device
from analysis.infra.distributed import SINGLE, World, barrier
from analysis.infra.records import read_record
from analysis.testbed.memory import check_all_fit, check_time
from analysis.testbed.corpus import Corpus
from analysis.testbed.model import ModelConfig, Testbed
from analysis.training.status import train_loss_ends
from analysis.training.train import TrainConfig, check_same_run, run_settings, train_run
from probes import Probe

PROFILE_METRICS = ["second_moment", "grad_second_moment", "token_cosine", "layer_cosine",
                   "effective_rank"]
PROFILE_POINTS = ["embed", "blocks.*.pre_norm_sum", "blocks.*.resid_post"]
RUN_COLUMNS = ["scheme", "depth", "width", "moe", "status", "tokens", "final_val_bpb", "diverged",
               "divergence_step", "tokens_per_s", "mfu"]
# after RUN_COLUMNS and the run's folder name: the rest of the run record (losses in nats; the
# first training loss and the mean of the last 10), then where it ran
RECORD_COLUMNS = ["steps", "planned_steps", "wall_s", "final_val_loss", "first_train_loss",
                  "final_train_loss", "divergence_reason", "stall_reason"]
ENVIRONMENT_COLUMNS = ["git_commit", "torch_version", "device", "device_name"]
# then every setting that changes a result: the model's, the training's (the token budget is
# planned_steps × batch_size × max_seq_len), the corpus
SETTING_COLUMNS = [k for k in [f.name for f in fields(ModelConfig)] + list(TrainConfig().identity())
                   + ["corpus"] if k not in RUN_COLUMNS]


def run_name(mc: ModelConfig, seed: int = 0) -> str:
    """Folder name of a run: scheme, depth, width, dense or MoE, seed. Its settings.json holds
    every other setting, and a run folder of other settings is refused, never reused."""
    return f"{mc.scheme}-L{mc.depth}-d{mc.width}-{moe_label(mc.experts, mc.top_k)}-s{seed}"


def moe_label(experts: int, top_k: int) -> str:
    """'dense', or 'moe{E}k{k}'."""
    return f"moe{experts}k{top_k}" if experts else "dense"


def probe_profiler(run_dir: Path, batches: int = 2, world: World = SINGLE) -> Callable:
    """A profiler for ``train_run`` that probes ``batches`` fixed batches and appends to
    profiles.csv (under torchrun the probe sums the ranks' statistics and rank 0 writes)."""
    path = run_dir / "profiles.csv"

    def profile(model: Testbed, tag: str, step: int, batch_fn) -> None:
        # the ranks' statistics summed where they train one run together, never across runs
        with Probe(model, metrics=PROFILE_METRICS, points=PROFILE_POINTS,
                   all_reduce=world.size > 1) as p:
            for _ in range(batches):
                x, y = batch_fn()
                _, loss = model(x, y)
                loss.backward()
        frame = p.frame().assign(tag=tag, step=step)
        if not world.main:
            return
        old = pd.read_csv(path) if path.exists() else None
        if old is not None:  # a resumed run measures a tag again: keep the newest
            old = old[old["tag"] != tag]
        files.write_csv(pd.concat([old, frame]), path, index=False)

    return profile


def train_grid(schemes: list[str], depths: list[int], base: ModelConfig, tc: TrainConfig,
               corpus: Corpus, out_dir: str | Path, log: Callable[[str], None] = progress.say,
               parallel: int = 1, verbose_workers: bool = True, deadline: float | None = None,
               seeds: list[int] | None = None, world: World = SINGLE,
               ddp: bool = False, fsdp: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train every (scheme, depth, seed) of the grid into ``out_dir``; return (runs, profiles).

    ``seeds`` (default: ``tc.seed`` alone) seed each run's init and data order.

    ``parallel`` > 1 trains that many runs at once in worker processes (one device shared), which
    print their progress prefixed with the run's name unless ``verbose_workers`` is False or
    progress is quiet (analysis.infra.progress); the parent draws the grid's bar. At
    ``deadline`` (time.time()) running runs checkpoint, no new one starts, the tables of the
    finished runs are written and analysis.infra.budget.Cut is raised; a re-run resumes.

    Under torchrun (``world``, analysis.infra.distributed): with ``ddp`` every run trains on all ranks
    at once (DistributedDataParallel), with ``fsdp`` too, its model sharded over them
    (``fully_shard``); without either, the ranks split the grid, rank r training every
    ``world.size``-th unfinished run on its own device, and rank 0, when its share is done, waits
    for the others' records and writes the tables (a rank that dies takes the job down with it;
    the same command resumes, training no finished run again).
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    if world.size > 1 and parallel > 1:
        raise ValueError("--parallel starts worker processes on one machine; under torchrun the "
                         "ranks are the workers: use one or the other")
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
    sharded = world.size > 1 and not (ddp or fsdp)
    device = world.device(tc.device) if sharded else tc.device  # a rank of a split grid: its GPU
    configs = [(replace(base, scheme=s, depth=d), replace(tc, seed=seed, device=device))
               for s in schemes for d in depths for seed in seeds]
    if sharded and world.size > len(configs):
        raise ValueError(f"{world.size} ranks for a grid of {len(configs)} run"
                         f"{'s' * (len(configs) > 1)}: a rank would have "
                         f"nothing to train; start at most {len(configs)} (or train each run on "
                         "every rank with --ddp)")
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
        if finished(folder):
            log(f"[{i}/{len(configs)}] {folder.name}: finished earlier, kept")
        else:
            todo.append((mc, tcs))
    barrier(world)  # every rank has read the folders before any writes to them
    workers = parallel if len(todo) > 1 else 1
    free = available_memory(resolve_device(world.device(tc.device))) / workers  # side by side: shared
    mine = todo[world.rank::world.size] if sharded else todo
    check_all_fit([mc for mc, _ in mine], tc.batch_size, free,  # refuse before training
                  f"{device} (per run, {workers} at once)", training=True)
    check_time([mc for mc, _ in mine] or [base], tc.tokens, tc.batch_size, str(device))
    verbose = verbose_workers and not progress.is_quiet()  # workers start with default settings
    jobs = [(mc, tcs, corpus, out_dir / "runs" / run_name(mc, tcs.seed), workers, verbose, deadline,
             SINGLE if sharded else world, fsdp) for mc, tcs in mine]
    unfinished = []
    overall = progress.bar(len(configs), "grid", unit="run", initial=len(configs) - len(todo),
                           position=0)
    try:
        if workers > 1:
            # several small models at once keep a GPU busy that one alone leaves idle
            log(f"training {len(todo)} runs, {parallel} at a time")
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=parallel, mp_context=ctx) as pool:
                futures = {pool.submit(_train_one, job): job for job in jobs}
                for future in as_completed(futures):
                    job, r = futures[future], future.result()
                    log(f"  {job[3].name}: {_outcome(r)}")
                    overall.update(r is not None)
                    if r is None:
                        unfinished.append(job[3].name)
        else:
            for k, job in enumerate(jobs, 1):
                if past(deadline):
                    unfinished += [j[3].name for j in jobs[k - 1:]]
                    break
                log(f"[{k}/{len(jobs)}] {job[3].name}: training {tc.tokens:,} tokens on {tc.device}")
                try:
                    r = _train_one(job, log, position=1)
                except Interrupted as e:  # Ctrl-C: the run stopped at a checkpoint; keep the tables
                    if world.main:
                        write_tables(out_dir)
                    raise Interrupted(f"{len(configs) - len(jobs) + k - 1} of {len(configs)} runs "
                                      f"finished; {e}") from None
                log(f"    {_outcome(r)}")
                if r is None:
                    unfinished += [j[3].name for j in jobs[k - 1:]]
                    break
                overall.update()
    finally:
        overall.close()
    log(f"{'share of the grid' if sharded else 'grid'} {'cut' if unfinished else 'done'} in "
        f"{time.perf_counter() - t_grid:.0f} s")
    if sharded and world.main and not unfinished:
        _wait_for_records(out_dir, configs, log)
    if not world.main:  # rank 0 writes the tables
        return collect(out_dir)
    runs, profiles = write_tables(out_dir)
    if unfinished:
        raise Cut(f"{len(unfinished)} of {len(configs)} runs not finished ({', '.join(unfinished)}); "
                  "the same command resumes them")
    return runs, profiles


def _wait_for_records(out_dir: Path, configs: list, log: Callable[[str], None],
                      poll_s: float = 2.0) -> None:
    """Rank 0 of a split grid: wait until every run has its record (from any rank)."""
    folders = [out_dir / "runs" / run_name(mc, tcs.seed) for mc, tcs in configs]
    said = False
    while True:
        waiting = [f.name for f in folders if not (f / "result.json").exists()]
        if not waiting:
            return
        if not said:
            log(f"waiting for {len(waiting)} run{'s' * (len(waiting) > 1)} on the other ranks")
            said = True
        time.sleep(poll_s)


def write_tables(out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Gather every run's record into ``train_runs.csv`` and ``train_profiles.csv``."""
    runs, profiles = collect(out_dir)
    files.write_csv(runs, out_dir / "train_runs.csv", index=False)
    files.write_csv(profiles, out_dir / "train_profiles.csv", index=False)
    return runs, profiles


def _train_one(job: tuple, log: Callable[[str], None] = progress.say,
               position: int | None = None) -> dict | None:
    """One run of the grid (top-level, so worker processes can call it); None if cut."""
    mc, tc, corpus, run_dir, workers, verbose, deadline, world, fsdp = job
    if workers > 1:  # a worker process: no bar, name the run in its lines, share the CPU cores
        progress.configure(quiet=not verbose, bars=False)
        log = lambda s, name=run_dir.name: progress.say(f"[{name}] {s.strip()}")  # noqa: E731
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return train_run(mc, tc, corpus, run_dir, profiler=probe_profiler(run_dir, world=world),
                         log=log, deadline=deadline, position=position, world=world, fsdp=fsdp)
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
    head = "STALLED: " + r["stall_reason"] + "; " if r.get("status") == "stalled" else "ok: "
    return (f"{head}val {r['final_val_bpb']:.3f} bits/byte, {r['tokens_per_s']:,.0f} tokens/s, "
            f"{r['wall_s']:.0f} s")


def finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` ended (ok, diverged or stalled), not cut or still to train."""
    r = read_record(run_dir / "result.json")
    return r is not None and r.get("status") != "cut"


def status_of(r: dict) -> str:
    """A run record's status; records older than statuses were ok or diverged."""
    return r.get("status") or ("diverged" if r.get("diverged") else "ok")


def _records(out_dir: str | Path) -> Iterator[tuple[Path, dict, str]]:
    """(run folder, result.json content, dense/MoE label) of every recorded run (cut ones
    included), in name order."""
    for result in sorted(Path(out_dir).glob("runs/*/result.json")):
        r = read_record(result)
        lacking = [k for k in ("scheme", "depth", "width", "experts", "top_k", "train_loss",
                               "val_loss") if k not in r]
        if lacking:
            raise ValueError(f"{result} lacks {', '.join(lacking)}: not a run's record "
                             "(remove that run's folder to train it again)")
        yield result.parent, r, moe_label(r["experts"], r["top_k"])


def _cell(value):
    """A table cell: lists and dicts as JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, tuple, dict)) else value


def collect(out_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runs table (every recorded run, its status, record, environment and settings) and the
    profiles table under ``out_dir/runs``."""
    rows, profiles = [], []
    for folder, r, label in _records(out_dir):
        s = r.get("settings", {})
        flat = {**s.get("model", {}), **s.get("train", {}), "corpus": s.get("corpus")}
        first, final = train_loss_ends(r.get("train_loss", []))  # older records lack them
        record = {"first_train_loss": first, "final_train_loss": final, **r,
                  "status": status_of(r), **r.get("environment", {})}
        rows.append({**{k: record.get(k) for k in RUN_COLUMNS if k != "moe"}, "moe": label,
                     "run": folder.name,
                     **{k: record.get(k) for k in RECORD_COLUMNS + ENVIRONMENT_COLUMNS},
                     **{k: _cell(flat.get(k)) for k in SETTING_COLUMNS}})
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
    columns = RUN_COLUMNS + ["run"] + RECORD_COLUMNS + ENVIRONMENT_COLUMNS + SETTING_COLUMNS
    runs = pd.DataFrame(rows, columns=columns)
    runs = runs.sort_values(["moe", "scheme", "depth", "seed"], ignore_index=True)
    prof = pd.concat(profiles, ignore_index=True) if profiles else pd.DataFrame()
    return runs, prof


CURVE_COLUMNS = ["run", "scheme", "depth", "moe", "seed", "status", "split", "step", "tokens",
                 "loss"]


def run_curves(folder: Path, r: dict, label: str) -> pd.DataFrame:
    """One run's loss curves (nats): its train_log.csv (the smoothed training loss and every
    validation point), or for a run recorded before it, every step's loss from result.json;
    ``step`` counts the optimizer steps done."""
    log = folder / "train_log.csv"
    if log.exists():
        frame = pd.read_csv(log)[["split", "step", "tokens", "loss"]]
    else:
        tokens_per_step = r["tokens"] / r["steps"] if r.get("steps") else math.nan
        frame = pd.concat([pd.DataFrame(r[f"{split}_loss"], columns=["step", "loss"]).assign(split=split)
                           for split in ("train", "val") if r[f"{split}_loss"]] or [pd.DataFrame()])
        if len(frame):
            frame["step"] += 1
            frame["tokens"] = frame["step"] * tokens_per_step
    return frame.assign(run=folder.name, scheme=r["scheme"], depth=r["depth"], moe=label,
                        seed=r.get("settings", {}).get("train", {}).get("seed", 0),
                        status=status_of(r)).reindex(columns=CURVE_COLUMNS)


def curves(out_dir: str | Path) -> pd.DataFrame:
    """Loss curves of every recorded run (columns CURVE_COLUMNS, losses in nats)."""
    frames = [run_curves(folder, r, label) for folder, r, label in _records(out_dir)]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CURVE_COLUMNS)
