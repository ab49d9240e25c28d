"""Bidirectional and uniform attention: the setting, the testbed module, the component maps against
Monte Carlo of the torch module at init, and a measured bidirectional PostNorm stack end to end."""

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import sympy
import torch

from analysis.bench.components import numeric
from analysis.testbed.model import Attention, ModelConfig
from theory import components as C
from theory import positional as P
from theory.shape import ATTENTION_KINDS
from theory.solve import TheoryConfig, predict_profile

_S = sympy.symbols("q c G Gc")


# --- the setting -----------------------------------------------------------------------------

def test_attention_kind_is_validated_everywhere():
    msg = "unknown attention kind 'x' \\(known: causal, bidirectional, uniform\\)"
    for make in (lambda: ModelConfig(attention="x"),
                 lambda: TheoryConfig(attention="x").validate(),
                 lambda: predict_profile("post", depth=2, attention="x"),
                 lambda: P.predict_positional("post", depth=2, seq_len=4, attention="x")):
        with pytest.raises(ValueError, match=msg):
            make()
    assert ATTENTION_KINDS == ("causal", "bidirectional", "uniform")


def test_configs_saved_without_the_field_are_causal(tmp_path):
    """An old ModelConfig dict loads as causal; a run or analysis folder saved before the field
    existed is the same run as a causal one and another run than a bidirectional one."""
    from analysis.init.pipeline import AnalysisConfig, check_same_settings
    from analysis.training.train import TrainConfig, check_same_run

    old = {k: v for k, v in ModelConfig().to_dict().items() if k != "attention"}
    assert ModelConfig(**old).attention == "causal"
    run = tmp_path / "run"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps(
        {"model": old, "train": TrainConfig().identity(), "corpus": "c"}))
    for kind, same in (("causal", True), ("bidirectional", False)):
        new = {"model": ModelConfig(attention=kind).to_dict(), "train": TrainConfig().identity(),
               "corpus": "c"}
        if same:
            check_same_run(run, json.loads(json.dumps(new)))
        else:
            with pytest.raises(ValueError, match="attention"):
                check_same_run(run, json.loads(json.dumps(new)))
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(
        {k: v for k, v in asdict(AnalysisConfig()).items() if k != "attention"}))
    check_same_settings(AnalysisConfig(), out)
    with pytest.raises(ValueError, match="attention"):
        check_same_settings(AnalysisConfig(attention="uniform"), out)


# --- the testbed module ------------------------------------------------------------------------

def test_testbed_attention_kinds():
    """causal: token 0 ignores later tokens; bidirectional: it sees them (a plain softmax over all
    keys); uniform: every token is W_o W_v of the mean token, with no q, k weights to train."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1] += 1.0
    mods = {k: Attention(ModelConfig(width=32, heads=4, attention=k)).double() for k in ATTENTION_KINDS}
    with torch.no_grad():
        y = {k: (m(x), m(x2)) for k, m in mods.items()}
        assert torch.allclose(y["causal"][0][:, 0], y["causal"][1][:, 0])
        assert not torch.allclose(y["bidirectional"][0][:, 0], y["bidirectional"][1][:, 0])
        b = mods["bidirectional"]
        q, k, v = (m(x).view(2, 6, 4, 8).transpose(1, 2) for m in (b.q, b.k, b.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
        assert torch.allclose(y["bidirectional"][0], b.o(att.transpose(1, 2).reshape(2, 6, 32)))
        u = mods["uniform"]
        assert torch.allclose(y["uniform"][0], u.o(u.v(x.mean(1, keepdim=True))).expand(2, 6, 32))
    assert {n for n, _ in u.named_parameters()} == {"v.weight", "o.weight"}


# --- component maps against Monte Carlo of the torch module at init -------------------------------

def _tokens(n: int, T: int, D: int, q: float, rho: float, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, 1, D, generator=gen, dtype=torch.float64)
    z = torch.randn(n, T, D, generator=gen, dtype=torch.float64)
    return (math.sqrt(rho) * m + math.sqrt(1 - rho) * z) * math.sqrt(q)


def _cross(y: torch.Tensor) -> float:
    """Mean off-diagonal token covariance per coordinate (the maps' c and gc)."""
    T = y.shape[1]
    gram = y @ y.transpose(1, 2) / y.shape[-1]
    return ((gram.sum((1, 2)) - torch.diagonal(gram, dim1=1, dim2=2).sum(-1))
            / (T * (T - 1))).mean().item()


def _monte_carlo(kind: str, T: int, q: float, rho: float, rg: float, seed: int,
                 D: int = 512, draws: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over fresh float64 layers of (q_out, c_out, G_in, gc_in) for
    tokens of second moment q and correlation ρ and a unit output gradient of correlation rg."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)
    cfg = ModelConfig(width=D, heads=4, sigma=1.0, attention=kind)
    rows = []
    for _ in range(draws):
        layer = Attention(cfg).double()
        x = _tokens(8, T, D, q, rho, gen).requires_grad_()
        y = layer(x)
        (y * _tokens(8, T, D, 1.0, rg, gen)).sum().backward()
        rows.append(((y ** 2).mean().item(), _cross(y.detach()), (x.grad ** 2).mean().item(),
                     _cross(x.grad)))
    r = np.array(rows)
    return r.mean(0), r.std(0, ddof=1) / math.sqrt(draws)


def _theory(kind: str, T: int, q: float, rho: float, rg: float) -> np.ndarray:
    maps = C.attention_maps(*_S, sigma=1, kind=kind, T=T)
    vals = dict(zip(_S, (q, q * rho, 1, rg)))
    return np.array([numeric(sympy.sympify(m).xreplace(vals), T) for m in maps])


def _positional(kind: str, T: int, q: float, rho: float, rg: float) -> np.ndarray:
    S = q * ((1 - rho) * np.eye(T) + rho * np.ones((T, T)))
    K, backward = P.ATTENTION[kind](S, sigma=1.0)
    G = backward((1 - rg) * np.eye(T) + rg * np.ones((T, T)))

    def off(M):
        return (M.sum() - np.trace(M)) / (T * (T - 1))
    return np.array([np.trace(K) / T, off(K), np.trace(G) / T, off(G)])


@pytest.mark.parametrize("q,rho,rg", [(1.0, 0.0, 0.0), (2.0, 0.2, 0.2)])
def test_uniform_maps_against_torch(q, rho, rg):
    """Exact maps: every statistic within 3.5 Monte Carlo standard errors (reached: |z| ≤ 2), in
    both interpretations (which agree exactly on exchangeable tokens)."""
    T = 16
    m, se = _monte_carlo("uniform", T, q, rho, rg, seed=3, draws=4)
    th = _theory("uniform", T, q, rho, rg)
    np.testing.assert_allclose(_positional("uniform", T, q, rho, rg), th, rtol=1e-12)
    assert np.all(np.abs(m - th) < 3.5 * se), (m, se, th)
    assert th[0] == pytest.approx((q + (T - 1) * q * rho) / T) and th[1] == th[0]  # ρ_out = 1


@pytest.mark.parametrize("q,rho,rg", [(1.0, 0.0, 0.0), (1.0, 0.5, 0.4), (2.0, 0.2, 0.2)])
def test_bidirectional_maps_against_torch(q, rho, rg):
    """Width 512, 4 heads, T = 16, 6 draws of 8 sequences. Tolerances reached (MC spread ≈ 1–2%):
    q_out ≤ 2.6% (the theory low by ~v/(d·C_T), a finite-width term: a key's value and logit share
    its input x_s), c_out ≤ 3%, G_in ≤ 5% (4.8% at logit variance v = 3.2), gc_in ≤ 3.1% where
    ρ > 0. At ρ = 0, gc_in is 11% high: the key gradients of one query sum to zero over its keys,
    anti-correlating the key part across tokens by -1/(T - 1) of its power, which the maps omit
    (causal ones too); checked here as that known gap."""
    T = 16
    m, se = _monte_carlo("bidirectional", T, q, rho, rg, seed=3)
    th = _theory("bidirectional", T, q, rho, rg)
    np.testing.assert_allclose(_positional("bidirectional", T, q, rho, rg), th, rtol=1e-10)
    rel = np.abs(m - th) / np.abs(th)
    assert rel[0] < 0.035 and rel[1] < 0.04 and rel[2] < 0.06, (m, se, th)
    if rho > 0:
        assert rel[3] < 0.04, (m, se, th)
    else:  # the omitted key-path anticorrelation accounts for the gap
        v = q * (q - q * rho)
        key = q * (q - q * rho) * C.attention_numeric(T)["Xfull"](v)
        assert m[3] < th[3] - 10 * se[3]
        assert abs(m[3] - (th[3] - key / (T - 1))) < 3 * se[3] + 0.01 * th[3]


def test_uniform_and_bidirectional_stacks_equal_in_both_interpretations():
    """Tokens stay exchangeable through non-causal blocks: the sequence-averaged recurrence and the
    position-resolved one agree to rounding for every output."""
    for kind in ("uniform", "bidirectional"):
        for name in ("post", "pre", "span"):
            kw = dict(depth=12, width=256, seq_len=16, q0=1.3, rho0=0.2, rho_g=0.3,
                      attention=kind)
            a, b = P.predict_positional(name, **kw), predict_profile(name, **kw)
            for key in ("q", "rho", "g", "rg", "cos"):
                np.testing.assert_allclose(a[key][1:], b[key][1:], rtol=1e-9, err_msg=f"{kind} {name} {key}")


# --- end to end: a measured bidirectional PostNorm stack -------------------------------------------

def test_bidirectional_post_profile_against_measured_sweep():
    """predict_profile('post', depth=8, attention='bidirectional') against the init sweep of the
    testbed (width 128, 4 heads, T = 32, 4 seeds × 2 batches of 4 corpus sequences).

    Reached: token cosine within 0.02 of the measurement at every layer; g_0/g_L 1.50 against
    1.06 ± 0.28 (standard error over seeds) — within 3 standard errors, and nearer than the causal
    prediction for the same inputs (2.03). The theory's gradient sits ~1.3× above the measured
    one at every layer and its gradient token cosine 0.01–0.06 above (plausibly the omitted key
    anticorrelation, see test_bidirectional_maps_against_torch): reported, within the spread.
    """
    from analysis.init.sweep import init_sweep
    from analysis.testbed.corpus import load_corpus

    L, seeds = 8, [0, 1, 2, 3]
    base = ModelConfig(width=128, heads=4, max_seq_len=32, attention="bidirectional")
    df = init_sweep(["post"], [L], seeds, base, load_corpus(), batches=2, batch_size=4,
                    log=lambda s: None)
    df = df[df.point.str.endswith("resid_post") | (df.point == "embed")]
    agg = df.groupby(["point", "metric"]).agg(m=("measured", "mean"), sd=("measured", "std"),
                                              avg=("theory_averaged", "mean"))
    agg["se"] = agg["sd"] / math.sqrt(len(seeds))
    embed = agg.loc["embed"]
    top = agg.loc[f"blocks.{L - 1}.resid_post"]
    kw = dict(depth=L, width=128, heads=4, seq_len=32, q0=embed.loc["second_moment", "m"],
              rho0=embed.loc["token_cosine", "m"], rho_g=top.loc["grad_token_cosine", "m"])
    bi = predict_profile("post", attention="bidirectional", **kw)
    causal = predict_profile("post", **kw)
    for l in range(1, L + 1):
        row = agg.loc[f"blocks.{l - 1}.resid_post"]
        assert abs(bi["rho"][l] - row.loc["token_cosine", "m"]) < 0.03, l
        assert abs(bi["q"][l] - row.loc["second_moment", "m"]) < 1e-3, l
    g0, se0 = embed.loc["grad_rel", "m"], embed.loc["grad_rel", "se"]
    assert abs(bi["g"][0] - g0) < 3 * se0
    assert abs(bi["g"][0] - g0) < abs(causal["g"][0] - g0)
    assert abs(bi["rg"][0] - embed.loc["grad_token_cosine", "m"]) < 0.05
