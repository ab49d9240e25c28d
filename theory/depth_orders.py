"""How a scheme's first optimizer step scales with depth, derived from its block function.

Another interpretation of the scheme vocabulary (theory/schemes.py): every value of the block
carries exponents of L, read at the median block (l = L/2) as L → ∞, width and data fixed:

- ``s``  its forward size (RMS ∝ L^s); ``skip`` / ``branch`` the sizes of its part that is the
  block input carried linearly, and of the rest (what the sublayers added);
- ``b``  the size of the loss gradient arriving at it;
- ``u``  the size of its change after one step of the block's own weights (input held fixed).

Rules (theory/step.py derives each for one matrix; a constant c enters as its exponent e(c)):

- input x: s = σ, the stream's exponent: 0 when the block's output is a norm; otherwise each
  block adds terms of size s_add, so q_L = q_0 + Σ_l L^(2 s_add) and σ = max(0, (1 + 2 s_add)/2);
- ``c·v``: s, u, b shift by e(c); ``v + w``: the larger exponent of each part (no cancellation);
- ``norm(v)``: s = 0, u = u_v − s_v (the relative change), b_v = b_out − s_v;
- a sublayer with input size s_in, init gains g₁ (value / input projection) and g₂ (output),
  learning-rate gains λ (inner matrices) and λ_o (output projection), output gradient b_out:
  s = s_in + g₁ + g₂ and, one step later,

  | path | Adam | SGD |
  |---|---|---|
  | output projection's own change | λ_o + s_in + g₁ | λ_o + b_out + 2(s_in + g₁) |
  | inner matrices' change, through the output projection | λ + g₂ + s_in | λ + 2g₂ + b_out + 2s_in |
  | attention logits' change (q, k), through V and O | λ + g₁ + g₂ + 2s_in | λ + 2g₁ + 2g₂ + b_out + 4s_in |
  | the input's own change, passed on | u_in + g₁ + g₂ | u_in + g₁ + g₂ |

  u is the largest (Adam moves every weight by ≈ η whatever its init scale, Kingma & Ba 2015;
  SGD's change is the gradient, b_out, times the input's square);
- the gradient at the block output: 0 for a normalized stream, −σ under a final norm (it divides
  by √q_L), and the median block's gradient is O(1) times the last block's (it is for every
  scheme whose g_0/g_L grows at most as a power of L; PostNorm's does not).

From these, per scheme and optimizer:
- ``block``: the median block's relative update, u(y) − s(y);
- ``contributing``: how many blocks' changes reach the output, as a power of L: a change of the
  stream decays through each later block by the share its branches take, L^(2(branch − skip))
  at the block output, so L^min(1, 2(skip − branch)) blocks count (all of them when the
  branches are O(1/√L) against the skip, or the stream is never normalized; O(1) for PostNorm);
- ``network``: the relative change of the last stream, block + contributing (the blocks' changes
  add coherently: one step moves them all down the same loss gradient);
- ``lr_drift``: the optimal learning rate keeps the network's change O(1), so log₂ of the optimum
  moves by −network per doubling of L (depth-µP's argument, Yang et al. arXiv 2310.02244).

The norms' own gains and biases are left out of ``block`` and ``network``: a norm's gain moves its
output by O(η) per coordinate, with no coherent sum over d inputs, so against a matrix's Θ(η·d)
its path is O(1/d), nothing as d → ∞ first (the setting of theory/step.py). At a fixed width and
L → ∞ it can win: Adam moves a gain by λ_n·η whatever the depth (λ_n its ``op.norm(v, lr=)``),
SGD by λ_n·η·b_out. ``block_fixed_width`` and ``network_fixed_width`` add that path (measured:
span_dlr's network change at width 64 grows as L^0.25 with its norms stepped and L^0.04 with
them frozen, L = 4 … 64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from theory.schemes import _trace, get_scheme

NEG = float("-inf")  # the exponent of a value that is absent (no change, no skip part)
PROBE_DEPTHS = (2 ** 20, 2 ** 22)  # constants' exponents read between these depths
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class DepthOrders:
    """A scheme's one-step depth exponents under one optimizer (module docstring)."""

    scheme: str
    optimizer: str
    stream: Fraction
    block: Fraction
    contributing: Fraction
    network: Fraction
    block_fixed_width: Fraction  # the same with the norms' own gains and biases stepped
    network_fixed_width: Fraction

    @property
    def lr_drift(self) -> Fraction:
        """Predicted change of log₂(optimal lr) per doubling of depth."""
        return -self.network


def _exponent(values: tuple[float, float]) -> float:
    a, b = values
    if a == 0 and b == 0:
        return NEG
    return math.log(abs(b) / abs(a)) / math.log(PROBE_DEPTHS[1] / PROBE_DEPTHS[0])


def _frac(x: float) -> Fraction:
    return Fraction(x).limit_denominator(16)


def _traces(name: str):
    s = get_scheme(name)
    out = []
    for L in PROBE_DEPTHS:
        out.append(_trace(s, L // 2, L, s.resolve(L)))
    (steps1, y1), (steps2, y2) = out
    if len(steps1) != len(steps2) or y1 != y2:
        raise ValueError(f"scheme '{name}': its median block changes structure with depth")
    return steps1, steps2, y1


def _gains(step1: tuple, step2: tuple) -> dict[str, float]:
    g1, g2 = dict(step1[2]), dict(step2[2])
    return {k: _exponent((g1[k], g2[k])) for k in g1}


def _forward(steps1, steps2, sigma: float):
    """Per step: (s, skip, branch) exponents for an input of size sigma."""
    vals = []
    for st1, st2 in zip(steps1, steps2):
        kind = st1[0]
        if kind == "input":
            vals.append((sigma, sigma, NEG))
        elif kind == "add":
            a, b = vals[st1[1]], vals[st1[2]]
            vals.append(tuple(max(x, y) for x, y in zip(a, b)))
        elif kind == "scale":
            e = _exponent((st1[2], st2[2]))
            vals.append(tuple(x + e for x in vals[st1[1]]))
        elif kind == "norm":
            s, sk, br = vals[st1[1]]
            vals.append((0.0, sk - s, br - s))
        else:
            g = _gains(st1, st2)
            s = vals[st1[1]][0] + g.get("value_gain", g.get("in_gain", 0.0)) + g["out_gain"]
            vals.append((s, NEG, s))
    return vals


def _stream(steps1, steps2, out: int, normalized: bool) -> float:
    """The stream's exponent at the median block (module docstring), as a fixed point."""
    if normalized:
        return 0.0
    sigma = 0.0
    for _ in range(8):
        vals = _forward(steps1, steps2, sigma)
        added = vals[out][2]
        new = max(0.0, (1 + 2 * added) / 2) if added > NEG else 0.0
        if abs(new - sigma) < 1e-9:
            break
        sigma = new
    return sigma


def _backward(steps1, steps2, vals, out: int, b_out: float) -> list[float]:
    b = [NEG] * len(steps1)
    b[out] = b_out
    for k in range(len(steps1) - 1, 0, -1):
        st1, st2 = steps1[k], steps2[k]
        kind = st1[0]
        if b[k] == NEG:
            continue
        if kind == "add":
            for i in (st1[1], st1[2]):
                b[i] = max(b[i], b[k])
        elif kind == "scale":
            b[st1[1]] = max(b[st1[1]], b[k] + _exponent((st1[2], st2[2])))
        elif kind == "norm":
            b[st1[1]] = max(b[st1[1]], b[k] - vals[st1[1]][0])
        else:
            g = _gains(st1, st2)
            g1 = g.get("value_gain", g.get("in_gain", 0.0))
            b[st1[1]] = max(b[st1[1]], b[k] + g1 + g["out_gain"])
    return b


def _updates(steps1, steps2, vals, b, optimizer: str, norm_gains: bool = False) -> list[float]:
    u = []
    for k, (st1, st2) in enumerate(zip(steps1, steps2)):
        kind = st1[0]
        if kind == "input":
            u.append(NEG)
        elif kind == "add":
            u.append(max(u[st1[1]], u[st1[2]]))
        elif kind == "scale":
            u.append(u[st1[1]] + _exponent((st1[2], st2[2])))
        elif kind == "norm":
            paths = [u[st1[1]] - vals[st1[1]][0]]
            if norm_gains:  # Δγ ⊙ x̂: Adam's η per coordinate, SGD's Σ_tokens δ ⊙ x̂
                lr = _gains(st1, st2).get("lr", 0.0)
                paths.append(lr if optimizer == "adam" else lr + b[k])
            u.append(max(paths))
        else:
            g = _gains(st1, st2)
            g1, g2 = g.get("value_gain", g.get("in_gain", 0.0)), g["out_gain"]
            lr, out_lr = g.get("lr", 0.0), g.get("out_lr", 0.0)
            s_in, u_in, bo = vals[st1[1]][0], u[st1[1]], b[k]
            if optimizer == "adam":
                paths = [out_lr + s_in + g1, lr + g2 + s_in]
                paths += [lr + g1 + g2 + 2 * s_in] if kind == "attn" else []
            else:
                paths = [out_lr + bo + 2 * (s_in + g1), lr + 2 * g2 + bo + 2 * s_in]
                paths += [lr + 2 * g1 + 2 * g2 + bo + 4 * s_in] if kind == "attn" else []
            u.append(max(paths + [u_in + g1 + g2]))
    return u


@lru_cache(maxsize=None)
def depth_orders(scheme: str, optimizer: str) -> DepthOrders:
    """The one-step depth exponents of ``scheme`` under ``optimizer`` ('adam' or 'sgd')."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{optimizer}' (known: {', '.join(OPTIMIZERS)})")
    s = get_scheme(scheme)
    steps1, steps2, out = _traces(scheme)
    normalized = steps1[out][0] == "norm"
    sigma = _stream(steps1, steps2, out, normalized)
    vals = _forward(steps1, steps2, sigma)
    b_out = -sigma if s.final_norm and not normalized else 0.0
    b = _backward(steps1, steps2, vals, out, b_out)
    u = _updates(steps1, steps2, vals, b, optimizer)
    u_fixed = _updates(steps1, steps2, vals, b, optimizer, norm_gains=True)
    s_y, skip, branch = vals[out]
    block, block_fixed = u[out] - s_y, u_fixed[out] - s_y
    contributing = min(1.0, 2 * (skip - branch)) if skip > branch else 0.0
    return DepthOrders(scheme, optimizer, _frac(sigma), _frac(block), _frac(contributing),
                       _frac(block + contributing), _frac(block_fixed),
                       _frac(block_fixed + contributing))
