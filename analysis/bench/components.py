"""Accuracy of the component moment maps: theory against Monte Carlo with the testbed's modules.

For every vocabulary operation (linear, LayerNorm, RMSNorm, GELU/ReLU/SwiGLU MLP, causal
attention, top-k MoE) at width 1024 in float64, fresh layers are drawn from the testbed's own torch
modules (analysis/testbed/model.py), fed Gaussian tokens with second moment q and token correlation ρ
(a shared per-sequence component), and backpropagated with an independent unit Gaussian output
gradient. The measured output second moment, output ρ (mean off-diagonal Gram entry over the
second moment, as the theory defines it) and input-gradient power are compared with the maps of
theory/components.py evaluated at the same (q, ρ), G = 1, gc = 0. ``mc_se`` is the standard error
over independent draws (fresh weights and tokens); ``rel_error`` is |theory - MC| / |MC|.

The Monte Carlo helpers here are also what tests/test_theory_components.py uses.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import sympy
import torch
from torch import nn

from analysis.testbed.model import MLP, MoE, Attention, ModelConfig, init_linear, make_norm
from theory import components as C

D = 1024  # width of every check


def numeric(e: sympy.Expr, T: int = 64, moe: tuple[int, int] | None = None) -> float:
    """Value of a map with the numeric functions (attention at length T, SiLU, MoE (E, k))."""
    fns = {**C.attention_numeric(T), **C.SILU_NUMERIC}
    if moe is not None:
        m = C.moe_numeric(*moe)
        fns.update({"MoeW2": m["W2"], "MoeWx": m["Wx"], "MoeR": m["R"]})
    e = e.replace(lambda a: isinstance(a, sympy.core.function.AppliedUndef),
                  lambda a: sympy.Float(fns[a.func.__name__](*[float(x) for x in a.args])))
    return float(e)


def tokens(n_seq: int, T: int, q: float, rho: float, gen: torch.Generator) -> torch.Tensor:
    """[n_seq, T, D] float64 tokens: second moment q, correlation ρ within a sequence."""
    m = torch.randn(n_seq, 1, D, generator=gen, dtype=torch.float64)
    z = torch.randn(n_seq, T, D, generator=gen, dtype=torch.float64)
    return (math.sqrt(rho) * m + math.sqrt(1 - rho) * z) * math.sqrt(q)


def stats(y: torch.Tensor) -> tuple[float, float]:
    """Second moment and cross-token covariance / second moment (the theory's ρ)."""
    T = y.shape[1]
    gram = y @ y.transpose(1, 2) / y.shape[-1]
    off = (gram.sum((1, 2)) - torch.diagonal(gram, dim1=1, dim2=2).sum(-1)) / (T * (T - 1))
    q = (y ** 2).mean().item()
    return q, off.mean().item() / q


@dataclass
class MonteCarlo:
    """Per-draw (q_out, ρ_out, G_in), rows = draws."""

    draws: np.ndarray

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.draws.mean(0))

    @property
    def se(self) -> tuple[float, float, float]:
        n = len(self.draws)
        return tuple(float(v) for v in self.draws.std(0, ddof=1) / math.sqrt(n))


def monte_carlo(make_layer: Callable[[], nn.Module], T: int, q: float, rho: float,
                gen: torch.Generator, draws: int = 3, n_seq: int = 8) -> MonteCarlo:
    """Output second moment, output ρ and input-gradient power of fresh float64 layers."""
    rows = []
    for _ in range(draws):
        layer = make_layer().double()
        x = tokens(n_seq, T, q, rho, gen).requires_grad_()
        y = layer(x)
        gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        (y * gy).sum().backward()
        rows.append((*stats(y), (x.grad ** 2).mean().item()))
    return MonteCarlo(np.array(rows))


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


_S = sympy.symbols("q c G Gc")


def _evaluate(maps, q: float, rho: float, **kw) -> tuple[float, float, float]:
    """Theory (q_out, ρ_out, G_in) from (q_out, c_out, G_in, gc_in) maps at G = 1, gc = 0."""
    vals = dict(zip(_S, (q, q * rho, 1, 0)))
    pq, pc, pG = (numeric(sympy.sympify(m).xreplace(vals), **kw) for m in maps[:3])
    return pq, pc / pq, pG


def _linear_case(q, rho, gen):
    sigma, gain = 1.3, 0.7
    mc = monte_carlo(lambda: init_linear(nn.Linear(D, D, bias=False), sigma, gain), 16, q, rho,
                     gen, draws=4)
    sq, sc, sG, _ = _S
    maps = (C.linear_forward(sq, sigma, gain), C.linear_forward(sc, sigma, gain),
            C.linear_backward(sG, sigma, gain, fan_in=D, fan_out=D))
    return mc, _evaluate(maps, q, rho)


def _norm_case(kind):
    def case(q, rho, gen):
        mc = monte_carlo(lambda: make_norm(ModelConfig(width=D, norm=kind)), 16, q, rho, gen,
                         draws=4)
        sq, sc, sG, _ = _S
        shrink = 1 - sympy.Rational(1, D) if kind == "layernorm" else 1  # LN removes the mean
        scale2 = C.norm_scale(sq * shrink) ** 2
        maps = (scale2 * sq * shrink, scale2 * sc * shrink,
                C.norm_backward_factor(sq, D, kind) * sG)
        return mc, _evaluate(maps, q, rho)
    return case


def _mlp_case(kind):
    def case(q, rho, gen):
        cfg = ModelConfig(width=D, ffn=kind, sigma=1.0)
        mc = monte_carlo(lambda: MLP(cfg, in_gain=0.9, out_gain=1.1), 32, q, rho, gen, draws=4)
        maps = C.ffn_maps(*_S, sigma=1, kind=kind, in_gain=sympy.Rational(9, 10),
                          out_gain=sympy.Rational(11, 10))
        return mc, _evaluate(maps, q, rho)
    return case


def _attention_case(q, rho, gen):
    T = 64
    cfg = ModelConfig(width=D, heads=8, sigma=1.0)
    mc = monte_carlo(lambda: Attention(cfg), T, q, rho, gen, draws=4)
    maps = C.attention_maps(*_S, sigma=1, consts=C.attention_constants(T))
    return mc, _evaluate(maps, q, rho, T=T)


def moe_config(E: int, k: int, kind: str) -> ModelConfig:
    """The MoE checked: width 1024, hidden width 128 per expert.

    The maps are exact in expectation for any hidden width (given the input, pre-activations are
    Gaussian and the output weights average the hidden activations), so the hidden width only sets
    the noise; the noise that dominates is routing's (which experts a token and a pair of tokens
    share), which needs many tokens, and narrow experts make tokens cheap.
    """
    return ModelConfig(width=D, experts=E, top_k=k, ffn=kind, ffn_hidden=128, sigma=1.0)


def moe_monte_carlo(E: int, k: int, kind: str, q: float, rho: float, gen: torch.Generator,
                    draws: int = 12) -> MonteCarlo:
    """MoE draws of 512 sequences × 4 tokens (many short sequences: output ρ is routing-noisy)."""
    cfg = moe_config(E, k, kind)
    return monte_carlo(lambda: MoE(cfg, in_gain=0.9, out_gain=1.1), 4, q, rho, gen, draws=draws,
                       n_seq=512)


def _moe_case(E, k, kind):
    def case(q, rho, gen):
        mc = moe_monte_carlo(E, k, kind, q, rho, gen)
        maps = C.moe_maps(*_S, sigma=1, kind=kind, in_gain=sympy.Rational(9, 10),
                          out_gain=sympy.Rational(11, 10))
        return mc, _evaluate(maps, q, rho, moe=(E, k))
    return case


# (component, setting label, case function, q, ρ)
CASES = [
    ("linear", "σ=1.3 gain=0.7 q=2 ρ=0.5", _linear_case, 2.0, 0.5),
    ("layernorm", "q=3 ρ=0.5", _norm_case("layernorm"), 3.0, 0.5),
    ("rmsnorm", "q=3 ρ=0.5", _norm_case("rmsnorm"), 3.0, 0.5),
    ("gelu mlp", "q=1 ρ=0.6", _mlp_case("gelu"), 1.0, 0.6),
    ("relu mlp", "q=1 ρ=0.6", _mlp_case("relu"), 1.0, 0.6),
    ("swiglu mlp", "q=1 ρ=0.6", _mlp_case("swiglu"), 1.0, 0.6),
    ("attention", "T=64 q=1 ρ=0", _attention_case, 1.0, 0.0),
    ("attention", "T=64 q=1 ρ=0.5", _attention_case, 1.0, 0.5),
    ("moe E=8 k=2 gelu", "q=1 ρ=0.6", _moe_case(8, 2, "gelu"), 1.0, 0.6),
    ("moe E=4 k=1 swiglu", "q=1 ρ=0.6", _moe_case(4, 1, "swiglu"), 1.0, 0.6),
]


def table(seed: int = 0):
    """DataFrame: component, setting, quantity, theory, monte_carlo, mc_se, rel_error."""
    import pandas as pd
    rows = []
    for i, (component, setting, case, q, rho) in enumerate(CASES):
        gen = torch.Generator().manual_seed(seed + i)
        torch.manual_seed(seed + 1000 + i)
        mc, theory = case(q, rho, gen)
        for name, th, m, se in zip(("second moment", "output rho", "grad power"), theory,
                                   mc.mean, mc.se):
            rows.append(dict(component=component, setting=setting, quantity=name, theory=th,
                             monte_carlo=m, mc_se=se, rel_error=rel(th, m)))
    return pd.DataFrame(rows)


def run(args: argparse.Namespace | None = None) -> dict[str, float]:
    """Print the theory-vs-Monte-Carlo table; return {component/setting/quantity: rel_error}."""
    t = time.perf_counter()
    df = table()
    seconds = time.perf_counter() - t
    print(f"component maps vs Monte Carlo (width {D}, float64, {torch.get_num_threads()} threads, "
          f"{seconds:.1f} s); mc_se: standard error over draws, rel_error: |theory - MC| / |MC|")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return {f"{r.component} | {r.setting} | {r.quantity}": float(r.rel_error)
            for r in df.itertuples()}
