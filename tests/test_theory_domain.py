"""Kernels on their closed domain: correlations of exactly ±1 (a collapsed stream) and rounding just
past 1 give finite predictions, with the exact values the kernels take at the edge."""

import math

import numpy as np
import pytest
import sympy

from theory import components as C
from theory import positional as P
from theory.schemes import SCHEMES, scheme
from theory.solve import predict_profile

FFNS = ("gelu", "relu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
EDGE = (0.0, 0.5, 1.0, 1 + 1e-12)  # 1 + 1e-12: a correlation rounded past its end


def test_safe_functions_clamp_rounding_only():
    assert C.safe_acos(1 + 1e-12) == 0.0 and C.safe_acos(-1 - 1e-12) == math.pi
    assert C.safe_asin(1 + 1e-12) == math.pi / 2
    assert C.safe_sqrt(-1e-12) == 0.0 and C.safe_sqrt(4.0) == 2.0
    for bad in (lambda: C.safe_acos(1.1), lambda: C.safe_sqrt(-1e-3)):
        with pytest.raises(ValueError):  # a real bug still raises
            bad()


def test_relu_kernel_exact_values_at_the_edge():
    """Arc-cosine kernels (Cho & Saul 2009): K(q, ρq) = q/2, q/(2π), 0 and K' = 1/2, 1/4, 0 at
    ρ = 1, 0, -1, on the numeric path of the position-resolved theory, also just past ±1."""
    K, dK = P._kernel_fns("relu")
    q = np.array([2.0])
    for r, k, dk in ((1.0, 1.0, 0.5), (1 + 1e-12, 1.0, 0.5), (0.0, 1 / math.pi, 0.25),
                     (-1.0, 0.0, 0.0), (-1 - 1e-12, 0.0, 0.0)):
        assert K(q, r * q)[0] == pytest.approx(k, abs=1e-9), r
        assert dK(q, r * q)[0] == pytest.approx(dk, abs=1e-9), r
    # the sympy forms are unchanged and give the same exact values at ρ = 1
    qs = sympy.Symbol("q", positive=True)
    assert sympy.simplify(C.relu_kernel(qs, qs)) == qs / 2
    assert C.relu_dkernel(qs, qs) == sympy.Rational(1, 2)


@pytest.mark.parametrize("kind", ["gelu", "silu"])
def test_smooth_kernels_continuous_at_the_edge(kind):
    """GELU (closed form) and SiLU (quadrature) at ρ = 1 equal their 1-D second moments."""
    K, dK = P._kernel_fns(kind)
    q = np.array([1.7])
    x, w = np.polynomial.hermite_e.hermegauss(120)
    w = w / w.sum()
    u = math.sqrt(1.7) * x
    phi = {"gelu": lambda v: v * 0.5 * (1 + np.vectorize(math.erf)(v / math.sqrt(2))),
           "silu": lambda v: v / (1 + np.exp(-v))}[kind]
    for r in (1.0, 1 + 1e-12):
        assert K(q, r * q)[0] == pytest.approx(float((w * phi(u) ** 2).sum()), rel=1e-4)
        assert np.isfinite(dK(q, r * q)[0])
    assert K(q, q * (1 - 1e-9))[0] == pytest.approx(K(q, q)[0], rel=1e-6)


@pytest.fixture
def ffn_only():
    @scheme("t_dom_ffn", formula="y = x + F(x)", source="test", final_norm=False)
    def t_dom_ffn(x, op, *, l, L):
        return x + op.ffn(x)

    yield "t_dom_ffn"
    del SCHEMES["t_dom_ffn"]


def test_collapsed_relu_stream_exact_recurrence(ffn_only):
    """y = x + relu-MLP(x) on a collapsed stream: q grows ×3/2 per block (cross term q/2), ρ stays
    1 and the gradient grows ×3/2 (K' = 1/2), exactly, in both interpretations."""
    for rho0 in (1.0, 1 + 1e-12):
        kw = dict(depth=64, width=256, seq_len=8, ffn="relu", q0=1.0, rho0=rho0, rho_g=1.0)
        for p in (predict_profile(ffn_only, **kw), P.predict_positional(ffn_only, **kw)):
            np.testing.assert_allclose(p["q"], 1.5 ** np.arange(65), rtol=1e-12)
            np.testing.assert_allclose(p["rho"][1:], 1.0, atol=1e-12)
            np.testing.assert_allclose(p["g"][::-1], 1.5 ** np.arange(65), rtol=1e-12)
            np.testing.assert_allclose(p["rg"], 1.0, atol=1e-6)  # ρ one ulp off 1: K' ∝ √(1-ρ)


def _finite(p: dict) -> bool:
    return all(np.all(np.isfinite(p[k])) for k in ("q", "rho", "g", "rg")) and \
        np.all(np.abs(p["rho"]) <= 1 + 1e-9)


def _edge_failures(schemes: list[str], ffn: str, norm: str) -> list:
    bad = []
    for name in schemes:
        for rho0 in EDGE:
            try:
                p = predict_profile(name, depth=64, width=64, seq_len=16, ffn=ffn, norm=norm,
                                    rho0=rho0, rho_g=min(rho0, 1.0))
                if not _finite(p):
                    bad.append((name, rho0, "not finite"))
            except Exception as e:  # noqa: BLE001 (collect every failure, then report)
                bad.append((name, rho0, repr(e)))
    return bad


def _registered() -> list[str]:
    return [s for s in SCHEMES if not s.startswith("t_")]


def test_every_scheme_on_the_domain_edge_relu():
    """Every registered scheme with ReLU (the kernel with the domain edge), ρ_0 ∈ {0, 0.5, 1,
    1 + 1e-12}, depth 64: finite, |ρ| ≤ 1 (this loop found ReLU's acos/sqrt domain errors, e.g. post
    at depth 56, and Peri-LN + ReLU's KeyError: a chain of copies left a symbol undefined)."""
    assert not _edge_failures(_registered(), "relu", "layernorm")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("ffn", FFNS)
def test_pre_post_span_on_the_domain_edge(ffn, norm):
    """pre, post and span, every FFN and norm kind, on the edge at depth 64."""
    assert not _edge_failures(["pre", "post", "span"], ffn, norm)


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("ffn", FFNS)
def test_every_scheme_every_kind_on_the_domain_edge(ffn, norm):
    """The full product: every scheme × FFN × norm on the edge (about 20 s)."""
    assert not _edge_failures(_registered(), ffn, norm)


@pytest.mark.parametrize("attention", ["causal", "bidirectional", "uniform"])
def test_pre_post_span_on_the_edge_both_interpretations(attention):
    """pre, post, span at depth 64 with ReLU on the edge, scalar and position-resolved, every
    attention kind (GELU and SwiGLU: the slow product and the tests above)."""
    for name in ("pre", "post", "span"):
        for rho0 in (0.0, 1.0, 1 + 1e-12):
            kw = dict(depth=64, width=64, seq_len=8, ffn="relu", rho0=rho0, attention=attention)
            assert _finite(predict_profile(name, **kw)), (name, rho0)
            assert _finite(P.predict_positional(name, **kw)), (name, rho0)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["causal", "bidirectional", "uniform"])
@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
def test_pre_post_span_on_the_edge_smooth_ffns(attention, ffn):
    """The same for GELU and SwiGLU."""
    for name in ("pre", "post", "span"):
        for rho0 in (0.0, 1.0, 1 + 1e-12):
            kw = dict(depth=64, width=64, seq_len=8, ffn=ffn, rho0=rho0, attention=attention)
            assert _finite(predict_profile(name, **kw)), (name, rho0)
            assert _finite(P.predict_positional(name, **kw)), (name, rho0)


def test_anticorrelated_pair_and_impossible_correlations():
    """ρ = -1 is possible for T = 2 tokens only; beyond [-1/(T-1), 1] the input is refused."""
    for kind in ("causal", "uniform"):
        p = predict_profile("post", depth=16, seq_len=2, ffn="relu", rho0=-1.0, attention=kind)
        assert _finite(p)
    with pytest.raises(ValueError, match="rho0 must lie in"):
        predict_profile("pre", depth=4, rho0=1.5)
    with pytest.raises(ValueError, match="rho0 must lie in"):
        predict_profile("pre", depth=4, seq_len=16, rho0=-1.0)
    with pytest.raises(ValueError, match="rho_g must lie in"):
        P.predict_positional("pre", depth=4, seq_len=8, rho_g=1.01)


def test_the_reported_cases():
    """The issue's cases: post + ReLU at depth 56, pre and post at ρ_0 = 1."""
    assert _finite(predict_profile("post", ffn="relu", depth=56))
    for name in ("pre", "post"):
        assert _finite(predict_profile(name, depth=8, rho0=1.0))
        assert _finite(P.predict_positional(name, depth=8, seq_len=16, rho0=1.0))
