"""The spread across initializations: the O(1/d) fluctuation interpretation of a scheme's block.

Mean-field theory (theory/positional.py) predicts each statistic's average over initializations.
At finite width d every random matrix samples its rows, so a block's realized powers scatter about
their means by O(1/√d), and L blocks' scatters add up in the logarithm (Hanin & Nica 2019, arXiv
1812.05994: the log-variance of a product of random layers grows ∝ L/d). Here the same scheme
function runs once more over positional.py's token covariances, and every realized power carries,
beside its mean, a first-order fluctuation: a linear form over independent unit noises
(``Form``). Shared noises make correlated fluctuations correlated: the norm that divides the
forward aggregate by its realized size divides the gradient through it by the same size.

The noises, each derived for Gaussian weights given its input's token covariance (own
derivations; docs/theory.md#the-spread-across-initializations):

- a linear map to n coordinates samples them i.i.d., so the power of its output, whose token
  covariance is K, has relative variance 2·tr(K²)/(n·tr(K)²) (a quadratic form of Gaussians);
  attention's value and output projections and the FFN's output projection each add this term
  forward, their transposes backward (the value path's Γ);
- the FFN's n_h hidden units are i.i.d. given the input: the power of the output has relative
  variance Var_u(Σ_t φ(z_ut)²)/(n_h·E²), and the backward power Var_u(Σ_t φ'(z_ut)²ξ_ut²)/(n_h·E²)
  with ξ_u the unit's arriving gradient, N(0, Γ); the two share the units, and so their covariance
  (Gauss–Hermite quadrature of E[φ_s²φ_t²], E[φ'_s²φ'_t²], E[φ_s²φ'_t²]);
- two independent sources i, j summed into one value have a realized inner product of variance
  Σ_st a_is a_js a_it a_jt K_i,st K_j,st/(d·T²) (the cross term mean-field theory sets to 0),
  forward between the skip and each branch, backward between the gradients that meet;
- a norm divides by the realized power: its output has no power fluctuation, and the gradient
  through it is scaled by the same realized 1/√Q;
- the embedding samples d coordinates of each byte's vector: relative variance 2·tr(K₀²)/(d·tr(K₀)²).

- per token: each of these noises also makes the tokens' powers differ from one another, and a
  norm divides each token by its own; theory/token_spread.py carries that part (the "tokens"
  noise), the stream's and the gradient's per-token deviations from block to block.

Left out (second order, or not derived): fluctuations of the token cosines carried into later
maps, and the score path's own noise. Blocks are independent but for the noises they share (the
stream's realized power and, per token, its deviations), so variances of logs add along the
stack with the forms' shared terms.

The predicted median of a positive statistic X with mean-field mean m is m·exp(−Var(ln X)/2) (a
log-normal of that mean), so the typical value lies below the mean by the same O(L/d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from theory import components as C
from theory import positional as P
from theory.schemes import get_scheme
from theory.solve import TheoryConfig, check_correlations
from theory.tape import Node, walk_backward
from theory.token_spread import (TokenForm, chain, deviation, factor, injection, projection_cov,
                                 shares)


# --- first-order fluctuations: linear forms over independent unit noises ------------------------

class Form(dict):
    """A fluctuation: {noise id: coefficient}; its variance is the sum of squared coefficients."""

    def plus(self, other: "Form", c: float = 1.0) -> "Form":
        """self + c·other."""
        out = Form(self)
        for k, v in other.items():
            out[k] = out.get(k, 0.0) + c * v
        return out

    def times(self, c: float) -> "Form":
        """c·self."""
        return Form({k: c * v for k, v in self.items()})

    def var(self) -> float:
        """Variance (the noises are independent with unit variance)."""
        return float(sum(v * v for v in self.values()))


# the kinds of noise, each can be left out; "tokens": their per-token parts (theory/token_spread.py)
NOISES = ("projections", "units", "patterns", "cross", "embedding", "tokens")


class Noises:
    """Issues fresh noise ids, of the kinds switched on."""

    def __init__(self, kinds: tuple[str, ...] = NOISES) -> None:
        unknown = set(kinds) - set(NOISES)
        if unknown:
            raise ValueError(f"unknown noise {sorted(unknown)[0]} (known: {', '.join(NOISES)})")
        self.count, self.kinds = 0, frozenset(kinds)

    def new(self, sd: float, kind: str) -> Form:
        """A fresh unit noise times ``sd`` (nothing if ``kind`` is switched off)."""
        self.count += 1
        return Form({self.count: float(sd)}) if sd > 0 and kind in self.kinds else Form()

    def token_key(self, kind: str) -> tuple | None:
        """A fresh key for the per-token part of a noise of ``kind`` (None if it or the per-token
        channel is switched off)."""
        if not {kind, "tokens"} <= self.kinds:
            return None
        self.count += 1
        return ("t", self.count)


def _ratio(K: np.ndarray) -> float:
    """tr(K²)/tr(K)²: the inverse participation of a token covariance (1/T when tokens are
    orthogonal and equal, 1 when they are one vector)."""
    tr = float(np.trace(K))
    return float(np.sum(K * K)) / tr ** 2 if tr > 0 else 0.0


def sampling_var(K: np.ndarray, n: int) -> float:
    """Relative variance of the power of a Gaussian linear map's n i.i.d. output coordinates whose
    token covariance is K."""
    return 2.0 * _ratio(K) / n


def cross_sd(a: np.ndarray, Ki: np.ndarray, b: np.ndarray, Kj: np.ndarray, d: int) -> float:
    """Standard deviation of the token-mean realized inner product of independent sources i, j
    with per-token coefficients a, b (what the power of a·x_i + b·x_j holds beyond its mean)."""
    T = Ki.shape[0]
    A, B = np.outer(a, a) * Ki, np.outer(b, b) * Kj
    return math.sqrt(max(float(np.sum(A * B)), 0.0) / d) / T


# --- the FFN's hidden units: fourth moments of the activation --------------------------------------

_ACT = {"gelu": (lambda x: x * _Phi(x), lambda x: _Phi(x) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)),
        "relu": (lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(float))}


def _Phi(x: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr
    return ndtr(x)


_R_GRID = np.linspace(-1.0, 1.0, 65)


@lru_cache(maxsize=64)
def unit_moments(kind: str, q: float) -> dict[str, np.ndarray]:
    """E[φ(u)²φ(v)²], E[φ'(u)²φ'(v)²], E[φ(u)²φ'(v)²] for (u, v) Gaussian, variance q each, on a
    grid of their correlation r; and E[φ²], E[φ'²] (tensor Gauss–Hermite quadrature)."""
    if kind not in _ACT:
        raise ValueError(f"the spread theory covers ffn gelu and relu, not '{kind}'")
    f, df = _ACT[kind]
    z1, z2 = np.meshgrid(C._GH_X, C._GH_X, indexing="ij")
    w = np.outer(C._GH_W, C._GH_W)
    s = math.sqrt(q)
    out = {"ff": [], "dd": [], "fd": []}
    for r in _R_GRID:
        u, v = s * z1, s * (r * z1 + math.sqrt(max(1 - r * r, 0.0)) * z2)
        out["ff"].append(float((w * f(u) ** 2 * f(v) ** 2).sum()))
        out["dd"].append(float((w * df(u) ** 2 * df(v) ** 2).sum()))
        out["fd"].append(float((w * f(u) ** 2 * df(v) ** 2).sum()))
    res = {k: np.array(v) for k, v in out.items()}
    res["f2"] = np.array(float((C._GH_W * f(s * C._GH_X) ** 2).sum()))
    res["d2"] = np.array(float((C._GH_W * df(s * C._GH_X) ** 2).sum()))
    return res


def _pairs(table: np.ndarray, S: np.ndarray) -> np.ndarray:
    dg = np.sqrt(np.diag(S))
    r = np.clip(S / np.outer(dg, dg), -1.0, 1.0)
    return np.interp(r, _R_GRID, table)


def ffn_unit_noise(kind: str, S: np.ndarray, Gamma: np.ndarray | None, n_units: int
                   ) -> tuple[float, float, float]:
    """Relative variances of the FFN's forward output power and backward input-gradient power from
    sampling n_units hidden units, and their covariance; S is the pre-activation token covariance,
    Gamma the gradient arriving at the units (None: forward only)."""
    q = float(np.mean(np.diag(S)))
    m = unit_moments(kind, round(q, 4))
    T = S.shape[0]
    ef = T * float(m["f2"])
    var_f = (float(_pairs(m["ff"], S).sum()) - ef ** 2) / ef ** 2
    if Gamma is None:
        return var_f / n_units, 0.0, 0.0
    gd = np.diag(Gamma)
    eb = float(m["d2"]) * float(gd.sum())
    second = _pairs(m["dd"], S) * (np.outer(gd, gd) + 2 * Gamma ** 2)
    var_b = (float(second.sum()) - eb ** 2) / eb ** 2
    cov = (float((_pairs(m["fd"], S) * gd[None, :]).sum()) - ef * eb) / (ef * eb)
    return var_f / n_units, var_b / n_units, cov / n_units


# --- attention's heads: each samples one softmax pattern -----------------------------------------

PATTERN_DRAWS = 128  # sampled heads per attention call (fixed seed): the variance to ~13 %


_LAST_PATTERNS: dict[tuple, np.ndarray] = {}  # the last call's draws: forward and backward, scalar and per token, read the same heads


def _patterns(S: np.ndarray, head_dim: int, sigma: float, kind: str, seed: int) -> np.ndarray:
    """PATTERN_DRAWS heads' attention matrices for tokens of covariance S: logits a_s·b_i/√d_h
    with a, b Gaussian of token covariance σ²S per coordinate (the model's q·k/√d_h at init)."""
    key = (S.tobytes(), head_dim, sigma, kind, seed)
    if key not in _LAST_PATTERNS:
        _LAST_PATTERNS.clear()
        _LAST_PATTERNS[key] = sample_patterns(S, head_dim, sigma, kind, seed)
    return _LAST_PATTERNS[key]


def sample_patterns(S: np.ndarray, head_dim: int, sigma: float, kind: str, seed: int,
                    draws: int = PATTERN_DRAWS) -> np.ndarray:
    """``draws`` heads' attention matrices (draws × T × T) for tokens of covariance S, from the
    logits a_s·b_i/√d_h with a, b Gaussian of token covariance σ²S (seeded: the same heads
    every call)."""
    w, V = np.linalg.eigh(S)
    # the symmetric root: unlike V·√w it does not depend on which eigenvector basis (signs,
    # rotations within repeated eigenvalues) the LAPACK build returns, so the seeded draws below
    # give the same heads on every machine
    root = (V * np.sqrt(np.clip(w, 0.0, None))) @ V.T
    rng = np.random.default_rng(seed)
    T = S.shape[0]
    a = root @ rng.standard_normal((draws, T, head_dim)) * sigma
    b = root @ rng.standard_normal((draws, T, head_dim)) * sigma
    z = a @ b.transpose(0, 2, 1) / math.sqrt(head_dim)
    if kind == "causal":
        z = np.where(np.tril(np.ones((T, T), bool)), z, -np.inf)
    elif kind == "uniform":
        z = np.zeros_like(z)
    z = z - z.max(axis=2, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=2, keepdims=True)


def pattern_noise(S: np.ndarray, Gamma: np.ndarray | None, *, heads: int, head_dim: int,
                  sigma: float = 1.0, kind: str = "causal", seed: int = 0
                  ) -> tuple[float, float, float]:
    """Relative variances of attention's forward output power tr(P S Pᵀ) and backward value-path
    power tr(Pᵀ Γ P) from averaging ``heads`` random patterns, and their covariance (the
    expectation over one head's pattern, by PATTERN_DRAWS fixed-seed draws)."""
    P = _patterns(S, head_dim, sigma, kind, seed)
    fwd = ((P @ S) * P).sum(axis=(1, 2))
    var_f = float(np.var(fwd, ddof=1) / np.mean(fwd) ** 2) / heads
    if Gamma is None:
        return var_f, 0.0, 0.0
    bwd = ((Gamma @ P) * P).sum(axis=(1, 2))  # tr(Pᵀ Γ P)
    var_b = float(np.var(bwd, ddof=1) / np.mean(bwd) ** 2) / heads
    cov = float(np.cov(fwd, bwd)[0, 1] / (np.mean(fwd) * np.mean(bwd))) / heads
    return var_f, var_b, cov


def pattern_token_cov(S: np.ndarray, *, heads: int, head_dim: int, sigma: float = 1.0,
                      kind: str = "causal", seed: int = 0) -> np.ndarray:
    """Per-token covariance of the relative fluctuation of attention's output powers
    diag(P S Pᵀ) from averaging ``heads`` random patterns (pattern_noise's draws)."""
    P = _patterns(S, head_dim, sigma, kind, seed)
    fwd = ((P @ S) * P).sum(axis=2)  # diag(P S Pᵀ) per draw
    rel = fwd / fwd.mean(axis=0)
    return np.atleast_2d(np.cov(rel, rowvar=False)) / heads


def unit_token_cov(kind: str, S: np.ndarray, n_units: int) -> np.ndarray:
    """Per-token covariance of the relative fluctuation of the FFN's output powers from
    sampling n_units hidden units (S: the pre-activation token covariance)."""
    m = unit_moments(kind, round(float(np.mean(np.diag(S))), 4))
    f2 = float(m["f2"])
    return (_pairs(m["ff"], S) - f2 ** 2) / (n_units * f2 ** 2)


def pattern_token_cov_backward(S: np.ndarray, Gamma: np.ndarray, *, heads: int, head_dim: int,
                               sigma: float = 1.0, kind: str = "causal", seed: int = 0) -> np.ndarray:
    """Per-token covariance of the relative fluctuation of the value path's gradient powers
    diag(Pᵀ Γ P) from averaging ``heads`` random patterns (the forward's draws)."""
    P = _patterns(S, head_dim, sigma, kind, seed)
    bwd = ((Gamma @ P) * P).sum(axis=1)  # diag(Pᵀ Γ P) per draw
    mean = np.where(bwd.mean(axis=0) > 0, bwd.mean(axis=0), 1.0)
    return np.atleast_2d(np.cov(bwd / mean, rowvar=False)) / heads


def unit_token_cov_backward(kind: str, S: np.ndarray, Gamma: np.ndarray, n_units: int) -> np.ndarray:
    """Per-token covariance of the relative fluctuation of the FFN's input-gradient powers from
    sampling n_units hidden units (S: pre-activation covariance, Gamma: arriving gradient's)."""
    m = unit_moments(kind, round(float(np.mean(np.diag(S))), 4))
    gd = np.diag(Gamma)
    mean = np.outer(float(m["d2"]) * gd, float(m["d2"]) * gd)
    second = _pairs(m["dd"], S) * (np.outer(gd, gd) + 2 * Gamma ** 2)
    return (second - mean) / (n_units * np.where(mean > 0, mean, 1.0))


# --- the block run with fluctuations ---------------------------------------------------------------

class Amp:
    """A gradient amplitude per token with its relative fluctuation: the token mean's (``rel``)
    and the per-token deviation (``tok``) (walk_backward's algebra)."""

    __slots__ = ("a", "rel", "tok")

    def __init__(self, a: Any, rel: Form, tok: TokenForm | None = None):
        self.a, self.rel, self.tok = a, rel, TokenForm() if tok is None else tok

    def __add__(self, other: "Amp") -> "Amp":
        a = self.a + other.a
        w = float(np.mean(np.abs(self.a))), float(np.mean(np.abs(other.a)))
        tot = w[0] + w[1]
        rel = self.rel.times(w[0] / tot).plus(other.rel, w[1] / tot) if tot > 0 else Form()
        tok = TokenForm()
        if self.tok or other.tok:  # per token, each path's share of the amplitude
            x, y = np.abs(np.broadcast_to(self.a, np.shape(a))), np.abs(np.broadcast_to(other.a, np.shape(a)))
            t = np.where(x + y > 0, x + y, 1.0)
            tok = self.tok.times(x / t).plus(other.tok, y / t)
        return Amp(a, rel, tok)

    def __mul__(self, c: Any) -> "Amp":
        if isinstance(c, Amp):
            return Amp(self.a * c.a, self.rel.plus(c.rel), self.tok.plus(c.tok))
        return Amp(self.a * c, self.rel, self.tok)

    __rmul__ = __mul__


@dataclass
class _Sub:
    """What a sublayer's noises need from its forward pass."""

    kind: str
    S: np.ndarray  # input token covariance
    pre: np.ndarray  # the FFN's pre-activation covariance (attention: S)
    unit_id: Form  # the forward noise of the FFN's hidden units or the heads' patterns (unit
    # variance), which the backward shares
    seed: int = 0  # the pattern draws' seed


class _Ctx(P._Ctx):
    """positional._Ctx that also records each value's and source's first-order fluctuation."""

    def __init__(self, st: P.Setting, cov_in: np.ndarray, stream: Form, noises: Noises,
                 hidden: int, heads: int, stream_tokens: bool = True):
        super().__init__(st, cov_in)
        self.noises, self.hidden, self.heads = noises, hidden, heads
        self.src_log: list[Form] = [stream]  # δ ln (power) of each source
        self.rel: dict[int, dict[int, Form]] = {0: {0: Form()}}  # node → source → δ(coefficient)/coefficient
        self.agg: tuple[float, Form] | None = None  # the last norm's input: (Q, δQ/Q)
        self.cross_ids: dict[tuple, Form] = {}  # one realized inner product per pair of sources
        self.gains: dict[str, Any] = {}  # the sublayer call being emitted: its gains
        # the per-token channel (theory/token_spread.py): each source's per-token deviation of
        # δ ln(power), each node's of its coefficients; the block input's is ε_in ("in")
        self.tokens = "tokens" in noises.kinds
        self.tok_src: list[TokenForm] = [TokenForm({"in": np.eye(self.T)}) if stream_tokens
                                         else TokenForm()]
        self.tok_rel: dict[int, dict[int, TokenForm]] = {0: {0: TokenForm()}}
        self.tok_cross: dict[tuple, np.ndarray] = {}
        self.agg_tok: tuple[TokenForm, np.ndarray] | None = None  # the last norm's input

    def power(self, v: P._Value) -> tuple[float, Form]:
        """Token-mean power of a value and its relative fluctuation δQ/Q."""
        rel = self.rel[v.node]
        parts = [(i, a, self.sources[i]) for i, a in v.terms.items()]
        Q = sum(float(np.mean(a * a * np.diag(K))) for _, a, K in parts)
        dQ = Form()
        for i, a, K in parts:
            share = float(np.mean(a * a * np.diag(K)))
            dQ = dQ.plus(self.src_log[i].plus(rel[i], 2.0), share)
        for x in range(len(parts)):
            for y in range(x + 1, len(parts)):
                (i, a, Ki), (j, b, Kj) = parts[x], parts[y]
                dQ = dQ.plus(self._cross(("f", i, j), cross_sd(a, Ki, b, Kj, self.st.width)), 2.0)
        return Q, dQ.times(1.0 / Q)

    def power_tok(self, v: P._Value) -> TokenForm:
        """The per-token deviation of a value's δ ln(power) per token."""
        if not self.tokens:
            return TokenForm()
        rel = self.tok_rel[v.node]
        parts = [(i, a, self.sources[i]) for i, a in v.terms.items()]
        q = sum(a * a * np.diag(K) for _, a, K in parts)
        q = np.where(q > 0, q, 1.0)
        out = TokenForm()
        for i, a, K in parts:
            out = out.plus(self.tok_src[i].plus(rel[i], 2.0), a * a * np.diag(K) / q)
        pairs = range(len(parts)) if "cross" in self.noises.kinds else range(0)
        for x in pairs:
            for y in range(x + 1, len(parts)):
                (i, a, Ki), (j, b, Kj) = parts[x], parts[y]
                key = ("x", i, j)
                if key not in self.tok_cross:  # the pair's realized inner product per token
                    self.tok_cross[key] = factor(Ki * Kj / self.st.width)
                M = (2 * a * b / q)[:, None] * self.tok_cross[key]
                out = out.plus(TokenForm({key: deviation(M, q / q.sum())}))
        return out

    def _cross(self, key: tuple, sd: float) -> Form:
        """The realized inner product of a pair of sources, whichever value holds both."""
        if key not in self.cross_ids:
            self.cross_ids[key] = self.noises.new(1.0, "cross")
        return self.cross_ids[key].times(sd)

    def combine(self, parts: list[tuple[P._Value, float]]) -> P._Value:
        out = super().combine(parts)
        rel: dict[int, Form] = {}
        for i in out.terms.keys():
            wsum = sum(abs(c) * float(np.mean(np.abs(v.terms[i]))) for v, c in parts if i in v.terms)
            f = Form()
            for v, c in parts:
                if i in v.terms and wsum > 0:
                    f = f.plus(self.rel[v.node][i], abs(c) * float(np.mean(np.abs(v.terms[i]))) / wsum)
            rel[i] = f
        self.rel[out.node] = rel
        if self.tokens:  # the same, token by token
            tok: dict[int, TokenForm] = {}
            for i in out.terms.keys():
                wts = [(v, abs(c) * np.abs(v.terms[i])) for v, c in parts if i in v.terms]
                wsum = sum(w for _, w in wts)
                wsum = np.where(wsum > 0, wsum, 1.0)
                f = TokenForm()
                for v, w in wts:
                    f = f.plus(self.tok_rel[v.node][i], w / wsum)
                tok[i] = f
            self.tok_rel[out.node] = tok
        return out

    def norm(self, v: P._Value, *, lr: Any = 1) -> P._Value:
        Q, dQ = self.power(v)
        dq = self.power_tok(v)
        self.agg, self.agg_tok = (Q, dQ), (dq, self.cov(v))
        out = super().norm(v, lr=lr)
        node = self.nodes[out.node]
        parent, scale = node.parents[0]
        # the gradient through the norm is scaled by the same realized 1/√Q, token by token
        node.parents[0] = (parent, Amp(scale, dQ.times(-0.5), dq.times(-0.5)))
        self.rel[out.node] = {i: self.rel[v.node][i].plus(dQ, -0.5) for i in v.terms}
        if self.tokens:
            self.tok_rel[out.node] = {i: self.tok_rel[v.node][i].plus(dq, -0.5) for i in v.terms}
        return out

    def _emit(self, kind: str, v: P._Value, K: np.ndarray, backward: Callable) -> P._Value:
        S = self.cov(v)
        _, dQin = self.power(v)
        d = self.st.width
        seed = self.noises.count
        if kind == "attn":  # the heads' patterns; value and output projections, d coordinates each
            var_p, _, _ = pattern_noise(S, None, heads=self.heads, head_dim=d // self.heads,
                                        sigma=self.st.sigma, kind=self.st.attention, seed=seed)
            unit = self.noises.new(1.0, "patterns")
            own = unit.times(math.sqrt(var_p)).plus(
                self.noises.new(math.sqrt(2 * sampling_var(K, d)), "projections"))
        else:  # hidden units, then the output projection
            var_units, _, _ = ffn_unit_noise(self.st.ffn, self._preact(S), None, self.hidden)
            unit = self.noises.new(1.0, "units")
            own = unit.times(math.sqrt(var_units)).plus(
                self.noises.new(math.sqrt(sampling_var(K, d)), "projections"))
        # a sublayer whose input is not normalized follows its input's size (forward; every
        # registered scheme normalizes its sublayers' inputs, so the backward leaves it out)
        sens = (_log_slope(lambda s: float(np.trace(self._map(kind, S * s))), float(np.trace(K)))
                if dQin else 0.0)
        out = super()._emit(kind, v, K, backward)
        self.src_log.append(own.plus(dQin, sens))
        self.rel[out.node] = {len(self.sources) - 1: Form()}
        if self.tokens:  # the same noises' per-token deviations (an input's own are left out)
            if kind == "attn":
                parts = {"patterns": lambda: pattern_token_cov(
                             S, heads=self.heads, head_dim=d // self.heads, sigma=self.st.sigma,
                             kind=self.st.attention, seed=seed),
                         "projections": lambda: 2 * projection_cov(K, d)}
            else:
                parts = {"units": lambda: unit_token_cov(self.st.ffn, self._preact(S), self.hidden),
                         "projections": lambda: projection_cov(K, d)}
            tok = TokenForm()
            for noise, cov in parts.items():
                key = self.noises.token_key(noise)
                if key is not None:
                    tok[key] = injection(cov(), K)
            self.tok_src.append(tok)
            self.tok_rel[out.node] = {len(self.sources) - 1: TokenForm()}
        pre = self._preact(S) if kind == "ffn" else S
        self.nodes[out.node].sub["spread"] = _Sub(kind, S, pre, unit, seed)
        return out

    def attn(self, v: P._Value, **gains: Any) -> P._Value:
        """positional's attention, its gains kept for the noises."""
        self.gains = gains
        return super().attn(v, **gains)

    def ffn(self, v: P._Value, **gains: Any) -> P._Value:
        """positional's FFN, its gains kept for the noises."""
        self.gains = gains
        return super().ffn(v, **gains)

    def _preact(self, S: np.ndarray) -> np.ndarray:
        """The FFN's pre-activation token covariance."""
        return (float(self.gains.get("in_gain", 1)) * self.st.sigma) ** 2 * S

    def _map(self, kind: str, S: np.ndarray) -> np.ndarray:
        """The sublayer's mean output covariance at input covariance S."""
        g = {k: float(v) for k, v in self.gains.items() if k not in ("lr", "out_lr")}
        if kind == "attn":
            return P.ATTENTION[self.st.attention](S, sigma=self.st.sigma, **g)[0]
        return P.ffn(S, self.st, g.get("in_gain", 1.0), g.get("out_gain", 1.0))[0]


def _log_slope(fn: Callable[[float], float], at_one: float, h: float = 1e-3) -> float:
    return (math.log(fn(1 + h)) - math.log(at_one)) / math.log(1 + h) if at_one > 0 else 0.0


def _token_jacobian(backward: Callable, G: np.ndarray, src: np.ndarray) -> np.ndarray:
    """J[s, t] = ∂ ln src_ss / ∂δ_t: how a sublayer's backward map (linear in G) passes a
    relative fluctuation δ_t of the arriving gradient power at token t (G → DGD, D = 1 + δ/2)."""
    T = G.shape[0]
    J = np.zeros((T, T))
    dg = np.where(np.diag(src) > 0, np.diag(src), 1.0)
    for t in range(T):
        dG = np.zeros((T, T))
        dG[t, :] += G[t, :] / 2
        dG[:, t] += G[:, t] / 2
        J[:, t] = np.diag(backward(dG)) / dg
    return J


def _backward(ctx: _Ctx, out: P._Value, grad_out: np.ndarray, top: Form, head: bool = False
              ) -> tuple[np.ndarray, Form, TokenForm]:
    """Gradient covariance at the block input, its relative power fluctuation, and that
    power's per-token deviation (token_spread: keys "gin" for the gradient arriving at the block
    output, "in" for the stream's, and the block's own noises); ``head``: the gradient comes
    straight from the LM head (positional.from_head)."""
    gsrc: list[np.ndarray] = [P.from_head(ctx, out, grad_out) if head else grad_out]
    glog: list[Form] = [top]
    gtok: list[TokenForm] = [TokenForm({"gin": np.eye(ctx.T)}) if ctx.tokens else TokenForm()]
    d = ctx.st.width

    def power(amps: dict[int, Amp]) -> tuple[np.ndarray, Form, TokenForm]:
        total = np.zeros((ctx.T, ctx.T))
        parts = []
        for j, a in amps.items():
            M = np.outer(a.a, a.a) * gsrc[j]
            total += M
            parts.append((j, a))
        G = float(np.mean(np.diag(total)))
        per = np.where(np.diag(total) > 0, np.diag(total), 1.0)
        dG, dtok = Form(), TokenForm()
        for j, a in parts:
            per_token = np.broadcast_to(a.a * a.a * np.diag(gsrc[j]), (ctx.T,))
            dG = dG.plus(glog[j].plus(a.rel, 2.0), float(np.mean(per_token)))
            if ctx.tokens:
                dtok = dtok.plus(gtok[j].plus(a.tok, 2.0), per_token / per)
        for x in range(len(parts)):
            for y in range(x + 1, len(parts)):
                (j, a), (k, b) = parts[x], parts[y]
                sd = cross_sd(a.a, gsrc[j], b.a, gsrc[k], d)
                dG = dG.plus(ctx._cross(("b", j, k), sd), 2.0)
                if ctx.tokens and "cross" in ctx.noises.kinds:  # per token, as forward
                    key = ("bx", j, k)
                    if key not in ctx.tok_cross:
                        ctx.tok_cross[key] = factor(gsrc[j] * gsrc[k] / d)
                    M = (2 * np.broadcast_to(a.a * b.a, (ctx.T,)) / per)[:, None] * ctx.tok_cross[key]
                    dtok = dtok.plus(TokenForm({key: deviation(M, per / per.sum())}))
        return total, dG.times(1.0 / G) if G > 0 else Form(), dtok

    def sublayer(node: Node, arriving: tuple[np.ndarray, Form, TokenForm]) -> int:
        Gm, dG, dtok = arriving
        src = node.sub["backward"](Gm)
        sub = node.sub["spread"]
        if sub.kind == "attn":  # the same heads' patterns; output and value projections' transposes
            var_f, var_b, cov = pattern_noise(sub.S, Gm, heads=ctx.heads, head_dim=d // ctx.heads,
                                              sigma=ctx.st.sigma, kind=ctx.st.attention,
                                              seed=sub.seed)
            kind, n_proj = "patterns", 2
        else:  # the same hidden units; the input projection's transpose
            var_f, var_b, cov = ffn_unit_noise(ctx.st.ffn, sub.pre, Gm, ctx.hidden)
            kind, n_proj = "units", 1
        sf = math.sqrt(var_f) if var_f > 0 else 0.0
        c = cov / sf if sf > 0 else 0.0  # on the forward noise of the same units or heads
        rest = math.sqrt(max(var_b - c * c, 0.0))
        own = sub.unit_id.times(c).plus(ctx.noises.new(rest, kind)).plus(
            ctx.noises.new(math.sqrt(n_proj * sampling_var(src, d)), "projections"))
        gsrc.append(src)
        glog.append(dG.plus(own))
        if ctx.tokens:  # the arriving deviation carried through the map, and the map's own
            J = _token_jacobian(node.sub["backward"], Gm, src)
            tok = TokenForm({k: J @ M for k, M in dtok.items()})
            parts = {"projections": lambda: n_proj * projection_cov(src, d)}
            if sub.kind == "attn":
                parts[kind] = lambda: pattern_token_cov_backward(
                    sub.S, Gm, heads=ctx.heads, head_dim=d // ctx.heads, sigma=ctx.st.sigma,
                    kind=ctx.st.attention, seed=sub.seed)
            else:
                parts[kind] = lambda: unit_token_cov_backward(ctx.st.ffn, sub.pre, Gm, ctx.hidden)
            for noise, cov_fn in parts.items():
                key = ctx.noises.token_key(noise)
                if key is not None:
                    tok[key] = injection(cov_fn(), src)
            gtok.append(tok)
        else:
            gtok.append(TokenForm())
        return len(gsrc) - 1

    return walk_backward(ctx.nodes, out.node, Amp(np.ones(ctx.T), Form()), power, sublayer,
                         projected=not head)


# --- the profile -----------------------------------------------------------------------------------

SPREAD_KEYS = ("var_ln_q", "var_ln_g", "var_ln_block")


def predict_spread(scheme: str, *, depth: int, seq_len: int = 64, hidden: int | None = None,
                   scheme_params: dict[str, Any] | None = None, q0: float | None = None,
                   rho0: float = 0.0, rho_g: float = 0.0, cov0: np.ndarray | None = None,
                   grad_top: np.ndarray | None = None, noises: tuple[str, ...] = NOISES,
                   **shape: Any) -> dict[str, np.ndarray]:
    """Per layer l = 0..depth: positional.py's mean profile plus the predicted variance across
    initializations of ln q_l (the stream, or the aggregate before an output norm), of
    ln(g_l/g_L), and of block l's own factor ln(g_{l-1}/g_l) (``var_ln_block``, l ≥ 1: their sum
    is what the blocks would give if independent; the rest of var_ln_g is their covariance
    through shared noises). ``hidden``: the FFN's hidden width (default 4·width); ``noises``: the
    kinds of noise counted (all of NOISES; fewer to see each one's share)."""
    cfg = TheoryConfig(scheme=scheme, depth=depth, seq_len=seq_len,
                       scheme_params=tuple(sorted((scheme_params or {}).items())), **shape)
    cfg.validate()
    if cfg.experts:
        raise ValueError("the spread theory covers dense FFNs, not MoE")
    s = get_scheme(scheme)
    L, T = int(depth), int(seq_len)
    params = {k: float(v) for k, v in s.resolve(L, **(scheme_params or {})).items()}
    check_correlations(rho0, rho_g, T)
    st = P.Setting(int(cfg.width), T, float(cfg.sigma), cfg.ffn, cfg.norm, 0, 2, cfg.attention)
    hidden = int(hidden or 4 * cfg.width)
    cov = cov_embed = P.embedding_covariance(T, cfg.embed_std ** 2 if q0 is None else q0, rho0, cov0)
    noises = Noises(tuple(noises))
    stream = noises.new(math.sqrt(sampling_var(cov, st.width)), "embedding")  # d coordinates
    out = {k: np.full(L + 1, np.nan) for k in ("q", "g", *SPREAD_KEYS)}
    out["q"][0], out["var_ln_q"][0] = float(np.mean(np.diag(cov))), stream.var()
    blocks, tok_blocks, normed = [], [], False
    for l in range(1, L + 1):
        ctx = _Ctx(st, cov, stream, noises, hidden, int(cfg.heads), stream_tokens=not normed)
        res_out = s.block(P._Value(ctx, {0: np.ones(T)}, 0), ctx, l=l, L=L, **params)
        cov = ctx.cov(res_out)
        normed = ctx.nodes[res_out.node].kind == "norm"
        if normed:
            stream = Form()  # normalized: every token's realized power is exactly its mean
            Qa, dQa = ctx.agg
            out["q"][l], out["var_ln_q"][l] = Qa, dQa.var()
            passed, (dq, Sa) = TokenForm(), ctx.agg_tok
            stat = dq.contract(shares(Sa))
        else:
            Q, stream = ctx.power(res_out)
            out["q"][l], out["var_ln_q"][l] = Q, stream.var()
            passed = ctx.power_tok(res_out)
            stat = passed.contract(shares(cov))
        ctx.tok_rel = {}  # the backward needs only the norms' amplitudes, kept on the tape
        blocks.append((ctx, res_out))
        tok_blocks.append({"M": passed, "q": stat})
    grad = ((1 - rho_g) * np.eye(T) + rho_g * np.ones((T, T)) if grad_top is None
            else P._square(grad_top, T, "grad_top"))
    top = float(np.mean(np.diag(grad)))
    dG = Form()
    out["g"][L], out["var_ln_g"][L] = 1.0, 0.0
    for l in range(L, 0, -1):
        ctx, res_out = blocks[l - 1]
        tok_blocks[l - 1]["w_out"] = shares(grad)
        grad, rel, tok_blocks[l - 1]["G"] = _backward(ctx, res_out, grad, dG,
                                                      head=P.reads_head(s, l, L, ctx, res_out))
        tok_blocks[l - 1]["w_in"] = shares(grad)
        out["var_ln_block"][l] = rel.plus(dG, -1.0).var()
        dG = rel
        out["g"][l - 1], out["var_ln_g"][l - 1] = float(np.mean(np.diag(grad))) / top, dG.var()
    if "tokens" in noises.kinds:  # the per-token channel, independent of the token mean's
        embed = (injection(projection_cov(cov_embed, st.width), cov_embed)
                 if "embedding" in noises.kinds else np.zeros((T, 1)))
        for key, extra in chain(tok_blocks, embed).items():
            first = 1 if key == "var_ln_block" else 0  # no block 0
            out[key][first:] += extra[first:]
    return out


def median_from_mean(mean: float, var_ln: float) -> float:
    """The median of a log-normal statistic with this mean and variance of its logarithm."""
    return mean * math.exp(-var_ln / 2)
