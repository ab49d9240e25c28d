"""Normalization schemes, each written once as a plain function of the block input.

A scheme's block is ``block(x, op, *, l, L, **params) -> y``. It may use only this
vocabulary, so that every interpreter (torch modules, sympy moment recurrences, the
structural trace below) can run the very same function:

- ``op.norm(v)``                                 a norm (LayerNorm or RMSNorm, chosen by the model)
- ``op.attn(v, value_gain=1, out_gain=1)``       causal multi-head attention; the gains scale the
                                                 init of the value and output projections
- ``op.ffn(v, in_gain=1, out_gain=1)``           the FFN (or MoE) sublayer; the gains scale the init
                                                 of its input and output projections
- ``lr=1, out_lr=1`` on either call              learning-rate multipliers of the sublayer's inner
                                                 matrices (q, k, v; up, gate) and of its output
                                                 projection (o; down), on top of the
                                                 parametrization's; the init theory ignores them
- ``op.norm(v, lr=1)``                           the same for the norm's gain and bias
- ``v + w``, ``c * v``, ``v * c``, ``v / c``     scaled add of values, ``c`` a constant
- constants: ``l`` (block index, 1..L), ``L`` (number of blocks), the scheme's parameters, and
  arithmetic on them (``l ** Fraction(-1, 2)``). Python control flow may branch on constants
  only (Mix-LN); an interpreter that keeps ``l`` symbolic evaluates such schemes per block.

Parameters are numbers or functions of ``L``; write fractional powers with ``Fraction`` so a
symbolic ``L`` stays exact (``(2 * L) ** Fraction(1, 4)``).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

import sympy

BlockFn = Callable[..., Any]
ParamRule = Any  # a number, or a function of L returning one


@dataclass(frozen=True)
class Scheme:
    """A named block function with its parameters, final-norm flag, formula and source."""

    name: str
    block: BlockFn
    formula: str
    source: str
    final_norm: bool
    params: dict[str, ParamRule] = field(default_factory=dict)
    notes: str = ""

    def resolve(self, L: Any, **overrides: ParamRule) -> dict[str, Any]:
        """Parameter values at depth ``L`` (an int, or a sympy symbol), overrides applied."""
        unknown = set(overrides) - set(self.params)
        if unknown:
            raise ValueError(
                f"scheme '{self.name}' has no parameter {', '.join(sorted(unknown))} "
                f"(its parameters: {', '.join(self.params) or 'none'})"
            )
        bad = [k for k, v in overrides.items() if isinstance(v, (int, float)) and not math.isfinite(v)]
        if bad:
            raise ValueError(f"scheme '{self.name}' parameter {bad[0]} must be finite, got {overrides[bad[0]]}")
        rules = {**self.params, **overrides}
        return {k: (rule(L) if callable(rule) else rule) for k, rule in rules.items()}

    def describe_params(self) -> dict[str, str]:
        """Each parameter's rule as a formula in L (sympy string form)."""
        L = sympy.Symbol("L", positive=True, integer=True)
        return {k: sympy.sstr(sympy.nsimplify(v) if isinstance(v, float) else sympy.sympify(v))
                for k, v in self.resolve(L).items()}

    def with_params(self, **overrides: ParamRule) -> "Scheme":
        """The same scheme with some parameter rules replaced."""
        self.resolve(1, **overrides)  # validates the names
        return Scheme(self.name, self.block, self.formula, self.source, self.final_norm,
                      {**self.params, **overrides}, self.notes)


SCHEMES: dict[str, Scheme] = {}


def register(s: Scheme, *, replace: bool = False) -> Scheme:
    """Add a scheme to the registry (ValueError if the name is taken and not ``replace``)."""
    if s.name in SCHEMES and not replace:
        raise ValueError(f"scheme '{s.name}' is already registered (pass replace=True)")
    SCHEMES[s.name] = s
    return s


def scheme(name: str, *, formula: str, source: str, final_norm: bool, notes: str = "",
           **params: ParamRule) -> Callable[[BlockFn], BlockFn]:
    """Decorator: register ``fn`` as scheme ``name``; keyword arguments are its parameters."""
    def wrap(fn: BlockFn) -> BlockFn:
        register(Scheme(name, fn, formula, source, final_norm, dict(params), notes), replace=True)
        return fn
    return wrap


def get_scheme(name: str) -> Scheme:
    """The registered scheme called ``name`` (ValueError naming the known ones otherwise)."""
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme '{name}' (known: {', '.join(SCHEMES)})")
    return SCHEMES[name]


# --- the schemes -------------------------------------------------------------------------


@scheme("post", formula="h = N(x + A(x)); y = N(h + F(h))", source="Vaswani et al. 2017",
        final_norm=False)
def post(x, op, *, l, L):
    h = op.norm(x + op.attn(x))
    return op.norm(h + op.ffn(h))


@scheme("pre", formula="h = x + A(N(x)); y = h + F(N(h)); final N after the stack",
        source="Xiong et al. 2020, arXiv 2002.04745", final_norm=True)
def pre(x, op, *, l, L):
    h = x + op.attn(op.norm(x))
    return h + op.ffn(op.norm(h))


def _span_beta(L):
    # Derived in theory/solve.py (span_beta_family; printed by `run_analysis.py theory`): the
    # output is normalized, so g_0/g_L = r(q_0)·r(β)^(L-1) with log r = κβ² + O(β⁴). For
    # β = c·L^(-γ), L·log r → κc²L^(1-2γ): bounded above and away from 0 iff γ ≥ 1/2, and only
    # γ = 1/2 keeps the blocks' total contribution O(1) (γ > 1/2: the stack fades to identity).
    # c = 1/√2: the 2L branch variances together match the skip's.
    return (2 * L) ** Fraction(-1, 2)


@scheme("span", formula="a = A(N(x)); f = F(N(x + a)); y = N(α·x + a + f); "
                        "ScaleInit: A and F output projections × β(L)",
        source="SpanNorm, arXiv 2601.22580 (reconstructed from the abstract; see DESIGN.md)",
        final_norm=False, alpha=1, beta=_span_beta,
        notes="Reconstruction: the paper's equations are not public. The skip spans the whole "
              "block, one PostNorm-style norm on the aggregate, ScaleInit β(L).")
def span(x, op, *, l, L, alpha, beta):
    return _spanning(x, op, alpha=alpha, beta=beta)


def _spanning(x, op, *, alpha, beta, lr=1, out_lr=1, norm_lr=1, out_norm_lr=1):
    # span's dataflow, shared by the readings that differ from it only in learning rates
    a = op.attn(op.norm(x, lr=norm_lr), out_gain=beta, lr=lr, out_lr=out_lr)
    f = op.ffn(op.norm(x + a, lr=norm_lr), out_gain=beta, lr=lr, out_lr=out_lr)
    return op.norm(alpha * x + a + f, lr=out_norm_lr)


# --- further readings of SpanNorm's abstract (issue 29; docs/span-readings.md) -------------------
# Each keeps "a clean residual connection that spans the entire transformer block" and reads
# "a PostNorm-style computation that normalizes the aggregated output" and "a principled scaling
# strategy [that] maintains bounded signal variance" differently. At init span_fwd, span_dlr and
# span_dlr_all are span itself; they differ in how a step moves them (theory/depth_orders.py).


@scheme("span_fwd", formula="a = β·A(N(x)); f = β·F(N(x + a)); y = N(x + a + f); "
                            "β(L) = (2L)^(-1/2) a forward branch multiplier",
        source="reading of arXiv 2601.22580's 'principled scaling strategy' as depth-µP's branch "
               "multiplier (Yang et al., arXiv 2310.02244)",
        final_norm=False, beta=_span_beta,
        notes="At init the same network as span; the multiplier also scales every update of the "
              "branch, which ScaleInit does not.")
def span_fwd(x, op, *, l, L, beta):
    a = beta * op.attn(op.norm(x))
    f = beta * op.ffn(op.norm(x + a))
    return op.norm(x + a + f)


@scheme("span_alt", formula="a = A(N(x)); f = F(N(x + a)); y = x + N(a + f); "
                            "ScaleInit: A and F output projections × β(L); final N after the stack",
        source="reading of arXiv 2601.22580's 'PostNorm-style computation that normalizes the "
               "aggregated output' as the norm of the aggregated branch output",
        final_norm=True, beta=_span_beta,
        notes="The skip is never normalized inside the stack, so the stream grows as PreNorm's; "
              "ScaleInit only sets the attention's share inside the FFN's input.")
def span_alt(x, op, *, l, L, beta):
    a = op.attn(op.norm(x), out_gain=beta)
    f = op.ffn(op.norm(x + a), out_gain=beta)
    return x + op.norm(a + f)


@scheme("span_dlr", formula="span's block; learning rates: A and F inner matrices × L^(-1/2), "
                            "output projections × L^(-1)",
        source="reading of arXiv 2601.22580's 'principled scaling strategy' as ScaleInit with "
               "depth-µP's Adam learning rates (Yang et al., arXiv 2310.02244), moved onto "
               "the init by Adam's scale symmetry",
        final_norm=False, alpha=1, beta=_span_beta,
        lr=lambda L: L ** Fraction(-1, 2), out_lr=lambda L: 1 / L,
        notes="Depth-µP for Adam multiplies each branch by 1/√L and its learning rate by 1/√L. "
              "Adam's update ignores a weight's scale, so the multiplier m on W_o is the same "
              "network as init × m with W_o's lr × m: ScaleInit (m ∝ 1/√L) with W_o's lr ∝ 1/L "
              "and the inner matrices' ∝ 1/√L. At init the same network as span.")
def span_dlr(x, op, *, l, L, alpha, beta, lr, out_lr):
    return _spanning(x, op, alpha=alpha, beta=beta, lr=lr, out_lr=out_lr)


@scheme("span_dlr_all", formula="span's block; learning rates: A and F inner matrices and the norms "
                                "before them × L^(-1/2), output projections and the output norm × L^(-1)",
        source="span_dlr with every block parameter's learning rate depth-scaled: the norms' gains "
               "and biases too (theory/depth_orders.py: at a fixed width their unscaled steps add "
               "up over L blocks)",
        final_norm=False, alpha=1, beta=_span_beta,
        lr=lambda L: L ** Fraction(-1, 2), out_lr=lambda L: 1 / L,
        notes="Each block parameter's step moves the stream by O(1/L): the inner norms' gains act "
              "through the β-scaled branch (× L^(-1/2)), the output norm's directly.")
def span_dlr_all(x, op, *, l, L, alpha, beta, lr, out_lr):
    return _spanning(x, op, alpha=alpha, beta=beta, lr=lr, out_lr=out_lr, norm_lr=lr,
                     out_norm_lr=out_lr)


@scheme("deepnorm", formula="h = N(α·x + A(x)); y = N(α·h + F(h)); "
                            "FFN, V and O projections × β",
        source="DeepNet, arXiv 2203.00555 (decoder-only constants)", final_norm=False,
        alpha=lambda L: (2 * L) ** Fraction(1, 4), beta=lambda L: (8 * L) ** Fraction(-1, 4))
def deepnorm(x, op, *, l, L, alpha, beta):
    h = op.norm(alpha * x + op.attn(x, value_gain=beta, out_gain=beta))
    return op.norm(alpha * h + op.ffn(h, in_gain=beta, out_gain=beta))


@scheme("b2t", formula="h = N(x + A(x)); y = N(h + F(h) + x)",
        source="Takase et al. 2023 (B2T connection)", final_norm=False)
def b2t(x, op, *, l, L):
    h = op.norm(x + op.attn(x))
    return op.norm(h + op.ffn(h) + x)


@scheme("peri", formula="h = x + N(A(N(x))); y = h + N(F(N(h))); final N after the stack",
        source="Peri-LN, arXiv 2502.02732 (= CogView's Sandwich-LN)", final_norm=True)
def peri(x, op, *, l, L):
    h = x + op.norm(op.attn(op.norm(x)))
    return h + op.norm(op.ffn(op.norm(h)))


@scheme("mixln", formula="blocks 1..⌊ρL⌋ are post, the rest pre; final N after the stack",
        source="Mix-LN, arXiv 2412.13795", final_norm=True, rho=Fraction(1, 4))
def mixln(x, op, *, l, L, rho):
    if l <= int(rho * L):  # branches on constants only: l and L are concrete here
        return post(x, op, l=l, L=L)
    return pre(x, op, l=l, L=L)


@scheme("lns", formula="h = x + A(N(x)/√l); y = h + F(N(h)/√l); final N after the stack",
        source="LayerNorm Scaling, arXiv 2502.05795", final_norm=True)
def lns(x, op, *, l, L):
    h = x + op.attn(op.norm(x) * l ** Fraction(-1, 2))
    return h + op.ffn(op.norm(h) * l ** Fraction(-1, 2))


# --- a structural interpretation: the block's dataflow, step by step -------------------------


LR_GAINS = ("lr", "out_lr")  # the vocabulary's learning-rate gains; every other gain scales the init


@dataclass(frozen=True)
class Call:
    """One vocabulary call of a block: its kind ('norm', 'attn', 'ffn'), index and gains."""

    kind: str
    index: int
    gains: dict[str, float]

    @property
    def init_gains(self) -> dict[str, float]:
        """The gains that scale the init (what the init theory reads)."""
        return {k: v for k, v in self.gains.items() if k not in LR_GAINS}


class _Traced:
    """A value of the trace: the index of the step that made it (0 = the block input)."""

    __slots__ = ("rec", "step")

    def __init__(self, rec: "_Tracer", step: int):
        self.rec, self.step = rec, step

    def __add__(self, other: "_Traced") -> "_Traced":
        if not isinstance(other, _Traced):
            raise TypeError("a scheme may add values only to values (use c * v for scaling)")
        return self.rec.record(("add", self.step, other.step))

    def __mul__(self, c: Any) -> "_Traced":
        if isinstance(c, _Traced):
            raise TypeError("a scheme may multiply a value only by a constant")
        return self.rec.record(("scale", self.step, float(c)))

    __rmul__ = __mul__

    def __truediv__(self, c: Any) -> "_Traced":
        return self * (1 / c)


class _Tracer:
    """The ``op`` of the structural interpretation: records every vocabulary call, sum and
    scaling with its operands and constants as hashable steps (kind, operand step(s), constants).
    Call steps carry their gains as ((name, value), ...) in keyword order."""

    __slots__ = ("steps",)

    def __init__(self) -> None:
        self.steps: list[tuple] = [("input",)]

    def record(self, step: tuple) -> _Traced:
        self.steps.append(step)
        return _Traced(self, len(self.steps) - 1)

    def _call(self, kind: str, v: _Traced, gains: tuple) -> _Traced:
        if not isinstance(v, _Traced):
            raise TypeError(f"op.{kind} takes a value, got {type(v).__name__}")
        return self.record((kind, v.step, gains))

    def norm(self, v, *, lr=1):
        return self._call("norm", v, (("lr", float(lr)),))

    def attn(self, v, *, value_gain=1, out_gain=1, lr=1, out_lr=1):
        return self._call("attn", v, (("value_gain", float(value_gain)),
                                      ("out_gain", float(out_gain)),
                                      ("lr", float(lr)), ("out_lr", float(out_lr))))

    def ffn(self, v, *, in_gain=1, out_gain=1, lr=1, out_lr=1):
        return self._call("ffn", v, (("in_gain", float(in_gain)), ("out_gain", float(out_gain)),
                                     ("lr", float(lr)), ("out_lr", float(out_lr))))


def _trace(s: Scheme, l: int, L: int, params: dict[str, Any]) -> tuple[list[tuple], int]:
    """Run block ``l`` of ``L`` over traced values: its steps and the step that makes the output."""
    rec = _Tracer()
    out = s.block(_Traced(rec, 0), rec, l=l, L=L, **params)
    if not isinstance(out, _Traced):
        raise TypeError(f"scheme '{s.name}' must return a value built from its input")
    return rec.steps, out.step


@dataclass(frozen=True)
class BlockStructure:
    """The calls a block makes, in order, which norm (if any) produces its output, and which norms
    sit on a branch's input (pre-branch) or on its output before the residual add (post-branch)."""

    calls: tuple[Call, ...]
    output_norm: int | None
    pre_branch_norms: tuple[int, ...] = ()
    post_branch_norms: tuple[int, ...] = ()

    def count(self, kind: str) -> int:
        """How many calls of ``kind`` the block makes."""
        return sum(c.kind == kind for c in self.calls)


def block_structure(s: Scheme, l: int, L: int, params: dict[str, Any]) -> BlockStructure:
    """Block ``l`` of ``L`` of scheme ``s``: its calls in order (what the torch side builds)."""
    steps, out = _trace(s, l, L, params)
    calls: dict[int, Call] = {}  # step index → call
    counts = {"norm": 0, "attn": 0, "ffn": 0}
    for i, (kind, *rest) in enumerate(steps):
        if kind in counts:
            calls[i] = Call(kind, counts[kind], dict(rest[1]))
            counts[kind] += 1
    made_by = calls.get(out)
    output_norm = made_by.index if made_by and made_by.kind == "norm" else None
    pre, post = _branch_norms(steps, out, {i: c.index for i, c in calls.items() if c.kind == "norm"},
                              output_norm)
    return BlockStructure(tuple(calls.values()), output_norm, pre, post)


def _branch_norms(steps: list[tuple], out: int, norms: dict[int, int], output_norm: int | None
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(pre-branch, post-branch) norm indices. Every value is a sum of scaled call outputs (or the
    input): a norm whose input involves the stream (the input, or a norm that is added on, as
    post-norm's inner one) and whose output is added to nothing feeds a branch: pre-branch; a
    norm whose input comes from branches only and whose output is added on is post-branch."""
    def leaves(i: int) -> set[int]:
        kind = steps[i][0]
        if kind == "add":
            return leaves(steps[i][1]) | leaves(steps[i][2])
        return leaves(steps[i][1]) if kind == "scale" else {i}

    used = set().union(leaves(out), *(leaves(steps[i][1]) for i in norms))  # added on somewhere
    stream, pre, post = {0}, [], []
    for i, k in norms.items():
        if k == output_norm:
            continue
        on_stream = bool(leaves(steps[i][1]) & stream)
        if on_stream and i in used:
            stream.add(i)
        elif on_stream:
            pre.append(k)
        elif i in used:
            post.append(k)
    return tuple(pre), tuple(post)


def structure_signature(s: Scheme, l: int, L: int, params: dict[str, Any]) -> tuple:
    """Block l's complete dataflow (calls, sums, scalings with their constants) as a hashable
    key, and the step that makes the output. Two blocks with equal signatures have equal
    recurrences, so a scheme that branches on l (Mix-LN) derives one per distinct signature."""
    steps, out = _trace(s, l, L, params)
    return tuple(steps), out
