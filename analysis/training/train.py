"""Training one testbed run: AdamW, warmup + cosine, divergence as an outcome, atomic checkpoints.

Read top to bottom like nanoGPT's train.py. A run writes into its own folder: ``settings.json``
(every setting, and where it ran: git commit, torch version, device), ``checkpoint.pt`` (model,
optimizer, data-generator state, history; written atomically and reloaded with
``weights_only=True``), ``train_log.csv`` (analysis.training.runlog) as it goes, and
``result.json``, the run record, when it ends. A run ends with a status:

- ``ok``: it trained every step;
- ``diverged``: a non-finite loss, or a spike (``spike_factor``);
- ``stalled``: it trained every step, but after ``stall_share`` of them its training loss (mean
  over ``log_every`` steps) never fell below ``stall_fraction`` × the corpus's unigram entropy,
  the loss of a model that learned which bytes are common and nothing of context;
- ``cut``: stopped at a time limit or by Ctrl-C, checkpointed; called again, it resumes.

A killed run resumes from its last checkpoint and ends in the same state as an uninterrupted one
with the same seed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from analysis import progress
from analysis.budget import Cut, Interrupted, deferred_interrupt, past
from analysis.device import resolve_device
from analysis.distributed import SINGLE, World, all_sum, barrier
from analysis.records import environment, read_record, refuse_other
from analysis.testbed.corpus import Corpus
from analysis.testbed.model import ModelConfig, Testbed, build_model, compile_blocks
from analysis.testbed.parametrization import param_groups, set_lr
from analysis.training.runlog import NullRunLog, RunLog, rate_text

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
        """Raise ValueError naming the first bad setting."""
        if self.tokens < self.batch_size * seq_len:
            raise ValueError(f"tokens {self.tokens} is less than one batch "
                             f"({self.batch_size} × {seq_len})")
        for name in ("batch_size", "evals", "eval_batches", "checkpoints", "check_every",
                     "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        numbers = {k: getattr(self, k) for k in ("lr", "min_lr_ratio", "warmup_frac", "weight_decay",
                                                  "beta1", "beta2", "grad_clip", "spike_factor",
                                                  "stall_fraction", "stall_share")}
        for name, value in numbers.items():
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if not (self.lr > 0 and self.spike_factor > 1):
            raise ValueError("lr must be > 0 and spike_factor > 1")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (self.stall_fraction > 0 and 0 <= self.stall_share < 1):
            raise ValueError(f"stall_fraction must be > 0 and stall_share in [0, 1), got "
                             f"{self.stall_fraction} and {self.stall_share}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 or None: no clipping), got {self.grad_clip}")
        if self.compile_scope not in ("blocks", "model"):
            raise ValueError(f"compile_scope must be 'blocks' or 'model', got '{self.compile_scope}'")
        if self.timing_warmup < 0:
            raise ValueError(f"timing_warmup must be >= 0, got {self.timing_warmup}")
        resolve_device(self.device)

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


def lr_at(step: int, steps: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr · min_lr_ratio."""
    warmup = max(1, int(tc.warmup_frac * steps))
    if step < warmup:
        return tc.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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


def weights_and_moments(model: Testbed, opt: torch.optim.Optimizer, fsdp: bool) -> dict[str, Any]:
    """The checkpoint's model and optimizer state; under FSDP gathered whole (a collective: every
    rank calls it), the optimizer keyed by parameter name."""
    if not fsdp:
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(model, options=whole),
            "optimizer": get_optimizer_state_dict(model, opt, options=whole), "sharded": True}


def load_weights_and_moments(model: Testbed, opt: torch.optim.Optimizer, ckpt: dict[str, Any],
                             fsdp: bool, path: Path) -> None:
    """Restore a checkpoint written by ``weights_and_moments`` (FSDP: into any world size)."""
    if bool(ckpt.get("sharded")) != fsdp:
        raise ValueError(f"{path} was written {'with' if ckpt.get('sharded') else 'without'} "
                         f"--fsdp: resume it {'with' if ckpt.get('sharded') else 'without'} --fsdp "
                         "(any number of ranks)")
    if not fsdp:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt["model"], options=whole)
    set_optimizer_state_dict(model, opt, ckpt["optimizer"], options=whole)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class RunState:
    """What a checkpoint restores besides model and optimizer."""

    step: int = 0
    loss_ema: float | None = None
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    updates: list[tuple[int, int, float]] = field(default_factory=list)  # (step, block, size)
    # timed windows of training steps only, between two host syncs: (first step, steps, seconds)
    windows: list[tuple[int, int, float]] = field(default_factory=list)
    wall_s: float = 0.0  # seconds since the run began, over every (re)start, at the checkpoint


@torch.no_grad()
def trace_blocks(model: Testbed, x: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                           torch.Tensor]:
    """Each block's (input, output) on batch ``x``, and the logits."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [b.register_forward_hook(lambda m, args, out: pairs.append((args[0], out)))
             for b in model.blocks]
    try:
        logits, _ = model(x)
    finally:
        for h in hooks:
            h.remove()
    return pairs, logits


def snapshot_blocks(model: Testbed, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each block's (input, output) on batch ``x``, for measuring the next update's size."""
    return trace_blocks(model, x)[0]


@torch.no_grad()
def update_sizes(model: Testbed, snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """‖B_new(x) − B_old(x)‖ / ‖B_old(x)‖ per block, on the block's own saved input x.

    The input is held fixed, so each figure is the change from that block's own parameter
    update alone (DeepNet's "model update", arXiv 2203.00555, taken per block).
    """
    sizes = [torch.linalg.vector_norm((b(x) - y).float()) / torch.linalg.vector_norm(y.float())
             for b, (x, y) in zip(model.blocks, snapshot)]
    return torch.stack(sizes).tolist()


Profiler = Callable[[Testbed, str, int, Callable[[], tuple[torch.Tensor, torch.Tensor]]], None]


@torch.no_grad()
def evaluate(model: Testbed, corpus: Corpus, tc: TrainConfig, seq_len: int, ctx,
             world: World = SINGLE) -> float:
    """Mean validation cross-entropy (nats) over fixed batches, the same for every run; under
    torchrun each rank takes its rows of every batch (as in training) and the means are shared."""
    gen = torch.Generator().manual_seed(10_000)  # one validation set for every run and seed
    model.eval()
    device = next(model.parameters()).device
    rows = world.rows(tc.batch_size)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(tc.eval_batches):
        x, y = corpus.batch("val", tc.batch_size, seq_len, generator=gen, device=device)
        with ctx():
            logits, _ = model(x[rows])
        total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y[rows].flatten())
    model.train()
    return all_sum(total / world.size, world).item() / tc.eval_batches


def train_loss_ends(train_loss: list[tuple[int, float]]) -> tuple[float, float]:
    """The first training loss and the mean of the last 10 (nats); NaN without any."""
    values = [v for _, v in train_loss]
    if not values:
        return math.nan, math.nan
    return values[0], math.fsum(values[-10:]) / len(values[-10:])


def stall_reason(train_loss: list[tuple[int, float]], steps: int, tc: TrainConfig,
                 plateau: float) -> str:
    """Why a finished run stalled ('' if it did not): after ``tc.stall_share`` of its steps, its
    training loss averaged over ``tc.log_every`` steps never fell below ``tc.stall_fraction`` ×
    ``plateau`` (the corpus's unigram entropy, nats)."""
    after = [v for s, v in train_loss if s >= tc.stall_share * steps]
    k = tc.log_every
    means = [math.fsum(after[i:i + k]) / len(after[i:i + k]) for i in range(0, len(after), k)]
    threshold = tc.stall_fraction * plateau
    if not means or min(means) <= threshold:
        return ""
    return (f"training loss stayed above {tc.stall_fraction:g} × the unigram entropy "
            f"{plateau:.3f} = {threshold:.3f} nats after {tc.stall_share:.0%} of the steps "
            f"(lowest {min(means):.3f})")


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
    below a grid's (analysis.progress). At ``deadline`` (a time.time() value) the run
    checkpoints at its next host sync, records status cut and raises analysis.budget.Cut; called
    again, it resumes there. Ctrl-C (in the main thread) checkpoints at the end of the step and
    raises analysis.budget.Interrupted saying so; a second Ctrl-C stops at once, keeping the last
    checkpoint. Either way, called again, it resumes.

    ``world`` (analysis.distributed, under torchrun): data-parallel training with
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
    if not world.main:
        log = lambda message: None  # noqa: E731 (rank 0 speaks for the run)
    run_dir = Path(run_dir)
    settings = run_settings(mc, tc, corpus)
    check_same_run(run_dir, settings)
    barrier(world)  # every rank has read the folder before rank 0 writes to it
    device = resolve_device(world.device(tc.device))
    local = world.rows(tc.batch_size)
    steps = tc.tokens // (tc.batch_size * seq_len)
    eval_at = {round(steps * (i + 1) / tc.evals) - 1 for i in range(tc.evals)}
    ckpt_at = {round(steps * (i + 1) / tc.checkpoints) for i in range(tc.checkpoints)}
    profile_at = {min(steps, round(f * steps)) for f in tc.profile_fractions}

    env = {**environment(str(device)), "world_size": world.size}
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "settings.json").write_text(json.dumps({**settings, "environment": env},
                                                          indent=1))
    model = build_model(mc, seed=tc.seed, device=device)
    if fsdp:  # each block's weights, gradients and Adam moments split over the ranks
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    opt = make_optimizer(model, tc)
    data_gen = torch.Generator().manual_seed(tc.seed)
    state = RunState()
    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        load_weights_and_moments(model, opt, ckpt, fsdp, ckpt_path)
        data_gen.set_state(ckpt["data_gen"])
        known = {f.name for f in fields(RunState)}  # checkpoints of older versions carry more
        state = RunState(**{k: v for k, v in ckpt["state"].items() if k in known})
        saved.update(step=state.step, steps=steps)
        log(f"  resumed at step {state.step}/{steps}")
    started, wall_before = time.perf_counter(), state.wall_s

    def wall() -> float:  # seconds since the run began, over every (re)start
        return wall_before + time.perf_counter() - started

    use_autocast = tc.autocast if tc.autocast is not None else device.type == "cuda"
    ctx = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_autocast
           else (lambda: torch.autocast(device.type, enabled=False)))
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
    fwd = wrapped
    if tc.compiled:
        fwd = (compile_blocks(model, tc.compile_backend, call=wrapped)
               if tc.compile_scope == "blocks" else torch.compile(wrapped, backend=tc.compile_backend))

    def next_batch():  # the global batch, from the generator every rank shares; this rank's rows
        x, y = corpus.batch("train", tc.batch_size, seq_len, generator=data_gen, device=device)
        return x[local], y[local]

    def next_fixed_batch() -> torch.Tensor:  # the same validation batch at every measurement
        gen = torch.Generator().manual_seed(20_000 + tc.seed)
        return corpus.batch("val", tc.batch_size, seq_len, generator=gen, device=device)[0]

    def profile(tag: str) -> None:
        if profiler is not None:  # under torchrun each rank probes its rows; the probe sums them
            gen = torch.Generator().manual_seed(30_000 + tc.seed)

            def batch_fn():
                x, y = corpus.batch("val", tc.batch_size, seq_len, generator=gen, device=device)
                return x[local], y[local]
            profiler(model, tag, state.step, batch_fn)
            model.zero_grad(set_to_none=True)  # a profiler's backward must not leak into training

    def checkpoint() -> None:
        state.wall_s = wall()
        weights = weights_and_moments(model, opt, fsdp)  # under FSDP: gathered, every rank
        if world.main:  # every rank holds the same state: one writes it
            save_atomic({**weights, "data_gen": data_gen.get_state(), "state": asdict(state),
                         "model_config": mc.to_dict()}, ckpt_path)
        saved.update(step=state.step, steps=steps)

    def tokens_per_s(windows: list[tuple[int, int, float]]) -> float:
        seconds = sum(t for _, _, t in windows)
        return sum(n for _, n, _ in windows) * tc.batch_size * seq_len / seconds if seconds else math.nan

    def record(status: str, reason: str = "", divergence_step: int | None = None) -> dict[str, Any]:
        """The run record (result.json), written whatever the status."""
        first_train, final_train = train_loss_ends(state.train_loss)
        final_val = state.val_loss[-1][1] if state.val_loss and status != "diverged" else math.nan
        speed, flops = tokens_per_s(state.windows), flops_per_token(model)
        result = {
            **{k: v for k, v in mc.to_dict().items() if k in ("scheme", "depth", "width", "experts", "top_k")},
            "status": status, "tokens": state.step * tc.batch_size * seq_len, "steps": state.step,
            "planned_steps": steps, "final_val_bpb": final_val / math.log(2),
            "final_val_loss": final_val, "first_train_loss": first_train,
            "final_train_loss": final_train, "diverged": status == "diverged",
            "divergence_step": divergence_step, "divergence_reason": reason if status == "diverged" else "",
            "stall_reason": reason if status == "stalled" else "", "wall_s": wall(),
            "log_s": runlog.spent, "log_setup_s": runlog.setup, "tokens_per_s": speed,
            "mfu": speed * flops / peak_flops(device), "flops_per_token": flops,
            "train_loss": state.train_loss, "val_loss": state.val_loss, "updates": state.updates,
            "timed_windows": state.windows, "compiled": tc.compiled, "settings": settings,
            "environment": env,
        }
        if world.main:
            (run_dir / "result.json").write_text(json.dumps(result, allow_nan=True))
        return result

    format_interval = tqdm.format_interval  # h:mm:ss, as the bar shows it
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss on the device) since the last sync
    timed_from = state.step + tc.timing_warmup  # steps before it include compiling
    window_t0 = None

    agreed = {"cut": False, "stop": False}  # under torchrun: what the ranks agreed at the last sync

    def read_losses() -> str:
        """The one host sync of a window: check each step's loss in order; a reason if diverged.
        Under torchrun every rank syncs at the same steps: the losses become the global batch's
        (the mean of the ranks' slices) and a deadline or Ctrl-C seen by any rank stops all."""
        nonlocal window_t0
        losses = torch.stack([l.float() for _, l in pending]) if pending else torch.zeros(0, device=device)
        if world.size > 1:
            flags = torch.tensor([float(past(deadline)), float(stop["set"])], device=device)
            shared = all_sum(torch.cat([losses / world.size, flags]), world)
            losses = shared[:-2]
            agreed.update(cut=bool(shared[-2] > 0), stop=bool(shared[-1] > 0))
        values = losses.tolist()
        if window_t0 is not None and pending and pending[0][0] >= timed_from:
            state.windows.append((pending[0][0], len(pending), time.perf_counter() - window_t0))
        window_t0 = None
        steps_read = [s for s, _ in pending]
        pending.clear()
        for step, value in zip(steps_read, values):
            state.train_loss.append((step, value))
            runlog.train(step, value, lr_at(step, steps, tc), wall())
            reason = divergence(step, value)
            state.loss_ema = value if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * value
            if on_step is not None:
                on_step(step, value)
            if reason:
                return reason
        if values:
            runlog.sync(state.step, values[-1], lr_at(state.step - 1, steps, tc),
                        tokens_per_s(state.windows[-4:]))
        return ""

    def divergence(step: int, value: float) -> str:
        if not math.isfinite(value):
            return f"loss {value} at step {step}"
        if value > tc.spike_factor * math.log(mc.vocab):
            return (f"loss {value:.3f} at step {step} is above {tc.spike_factor} × ln(vocab) = "
                    f"{tc.spike_factor * math.log(mc.vocab):.3f}, the loss of a uniform guess")
        if state.loss_ema is not None and step >= tc.spike_after and value > tc.spike_factor * state.loss_ema:
            return (f"loss {value:.3f} at step {step} is above {tc.spike_factor} × its running "
                    f"mean {state.loss_ema:.3f}")
        return ""

    def evaluation_line() -> str:
        done, elapsed = state.step, wall()
        eta = elapsed / max(1, done) * (steps - done)  # the run's pace so far, evaluations included
        recent = [v for _, v in state.train_loss[-tc.log_every:]]
        return (f"  step {done}/{steps}  train {math.fsum(recent) / len(recent):.3f}  val "
                f"{state.val_loss[-1][1]:.3f} nats  lr {lr_at(done - 1, steps, tc):.2e}  "
                f"{rate_text(tokens_per_s(state.windows[-4:]))}  "
                f"[{format_interval(elapsed)}<{format_interval(eta)}]")

    runlog = (RunLog(run_dir, steps, state.step, tc.batch_size * seq_len, tc.log_every,
                     tc.tensorboard, position,
                     [v for s, v in state.train_loss if s >= state.step - state.step % tc.log_every])
              if world.main else NullRunLog())
    try:
        reason, divergence_step = "", None
        # never a silent eager fallback; compiled by block, a scheme whose blocks branch on l
        # (Mix-LN, LNS) needs a graph per block
        limit = torch._dynamo.config.recompile_limit
        if tc.compile_scope == "blocks":
            limit = max(limit, mc.depth + 8)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=limit):
            while state.step < steps:
                step = state.step
                snapshot = None
                if step in profile_at:
                    profile("init" if step == 0 else f"step{step}")
                    snapshot = snapshot_blocks(model, next_fixed_batch())
                if window_t0 is None:
                    window_t0 = time.perf_counter()
                set_lr(opt, lr_at(step, steps, tc))
                x, y = next_batch()
                with ctx():
                    _, loss = fwd(x, y)
                loss.backward()
                if tc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                pending.append((step, loss.detach()))
                state.step += 1
                if snapshot is not None:
                    state.updates += [(step, i, u) for i, u in enumerate(update_sizes(model, snapshot))]
                    window_t0 = None  # measuring is not training: this window is not timed
                # sync only where the host needs the losses: every check_every steps, and before
                # anything that reads, measures or saves the state
                if (len(pending) >= tc.check_every or state.step == steps or state.step == timed_from
                        or snapshot is not None or step in eval_at or state.step in ckpt_at
                        or state.step in profile_at):
                    reason = read_losses()
                    if reason:
                        divergence_step = state.train_loss[-1][0]
                        log(f"  diverged: {reason}")
                        break
                if step in eval_at:
                    val = evaluate(model, corpus, tc, seq_len, ctx, world)
                    state.val_loss.append((step, val))
                    runlog.val(state.step, val, lr_at(step, steps, tc), wall())
                    log(evaluation_line())
                # where the host looked (under torchrun: as the ranks agreed there)
                cut = not pending and state.step < steps and (
                    agreed["cut"] if world.size > 1 else past(deadline))
                if state.step in ckpt_at or cut:
                    checkpoint()
                if cut:
                    record("cut")
                    raise Cut(f"cut at step {state.step}/{steps}; checkpoint saved")
                stopping = (not pending and agreed["stop"]) if world.size > 1 else stop["set"]
                if stopping and state.step < steps:  # Ctrl-C: read the losses, checkpoint, stop
                    reason = read_losses()
                    if reason:
                        divergence_step = state.train_loss[-1][0]
                        log(f"  diverged: {reason}")
                        break
                    checkpoint()
                    record("cut")
                    raise Interrupted(f"{run_dir.name} stopped at step {state.step}/{steps}, where "
                                      "its checkpoint is kept")
        diverged = divergence_step is not None
        if not diverged and steps in profile_at:
            profile("end")
        if not diverged:
            reason = stall_reason(state.train_loss, steps, tc,
                                  corpus.unigram_bits("train") * math.log(2))
        checkpoint()
    finally:
        runlog.close(state.step, lr_at(max(0, state.step - 1), steps, tc), wall())
    status = "diverged" if diverged else "stalled" if reason else "ok"
    result = record(status, reason, divergence_step)
    if stop["set"]:  # Ctrl-C came as the run finished (or diverged): it is kept whole
        raise Interrupted(f"{run_dir.name} finished ({state.step}/{steps} steps)")
    return result
