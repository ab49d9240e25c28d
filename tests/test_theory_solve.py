"""Closed forms against numeric iteration (L up to 10^4), profiles, the SpanNorm family, the CLI."""

import math
from fractions import Fraction

import numpy as np
import pytest
import sympy

from theory import solve as S

BASE = {"d": 512, "T": 128, "sigma": 1.0, "rho_star": 0.3}
LS = [1, 7, 100, 1000, 10000]


@pytest.mark.parametrize("scheme", ["pre", "peri"])
def test_growing_closed_forms_match_iteration(scheme):
    cf = S.closed_forms(scheme)
    assert cf.kind == "growing"
    qs, prod = S.iterate_reduced(cf, BASE, 10000, 1.3)
    num = S.numeric_closed(cf, BASE, LS, 1.3)
    for i, L in enumerate(LS):
        assert num["q_L"][i] == pytest.approx(qs[L], rel=1e-9)
        assert num["g_ratio"][i] == pytest.approx(prod[L], rel=1e-9)


@pytest.mark.parametrize("scheme", ["post", "deepnorm", "span", "b2t"])
def test_normalized_closed_forms_match_iteration(scheme):
    cf = S.closed_forms(scheme)
    assert cf.kind == "normalized"
    for L in (10, 10000):
        qs, prod = S.iterate_reduced(cf, BASE, L, 1.0)
        num = S.numeric_closed(cf, BASE, [L], 1.0, r_first=float(prod[1]))
        assert num["q_L"][0] == pytest.approx(qs[L], rel=1e-12)
        assert num["g_ratio"][0] == pytest.approx(prod[L], rel=1e-9)


def test_pre_gradient_exponent_matches_closed_form_slope():
    cf = S.closed_forms("pre")
    cv = S.const_values(cf.consts, BASE)
    expo = float(sympy.N(cf.exponent.xreplace(cv).xreplace({S.I.d: BASE["d"]})))
    num = S.numeric_closed(cf, BASE, [10000, 100000], 1.0)
    slope = math.log(num["g_ratio"][1] / num["g_ratio"][0]) / math.log(10)
    assert slope == pytest.approx(expo, rel=0.02)


def test_span_beta_family_limits():
    fam = S.span_beta_family()
    assert fam["r0_minus_1"] == 0
    assert fam["limits"]["1"] == 0
    assert sympy.sympify(fam["limits"]["1/4"]).has(sympy.oo)
    assert not sympy.sympify(fam["limits"]["1/2"]).has(sympy.oo)


def test_predict_profile_shapes_and_anchors():
    p = S.predict_profile("span", depth=16, width=512, seq_len=64, rho0=0.1)
    assert set(S.PROFILE_KEYS) <= set(p)
    assert all(len(v) == 17 for v in p.values())
    assert p["g"][-1] == 1.0 and p["q"][0] == 1.0 and math.isnan(p["cos"][0])
    assert np.all(np.abs(p["q"][1:] - 1) < 1e-3)  # normalized stream
    assert np.all(p["q_agg"][1:] > 1)
    pre = S.predict_profile("pre", depth=16, width=512, seq_len=64, rho0=0.1, q0=2.0)
    assert pre["q"][0] == 2.0 and np.all(np.diff(pre["q"]) > 0) and np.all(np.isnan(pre["q_agg"]))


def test_profile_to_depth_1e4_is_fast():
    import time
    S.predict_profile("pre", depth=100, width=512)
    t = time.perf_counter()
    S.predict_profile("pre", depth=10000, width=512)
    assert time.perf_counter() - t < 2.0  # generous: the bench reports the real figure


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError):
        S.predict_profile("nope", depth=4)
    with pytest.raises(ValueError):
        S.predict_profile("pre", depth=0)


def test_cli_theory_one_scheme(tmp_path, capsys):
    from run_analysis import main
    rc = main(["theory", "--scheme", "deepnorm", "--out", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / "theory.json").exists()
    rows = (tmp_path / "claims.csv").read_text().splitlines()
    assert rows[0] == "claim,scheme,statement,method,status,evidence" and len(rows) >= 3
    assert main(["theory", "--scheme", "nope", "--out", str(tmp_path)]) == 2


def test_branching_scheme_with_depth_dependent_scaling_is_not_merged():
    """A scheme that branches on l gets one recurrence per distinct dataflow, constants included:
    an always-true branch around LayerNorm Scaling must reproduce lns exactly."""
    from theory.schemes import SCHEMES, scheme

    @scheme("t_lns_branch", formula="lns behind an always-true branch on l", source="test",
            final_norm=True)
    def t_lns_branch(x, op, *, l, L):
        if l >= 1:  # concrete l only: forces per-block derivation
            h = x + op.attn(op.norm(x) * l ** Fraction(-1, 2))
            return h + op.ffn(op.norm(h) * l ** Fraction(-1, 2))
        return x

    try:
        a = S.predict_profile("t_lns_branch", depth=12, width=256, seq_len=32, rho0=0.1)
        b = S.predict_profile("lns", depth=12, width=256, seq_len=32, rho0=0.1)
        for key in ("q", "rho", "g", "rg", "cos"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-12, equal_nan=True, err_msg=key)
    finally:
        del SCHEMES["t_lns_branch"]


@pytest.mark.parametrize("scheme", list(S.SCHEMES))
def test_correlations_stay_in_bounds_deep(scheme):
    """Token and gradient correlations and layer cosines are cosines: within [-1, 1] at any depth
    (an earlier version let ρ_g reach 1e21 in collapsed PostNorm)."""
    for rho_g in (0.0, 0.15, 0.9):
        p = S.predict_profile(scheme, depth=1024, width=512, seq_len=128, rho0=0.07, rho_g=rho_g)
        for key in ("rho", "rg", "cos"):
            v = p[key][np.isfinite(p[key])]
            assert np.all(np.abs(v) <= 1 + 1e-9), (key, v[np.abs(v) > 1 + 1e-9][:3])
