"""Solving the recurrences: per-layer profiles (numeric iteration) and closed forms in L.

``predict_profile`` iterates a scheme's full recurrence (ρ and the gradient token correlation
evolving) for a concrete configuration: this is what measurements are compared with.

``closed_forms`` solves the *frozen-correlation reduction*: ρ held at ρ*, the gradient token
correlation at 0 and the norms' eps at 0, so that each sublayer's moment maps become constants
(functions of ρ*, σ and the attention statistics). Under it a pre-norm stream grows by a constant
b per block (q_L = q_0 + bL, sympy.rsolve), the per-block gradient factor is a rational function
of q_l whose product telescopes into rising factorials (Γ-function ratios, Kedia et al. 2024 derive
the same L^power law), and a normalized stream (post, deepnorm, span, b2t) has q_l = q* for l ≥ 1
and g_0/g_L = r(q_0)·r(q*)^(L-1). ρ* = 1 (the collapsed fixed point of every scheme) makes the
reduction exact; for other ρ* it is the model with correlations frozen.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import sympy

from theory import components as C
from theory import interpreter as I
from theory.schemes import SCHEMES, get_scheme, structure_signature
from theory.shape import Shape

PROFILE_KEYS = ("q", "q_agg", "rho", "g", "rg", "cos")


@dataclass(frozen=True, kw_only=True)
class TheoryConfig(Shape):
    """The plain parameters a prediction needs: the shared Shape, the scheme, depth, sequence
    length and parameter overrides."""

    scheme: str = "pre"
    depth: int = 12
    seq_len: int = 128
    scheme_params: tuple = ()  # ((name, value), ...) so the config stays hashable

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        for name in ("depth", "seq_len"):  # 2.5 layers would silently be 2
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        get_scheme(self.scheme).resolve(max(int(self.depth), 1), **dict(self.scheme_params))
        checks = [(self.depth >= 1, f"depth must be >= 1, got {self.depth}"),
                  (self.width >= 2, f"width must be >= 2, got {self.width}"),
                  (self.seq_len >= 1, f"seq_len must be >= 1, got {self.seq_len}")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.validate_shape()


def check_correlations(rho0: float, rho_g: float, T: int) -> None:
    """Raise ValueError unless both mean token correlations are possible for T tokens.

    An exchangeable correlation matrix (1 - ρ)I + ρ11ᵀ of T tokens is positive semidefinite iff
    -1/(T - 1) ≤ ρ ≤ 1 (ρ = -1 needs T = 2); rounding past an end is allowed. rho0 must be a
    number; rho_g may be nan (no gradient measured).
    """
    if isinstance(rho0, bool) or not isinstance(rho0, numbers.Real) or math.isnan(rho0):
        raise ValueError(f"rho0 must be a number (the embedding's token correlation), got {rho0!r}")
    lo = -1.0 / max(int(T) - 1, 1)
    for name, r in (("rho0", rho0), ("rho_g", rho_g)):
        if float(r) < lo - C.DOMAIN_SLACK or float(r) > 1 + C.DOMAIN_SLACK:
            raise ValueError(f"{name} must lie in [{lo:.6g}, 1] for {T} tokens, got {r}")


def check_q0(q0: float) -> None:
    """Raise ValueError unless the embedding's second moment q0 is a finite number > 0."""
    if (isinstance(q0, bool) or not isinstance(q0, numbers.Real) or not math.isfinite(q0)
            or q0 <= 0):
        raise ValueError(f"q0 (the embedding's second moment) must be a finite number > 0, "
                         f"got {q0!r}")


def _numeric_params(cfg: TheoryConfig, L: int) -> dict[str, float]:
    s = get_scheme(cfg.scheme)
    return {k: float(v) for k, v in s.resolve(L, **dict(cfg.scheme_params)).items()}


def _structure_key(cfg: TheoryConfig, l: int, L: int, params: dict[str, float] | None = None) -> tuple:
    """Blocks with the same calls, gains and output norm share one recurrence."""
    return structure_signature(get_scheme(cfg.scheme), l, L, params or _numeric_params(cfg, L))


def _block_fn(cfg: TheoryConfig, l: int, L: int, symbolic: bool = True, key: tuple | None = None):
    """Block l's compiled forward/backward halves factory (interpreter.compile_split), from the
    symbolic-l derivation or, for a block that branches on l (Mix-LN), its dataflow's."""
    params = dict(cfg.scheme_params)
    if symbolic:
        rec = I.derive(cfg.scheme, ffn=cfg.ffn, norm=cfg.norm, experts=cfg.experts,
                       top_k=cfg.top_k, params=params, attention=cfg.attention)
    else:  # a block that branches on l, L
        rec = _per_structure(cfg.scheme, cfg.ffn, cfg.norm, cfg.experts, cfg.top_k,
                             tuple(sorted(params.items())), key or _structure_key(cfg, l, L), l, L,
                             cfg.attention)
    consts = {"d": cfg.width, "T": cfg.seq_len, "sigma": cfg.sigma}
    return I.compile_split(rec, consts, T_val=cfg.seq_len, experts=cfg.experts, top_k=cfg.top_k)


_STRUCT_CACHE: dict[tuple, Any] = {}


def _symbolic(cfg: TheoryConfig) -> bool:
    try:
        I.derive(cfg.scheme, ffn=cfg.ffn, norm=cfg.norm, experts=cfg.experts, top_k=cfg.top_k,
                 params=dict(cfg.scheme_params), attention=cfg.attention)
        return True
    except ValueError:
        return False


def _per_structure(name, ffn, norm, experts, top_k, params_key, key, l, L, attention="causal"):
    k = (name, ffn, norm, experts, top_k, params_key, key, L, attention)
    if k not in _STRUCT_CACHE:
        _STRUCT_CACHE[k] = I.derive(name, ffn=ffn, norm=norm, experts=experts, top_k=top_k,
                                    params=dict(params_key), l=l, L=L, attention=attention)
    return _STRUCT_CACHE[k]


_SCHEDULES: dict[tuple, tuple] = {}


def _schedule(cfg: TheoryConfig, L: int) -> tuple[list, list[int]]:
    """For a scheme that branches on l: the distinct block structures' (block l, key) and, per
    block l = 1..L, the index of its structure. Every block is traced once per (scheme, params,
    L); the result is cached with the scheme object, so a re-registered scheme is traced anew."""
    s = get_scheme(cfg.scheme)
    ck = (cfg.scheme, cfg.scheme_params, L)
    hit = _SCHEDULES.get(ck)
    if hit is not None and hit[0] is s:
        return hit[1], hit[2]
    params = _numeric_params(cfg, L)
    index: dict[tuple, int] = {}
    firsts: list = []
    which = [0] * (L + 1)
    for l in range(1, L + 1):
        key = _structure_key(cfg, l, L, params)
        i = index.get(key)
        if i is None:
            i = index[key] = len(firsts)
            firsts.append((l, key))
        which[l] = i
    if len(_SCHEDULES) > 256:
        _SCHEDULES.clear()
    _SCHEDULES[ck] = (s, firsts, which)
    return firsts, which


def iterate(cfg: TheoryConfig, q0: float, rho0: float, rho_g: float = 0.0
            ) -> dict[str, np.ndarray]:
    """Run the full recurrence over depth: arrays indexed l = 0..L (see predict_profile).

    The forward pass runs each block's forward half, which also returns what its backward half
    needs (interpreter.compile_split); the backward pass then evaluates only the gradient terms.
    """
    cfg.validate()
    check_q0(q0)
    check_correlations(rho0, rho_g, cfg.seq_len)
    L = int(cfg.depth)
    # plain Python floats in the loop: numpy scalars would triple the cost per block
    outs: list = [None] * (L + 1)
    q_l, rho_l = float(q0), float(rho0)
    if _symbolic(cfg):  # one recurrence for every block: compile it once
        fwd, bwd = _block_fn(cfg, 1, L)(L)
        for l in range(1, L + 1):
            outs[l] = o = fwd(q_l, rho_l, l)
            q_l, rho_l = o[0], o[1]
        bwds = None
    else:  # one recurrence per distinct block structure
        firsts, which = _schedule(cfg, L)
        halves = [_block_fn(cfg, l, L, symbolic=False, key=key)(L)
                  for l, key in firsts]
        fwds = [h[0] for h in halves]
        bwds = [halves[i][1] for i in which[1:]]
        for l in range(1, L + 1):
            outs[l] = o = fwds[which[l]](q_l, rho_l, l)
            q_l, rho_l = o[0], o[1]
    g, rg = [0.0] * (L + 1), [0.0] * (L + 1)
    g_l = g[L] = 1.0
    rg_l = rg[L] = float(rho_g)
    for l in range(L, 0, -1):
        r, rg_l = (bwd if bwds is None else bwds[l - 1])(rg_l, *outs[l])
        if l == L:
            r *= head_factor(cfg, outs[L])
        g[l - 1] = g_l = g_l * r
        rg[l - 1] = rg_l
    body = outs[1:]
    q = [float(q0)] + [o[0] for o in body]
    rho = [float(rho0)] + [o[1] for o in body]
    q_agg = [math.nan] + [o[2] for o in body]
    cos = [math.nan] + [o[3] for o in body]
    q, rho, q_agg, cos, g, rg = (np.asarray(v, dtype=float) for v in (q, rho, q_agg, cos, g, rg))
    return {"q": q, "q_agg": q_agg, "rho": rho, "g": g, "rg": rg, "cos": cos}


def head_factor(cfg: TheoryConfig, top: tuple) -> float:
    """The top block's extra gradient factor where its output norm takes the LM head's gradient
    directly (positional.reads_head): that gradient is fresh, so the norm's projections keep
    1 − k/d of it, of which the part off the stream is components.head_gradient_share. Every
    path from the block output passes that norm first, so the factor multiplies the block's."""
    q_top, q_agg = top[0], top[2]
    if get_scheme(cfg.scheme).final_norm or math.isnan(q_agg):  # q_agg: nan without an output norm
        return 1.0
    return (float(C.norm_projection(cfg.width, cfg.norm))
            * C.head_gradient_share(q_top, cfg.sigma, cfg.width))


def predict_profile(scheme: str, *, depth: int, seq_len: int = 128,
                    scheme_params: dict[str, Any] | None = None, q0: float | None = None,
                    rho0: float = 0.0, rho_g: float = 0.0, **shape: Any) -> dict[str, np.ndarray]:
    """Per-layer predictions at init, arrays indexed by l = 0..depth (0 = the embedding).

    q: E[x_l²] (block output, resid_post); q_agg: E[(aggregate before the output norm)²] (nan
    where the block has no output norm); rho: token correlation (cross-token covariance over
    second moment, averaged over the sequence); g: E[(∂loss/∂x_l)²] relative to g at l = depth;
    rg: gradient token correlation; cos: cos(x_{l-1}, x_l) (nan at l = 0). q0 defaults to
    embed_std² (token + position embedding); rho0 and rho_g (top gradient's token correlation)
    are inputs because they depend on the text; both lie in [-1/(T-1), 1] (ends included).
    ``shape``: any field of theory.shape.Shape (width, heads, ffn, norm, sigma, embed_std, experts,
    top_k, attention = "causal" | "bidirectional" | "uniform"), with its defaults.
    """
    cfg = TheoryConfig(scheme=scheme, depth=depth, seq_len=seq_len,
                       scheme_params=tuple(sorted((scheme_params or {}).items())), **shape)
    return iterate(cfg, cfg.embed_std ** 2 if q0 is None else q0, rho0, rho_g)


# --- closed forms of the frozen-correlation reduction ----------------------------------------

rho_star = sympy.Symbol("rho_star", real=True)
q0_sym = sympy.Symbol("q_0", positive=True)
L = I.L_sym
l = I.l_sym


@dataclass
class ClosedForm:
    """Closed forms (sympy) for one scheme under the frozen-correlation reduction."""

    scheme: str
    kind: str  # "growing" (q_{l+1} = q_l + b), "normalized" (q_l = q*), or "none"
    step: sympy.Expr | None = None  # the reduced forward map q -> q_next
    r: sympy.Expr | None = None  # the reduced per-block gradient factor r(q) = g_in/g_out
    q_L: sympy.Expr | None = None  # closed form of q_L
    g_ratio: sympy.Expr | None = None  # closed form of g_0/g_L
    cos_l: sympy.Expr | None = None  # closed form of cos(x_{l-1}, x_l)
    consts: list = field(default_factory=list)  # opaque constants (symbol, value expression)
    order: dict[str, str] = field(default_factory=dict)  # asymptotic orders as L → ∞
    notes: list[str] = field(default_factory=list)
    exponent: sympy.Expr | None = None  # g_0/g_L ~ L**exponent (growing schemes)


def _reduce(e: sympy.Expr) -> sympy.Expr:
    return sympy.sympify(e).xreplace({C.EPS: sympy.Integer(0)}).xreplace({I.rho: rho_star, I.rg: sympy.Integer(0)})


def reduce_program(rec: I.Recurrence, keep: frozenset = frozenset(), q_value: Any = None
                   ) -> tuple[dict, list[tuple[sympy.Symbol, sympy.Expr]]]:
    """The frozen-correlation reduction of a block program.

    Returns (env, consts): env maps each intermediate symbol to its reduced expression in q (and
    the ``keep`` symbols, e.g. β) and *opaque constants*; a subexpression free of those symbols
    (a sublayer's moment or gain once its input is normalized, an attention statistic) becomes a
    named constant, listed in consts in program order with its value, so closed forms stay short
    (q_next = q + q_a1 + q_f1). ``q_value`` substitutes the input second moment (1 for a
    normalized stream).
    """
    env: dict[sympy.Symbol, sympy.Expr] = {} if q_value is None else {I.q: sympy.sympify(q_value)}
    consts: list[tuple[sympy.Symbol, sympy.Expr]] = []
    live = ({I.q} if q_value is None else set()) | set(keep)
    counter = [0]

    def opaque(e: sympy.Expr, name: str) -> sympy.Symbol:
        sym = sympy.Symbol(name, real=True)
        consts.append((sym, e))
        return sym

    for s, v in rec.assign:
        e = _reduce(sympy.sympify(v)).xreplace(env)
        if e.free_symbols & live:
            reps = {}
            # sorted: a set's order follows string hashes, which differ between processes
            for a in sorted(e.atoms(sympy.Function, sympy.Pow), key=sympy.default_sort_key):
                if not (a.free_symbols & live) and (isinstance(a, sympy.Function) or
                                                    not a.exp.is_Integer):
                    counter[0] += 1
                    reps[a] = opaque(a, f"c_{counter[0]}")
            e = e.xreplace(reps)
            if not any(isinstance(a, sympy.Function) or not a.exp.is_Integer
                       for a in e.atoms(sympy.Function, sympy.Pow)):
                e = sympy.cancel(sympy.together(e))
            env[s] = e
        elif e.is_number or e.is_Symbol or sympy.count_ops(e) <= 3:
            env[s] = e
        else:
            env[s] = opaque(e, str(s))
    return env, consts


def const_values(consts: list[tuple[sympy.Symbol, sympy.Expr]], values: dict[str, float],
                 L_val: float | None = None) -> dict[sympy.Symbol, float]:
    """Numeric values of the opaque constants (d, T, sigma, rho_star, L from ``values``)."""
    T_val = int(values["T"])
    fns = C.attention_numeric(T_val)
    ac = C.attention_constants(T_val)
    base: dict[Any, Any] = {I.d: values["d"], I.T: T_val, I.sigma: values["sigma"],
                            rho_star: values["rho_star"]}
    base.update({I.ATTN_CONST[k]: v for k, v in ac.items()})
    if L_val is not None:
        base[L] = L_val
    out: dict[sympy.Symbol, float] = {}
    for sym, e in consts:
        e = e.xreplace(base).xreplace(out)
        e = e.replace(lambda a: isinstance(a, sympy.core.function.AppliedUndef),
                      lambda a: sympy.Float(fns[a.func.__name__](float(a.args[0])), 30)
                      if a.func.__name__ in fns else a)
        out[sym] = sympy.Float(sympy.N(e, 30), 30)
    return out


def _full(rec: I.Recurrence, name: str, env: dict | None = None) -> sympy.Expr:
    env = env if env is not None else reduce_program(rec)[0]
    return _reduce(rec.outputs[name]).xreplace(env)


def _linear_roots(poly_expr: sympy.Expr) -> list[sympy.Expr] | None:
    """Roots z of a product of linear factors in q (with multiplicity), or None."""
    roots: list[sympy.Expr] = []
    _, factors = sympy.factor_list(sympy.expand(poly_expr), I.q)
    for f, mult in factors:
        p = sympy.Poly(f, I.q)
        if p.degree() == 0:
            continue
        if p.degree() != 1:
            return None
        a, b = p.all_coeffs()
        roots += [-b / a] * mult
    return roots


@lru_cache(maxsize=64)
def closed_forms(name: str, ffn: str = "gelu", norm: str = "layernorm",
                 attention: str = "causal") -> ClosedForm:
    """Closed forms in L of the scheme's reduced recurrence (kind 'none' if none found)."""
    try:
        rec = I.derive(name, ffn=ffn, norm=norm, attention=attention)
    except ValueError:
        return ClosedForm(name, "none", notes=["block depends on l through control flow "
                                               "(per-block derivation): numeric iteration only"])
    if rec.has_output_norm:  # normalized output: q_l = 1 exactly (eps → 0) for l ≥ 1
        env, consts = reduce_program(rec, q_value=1)
        r1 = _full(rec, "g_ratio", env)
        cf = ClosedForm(name, "normalized", step=sympy.Integer(1), r=r1, consts=consts)
        r_first = sympy.Symbol("r_first", positive=True)  # the first block sees q_0, not 1
        cf.q_L = sympy.Integer(1)
        cf.g_ratio = r_first * r1 ** (L - 1)
        cf.cos_l = _full(rec, "cos", env)
        cf.order["q_L"] = "Theta(1)"
        cf.notes.append("r_first = the block gradient factor at q = q_0 (numeric); r = the factor "
                        "at q = 1, a function of L through the scheme constants")
        return cf
    env, consts = reduce_program(rec)
    step = _full(rec, "q_next", env)
    r = sympy.cancel(sympy.together(_full(rec, "g_ratio", env)))
    cosx = _full(rec, "cos", env)
    cf = ClosedForm(name, "none", step=step, r=r, consts=consts)
    if l in step.free_symbols or l in r.free_symbols:
        cf.notes.append("block constants depend on l: numeric iteration only")
        return cf
    inc = sympy.cancel(step - I.q)
    if I.q in inc.free_symbols:
        cf.notes.append("forward map is neither a constant increment nor normalized: numeric only")
        return cf
    cf.kind = "growing"  # q_{l+1} = q_l + b
    b = inc
    qf = sympy.Function("qq")
    sol = sympy.rsolve(qf(l + 1) - qf(l) - b, qf(l), {qf(0): q0_sym})
    cf.q_L = sympy.expand(sol.subs(l, L))
    num, den = sympy.fraction(r)
    zn, zd = _linear_roots(num), _linear_roots(den)
    if zn is not None and zd is not None and len(zn) == len(zd):
        # Π_{l=0}^{L-1} (q_0 + b·l - z) = b^L · rf((q_0 - z)/b, L): the b^L cancel
        lead = sympy.cancel(sympy.Poly(num, I.q).LC() / sympy.Poly(den, I.q).LC())
        cf.g_ratio = lead ** L * sympy.Mul(*[sympy.rf((q0_sym - z) / b, L) for z in zn]) / \
            sympy.Mul(*[sympy.rf((q0_sym - z) / b, L) for z in zd])
        expo = sympy.simplify((sum(zd) - sum(zn)) / b)
        cf.order["g_0/g_L"] = f"Theta(L**({sympy.sstr(expo)}))" if lead == 1 else "exponential"
        cf.exponent = expo
    else:
        cf.notes.append("gradient factor is not a ratio of linear factors in q: numeric only")
    cf.cos_l = sympy.simplify(cosx.subs(I.q, q0_sym + b * (l - 1)))
    cf.order["q_L"] = "Theta(L)" if b != 0 else "Theta(1)"
    cf.order["1 - cos_l"] = "Theta(1/l)"
    return cf


def numeric_closed(cf: ClosedForm, values: dict[str, float], Ls: list[int], q0: float,
                   r_first: float | None = None) -> dict[str, list[float]]:
    """Evaluate a closed form's q_L and g_0/g_L at depths ``Ls`` (30-digit precision)."""
    out: dict[str, list[float]] = {"q_L": [], "g_ratio": []}
    for n in Ls:
        cv = const_values(cf.consts, values, n)
        s = {**cv, L: n, q0_sym: q0, sympy.Symbol("r_first", positive=True): r_first or 1.0,
             I.d: values["d"], I.sigma: values["sigma"], rho_star: values["rho_star"]}
        out["q_L"].append(float(sympy.N(cf.q_L.xreplace(s), 30)))
        out["g_ratio"].append(float(sympy.N(cf.g_ratio.xreplace(s), 30))
                              if cf.g_ratio is not None else math.nan)
    return out


def iterate_reduced(cf: ClosedForm, values: dict[str, float], L_max: int, q0: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Numeric iteration of the reduced recurrence: q_l (l = 0..L_max) and Π_{j<l} r(q_j).

    For normalized schemes r is the factor at q = 1 with the constants at depth L_max.
    """
    cv = {k: float(v) for k, v in const_values(cf.consts, values, L_max).items()}
    args = [I.q] + list(cv)
    base = {I.d: values["d"], I.sigma: values["sigma"], rho_star: values["rho_star"], L: L_max}
    step = sympy.lambdify(args, cf.step.xreplace(base), "math")
    r = sympy.lambdify(args, cf.r.xreplace(base), "math")
    rest = list(cv.values())
    qs = np.empty(L_max + 1)
    prod = np.empty(L_max + 1)
    qs[0], prod[0] = q0, 1.0
    for i in range(L_max):
        qs[i + 1] = step(qs[i], *rest)
        prod[i + 1] = prod[i] * r(qs[i], *rest)
    return qs, prod


# --- SpanNorm: the β(L) family that keeps g_0/g_L bounded --------------------------------------

beta_sym, c_sym, gamma_sym = sympy.symbols("beta c gamma", positive=True)


@lru_cache(maxsize=8)
def span_beta_family(ffn: str = "gelu", norm: str = "layernorm") -> dict[str, Any]:
    """Derive for which β(L) = c·L^(-γ) SpanNorm's g_0/g_L stays in (0, ∞) as L → ∞.

    The output is normalized, so g_0/g_L = r(q_0)·r(β)^(L-1) with r the per-block gradient factor
    at q = 1 (frozen-correlation reduction). The derived r(β) is expanded at β = 0:
    log r = κ·β² + O(β⁴) with κ = (backward gains − forward gains of the two branches), so
    L·log r ~ κ·c²·L^(1-2γ): finite and nonzero iff γ = 1/2, → 0 (ratio → 1, the blocks fade
    out) for γ > 1/2, and ±∞ (exponential in a power of L) for γ < 1/2 unless κ = 0.
    """
    s = get_scheme("span").with_params(beta=beta_sym, alpha=1)
    rec = I.derive_block(s, ffn=ffn, norm=norm)
    env, consts = reduce_program(rec, keep=frozenset({beta_sym}), q_value=1)
    r1 = _full(rec, "g_ratio", env)
    # r depends on β through β² only; log r = (r(0) - 1) + r''(0)/2·β² + O(β⁴) when r(0) = 1
    const0 = sympy.cancel(r1.subs(beta_sym, 0) - 1)
    kappa = sympy.cancel(sympy.diff(r1, beta_sym, 2).subs(beta_sym, 0) / 2)
    limits = {}
    for g in (sympy.Rational(1, 4), sympy.Rational(1, 2), sympy.Integer(1)):
        limits[str(g)] = sympy.limit(L * kappa * (c_sym * L ** (-g)) ** 2, L, sympy.oo)
    return {"kappa": kappa, "r0_minus_1": const0, "r1": r1, "consts": consts, "limits": limits,
            "statement": "β(L) = c·L^(-γ): L·log r → κ·c²·L^(1-2γ); bounded and away from 0 "
                         "iff γ ≥ 1/2 (γ = 1/2 keeps the blocks' total contribution O(1))"}


def all_schemes() -> list[str]:
    """Names of the registered schemes."""
    return list(SCHEMES)
