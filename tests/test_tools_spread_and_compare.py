"""The analysis scripts under tools/: their arithmetic on inputs with known answers."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_covariance_share_is_zero_for_independent_blocks_and_one_minus_1_over_L_for_one_shared():
    share = tool("spread_by_layer").covariance_share
    rng = np.random.default_rng(0)
    assert abs(share(rng.standard_normal((20_000, 8)))) < 0.03
    common = rng.standard_normal((20_000, 1)) * np.ones((1, 8))  # every block the same factor
    assert share(common) == pytest.approx(1 - 1 / 8)


def test_median_offsets_place_each_block_factors_offset_and_add_up():
    offsets = tool("spread_by_layer").median_offsets
    rng = np.random.default_rng(2)
    seeds, L = 400, 5
    mean_field = np.array([0.5, 0.4, 0.3, 0.2, 0.1, 0.0])  # log10 g_l, l = 0..L; factors 0.1 each
    shift = np.array([0.03, 0.0, 0.0, 0.0, -0.02])  # first block +0.03, top block −0.02
    factors = 0.1 + shift + 0.01 * rng.standard_normal((seeds, L))
    g = np.hstack([np.cumsum(factors[:, ::-1], axis=1)[:, ::-1], np.zeros((seeds, 1))])
    frame = pd.DataFrame([dict(seed=s, layer=l, log10_g=g[s, l]) for s in range(seeds)
                          for l in range(L + 1)])
    r = offsets(frame, 10 ** mean_field)
    for part, expected in (("first", 0.03), ("top", -0.02), ("between", 0.0), ("total", 0.01)):
        assert abs(r[f"median_offset_{part}"] - expected) < 4 * r[f"median_offset_{part}_se"], part
    assert r["median_offset_top_se"] == pytest.approx(np.sqrt(np.pi / 2) * 0.01 / 20, rel=0.15)


def test_decompose_reads_the_per_layer_frame_as_block_factors():
    decompose = tool("spread_by_layer").decompose
    rng = np.random.default_rng(1)
    seeds, L = 200, 4
    g = np.cumsum(rng.standard_normal((seeds, L)), axis=1)[:, ::-1]  # log10 g_l, l = 0..L-1
    g = np.hstack([g, np.zeros((seeds, 1))])  # g_L = 1
    share = np.exp(g)  # a first-token share that follows the gradient exactly
    frame = pd.DataFrame([dict(seed=s, layer=l, log10_g=g[s, l], token_cosine=0.1 + 0.01 * s,
                               grad_first_token=share[s, l])
                          for s in range(seeds) for l in range(L + 1)])
    r = decompose(frame, draws=50)
    assert r["corr_total_embed_grad_first"] == pytest.approx(1.0)  # total = log10 g_0 - 0
    assert r["measured_sd"] == pytest.approx(np.std(g[:, 0], ddof=1))
    assert r["independent_sd"] == pytest.approx(2.0, rel=0.15)  # four unit-variance steps
    assert abs(r["covariance_share"]) < 0.3 and r["covariance_share_se"] > 0


def test_compare_diagnoses_gives_relative_differences_and_verdicts(tmp_path):
    compare = tool("compare_diagnoses").compare
    base = pd.DataFrame({"layer": [0, 1], "point": ["a", "b"], "second_moment": [1.0, 2.0],
                         "second_moment_se": [0.1, 0.1], "token_cosine": [0.5, 0.25]})
    for name, factor in (("cpu", 1.0), ("gpu", 1.01)):
        folder = tmp_path / name
        folder.mkdir()
        frame = base.copy()
        frame["second_moment"] *= factor
        frame.to_csv(folder / "diagnosis.csv", index=False)
        (folder / "diagnosis.json").write_text(json.dumps({"verdict": "HEALTHY", "device": name}))
    facts, table = compare(tmp_path / "cpu", tmp_path / "gpu")
    assert facts["device"] == {"reference": "cpu", "other": "gpu"}
    rows = table.set_index("statistic")
    assert rows.loc["second_moment", "max_rel_diff"] == pytest.approx(0.01)
    assert rows.loc["second_moment", "max_diff_in_se"] == pytest.approx(0.02 / np.hypot(0.1, 0.1))
    assert rows.loc["token_cosine", "max_rel_diff"] == 0


def test_by_token_correlations_tell_the_gradient_weighted_power_from_the_token_mean():
    """Block factors that follow exactly the first token's stream power, where the gradient sits:
    the gradient-weighted correlation is −1, the token mean's much weaker."""
    correlations = tool("spread_by_token").correlations
    rng = np.random.default_rng(2)
    seeds, L, T = 400, 3, 8
    Q = np.exp(0.1 * rng.standard_normal((seeds, L + 1, T)))
    G = np.ones((seeds, L + 1, T))
    G[:, :, 0] = 1e6  # all the gradient on the first token
    for l in range(L, 0, -1):  # ln g_{l-1} − ln g_l = −ln q_{l-1, first token}
        G[:, l - 1] = G[:, l] * np.exp(-np.log(Q[:, l - 1, 0]))[:, None]
    table = correlations(Q, G)
    assert (table.corr_gradient_weighted < -0.99).all()
    assert (table.corr_token_mean.abs() < 0.6).all()
    assert (table.first_token_share > 0.99).all()


def test_grad_ratio_by_inputs_measures_and_predicts_one_point():
    """One tiny point: the measured mean and its error from the seeds, and both predictions'
    ratios consistent with them."""
    from analysis.init.spread import SpreadConfig, study_sequence
    from analysis.testbed.corpus import load_corpus
    x, y = study_sequence(load_corpus(None), SpreadConfig().seq_len)
    r = tool("grad_ratio_by_inputs").point("pre", 1, 32, 3, x, y)
    assert r["seeds"] == 3 and r["measured_mean_se"] > 0
    assert r["ratio_exact"] == pytest.approx(10 ** (r["measured_mean"] - r["exact_inputs"]))
    assert r["ratio_uniform"] == pytest.approx(10 ** (r["measured_mean"] - r["uniform_inputs"]))
    assert 0.3 < r["ratio_exact"] < 3  # the mean field at one block: the right size


def test_attention_key_structure_exact_softmax_agrees_with_the_map_on_exchangeable_keys():
    """On an exchangeable input the sampled softmax and the positional map agree on the output's
    token cosine (the map's pattern moments are exact there); exchangeable() keeps the diagonal
    and the off-diagonal mean."""
    from theory import positional as P
    t = tool("attention_key_structure")
    rng = np.random.default_rng(3)
    X = rng.standard_normal((16, 64))
    X[8:] = X[:8] + 0.3 * rng.standard_normal((8, 64))  # repeated tokens: a structured input
    S = X @ X.T / 64
    S /= np.sqrt(np.outer(np.diag(S), np.diag(S)))
    Su = t.exchangeable(S)
    assert np.allclose(np.diag(Su), np.diag(S))
    assert Su[0, 1] == pytest.approx((S.sum() - np.trace(S)) / (16 * 15))
    exact = P.mean_cosine(t.exact_softmax(Su, 16, 800, 0))
    assert exact == pytest.approx(P.mean_cosine(P.attention(Su, sigma=1.0)[0]), abs=0.02)


def test_grid_exact_inputs_redraws_the_sweeps_sequences(tiny_grid, tmp_path, monkeypatch, capsys):
    module = tool("grid_exact_inputs")
    monkeypatch.setattr("sys.argv", ["grid_exact_inputs.py", "--grid", str(tiny_grid),
                                     "--out", str(tmp_path / "out")])
    module.main()  # refuses (SystemExit) sequences that are not the sweep's
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    own = pd.read_csv(tiny_grid / "errors.csv")
    # the stored uniform-summary prediction passes through unchanged: the grid's own errors
    keys = ["scheme", "metric", "site"]
    mine = errors[errors["prediction"] == "resolved"].set_index(keys)["median"]
    theirs = own[own["prediction"] == "resolved"].set_index(keys)["median"]
    assert np.allclose(mine.sort_index(), theirs.loc[mine.index].sort_index())
    exact = errors[errors["prediction"] == "exact_inputs"].set_index(keys)["median"]
    assert exact.notna().all() and not np.allclose(exact, mine.loc[exact.index])
    ratio = pd.read_csv(tmp_path / "out" / "gradient_ratio.csv")
    assert len(ratio) == 4 and (ratio["seeds"] == 3).all()
    assert set(pd.read_csv(tmp_path / "out" / "targets.csv")["prediction"]) == {"exact_inputs", "resolved"}


def test_grid_exact_inputs_refuses_other_sequences(tiny_grid):
    from analysis.init.pipeline import config_from_record
    from analysis.init.spread import text_covariances
    from analysis.init.sweep import read_profiles
    from analysis.testbed.corpus import load_corpus
    module = tool("grid_exact_inputs")
    cfg = config_from_record(tiny_grid / "config.json")
    corpus = load_corpus(None)
    profiles = read_profiles(tiny_grid / "init_profiles.csv")
    covs = {s: [text_covariances(x, y, 1.0) for x, y in module.sequences(corpus, s + 7, 1, 2, 8)]
            for s in cfg.seeds}  # every seed given another seed's text
    with pytest.raises(SystemExit):
        module.check_reconstruction(profiles, covs, width=10_000)


def test_gradient_excess_by_layer_and_the_forward_bound():
    module = tool("gradient_excess_by_layer")
    rows = []
    theory_g = [8.0, 4.0, 2.0, 1.0]  # embed, blocks.0 … blocks.2 (the top)
    for seed in range(3):
        for layer, g in zip([-1, 0, 1, 2], theory_g):
            point = "embed" if layer < 0 else f"blocks.{layer}.resid_post"
            excess = 1.1 ** (2 - layer)  # made block by block, down from the top
            rows.append(("pre", 3, seed, layer, point, "grad_rel", g * excess, 0.0, g))
            rows.append(("pre", 3, seed, layer, point, "second_moment", 0.97 * (layer + 2), 0.0,
                         layer + 2.0))
    profiles = pd.DataFrame(rows, columns=["scheme", "depth", "seed", "layer", "point", "metric",
                                           "measured", "spread", "theory"])
    layers = module.stack(profiles, "pre", 3)
    assert layers["grad_log10_excess"].to_numpy() == pytest.approx(np.log10(1.1) * np.array([3, 2, 1, 0]))
    assert layers["forward_error"].to_numpy() == pytest.approx(-0.03)
    # every block's factor raised by 3 %: 0.03 · ln(g_0/g_L), in log10
    assert module.forward_bound(layers) == pytest.approx(0.03 * np.log(8.0) / np.log(10))


def test_norm_jensen_layernorm_backward_is_d_over_d_minus_3_above_the_theory():
    module = tool("norm_jensen")
    d = 32
    measured = module.layernorm_backward_power(d, 60_000)
    assert measured == pytest.approx((d - 2) / (d - 3), rel=0.004)  # SE ≈ 0.001
    assert abs(measured - (1 - 2 / d)) > 0.05  # the theory's (1 − 2/d) misses by 3/d



def test_typical_drift_puts_the_norms_jensen_factor_against_the_lognormal_drift():
    from theory import positional as P
    module = tool("typical_drift")
    kw = dict(depth=4, seq_len=16, width=32, heads=1)
    x, y = module.study_sequence(module.load_corpus(None), 16)
    cov0, grad_top = module.text_covariances(x, y, embed_std=1.0)
    mean_field = np.log10(P.predict_positional("post", cov0=cov0, grad_top=grad_top, **kw)["g"][0])
    spread = pd.DataFrame([{"scheme": "post", "width": 32, "depth": 4, "seeds": 32,
                            "statistic": "log10_g0_over_gL", "predicted_sd": 0.2,
                            "mean_field": mean_field, "measured_median": mean_field,
                            "measured_median_se": 0.05}])
    row = module.drift_table(spread, 16).iloc[0]
    drift = (0.2 * np.log(10)) ** 2 / 2 / np.log(10)
    assert row["lognormal_median"] == pytest.approx(mean_field - drift)
    assert row["jensen_branch"] == pytest.approx(0.0, abs=1e-12)  # post's norms are on the trunk
    assert row["jensen_all"] > 0.01  # E[1/q̂] > 1/Q at each of 8 norms, width 32
    assert row["all_median"] == pytest.approx(mean_field + row["jensen_all"] - drift)
    assert row["z_mean_field"] == pytest.approx(0, abs=1e-9) and row["z_all"] == pytest.approx((drift - row["jensen_all"]) / 0.05)
    with pytest.raises(ValueError, match="not spread.csv's"):
        module.drift_table(spread.assign(mean_field=mean_field + 0.01), 16)


def test_trunk_norm_covariance_is_small_beside_the_jensen_term():
    module = tool("trunk_norm_covariance")
    jensen, cov, se = module.covariance(module.sample(32, 1.0, seeds=40, tokens=64))
    assert jensen > 0.02  # Q·E[1/q̂] − 1 at d = 32: ≈ 1.5/d
    assert abs(cov) < 0.2 * jensen and se < 0.002
    # a block without its branch: q̂ = 1 exactly, nothing to covary
    jensen0, cov0, _ = module.covariance(module.sample(32, 0.0, seeds=4, tokens=16))
    assert abs(jensen0) < 1e-9 and abs(cov0) < 1e-9


def test_targets_with_the_realized_norm_change_the_backward_only(tiny_grid, tmp_path, monkeypatch):
    """The term acts in the norms' backward: the forward errors stay the grid's own, the gradient
    errors move (width 16: E[1/q̂] is 1 + 3/13 per norm)."""
    monkeypatch.setattr("sys.argv", ["targets_realized_norm.py", "--grid", str(tiny_grid), "--rule",
                                     "all", "--jobs", "1", "--out", str(tmp_path / "out")])
    tool("targets_realized_norm").main()
    targets = pd.read_csv(tmp_path / "out" / "targets.csv")
    assert set(targets["prediction"]) == {"realized_all"}
    keys = ["scheme", "metric", "site"]
    mine = pd.read_csv(tmp_path / "out" / "errors.csv").set_index(keys)["median"]
    own = pd.read_csv(tiny_grid / "errors.csv")
    own = own[own["prediction"] == "resolved"].set_index(keys)["median"].loc[mine.index]
    forward = mine.index.get_level_values("metric") == "second_moment"
    assert np.allclose(mine[forward], own[forward])
    grad = mine.index.get_level_values("metric") == "grad_rel"
    assert not np.allclose(mine[grad], own[grad], rtol=1e-3)
