"""Component moment maps at initialization: what each vocabulary operation does to moments.

Conventions (per coordinate, averaged over tokens of one sequence of length T):
``q`` second moment E[x²]; ``c`` cross-token covariance E[x_s·x_t]/d for s ≠ t (so the token
correlation is ρ = c/q); ``G`` gradient power E[(∂loss/∂x)²]; ``gc`` its cross-token covariance.
Weights are N(0, (gain·σ)²/fan_in) with no biases, as in analysis/testbed/model.py.

Every map is a sympy expression (closed form) except the attention and MoE statistics, which are
expectations over softmax weights with no closed form: they are sympy functions backed by a
deterministic Monte Carlo table (marked "numeric" below), so they still lambdify and print.
"""

from __future__ import annotations

import bisect
import math
from functools import lru_cache
from typing import Callable

import numpy as np
import sympy
from sympy import Rational, asin, pi, sqrt

EPS = Rational(1, 100000)  # LayerNorm / RMSNorm eps of analysis/testbed/model.py


# --- numeric evaluation on closed domains -------------------------------------------------
#
# The kernels are written for correlations r ∈ [-1, 1]: relu_kernel has acos(r) and
# sqrt(1 - r²), the GELU orthant asin(c/(1+q)). At r = ±1 exactly they are defined (the ReLU
# kernel's cross term is q/2 at r = 1), but a correlation computed as k/q of two separately
# rounded sums can land an ulp outside, and a collapsed stream (ρ → 1, the fixed point of every
# deep scheme) sits right on the edge. The sympy forms stay as printed; numeric evaluation uses
# these functions, which clamp an argument that lies within DOMAIN_SLACK outside the domain
# (rounding) and pass anything farther out through, so a real bug still raises.

DOMAIN_SLACK = 1e-9


def _into(x: float, lo: float, hi: float) -> float:
    """``x`` clamped to [lo, hi] when it lies within DOMAIN_SLACK outside; else ``x`` itself."""
    if lo - DOMAIN_SLACK <= x < lo:
        return lo
    if hi < x <= hi + DOMAIN_SLACK:
        return hi
    return x


def safe_acos(x: float) -> float:
    """math.acos on [-1, 1], rounding past ±1 clamped."""
    return math.acos(_into(x, -1.0, 1.0))


def safe_asin(x: float) -> float:
    """math.asin on [-1, 1], rounding past ±1 clamped."""
    return math.asin(_into(x, -1.0, 1.0))


def safe_sqrt(x: float) -> float:
    """math.sqrt on [0, ∞), rounding below 0 (e.g. 1 - r² at r = 1 + ulp) clamped."""
    return math.sqrt(_into(x, 0.0, math.inf))


NUMERIC_MATH = {"acos": safe_acos, "asin": safe_asin, "sqrt": safe_sqrt}


def _np_into(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    x = np.where((x < lo) & (x >= lo - DOMAIN_SLACK), lo, x)
    return np.where((x > hi) & (x <= hi + DOMAIN_SLACK), hi, x)


# the same for sympy.lambdify(..., [NUMPY_MATH, "numpy"]) (entry-wise kernels of positional.py)
NUMPY_MATH = {"acos": lambda x: np.arccos(_np_into(x, -1.0, 1.0)),
              "asin": lambda x: np.arcsin(_np_into(x, -1.0, 1.0)),
              "sqrt": lambda x: np.sqrt(_np_into(x, 0.0, math.inf))}


# --- linear layer ------------------------------------------------------------------------


def linear_forward(q: sympy.Expr, sigma: sympy.Expr, gain: sympy.Expr = 1) -> sympy.Expr:
    """Second moment (or cross-token covariance) after W ~ N(0, (gain·σ)²/fan_in): (gain·σ)²·q.

    Derivation: (Wx)_i = Σ_j W_ij x_j, E[(Wx)_i (Wy)_i] = (gain·σ)²/fan_in · Σ_j x_j y_j.
    """
    return (gain * sigma) ** 2 * q


def linear_backward(G: sympy.Expr, sigma: sympy.Expr, gain: sympy.Expr = 1,
                    fan_in: sympy.Expr = 1, fan_out: sympy.Expr = 1) -> sympy.Expr:
    """Gradient power per input coordinate through Wᵀ: (gain·σ)²·(fan_out/fan_in)·G."""
    return (gain * sigma) ** 2 * sympy.sympify(fan_out) / fan_in * G


# --- norms ---------------------------------------------------------------------------------


def norm_scale(Q: sympy.Expr) -> sympy.Expr:
    """Forward factor of LayerNorm / RMSNorm at init: y = x / sqrt(Q + eps).

    LayerNorm divides by sqrt(var + eps) with var the per-token feature variance; for
    zero-mean sources var = Q(1 - 1/d) but the output second moment is var/(var + eps) exactly
    (the mean of y² over features), so the 1/d term cancels forward; only eps remains.
    """
    return 1 / sqrt(Q + EPS)


def norm_backward_factor(Q: sympy.Expr, d: sympy.Expr, kind: str = "layernorm") -> sympy.Expr:
    """Gradient power factor through a norm: (1 - k/d)/(Q + eps), k = 2 (LayerNorm), 1 (RMSNorm).

    Jacobian J = (I - 11ᵀ/d - yyᵀ/d)/sqrt(var + eps) (LayerNorm; RMSNorm lacks the 11ᵀ term);
    for a gradient g independent of y and 1, E|Jᵀg|² = |g|²(1 - k/d)/(Q + eps) (projection terms).
    """
    return norm_projection(d, kind) / (Q + EPS)


def norm_projection(d: Any, kind: str = "layernorm") -> Any:
    """1 - k/d: the share of a fresh gradient's power a norm's projections keep (k as above)."""
    return 1 - sympy.Integer(2 if kind == "layernorm" else 1) / d


def head_gradient_share(q: Any, sigma: Any, d: Any) -> Any:
    """The share of the LM head's gradient power that lies off the head's input x: 1/(1 + s²/d),
    s² = σ²q the logits' variance (own derivation; Monte Carlo in tests/test_theory_positional.py).

    The head W (entries N(0, σ²/d)) reads x, of power q per coordinate. Its gradient Wᵀ(p − e_y)
    is random relative to x but for a tilt: along x̂ it is (p − e_y)·z/|x| with logits z = Wx,
    and (p − e_y)·z = Σ_v p_v z_v − z_y ≈ s² − z_y (a softmax over many Gaussian logits weights
    them toward their large values), so its power there is (s⁴ + s²)/(dq) beside the random part's
    σ²: an extra share s²/d along x, which a norm whose output x is removes whole."""
    return 1 / (1 + sigma ** 2 * q / d)


# --- activations: kernels K(q1, q2, c) = E[φ(u)φ(v)], K'(…) = E[φ'(u)φ'(v)] -------------


def relu_kernel(q: sympy.Expr, c: sympy.Expr) -> sympy.Expr:
    """E[relu(u)relu(v)], Var u = Var v = q, Cov = c (arc-cosine kernel, Cho & Saul 2009).

    sqrt(1 - r²) is written sqrt((1 - r)(1 + r)): near r = 1 the factor 1 - r is exact in floating
    point, whereas 1 - r² loses all digits, and the square root would blow a rounding of 1e-16 in ρ
    up to 1e-8 (ρ drifting off 1 in a collapsed stream, by 1e-4 in ρ_g after 64 ReLU blocks).
    """
    r = c / q
    return q / (2 * pi) * (sqrt((1 - r) * (1 + r)) + (pi - sympy.acos(r)) * r)


def relu_dkernel(q: sympy.Expr, c: sympy.Expr) -> sympy.Expr:
    """E[relu'(u)relu'(v)] = (π - arccos(c/q))/(2π) (Cho & Saul 2009, degree 0)."""
    return (pi - sympy.acos(c / q)) / (2 * pi)


def _orthant(q: sympy.Expr, c: sympy.Expr) -> sympy.Expr:
    # E[Φ(u)Φ(v)] = P(a ≤ u, b ≤ v), a, b ~ N(0,1): an orthant of a Gaussian with
    # variances 1+q and covariance c: 1/4 + asin(c/(1+q))/(2π) (Sheppard's formula).
    return Rational(1, 4) + asin(c / (1 + q)) / (2 * pi)


def gelu_kernel(q: sympy.Expr, c: sympy.Expr) -> sympy.Expr:
    """E[gelu(u)gelu(v)], gelu(u) = uΦ(u), Var = q, Cov = c. Own derivation (erf kernel).

    Stein's lemma on u: E[uvΦΦ] = q·E[vφ(u)Φ(v)] + c·E[ΦΦ] + c·E[vΦ(u)φ(v)]; each term with a
    φ factor is a Gaussian re-weighting (Sherman–Morrison): multiplying by φ(u) gives
    1/sqrt(2π(1+q)) times an expectation under Var u' = q/(1+q), Cov' = c/(1+q),
    Var v' = q - c²/(1+q). Result agrees with neural-tangents' Gelu NNGP (checked by quadrature
    and Monte Carlo in tests/test_theory_components.py).
    """
    qv = q - c ** 2 / (1 + q)  # Var v after re-weighting by φ(u)
    t1 = q * qv / (2 * pi * sqrt((1 + q) * (1 + qv)))  # q·E[vφ(u)Φ(v)]
    t3 = c * (c / (1 + q)) / (2 * pi * sqrt((1 + q) * (1 + qv)))  # c·E[vΦ(u)φ(v)]
    return t1 + c * _orthant(q, c) + t3


def gelu_dkernel(q: sympy.Expr, c: sympy.Expr) -> sympy.Expr:
    """E[gelu'(u)gelu'(v)], gelu' = Φ(u) + uφ(u). Own derivation (same re-weighting).

    = E[ΦΦ] + 2·E[uφ(u)Φ(v)] + E[uφ(u)vφ(v)], with E[uφ(u)Φ(v)] = c/((1+q)·2π·sqrt((1+q)(1+qv)))
    and E[uφ(u)vφ(v)] = c/(2π·D^{3/2}), D = det(I + Σ) = (1+q)² - c².
    """
    qv = q - c ** 2 / (1 + q)
    cross = c / (1 + q) / (2 * pi * sqrt((1 + q) * (1 + qv)))
    D = (1 + q) ** 2 - c ** 2
    return _orthant(q, c) + 2 * cross + c / (2 * pi * D ** Rational(3, 2))


# SiLU has no closed-form Gaussian kernel: numeric 2-D Gauss–Hermite quadrature (marked numeric).
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(80)
_GH_W = _GH_W / _GH_W.sum()


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _dsilu(x: np.ndarray) -> np.ndarray:
    s = 1 / (1 + np.exp(-x))
    return s * (1 + x * (1 - s))


def _gauss2(fn: Callable[[np.ndarray], np.ndarray], q: float, c: float) -> float:
    # (u, v) = sqrt(q)·(z1, r z1 + sqrt(1-r²) z2); tensor Gauss–Hermite on (z1, z2)
    q = max(float(q), 1e-300)
    r = min(max(float(c) / q, -1.0), 1.0)
    z1, z2 = np.meshgrid(_GH_X, _GH_X, indexing="ij")
    w = np.outer(_GH_W, _GH_W)
    u = math.sqrt(q) * z1
    v = math.sqrt(q) * (r * z1 + math.sqrt(max(1 - r * r, 0.0)) * z2)
    return float((w * fn(u) * fn(v)).sum())


def _num_silu_kernel(q: float, c: float) -> float:
    return _gauss2(_silu, q, c)


def _num_silu_dkernel(q: float, c: float) -> float:
    return _gauss2(_dsilu, q, c)


silu_kernel = sympy.Function("Ksilu")  # numeric: 2-D Gauss–Hermite quadrature
silu_dkernel = sympy.Function("dKsilu")  # numeric: 2-D Gauss–Hermite quadrature
SILU_NUMERIC = {"Ksilu": _num_silu_kernel, "dKsilu": _num_silu_dkernel}

KERNELS = {"gelu": (gelu_kernel, gelu_dkernel), "relu": (relu_kernel, relu_dkernel),
           "silu": (silu_kernel, silu_dkernel)}


# --- FFN sublayer ----------------------------------------------------------------------------


def ffn_maps(q: sympy.Expr, c: sympy.Expr, G: sympy.Expr, gc: sympy.Expr, *, sigma: sympy.Expr,
             kind: str, in_gain: sympy.Expr = 1, out_gain: sympy.Expr = 1
             ) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr, sympy.Expr]:
    """(q_out, c_out, G_in, gc_in) of the MLP d→h→d (GELU/ReLU) or SwiGLU at init.

    Forward: pre-activation u = W1 x has Var (in_gain·σ)²q, Cov (in_gain·σ)²c; the output is
    (out_gain·σ)²·K. Backward: G_in = (in_gain·σ)²(out_gain·σ)²·K'(diag)·G, and the cross-token
    gradient covariance uses K'(off-diagonal) (gradient independence, Yang 2019).
    SwiGLU h = silu(W_g x)·(W_u x): independent gate and up weights, so E[h_s h_t] =
    K_silu·Cov(u), and the backward has two uncorrelated paths (gate: silu'²·u², up: silu²).
    """
    a2, b2 = (in_gain * sigma) ** 2, (out_gain * sigma) ** 2
    s, sc = a2 * q, a2 * c
    if kind in ("gelu", "relu"):
        K, dK = KERNELS[kind]
        return b2 * K(s, s), b2 * K(s, sc), a2 * b2 * dK(s, s) * G, a2 * b2 * dK(s, sc) * gc
    if kind == "swiglu":
        K, dK = KERNELS["silu"]
        q_out = b2 * K(s, s) * s
        c_out = b2 * K(s, sc) * sc
        G_in = a2 * b2 * (dK(s, s) * s + K(s, s)) * G
        gc_in = a2 * b2 * (dK(s, sc) * sc + K(s, sc)) * gc
        return q_out, c_out, G_in, gc_in
    raise ValueError(f"unknown ffn kind '{kind}' (known: gelu, relu, swiglu)")


# --- attention at init: numeric softmax statistics (causal; bidirectional reuses them) ----
#
# Given the input (q, ρ), the logits of query t over keys s ≤ t are Gaussian with variance
# σ⁴q² and correlation ρ between keys (Cov over W_k of a·W_k x_s, a = W_q x_t); the shared part
# cancels in the softmax, leaving i.i.d. logits of variance v = σ⁴q²(1-ρ). Causal query t then
# averages t values with weights P_t = softmax(z_1..z_t). The statistics needed are
#   C_t(v) = E Σ_s P_ts²   (collision: 1/t for uniform, e^v/t for large t; softmax fluctuation)
#   X_t(v) = E Σ_s P_ts²(1 + Σ_u P_tu² - 2P_ts)   (score-path backward)
# computed by Monte Carlo with a fixed seed on a grid in v (deterministic, smooth in v because
# the same normal draws are reused), then averaged over positions as the probes average
# over tokens. Off-diagonal terms use E[P_ts] = 1/t (exact by exchangeability).

_V_MAX = 16.0
_V_GRID = [_V_MAX * (i / 64) ** 2 for i in range(65)]
_MC_SAMPLES = 1024


def _causal_draws(T: int):
    """For each v of the grid: the standard draws Z [samples, T] and exp(√v·Z) shifted per row
    (softmax is shift invariant; the shift avoids overflow). The same fixed-seed draws for every
    table, so the tables are smooth in v and consistent with each other."""
    if T < 1:
        raise ValueError(f"sequence length must be >= 1, got {T}")
    Z = np.random.default_rng(20240601).standard_normal((_MC_SAMPLES, T))
    for v in _V_GRID:
        z = math.sqrt(v) * Z
        yield Z, np.exp(z - z.max(axis=1, keepdims=True))


@lru_cache(maxsize=32)
def attention_position_table(T: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-position statistics C_t(v), X_t(v), arrays [len(V_GRID), T] (numeric, MC).

    Query t (1-based) attends over keys 1..t; the draws are shared across the v grid and
    positions, so the tables are smooth in v.
    """
    Cs, Xs = [], []
    for _, e in _causal_draws(T):
        s1, s2, s3 = np.cumsum(e, 1), np.cumsum(e * e, 1), np.cumsum(e ** 3, 1)
        p2, p3 = s2 / s1 ** 2, s3 / s1 ** 3
        Cs.append(p2.mean(0))
        Xs.append((p2 * (1 + p2) - 2 * p3).mean(0))
    return np.array(Cs), np.array(Xs)


@lru_cache(maxsize=32)
def attention_alignment_table(T: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-position M1_t(v) = E Σ_s P_ts Z_s and M2_t(v) = E (Σ_s P_ts Z_s)², arrays
    [len(V_GRID), T] (numeric, MC; the draws of attention_position_table), Z_s the standardized
    logits: how far the softmax tilts its weighted mean of the keys along the query's direction
    (√v for large t). They give attention's finite-width value–weight alignment term
    (theory.positional.attention).
    """
    M1, M2 = [], []
    for Z, e in _causal_draws(T):
        m = np.cumsum(e * Z, 1) / np.cumsum(e, 1)
        M1.append(m.mean(0))
        M2.append((m * m).mean(0))
    return np.array(M1), np.array(M2)


_FULL_DRAWS = 2 ** 19  # normal draws per grid point: 16384 sequences at T = 32, fewer for longer


@lru_cache(maxsize=32)
def attention_full_table(T: int) -> tuple[np.ndarray, np.ndarray]:
    """C_T(v), X_T(v) of a query over all T keys (bidirectional), arrays [len(V_GRID)] (MC).

    The causal table's last position, drawn separately with more sequences: the causal statistics
    are averaged over T positions, this one is not (from the causal table's 1024 sequences C_32(1)
    came out 1.3% low against 4·10⁵; now within 0.1%). A sum over T keys fluctuates ∝ 1/√T, so
    _FULL_DRAWS/T sequences give every T about the same relative noise at the same cost.
    """
    if T < 1:
        raise ValueError(f"sequence length must be >= 1, got {T}")
    Z = np.random.default_rng(20240602).standard_normal((max(_FULL_DRAWS // T, 1024), T))
    Cs, Xs = [], []
    for v in _V_GRID:
        e = np.exp(math.sqrt(v) * Z)  # |√v·z| < 4·6: no overflow, no shift needed
        e2 = e * e
        s1 = e.sum(1)
        p2, p3 = e2.sum(1) / s1 ** 2, (e2 * e).sum(1) / s1 ** 3
        Cs.append(p2.mean())
        Xs.append((p2 * (1 + p2) - 2 * p3).mean())
    return np.array(Cs), np.array(Xs)


@lru_cache(maxsize=32)
def attention_table(T: int) -> dict[str, list[float]]:
    """Per-v-grid sequence averages (Cbar, D1bar, Xbar) for sequence length T (numeric, MC)."""
    Cs, Xs = attention_position_table(T)
    pairs = max(T * (T - 1), 1)
    # D1bar: avg over ordered pairs s≠s' of Σ_{t≥max(s,s')} E[P_ts P_ts'] = Σ_t (1 - C_t)/(T(T-1))
    return {"Cbar": [float(c.mean()) for c in Cs],
            "D1bar": [float((1 - c[1:]).sum() / pairs) for c in Cs],
            "Xbar": [float(x.mean()) for x in Xs]}


@lru_cache(maxsize=32)
def attention_full_values(T: int) -> dict[str, list[float]]:
    """Per-v-grid Cfull, D1full, Xfull (bidirectional: every query over all T keys; numeric, MC).

    D1full = Σ_t E[P_ts P_ts'] over the T queries, s ≠ s' = (1 - C_T)/(T - 1) (exchangeable keys).
    """
    Cf, Xf = attention_full_table(T)
    return {"Cfull": [float(c) for c in Cf],
            "D1full": [float((1 - c) / max(T - 1, 1)) for c in Cf],
            "Xfull": [float(x) for x in Xf]}


@lru_cache(maxsize=32)
def attention_constants(T: int) -> dict[str, float]:
    """v-independent sequence averages under E[P_ts] = 1/t (exact; closed sums over positions).

    Mbar: avg over pairs s≠t of Σ_u E P_su E P_tu = 1/max(s,t); Bbar, D2bar: the gradient
    cross terms of the value path, with S_s = Σ_{t≥s} 1/t.
    """
    t = np.arange(1, T + 1, dtype=float)
    pairs = max(T * (T - 1), 1)
    S = np.cumsum((1 / t)[::-1])[::-1]
    H = float((1 / t).sum())
    return {"Mbar": float((2 * (t - 1) / t).sum() / pairs),
            "Bbar": float(((S ** 2).sum() - H) / T),
            "D2bar": float((S.sum() ** 2 - (S ** 2).sum() - ((t - 1) / t).sum()) / pairs)}


def _interp(grid: list[float], vals: list[float], v: float) -> float:
    # pure-Python linear interpolation: far faster than numpy for one scalar in a loop
    if v <= 0:
        return vals[0]
    if v >= grid[-1]:
        return vals[-1]  # clamped beyond the table (logit variance > 16: saturated softmax)
    i = bisect.bisect_right(grid, v)
    w = (v - grid[i - 1]) / (grid[i] - grid[i - 1])
    return vals[i - 1] * (1 - w) + vals[i] * w


def attention_numeric(T: int) -> dict[str, Callable[[float], float]]:
    """Scalar functions Cbar(v), D1bar(v), Xbar(v) (causal), Cfull(v), D1full(v), Xfull(v)
    (bidirectional) for sequence length T (numeric tables)."""
    T = int(T)
    tab = attention_table(T)
    fns = {name: (lambda v, vals=vals: _interp(_V_GRID, vals, float(v)))
           for name, vals in tab.items()}
    # drawn on first use only: a causal model never pays for the bidirectional table
    fns.update({name: (lambda v, name=name: _interp(_V_GRID, attention_full_values(T)[name],
                                                    float(v)))
                for name in ("Cfull", "D1full", "Xfull")})
    return fns


Cbar = sympy.Function("Cbar")  # numeric: sequence-averaged E Σ_s P_ts² at logit variance v
D1bar = sympy.Function("D1bar")  # numeric: pair-averaged Σ_t E[P_ts P_ts'] (gradient cross term)
Xbar = sympy.Function("Xbar")  # numeric: sequence-averaged score-path factor
Cfull = sympy.Function("Cfull")  # numeric: E Σ_s P_ts² of a query over all T keys
D1full = sympy.Function("D1full")  # numeric: Σ_t E[P_ts P_ts'] over all T queries, s ≠ s'
Xfull = sympy.Function("Xfull")  # numeric: score-path factor of a query over all T keys


def attention_maps(q: sympy.Expr, c: sympy.Expr, G: sympy.Expr, gc: sympy.Expr, *,
                   sigma: sympy.Expr, consts: dict[str, sympy.Expr] | None = None,
                   value_gain: sympy.Expr = 1, out_gain: sympy.Expr = 1, kind: str = "causal",
                   T: sympy.Expr | None = None
                   ) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr, sympy.Expr]:
    """(q_out, c_out, G_in, gc_in) of attention of ``kind`` (theory.shape.ATTENTION_KINDS).

    causal needs ``consts`` (Mbar, Bbar, D2bar); bidirectional and uniform need the sequence
    length ``T`` (a symbol or a number).
    """
    gains = {"sigma": sigma, "value_gain": value_gain, "out_gain": out_gain}
    if kind == "causal":
        return causal_attention_maps(q, c, G, gc, consts=consts, **gains)
    if kind == "bidirectional":
        return bidirectional_attention_maps(q, c, G, gc, T=T, **gains)
    if kind == "uniform":
        return uniform_attention_maps(q, c, G, gc, T=T, **gains)
    raise ValueError(f"unknown attention kind '{kind}' (known: causal, bidirectional, uniform)")


def causal_attention_maps(q: sympy.Expr, c: sympy.Expr, G: sympy.Expr, gc: sympy.Expr, *,
                          sigma: sympy.Expr, consts: dict[str, sympy.Expr],
                          value_gain: sympy.Expr = 1, out_gain: sympy.Expr = 1
                          ) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr, sympy.Expr]:
    """(q_out, c_out, G_in, gc_in) of causal attention at init, averaged over positions.

    Forward (value averaging, Noci et al. 2022): y_t = Σ_s P_ts W_v x_s, so
      q_out = g²[c + (q - c)·Cbar(v)],  c_out = g²[c + (q - c)·Mbar],  g² = (σ²·gv·go)², v = σ⁴q(q-c).
    Backward value path g'_s = Σ_{t≥s} P_ts (W_o W_v)ᵀ g_t:
      G_in ⊃ g²[G·Cbar + gc·Bbar],  gc_in = g²[G·D1bar + gc·D2bar].
    Score path through W_q, W_k (sums of a_s = P_ts g_t·(v_s - y_t) over keys; Σ_s a_s = 0
    removes the shared part): G_in ⊃ g²·σ⁴(q - c)(2q - c)·Xbar(v)·G; no cross term (independent
    queries). ``consts`` maps Mbar, Bbar, D2bar to their values (symbols or numbers).
    """
    g2 = (sigma * value_gain) ** 2 * (sigma * out_gain) ** 2
    v = sigma ** 4 * q * (q - c)
    q_out = g2 * (c + (q - c) * Cbar(v))
    c_out = g2 * (c + (q - c) * consts["Mbar"])
    G_in = g2 * (G * Cbar(v) + gc * consts["Bbar"] + sigma ** 4 * (q - c) * (2 * q - c) * Xbar(v) * G)
    gc_in = g2 * (G * D1bar(v) + gc * consts["D2bar"])
    return q_out, c_out, G_in, gc_in


def bidirectional_attention_maps(q: sympy.Expr, c: sympy.Expr, G: sympy.Expr, gc: sympy.Expr, *,
                                 sigma: sympy.Expr, T: sympy.Expr, value_gain: sympy.Expr = 1,
                                 out_gain: sympy.Expr = 1
                                 ) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr, sympy.Expr]:
    """(q_out, c_out, G_in, gc_in) of bidirectional (non-causal) softmax attention at init.

    Every query sees the same T keys, so exchangeable tokens stay exchangeable and the
    position-resolved map (positional.bidirectional_attention) reduces exactly to these scalars
    (own derivation; tests check the two agree). With u = q - c, ρ = c/q, the i.i.d. logit part of
    variance v = σ⁴·q·u, E[P_ts] = 1/T, and the statistics of a query over all T keys
    C = C_T(v) = E Σ_s P_ts² (Cfull), X = X_T(v) (Xfull), D1 = (1 - C)/(T - 1) (D1full)
    (attention_full_table). Distinct queries t, t' share the keys and their logits correlate by
    ρ, so their weight fluctuations do too: linear in the standardized logits,
    E[δP_ts δP_t's'] = ρ·w²·(δ_ss' - 1/T), w² = (T·C - 1)/(T(T - 1)). Forward:
      q_out = g²[c + u·C],  c_out = g²[c + u·(1 + ρ(T·C - 1))/T].
    Backward value path g'_s = Σ_t P_ts (W_o W_v)ᵀ g_t (all T queries):
      G_in ⊃ g²[G·C + gc·(T - 1)/T·(1 + ρ(T·C - 1))],
      gc_in = g²[G·D1 + gc·((T - 1) - ρ(T·C - 1))/T].
    Score path (diagonal): query part σ⁴g²·G·X·u², key part σ⁴g²·(G·q·u·X + gc·c·u·(T - 1)/T)
    (a key collects every query's gradient, coherently through their covariance); so
      G_in ⊃ σ⁴g²[G·X·u·(2q - c) + gc·c·u·(T - 1)/T].
    With gc = ρ = 0 this is the causal map with every query over all T keys. Not included (nor in
    the causal maps): the key gradients of one query sum to zero over the keys, which makes the
    key part anti-correlated across tokens (-1/(T - 1) of its power in gc_in).
    """
    g2 = (sigma * value_gain) ** 2 * (sigma * out_gain) ** 2
    u, r = q - c, c / q
    v = sigma ** 4 * q * u
    coh = 1 + r * (T * Cfull(v) - 1)  # cross-query coherence of the weights, 1 for ρ = 0
    q_out = g2 * (c + u * Cfull(v))
    c_out = g2 * (c + u * coh / T)
    G_in = g2 * (G * Cfull(v) + gc * (T - 1) / T * coh
                 + sigma ** 4 * (G * Xfull(v) * u * (2 * q - c) + gc * c * u * (T - 1) / T))
    gc_in = g2 * (G * D1full(v) + gc * ((T - 1) - r * (T * Cfull(v) - 1)) / T)
    return q_out, c_out, G_in, gc_in


def uniform_attention_maps(q: sympy.Expr, c: sympy.Expr, G: sympy.Expr, gc: sympy.Expr, *,
                           sigma: sympy.Expr, T: sympy.Expr, value_gain: sympy.Expr = 1,
                           out_gain: sympy.Expr = 1
                           ) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr, sympy.Expr]:
    """(q_out, c_out, G_in, gc_in) of uniform attention: every token the mean over all T tokens.

    Exact closed form (no softmax statistics): y_t = W_o W_v x̄ with x̄ = Σ_s x_s/T the same for
    every t, so E[y_t y_t'] = g²·Σ_{s,s'} K_ss'/T² = g²(q + (T - 1)c)/T for t = t' and t ≠ t' alike
    (output token correlation 1). Backward, every input token receives the same
    (W_o W_v)ᵀ Σ_t g_t/T, of power g²(G + (T - 1)gc)/T, also its cross covariance. No score path:
    there are no query or key weights.
    """
    g2 = (sigma * value_gain) ** 2 * (sigma * out_gain) ** 2
    out = g2 * (q + (T - 1) * c) / T
    back = g2 * (G + (T - 1) * gc) / T
    return out, out, back, back


# --- top-k MoE at init: numeric routing statistics ------------------------------------------
#
# Router of analysis/testbed/model.py: p = softmax(z) over all E experts, K = the k largest p, weights
# w_e = p_e / Σ_{K} p. The full-softmax normaliser cancels, so w is the softmax of the logits
# restricted to K: "softmax, then renormalise the top k" and "softmax over the top-k logits" are
# the same map. Logits z = W_r x with W_r ~ N(0, σ²/d) (no gain): independent over experts,
# variance s = σ²q, correlation ρ = c/q between two tokens. The statistics are
#   W2 = E Σ_e w_e²                    (forward: experts are independent MLPs)
#   Wx = E Σ_e w_se w_te                (forward cross-token factor, tokens s, t at correlation ρ)
#   R  = E Σ_{j∈K} w_j²[(1-w_j)² + Σ_{e∈K, e≠j} w_e²]   (router-path backward, own derivation:
#        y = Σ_{e∈K} w_e f_e and ∂w_e/∂z_j = w_e(δ_ej - w_j) for j ∈ K, 0 otherwise (K is locally
#        constant and w does not depend on unchosen logits), so ∂loss/∂z_j = w_j(a_j - Σ_e w_e a_e),
#        a_e = g·f_e ~ N(0, d·G·q_f) independent over e (fresh experts, g independent of them);
#        hence E(∂loss/∂z_j)² = d·G·q_f·w_j²[(1-w_j)² + Σ_{e≠j} w_e²], and W_rᵀ turns this into
#        per-coordinate power σ²/d · Σ_j E(∂loss/∂z_j)² = σ²·q_f·R·G.)
#
# Table (Monte Carlo, fixed seed, the same draws at every grid point so it is smooth):
# - K depends only on the direction of z, so the s → 0 limit is K = top k of a Gaussian, w = 1/k.
#   The s = 0 row is that limit. (Evaluating exactly s = 0 instead ties every logit, sends all
#   tokens to the same experts and gives Wx = W2 = 1/k; interpolated towards s = 0.25 this
#   overstated Wx by up to 180% for 0 < s < 0.25, e.g. E=8, k=2, s=0.1, ρ=0: 0.350 vs 0.125.)
# - Grids: s = 16(i/16)² and w = 1 - sqrt(1 - ρ) = j/16 (_MOE_R holds the ρ values, ascending),
#   bilinear in (s, w). Near ρ = 1 the chosen sets of two tokens differ with probability
#   ∝ sqrt(1 - ρ), so Wx is smooth in w, not in ρ; the former linear grid
#   ρ ∈ {0, .25, .5, .75, .9, 1} overstated Wx by 1.0–1.3% at ρ = 0.6 and by 3–6% at ρ = 0.95
#   (E=8,k=2 / E=4,k=1), and R by 2% at s = 6 (grid step 4 in s). Now table and interpolation
#   agree with direct Monte Carlo (4·10⁵ draws) within 0.6%, the table's own sampling noise.
# ρ is clamped to [0, 1] and s to [0, 16] (beyond: a nearly saturated router).

_MOE_S = [16.0 * (i / 16) ** 2 for i in range(17)]
_MOE_W = [j / 16 for j in range(17)]  # interpolation coordinate w = 1 - sqrt(1 - ρ)
_MOE_R = [1 - (1 - w) ** 2 for w in _MOE_W]  # the ρ grid, ascending from 0 to 1
_MOE_SAMPLES = 60000


def _topk(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices [n, k] of the k largest entries of each row of z (in no order), and their values
    shifted by the row maximum, transposed to [k, n] (fast reductions over k)."""
    idx = np.argpartition(-z, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(z, idx, 1)
    return idx, np.ascontiguousarray((top - top.max(1, keepdims=True)).T)


def _weights(top: np.ndarray) -> np.ndarray:
    """[S, k, n] renormalised top-k weights softmax(√s·top) for every s of the grid.

    s = 0 gives 1/k on the top k of the logits' direction: the s → 0 limit."""
    e = np.exp(np.sqrt(np.array(_MOE_S))[:, None, None] * top)  # top ≤ 0: no overflow
    return e / e.sum(1, keepdims=True)


@lru_cache(maxsize=16)
def moe_table(E: int, k: int) -> dict[str, np.ndarray]:
    """W2, Wx, R on the grid (_MOE_S, _MOE_R), arrays [len(_MOE_S), len(_MOE_R)] (numeric, MC).

    W2 and R do not depend on ρ (one token's routing); they are stored on the full grid anyway.
    Chosen sets depend on the logits' direction only, so they are drawn once per ρ and weighted
    for every s at once; Wx pairs each of token a's chosen experts with token b's weight on it.
    """
    if not 1 <= k <= E:
        raise ValueError(f"top-k {k} must be between 1 and the number of experts {E}")
    rng = np.random.default_rng(7)
    z1 = rng.standard_normal((_MOE_SAMPLES, E))
    z2 = rng.standard_normal((_MOE_SAMPLES, E))
    idx_a, top_a = _topk(z1, k)
    wa = _weights(top_a)  # [S, k, n]
    p2 = (wa ** 2).sum(1, keepdims=True)
    nr = len(_MOE_R)
    out = {"W2": np.repeat(p2.mean((1, 2))[:, None], nr, 1),
           "R": np.repeat((wa ** 2 * ((1 - wa) ** 2 + p2 - wa ** 2)).sum(1).mean(1)[:, None], nr, 1),
           "Wx": np.zeros((len(_MOE_S), nr))}
    for j, r in enumerate(_MOE_R):  # token b at correlation ρ with token a
        idx_b, top_b = _topk(r * z1 + math.sqrt(max(1 - r * r, 0.0)) * z2, k)
        match = idx_a[:, :, None] == idx_b[:, None, :]  # [n, k(a), k(b)]: at most one per row
        slot = np.ascontiguousarray(match.argmax(2).T)[None]  # b's slot of a's expert, [1, k, n]
        wb_at_a = np.take_along_axis(_weights(top_b), slot, 1) * match.any(2).T[None]
        out["Wx"][:, j] = (wa * wb_at_a).sum(1).mean(1)
    return out


def _bilinear(xs: list[float], ys: list[float], vals: list[list[float]], x: float, y: float
              ) -> float:
    # pure-Python bilinear interpolation on a clamped grid (fast for one scalar in a loop)
    x, y = min(max(x, xs[0]), xs[-1]), min(max(y, ys[0]), ys[-1])
    i = min(max(bisect.bisect_right(xs, x), 1), len(xs) - 1)
    j = min(max(bisect.bisect_right(ys, y), 1), len(ys) - 1)
    a = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    b = (y - ys[j - 1]) / (ys[j] - ys[j - 1])
    return ((vals[i - 1][j - 1] * (1 - b) + vals[i - 1][j] * b) * (1 - a)
            + (vals[i][j - 1] * (1 - b) + vals[i][j] * b) * a)


def moe_numeric(E: int, k: int) -> dict[str, Callable[[float, float], float]]:
    """Scalar functions W2(s, ρ), Wx(s, ρ), R(s, ρ): bilinear in (s, 1 - sqrt(1-ρ)) on the table."""
    tab = {name: vals.tolist() for name, vals in moe_table(int(E), int(k)).items()}

    def make(vals):
        return lambda s, r: _bilinear(_MOE_S, _MOE_W, vals, float(s),
                                      1 - math.sqrt(1 - min(max(float(r), 0.0), 1.0)))
    return {name: make(vals) for name, vals in tab.items()}


MoeW2 = sympy.Function("MoeW2")  # numeric: E Σ w²
MoeWx = sympy.Function("MoeWx")  # numeric: E Σ w_s w_t
MoeR = sympy.Function("MoeR")  # numeric: router-path backward factor


def moe_maps(q: sympy.Expr, c: sympy.Expr, G: sympy.Expr, gc: sympy.Expr, *, sigma: sympy.Expr,
             kind: str, in_gain: sympy.Expr = 1, out_gain: sympy.Expr = 1
             ) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr, sympy.Expr]:
    """(q_out, c_out, G_in, gc_in) of a top-k MoE of MLPs with a softmax router, at init.

    Output Σ_{e∈K} w_e f_e(x) with independent experts: q_out = W2·q_f, c_out = Wx·c_f; backward
    expert path W2·G_f, router path σ²·q_f·R·G (own derivation above); cross term expert path only.
    Not included: the router path's cross-token term σ²·c_f·gc·Rx, Rx = E Σ_j w_sj w_tj
    [(1-w_sj)(1-w_tj) + Σ_{e≠j} w_se w_te] (same derivation with E[a_se a_te] = d·gc·c_f); it
    affects gc_in only, and vanishes for k = 1. q_out, c_out and G_in agree with analysis.testbed.model.MoE
    by Monte Carlo to ≤ 0.5% / 1.6% / 0.5% (tests/test_theory_components.py).
    """
    qf, cf, Gf, gcf = ffn_maps(q, c, G, gc, sigma=sigma, kind=kind, in_gain=in_gain,
                               out_gain=out_gain)
    s, r = sigma ** 2 * q, c / q
    return (MoeW2(s, r) * qf, MoeWx(s, r) * cf,
            MoeW2(s, r) * Gf + sigma ** 2 * qf * MoeR(s, r) * G, MoeWx(s, r) * gcf)
