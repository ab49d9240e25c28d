"""Position-resolved theory: attention per position against Monte Carlo, agreement with the scalar
recurrence where positions are exchangeable, and the deep-PostNorm first-token gradient sink."""

import math

import numpy as np
import pytest
import torch

from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import Attention, ModelConfig, build_model
from theory import positional as P
from theory.schemes import SCHEMES, scheme
from theory.solve import predict_profile

D = 1024


def _correlated(n: int, T: int, rho: float, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, 1, D, generator=gen, dtype=torch.float64)
    z = torch.randn(n, T, D, generator=gen, dtype=torch.float64)
    return math.sqrt(rho) * m + math.sqrt(1 - rho) * z


@pytest.mark.parametrize("rho,rg", [(0.5, 0.5), (0.9, 0.2), (0.99, 0.3)])
def test_attention_per_position_against_sdpa(rho, rg):
    """Per-position output second moment and input-gradient power of causal attention.

    Tolerance reached: forward ≤ 6%, backward ≤ 10% at every position (the first token's
    gradient, which collects every later token's, included), token cosine of the output within
    0.03. Monte Carlo noise at this size is about 2%; the rest is the linearized cross-query
    softmax fluctuation (exact on the diagonal, approximate between queries).
    """
    T, draws = 32, 12
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(12)
    cfg = ModelConfig(width=D, heads=8, sigma=1.0)
    qs, gs, cs = [], [], []
    for _ in range(draws):
        layer = Attention(cfg).double()
        x = _correlated(8, T, rho, gen).requires_grad_()
        y = layer(x)
        (y * _correlated(8, T, rg, gen)).sum().backward()
        qs.append((y.detach() ** 2).mean((0, 2)))
        cs.append(P.mean_cosine(_gram(y)))
        gs.append((x.grad ** 2).mean((0, 2)))
    mq, mg = torch.stack(qs).mean(0).numpy(), torch.stack(gs).mean(0).numpy()
    S = (1 - rho) * np.eye(T) + rho * np.ones((T, T))
    K, backward = P.attention(S, sigma=1.0)
    G = backward((1 - rg) * np.eye(T) + rg * np.ones((T, T)))
    eq, eg = np.abs(np.diag(K) - mq) / mq, np.abs(np.diag(G) - mg) / mg
    print(f"max rel error per position: forward {eq.max():.3f}, backward {eg.max():.3f}")
    assert eq.max() < 0.06 and eg.max() < 0.10
    assert abs(P.mean_cosine(K) - np.mean(cs)) < 0.03
    assert mg[0] > 3 * mg[-1]  # the effect the scalar recurrence averages away


@pytest.fixture
def positionwise_schemes():
    @scheme("t_post_ffn", formula="y = N(x + F(x))", source="test", final_norm=False)
    def t_post_ffn(x, op, *, l, L):
        return op.norm(x + op.ffn(x))

    @scheme("t_pre_ffn", formula="y = x + F(N(x))", source="test", final_norm=True)
    def t_pre_ffn(x, op, *, l, L):
        return x + op.ffn(op.norm(x))

    yield ["t_post_ffn", "t_pre_ffn"]
    del SCHEMES["t_post_ffn"], SCHEMES["t_pre_ffn"]


@pytest.mark.parametrize("ffn,experts", [("gelu", 0), ("relu", 0), ("swiglu", 0), ("gelu", 8)])
def test_positionwise_blocks_match_scalar_recurrence(positionwise_schemes, ffn, experts):
    """Without attention the tokens stay exchangeable: both interpretations must agree exactly
    (SwiGLU to 1e-4: the resolved side interpolates its numeric kernel in the correlation)."""
    rtol = 1e-4 if ffn == "swiglu" else 1e-9
    for name in positionwise_schemes:
        kw = dict(depth=20, width=256, seq_len=16, ffn=ffn, experts=experts, q0=1.3, rho0=0.2,
                  rho_g=0.3)
        a, b = P.predict_positional(name, **kw), predict_profile(name, **kw)
        for key in ("q", "rho", "g", "rg", "cos"):
            np.testing.assert_allclose(a[key][1:], b[key][1:], rtol=rtol, err_msg=f"{name} {key}")


def test_profile_bounds_and_inputs():
    p = P.predict_positional("post", depth=64, width=256, seq_len=32, rho0=0.1, rho_g=0.2)
    for key in ("rho", "rg", "cos"):
        v = p[key][np.isfinite(p[key])]
        assert np.all(np.abs(v) <= 1 + 1e-9), key
    assert p["g"][-1] == 1.0 and p["rg"][-1] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="depth"):
        P.predict_positional("post", depth=0)
    with pytest.raises(ValueError, match="unknown scheme"):
        P.predict_positional("nope", depth=4)
    with pytest.raises(ValueError, match="unknown norm kind"):
        P.predict_positional("post", depth=4, norm="batchnorm")


def _measure_post(depth: int, T: int, seeds: int = 2) -> dict[str, float]:
    """An init PostNorm testbed on corpus text: gradient power at the embedding over the top
    block's, the first token's share of it (its power over the token mean), ρ_0 and top ρ_g."""
    cfg = ModelConfig(scheme="post", depth=depth, width=256, heads=4, max_seq_len=T)
    corpus, gen = load_corpus(), torch.Generator().manual_seed(3)
    out = {"ratio": [], "share": [], "rho0": [], "rho_g": []}
    for seed in range(seeds):
        model = build_model(cfg, seed=seed)
        seen = {}

        def keep(name):
            def hook(module, args, output=None):
                t = args[0] if output is None else output
                t.retain_grad()
                seen[name] = t
            return hook
        h1 = model.blocks[0].register_forward_pre_hook(keep("embed"))
        h2 = model.blocks[-1].register_forward_hook(keep("top"))
        x, y = corpus.batch("train", 8, T, generator=gen)
        model(x, y)[1].backward()
        h1.remove(), h2.remove()
        e, top = seen["embed"], seen["top"]
        per_pos = (e.grad.double() ** 2).mean((0, 2))
        out["ratio"].append(float(per_pos.mean() / (top.grad.double() ** 2).mean()))
        out["share"].append(float(per_pos[0] / per_pos.mean()))
        out["rho0"].append(float(P.mean_cosine(_gram(e))))
        out["rho_g"].append(float(P.mean_cosine(_gram(top.grad))))
    res = {k: float(np.mean(v)) for k, v in out.items()}
    res["ratio_se"] = float(np.std(out["ratio"], ddof=1) / np.sqrt(seeds))
    return res


def _gram(x: torch.Tensor) -> np.ndarray:
    x = x.detach().double()
    return (x @ x.transpose(1, 2)).mean(0).numpy()


def test_deep_postnorm_gradient_sinks_into_first_token():
    """Measured at init: deep PostNorm sends nearly all gradient power to the first token.

    The position-resolved theory predicts both the share and the size of g_0/g_L; the
    position-averaged recurrence cannot see the share and misses g_0/g_L by several times.
    """
    L, T = 16, 64
    m = _measure_post(L, T, seeds=8)  # g_0/g_L varies a lot from seed to seed: 8 of them
    kw = dict(depth=L, width=256, seq_len=T, rho0=m["rho0"], rho_g=m["rho_g"])
    resolved, averaged = P.predict_positional("post", **kw), predict_profile("post", **kw)
    assert m["share"] > 0.5 * T  # the measured effect itself
    assert resolved["g_first"][0] == pytest.approx(m["share"], rel=0.15)
    assert abs(resolved["g"][0] - m["ratio"]) < 3 * m["ratio_se"]
    assert abs(averaged["g"][0] - m["ratio"]) > 3 * m["ratio_se"]


def test_attention_alignment_term_against_monte_carlo():
    """Finite width: keys that win a query are aligned with it and so with each other, which
    raises attention's output second moment by ≈ (v − C)/d at ρ = 0. At d = 256 the mean-field
    map is ~3 % low; with the derived alignment term it must be within 3 standard errors of Monte
    Carlo and closer than without it."""
    d, T, draws = 256, 64, 40
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(6)
    q = []
    for _ in range(draws):
        layer = Attention(ModelConfig(width=d, heads=4)).double()
        x = torch.randn(8, T, d, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            q.append(float((layer(x) ** 2).mean()))
    measured, se = float(np.mean(q)), float(np.std(q) / math.sqrt(draws))
    S = np.eye(T)
    plain = float(np.mean(np.diag(P.attention(S, sigma=1.0)[0])))
    aligned = float(np.mean(np.diag(P.attention(S, sigma=1.0, width=d)[0])))
    print(f"q: measured {measured:.4f} ± {se:.4f}, mean field {plain:.4f}, aligned {aligned:.4f}")
    assert abs(aligned - measured) < 3 * se
    assert abs(aligned - measured) < abs(plain - measured)
    assert aligned > plain


def test_explicit_input_covariances_match_the_uniform_ones_and_are_checked():
    T, kw = 16, dict(depth=6, width=128, seq_len=16)
    a = P.predict_positional("pre", q0=1.2, rho0=0.1, rho_g=0.3, **kw)
    cov0 = 1.2 * (0.9 * np.eye(T) + 0.1 * np.ones((T, T)))
    grad = 0.7 * np.eye(T) + 0.3 * np.ones((T, T))
    b = P.predict_positional("pre", cov0=cov0, grad_top=grad, **kw)
    for key in ("q", "rho", "g", "rg", "g_first"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12, err_msg=key)
    with pytest.raises(ValueError, match="symmetric 16×16"):
        P.predict_positional("pre", cov0=np.eye(8), **kw)
    with pytest.raises(ValueError, match="positive diagonal"):
        P.predict_positional("pre", grad_top=np.zeros((T, T)), **kw)
    for q0 in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="q0"):
            P.predict_positional("pre", q0=q0, **kw)


def _layernorm_backward_power(y: torch.Tensor, seed: int) -> float:
    """E|J_LN(y)ᵀ g|²/d for a gradient g independent of y."""
    y = y.clone().requires_grad_(True)
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))
    (torch.nn.functional.layer_norm(y, (y.shape[1],)) * g).sum().backward()
    return float((y.grad ** 2).sum(1).mean() / y.shape[1])


@pytest.mark.parametrize("fixed_power, gaussian_power", [(0.0, 1.0), (1.0, 0.5), (1.0, 3.0)])
def test_realized_norm_against_monte_carlo(fixed_power, gaussian_power):
    """A LayerNorm's backward power over the theory's (1 − 2/d)/Q is E[1/q̂]·Q: for an input of a
    part of fixed norm (a norm's output) plus a Gaussian part, as _Ctx._jensen derives."""
    d, n, T = 64, 200_000, 2
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(n, d, dtype=torch.float64, generator=gen) * math.sqrt(gaussian_power)
    if fixed_power:
        z = torch.randn(n, d, dtype=torch.float64, generator=gen)
        y = y + torch.nn.functional.layer_norm(z, (d,)) * math.sqrt(fixed_power)
    Q = fixed_power + gaussian_power
    measured = _layernorm_backward_power(y, seed=1) * Q / (1 - 2 / d)
    ctx = P._Ctx(P.Setting(width=d, seq_len=T, realized_norm=True), fixed_power * np.eye(T),
                 (np.full(T, fixed_power),) if fixed_power else ())
    v = P._Value(ctx, {0: np.ones(T)}, 0)
    v = v + ctx._emit("attn", v, gaussian_power * np.eye(T), lambda G: G) if fixed_power else \
        P._Value(ctx, {0: np.ones(T)}, 0)
    if not fixed_power:  # the input itself is the Gaussian part
        ctx.sources[0] = gaussian_power * np.eye(T)
    predicted = ctx._jensen(v, np.diag(ctx.cov(v)))[0]
    assert measured == pytest.approx(predicted, abs=0.003)  # MC SE ≈ 0.0004; O(1/d²) ≈ 0.002
    assert measured - 1 > 0.02  # the term itself is resolved: 1.5/d … 3/d


@pytest.mark.parametrize("attn_power, ffn_power", [(1.0, 1.0), (0.5, 2.0)])
def test_realized_norm_of_correlated_fixed_parts_against_monte_carlo(attn_power, ffn_power):
    """B2T's output norm reads h + F(h) + x with h = N(x + A(x)): two fixed-power parts whose
    directions are correlated. _fixed_cross derives their realized inner product; counting them as
    independent directions overstates Var q̂ (×2.1 here), and with it E[1/q̂]."""
    d, n, T = 64, 200_000, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.layer_norm(torch.randn(n, d, dtype=torch.float64, generator=gen), (d,))
    a = torch.randn(n, d, dtype=torch.float64, generator=gen) * math.sqrt(attn_power)
    h = torch.nn.functional.layer_norm(x + a, (d,))
    y = h + torch.randn(n, d, dtype=torch.float64, generator=gen) * math.sqrt(ffn_power) + x
    measured = _layernorm_backward_power(y, seed=1) / (1 - 2 / d)
    ctx = P._Ctx(P.Setting(width=d, seq_len=T, realized_norm="all"), np.eye(T), (np.ones(T),))
    x_v = P._Value(ctx, {0: np.ones(T)}, 0)
    h_v = ctx.norm(x_v + ctx._emit("attn", x_v, attn_power * np.eye(T), lambda G: G))
    y_v = h_v + ctx._emit("ffn", h_v, ffn_power * np.eye(T), lambda G: G) + x_v
    Q = np.diag(ctx.cov(y_v))
    predicted = ctx._jensen(y_v, Q)[0] / Q[0]
    # the same parts counted as independent directions: Var q̂ = 2(Q² − U_h² − U_x²)/d, and the
    # centering of W = Q − U_h − U_x, their mean inner product included
    W = Q[0] - 2
    independent = (1 + 2 * (Q[0] ** 2 - 2) / d / Q[0] ** 2) / (Q[0] - W / d)
    excess = {k: v * Q[0] - 1 for k, v in
              (("measured", measured), ("predicted", predicted), ("independent", independent))}
    assert excess["measured"] == pytest.approx(excess["predicted"], abs=0.003)  # as above: O(1/d²)
    assert excess["independent"] - excess["measured"] > 0.01


def test_realized_norm_is_off_by_default_and_raises_the_gradient_ratio(monkeypatch):
    kw = dict(depth=8, seq_len=16, width=64, heads=2, rho0=0.2, rho_g=0.1)
    for scheme in ("pre", "peri", "post", "deepnorm"):
        plain = P.predict_positional(scheme, **kw)
        raised = P.predict_positional(scheme, realized_norm=True, **kw)
        assert np.allclose(plain["q"], raised["q"])  # the forward is unchanged
        if scheme in ("pre", "peri"):  # branch norms: raised
            assert raised["g"][0] > plain["g"][0] * 1.01
        else:  # every path passes the norms (the trunk): kept
            assert raised["g"][0] == pytest.approx(plain["g"][0], rel=1e-12)
    # "all": the trunk's norms too
    trunk = P.predict_positional("post", realized_norm="all", **kw)
    assert trunk["g"][0] > P.predict_positional("post", **kw)["g"][0] * 1.01
    with pytest.raises(ValueError, match="realized_norm must be one of"):
        P.predict_positional("post", realized_norm="trunk", **kw)
    # the checkpointed backward (recomputing blocks from every 3rd) carries their fixed parts alike
    full = P.predict_positional("mixln", realized_norm=True, **dict(kw, depth=9))
    monkeypatch.setattr(P, "HELD_ENTRIES", 1)
    checkpointed = P.predict_positional("mixln", realized_norm=True, **dict(kw, depth=9))
    assert np.allclose(full["g"], checkpointed["g"], rtol=1e-12)


def test_head_gradient_tilt_toward_the_stream_against_monte_carlo():
    """components.head_gradient_share: the LM head's gradient Wᵀ(p − e_y) has (1 + s²)/d of its
    power along its input x (s² = σ²q the logits' variance), against 1/d for a random direction."""
    from theory.components import head_gradient_share
    rng = np.random.default_rng(0)
    d, vocab, n, sigma, q = 64, 256, 4000, 1.0, 1.0
    along, power = [], []
    for _ in range(n // 100):  # 100 heads at a time: 13 MB
        W = rng.normal(0, sigma / math.sqrt(d), (100, vocab, d))
        x = rng.normal(0, 1, (100, d))
        x *= math.sqrt(q * d) / np.linalg.norm(x, axis=1, keepdims=True)
        z = np.einsum("nvd,nd->nv", W, x)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(100), rng.integers(0, vocab, 100)] -= 1
        g = np.einsum("nvd,nv->nd", W, p)
        along.append(np.einsum("nd,nd->n", g, x / np.linalg.norm(x, axis=1, keepdims=True)) ** 2)
        power.append((g ** 2).sum(1))
    along, power = np.concatenate(along), np.concatenate(power)
    share = along.mean() / power.mean()
    se = along.std() / math.sqrt(n) / power.mean()
    predicted = 1 - head_gradient_share(q, sigma, d) * (1 - 1 / d)  # the tilt plus the random 1/d
    assert abs(share - predicted) < 3 * se, (share, predicted, se)
    assert share - 1 / d > 10 * se  # the tilt is resolved: twice a random direction's share


@pytest.mark.parametrize("scheme_name", ["deepnorm", "span"])
def test_top_block_takes_the_head_gradient_unprojected(scheme_name):
    """A stack without a final norm: the top block's output norm removes k/d of the LM head's
    gradient and its tilt toward the stream (positional.reads_head). Measured over 16 seeds on
    real text, the top block's factor g_{L-1}/g_L matches; the theory without the boundary
    (the head's gradient taken as projected) is off by (1 − 2/d)/(1 + 1/d), resolved."""
    from analysis.init.spread import probed_at_init, study_sequence, text_covariances
    from probes import point_name
    L, d, T = 4, 64, 32
    x, y = study_sequence(load_corpus(None), T)
    cfg = ModelConfig(scheme=scheme_name, depth=L, width=d, heads=1, max_seq_len=T)
    cov0, grad_top = text_covariances(x, y, cfg.embed_std)
    predicted = math.log10(P.predict_positional(scheme_name, depth=L, seq_len=T, width=d, heads=1,
                                                cov0=cov0, grad_top=grad_top)["g"][L - 1])
    measured = np.array([math.log10(probed_at_init(cfg, seed, x, y)[(point_name(L - 2), "grad_rel")])
                         for seed in range(16)])
    se = measured.std(ddof=1) / 4
    boundary = math.log10((1 - 2 / d) / (1 + 1 / d))
    assert abs(measured.mean() - predicted) < 2.5 * se, (measured.mean(), predicted, se)
    assert abs(measured.mean() - (predicted - boundary)) > 4 * se
