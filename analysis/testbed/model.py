"""The testbed: a Transformer whose blocks are schemes executed with torch modules (decoder-only by
default; ``attention="bidirectional"`` or ``"uniform"`` make it an encoder, see Attention).

Module names are stable: ``tok_embed``, ``pos_embed``, ``blocks.{i}`` (i = l - 1, zero-based)
with ``blocks.{i}.norms.{k}``, ``blocks.{i}.attns.{k}``, ``blocks.{i}.ffns.{k}`` in the order the
scheme calls them, ``final_norm`` (``nn.Identity`` where the scheme has none) and ``head``.
``blocks.{i}.output_norm`` is the norm whose output is the block output (None for pre-norm
blocks): its input is the aggregate just before the norm.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from theory.schemes import Scheme, block_structure, get_scheme
from theory.shape import Shape

# standard: every weight N(0, σ²/fan_in), one learning rate; mup: µP (analysis.testbed
# .parametrization); mup-nomult: µP without the readout's 1/width_mult output multiplier, a
# deliberately broken µP (its logits grow with width), which `coordcheck` must flag
PARAMETRIZATIONS = ("standard", "mup", "mup-nomult")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# where modules are created: None (torch's default) or, while build_model builds, meta
_BUILD_DEVICE: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar(
    "build_device", default=None)


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Shape):
    """Everything that fixes a testbed model (and the theory evaluated against it): the shared
    Shape (width, heads, ffn, norm, sigma, embed_std, experts, top_k, attention) and what is the
    model's own."""

    scheme: str = "pre"
    depth: int = 12
    max_seq_len: int = 256
    vocab: int = 256
    ffn_hidden: int | None = None  # default 4·width (gelu, relu) or ⌈8·width/3⌉ (swiglu)
    aux_loss_coef: float = 0.01
    dtype: str = "float32"
    scheme_params: dict[str, Any] = field(default_factory=dict)
    # the usual nanoGPT options, off by default (the theory is at init, without them)
    tie_embeddings: bool = False  # the LM head reuses the token embedding, read out × 1/√width
    dropout: float = 0.0  # on attention weights, sublayer outputs and the embedding, in training
    # "standard" (today's) or "mup" (analysis.testbed.parametrization); base_width: the width at
    # which mup equals standard (its width multiplier is width / base_width)
    parametrization: str = "standard"
    base_width: int = 64

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if not (isinstance(self.depth, int) and self.depth >= 1):
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        get_scheme(self.scheme).resolve(self.depth, **self.scheme_params)
        self.validate_shape()
        checks = [
            (self.dtype in DTYPES, f"unknown dtype '{self.dtype}' (known: {', '.join(DTYPES)})"),
            (self.max_seq_len >= 1 and self.vocab >= 1, "max_seq_len and vocab must be >= 1"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.parametrization in PARAMETRIZATIONS, f"unknown parametrization "
             f"'{self.parametrization}' (known: {', '.join(PARAMETRIZATIONS)})"),
            (self.base_width >= 1, f"base_width must be >= 1, got {self.base_width}"),
            (self.parametrization == "standard" or not (self.experts or self.tie_embeddings),
             f"parametrization {self.parametrization} covers dense models with an untied head "
             "(no MoE router rule, no tied embeddings)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def width_mult(self) -> float:
        """µP's width multiplier width / base_width (1 under the standard parametrization)."""
        return self.width / self.base_width if self.parametrization != "standard" else 1.0

    @property
    def attn_scale(self) -> float | None:
        """The attention logits' scale: None (1/√d_head) or, under mup, √(base d_head)/d_head."""
        if self.parametrization == "standard":
            return None
        return math.sqrt(self.base_width / self.heads) / (self.width / self.heads)

    @property
    def hidden(self) -> int:
        """The FFN hidden width."""
        if self.ffn_hidden:
            return self.ffn_hidden
        return math.ceil(8 * self.width / 3) if self.ffn == "swiglu" else 4 * self.width

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (float parameters only)."""
        return asdict(self)


def init_linear(layer: nn.Linear, sigma: float, gain: float = 1.0, lr: float = 1.0) -> nn.Linear:
    """Weights ~ N(0, (gain·sigma)^2 / fan_in), no bias; the std is kept for ``init_weights``,
    the scheme's learning-rate multiplier ``lr`` for the optimizer (parametrization)."""
    layer.init_std = gain * sigma / math.sqrt(layer.in_features)
    layer.lr_gain = lr
    if not layer.weight.is_meta:  # on meta (build_model) there is nothing to draw yet
        nn.init.normal_(layer.weight, std=layer.init_std)
    return layer


def _linear(d_in: int, d_out: int, sigma: float, gain: float = 1.0, lr: float = 1.0) -> nn.Linear:
    return init_linear(nn.Linear(d_in, d_out, bias=False, device=_BUILD_DEVICE.get()), sigma, gain,
                       lr)


class Attention(nn.Module):
    """Multi-head attention of kind ``cfg.attention``; ``value_gain``/``out_gain`` scale the V and
    O init, ``lr``/``out_lr`` the learning rates of Q, K, V and of O.

    causal: softmax over keys s ≤ t; bidirectional: over all T keys (an encoder). uniform: every
    token gets the plain mean of the values over all T tokens, computed directly, so the weights
    stay exactly uniform through training (zero q/k weights would not: they train); the module has
    no q, k projections then, and no attention-weight dropout (only the output dropout).
    Both non-causal kinds see the token the LM head predicts: meant for init analyses (and
    encoders), not for next-token training.
    """

    def __init__(self, cfg: ModelConfig, value_gain: float = 1.0, out_gain: float = 1.0,
                 lr: float = 1.0, out_lr: float = 1.0):
        super().__init__()
        d, s = cfg.width, cfg.sigma
        self.heads, self.dropout, self.kind = cfg.heads, cfg.dropout, cfg.attention
        self.scale = cfg.attn_scale
        if self.kind != "uniform":
            self.q, self.k = _linear(d, d, s, lr=lr), _linear(d, d, s, lr=lr)
        self.v, self.o = _linear(d, d, s, value_gain, lr), _linear(d, d, s, out_gain, out_lr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        p = self.dropout if self.training else 0.0
        if self.kind == "uniform":  # W_o W_v x̄, the same for every token (linear: mean first)
            y = self.o(self.v(x).mean(1, keepdim=True)).expand(B, T, D).contiguous()
        else:
            q, k, v = (m(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)
                       for m in (self.q, self.k, self.v))
            att = F.scaled_dot_product_attention(q, k, v, is_causal=self.kind == "causal",
                                                 dropout_p=p, scale=self.scale)
            y = self.o(att.transpose(1, 2).reshape(B, T, D))
        return F.dropout(y, p, True) if p else y


class MLP(nn.Module):
    """Two-layer MLP (GELU, ReLU) or SwiGLU; ``in_gain``/``out_gain`` scale the init,
    ``lr``/``out_lr`` the learning rates of the input and output projections."""

    def __init__(self, cfg: ModelConfig, in_gain: float = 1.0, out_gain: float = 1.0,
                 lr: float = 1.0, out_lr: float = 1.0):
        super().__init__()
        d, h, s = cfg.width, cfg.hidden, cfg.sigma
        self.kind = cfg.ffn
        self.up = _linear(d, h, s, in_gain, lr)
        self.gate = _linear(d, h, s, in_gain, lr) if cfg.ffn == "swiglu" else None
        self.down = _linear(h, d, s, out_gain, out_lr)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.up(x)
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * u
        else:
            h = F.gelu(u) if self.kind == "gelu" else F.relu(u)
        y = self.down(h)
        return F.dropout(y, self.dropout, True) if self.dropout and self.training else y


class MoE(nn.Module):
    """Top-k mixture of MLPs with a softmax router (top-k weights renormalized to sum 1).

    After each forward, ``aux_loss`` holds the Switch load-balancing loss
    E·Σ_e f_e·P_e (f_e: share of routing slots sent to expert e, P_e: mean router
    probability; 1 when balanced; Fedus et al. 2021, arXiv 2101.03961) and ``last_topk``
    the chosen experts per token.

    Three dispatches compute the same mixture (tests/test_moe_dispatch.py):
    - grouped: the routing slots sorted by expert and every expert's matmul in one grouped GEMM
      (``F.grouped_mm``, bf16: under bf16 autocast or for a bf16 model, widths divisible by 8).
      Static shapes, no host sync, no graph break: what training on a GPU runs.
    - dense: under torch.compile otherwise, every expert on every token, weighted by the
      top-k weights (zero for the others): exact and static, E/k times the expert FLOPs.
    - loop: eager otherwise, each expert on its own tokens (``nonzero``): exact, the float32 /
      float64 analyses' path.
    """

    def __init__(self, cfg: ModelConfig, in_gain: float = 1.0, out_gain: float = 1.0,
                 lr: float = 1.0, out_lr: float = 1.0):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = _linear(cfg.width, cfg.experts, cfg.sigma)
        self.experts = nn.ModuleList(MLP(cfg, in_gain, out_gain, lr, out_lr)
                                     for _ in range(cfg.experts))
        self.aux_loss = torch.zeros(())
        self.last_topk = torch.zeros(0, cfg.top_k, dtype=torch.long)
        self.dispatch = "auto"  # or force "grouped", "dense", "loop" (tests, benchmarks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat)  # routed in at least float32: bf16 ties would flip experts
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = getattr(self, f"_{self.choose_dispatch(flat)}")(flat, weights, chosen)
        E = len(self.experts)
        share = F.one_hot(chosen, E).sum(1).float().mean(0) / self.top_k
        self.aux_loss = E * (share * probs.mean(0)).sum()
        self.last_topk = chosen.detach()
        return out.view_as(x)

    def choose_dispatch(self, flat: torch.Tensor) -> str:
        """'grouped', 'dense' or 'loop' for this input (see the class docstring)."""
        if self.dispatch != "auto":
            return self.dispatch
        kind = flat.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else flat.dtype
        mlp = self.experts[0]
        if dtype == torch.bfloat16 and mlp.up.in_features % 8 == 0 and mlp.up.out_features % 8 == 0:
            return "grouped"
        return "dense" if torch.compiler.is_compiling() else "loop"

    def _loop(self, flat, weights, chosen):
        out = torch.zeros_like(flat)
        weights = weights.to(flat.dtype)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, (expert(flat[token]) * weights[token, slot, None]).to(flat.dtype))
        return out

    def _dense(self, flat, weights, chosen):
        combine = torch.zeros(flat.shape[0], len(self.experts), dtype=weights.dtype,
                              device=flat.device).scatter(1, chosen, weights)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out = out + (combine[:, e, None] * expert(flat)).to(flat.dtype)
        return out

    def _grouped(self, flat, weights, chosen):
        expert_of_slot = chosen.flatten()
        order = expert_of_slot.argsort(stable=True)  # slots grouped by expert, static length N·k
        token = order // self.top_k
        counts = torch.zeros(len(self.experts), dtype=torch.int32, device=flat.device)
        counts.scatter_add_(0, expert_of_slot, torch.ones_like(expert_of_slot, dtype=torch.int32))
        ends = counts.cumsum(0, dtype=torch.int32)  # static shape [E]: bincount's is data-dependent

        def matmul(v: torch.Tensor, name: str) -> torch.Tensor:  # every expert's Linear at once
            w = torch.stack([getattr(e, name).weight for e in self.experts])  # [E, out, in]
            return F.grouped_mm(v, w.to(torch.bfloat16).transpose(1, 2), offs=ends)

        xs = flat[token].to(torch.bfloat16)
        u = matmul(xs, "up")
        kind = self.experts[0].kind
        if kind == "swiglu":
            h = F.silu(matmul(xs, "gate")) * u
        else:
            h = F.gelu(u) if kind == "gelu" else F.relu(u)
        y = matmul(h, "down") * weights.flatten()[order, None].to(torch.bfloat16)
        return torch.zeros_like(flat).index_add(0, token, y.to(flat.dtype))


def make_norm(cfg: ModelConfig, lr: float = 1.0) -> nn.Module:
    """The configured norm over the last dimension (identity affine at init); ``lr``: the
    scheme's learning-rate multiplier for its gain and bias (parametrization)."""
    if cfg.norm == "layernorm":
        norm = nn.LayerNorm(cfg.width, eps=1e-5, device=_BUILD_DEVICE.get())
    else:
        norm = nn.RMSNorm(cfg.width, eps=1e-5, device=_BUILD_DEVICE.get())
    norm.lr_gain = lr
    return norm


class _TorchOps:
    """The scheme vocabulary executed with one block's modules, in call order."""

    def __init__(self, block: "Block"):
        self.block = block
        self.used = {"norm": 0, "attn": 0, "ffn": 0}

    def _next(self, kind: str, modules: nn.ModuleList) -> nn.Module:
        i = self.used[kind]
        self.used[kind] += 1
        return modules[i]

    def norm(self, x, *, lr=1):
        return self._next("norm", self.block.norms)(x)

    def attn(self, x, *, value_gain=1, out_gain=1, lr=1, out_lr=1):  # applied when built
        return self._next("attn", self.block.attns)(x)

    def ffn(self, x, *, in_gain=1, out_gain=1, lr=1, out_lr=1):
        return self._next("ffn", self.block.ffns)(x)


class Block(nn.Module):
    """Block ``l`` of ``L``: the scheme's function run over this block's modules."""

    def __init__(self, scheme: Scheme, l: int, cfg: ModelConfig):
        super().__init__()
        self.scheme, self.l, self.L = scheme, l, cfg.depth
        self.params = {k: float(v) for k, v in scheme.resolve(cfg.depth, **cfg.scheme_params).items()}
        self.structure = block_structure(scheme, l, cfg.depth, self.params)
        ffn_cls = MoE if cfg.experts else MLP
        calls = self.structure.calls
        self.norms = nn.ModuleList(make_norm(cfg, **c.gains) for c in calls if c.kind == "norm")
        self.attns = nn.ModuleList(Attention(cfg, **c.gains) for c in calls if c.kind == "attn")
        self.ffns = nn.ModuleList(ffn_cls(cfg, **c.gains) for c in calls if c.kind == "ffn")

    @property
    def output_norm(self) -> nn.Module | None:
        """The norm whose output is the block output; its input is the pre-norm aggregate."""
        i = self.structure.output_norm
        return None if i is None else self.norms[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scheme.block(x, _TorchOps(self), l=self.l, L=self.L, **self.params)

    def extra_repr(self) -> str:
        return f"scheme={self.scheme.name}, l={self.l}, L={self.L}, params={self.params}"


class Testbed(nn.Module):
    """Token + position embedding, L scheme blocks, the scheme's final norm, LM head."""

    def __init__(self, cfg: ModelConfig, scheme: Scheme | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.scheme = scheme or get_scheme(cfg.scheme)
        d = cfg.width
        self.tok_embed = nn.Embedding(cfg.vocab, d, device=_BUILD_DEVICE.get())
        self.pos_embed = nn.Embedding(cfg.max_seq_len, d, device=_BUILD_DEVICE.get())
        self.blocks = nn.ModuleList(Block(self.scheme, l, cfg) for l in range(1, cfg.depth + 1))
        self.final_norm = make_norm(cfg) if self.scheme.final_norm else nn.Identity()
        # µP's readout (MuReadout): weights of variance σ²/base_width, output times 1/width_mult,
        # so the effective readout variance falls as 1/width² (Yang & Hu 2022, arXiv 2203.03466)
        self.head = _linear(d, cfg.vocab, cfg.sigma, math.sqrt(cfg.width_mult))
        self.output_mult = 1.0 if cfg.parametrization == "mup-nomult" else 1.0 / cfg.width_mult
        if cfg.tie_embeddings:
            # The tied head is the token embedding, drawn at the embedding's scale (std
            # embed_std/√2 a coordinate: the stream's q0 = embed_std², which the theory reads, is
            # left as it is), so its logits are read out times 1/√width, as T5 does with its tied
            # embedding. Without it a normalized stream read by a matrix of entries ~0.71 gives
            # logits of std ≈ √(width/2): a first loss of ~30 nats at width 128, not ln(vocab).
            # (nanoGPT/GPT-2 draw the shared matrix at std 0.02 instead; that would change q0.)
            self.head.weight = self.tok_embed.weight
            self.output_mult = 1.0 / math.sqrt(d)  # mup refuses tied heads: it was 1 here
        self.to(DTYPES[cfg.dtype])

    @torch.no_grad()
    def init_weights(self) -> None:
        """Draw every parameter afresh, in module order, from the current RNG of its device (in
        float32, then cast): linears N(0, init_std²), each embedding N(0, embed_std²/2), norms to
        identity."""
        def draw(w: torch.Tensor, std: float) -> None:
            # in float32 whatever the model's dtype: one seed, the same weights up to rounding
            w.copy_(nn.init.normal_(torch.empty(w.shape, device=w.device), std=std))

        done = set()
        for m in self.modules():
            if m is self.head and self.cfg.tie_embeddings:
                continue  # its weight is the token embedding's, drawn with it
            if isinstance(m, nn.Linear):
                draw(m.weight, m.init_std)
            elif isinstance(m, nn.Embedding):  # each half of the embedding's second moment
                draw(m.weight, self.cfg.embed_std / math.sqrt(2))
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.reset_parameters()
            else:
                continue
            done.update(id(p) for p in m.parameters(recurse=False))
        missed = [n for n, p in self.named_parameters() if id(p) not in done]
        if missed:
            raise RuntimeError(f"init_weights does not know how to draw {', '.join(missed)}")

    @property
    def moe_layers(self) -> list[MoE]:
        """Every MoE sublayer, in order."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                blocks: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, vocab] and, given targets, cross-entropy (+ MoE aux loss · coef).
        ``blocks``: callables run in place of ``self.blocks`` (compiled wrappers of them)."""
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.tok_embed(idx) + self.pos_embed(torch.arange(T, device=idx.device))
        if self.cfg.dropout and self.training:
            x = F.dropout(x, self.cfg.dropout, True)
        for block in self.blocks if blocks is None else blocks:
            x = block(x)
        logits = self.head(self.final_norm(x))
        if self.output_mult != 1.0:
            logits = logits * self.output_mult
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        if self.cfg.experts:
            loss = loss + self.cfg.aux_loss_coef * self.aux_loss()
        return logits, loss

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE load-balancing losses of the last forward (0 for a dense model)."""
        losses = [m.aux_loss for m in self.moe_layers]
        return torch.stack(losses).sum() if losses else torch.zeros(())


def build_model(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> Testbed:
    """A testbed at initialization, deterministic in ``seed`` on a given device.

    Built without storage (meta device), allocated on ``device`` and drawn there once, so a deep,
    wide model never passes through the CPU (the same seed draws other values on a GPU).
    """
    device = torch.device(device)
    token = _BUILD_DEVICE.set(torch.device("meta"))  # factory arguments: no dispatch mode, fast
    try:
        model = Testbed(cfg)
    finally:
        _BUILD_DEVICE.reset(token)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives every module fresh storage: tie them again
        model.head.weight = model.tok_embed.weight
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.init_weights()
    return model


def compile_blocks(model: Testbed, backend: str = "inductor", call: nn.Module | None = None):
    """``model``'s forward with each block under torch.compile ("regional compilation").

    Blocks of one structure share one compiled graph (Dynamo treats parameters as inputs), so
    compile time does not grow with depth, as compiling the whole unrolled model's does. The
    model itself stays uncompiled: probes and measurements run it eagerly. ``call``: a wrapper
    of ``model`` to call instead (DistributedDataParallel), which passes the blocks on.
    """
    compiled = [torch.compile(b, backend=backend) for b in model.blocks]
    run = model if call is None else call
    return lambda idx, targets=None: run(idx, targets, blocks=compiled)
