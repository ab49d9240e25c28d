"""The GPU campaign: every stage the README's GPU results need, in one resumable command.

Stages run in order of value (what a short device lease should bring back first):

1. ``dense_grid``: pre, post, span, deepnorm trained at several depths, one learning rate, probes
   at init, middle and end;
2. ``probe_overhead``: a probed training step against an unprobed one at the GPT-2-small shape,
   eager and compiled;
3. ``throughput``: training tokens/s and MFU at the same shape;
4. ``moe_grid``: pre against span with a top-2 mixture of 8 experts;
5. ``init_sweep``: the init sweep at width 1024, to the deepest depth whose memory fits;
6. ``readings_grid``: the SpanNorm readings that decide the CPU study's verdicts (docs/
   span-readings.md) trained as ``dense_grid`` is, each at the dense lr times the ratio of its
   shallowest-depth optimum to span's on the CPU, one folder per reading.

``DIR/campaign.json`` records the settings and each stage's status (done / cut) and device
seconds. An invocation skips finished stages, resumes a cut one (grids from their checkpoints,
the sweep from its finished points) and stops cleanly before its time limit, saying what remains.
``tiny`` runs the identical code path at toy sizes: the CPU rehearsal.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from analysis.infra import files, progress
from analysis.infra.budget import Cut, left
from analysis.infra.checks import check_compile_backend, check_int, check_list
from analysis.infra.device import available_memory, resolve_device
from analysis.infra.records import read_record, refuse_other
from analysis.testbed.corpus import load_corpus
from analysis.testbed.memory import depths_that_fit
from analysis.testbed.model import ModelConfig
from analysis.training.grid import train_grid
from analysis.training.train import TrainConfig

STAGES = ("dense_grid", "probe_overhead", "throughput", "moe_grid", "init_sweep", "readings_grid")

# The readings that decide the CPU study's verdicts (results/span-readings), and their lr against
# span's: the ratio of their optimum to span's at L = 4 in the CPU study's scan.
READINGS_ON_GPU = ["span_dlr_all", "span_dlr"]
READINGS_LR_SCALE = {"span_dlr_all": 4.0, "span_dlr": 4.0}

# What each stage runs. "full": sized for one H200 (see README, The GPU campaign); "tiny": the same
# code at toy sizes, minutes on a CPU.
PLANS = {
    "full": {
        "dense_grid": dict(schemes=["pre", "post", "span", "deepnorm"], depths=[12, 24, 48, 96],
                           width=256, heads=4, seq_len=256, batch=32, tokens=4_000_000, lr=1e-3),
        "moe_grid": dict(schemes=["pre", "span"], depths=[12, 24], experts=8, top_k=2, width=256,
                         heads=4, seq_len=256, batch=32, tokens=4_000_000, lr=1e-3),
        "bench": dict(shape="gpt2", steps=30, warmup=10, rounds=20),
        "init_sweep": dict(schemes=["pre", "post", "span", "deepnorm"],
                           depths=[2, 4, 8, 16, 32, 64, 128, 256, 512, 1024], width=1024, heads=8,
                           seq_len=128, batch=8, batches=2, seeds=[0, 1, 2]),
        "readings_grid": dict(schemes=READINGS_ON_GPU, lr_scale=READINGS_LR_SCALE,
                              depths=[12, 24, 48, 96], width=256, heads=4, seq_len=256, batch=32,
                              tokens=4_000_000, lr=1e-3),
    },
    "tiny": {
        "dense_grid": dict(schemes=["pre", "post", "span", "deepnorm"], depths=[2], width=32,
                           heads=4, seq_len=32, batch=4, tokens=32 * 4 * 12, lr=3e-3),
        "moe_grid": dict(schemes=["pre", "span"], depths=[2], experts=4, top_k=2, width=32,
                         heads=4, seq_len=32, batch=4, tokens=32 * 4 * 12, lr=3e-3),
        "bench": dict(shape="tiny", steps=6, warmup=2, rounds=3),
        "init_sweep": dict(schemes=["span"], depths=[2, 4], width=32, heads=4,
                           seq_len=16, batch=2, batches=1, seeds=[0]),
        "readings_grid": dict(schemes=READINGS_ON_GPU, lr_scale=READINGS_LR_SCALE, depths=[2],
                              width=32, heads=4, seq_len=32, batch=4, tokens=32 * 4 * 12, lr=3e-3),
    },
}

# Device minutes per stage on an H200 for the full plan, as measured on 2026-12-04 with
# --parallel 4 (results/gpu-h200/campaign.json; docs/benchmarks.md). readings_grid was cut: its
# first reading took 2.8 min, so both about twice that.
ESTIMATED_MINUTES = {"dense_grid": 6.1, "probe_overhead": 1.7, "throughput": 0.3, "moe_grid": 1.7,
                     "init_sweep": 5.6, "readings_grid": 5.5}
# Least time worth starting a stage with: a cut stage resumes, so only its fixed costs count.
START_SECONDS = {"full": {"dense_grid": 60, "probe_overhead": 120, "throughput": 90,
                          "moe_grid": 60, "init_sweep": 60, "readings_grid": 60},
                 "tiny": {s: 5 for s in STAGES}}


@dataclass(frozen=True)
class CampaignConfig:
    """What a campaign runs and how; a folder holds one campaign of one configuration."""

    device: str = "cuda"
    tiny: bool = False
    compile: bool = True
    compile_backend: str = "inductor"
    parallel: int = 1  # training runs side by side on the device
    tokens: int | None = None  # per training run; default: the plan's
    corpus: str | None = None
    stages: tuple[str, ...] = STAGES

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        resolve_device(self.device)
        check_list(self.stages, "stages")  # not empty, nothing twice
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage '{unknown[0]}' (stages: {', '.join(STAGES)})")
        check_int(self.parallel, "parallel")
        if self.tokens is not None:
            check_int(self.tokens, "tokens")
        for name in ("tiny", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_compile_backend(self.compile_backend)  # every stage trains or times under it

    def plan(self) -> dict:
        """The sizes of every stage, the token override applied."""
        plan = json.loads(json.dumps(PLANS["tiny" if self.tiny else "full"]))
        if self.tokens is not None:
            for grid in ("dense_grid", "moe_grid", "readings_grid"):
                plan[grid]["tokens"] = self.tokens
        return plan

    def identity(self) -> dict:
        """Every setting that changes a result: a folder refuses a campaign that differs."""
        return {**{k: v for k, v in asdict(self).items() if k != "stages"}, "plan": self.plan()}


def _train_config(cfg: CampaignConfig, grid: dict) -> TrainConfig:
    # the CPU rehearsal autocasts to bf16 too, so MoE takes the grouped-GEMM path it takes on a GPU
    return TrainConfig(tokens=grid["tokens"], batch_size=grid["batch"], lr=grid["lr"],
                       device=cfg.device, compile=cfg.compile, compile_backend=cfg.compile_backend,
                       autocast=True, evals=4 if cfg.tiny else 8, eval_batches=2 if cfg.tiny else 8)


def _grid(cfg: CampaignConfig, grid: dict, out: Path, deadline: float | None, log) -> None:
    base = ModelConfig(scheme=grid["schemes"][0], depth=grid["depths"][0], width=grid["width"],
                       heads=grid["heads"], max_seq_len=grid["seq_len"],
                       experts=grid.get("experts", 0), top_k=grid.get("top_k", 2))
    train_grid(grid["schemes"], grid["depths"], base, _train_config(cfg, grid),
               load_corpus(cfg.corpus), out, log=log, parallel=cfg.parallel, deadline=deadline)


def dense_grid(cfg: CampaignConfig, out: Path, deadline: float | None, log) -> None:
    """Stage 1: the dense training grid, with probes, into ``out/dense``."""
    _grid(cfg, cfg.plan()["dense_grid"], out / "dense", deadline, log)


def moe_grid(cfg: CampaignConfig, out: Path, deadline: float | None, log) -> None:
    """Stage 4: pre against span with a top-k MoE FFN, into ``out/moe``."""
    _grid(cfg, cfg.plan()["moe_grid"], out / "moe", deadline, log)


def probe_overhead(cfg: CampaignConfig, out: Path, deadline: float | None, log) -> None:
    """Stage 2: probed against unprobed step times → ``out/probe_overhead.csv`` (each round's
    times in ``out/probe_overhead_rounds.csv``), and one profiled step of each copy →
    ``out/probe_overhead_ops.csv`` (what the probe's overhead is made of)."""
    from analysis.bench.probe_overhead import benchmark, overhead_rows
    bench = cfg.plan()["bench"]
    ops: list[dict] = []
    times = benchmark(bench["shape"], cfg.device, compile=cfg.compile, rounds=bench["rounds"],
                      backend=cfg.compile_backend, ops=ops)
    files.write_csv(pd.DataFrame(ops), out / "probe_overhead_ops.csv", index=False)
    files.write_csv(pd.DataFrame(times).rename_axis("round"), out / "probe_overhead_rounds.csv")
    rows = [dict(shape=bench["shape"], **r) for r in overhead_rows(times)]
    for r in rows:
        log(f"  {r['mode']}: {r['unprobed_ms']:.2f} → {r['probed_ms']:.2f} ms "
            f"({100 * r['overhead']:+.1f} %)")
    files.write_csv(pd.DataFrame(rows), out / "probe_overhead.csv", index=False)


def throughput(cfg: CampaignConfig, out: Path, deadline: float | None, log) -> None:
    """Stage 3: training throughput and MFU → ``out/throughput.csv``."""
    from analysis.bench.training import throughput as measure
    bench = cfg.plan()["bench"]
    r = measure(bench["shape"], cfg.device, steps=bench["steps"], warmup=bench["warmup"],
                compile=cfg.compile, compile_backend=cfg.compile_backend)
    log(f"  {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.3f}")
    files.write_csv(pd.DataFrame([r]), out / "throughput.csv", index=False)


def init_sweep(cfg: CampaignConfig, out: Path, deadline: float | None, log) -> None:
    """Stage 5: the init sweep to the deepest depth that fits, into ``out/init``."""
    from analysis.init.pipeline import AnalysisConfig, analyse, save_tables
    p = cfg.plan()["init_sweep"]
    free = available_memory(resolve_device(cfg.device))
    depths = depths_that_fit([ModelConfig(scheme=s, depth=d, width=p["width"], heads=p["heads"],
                                          max_seq_len=p["seq_len"])
                              for s in p["schemes"] for d in p["depths"]], p["batch"], free)
    if not depths:
        raise ValueError(f"no init-sweep depth fits in the {free / 1e9:.1f} GB free on {cfg.device}")
    if depths != p["depths"]:
        log(f"  depths {', '.join(str(d) for d in p['depths'] if d not in depths)} do not fit in "
            f"{free / 1e9:.1f} GB: the sweep stops at {depths[-1]}")
    acfg = AnalysisConfig(schemes=p["schemes"], depths=depths, seeds=p["seeds"], width=p["width"],
                          heads=p["heads"], seq_len=p["seq_len"], batch_size=p["batch"],
                          batches=p["batches"], device=cfg.device, corpus=cfg.corpus)
    folder = out / "init"
    tables, theory = analyse(acfg, log=log, out=folder, deadline=deadline)
    save_tables(tables, acfg, theory, folder)


def readings_grid(cfg: CampaignConfig, out: Path, deadline: float | None, log) -> None:
    """Stage 6: SpanNorm's deciding readings, trained as the dense grid, into
    ``out/readings/<reading>``, each at the dense lr × its READINGS_LR_SCALE."""
    grid = cfg.plan()["readings_grid"]
    for scheme in grid["schemes"]:
        own = {**grid, "schemes": [scheme], "lr": grid["lr"] * grid["lr_scale"][scheme]}
        _grid(cfg, own, out / "readings" / scheme, deadline, log)


RUNNERS: dict[str, Callable] = {"dense_grid": dense_grid, "probe_overhead": probe_overhead,
                                "throughput": throughput, "moe_grid": moe_grid,
                                "init_sweep": init_sweep, "readings_grid": readings_grid}


def load_state(cfg: CampaignConfig, out: Path) -> dict:
    """``out/campaign.json``, or a new state; ValueError if it records other settings."""
    state = read_record(out / "campaign.json")
    if state is None:
        return {"settings": cfg.identity(), "stages": {}, "seconds": {}}
    lacking = [k for k in ("settings", "stages", "seconds") if not isinstance(state.get(k), dict)]
    if lacking:
        raise ValueError(f"{out / 'campaign.json'} lacks {', '.join(lacking)} (an object each): "
                         "not a campaign's state; choose another --out folder")
    old, new = state.get("settings", {}), cfg.identity()
    for key in new:
        if old.get(key) != new[key]:
            if key == "plan":
                raise ValueError(f"{out} holds a campaign of other stage sizes (settings.plan): "
                                 "choose another --out folder or the same settings")
            raise refuse_other(out, "a campaign", key, old.get(key), new[key])
    return state


def remaining(state: dict, cfg: CampaignConfig) -> list[tuple[str, float]]:
    """(stage, estimated device minutes) of every selected stage not done yet (the full plan's
    estimates; a twentieth of them for the tiny one)."""
    scale = 0.05 if cfg.tiny else 1.0
    return [(s, scale * ESTIMATED_MINUTES[s]) for s in STAGES
            if s in cfg.stages and state["stages"].get(s) != "done"]


def run_campaign(cfg: CampaignConfig, out: Path, time_limit: float = 540.0,
                 log: Callable[[str], None] = progress.say, reserve: float = 30.0) -> dict:
    """Run the selected stages not yet done, in order, until done or ``time_limit`` seconds
    (``reserve`` of them kept for figures and the bundle); the state, also in campaign.json."""
    cfg.validate()
    if time_limit <= reserve + min(START_SECONDS["tiny" if cfg.tiny else "full"].values()):
        raise ValueError(f"--time-limit {time_limit:g} s is too small for any step (at least "
                         f"{reserve + min(START_SECONDS['tiny' if cfg.tiny else 'full'].values()):g} s)")
    out.mkdir(parents=True, exist_ok=True)
    state = load_state(cfg, out)
    state["selected"] = [s for s in STAGES if s in cfg.stages]
    save = lambda: files.write_json(out / "campaign.json", state, indent=1)  # noqa: E731
    save()
    deadline = time.time() + time_limit - reserve
    starts = START_SECONDS["tiny" if cfg.tiny else "full"]
    for stage in STAGES:
        if stage not in cfg.stages:
            continue
        if state["stages"].get(stage) == "done":
            log(f"{stage}: done earlier, kept")
            continue
        if left(deadline) < starts[stage]:
            log(f"{stage}: not started, {left(deadline):.0f} s left of the time limit")
            break
        log(f"{stage}: {'resuming' if stage in state['stages'] else 'starting'}")
        t0 = time.time()
        try:
            RUNNERS[stage](cfg, out, deadline, log)
            state["stages"][stage] = "done"
        except Cut as e:
            state["stages"][stage] = "cut"
            log(f"{stage}: cut at the time limit: {e}")
        except Exception as e:  # noqa: BLE001 — one broken stage must not cost the device call the rest
            state["stages"][stage] = "failed"
            state.setdefault("errors", {})[stage] = f"{type(e).__name__}: {e}"
            files.write_text(out / f"{stage}-error.txt", traceback.format_exc())
            log(f"{stage}: FAILED ({type(e).__name__}: {e}); traceback in {out / f'{stage}-error.txt'}; "
                "going on with the next stage (a rerun retries it)")
        finally:
            state["seconds"][stage] = state["seconds"].get(stage, 0.0) + time.time() - t0
            save()
        if state["stages"][stage] == "cut":
            break
    return state


def with_stages(cfg: CampaignConfig, stages: str | None) -> CampaignConfig:
    """``cfg`` restricted to the comma-separated ``stages`` (None: all)."""
    if stages is None:
        return cfg
    return replace(cfg, stages=tuple(s for s in stages.split(",") if s))
