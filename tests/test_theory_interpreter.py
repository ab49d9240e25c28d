"""The interpreter's recurrences for pre and post equal the hand-written ones; new schemes work."""

import math

import pytest
import sympy

from theory import components as C
from theory import interpreter as I
from theory.schemes import SCHEMES, register, Scheme

CONSTS = {"d": 512, "T": 64, "sigma": 1.0}
POINTS = [(1.0, 0.2, 0.0), (3.5, 0.6, 0.1), (0.7, 0.9, 0.3)]


def _ev(e, qin, kin, G, Gc):
    ac = C.attention_constants(CONSTS["T"])
    fns = C.attention_numeric(CONSTS["T"])
    sq, sk, sG, sGc = sympy.symbols("q k G Gc")
    e = e.xreplace({I.ATTN_CONST[k]: v for k, v in ac.items()})
    e = e.xreplace({sq: qin, sk: kin, sG: G, sGc: Gc})
    e = e.replace(lambda a: isinstance(a, sympy.core.function.AppliedUndef),
                  lambda a: sympy.Float(fns[a.func.__name__](float(a.args[0]))))
    return float(e)


def _attn(qin, kin, G, Gc):
    sq, sk, sG, sGc = sympy.symbols("q k G Gc")
    m = C.attention_maps(sq, sk, sG, sGc, sigma=1, consts=I.ATTN_CONST)
    return [_ev(x, qin, kin, G, Gc) for x in m]


def _ffn(qin, kin, G, Gc):
    sq, sk, sG, sGc = sympy.symbols("q k G Gc")
    return [float(x.xreplace({sq: qin, sk: kin, sG: G, sGc: Gc}))
            for x in C.ffn_maps(sq, sk, sG, sGc, sigma=1, kind="gelu")]


EPS = 1e-5


def hand_pre(q, rho, rg, d):
    """h = x + A(N(x)); y = h + F(N(h)) written out by hand."""
    s1 = 1 / (q + EPS)
    qa, ka, _, _ = _attn(q * s1, q * rho * s1, 0, 0)
    qh, kh = q + qa, q * rho + ka
    s2 = 1 / (qh + EPS)
    qf, kf, _, _ = _ffn(qh * s2, kh * s2, 0, 0)
    q_next, k_next = qh + qf, kh + kf
    p = 1 - 2 / d
    # backward: the FFN branch (fresh gradient, projected once by N) adds to the skip at h
    _, _, Gf, Gcf = _ffn(qh * s2, kh * s2, 1, rg)
    Gh, Gch = 1 + Gf * s2 * p, rg + Gcf * s2 * p
    _, _, Ga, Gca = _attn(q * s1, q * rho * s1, Gh, Gch)
    Gx, Gcx = Gh + Ga * s1 * p, Gch + Gca * s1 * p
    return q_next, k_next / q_next, math.sqrt(q / q_next), Gx, Gcx / Gx


def hand_post(q, rho, rg, d):
    """h = N(x + A(x)); y = N(h + F(h)) written out by hand."""
    qa, ka, _, _ = _attn(q, q * rho, 0, 0)
    Q1, K1 = q + qa, q * rho + ka
    s1 = 1 / (Q1 + EPS)
    qh, kh = Q1 * s1, K1 * s1
    qf, kf, _, _ = _ffn(qh, kh, 0, 0)
    Q2, K2 = qh + qf, kh + kf
    s2 = 1 / (Q2 + EPS)
    q_next = Q2 * s2
    p = 1 - 2 / d
    # backward: the output arrives projected; the FFN's fresh gradient is projected at N1 only
    _, _, Gf, Gcf = _ffn(qh, kh, 1, rg)
    Gh, Gch = s2 * (1 + Gf), s2 * (rg + Gcf)  # at h: skip + FFN branch, through N2's scale
    # through N1: the skip part (already projected) and the FFN part (fresh) -> (1-2/d)
    Gsum = s1 * (s2 + s2 * Gf * p)
    Gcsum = s1 * (s2 * rg + s2 * Gcf * p)
    _, _, Ga, Gca = _attn(q, q * rho, Gsum, Gcsum)
    Gx, Gcx = Gsum + Ga, Gcsum + Gca  # attention reads x directly: no norm, no projection
    cos = s1 ** 0.5 * s2 ** 0.5 * math.sqrt(q / q_next)
    del Gh, Gch
    return q_next, K2 * s2 / q_next, cos, Gx, Gcx / Gx, Q2


@pytest.mark.parametrize("point", POINTS)
def test_pre_equals_hand_written(point):
    f = I.compile_recurrence(I.derive("pre"), CONSTS, T_val=CONSTS["T"])
    got = f(*point)
    want = hand_pre(*point, CONSTS["d"])
    for i, w in zip((0, 1, 3, 4, 5), want):
        assert got[i] == pytest.approx(w, rel=1e-9)
    assert math.isnan(got[2])


@pytest.mark.parametrize("point", POINTS)
def test_post_equals_hand_written(point):
    f = I.compile_recurrence(I.derive("post"), CONSTS, T_val=CONSTS["T"])
    got = f(*point)
    qn, rn, cos, g, rgn, agg = hand_post(*point, CONSTS["d"])
    assert got[0] == pytest.approx(qn, rel=1e-9)
    assert got[1] == pytest.approx(rn, rel=1e-9)
    assert got[2] == pytest.approx(agg, rel=1e-9)
    assert got[3] == pytest.approx(cos, rel=1e-9)
    assert got[4] == pytest.approx(g, rel=1e-9)
    assert got[5] == pytest.approx(rgn, rel=1e-9)


def test_user_scheme_gets_recurrences_without_extra_code():
    def alt_span(x, op, *, l, L, beta):  # the alternative SpanNorm reading y = x + N(a + f)
        a = op.attn(op.norm(x), out_gain=beta)
        f = op.ffn(op.norm(x + a), out_gain=beta)
        return x + op.norm(a + f)

    register(Scheme("alt_span_test", alt_span, "y = x + N(a + f)", "test", True,
                    {"beta": lambda L: L ** -0.5}), replace=True)
    try:
        rec = I.derive("alt_span_test")
        f = I.compile_recurrence(rec, CONSTS, T_val=CONSTS["T"])
        q_next, rho_next, q_agg, cos, g, rg = f(1.0, 0.2, 0.0, 1, 16)
        assert q_next == pytest.approx(2.0, rel=1e-3)  # x plus a normalized branch (eps-limited)
        assert math.isnan(q_agg) and 0 < cos < 1 and g > 1
    finally:
        SCHEMES.pop("alt_span_test", None)


def test_mixln_needs_concrete_blocks():
    with pytest.raises(ValueError, match="branches on l"):
        I.derive("mixln")
    assert I.derive("mixln", l=1, L=8).has_output_norm
    assert not I.derive("mixln", l=8, L=8).has_output_norm
