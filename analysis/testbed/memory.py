"""How much memory a testbed needs, known before it is built: so a run that cannot fit is refused
in one line instead of dying with a traceback minutes later.

Parameters and gradients are counted exactly. Activations saved for the backward pass are
counted by running the model's forward on the meta device (shapes without storage, no compute)
under ``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd keeps. A
tensor saved by several operations is counted once; a view saved beside its base is counted again,
so the figure errs high. A top-k MoE block is counted as a dense block whose FFN is top_k times
as wide: the tokens its experts see add up to top_k per token (the routing itself is
data-dependent and cannot run on meta).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from analysis.testbed.model import DTYPES, Block, ModelConfig, Testbed
from theory.schemes import block_structure, get_scheme


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a forward/backward (and, training, an AdamW step) needs: the parts and their sum."""

    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        """All parts together."""
        return self.params + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        """'≈ 12.3 GB (weights 1.0 GB, gradients 1.0 GB, optimizer 2.0 GB, activations 8.3 GB)'."""
        parts = [("weights", self.params), ("gradients", self.grads)]
        if self.optimizer:
            parts.append(("optimizer", self.optimizer))
        parts.append(("activations", self.activations))
        return f"≈ {size(self.total)} ({', '.join(f'{name} {size(n)}' for name, n in parts)})"


def size(n: float) -> str:
    """Bytes in GB, MB or kB, three significant digits."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 1e3:.3g} kB"


def _saved_bytes(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes autograd saves in one forward of ``module`` (on meta; each tensor counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(id(t), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(seen.values())


def _blocks_by_structure(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(a block index l, how many blocks share its structure) per distinct block structure."""
    s = get_scheme(cfg.scheme)
    params = {k: float(v) for k, v in s.resolve(cfg.depth, **cfg.scheme_params).items()}
    groups: dict[str, list[int]] = {}
    for l in range(1, cfg.depth + 1):
        key = repr(block_structure(s, l, cfg.depth, params).calls)
        groups.setdefault(key, []).append(l)
    return [(ls[0], len(ls)) for ls in groups.values()]


def estimate(cfg: ModelConfig, batch: int, seq_len: int, training: bool = False) -> MemoryEstimate:
    """Memory of a forward/backward of ``cfg`` at [batch, seq_len]; ``training`` adds AdamW's two
    float32 moments per parameter. Blocks of one structure are measured once, so a depth-1024
    estimate takes as long as a shallow one."""
    return _estimate(cfg, batch, seq_len, training, _blocks_by_structure(cfg))


QUICK_DEPTH = 2048  # deeper: a sampled estimate first (finding the structures of 10⁵ blocks takes s)


def quick_estimate(cfg: ModelConfig, batch: int, seq_len: int,
                   training: bool = False) -> MemoryEstimate:
    """``estimate`` with the blocks at a few sampled indices l standing for all L blocks:
    milliseconds at any depth, and close to the exact figure where blocks differ little (every
    built-in scheme). It refuses a very deep model at once; one that may fit is estimated exactly."""
    L = cfg.depth
    sample = sorted({1, 2, L // 4, L // 2, 3 * L // 4, L - 1, L} - {0})
    return _estimate(cfg, batch, seq_len, training, [(l, L / len(sample)) for l in sample])


def _estimate(cfg: ModelConfig, batch: int, seq_len: int, training: bool,
              blocks: list[tuple[int, float]]) -> MemoryEstimate:
    """The estimate with block l counted ``count`` times, for each (l, count) of ``blocks``."""
    act_cfg = replace(cfg, experts=0, ffn_hidden=cfg.hidden * cfg.top_k) if cfg.experts else cfg
    dtype = DTYPES[cfg.dtype]
    n_params = activations = 0
    with torch.device("meta"):
        shallow = Testbed(replace(act_cfg, depth=1))  # embeddings, final norm and head
        idx = torch.zeros(batch, seq_len, dtype=torch.long)
        x = torch.zeros(batch, seq_len, cfg.width, dtype=dtype, requires_grad=True)
        activations += _saved_bytes(shallow, idx, idx) - _saved_bytes(shallow.blocks[0], x)
        n_params += sum(p.numel() for p in shallow.parameters())
        n_params -= sum(p.numel() for p in shallow.blocks[0].parameters())
        s = get_scheme(cfg.scheme)
        for l, count in blocks:
            block = Block(s, l, cfg)
            n_params += count * sum(p.numel() for p in block.parameters())
            act_block = block if act_cfg is cfg else Block(s, l, act_cfg)
            activations += count * _saved_bytes(act_block.to(dtype), x)
    n_params, activations = round(n_params), round(activations)
    width = torch.empty((), dtype=dtype).element_size()
    return MemoryEstimate(params=n_params * width, grads=n_params * width,
                          optimizer=8 * n_params if training else 0, activations=activations)


def check_all_fit(configs: list[ModelConfig], batch: int, available: float, where: str,
                  training: bool = False) -> None:
    """Refuse, naming the first that does not fit and the depths that do, any of ``configs``
    whose estimate exceeds what ``where`` has (see check_fits)."""
    too_big = []
    for cfg in configs:
        try:
            check_fits(cfg, batch, cfg.max_seq_len, available, where, training)
        except ValueError as e:
            too_big.append((cfg, str(e)))
    if too_big:
        fits = sorted({c.depth for c in configs} - {c.depth for c, _ in too_big})
        hint = f"; depths that fit: {','.join(map(str, fits))}" if fits else ""
        raise ValueError(f"{too_big[0][1]}{hint} (or lower --batch / --seq-len)")


def depths_that_fit(configs: list[ModelConfig], batch: int, available: float,
                    fraction: float = 0.9) -> list[int]:
    """The depths at which every one of ``configs`` fits in ``fraction`` of ``available`` bytes."""
    too_big = {c.depth for c in configs
               if estimate(c, batch, c.max_seq_len).total > fraction * available}
    return sorted({c.depth for c in configs} - too_big)


def floor_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> int:
    """A floor under any estimate, by arithmetic alone: the token embedding, four width² matrices
    a block (attention's), and one activation a block and the embedding's."""
    width = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    weights = cfg.width * (cfg.vocab + cfg.depth * 4 * cfg.width)
    return width * (weights + batch * seq_len * cfg.width * (cfg.depth + 1))


def check_fits(cfg: ModelConfig, batch: int, seq_len: int, available: int, where: str,
               training: bool = False, fraction: float = 0.9) -> MemoryEstimate:
    """The estimate, or ValueError naming it and the memory ``where`` has (``fraction`` of
    ``available`` is usable: allocator fragmentation and the framework's own buffers)."""
    floor = floor_bytes(cfg, batch, seq_len)
    if floor > fraction * available:  # before any tensor, even on "meta", whose sizes overflow
        raise ValueError(f"{cfg.scheme} at depth {cfg.depth}, width {cfg.width}, batch {batch} × "
                         f"{seq_len} needs at least {size(floor)} (its embedding and block "
                         f"weights and one activation a block) but {where} has "
                         f"{size(available)} free")
    est = None
    if cfg.depth > QUICK_DEPTH:  # refuse a far too deep model in milliseconds
        est = quick_estimate(cfg, batch, seq_len, training)
        if est.total <= 2 * fraction * available:
            est = None  # not clearly too big: the exact figure decides
    est = est or estimate(cfg, batch, seq_len, training)
    if est.total > fraction * available:
        raise ValueError(f"{cfg.scheme} at depth {cfg.depth}, width {cfg.width}, batch {batch} × "
                         f"{seq_len} needs {est.describe()} but {where} has "
                         f"{size(available)} free")
    return est


# What a time estimate assumes: throughputs at the top of what the hardware does, so that the
# estimate is a floor and work refused by it could not have finished in time on any device of
# the type: training FLOP/s (6 · parameters FLOPs per token, forward and backward; an H200's dense
# bf16 peak is 9.9e14; 2 CPU cores train a small testbed at ~7e10) and each block's fixed cost per
# step (dispatch: 2e-4 s measured for a width-4 block's forward and backward on a CPU).
THROUGHPUT = {"cpu": 1e11, "cuda": 1e15}
BLOCK_SECONDS = 2e-5
TIME_LIMIT = 7 * 24 * 3600.0  # work estimated longer is refused before it starts


def duration(seconds: float) -> str:
    """Seconds as s, min, h, days or years, three significant digits."""
    for unit, scale in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"


def work_estimate(cfg: ModelConfig, tokens: int, batch: int, device: str = "cpu"
                  ) -> tuple[float, float]:
    """(seconds at least, FLOPs) of forward and backward passes of ``cfg`` over ``tokens``
    tokens in batches of ``batch`` × cfg.max_seq_len on ``device``, at THROUGHPUT plus
    BLOCK_SECONDS a block and step (parameters as quick_estimate counts them: milliseconds at
    any depth; a MoE's every expert, as if all ran)."""
    width = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    n_params = quick_estimate(cfg, 1, 1).params / width
    flops = 6.0 * n_params * tokens
    steps = -(-tokens // max(1, batch * cfg.max_seq_len))
    rate = THROUGHPUT.get(torch.device(device).type, THROUGHPUT["cpu"])
    return flops / rate + steps * cfg.depth * BLOCK_SECONDS, flops


def check_time(configs: list[ModelConfig], tokens: int, batch: int, device: str = "cpu",
               limit: float = TIME_LIMIT, lower: str = "--tokens, --depth or --width") -> float:
    """The estimated seconds of the longest of ``configs`` (each over ``tokens`` tokens), or
    ValueError giving the estimate where it is over ``limit`` (default 7 days) and what to
    ``lower``."""
    estimates = [(*work_estimate(c, tokens, batch, device), c) for c in configs]
    seconds, flops, cfg = max(estimates, key=lambda e: e[0])
    if seconds > limit:
        rate = THROUGHPUT.get(torch.device(device).type, THROUGHPUT["cpu"])
        raise ValueError(f"{cfg.scheme} at depth {cfg.depth}, width {cfg.width} over {tokens:,} "
                         f"tokens would take at least {duration(seconds)} on {device} "
                         f"({flops:.3g} FLOPs at {rate:.0e} FLOP/s, and {BLOCK_SECONDS:g} s a "
                         f"block and step), over the limit of {duration(limit)}: lower {lower}")
    return seconds
