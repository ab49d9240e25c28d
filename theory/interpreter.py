"""The moment interpreter: runs a scheme's block function over symbolic values.

The very function that analysis/testbed/model.py executes with torch modules is called here with
``op`` = a symbolic vocabulary. DESIGN.md's mean-field rules:

- a value is a sum of independent zero-mean *sources* with coefficients; its second moment is
  Σ c_i² q_i and its cross-token covariance Σ c_i² k_i (sources are independent);
- ``op.attn`` / ``op.ffn`` emit a fresh source whose (q, k) are component maps of the input's;
- ``op.norm`` rescales the value (same sources) by 1/sqrt(Q + eps): skips stay coherent;
- backward (reverse over the recorded tape): gradient *amplitudes* add along deterministic paths
  (sums, scalings, norms), and each random sublayer emits a fresh independent gradient source
  whose power is its backward gain times the power arriving at its output (gradient
  independence, Yang 2019; Xiong et al. 2020 use the same rule for Pre/Post-LN).

The result is a straight-line program of sympy assignments (one symbol per intermediate
moment), so derivation is fast, printing is readable, and numeric evaluation is a compiled
function of (q, ρ, ρ_g).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any, Callable

import sympy
from sympy.printing.pycode import PythonCodePrinter

from theory import components as C
from theory.schemes import Scheme, get_scheme
from theory.tape import Node, SourceValue, walk_backward

# state symbols of a block input and of the gradient at its output
q, rho, rg = sympy.symbols("q rho rho_g", real=True)
d, T, sigma = sympy.symbols("d T sigma", positive=True)
l_sym, L_sym = sympy.symbols("l L", positive=True, integer=True)
ATTN_CONST = {name: sympy.Symbol(name, positive=True) for name in ("Mbar", "Bbar", "D2bar")}
OUTPUTS = ("q_next", "rho_next", "q_agg", "cos", "g_ratio", "rg_next")


def _const(c: Any) -> sympy.Expr:
    if isinstance(c, Fraction):
        return sympy.Rational(c.numerator, c.denominator)
    if isinstance(c, float):
        return sympy.nsimplify(c) if abs(c - round(c, 12)) < 1e-15 else sympy.Float(c)
    return sympy.sympify(c)


class _Value(SourceValue):
    """A symbolic value: {source index: sympy coefficient} plus the tape node that produced it."""

    __slots__ = ()
    coerce = staticmethod(lambda c: _const(c))


class _Ctx:
    """The symbolic vocabulary (``op``) plus the straight-line program being recorded."""

    def __init__(self, *, ffn: str, norm: str, experts: int, top_k: int, attention: str = "causal"):
        self.ffn_kind, self.norm_kind, self.experts, self.top_k = ffn, norm, experts, top_k
        self.attention = attention
        self.assign: list[tuple[sympy.Symbol, sympy.Expr]] = []
        self.sources: list[tuple[sympy.Expr, sympy.Expr]] = [(q, q * rho)]  # (q_i, k_i)
        self.nodes: list[Node] = [Node("input", [])]
        self.counts = {"norm": 0, "attn": 0, "ffn": 0}
        self.norm_inputs: list[sympy.Symbol] = []  # Q symbol of each norm's input, in call order

    def let(self, name: str, expr: sympy.Expr) -> sympy.Symbol:
        """Record ``name = expr`` and return the symbol."""
        s = sympy.Symbol(name, real=True)
        self.assign.append((s, expr))
        return s

    def moments(self, v: _Value) -> tuple[sympy.Expr, sympy.Expr]:
        """(second moment, cross-token covariance) of a value."""
        Q = sympy.Add(*[c ** 2 * self.sources[i][0] for i, c in v.terms.items()])
        K = sympy.Add(*[c ** 2 * self.sources[i][1] for i, c in v.terms.items()])
        return Q, K

    def combine(self, parts: list[tuple[_Value, sympy.Expr]]) -> _Value:
        terms: dict[int, sympy.Expr] = {}
        for v, c in parts:
            for i, a in v.terms.items():
                terms[i] = terms.get(i, 0) + c * a
        self.nodes.append(Node("lin", [(v.node, c) for v, c in parts]))
        return _Value(self, terms, len(self.nodes) - 1)

    # --- the vocabulary ---
    def norm(self, v: _Value, *, lr: Any = 1) -> _Value:
        """Norm: same sources, rescaled by 1/sqrt(Q + eps) (its learning rate: no init effect)."""
        k = self.counts["norm"] = self.counts["norm"] + 1
        Q, _ = self.moments(v)
        Qs = self.let(f"Q_n{k}", Q)
        self.norm_inputs.append(Qs)
        s = C.norm_scale(Qs)
        proj = sympy.sqrt(C.norm_backward_factor(Qs, d, self.norm_kind) * (Qs + C.EPS))
        self.nodes.append(Node("norm", [(v.node, s)], {"proj": proj}))
        return _Value(self, {i: c * s for i, c in v.terms.items()}, len(self.nodes) - 1)

    def _sublayer(self, kind: str, v: _Value, gains: dict[str, Any]) -> _Value:
        k = self.counts[kind] = self.counts[kind] + 1
        tag = f"{'a' if kind == 'attn' else 'f'}{k}"
        Q, K = self.moments(v)
        qin, kin = self.let(f"q_in_{tag}", Q), self.let(f"k_in_{tag}", K)
        G, Gc = sympy.Symbol(f"G_out_{tag}", real=True), sympy.Symbol(f"Gc_out_{tag}", real=True)
        g = {n: _const(x) for n, x in gains.items()}
        if kind == "attn":
            maps = C.attention_maps(qin, kin, G, Gc, sigma=sigma, consts=ATTN_CONST, T=T,
                                    kind=self.attention, **g)
        elif self.experts:
            maps = C.moe_maps(qin, kin, G, Gc, sigma=sigma, kind=self.ffn_kind, **g)
        else:
            maps = C.ffn_maps(qin, kin, G, Gc, sigma=sigma, kind=self.ffn_kind, **g)
        qo, ko = self.let(f"q_{tag}", maps[0]), self.let(f"k_{tag}", maps[1])
        self.sources.append((qo, ko))
        # backward maps are linear in (G, Gc): name their gains now (functions of the input)
        gains_b = {}
        for i, (out_name, m) in enumerate((("G", maps[2]), ("Gc", maps[3]))):
            for src, sym in (("G", G), ("Gc", Gc)):
                coef = sympy.diff(m, sym)  # linear in sym: the derivative is the gain
                gains_b[(out_name, src)] = (self.let(f"chi_{out_name}{src}_{tag}", coef)
                                            if coef != 0 else sympy.Integer(0))
        G_in = gains_b[("G", "G")] * G + gains_b[("G", "Gc")] * Gc
        Gc_in = gains_b[("Gc", "G")] * G + gains_b[("Gc", "Gc")] * Gc
        self.nodes.append(Node(kind, [(v.node, 1)], {"G": G, "Gc": Gc, "G_in": G_in,
                                                      "Gc_in": Gc_in, "tag": tag}))
        return _Value(self, {len(self.sources) - 1: sympy.Integer(1)}, len(self.nodes) - 1)

    def attn(self, v: _Value, *, value_gain: Any = 1, out_gain: Any = 1, lr: Any = 1,
             out_lr: Any = 1) -> _Value:
        """Attention of the model's kind: a fresh source (see components.attention_maps);
        learning-rate multipliers do not enter the init theory."""
        return self._sublayer("attn", v, {"value_gain": value_gain, "out_gain": out_gain})

    def ffn(self, v: _Value, *, in_gain: Any = 1, out_gain: Any = 1, lr: Any = 1,
            out_lr: Any = 1) -> _Value:
        """FFN or MoE: a fresh source (see components.ffn_maps / moe_maps)."""
        return self._sublayer("ffn", v, {"in_gain": in_gain, "out_gain": out_gain})

    # --- backward over the tape ---
    def backward(self, out: _Value) -> tuple[sympy.Expr, sympy.Expr]:
        """Gradient power and cross covariance at the block input, for unit power at the output
        (tape.walk_backward's rules over (power, cross-token covariance) pairs)."""
        gsrc: list[tuple[sympy.Expr, sympy.Expr]] = [(sympy.Integer(1), rg)]

        def power(amps: dict[int, sympy.Expr]) -> tuple[sympy.Expr, sympy.Expr]:
            return (sympy.Add(*[a ** 2 * gsrc[j][0] for j, a in amps.items()]),
                    sympy.Add(*[a ** 2 * gsrc[j][1] for j, a in amps.items()]))

        def sublayer(node: Node, arriving: tuple[sympy.Expr, sympy.Expr]) -> int:
            tag, sub = node.sub["tag"], node.sub
            # the maps were written in placeholder symbols G_out_*, which these define
            self.let(f"G_out_{tag}", arriving[0])
            self.let(f"Gc_out_{tag}", arriving[1])
            gsrc.append((self.let(f"G_in_{tag}", sub["G_in"]), self.let(f"Gc_in_{tag}", sub["Gc_in"])))
            return len(gsrc) - 1

        return walk_backward(self.nodes, out.node, sympy.Integer(1), power, sublayer)


@dataclass
class Recurrence:
    """A block's moment recurrence as a straight-line program of sympy assignments.

    Inputs: q, rho (block input state), rho_g (gradient token correlation at the block output),
    constants d, T, sigma, Mbar/Bbar/D2bar, and l, L where the scheme uses them. Outputs (OUTPUTS):
    q_next, rho_next, q_agg (aggregate before the output norm; nan if none), cos (cos(x_l, x_{l+1})),
    g_ratio (g_in/g_out) and rg_next (gradient token correlation at the block input).
    """

    scheme: str
    assign: tuple[tuple[sympy.Symbol, sympy.Expr], ...]
    outputs: dict[str, sympy.Expr]
    has_output_norm: bool

    def expr(self, name: str) -> sympy.Expr:
        """Output ``name`` as one expression (intermediate symbols substituted)."""
        e = self.outputs[name]
        for s, v in reversed(self.assign):
            if s in e.free_symbols:
                e = e.xreplace({s: v})
        return e

    def lines(self) -> list[str]:
        """The program as readable lines ``name = expr``."""
        out = [f"{s} = {sympy.sstr(v)}" for s, v in self.assign]
        return out + [f"{k} = {sympy.sstr(v)}" for k, v in self.outputs.items()]

    def latex(self) -> list[str]:
        """The program as LaTeX lines."""
        out = [f"{sympy.latex(s)} = {sympy.latex(v)}" for s, v in self.assign]
        return out + [f"\\mathrm{{{k.replace('_', '')}}} = {sympy.latex(v)}"
                      for k, v in self.outputs.items()]


def derive_block(s: Scheme, *, l: Any = l_sym, L: Any = L_sym, ffn: str = "gelu",
                 norm: str = "layernorm", experts: int = 0, top_k: int = 2,
                 params: dict[str, Any] | None = None, attention: str = "causal") -> Recurrence:
    """Run ``s.block`` over symbolic values and return its recurrence (ValueError on bad input)."""
    ctx = _Ctx(ffn=ffn, norm=norm, experts=experts, top_k=top_k, attention=attention)
    resolved = s.resolve(L, **(params or {}))
    x = _Value(ctx, {0: sympy.Integer(1)}, 0)
    out = s.block(x, ctx, l=l, L=L, **resolved)
    if not isinstance(out, _Value):
        raise ValueError(f"scheme '{s.name}' must return a value built from its input")
    Q, K = ctx.moments(out)
    qn, kn = ctx.let("q_next", Q), ctx.let("k_next", K)
    has_norm = ctx.nodes[out.node].kind == "norm"
    q_agg = ctx.norm_inputs[-1] if has_norm else sympy.nan
    c_in = out.terms.get(0, sympy.Integer(0))
    G_in, Gc_in = ctx.backward(out)
    g_in, gc_in = ctx.let("g_in", G_in), ctx.let("gc_in", Gc_in)
    outputs = {"q_next": qn, "rho_next": kn / qn, "q_agg": q_agg,
               "cos": c_in * sympy.sqrt(q / qn), "g_ratio": g_in, "rg_next": gc_in / g_in}
    return Recurrence(s.name, tuple(ctx.assign), outputs, has_norm)


@lru_cache(maxsize=256)
def _derive_cached(name: str, ffn: str, norm: str, experts: int, top_k: int,
                   params_key: tuple, l: Any, L: Any, attention: str) -> Recurrence:
    return derive_block(get_scheme(name), l=l, L=L, ffn=ffn, norm=norm, experts=experts,
                        top_k=top_k, params=dict(params_key), attention=attention)


def derive(name: str, *, ffn: str = "gelu", norm: str = "layernorm", experts: int = 0,
           top_k: int = 2, params: dict[str, Any] | None = None,
           l: Any = None, L: Any = None, attention: str = "causal") -> Recurrence:
    """The (cached) recurrence of a registered scheme's block, symbolic in l and L by default.

    A scheme that branches on l or L (Mix-LN) needs concrete ``l`` and ``L``.
    """
    key = tuple(sorted((params or {}).items()))
    l = l_sym if l is None else l
    L = L_sym if L is None else L
    try:
        return _derive_cached(name, ffn, norm, experts, top_k, key, l, L, attention)
    except TypeError:
        raise ValueError(f"scheme '{name}' branches on l or L: pass concrete l and L") from None


# --- numeric evaluation ---------------------------------------------------------------------

class _Printer(PythonCodePrinter):
    """Python code printer that calls undefined functions (Cbar, Ksilu, ...) by name."""

    def _print_Function(self, expr):  # noqa: N802 (sympy's naming)
        if isinstance(expr, sympy.core.function.AppliedUndef):
            return f"{expr.func.__name__}({', '.join(self._print(a) for a in expr.args)})"
        return super()._print_Function(expr)


def _numeric_funcs(T_val: int, experts: int, top_k: int) -> dict[str, Callable]:
    fns: dict[str, Callable] = dict(C.SILU_NUMERIC)
    fns.update(C.attention_numeric(T_val))
    if experts:
        m = C.moe_numeric(experts, top_k)
        fns.update({"MoeW2": m["W2"], "MoeWx": m["Wx"], "MoeR": m["R"]})
    return fns


def compile_recurrence(rec: Recurrence, consts: dict[Any, Any], *, T_val: int, experts: int = 0,
                       top_k: int = 2) -> Callable[[float, float, float], tuple[float, ...]]:
    """A fast Python function (q, rho, rho_g, l, L) -> OUTPUTS values; ``consts`` d, T, sigma."""
    return _compile(rec, tuple(sorted((str(k), float(v)) for k, v in consts.items())),
                    int(T_val), experts, top_k)


def _const_subs(consts: dict[str, float], T_val: int) -> dict[sympy.Symbol, float]:
    """Substitutions of the numeric constants (d, T, sigma, the attention sums) into a program."""
    subs: dict[sympy.Symbol, float] = {sympy.Symbol(k, positive=True): v for k, v in consts.items()}
    subs.update({sympy.Symbol(k, positive=True, integer=True): v for k, v in consts.items()})
    subs.update({ATTN_CONST[k]: v for k, v in C.attention_constants(T_val).items()})
    return subs


def _exec(src: str, name: str, label: str, T_val: int, experts: int, top_k: int) -> Callable:
    """Execute generated source (``math.f`` calls, numeric functions by name); return ``name``."""
    namespace: dict[str, Any] = {"math": math, "nan": float("nan")}
    namespace.update(_numeric_funcs(T_val, experts, top_k))
    for fn in ("sqrt", "asin", "acos", "pi", "exp", "log"):
        # acos/asin/sqrt clamp rounding past their domain's edge (components.NUMERIC_MATH)
        namespace[f"_m_{fn}"] = C.NUMERIC_MATH.get(fn, getattr(math, fn))
    exec(compile(src.replace("math.", "_m_"), f"<recurrence {label}>", "exec"), namespace)
    return namespace[name]


@lru_cache(maxsize=4096)
def _compile(rec: Recurrence, consts_key: tuple, T_val: int, experts: int, top_k: int):
    printer = _Printer({"fully_qualified_modules": True})
    subs = _const_subs(dict(consts_key), T_val)
    body = [f"    {s} = {printer.doprint(v.xreplace(subs))}" for s, v in rec.assign]
    rets = ["nan" if rec.outputs[n] is sympy.nan else printer.doprint(rec.outputs[n].xreplace(subs))
            for n in OUTPUTS]
    src = "def _f(q, rho, rho_g, l=1, L=1):\n" + "\n".join(body) + f"\n    return ({', '.join(rets)},)\n"
    return _exec(src, "_f", rec.scheme, T_val, experts, top_k)


def compile_split(rec: Recurrence, consts: dict[Any, Any], *, T_val: int, experts: int = 0,
                  top_k: int = 2) -> Callable[[Any], tuple[Callable, Callable]]:
    """The recurrence as a forward and a backward half, for iterating over a stack.

    Returns ``make(L) -> (fwd, bwd)``: ``fwd(q, rho, l)`` returns (q_next, rho_next, q_agg, cos,
    *saved) and ``bwd(rho_g, *fwd_output)`` returns (g_ratio, rg_next). The program is split by
    dependence on rho_g (forward moments and every backward gain are computed once, in ``fwd``;
    ``bwd`` evaluates only what the gradient correlation reaches), common subexpressions are
    computed once (sympy.cse), and subexpressions of L and constants alone once per ``make(L)``.
    Values agree with compile_recurrence up to floating-point reassociation.
    """
    return _compile_split(rec, tuple(sorted((str(k), float(v)) for k, v in consts.items())),
                          int(T_val), experts, top_k)


def _drop_unit(e: sympy.Expr) -> sympy.Expr:
    """``e`` without factors ±1.0 (left by σ = 1.0): x·1.0 = x exactly in floating point."""
    def unit(a: sympy.Expr) -> bool:
        return a.is_Mul and isinstance(a.args[0], sympy.Float) and abs(float(a.args[0])) == 1.0

    return e.replace(unit, lambda a: (1 if a.args[0] > 0 else -1) * a.func(*a.args[1:]))


@lru_cache(maxsize=4096)
def _compile_split(rec: Recurrence, consts_key: tuple, T_val: int, experts: int, top_k: int):
    subs = _const_subs(dict(consts_key), T_val)
    syms = [s for s, _ in rec.assign]
    exprs = [_drop_unit(v.xreplace(subs)) for _, v in rec.assign]
    fwd_names = ("q_next", "rho_next", "q_agg", "cos")
    bwd_names = ("g_ratio", "rg_next")
    out_exprs = [_drop_unit(rec.outputs[n].xreplace(subs)) for n in fwd_names + bwd_names]
    live_out = [e for e in out_exprs if e is not sympy.nan]
    repl, reduced = sympy.cse(exprs + live_out, symbols=sympy.numbered_symbols("_x"),
                              order="none")
    # one table of definitions: cse temporaries and program symbols, each with its expression
    defs: dict[sympy.Symbol, sympy.Expr] = dict(repl)
    defs.update(zip(syms, reduced[:len(syms)]))
    outs = iter(reduced[len(syms):])
    out_map = {n: (sympy.nan if e is sympy.nan else next(outs))
               for n, e in zip(fwd_names + bwd_names, out_exprs)}
    # copies (a = b, a = 1) are substituted, not assigned
    while True:
        alias = {s: e for s, e in defs.items() if e.is_Symbol or e.is_Integer}
        if not alias:
            break
        for s in alias:  # chains (a = b, b = c): every copy to its end, or b is left undefined
            while alias[s] in alias:
                alias[s] = alias[alias[s]]
        defs = {s: e.xreplace(alias) for s, e in defs.items() if s not in alias}
        out_map = {n: (e if e is sympy.nan else e.xreplace(alias)) for n, e in out_map.items()}
    # classify: 'const' (L and numbers only), 'bwd' (reaches rho_g), else 'fwd'
    kind: dict[sympy.Symbol, str] = {L_sym: "const", rg: "bwd", q: "fwd", rho: "fwd",
                                     l_sym: "fwd"}
    order: list[sympy.Symbol] = []

    def visit(s: sympy.Symbol) -> str:
        if s in kind:
            return kind[s]
        kind[s] = "fwd"  # provisional (definitions are acyclic)
        ks = {visit(a) for a in defs[s].free_symbols}
        kind[s] = "bwd" if "bwd" in ks else ("fwd" if "fwd" in ks else "const")
        order.append(s)
        return kind[s]

    for e in out_map.values():
        for a in e.free_symbols:
            visit(a)
    for n in fwd_names:
        if any(kind[a] == "bwd" for a in out_map[n].free_symbols):
            raise ValueError(f"forward output {n} depends on the gradient correlation")
    # constant subtrees left inline (e.g. sqrt(2) used once) are hoisted too
    hoisted: list[tuple[sympy.Symbol, sympy.Expr]] = []
    hnames = sympy.numbered_symbols("_k")

    def hoist(e: sympy.Expr) -> sympy.Expr:
        if e.is_Atom:
            return e
        if all(kind.get(a) == "const" for a in e.free_symbols) and not e.is_number or \
                (e.is_number and not e.is_Rational and not isinstance(e, sympy.Float)):
            h = next(hnames)
            kind[h] = "const"
            hoisted.append((h, e))
            return h
        return e.func(*[hoist(a) for a in e.args])

    body = {s: (defs[s] if kind[s] == "const" else hoist(defs[s])) for s in order}
    out_map = {n: (e if e is sympy.nan else hoist(e)) for n, e in out_map.items()}
    # backward: what it reads of the forward half (saved), in a fixed order
    bwd_syms = [s for s in order if kind[s] == "bwd"]
    need: set[sympy.Symbol] = set()
    for s in bwd_syms:
        need |= body[s].free_symbols
    for n in bwd_names:
        need |= out_map[n].free_symbols
    saved = sorted((a for a in need if kind.get(a) == "fwd"), key=lambda a: a.name)
    fwd_syms = [s for s in order if kind[s] == "fwd"]
    printer = _Printer({"fully_qualified_modules": True})

    def pr(e: sympy.Expr) -> str:
        return "nan" if e is sympy.nan else printer.doprint(e)

    lines = ["def _make(L):"]
    lines += [f"    {s} = {pr(body[s])}" for s in order if kind[s] == "const"]
    lines += [f"    {h} = {pr(e)}" for h, e in hoisted]
    lines.append("    def _fwd(q, rho, l=1):")
    lines += [f"        {s} = {pr(body[s])}" for s in fwd_syms]
    rets = [pr(out_map[n]) for n in fwd_names] + [str(a) for a in saved]
    lines.append(f"        return ({', '.join(rets)},)")
    args = ", ".join(["rho_g", "_o0", "_o1", "_o2", "_o3"] + [str(a) for a in saved])
    lines.append(f"    def _bwd({args}):")
    lines += [f"        {s} = {pr(body[s])}" for s in bwd_syms]
    lines.append(f"        return ({pr(out_map['g_ratio'])}, {pr(out_map['rg_next'])})")
    lines.append("    return _fwd, _bwd")
    src = "\n".join(lines) + "\n"
    make = _exec(src, "_make", f"{rec.scheme} (split)", T_val, experts, top_k)
    make.source = src
    return make


Recurrence.__hash__ = lambda self: id(self)  # cached by identity: derive() returns cached objects

