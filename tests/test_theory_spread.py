"""The spread theory's noises against Monte Carlo at widths 64 … 1024 (theory/spread.py)."""

import math

import numpy as np
import pytest
import torch

from theory.spread import (Form, cross_sd, ffn_unit_noise, median_from_mean, predict_spread,
                           sampling_var)

DRAWS = 2000


def _gram(T: int, rho: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Token vectors (T × 512) with cosine ≈ rho, and their Gram / 512."""
    base = rng.standard_normal(512)
    X = math.sqrt(rho) * base + math.sqrt(1 - rho) * rng.standard_normal((T, 512))
    return X, X @ X.T / 512


def _rel_var(samples: np.ndarray) -> float:
    return float(np.var(samples) / np.mean(samples) ** 2)


@pytest.mark.parametrize("n", [64, 256, 1024])
@pytest.mark.parametrize("rho", [0.0, 0.8])
def test_sampling_variance_of_a_linear_map_matches_monte_carlo(n, rho):
    rng = np.random.default_rng(n)
    _X, K = _gram(16, rho, rng)
    # a row w of the map sees the tokens as w·x_t, Gaussian with covariance K: draw those
    rows = rng.standard_normal((DRAWS, n, 16)) @ np.linalg.cholesky(K + 1e-12 * np.eye(16)).T
    measured = _rel_var((rows ** 2).sum(axis=(1, 2)))
    # the estimate's own relative error is about sqrt(2/DRAWS) ≈ 2.6 %
    assert measured == pytest.approx(sampling_var(K, n), rel=0.12)


@pytest.mark.parametrize("d", [64, 256])
def test_cross_term_of_independent_sources_matches_monte_carlo(d):
    rng = np.random.default_rng(d)
    T = 8
    X = rng.standard_normal((T, d)) * 1.3
    Kx = X @ X.T / d
    H = rng.standard_normal((T, d))
    Kf = H @ H.T / d  # a fresh source f = W H with W Gaussian (variance 1/d)
    inner = []
    for _ in range(DRAWS // 4):
        F = H @ (rng.standard_normal((d, d)) / math.sqrt(d))
        inner.append(float(np.sum(X * F)) / (d * T))
    a = np.ones(T)
    assert np.std(inner) == pytest.approx(cross_sd(a, Kx, a, Kf, d), rel=0.12)


@pytest.mark.parametrize("units", [256, 1024])
def test_ffn_hidden_unit_noise_matches_monte_carlo(units):
    """Forward power Σ_u Σ_t gelu(z_ut)², backward Σ_u Σ_t gelu'(z_ut)²ξ_ut² over i.i.d. units,
    their relative variances and covariance."""
    rng = np.random.default_rng(units)
    T = 12
    _, S = _gram(T, 0.5, rng)
    _, G = _gram(T, 0.3, rng)
    var_f, var_b, cov = ffn_unit_noise("gelu", S, G, units)
    Ls, Lg = np.linalg.cholesky(S + 1e-9 * np.eye(T)), np.linalg.cholesky(G + 1e-9 * np.eye(T))
    z = torch.from_numpy(rng.standard_normal((DRAWS, units, T)) @ Ls.T).requires_grad_(True)
    xi = torch.from_numpy(rng.standard_normal((DRAWS, units, T)) @ Lg.T)
    y = torch.nn.functional.gelu(z)  # torch's own GELU and its autograd derivative
    (dy,) = torch.autograd.grad(y.sum(), z)
    fwd = (y.detach() ** 2).sum(dim=(1, 2)).numpy()
    bwd = ((dy * xi) ** 2).sum(dim=(1, 2)).numpy()
    assert _rel_var(fwd) == pytest.approx(var_f, rel=0.12)
    assert _rel_var(bwd) == pytest.approx(var_b, rel=0.12)
    measured_cov = float(np.cov(fwd, bwd)[0, 1] / (fwd.mean() * bwd.mean()))
    assert measured_cov == pytest.approx(cov, rel=0.25)


def test_forms_add_variances_of_independent_noises_and_share_common_ones():
    a, b = Form({1: 0.3}), Form({1: 0.4, 2: 1.0})
    assert a.plus(b).var() == pytest.approx(0.7 ** 2 + 1.0)
    assert a.plus(b, -0.75).var() == pytest.approx(0.75 ** 2)  # the shared noise cancels
    assert median_from_mean(2.0, 0.5) == pytest.approx(2.0 * math.exp(-0.25))


def test_spread_grows_with_depth_over_width_and_norms_cap_the_forward():
    """Var(ln g0/gL) ∝ L/d for PostNorm (Hanin & Nica's scaling); a normalized stream's
    aggregate keeps an O(1/d) spread that does not accumulate."""
    v = {(L, d): predict_spread("post", depth=L, width=d, heads=d // 64, seq_len=16, rho0=0.2)
         for L in (4, 16) for d in (64, 256)}
    g = {k: o["var_ln_g"][0] for k, o in v.items()}
    assert g[(16, 64)] / g[(16, 256)] == pytest.approx(4.0, rel=0.1)
    assert g[(16, 64)] > 2.5 * g[(4, 64)]
    assert v[(16, 64)]["var_ln_q"][16] < 2 * v[(4, 64)]["var_ln_q"][4]


def test_spread_mean_profile_is_the_position_resolved_theory():
    from theory.positional import predict_positional
    kw = dict(depth=6, width=128, seq_len=16, rho0=0.1, rho_g=0.05)
    for scheme in ("pre", "b2t", "lns"):
        s, p = predict_spread(scheme, **kw), predict_positional(scheme, **kw)
        q = p["q_agg"] if np.isfinite(p["q_agg"][1]) else p["q"]  # before an output norm
        assert np.allclose(s["g"], p["g"]) and np.allclose(s["q"][1:], q[1:])


def test_spread_refuses_what_it_does_not_cover():
    with pytest.raises(ValueError, match="MoE"):
        predict_spread("pre", depth=2, width=64, seq_len=8, experts=4)
    with pytest.raises(ValueError, match="gelu and relu"):
        predict_spread("pre", depth=2, width=64, seq_len=8, ffn="swiglu")


def test_spread_command_measures_seeds_on_one_sequence_and_compares(tmp_path, capsys):
    """`spread` at a tiny size: spread.csv with the issue's columns, a row per scheme, width,
    depth and statistic, positive spreads, the figures; a second call resumes (nothing measured
    again) and other settings in the same folder are refused in one line."""
    import pandas as pd

    from analysis.cli import main
    argv = ["spread", "--schemes", "post,pre", "--depths", "2,4", "--widths", "32", "--seeds",
            "0,1,2", "--seq-len", "16", "--quiet", "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    table = pd.read_csv(tmp_path / "s" / "spread.csv")
    for col in ("scheme", "depth", "width", "seeds", "statistic", "predicted_sd", "measured_sd",
                "measured_sd_se"):
        assert col in table.columns
    assert len(table) == 2 * 2 * 2 and set(table["seeds"]) == {3}
    assert (table["predicted_sd"] > 0).all() and (table["measured_sd"] > 0).all()
    assert (tmp_path / "s" / "figures" / "spread_g.png").is_file()
    per_seed = (tmp_path / "s" / "per_seed.csv").read_text()
    capsys.readouterr()
    assert main(argv) == 0 and (tmp_path / "s" / "per_seed.csv").read_text() == per_seed
    assert "seeds measured" not in capsys.readouterr().out
    assert main([*argv[:-1], str(tmp_path / "s"), "--depths", "2"]) == 2
    assert "error:" in capsys.readouterr().err


def test_spread_command_refuses_too_few_seeds(tmp_path, capsys):
    from analysis.cli import main
    assert main(["spread", "--seeds", "0,1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "≥ 3 seeds" in err and "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("rho", [0.0, 0.6])
def test_pattern_noise_matches_heads_of_real_weights(rho):
    """The heads' pattern noise against heads built from Gaussian W_q, W_k acting on fixed
    tokens, softmax(q·k/√d_h) causal, as the testbed's attention computes it."""
    from theory.spread import pattern_noise
    rng = np.random.default_rng(3)
    T, d, dh = 16, 256, 64
    X, _ = _gram(T, rho, rng)
    X = X[:, :d] * math.sqrt(512 / d) / math.sqrt(2)
    S = X @ X.T / d
    fwd = []
    for _ in range(1500):
        q = X @ rng.standard_normal((d, dh)) / math.sqrt(d)
        k = X @ rng.standard_normal((d, dh)) / math.sqrt(d)
        z = np.where(np.tril(np.ones((T, T), bool)), q @ k.T / math.sqrt(dh), -np.inf)
        Pm = np.exp(z - z.max(1, keepdims=True))
        Pm /= Pm.sum(1, keepdims=True)
        fwd.append(float(np.sum((Pm @ S) * Pm)))
    var_f, _, _ = pattern_noise(S, None, heads=1, head_dim=dh)
    assert var_f == pytest.approx(_rel_var(np.array(fwd)), rel=0.3)


def test_committed_spread_table_is_this_codes_prediction():
    """results/init-spread/spread.csv's predicted spread is what predict_spread gives now for the
    study's sequence (PostNorm, width 64, L = 16)."""
    from pathlib import Path

    import pandas as pd

    from analysis.init.spread import SEQUENCE_SEED, heads_of, text_covariances
    from analysis.testbed.corpus import load_corpus
    root = Path(__file__).resolve().parents[1]
    table = pd.read_csv(root / "results" / "init-spread" / "spread.csv")
    row = table[(table.scheme == "post") & (table.width == 64) & (table.depth == 16)
                & (table.statistic == "log10_g0_over_gL")].iloc[0]
    x, y = load_corpus(None).batch("train", 1, 64, generator=torch.Generator().manual_seed(SEQUENCE_SEED))
    cov0, grad_top = text_covariances(x[0], y[0], 1.0)
    pred = predict_spread("post", depth=16, width=64, heads=heads_of(64), seq_len=64, cov0=cov0,
                          grad_top=grad_top)
    assert math.sqrt(pred["var_ln_g"][0]) / math.log(10) == pytest.approx(row.predicted_sd, rel=1e-6)
    assert math.log10(pred["g"][0]) == pytest.approx(row.mean_field, rel=1e-9)


def test_predicted_quantiles_bracket_the_seeds_they_describe():
    from analysis.init.spread import quantiles
    values = np.random.default_rng(0).normal(2.0, 0.3, 4000)
    right = quantiles(values, 2.0, 0.3)
    assert right["predicted_p10"] == pytest.approx(2.0 - 1.2816 * 0.3, abs=1e-4)
    assert right["inside_predicted_band"] == pytest.approx(0.8, abs=0.02)
    assert right["measured_p90"] == pytest.approx(right["predicted_p90"], abs=0.03)
    assert quantiles(values, 2.0, 0.15)["inside_predicted_band"] < 0.6  # an sd predicted too small


def test_block_variances_add_up_where_no_noise_is_shared_between_blocks():
    # PostNorm's output norm resets the stream's realized power every block, so without the
    # embedding's noise no fluctuation is shared: the blocks' own variances sum to the total
    kw = dict(depth=8, seq_len=16, width=64, heads=1)
    post = predict_spread("post", noises=("projections", "units", "cross"), **kw)
    assert np.sum(post["var_ln_block"][1:]) == pytest.approx(post["var_ln_g"][0], rel=1e-9)
    # PreNorm's stream carries each block's realized power into every later block: covariance
    pre = predict_spread("pre", noises=("projections", "units", "cross"), **kw)
    assert abs(np.sum(pre["var_ln_block"][1:]) / pre["var_ln_g"][0] - 1) > 0.01
