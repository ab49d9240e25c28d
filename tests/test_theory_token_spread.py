"""The spread theory's per-token channel (theory/token_spread.py): its injections against Monte
Carlo and against the token-mean noises already checked, and its composition across blocks
against simulation of the same linear system."""

import math

import numpy as np
import pytest

from theory.spread import (NOISES, ffn_unit_noise, pattern_noise, pattern_token_cov,
                           pattern_token_cov_backward, predict_spread, sampling_var, unit_token_cov,
                           unit_token_cov_backward)
from theory.token_spread import TokenForm, chain, injection, projection_cov, shares


def _cov(T: int, rho: float, rng) -> np.ndarray:
    X = math.sqrt(rho) * rng.standard_normal(512) + math.sqrt(1 - rho) * rng.standard_normal((T, 512))
    X *= rng.uniform(0.5, 1.5, size=(T, 1))  # unequal token powers
    return X @ X.T / 512


@pytest.mark.parametrize("n", [64, 512])
def test_per_token_projection_noise_matches_monte_carlo(n):
    """A Gaussian map to n coordinates: each token's realized power fluctuates with relative
    covariance 2ρ∘ρ/n across tokens."""
    rng = np.random.default_rng(n)
    T = 6
    K = _cov(T, 0.5, rng)
    rows = rng.standard_normal((4000, n, T)) @ np.linalg.cholesky(K).T
    power = (rows ** 2).mean(axis=1)
    measured = np.cov(power / power.mean(axis=0), rowvar=False)
    predicted = projection_cov(K, n)
    # every entry, to the estimate's own error (≈ 2.2 % of the diagonal at 4000 draws)
    assert np.abs(measured - predicted).max() < 0.1 * predicted.max()


def test_per_token_covariances_contract_to_the_token_mean_noises():
    """Weighted by the tokens' power shares, each per-token covariance is the token mean's
    relative variance that test_theory_spread checks against Monte Carlo."""
    rng = np.random.default_rng(0)
    T = 8
    S, G = _cov(T, 0.4, rng), _cov(T, 0.2, rng)
    w = shares(S)
    assert w @ projection_cov(S, 128) @ w == pytest.approx(sampling_var(S, 128), rel=1e-9)
    var_f, var_b, _ = ffn_unit_noise("gelu", S, G, 512)
    assert np.ones(T) / T @ unit_token_cov("gelu", S, 512) @ np.ones(T) / T == pytest.approx(
        var_f, rel=0.05)  # equal pre-activation powers inside the table: shares 1/T
    wg = np.diag(G) / np.diag(G).sum()
    assert wg @ unit_token_cov_backward("gelu", S, G, 512) @ wg == pytest.approx(var_b, rel=0.05)
    pf, pb, _ = pattern_noise(S, G, heads=2, head_dim=16)
    Pbar = pattern_token_cov(S, heads=2, head_dim=16)
    assert np.isfinite(Pbar).all() and np.trace(Pbar) > 0
    assert np.trace(pattern_token_cov_backward(S, G, heads=2, head_dim=16)) > 0
    assert pf > 0 and pb > 0


def test_injection_is_uncorrelated_with_the_token_mean():
    """What the per-token channel carries is independent of what the token-mean theory carries:
    its power-share-weighted mean is exactly zero."""
    rng = np.random.default_rng(1)
    K = _cov(10, 0.3, rng)
    R = injection(projection_cov(K, 64), K)
    assert np.abs(shares(K) @ R).max() < 1e-12
    assert np.sum(R * R) > 0


def test_chain_composes_the_linear_system_exactly():
    """chain's variances against simulating ε_m = M_in·ε_{m−1} + Σ M_j ξ_j and γ_{m−1} =
    G_gin·γ_m + G_in·ε_{m−1} + Σ G_j ξ_j with random matrices (T = 3, L = 3)."""
    rng = np.random.default_rng(2)
    T, L, n = 3, 3, 200_000
    blocks = []
    for _ in range(L):
        M = TokenForm({"in": rng.normal(size=(T, T)) * 0.7, "a": rng.normal(size=(T, 2)) * 0.3})
        G = TokenForm({"gin": rng.normal(size=(T, T)) * 0.6, "in": rng.normal(size=(T, T)) * 0.4,
                       "a": rng.normal(size=(T, 2)) * 0.5, "b": rng.normal(size=(T, 1))})
        blocks.append({"M": M, "q": M.contract(np.ones(T) / T), "G": G,
                       "w_in": rng.dirichlet(np.ones(T)), "w_out": rng.dirichlet(np.ones(T))})
    for m in range(L - 1):
        blocks[m]["w_out"] = blocks[m + 1]["w_in"]  # one share vector per level
    embed = rng.normal(size=(T, 2)) * 0.5
    got = chain(blocks, embed)
    # simulate
    eps = [rng.normal(size=(n, 2)) @ embed.T]
    xi = [{k: rng.normal(size=(n, 2 if k == "a" else 1)) for k in ("a", "b")} for _ in range(L)]
    for m, b in enumerate(blocks):
        eps.append(eps[-1] @ b["M"]["in"].T + xi[m]["a"] @ b["M"]["a"].T)
    gam = [None] * (L + 1)
    gam[L] = np.zeros((n, T))
    for m in range(L, 0, -1):
        b = blocks[m - 1]
        gam[m - 1] = (gam[m] @ b["G"]["gin"].T + eps[m - 1] @ b["G"]["in"].T
                      + xi[m - 1]["a"] @ b["G"]["a"].T + xi[m - 1]["b"] @ b["G"]["b"].T)
    w = [b["w_in"] for b in blocks] + [blocks[-1]["w_out"]]
    for l in range(L):
        assert got["var_ln_g"][l] == pytest.approx(np.var(gam[l] @ w[l]), rel=0.02)
    for l in range(1, L + 1):
        assert got["var_ln_block"][l] == pytest.approx(np.var(gam[l - 1] @ w[l - 1] - gam[l] @ w[l]),
                                                       rel=0.02)
        assert got["var_ln_q"][l] == pytest.approx(
            np.var(eps[l - 1] @ blocks[l - 1]["q"]["in"][0] + xi[l - 1]["a"] @ blocks[l - 1]["q"]["a"][0]),
            rel=0.02)


def test_token_channel_adds_variance_only_where_tokens_differ():
    """One token: nothing differs between tokens and the channel adds nothing. Many tokens in a
    PreNorm stack: it adds variance, most of it as covariance between blocks."""
    kw = dict(depth=4, width=64, heads=1, rho0=0.2)
    without = tuple(k for k in NOISES if k != "tokens")
    one = predict_spread("pre", seq_len=1, **kw)
    assert one["var_ln_g"][0] == pytest.approx(predict_spread("pre", seq_len=1, noises=without,
                                                              **kw)["var_ln_g"][0], rel=1e-9)
    many, base = predict_spread("pre", seq_len=16, **kw), predict_spread("pre", seq_len=16,
                                                                         noises=without, **kw)
    assert many["var_ln_g"][0] > 1.05 * base["var_ln_g"][0]
    gain_total = many["var_ln_g"][0] - base["var_ln_g"][0]
    gain_blocks = np.nansum(many["var_ln_block"]) - np.nansum(base["var_ln_block"])
    assert gain_total > gain_blocks
