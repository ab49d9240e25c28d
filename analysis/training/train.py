"""Training one testbed run: AdamW, warmup + cosine, divergence as an outcome, atomic checkpoints.

``_train_run`` reads top to bottom like nanoGPT's train.py: setup; the loop (lr, forward and
backward, step, log, eval, checkpoint, stop checks); finish. A run writes into its own folder:
``settings.json`` (every setting, and where it ran: git commit, torch version, device),
``checkpoint.pt`` (analysis.training.checkpoint), ``train_log.csv`` (analysis.training.runlog) as
it goes, and ``result.json``, the run record, when it ends. A run ends with a status, ok,
diverged, stalled or cut (analysis.training.status holds their rules); a cut run, called again,
resumes from its last checkpoint and ends in the same state as an uninterrupted one with the
same seed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from analysis.infra import files, progress
from analysis.infra.budget import Cut, Interrupted, deferred_interrupt, past
from analysis.infra.checks import check_compile_backend, check_int, check_number
from analysis.infra.device import resolve_device
from analysis.infra.distributed import SINGLE, World, all_sum, barrier
from analysis.infra.records import environment, read_record, refuse_other
from analysis.testbed.corpus import Corpus
from analysis.testbed.model import ModelConfig, Testbed, build_model, compile_blocks
from analysis.testbed.parametrization import param_groups, set_lr
from analysis.training.block_updates import snapshot_blocks, trace_blocks, update_sizes  # noqa: F401
from analysis.training.checkpoint import (RunState, load_weights_and_moments,  # noqa: F401
                                          resume, save_atomic, save_checkpoint,
                                          weights_and_moments)
from analysis.training.runlog import NullRunLog, RunLog, rate_text
from analysis.training.status import (divergence_reason, final_status, initial_loss_note,
                                      next_loss_ema, stall_reason, train_loss_ends)

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, no sparsity


@dataclass
class TrainConfig:
    """How one run trains; the model is fixed by its ModelConfig."""

    tokens: int = 1 << 20  # token budget of the run
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    decay_embeddings: bool = True  # False: decay the block matrices and an untied head only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = None  # off by default: instability is a result to record
    spike_factor: float = 3.0  # loss above spike_factor × its running mean (or × ln vocab) ends the run
    spike_after: int = 20  # steps before spikes count (the running mean needs history)
    evals: int = 8  # validation points over the run (plus one at the end)
    eval_batches: int = 8
    checkpoints: int = 4  # checkpoints over the run
    profile_fractions: tuple[float, ...] = (0.0, 0.5, 1.0)  # when probes measure the model
    device: str = "cpu"
    compile: bool | None = None  # None: on CUDA only
    compile_backend: str = "inductor"  # torch.compile backend ("eager" traces without codegen)
    compile_scope: str = "blocks"  # "blocks": each block (graphs shared by depth); "model": whole
    autocast: bool | None = None  # bf16 autocast; None: on CUDA only
    check_every: int = 16  # steps between host syncs: losses are read, divergence checked
    timing_warmup: int = 3  # steps after each (re)start left out of tokens/s (compile, allocator)
    log_every: int = 10  # a train_log.csv row per this many steps (nanoGPT's log_interval)
    tensorboard: bool = False  # TensorBoard event files in the run folder (extra 'tensorboard')
    stall_fraction: float = 0.95  # stalled: training loss above this × the unigram entropy…
    stall_share: float = 0.5  # …all through the steps after this share of the run
    seed: int = 0

    def validate(self, seq_len: int) -> None:
        """Raise ValueError naming the first bad setting: every field in its range."""
        for name in ("tokens", "batch_size", "evals", "eval_batches", "checkpoints", "check_every",
                     "log_every"):
            check_int(getattr(self, name), name, 1)
        for name in ("spike_after", "timing_warmup"):
            check_int(getattr(self, name), name, 0)
        check_int(self.seed, "seed", None)
        if self.tokens < self.batch_size * seq_len:
            raise ValueError(f"tokens {self.tokens} is less than one batch "
                             f"({self.batch_size} × {seq_len})")
        check_number(self.lr, "lr", 0, lo_open=True)
        check_number(self.min_lr_ratio, "min_lr_ratio", 0, 1)  # below 0: a negative lr
        check_number(self.warmup_frac, "warmup_frac", 0, 1, hi_open=True)  # a share of the steps
        check_number(self.weight_decay, "weight_decay", 0)
        check_number(self.beta1, "beta1", 0, 1, hi_open=True)
        check_number(self.beta2, "beta2", 0, 1, hi_open=True)
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip)
                                               and self.grad_clip >= 0):
            raise ValueError(f"grad_clip must be >= 0 (0 or None: no clipping), got {self.grad_clip}")
        check_number(self.spike_factor, "spike_factor", 1, lo_open=True)
        check_number(self.stall_fraction, "stall_fraction", 0, lo_open=True)
        check_number(self.stall_share, "stall_share", 0, 1, hi_open=True)
        for f in self.profile_fractions:
            check_number(f, "each of profile_fractions", 0, 1)
        for name in ("decay_embeddings", "tensorboard", "compile", "autocast"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (value is None and name in ("compile", "autocast"))):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if self.compile_scope not in ("blocks", "model"):
            raise ValueError(f"compile_scope must be 'blocks' or 'model', got '{self.compile_scope}'")
        resolve_device(self.device)
        if self.compiled:
            check_compile_backend(self.compile_backend)

    @property
    def on_cuda(self) -> bool:
        """Whether the run trains on a CUDA device."""
        return resolve_device(self.device).type == "cuda"

    # how a run executes, logs or is judged, not what it trains: a run may resume under other
    # values of these
    EXECUTION_ONLY = ("device", "compile", "compile_backend", "compile_scope", "check_every",
                      "timing_warmup", "checkpoints", "log_every", "tensorboard", "stall_fraction",
                      "stall_share")

    def identity(self) -> dict[str, Any]:
        """Every setting that changes a run's result."""
        return {k: v for k, v in asdict(self).items() if k not in self.EXECUTION_ONLY}

    @property
    def compiled(self) -> bool:
        """Whether the run trains under torch.compile (default: on CUDA only)."""
        return self.compile if self.compile is not None else self.on_cuda


def run_settings(mc: ModelConfig, tc: TrainConfig, corpus: Corpus) -> dict[str, Any]:
    """What fixes a run's result: the model, the training settings and the corpus, JSON-ready."""
    return json.loads(json.dumps({"model": mc.to_dict(), "train": tc.identity(),
                                  "corpus": corpus.source}))


def check_same_run(run_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume or reuse a run folder of other settings, naming the first difference."""
    old = read_record(run_dir / "settings.json")
    if old is None:
        return
    defaults = {part: {f.name: f.default_factory() if f.default is MISSING else f.default
                       for f in fields(cls)} for part, cls in (("model", ModelConfig), ("train", TrainConfig))}
    for part in ("model", "train"):
        saved = old.get(part, {})
        for key, value in settings[part].items():
            # a setting newer than the run was saved with its default, which the run had then
            was = saved[key] if key in saved else json.loads(json.dumps(defaults[part].get(key)))
            if was != value:
                raise refuse_other(run_dir, "a run", key, was, value)
    if old.get("corpus") != settings["corpus"]:
        raise refuse_other(run_dir, "a run", "corpus", old.get("corpus"), settings["corpus"])


def lr_schedule(step: int, steps: int, lr: float, warmup_frac: float, min_lr_ratio: float) -> float:
    """Linear warmup over ``warmup_frac`` of ``steps``, then cosine decay to lr · min_lr_ratio."""
    warmup = max(1, int(warmup_frac * steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(step: int, steps: int, tc: TrainConfig) -> float:
    """The run's learning rate at ``step``: ``lr_schedule`` under ``tc``'s settings."""
    return lr_schedule(step, steps, tc.lr, tc.warmup_frac, tc.min_lr_ratio)


def flops_per_token(model: Testbed) -> float:
    """6N + 12·L·H·Q·T (nanoGPT / PaLM appendix B); N without position embeddings."""
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters()) - model.pos_embed.weight.numel()
    if cfg.experts:  # only top_k of E experts run per token
        expert = sum(p.numel() for m in model.moe_layers for p in m.experts.parameters())
        n -= expert * (1 - cfg.top_k / cfg.experts)
    return 6 * n + 12 * cfg.depth * cfg.width * cfg.max_seq_len


def peak_flops(device: torch.device) -> float:
    """Peak dense bf16 FLOP/s of the device, NaN where unknown (CPUs)."""
    if device.type != "cuda":
        return math.nan
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), math.nan)


def make_optimizer(model: Testbed, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on tensors of dim ≥ 2 (not norms or biases; embeddings unless
    ``tc.decay_embeddings`` is False); each group's lr × its parametrization's multiplier (all 1
    under the standard parametrization)."""
    return torch.optim.AdamW(param_groups(model, "adam", tc.weight_decay, tc.decay_embeddings),
                             lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=tc.on_cuda)


Profiler = Callable[[Testbed, str, int, Callable[[], tuple[torch.Tensor, torch.Tensor]]], None]


@torch.no_grad()
def evaluate(model: Testbed, corpus: Corpus, seq_len: int, batch_size: int, eval_batches: int,
             ctx: Callable[[], Any] = contextlib.nullcontext, world: World = SINGLE) -> float:
    """Mean validation cross-entropy (nats) over ``eval_batches`` fixed batches of ``batch_size``,
    the same for every run; under torchrun each rank takes its rows of every batch (as in
    training) and the means are shared. ``ctx``: the autocast context of the forward passes."""
    gen = torch.Generator().manual_seed(10_000)  # one validation set for every run and seed
    model.eval()
    device = next(model.parameters()).device
    rows = world.rows(batch_size)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(eval_batches):
        x, y = corpus.batch("val", batch_size, seq_len, generator=gen, device=device)
        with ctx():
            logits, _ = model(x[rows])
        total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y[rows].flatten())
    model.train()
    return all_sum(total / world.size, world).item() / eval_batches


def train_run(mc: ModelConfig, tc: TrainConfig, corpus: Corpus, run_dir: str | os.PathLike,
              profiler: Profiler | None = None, log: Callable[[str], None] = progress.say,
              on_step: Callable[[int, float], None] | None = None,
              deadline: float | None = None, position: int | None = None,
              world: World = SINGLE, fsdp: bool = False) -> dict[str, Any]:
    """Train one model for ``tc.tokens`` tokens, resuming from ``run_dir`` if it holds a checkpoint.

    Returns the run record (also written to ``run_dir/result.json``; its ``status`` is ok,
    diverged or stalled). ``profiler(model, tag, step, batch_fn)`` is called at
    ``tc.profile_fractions`` of training to measure the model; ``on_step(step, loss)`` for every
    optimizer step, when its loss is read (progress, tests). ``position`` places the run's bar
    below a grid's (analysis.infra.progress). At ``deadline`` (a time.time() value) the run
    checkpoints at its next host sync, records status cut and raises analysis.infra.budget.Cut; called
    again, it resumes there. Ctrl-C (in the main thread) checkpoints at the end of the step and
    raises analysis.infra.budget.Interrupted saying so; a second Ctrl-C stops at once, keeping the last
    checkpoint. Either way, called again, it resumes.

    ``world`` (analysis.infra.distributed, under torchrun): data-parallel training with
    DistributedDataParallel. Every rank draws the global batch from the same generator and trains
    on its slice, so the run equals the single-process run on the same global batch; losses,
    the deadline and Ctrl-C are agreed at each host sync; rank 0 alone writes files and prints.
    ``fsdp``: the same, with the model sharded over the ranks by torch's ``fully_shard`` (per
    block, then the root) instead of replicated; checkpoints hold the gathered, unsharded state.
    """
    saved: dict[str, int] = {}  # the step of the last checkpoint on disk, once there is one
    with deferred_interrupt(log) as stop:
        try:
            return _train_run(mc, tc, corpus, run_dir, profiler, log, on_step, deadline, stop, saved,
                              position, world, fsdp)
        except Interrupted:
            raise
        except KeyboardInterrupt:
            kept = (f"its last checkpoint, at step {saved['step']}/{saved['steps']}, is kept"
                    if "step" in saved else "it had no checkpoint yet and starts again")
            raise Interrupted(f"{Path(run_dir).name} stopped at once; {kept}") from None



def _train_run(mc: ModelConfig, tc: TrainConfig, corpus: Corpus, run_dir: str | os.PathLike,
               profiler: Profiler | None, log: Callable[[str], None],
               on_step: Callable[[int, float], None] | None, deadline: float | None,
               stop: dict, saved: dict, position: int | None, world: World,
               fsdp: bool) -> dict[str, Any]:
    """train_run's body; ``stop["set"]`` asks it to checkpoint and stop (Ctrl-C), ``saved`` gets
    the step of each checkpoint it writes or resumes from."""
    # --- setup: settings, folder, model, optimizer, checkpoint
    _check_inputs(mc, tc, corpus, world, fsdp)
    if not world.main:
        log = lambda message: None  # noqa: E731 (rank 0 speaks for the run)
    run_dir, seq_len = Path(run_dir), mc.max_seq_len
    settings = run_settings(mc, tc, corpus)
    check_same_run(run_dir, settings)
    barrier(world)  # every rank has read the folder before rank 0 writes to it
    device = resolve_device(world.device(tc.device))
    local = world.rows(tc.batch_size)  # this rank's rows of every global batch
    steps = tc.tokens // (tc.batch_size * seq_len)
    eval_at = {round(steps * (i + 1) / tc.evals) - 1 for i in range(tc.evals)}
    ckpt_at = {round(steps * (i + 1) / tc.checkpoints) for i in range(tc.checkpoints)}
    profile_at = {min(steps, round(f * steps)) for f in tc.profile_fractions}
    env = {**environment(str(device)), "world_size": world.size}
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        files.write_json(run_dir / "settings.json", {**settings, "environment": env}, indent=1)
    model = build_model(mc, seed=tc.seed, device=device)
    if fsdp:  # each block's weights, gradients and Adam moments split over the ranks
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    opt = make_optimizer(model, tc)
    data_gen = torch.Generator().manual_seed(tc.seed)
    ckpt_path = run_dir / "checkpoint.pt"
    state = resume(ckpt_path, model, opt, data_gen, fsdp, device)
    if state is None:
        state = RunState()
    else:
        saved.update(step=state.step, steps=steps)
        log(f"  resumed at step {state.step}/{steps}")
    wall = _stopwatch(state.wall_s)  # seconds since the run began, over every (re)start
    ctx = _autocast(tc, device)
    fwd = _forward(model, mc, tc, device, world, fsdp)

    def checkpoint() -> None:
        state.wall_s = wall()
        save_checkpoint(ckpt_path, model, opt, data_gen, state, mc, fsdp, world)
        saved.update(step=state.step, steps=steps)

    def record(status: str, reason: str = "", divergence_step: int | None = None) -> dict[str, Any]:
        return _write_record(status, reason, divergence_step, state, model, mc, tc, steps,
                             settings, env, device, runlog, wall(), run_dir, world)

    runlog = (RunLog(run_dir, steps, state.step, tc.batch_size * seq_len, tc.log_every,
                     tc.tensorboard, position,
                     [v for s, v in state.train_loss if s >= state.step - state.step % tc.log_every])
              if world.main else NullRunLog())
    sync = _HostSync(state, tc, mc.vocab, steps, seq_len, world, deadline, stop, device, runlog,
                     wall, on_step)
    reason, divergence_step = "", None
    try:
        with _no_silent_eager_fallback(mc, tc):
            while state.step < steps:
                step = state.step
                # measure before the step: the probes, and each block's output for its update size
                snapshot = None
                if step in profile_at:
                    _profile(profiler, model, "init" if step == 0 else f"step{step}", step, corpus,
                             tc, seq_len, device, local)
                    snapshot = snapshot_blocks(model, _fixed_batch(corpus, tc, seq_len, device))
                sync.start_window()
                # lr, forward and backward, step
                set_lr(opt, lr_at(step, steps, tc))
                x, y = corpus.batch("train", tc.batch_size, seq_len, generator=data_gen, device=device)
                with ctx():
                    _, loss = fwd(x[local], y[local])
                loss.backward()
                if tc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync.add(step, loss.detach())
                state.step += 1
                if snapshot is not None:
                    state.updates += [(step, i, u) for i, u in enumerate(update_sizes(model, snapshot))]
                    sync.untime()  # measuring is not training: this window is not timed
                # log: the host reads the losses only where it needs them (every check_every
                # steps, before anything that reads, measures or saves the state) and on Ctrl-C
                looked = (len(sync.pending) >= tc.check_every or state.step == steps
                          or state.step == sync.timed_from or snapshot is not None
                          or step in eval_at or state.step in ckpt_at or state.step in profile_at)
                ctrl_c = world.size == 1 and stop["set"] and state.step < steps
                if looked or ctrl_c:
                    first_read = not state.train_loss
                    reason = sync.read()
                    note = first_read and state.train_loss and initial_loss_note(
                        state.train_loss[0][1], mc.vocab, tc.spike_factor)
                    if note:  # a first loss far above a uniform guess: say so, once
                        log(f"  {note}")
                    if reason:
                        divergence_step = state.train_loss[-1][0]
                        log(f"  diverged: {reason}")
                        break
                # eval
                if step in eval_at:
                    val = evaluate(model, corpus, seq_len, tc.batch_size, tc.eval_batches, ctx, world)
                    state.val_loss.append((step, val))
                    runlog.val(state.step, val, lr_at(step, steps, tc), wall())
                    log(_evaluation_line(state, steps, tc, seq_len, wall()))
                # checkpoint; stop checks where the host looked (under torchrun: as the ranks
                # agreed there): a deadline cuts the run, Ctrl-C stops it, checkpointed either way
                unfinished = state.step < steps
                cut = looked and unfinished and (sync.agreed_cut if world.size > 1 else past(deadline))
                stopping = unfinished and ((looked and sync.agreed_stop) if world.size > 1
                                           else stop["set"])
                if state.step in ckpt_at or cut or stopping:
                    checkpoint()
                if cut or stopping:
                    record("cut")
                    raise (Cut(f"cut at step {state.step}/{steps}; checkpoint saved") if cut else
                           Interrupted(f"{run_dir.name} stopped at step {state.step}/{steps}, "
                                       "where its checkpoint is kept"))
        # --- finish: the last measurement, the status, the last checkpoint and the record
        diverged = divergence_step is not None
        if not diverged:
            if steps in profile_at:
                _profile(profiler, model, "end", state.step, corpus, tc, seq_len, device, local)
            reason = stall_reason(state.train_loss, steps, tc,
                                  corpus.unigram_bits("train") * math.log(2))
        checkpoint()
    finally:
        runlog.close(state.step, lr_at(max(0, state.step - 1), steps, tc), wall())
    result = record(final_status(diverged, reason), reason, divergence_step)
    if stop["set"]:  # Ctrl-C came as the run finished (or diverged): it is kept whole
        raise Interrupted(f"{run_dir.name} finished ({state.step}/{steps} steps)")
    return result


# --- _train_run's parts, in the order it uses them

def _check_inputs(mc: ModelConfig, tc: TrainConfig, corpus: Corpus, world: World,
                  fsdp: bool) -> None:
    """Raise ValueError naming the first setting the run cannot train under."""
    tc.validate(mc.max_seq_len)
    seq_len = mc.max_seq_len
    for split in ("train", "val"):
        if len(corpus.split(split)) < seq_len + 1:
            raise ValueError(f"the {split} split of {corpus.source} has {len(corpus.split(split))} "
                             f"bytes, shorter than the context {seq_len} + 1")
    if tc.batch_size % world.size:
        raise ValueError(f"batch {tc.batch_size} does not split evenly over {world.size} ranks")
    if fsdp and not torch.distributed.is_initialized():
        raise ValueError("fsdp shards a model over torchrun's ranks: launch with torchrun")


def _stopwatch(before: float) -> Callable[[], float]:
    """A clock of the seconds since the run began: ``before`` at this (re)start, and counting."""
    started = time.perf_counter()
    return lambda: before + time.perf_counter() - started


def _autocast(tc: TrainConfig, device: torch.device) -> Callable[[], Any]:
    """The forward passes' context: bf16 autocast (default: on CUDA only), or none."""
    use_autocast = tc.autocast if tc.autocast is not None else device.type == "cuda"
    return ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_autocast
            else (lambda: torch.autocast(device.type, enabled=False)))


def _forward(model: Testbed, mc: ModelConfig, tc: TrainConfig, device: torch.device, world: World,
             fsdp: bool) -> torch.nn.Module:
    """What the training step calls: the model, under DDP across ranks, compiled if asked."""
    if tc.compiled and tc.compile_scope == "model":
        # Every whole model is a graph of its own: a process that trains many (a grid) would
        # reach dynamo's recompile limit after 8 and silently run the rest eagerly. Each run
        # starts from empty caches instead. Compiled by block, runs share graphs: no reset.
        torch.compiler.reset()
    wrapped: torch.nn.Module = model
    if world.size > 1 and not fsdp:  # gradients averaged over the ranks' slices: the global
        wrapped = torch.nn.parallel.DistributedDataParallel(  # batch's (FSDP does the same)
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(mc.experts))  # an expert may get no token
    if not tc.compiled:
        return wrapped
    return (compile_blocks(model, tc.compile_backend, call=wrapped)
            if tc.compile_scope == "blocks" else torch.compile(wrapped, backend=tc.compile_backend))


def _no_silent_eager_fallback(mc: ModelConfig, tc: TrainConfig):
    """Dynamo's settings for the loop: a recompile past the limit fails, never falls back to eager
    in silence; compiled by block, a scheme whose blocks branch on l (Mix-LN, LNS) needs a graph
    per block."""
    limit = torch._dynamo.config.recompile_limit
    if tc.compile_scope == "blocks":
        limit = max(limit, mc.depth + 8)
    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=limit)


def _fixed_batch(corpus: Corpus, tc: TrainConfig, seq_len: int, device: torch.device) -> torch.Tensor:
    """The same validation batch at every measurement of the update sizes."""
    gen = torch.Generator().manual_seed(20_000 + tc.seed)
    return corpus.batch("val", tc.batch_size, seq_len, generator=gen, device=device)[0]


def _profile(profiler: Profiler | None, model: Testbed, tag: str, step: int, corpus: Corpus,
             tc: TrainConfig, seq_len: int, device: torch.device, local) -> None:
    """Let the profiler measure the model on fixed validation batches (under torchrun each rank
    probes its rows; the probe sums them)."""
    if profiler is None:
        return
    gen = torch.Generator().manual_seed(30_000 + tc.seed)

    def batch_fn():
        x, y = corpus.batch("val", tc.batch_size, seq_len, generator=gen, device=device)
        return x[local], y[local]
    profiler(model, tag, step, batch_fn)
    model.zero_grad(set_to_none=True)  # a profiler's backward must not leak into training


def tokens_per_s(windows: list[tuple[int, int, float]], tokens_per_step: int) -> float:
    """Training throughput over timed windows of (first step, steps, seconds); NaN without any."""
    seconds = sum(t for _, _, t in windows)
    return sum(n for _, n, _ in windows) * tokens_per_step / seconds if seconds else math.nan


class _HostSync:
    """The losses of the steps since the host last looked, still on the device, and the timed
    window they make; ``read`` is the one host sync of a window.

    Under torchrun every rank syncs at the same steps: the losses become the global batch's (the
    mean of the ranks' slices), and a deadline or Ctrl-C seen by any rank is agreed by all
    (``agreed_cut``, ``agreed_stop``)."""

    def __init__(self, state: RunState, tc: TrainConfig, vocab: int, steps: int, seq_len: int,
                 world: World, deadline: float | None, stop: dict, device: torch.device,
                 runlog: RunLog | NullRunLog, wall: Callable[[], float],
                 on_step: Callable[[int, float], None] | None):
        self.state, self.tc, self.vocab, self.steps, self.world = state, tc, vocab, steps, world
        self.deadline, self.stop, self.device, self.runlog = deadline, stop, device, runlog
        self.wall, self.on_step, self.tokens_per_step = wall, on_step, tc.batch_size * seq_len
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, loss on the device)
        self.timed_from = state.step + tc.timing_warmup  # steps before it include compiling
        self.window_t0: float | None = None
        self.agreed_cut = self.agreed_stop = False

    def start_window(self) -> None:
        if self.window_t0 is None:
            self.window_t0 = time.perf_counter()

    def untime(self) -> None:
        self.window_t0 = None

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss))

    def read(self) -> str:
        """Read and log each step's loss in order, checking it for divergence; the reason if the
        run diverged, else ''."""
        state, world, pending = self.state, self.world, self.pending
        losses = (torch.stack([l.float() for _, l in pending]) if pending
                  else torch.zeros(0, device=self.device))
        if world.size > 1:
            flags = torch.tensor([float(past(self.deadline)), float(self.stop["set"])],
                                 device=self.device)
            shared = all_sum(torch.cat([losses / world.size, flags]), world)
            losses = shared[:-2]
            self.agreed_cut, self.agreed_stop = bool(shared[-2] > 0), bool(shared[-1] > 0)
        values = losses.tolist()
        if self.window_t0 is not None and pending and pending[0][0] >= self.timed_from:
            state.windows.append((pending[0][0], len(pending), time.perf_counter() - self.window_t0))
        self.window_t0 = None
        steps_read = [s for s, _ in pending]
        pending.clear()
        tc = self.tc
        for step, value in zip(steps_read, values):
            state.train_loss.append((step, value))
            self.runlog.train(step, value, lr_at(step, self.steps, tc), self.wall())
            reason = divergence_reason(step, value, state.loss_ema, self.vocab, tc.spike_factor,
                                       tc.spike_after, initial=state.train_loss[0][1])
            state.loss_ema = next_loss_ema(state.loss_ema, value)
            if self.on_step is not None:
                self.on_step(step, value)
            if reason:
                return reason
        if values:
            self.runlog.sync(state.step, values[-1], lr_at(state.step - 1, self.steps, tc),
                             tokens_per_s(state.windows[-4:], self.tokens_per_step))
        return ""


def _evaluation_line(state: RunState, steps: int, tc: TrainConfig, seq_len: int,
                     elapsed: float) -> str:
    """The line printed at each evaluation: losses, lr, throughput, time spent and left."""
    done = state.step
    eta = elapsed / max(1, done) * (steps - done)  # the run's pace so far, evaluations included
    recent = [v for _, v in state.train_loss[-tc.log_every:]]
    interval = tqdm.format_interval  # h:mm:ss, as the bar shows it
    return (f"  step {done}/{steps}  train {math.fsum(recent) / len(recent):.3f}  val "
            f"{state.val_loss[-1][1]:.3f} nats  lr {lr_at(done - 1, steps, tc):.2e}  "
            f"{rate_text(tokens_per_s(state.windows[-4:], tc.batch_size * seq_len))}  "
            f"[{interval(elapsed)}<{interval(eta)}]")


def _write_record(status: str, reason: str, divergence_step: int | None, state: RunState,
                  model: Testbed, mc: ModelConfig, tc: TrainConfig, steps: int,
                  settings: dict[str, Any], env: dict[str, Any], device: torch.device,
                  runlog: RunLog | NullRunLog, wall_s: float, run_dir: Path,
                  world: World) -> dict[str, Any]:
    """The run record (result.json, written by rank 0), whatever the status."""
    tokens_per_step = tc.batch_size * mc.max_seq_len
    first_train, final_train = train_loss_ends(state.train_loss)
    final_val = state.val_loss[-1][1] if state.val_loss and status != "diverged" else math.nan
    speed, flops = tokens_per_s(state.windows, tokens_per_step), flops_per_token(model)
    result = {
        **{k: v for k, v in mc.to_dict().items() if k in ("scheme", "depth", "width", "experts", "top_k")},
        "status": status, "tokens": state.step * tokens_per_step, "steps": state.step,
        "planned_steps": steps, "final_val_bpb": final_val / math.log(2),
        "final_val_loss": final_val, "first_train_loss": first_train,
        "final_train_loss": final_train, "diverged": status == "diverged",
        "divergence_step": divergence_step, "divergence_reason": reason if status == "diverged" else "",
        "initial_loss_note": initial_loss_note(first_train, mc.vocab, tc.spike_factor),
        "stall_reason": reason if status == "stalled" else "", "wall_s": wall_s,
        "log_s": runlog.spent, "log_setup_s": runlog.setup, "tokens_per_s": speed,
        "mfu": speed * flops / peak_flops(device), "flops_per_token": flops,
        "train_loss": state.train_loss, "val_loss": state.val_loss, "updates": state.updates,
        "timed_windows": state.windows, "compiled": tc.compiled, "settings": settings,
        "environment": env,
    }
    if world.main:
        files.write_json(run_dir / "result.json", result, allow_nan=True)
    return result
