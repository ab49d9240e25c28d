"""Position-resolved interpretation: the scheme's block run over token-by-token covariances.

The scalar interpreter (theory/interpreter.py) averages every moment over the sequence: one
second moment q and one cross-token covariance c per value. That average is exact for
position-wise maps (norms, FFNs) but not for causal attention, whose backward sends token t's
gradient to every earlier key s ≤ t with weight ≈ 1/t. Iterated over blocks, the early tokens'
gradients compound — the *product* of per-position gains, which the averaged recurrence (a gain
of averages) misses. Measured at init, deep PostNorm routes almost all gradient power into the
first token (``tests/test_theory_positional.py`` and the README figures show it).

Here the same scheme function runs over values whose moments are T×T matrices:

- forward: a value is a sum of independent sources, each with a token covariance matrix
  K_st = E[x_s·x_t]/d, scaled per token (a norm divides token s by √Q_s);
- ``op.attn``: K_out = g²·E[P Σ Pᵀ] with E[P_si] = 1/s (exchangeable keys) and the softmax
  fluctuation C_s(v_s) = E Σ_i P_si² on the diagonal, v_s the query's logit variance (causal;
  bidirectional attention the same with every query over all T keys, uniform attention the
  exact mean over all T tokens: see bidirectional_attention, uniform_attention); causal attention
  adds its finite-width value–weight alignment term, O(1/d) (derived in attention());
- ``op.ffn``: the kernel maps of components.py applied entry by entry;
- backward: the same tape rules as the scalar interpreter (amplitudes per token along
  deterministic paths, fresh gradient sources from sublayers, a norm's projection once per
  source), with gradient covariance matrices Γ_st.

It is numeric (numpy, float64) and costs O(T³) per block, so it complements the symbolic
recurrence (closed forms, claims, depth 10^4 in 0.1 s) rather than replacing it; the sweep
compares measurements with both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import sympy

from theory import components as C
from theory.schemes import Scheme, get_scheme
from theory.solve import TheoryConfig, check_correlations, check_q0
from theory.tape import Node, SourceValue, walk_backward

_EPS = float(C.EPS)
HELD_ENTRIES = 2 ** 24  # forward covariances' entries kept in full (128 MB); beyond, checkpoints
PROFILE_KEYS = ("q", "q_agg", "rho", "g", "rg", "cos", "g_first")


# --- entry-wise kernels ------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _kernel_fns(kind: str) -> tuple[Callable, Callable]:
    """Numpy versions of components' activation kernels K(q, c), K'(q, c) (equal variances)."""
    if kind == "silu":
        return _silu_table(C._num_silu_kernel), _silu_table(C._num_silu_dkernel)
    qs, cs = sympy.symbols("q c", positive=True)
    K, dK = C.KERNELS[kind]
    # acos/asin/sqrt clamp rounding past their domain's edge (components.NUMPY_MATH)
    mods = [C.NUMPY_MATH, "numpy"]
    return (sympy.lambdify((qs, cs), K(qs, cs), mods), sympy.lambdify((qs, cs), dK(qs, cs), mods))


def _silu_table(fn: Callable[[float, float], float]) -> Callable:
    # SiLU has no closed form (components: 2-D quadrature per entry, too slow for T² entries):
    # interpolate in the correlation r at the mean variance, then rescale by q (numeric)
    grid = np.linspace(-1.0, 1.0, 129)

    @lru_cache(maxsize=64)
    def at(qr: float) -> np.ndarray:
        return np.array([fn(qr, qr * r) for r in grid])

    def k(q: np.ndarray, c: np.ndarray) -> np.ndarray:
        q_mean = float(np.mean(q))
        table = at(round(q_mean, 6))
        return np.interp(np.clip(c / q, -1, 1), grid, table) * (q / q_mean)
    return k


def _pairwise(kernel: Callable, S: np.ndarray) -> np.ndarray:
    """K(S) entry by entry; token variances differ only when the FFN input is not normalized,
    and then the pair uses the geometric mean variance (exact for ReLU, approximate otherwise)."""
    d = np.diag(S)
    qq = np.sqrt(np.outer(d, d))
    return kernel(qq, np.clip(S, -qq, qq))


# --- the value algebra ---------------------------------------------------------------------------

class _Value(SourceValue):
    """A value: {source: per-token coefficient vector} and the tape node that made it."""

    __slots__ = ()
    coerce = staticmethod(float)


@dataclass(frozen=True)
class Setting:
    """The numbers a position-resolved block needs."""

    width: int
    seq_len: int
    sigma: float = 1.0
    ffn: str = "gelu"
    norm: str = "layernorm"
    experts: int = 0
    top_k: int = 2
    attention: str = "causal"  # theory.shape.ATTENTION_KINDS
    realized_norm: str = ""  # which norms' backward divides by the realized power (_jensen): REALIZED_NORM


REALIZED_NORM = {False: "", True: "branch", "": "", "branch": "branch", "all": "all"}


class _Ctx:
    """The numeric vocabulary over token covariance matrices, recording a tape."""

    def __init__(self, st: Setting, cov_in: np.ndarray, fixed_in: tuple[np.ndarray, ...] = ()):
        self.st = st
        self.T = cov_in.shape[0]
        self.sources: list[np.ndarray] = [cov_in]
        self.nodes: list[Node] = [Node("input", [])]
        self.last_norm_input: np.ndarray | None = None
        # the parts of fixed per-token power in each node's value (norm outputs, whose power does
        # not scatter): {node: {part: amplitude}}, and each part's per-token power
        self.fixed: dict[int, dict[Any, float]] = {0: {("in", k): 1.0 for k in range(len(fixed_in))}}
        self.fixed_power: dict[Any, np.ndarray] = {("in", k): U for k, U in enumerate(fixed_in)}
        # each part's amplitudes over the sources, where known (an input of one fixed part is
        # source 0 itself; a norm's output its input's, rescaled), and each norm's input: the
        # amplitude of source 0 and the power, per token (_fixed_cross)
        self.fixed_terms: dict[Any, dict[int, np.ndarray]] = (
            {("in", 0): {0: np.ones(self.T)}} if len(fixed_in) == 1 else {})
        self.norm_inputs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def cov(self, v: _Value) -> np.ndarray:
        """Token covariance of a value: Σ_i (a_i a_iᵀ) ∘ K_i."""
        out = np.zeros((self.T, self.T))
        for i, a in v.terms.items():
            out += np.outer(a, a) * self.sources[i]
        return out

    def combine(self, parts: list[tuple[_Value, float]]) -> _Value:
        terms: dict[int, np.ndarray] = {}
        for v, c in parts:
            for i, a in v.terms.items():
                terms[i] = terms.get(i, 0.0) + c * a
        self.nodes.append(Node("lin", [(v.node, c) for v, c in parts]))
        fixed: dict[Any, float] = {}
        for v, c in parts:
            for k, a in self.fixed.get(v.node, {}).items():
                fixed[k] = fixed.get(k, 0.0) + float(c) * a
        self.fixed[len(self.nodes) - 1] = fixed
        return _Value(self, terms, len(self.nodes) - 1)

    def fixed_parts(self, v: _Value) -> list[np.ndarray]:
        """The per-token powers of the parts of v whose power is fixed (norm outputs)."""
        return [a * a * self.fixed_power[k] for k, a in self.fixed.get(v.node, {}).items()]

    def realize_norms(self, out: _Value, every: bool = False) -> None:
        """Raise the backward of every norm off the block's trunk (``every``: of every norm) by its
        _jensen factor. A norm on a branch scales one additive part of the gradient, whose mean
        over initializations, and over blocks, is the typical value: E[1/q̂] is right there. A
        norm every path passes (PostNorm's, DeepNorm's) multiplies the whole gradient, block
        after block: its typical value also drifts by the product's log-variance (theory/spread.py);
        for PostNorm the two cancel (tools/typical_drift.py)."""
        def reaches_input(skip: int) -> bool:
            todo, seen = [out.node], set()
            while todo:
                n = todo.pop()
                if n == 0:
                    return True
                if n == skip or n in seen:
                    continue
                seen.add(n)
                todo += [parent for parent, _ in self.nodes[n].parents]
            return False

        for n, node in enumerate(self.nodes):
            if node.kind == "norm" and "jensen" in node.sub and (every or reaches_input(n)):
                parent, scale = node.parents[0]
                node.parents[0] = (parent, scale * node.sub.pop("jensen"))

    def _jensen(self, v: _Value, Q: np.ndarray) -> np.ndarray:
        """Q·E[1/q̂] per token: the norm divides by the realized power q̂ of its input (own
        derivation, Monte Carlo in tests/test_theory_positional.py). The input is a combination f
        of parts of fixed power U_i (norm outputs) and a Gaussian part of power W. Over d
        coordinates the Gaussian part scatters as 2W²/d, its cross term with f as 4W·P_f/d (P_f:
        f's power), and f's own power through its parts' realized inner products, 4U_iU_j/d for
        independent directions: Var q̂ = 2(Q² − Σ U_i²)/d when no two parts are correlated. Two
        correlated parts are derived where one is the norm of an input holding the other
        (_fixed_cross). A LayerNorm also removes the mean over coordinates, W/d of the Gaussian
        part (norm outputs have none): E q̂ = Q − W/d. To O(1/d): Q·E[1/q̂] = Q/E q̂·(1 + Var q̂/Q²);
        for a Gaussian input 1 + 3/d (LayerNorm; exactly d/(d − 3)) or 1 + 2/d (RMSNorm)."""
        d = self.st.width
        parts = list(self.fixed.get(v.node, {}).items())
        P_f, var_f = np.zeros_like(Q), np.zeros_like(Q)
        for x, (k, a) in enumerate(parts):
            P_f = P_f + a * a * self.fixed_power[k]
            for k2, b in parts[x + 1:]:
                C, V = self._fixed_cross(k, k2)
                P_f, var_f = P_f + 2 * a * b * C, var_f + 4 * (a * b) ** 2 * V
        W = np.clip(Q - P_f, 0, None)
        var = var_f + 4 * W * P_f / d + 2 * W ** 2 / d
        mean = Q - W / d if self.st.norm == "layernorm" else Q
        return Q / mean * (1 + var / Q ** 2)

    def _fixed_cross(self, i: Any, j: Any) -> tuple[np.ndarray, np.ndarray]:
        """Per token, the mean and the variance of the realized inner product <u_i, u_j>/d of two
        fixed-power parts. Independent directions: 0 and U_i·U_j/d. A norm's output h = N(c·x + g)
        with the fixed part x in its input (g: the rest, of power W_g, independent of x; S: the
        input's power; own derivation, to first order in <g, x>/d and |g|²/d): mean c·U_x/√S,
        variance U_x·W_g²·(W_g + c²U_x/2)/(d·S³) (Monte Carlo in tests/test_theory_positional.py)."""
        independent = 0.0, self.fixed_power[i] * self.fixed_power[j] / self.st.width
        terms = [self.fixed_terms.get(k) for k in (i, j)]
        if terms[0] is None or terms[1] is None:  # a part of a several-part input
            known = terms[0] if terms[1] is None else terms[1]
            if known is not None and 0 in known:
                raise ValueError("Var q̂ is not derived for a norm output holding one of several "
                                 "fixed parts of the block input")
            return independent
        C = sum(terms[0][s] * terms[1][s] * np.diag(self.sources[s])
                for s in set(terms[0]) & set(terms[1]))
        if not np.any(np.abs(C) > 1e-12):
            return independent
        h, x = (i, j) if i in self.norm_inputs else (j, i)
        if x != ("in", 0) or h not in self.norm_inputs:
            raise ValueError("Var q̂ is not derived for these two correlated fixed parts")
        c, S = self.norm_inputs[h]
        U = self.fixed_power[x]
        Wg = np.clip(S - c * c * U, 0, None)
        return C, U * Wg ** 2 * (Wg + c * c * U / 2) / (self.st.width * S ** 3)

    def norm(self, v: _Value, *, lr: Any = 1) -> _Value:
        """Per-token rescaling by 1/sqrt(Q_s + eps); backward keeps the projection factor."""
        S = self.cov(v)
        self.last_norm_input = S
        scale = 1.0 / np.sqrt(np.diag(S) + _EPS)
        proj = math.sqrt(max(float(C.norm_projection(self.st.width, self.st.norm)), 0.0))
        sub = {"proj": proj}
        if self.st.realized_norm:  # applied by run_block to the norms off the trunk
            sub["jensen"] = np.sqrt(self._jensen(v, np.diag(S)))
        self.nodes.append(Node("norm", [(v.node, scale)], sub))
        node = len(self.nodes) - 1
        self.fixed[node] = {node: 1.0}
        self.fixed_power[node] = np.diag(S) * scale ** 2
        self.fixed_terms[node] = {i: a * scale for i, a in v.terms.items()}
        self.norm_inputs[node] = (v.terms.get(0, np.zeros(self.T)), np.diag(S))
        return _Value(self, {i: a * scale for i, a in v.terms.items()}, node)

    def _emit(self, kind: str, v: _Value, K: np.ndarray, backward: Callable) -> _Value:
        self.sources.append(K)
        self.nodes.append(Node(kind, [(v.node, 1.0)], {"backward": backward}))
        return _Value(self, {len(self.sources) - 1: np.ones(self.T)}, len(self.nodes) - 1)

    def attn(self, v: _Value, *, value_gain: Any = 1, out_gain: Any = 1, lr: Any = 1,
             out_lr: Any = 1) -> _Value:
        """Attention of the setting's kind over the token covariance (see module docstring);
        learning-rate multipliers do not enter the init theory."""
        S = self.cov(v)
        # the value-weight alignment term is derived for causal attention only (attention())
        finite_width = {"width": self.st.width} if self.st.attention == "causal" else {}
        K, backward = ATTENTION[self.st.attention](S, sigma=self.st.sigma,
                                                   value_gain=float(value_gain),
                                                   out_gain=float(out_gain), **finite_width)
        return self._emit("attn", v, K, backward)

    def ffn(self, v: _Value, *, in_gain: Any = 1, out_gain: Any = 1, lr: Any = 1,
            out_lr: Any = 1) -> _Value:
        """MLP or MoE, position-wise: the kernel maps entry by entry."""
        S = self.cov(v)
        K, backward = ffn(S, self.st, float(in_gain), float(out_gain))
        return self._emit("ffn", v, K, backward)

    def backward(self, out: _Value, grad_out: np.ndarray, head: bool = False) -> np.ndarray:
        """Gradient covariance at the block input, given ``grad_out`` at its output
        (tape.walk_backward's rules over T×T matrices, amplitudes per token); ``head``: it comes
        straight from the LM head (from_head)."""
        gsrc: list[np.ndarray] = [from_head(self, out, grad_out) if head else grad_out]

        def power(amps: dict[int, np.ndarray]) -> np.ndarray:
            total = np.zeros((self.T, self.T))
            for j, a in amps.items():
                total += np.outer(a, a) * gsrc[j]
            return total

        def sublayer(node: Node, arriving: np.ndarray) -> int:
            gsrc.append(node.sub["backward"](arriving))
            return len(gsrc) - 1

        return walk_backward(self.nodes, out.node, np.ones(self.T), power, sublayer,
                             projected=not head)


def reads_head(s: Scheme, l: int, L: int, ctx: _Ctx, out: _Value) -> bool:
    """Whether block l's output norm takes the LM head's gradient directly: the top block of a
    stack without a final norm. That gradient is fresh, not projected like one that passed the
    norms of a block above, and tilted toward the stream (from_head). A stack that ends in
    no norm at all keeps the projected rule (not derived)."""
    return l == L and not s.final_norm and ctx.nodes[out.node].kind == "norm"


def from_head(ctx: _Ctx, out: _Value, grad_out: np.ndarray) -> np.ndarray:
    """The LM head's gradient covariance less the part the top output norm removes whole: per
    token, the share off the stream (components.head_gradient_share); the norm's projections
    then take k/d of the rest as of any fresh gradient (walk_backward, projected=False)."""
    a = np.sqrt(C.head_gradient_share(np.diag(ctx.cov(out)), ctx.st.sigma, ctx.st.width))
    return grad_out * np.outer(a, a)


# --- sublayer maps on matrices -------------------------------------------------------------------

@lru_cache(maxsize=16)
def _attention_tables(T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    Cs, Xs = C.attention_position_table(T)
    return np.asarray(C._V_GRID), Cs, Xs


def _per_position(grid: np.ndarray, table: np.ndarray, v: np.ndarray) -> np.ndarray:
    """table[:, t] interpolated at v[t] for every position t (clamped to the grid)."""
    v = np.clip(v, grid[0], grid[-1])
    i = np.clip(np.searchsorted(grid, v, side="right"), 1, len(grid) - 1)
    w = (v - grid[i - 1]) / (grid[i] - grid[i - 1])
    cols = np.arange(table.shape[1])
    return table[i - 1, cols] * (1 - w) + table[i, cols] * w


def _alignment(grid: np.ndarray, T: int, v: np.ndarray, u: np.ndarray, R: np.ndarray,
               width: int) -> np.ndarray:
    """Finite-width value–weight alignment: ΔK_st = √(u_s u_t)/d·(R_st M1_s M1_t, s ≠ t;
    M2_s − C_s, s = t) (derivation in attention())."""
    M1t, M2t = C.attention_alignment_table(T)
    Ct, _ = C.attention_position_table(T)
    m1, m2, c = (_per_position(grid, t, v) for t in (M1t, M2t, Ct))
    out = np.sqrt(np.outer(u, u)) * R * np.outer(m1, m1)
    out[np.diag_indices(T)] = u * (m2 - c)
    return out / width


def _rev_cumsum2(X: np.ndarray) -> np.ndarray:
    """R[a, b] = Σ_{s ≥ a, t ≥ b} X[s, t]."""
    return X[::-1, ::-1].cumsum(0).cumsum(1)[::-1, ::-1]


def attention(S: np.ndarray, *, sigma: float, value_gain: float = 1.0, out_gain: float = 1.0,
              width: int = 0) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Output covariance of causal attention at init, and its backward map Γ_out → Γ_in.

    Query s (1-based) averages keys i ≤ s with softmax weights P_si of logits whose i.i.d. part
    has variance v_s = σ⁴·S_ss·u_s, u_s the keys' variance about their mean (the shared part
    cancels in the softmax); ``width`` > 0 adds the finite-width alignment term below.
    Exchangeability gives E P_si = 1/s and, exactly, E P_si² = C_s/s,
    E P_si P_sj = (1 - C_s)/(s(s-1)) with C_s(v_s) = E Σ_i P_si² (numeric table).
    Distinct queries s, t see the same keys through logits correlated by R_st (the queries'
    cosine); their weight fluctuations are taken linear in the standardized logits ζ,
    δP_si = κ_s/s·(ζ_si − ζ̄_s), with the gain κ_s² = s(sC_s − 1)/(s − 1) that makes the
    same-query moments above exact (own derivation; exact as v → 0 and on the diagonal). Then
      K = g²·(P̄ S P̄ᵀ + E[δP S δPᵀ]),  Γ_in = g²·(P̄ᵀ Γ P̄ + E[δPᵀ Γ δP]) + score path,
    each expectation a sum over key prefixes done with 2-D prefix sums in O(T²). Score path
    (diagonal): query part σ⁴g²Γ_ss X_s u_s², key part σ⁴g² Σ_{s≥i} Γ_ss S_ss u_s X_s/s
    (components.attention_maps is its average over positions).

    Finite width d: the weights and the values are not independent (own derivation). Query s's
    logits are z_i = a·x_i with a = W_kᵀW_q x_s/√d_h; splitting each key's centered part ξ_i
    (variance u_s per coordinate) along â and across it, only the one coordinate along â moves
    P_si, and the values' inner products x_i·x_j/d contain u_s·Z_i Z_j/d from it (Z the
    standardized logits). Softmax tilts Σ_i P_si Z_i towards √v_s, so
      ΔK_ss = u_s·(M2_s − C_s)/d,  ΔK_st = √(u_s u_t)·R_st·M1_s M1_t/d  (s ≠ t; â_s·â_t ≈ R_st),
    with M1_s = E Σ_i P_si Z_i, M2_s = E (Σ_i P_si Z_i)² (components.attention_alignment_table)
    and the mean-field diagonal's own share C_s·u_s/d taken out. Keys that win a query are the
    ones aligned with it, and so with each other: against Monte Carlo at d = 256, ρ = 0 the
    output second moment goes from 2.8 % low to within 0.5 % (tests/test_theory_positional.py).
    The backward has no such term: the upstream gradients do not depend on this layer's q, k.
    """
    T = S.shape[0]
    g2 = (sigma * value_gain) ** 2 * (sigma * out_gain) ** 2
    n = np.arange(1, T + 1, dtype=float)
    idx = np.arange(T)
    Pbar = np.tril(np.ones((T, T))) / n[:, None]
    diag = np.diag(S)
    D = np.cumsum(diag)  # Σ_{i≤s} S_ii
    F2 = np.cumsum(np.cumsum(S, 0), 1)  # F2[a, b] = Σ_{i≤a, j≤b} S_ij (0-based, inclusive)
    F = F2[idx, idx]
    pairs = np.maximum(n * (n - 1), 1.0)
    u = np.maximum(np.where(n > 1, D / n - (F - D) / pairs, 0.0), 0.0)  # keys' variance
    v = sigma ** 4 * diag * u
    grid, Ct_tab, Xt_tab = _attention_tables(T)
    Cs = _per_position(grid, Ct_tab, v)
    Xs = _per_position(grid, Xt_tab, v)
    kappa = np.sqrt(np.maximum(np.where(n > 1, n * (n * Cs - 1) / np.maximum(n - 1, 1), 0.0), 0.0))
    w = kappa / n
    R = np.clip(S / np.sqrt(np.outer(diag, diag)), -1.0, 1.0)
    m = np.minimum.outer(idx, idx)  # min(s, t), 0-based
    # Σ_{i≤s, j≤t} S_ij Σ_{k≤min} (δ_ik − 1/s)(δ_jk − 1/t)
    bracket = (D[m] - F2[m, idx[None, :]] / n[None, :] - F2[idx[:, None], m] / n[:, None]
               + (m + 1) * F2 / np.outer(n, n))
    K = g2 * (Pbar @ S @ Pbar.T + np.outer(w, w) * R * bracket)
    if width:
        K += g2 * _alignment(grid, T, v, u, R, width)
    hi = np.maximum.outer(idx, idx)

    def backward(G: np.ndarray) -> np.ndarray:
        W = G * np.outer(w, w) * R
        fluct = (_rev_cumsum2(W * ((m + 1) / np.outer(n, n)))
                 - _rev_cumsum2(W / n[None, :])[idx[:, None], hi]
                 - _rev_cumsum2(W / n[:, None])[hi, idx[None, :]])
        fluct[idx, idx] += _rev_cumsum2(W)[idx, idx]
        out = Pbar.T @ G @ Pbar + fluct
        Gd = np.diag(G)
        # key path: every query s ≥ i sends P_si·g_s·(v_i − y_s) back through its query vector;
        # the same query with its exact fluctuation factor X_s, distinct queries coherently
        # through their gradients' and queries' covariances (weights ≈ 1/s, 1/t)
        cross = G * S * np.sqrt(np.outer(u, u)) / np.outer(n, n)
        np.fill_diagonal(cross, Gd * diag * u * Xs / n)
        key = _rev_cumsum2(cross)[idx, idx]
        out[idx, idx] += sigma ** 4 * (Gd * Xs * u ** 2 + key)
        return g2 * out

    return K, backward


def bidirectional_attention(S: np.ndarray, *, sigma: float, value_gain: float = 1.0,
                            out_gain: float = 1.0
                            ) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Output covariance and backward map of bidirectional softmax attention at init.

    attention()'s derivation with every query s over all T keys, so the prefix sums become full
    sums: P̄ = 11ᵀ/T; the keys' variance about their mean u = (tr S - 1ᵀS1/T)/(T - 1) is shared;
    v_s = σ⁴·S_ss·u, C_s = C_T(v_s) and X_s = X_T(v_s) (components.attention_full_table);
    δP_si = w_s(ζ_si − ζ̄_s) with w_s² = (T·C_s − 1)/(T(T − 1)), whose key bracket is
    Σ_ij S_ij(δ_ij − 1/T) = (T − 1)·u for every pair of queries. Then
      K = g²·(1ᵀS1/T²·11ᵀ + (T − 1)u·(wwᵀ∘R)),
      Γ_in = g²·(1ᵀΓ1/T²·11ᵀ + Σ_st Γ_st w_s w_t R_st·(I − 11ᵀ/T)) + score path (diagonal):
    query part σ⁴g²Γ_ss X_s u², key part (the same for every key) σ⁴g²·Σ_st cross_st with
    cross_st = Γ_st S_st u/T² off the diagonal and Γ_ss S_ss u X_s/T on it.
    """
    T = S.shape[0]
    g2 = (sigma * value_gain) ** 2 * (sigma * out_gain) ** 2
    diag, total = np.diag(S), float(S.sum())
    u = max((float(np.trace(S)) - total / T) / (T - 1), 0.0) if T > 1 else 0.0
    v = sigma ** 4 * diag * u
    grid = np.asarray(C._V_GRID)
    Cf, Xf = C.attention_full_table(T)  # every query over all T keys
    Cs, Xs = np.interp(v, grid, Cf), np.interp(v, grid, Xf)  # clamped to the grid's ends
    w = np.sqrt(np.maximum((T * Cs - 1) / (T * max(T - 1, 1)), 0.0)) if T > 1 else np.zeros(T)
    R = np.clip(S / np.sqrt(np.outer(diag, diag)), -1.0, 1.0)
    ones = np.ones((T, T))
    K = g2 * (total / T ** 2 * ones + (T - 1) * u * np.outer(w, w) * R)

    def backward(G: np.ndarray) -> np.ndarray:
        fluct = float((G * np.outer(w, w) * R).sum())
        out = float(G.sum()) / T ** 2 * ones + fluct * (np.eye(T) - ones / T)
        cross = G * S * u / T ** 2
        np.fill_diagonal(cross, np.diag(G) * diag * u * Xs / T)
        out[np.diag_indices(T)] += sigma ** 4 * (np.diag(G) * Xs * u ** 2 + float(cross.sum()))
        return g2 * out

    return K, backward


def uniform_attention(S: np.ndarray, *, sigma: float, value_gain: float = 1.0,
                      out_gain: float = 1.0
                      ) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Output covariance and backward map of uniform attention (every token the mean of all T).

    Exact: y_t = W_o W_v x̄ for every t, so K = g²·(1ᵀS1/T²)·11ᵀ, and every input token gets
    (W_o W_v)ᵀ Σ_t g_t/T: Γ_in = g²·(1ᵀΓ1/T²)·11ᵀ (components.uniform_attention_maps).
    """
    T = S.shape[0]
    g2 = (sigma * value_gain) ** 2 * (sigma * out_gain) ** 2
    ones = np.ones((T, T))
    return g2 * float(S.sum()) / T ** 2 * ones, lambda G: g2 * float(G.sum()) / T ** 2 * ones


ATTENTION = {"causal": attention, "bidirectional": bidirectional_attention,
             "uniform": uniform_attention}


def ffn(S: np.ndarray, st: Setting, in_gain: float, out_gain: float
        ) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Output covariance and backward map of the MLP / SwiGLU / MoE sublayer, entry by entry."""
    a2, b2 = (in_gain * st.sigma) ** 2, (out_gain * st.sigma) ** 2
    pre = a2 * S
    if st.ffn in ("gelu", "relu"):
        K, dK = _kernel_fns(st.ffn)
        out = b2 * _pairwise(K, pre)
        gain = a2 * b2 * _pairwise(dK, pre)
    elif st.ffn == "swiglu":
        K, dK = _kernel_fns("silu")
        k, dk = _pairwise(K, pre), _pairwise(dK, pre)
        out = b2 * k * pre
        gain = a2 * b2 * (dk * pre + k)
    else:
        raise ValueError(f"unknown ffn kind '{st.ffn}' (known: gelu, relu, swiglu)")
    if not st.experts:
        return out, lambda G: gain * G
    W2, Wx, R = _moe_fns(st.experts, st.top_k)
    s = float(st.sigma ** 2 * np.mean(np.diag(S)))  # router logit variance
    r = np.clip(S / np.sqrt(np.outer(np.diag(S), np.diag(S))), 0.0, 1.0)
    w2, wx, rr = W2(s, 1.0), Wx(s, r), R(s, 1.0)
    mix = wx.copy()
    np.fill_diagonal(mix, w2)

    def backward(G: np.ndarray) -> np.ndarray:
        grad = mix * gain * G
        grad[np.diag_indices_from(grad)] += st.sigma ** 2 * np.diag(out) * rr * np.diag(G)
        return grad

    return mix * out, backward


@lru_cache(maxsize=16)
def _moe_fns(E: int, k: int) -> tuple[Callable, Callable, Callable]:
    """Vectorized W2, Wx, R(s, ρ) of components.moe_table, bilinear in (s, 1 - sqrt(1 - ρ))
    like components.moe_numeric, clamped to the grid."""
    from scipy.interpolate import RegularGridInterpolator
    tab = C.moe_table(int(E), int(k))
    fns = []
    for name in ("W2", "Wx", "R"):
        f = RegularGridInterpolator((C._MOE_S, C._MOE_W), tab[name])

        def g(s: float, r: Any, f=f) -> Any:
            w = 1 - np.sqrt(1 - np.clip(np.asarray(r, dtype=float), 0.0, 1.0))
            pts = np.stack([np.full(w.shape, min(max(s, 0.0), C._MOE_S[-1])), w], -1)
            out = f(pts.reshape(-1, 2)).reshape(w.shape)
            return float(out) if out.ndim == 0 else out
        fns.append(g)
    return tuple(fns)


# --- one block, and the profile ------------------------------------------------------------------

@dataclass
class BlockResult:
    """A block's forward result and its recorded tape (for the backward pass)."""

    cov_out: np.ndarray
    cov_agg: np.ndarray | None  # the aggregate before the output norm (None: no output norm)
    cos: float  # mean over tokens of cos(x_l, x_{l+1})
    ctx: _Ctx
    out: _Value

    @property
    def fixed_out(self) -> tuple[np.ndarray, ...]:
        """The output's parts of fixed per-token power: the next block's ``fixed_in``."""
        return tuple(self.ctx.fixed_parts(self.out))


def run_block(s: Scheme, cov_in: np.ndarray, st: Setting, l: int, L: int,
              params: dict[str, float], fixed_in: tuple[np.ndarray, ...] = ()) -> BlockResult:
    """Run block l of L of scheme ``s`` over the input token covariance ``cov_in``, of which
    ``fixed_in`` are the parts of fixed per-token power (a norm's output)."""
    ctx = _Ctx(st, cov_in, fixed_in)
    out = s.block(_Value(ctx, {0: np.ones(ctx.T)}, 0), ctx, l=l, L=L, **params)
    if not isinstance(out, _Value):
        raise ValueError(f"scheme '{s.name}' must return a value built from its input")
    if st.realized_norm:
        ctx.realize_norms(out, every=st.realized_norm == "all")
    cov_out = ctx.cov(out)
    has_norm = ctx.nodes[out.node].kind == "norm"
    a0 = out.terms.get(0, np.zeros(ctx.T))
    q_in, q_out = np.diag(cov_in), np.diag(cov_out)
    cos = float(np.mean(a0 * q_in / np.sqrt(q_in * q_out)))
    return BlockResult(cov_out, ctx.last_norm_input if has_norm else None, cos, ctx, out)


def mean_cosine(M: np.ndarray) -> float:
    """Mean cosine between distinct tokens: what probes' token_cosine measures."""
    T = M.shape[0]
    if T < 2:
        return math.nan
    d = np.sqrt(np.diag(M))
    cosm = M / np.outer(d, d)
    return float((cosm.sum() - np.trace(cosm)) / (T * (T - 1)))


def _square(M: Any, T: int, name: str) -> np.ndarray:
    M = np.asarray(M, dtype=float)
    if M.shape != (T, T) or not np.all(np.isfinite(M)) or not np.allclose(M, M.T):
        raise ValueError(f"{name} must be a finite symmetric {T}×{T} matrix (seq_len {T}), "
                         f"got shape {M.shape}")
    if np.any(np.diag(M) <= 0):
        raise ValueError(f"{name} must have a positive diagonal (token second moments)")
    return M


def embedding_covariance(T: int, q0: float, rho0: float, cov0: Any | None) -> np.ndarray:
    """The embedding's token covariance: ``cov0`` as given, else q0·((1 − ρ0)I + ρ0·11ᵀ)."""
    if cov0 is not None:
        return _square(cov0, T, "cov0")
    check_q0(q0)
    return float(q0) * ((1 - rho0) * np.eye(T) + rho0 * np.ones((T, T)))


def predict_positional(scheme: str, *, depth: int, seq_len: int = 128,
                       scheme_params: dict[str, Any] | None = None, q0: float | None = None,
                       rho0: float = 0.0, rho_g: float = 0.0, cov0: np.ndarray | None = None,
                       grad_top: np.ndarray | None = None, realized_norm: bool | str = False,
                       **shape: Any) -> dict[str, np.ndarray]:
    """Per-layer position-resolved predictions at init, arrays indexed by l = 0..depth.

    Same keys and meanings as theory.solve.predict_profile, except that ``rho`` and ``rg`` are
    mean cosines between distinct tokens (what probes measure), plus ``g_first``: the first
    token's gradient power over the mean over tokens. ``heads`` is accepted for a drop-in call;
    attention at init does not depend on the head count. ``cov0`` (T×T) replaces the embedding's
    uniform covariance q0·((1 − ρ0)I + ρ0·11ᵀ), e.g. the exact one of a given text at init,
    q0/2·(same-byte indicator + I); ``grad_top`` replaces the top gradient's (1 − ρ_g)I + ρ_g·11ᵀ.
    ``realized_norm``: the norms off the trunk (True or "branch"; "all": every norm) divide the
    gradient by their input's realized power, E[1/q̂] (_Ctx._jensen, an O(1/d) term; off by
    default until the committed grids are predicted again)."""
    realized = REALIZED_NORM[realized_norm] if isinstance(realized_norm, bool) else realized_norm
    if realized not in REALIZED_NORM.values():
        raise ValueError(f"realized_norm must be one of False, True, 'branch', 'all'; got {realized_norm!r}")
    cfg = TheoryConfig(scheme=scheme, depth=depth, seq_len=seq_len,
                       scheme_params=tuple(sorted((scheme_params or {}).items())), **shape)
    cfg.validate()  # the same errors as predict_profile
    s = get_scheme(scheme)
    L, T = int(depth), int(seq_len)
    params = {k: float(v) for k, v in s.resolve(L, **(scheme_params or {})).items()}
    check_correlations(rho0, rho_g, T)
    st = Setting(int(cfg.width), T, float(cfg.sigma), cfg.ffn, cfg.norm, int(cfg.experts),
                 int(cfg.top_k), cfg.attention, realized)
    cov = embedding_covariance(T, cfg.embed_std ** 2 if q0 is None else q0, rho0, cov0)
    # keep every forward covariance when they fit in ~128 MB; otherwise every stride-th (√L of
    # them) and recompute the others during the backward pass
    stride = 1 if (L + 1) * T * T <= HELD_ENTRIES else max(1, math.isqrt(L))
    fixed: tuple[np.ndarray, ...] = ()  # the embedding's power scatters: no fixed part
    checkpoints = {0: (cov, fixed)}
    out = {k: np.full(L + 1, np.nan) for k in PROFILE_KEYS}
    out["q"][0], out["rho"][0] = float(np.mean(np.diag(cov))), mean_cosine(cov)
    for l in range(1, L + 1):
        res = run_block(s, cov, st, l, L, params, fixed)
        cov, fixed = res.cov_out, res.fixed_out
        out["q"][l], out["rho"][l], out["cos"][l] = np.mean(np.diag(cov)), mean_cosine(cov), res.cos
        if res.cov_agg is not None:
            out["q_agg"][l] = np.mean(np.diag(res.cov_agg))
        if l % stride == 0:
            checkpoints[l] = (cov, fixed)
    grad = ((1 - rho_g) * np.eye(T) + rho_g * np.ones((T, T)) if grad_top is None
            else _square(grad_top, T, "grad_top"))
    top = float(np.mean(np.diag(grad)))
    out["g"][L], out["rg"][L] = 1.0, mean_cosine(grad)
    out["g_first"][L] = grad[0, 0] / top
    hi = L
    while hi > 0:
        lo = (hi - 1) // stride * stride
        states = [checkpoints[lo]]
        for l in range(lo + 1, hi):
            res = run_block(s, states[-1][0], st, l, L, params, states[-1][1])
            states.append((res.cov_out, res.fixed_out))
        for l in range(hi, lo, -1):
            res = run_block(s, states[l - 1 - lo][0], st, l, L, params, states[l - 1 - lo][1])
            grad = res.ctx.backward(res.out, grad, head=reads_head(s, l, L, res.ctx, res.out))
            gm = float(np.mean(np.diag(grad)))
            out["g"][l - 1], out["rg"][l - 1] = gm / top, mean_cosine(grad)
            out["g_first"][l - 1] = grad[0, 0] / gm
        hi = lo
    return out
