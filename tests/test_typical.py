"""The typical value across seeds against the mean field (analysis/init/typical.py)."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis.init.typical import (ALPHA, MEDIAN_SPREAD, Z_MEDIAN, by_depth, depth_test, floor,
                                   typical_errors, typical_targets)

COLUMNS = ["scheme", "depth", "seed", "layer", "point", "metric", "measured", "spread", "theory"]


def point_of(layer: int) -> str:
    """The probe point of layer l: the embedding, then each block's output."""
    return "embed" if layer == 0 else f"blocks.{layer - 1}.resid_post"


def lognormal_grid(sd_ln: float, factor: float, rows: int = 300, seeds: int = 16, seed: int = 0):
    """g_l/g_L of one depth-(rows+1) stack: every row's seeds log-normal about median m, theory
    m·factor; and the spread frame predicting sd_ln for every row."""
    rng = np.random.default_rng(seed)
    depth = rows + 1
    out, sds = [], []
    for i in range(rows):
        m = 2.0 + rows - i
        for s, v in enumerate(m * np.exp(sd_ln * rng.standard_normal(seeds))):
            out.append(("post", depth, s, i, point_of(i), "grad_rel", v, 0.0, m * factor))
        sds.append(("post", depth, point_of(i), "grad_rel", sd_ln))
    return (pd.DataFrame(out, columns=COLUMNS),
            pd.DataFrame(sds, columns=["scheme", "depth", "point", "metric", "predicted_sd_ln"]))


def walk_grid(sd_bottom: dict[int, float], factor: float, rng: np.random.Generator, seeds: int = 16):
    """A grid whose seeds' ln(g_l/g_L) are random walks down the stack (every block adds an
    independent factor, as in a real stack, so a depth's rows share their seeds), reaching log-sd
    sd_bottom[L] at the embedding of depth L; theory = the true median × factor."""
    out, sds = [], []
    for L, sd in sd_bottom.items():
        steps = rng.normal(0.0, sd / math.sqrt(L), (seeds, L))
        walk = np.cumsum(steps[:, ::-1], axis=1)[:, ::-1]  # layer l: the blocks l … L-1
        for layer in range(L):
            m = 1.0 + L - layer
            out += [("b2t", L, s, layer, point_of(layer), "grad_rel", m * math.exp(w), 0.0,
                     m * factor) for s, w in enumerate(walk[:, layer])]
            sds.append(("b2t", L, point_of(layer), "grad_rel", sd * math.sqrt((L - layer) / L)))
    return (pd.DataFrame(out, columns=COLUMNS),
            pd.DataFrame(sds, columns=["scheme", "depth", "point", "metric", "predicted_sd_ln"]))


def test_an_exact_median_shows_the_predicted_noise_floor():
    profiles, sds = lognormal_grid(sd_ln=0.8, factor=1.0)
    errs = typical_errors(profiles, sds)
    expected = floor(0.8, 16)
    # the median of 300 rows' errors estimates the floor to a few per cent; 16 is not asymptotic
    assert errs["error"].median() == pytest.approx(expected, rel=0.15)
    assert errs["noise_floor"].iloc[0] == pytest.approx(expected)
    assert errs["measured_sd_ln"].median() == pytest.approx(0.8, rel=0.1)


@pytest.mark.parametrize("sd_ln, factor, verdict", [
    (0.001, 1.0, "meets target"),  # tight seeds, exact theory
    (0.001, 1.3, "fails"),  # tight seeds, theory 30 % off: resolvable
    (1.5, 1.0, "within noise floor"),  # seeds spread by decades: the 5 % target cannot resolve
    (1.5, 3.0, "fails"),  # ... but a factor 3 is far outside even that floor
])
def test_verdicts_follow_the_predicted_floor(sd_ln, factor, verdict):
    profiles, sds = lognormal_grid(sd_ln, factor, rows=60)
    row = typical_targets(typical_errors(profiles, sds)).iloc[0]
    assert (row["prediction"], row["metric"], row["statistic"]) == ("typical", "grad_rel", "median")
    assert row["verdict"] == verdict
    assert row["resolvable"] == (min(row["noise_floor"], row["measured_noise_floor"]) <= 0.05)
    assert row["measured_noise_floor"] == pytest.approx(row["noise_floor"], rel=0.3)


def test_grid_spread_writes_the_typical_tables(tiny_grid, tmp_path):
    from run_analysis import main
    assert main(["fidelity", "--grid", str(tiny_grid), "--out", str(tmp_path / "out")]) == 0
    targets = pd.read_csv(tmp_path / "out" / "typical_targets.csv")
    depths = pd.read_csv(tmp_path / "out" / "typical_by_depth.csv")
    assert set(targets["verdict"]) <= {"meets target", "within noise floor", "fails"}
    assert set(targets["scheme"]) == {"pre", "post"}
    assert set(targets["metric"]) == {"grad_rel"} and (targets["noise_floor"] > 0).all()
    assert len(depths) == 4 and (depths["predicted_log10_sd"] > 0).all()
    assert pd.read_csv(tmp_path / "out" / "typical_orders.csv").empty  # two depths: no order
    assert np.allclose(depths["predicted_log10_sd"] * math.log(10),
                       np.log1p(depths["noise_floor"]) * np.sqrt(3) / Z_MEDIAN / MEDIAN_SPREAD)


def test_spread_only_writes_the_spread_alone(tiny_grid, tmp_path):
    from run_analysis import main
    assert main(["fidelity", "--grid", str(tiny_grid), "--spread-only", "--out", str(tmp_path / "out")]) == 0
    written = {p.name for p in (tmp_path / "out").glob("*.csv")}
    assert written == {"gradient_spread.csv"}
    assert (pd.read_csv(tmp_path / "out" / "gradient_spread.csv")["seeds"] > 1).all()


def test_the_smaller_floor_says_what_is_resolvable():
    # seeds that scatter less than the theory predicts: the measured floor says what can be resolved
    profiles, sds = lognormal_grid(sd_ln=0.3, factor=1.25, rows=60)
    targets = typical_targets(typical_errors(profiles, sds.assign(predicted_sd_ln=3.0))).iloc[0]
    assert targets["error"] < targets["noise_floor"]
    assert targets["error"] > targets["measured_noise_floor"] and targets["verdict"] == "fails"
    assert targets["depth_dof"] == 1 and targets["depth_p"] < ALPHA


# the all-scheme grid's b2t: the seeds' log-sd of g_0/g_L at L = 2 … 256 (typical_by_depth.csv)
B2T_SPREAD = {2: 0.061, 4: 0.097, 8: 0.22, 16: 0.38, 32: 0.49, 64: 0.48, 128: 0.71, 256: 1.0}


def test_an_exact_theory_fails_the_depth_test_at_its_level_and_the_floor_rule_often():
    rng = np.random.default_rng(1)
    spread = {L: sd for L, sd in B2T_SPREAD.items() if L <= 32}  # the same sds, shallower stacks
    depth_fails = floor_fails = 0
    draws = 120
    for _ in range(draws):
        row = typical_targets(typical_errors(*walk_grid(spread, 1.0, rng))).iloc[0]
        depth_fails += row["verdict"] == "fails"
        floor_fails += row["error"] > max(row["target"], row["measured_noise_floor"])
    assert depth_fails / draws < 0.12  # ALPHA = 0.05 with 120 draws' scatter, σ from 16 seeds
    assert floor_fails / draws > 0.15  # the median-over-rows rule has no level


def test_a_theory_off_by_its_scatter_fails_the_depth_test():
    rng = np.random.default_rng(2)
    spread = {L: sd for L, sd in B2T_SPREAD.items() if L <= 32}
    # off by ×1.3 at every depth: 0.26 in the log, 1 to 11 standard errors of the median
    verdicts = [typical_targets(typical_errors(*walk_grid(spread, 1.3, rng))).iloc[0]["verdict"]
                for _ in range(20)]
    assert verdicts.count("fails") >= 18


def test_the_depth_test_reads_g0_over_gL_at_each_depth():
    profiles, sds = walk_grid({4: 0.2, 8: 0.3, 16: 0.4}, 1.0, np.random.default_rng(3))
    depths = by_depth(typical_errors(profiles, sds))
    assert list(depths["depth"]) == [4, 8, 16]
    se = MEDIAN_SPREAD * depths["measured_log10_sd"] * math.log(10) / 4  # 16 seeds
    assert np.allclose(depths["z"], np.log(depths["measured_median"] / depths["theory"]) / se)
    test = depth_test(depths).iloc[0]
    assert test["depth_dof"] == 3 and test["depth_chi2"] == pytest.approx((depths["z"] ** 2).sum())


def test_the_second_order_median_raises_by_the_norms_term_and_drifts_by_the_log_variance():
    """A grid whose seeds' median lies at theory·e^{a}·e^{−σ²/2}: the second-order prediction
    (E[1/q̂] at every norm, ln raise a, less the log-normal drift) passes its depth test where
    the mean field fails, and only the verdict's test is the mean field's."""
    rng = np.random.default_rng(5)
    a = 0.3
    profiles, sds = walk_grid({4: 0.05, 8: 0.05, 16: 0.05}, math.exp(-a + 0.05 ** 2 / 2), rng, seeds=64)
    sds["jensen_all_ln"] = a
    depths = by_depth(typical_errors(profiles, sds))
    assert np.allclose(depths["second_order_median"],
                       depths["theory"] * np.exp(a - depths["predicted_log10_sd"] ** 2 * math.log(10) ** 2 / 2))
    targets = typical_targets(typical_errors(profiles, sds), depths).iloc[0]
    assert targets["second_order_p"] > ALPHA and targets["depth_p"] < 1e-6
    assert targets["second_order_seeds_sd_p"] > ALPHA  # the seeds' σ is the predicted one here
    assert targets["verdict"] == "fails"  # the mean field is 26 % off, resolvably


def test_each_scheme_keeps_its_own_measured_floor():
    tight, sds_t = lognormal_grid(sd_ln=0.01, factor=1.0, rows=20)
    loose, sds_l = lognormal_grid(sd_ln=1.0, factor=1.0, rows=20)
    loose, sds_l = (f.assign(scheme="b2t") for f in (loose, sds_l))
    targets = typical_targets(typical_errors(pd.concat([loose, tight]), pd.concat([sds_l, sds_t])))
    floors = targets.set_index("scheme")["measured_noise_floor"]
    assert floors["post"] < 0.01 < 0.1 < floors["b2t"]


def test_growth_order_of_the_median_is_fitted_with_its_error():
    from analysis.init.typical import growth_orders
    depths = pd.DataFrame({"scheme": "post", "depth": [4, 16, 64, 256], "seeds": 16,
                           "measured_median": [2.0 * L ** 1.5 for L in (4, 16, 64, 256)],
                           "theory": [2.0 * L ** 1.2 for L in (4, 16, 64, 256)],
                           "lognormal_median": [1.0 * L ** 1.2 for L in (4, 16, 64, 256)],
                           "measured_log10_sd": 0.1})
    row = growth_orders(depths, 256).iloc[0]
    assert row["measured_median_exponent"] == pytest.approx(1.5)
    assert row["mean_field_exponent"] == pytest.approx(1.2) and not row["mean_field_holds"]
    assert row["measured_se"] > 0
    assert growth_orders(depths.iloc[:2], 256).empty  # under three depths: no fit


def test_a_curved_profile_predicted_exactly_has_the_measured_order():
    from analysis.init.typical import growth_orders
    L = np.array([2, 8, 32, 128, 512])
    curved = L ** 1.2 * np.log(4 * L)  # not a power law: its slope depends on the weights
    depths = pd.DataFrame({"scheme": "b2t", "depth": L, "seeds": 16, "measured_median": curved,
                           "theory": curved, "lognormal_median": curved,
                           "measured_log10_sd": [0.01, 0.05, 0.2, 0.4, 0.8]})
    row = growth_orders(depths, 256).iloc[0]
    assert row["mean_field_exponent"] == pytest.approx(row["measured_median_exponent"])
    assert row["mean_field_holds"] and row["predicted_median_holds"]


def test_a_folder_that_is_not_a_sweep_is_one_line(tiny_grid, tmp_path, cli_error):
    import shutil
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(tiny_grid / "init_profiles.csv", half)
    line = cli_error(["fidelity", "--grid", str(half), "--out", str(tmp_path / "out")])
    assert "lacks config.json" in line and not (tmp_path / "out").exists()
