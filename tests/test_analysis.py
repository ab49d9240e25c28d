"""The main analysis: comparison math on synthetic frames, a wrong theory reported as failing,
and the default pipeline end to end at a tiny size."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analysis.init.sweep as sweep_mod
from analysis.init.compare import add_errors, aggregate, disagreements, error_summary, target_check
from analysis.init.pipeline import AnalysisConfig, analyse
from analysis.init.measured_claims import check_claims

ROOT = Path(__file__).resolve().parents[1]


def synthetic(theory_factor: float, seeds=(0, 1, 2), depths=(2, 4, 8)) -> pd.DataFrame:
    """Profiles whose measured value is m(l) + seed noise and whose theory is m(l)·factor."""
    rows = []
    for depth in depths:
        for seed in seeds:
            noise = 0.001 * (seed - 1)
            for i in range(depth):
                m = 1.0 + 0.5 * (i + 1)
                point = f"blocks.{i}.resid_post"
                rows.append(("pre", depth, seed, i, point, "second_moment", m + noise, 0.0, m * theory_factor))
                rows.append(("pre", depth, seed, i, point, "token_cosine", 0.3 + noise, 0.0, 0.3 + 0.1 * (theory_factor - 1)))
    return pd.DataFrame(rows, columns=["scheme", "depth", "seed", "layer", "point", "metric",
                                       "measured", "spread", "theory"])


def test_aggregate_takes_the_standard_error_across_seeds():
    agg = aggregate(synthetic(1.0))
    row = agg[(agg["depth"] == 2) & (agg["layer"] == 0) & (agg["metric"] == "second_moment")].iloc[0]
    assert row["measured"] == pytest.approx(1.5)
    assert row["seeds"] == 3
    assert row["spread"] == pytest.approx(np.std([-0.001, 0, 0.001], ddof=1) / np.sqrt(3))


@pytest.mark.parametrize("factor", [1.0, 1.03, 0.9])
def test_errors_are_the_known_relative_and_absolute_errors(factor):
    errs = add_errors(aggregate(synthetic(factor)))
    q = errs[errs["metric"] == "second_moment"]
    np.testing.assert_allclose(q["error"], abs(factor - 1), atol=1e-12)
    rho = errs[errs["metric"] == "token_cosine"]
    np.testing.assert_allclose(rho["error"], abs(0.1 * (factor - 1)), atol=1e-12)  # absolute
    summary = error_summary(aggregate(synthetic(factor))).set_index("metric")
    assert summary.loc["second_moment", "median"] == pytest.approx(abs(factor - 1), abs=1e-12)
    assert summary.loc["second_moment", "n"] == 2 + 4 + 8
    assert summary.loc["second_moment", "within_spread"] == (1.0 if factor == 1.0 else 0.0)
    target = target_check(error_summary(aggregate(synthetic(factor))))
    median_row = target[(target["metric"] == "second_moment") & (target["statistic"] == "median")]
    assert bool(median_row["passes"].iloc[0]) == (abs(factor - 1) <= 0.02)
    assert len(disagreements(errs)) == (14 if abs(factor - 1) > 0.05 else 0)


def test_the_averaged_baseline_stands_beside_the_targets_not_among_them():
    """A failing baseline is reported with its error on the prediction's row; it is not a target
    row of its own (the targets are the position-resolved theory's)."""
    profiles = synthetic(1.0).assign(theory_averaged=lambda f: f["theory"] * 1.3)
    targets = target_check(error_summary(aggregate(profiles)))
    assert set(targets["prediction"]) == {"resolved"} and targets["passes"].all()
    row = targets[(targets["metric"] == "second_moment") & (targets["statistic"] == "median")]
    assert row["averaged_error"].iloc[0] == pytest.approx(0.3, rel=1e-3)
    assert "averaged_error" not in target_check(error_summary(aggregate(synthetic(1.0))))


def test_a_deliberately_wrong_theory_is_reported_as_failing(monkeypatch, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("import os\nprint(os.getcwd())\n" * 400)
    real = sweep_mod.PREDICTIONS["theory"]

    def off_by_30_percent(*a, **kw):
        pred = real(*a, **kw)
        pred["q"] = pred["q"] * 1.3  # a wrong forward recurrence
        return pred

    monkeypatch.setitem(sweep_mod.PREDICTIONS, "theory", off_by_30_percent)
    cfg = AnalysisConfig(schemes=["pre"], depths=[2, 3, 4], seeds=[0, 1], width=32, seq_len=16,
                         batch_size=2, corpus=str(text))
    tables, _ = analyse(cfg, log=lambda s: None)
    target = tables["targets"]
    forward = target[(target["metric"] == "second_moment") & (target["site"] == "resid_post")]
    assert set(forward["prediction"]) == {"resolved"} and not forward["passes"].any()
    assert forward["averaged_error"].max() < 0.15  # the baseline beside it is intact
    assert forward["error"].min() > 0.15
    bad = tables["disagreements"]
    assert (bad["metric"] == "second_moment").sum() >= 9  # every block of every depth is listed
    linear = tables["claims"].set_index("claim").loc["pre_forward_linear"]
    assert "measured" in " ".join(tables["claims"]["method"])
    assert len(linear) == 2  # the theory's claim and its measured check, both kept
    assert set(tables["claims"]["scheme"]) == {"pre"}  # only the claims of the schemes run


def test_measured_claims_fail_with_numbers_when_the_data_disagree():
    rows = []
    for depth in (2, 4, 8, 16):
        for i in range(depth):
            rows.append(("pre", depth, 0, i, f"blocks.{i}.resid_post", "second_moment",
                         1.0 + np.sqrt(i + 1), 0.01, 1.0 + 0.5 * (i + 1)))  # √L, not linear
    errs = add_errors(aggregate(pd.DataFrame(rows, columns=["scheme", "depth", "seed", "layer", "point",
                                                            "metric", "measured", "spread", "theory"])))
    claims = check_claims(errs).set_index("claim")
    assert claims.loc["pre_forward_linear", "status"] == "fails"
    assert "R²" in claims.loc["pre_forward_linear", "evidence"]
    assert claims.loc["span_gradient_bounded", "status"] == "untested"


def embedding_gradients(theory_order: float, seeds: int = 64, sigma: float = 0.35) -> pd.DataFrame:
    """g_0/g_L typically ∝ L, each seed off by a log-normal factor whose σ grows as √L, so the
    seed mean (e^{σ²/2} above the median) grows faster; theory ∝ L^theory_order."""
    rng = np.random.default_rng(0)
    rows = []
    for depth in (4, 8, 16, 32):
        for seed in range(seeds):
            g = depth * np.exp(sigma * np.sqrt(depth / 4) * rng.standard_normal())
            rows += [("post", depth, seed, -1, "embed", "grad_rel", g, 0.0, depth ** theory_order),
                     ("post", depth, seed, depth - 1, f"blocks.{depth - 1}.resid_post", "grad_rel",
                      1.0, 0.0, 1.0)]
    return pd.DataFrame(rows, columns=["scheme", "depth", "seed", "layer", "point", "metric",
                                       "measured", "spread", "theory"])


@pytest.mark.parametrize("theory_order,status", [(1.0, "holds"), (1.5, "fails")])
def test_the_growth_order_is_decided_on_the_median_where_the_mean_runs_ahead(theory_order, status):
    """The seed mean's order is the typical one plus the spread's drift (L^1.2 here); the claim is
    decided on the median, within the tolerance plus 2 of its standard errors."""
    errs = add_errors(aggregate(embedding_gradients(theory_order)))
    claim = check_claims(errs).set_index("claim").loc["post_gradient_ratio_order"]
    assert claim["status"] == status
    median_order, se = map(float, re.search(r"L\^([0-9.]+) ± ([0-9.]+) measured", claim["evidence"]).groups())
    mean_order = float(re.search(r"seed mean L\^([0-9.]+)", claim["evidence"]).group(1))
    assert abs(median_order - 1.0) < 2 * se < 0.2 and mean_order > median_order + 0.1


@pytest.mark.parametrize("sigma,status", [(0.35, "holds"), (0.01, "fails")])
def test_few_seeds_resolve_the_order_only_as_finely_as_their_spread_allows(sigma, status):
    """3 seeds, theory L^1.2 against a typical L^1: the measured order misses by more than the
    tolerance either way; with a wide spread that is within 2 SE (holds), with a narrow one not."""
    claim = check_claims(add_errors(aggregate(embedding_gradients(1.2, seeds=3, sigma=sigma))))
    claim = claim.set_index("claim").loc["post_gradient_ratio_order"]
    order, se = map(float, re.search(r"L\^([0-9.]+) ± ([0-9.]+) measured", claim["evidence"]).groups())
    assert abs(order - 1.2) > 0.1 and claim["status"] == status


def test_default_pipeline_end_to_end_tiny(tmp_path, capsys):
    from run_analysis import main
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return [i ** 2 for i in range(x)]\n" * 400)
    out = tmp_path / "run"
    assert main(["--schemes", "pre,post,span", "--depths", "2,3,4", "--seeds", "0,1", "--width", "32",
                 "--seq-len", "16", "--batch", "2", "--corpus", str(text), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "init sweep" in stdout and "[9/9]" in stdout  # progress
    profiles = pd.read_csv(out / "init_profiles.csv")
    assert list(profiles.columns) == ["scheme", "depth", "seed", "layer", "point", "metric",
                                      "measured", "spread", "theory", "theory_averaged"]
    assert set(profiles["scheme"]) == {"pre", "post", "span"}
    errors = pd.read_csv(out / "errors.csv")
    assert {"prediction", "scheme", "metric", "median", "p90", "p99", "n"} <= set(errors.columns)
    assert set(errors["prediction"]) == {"resolved", "averaged"}
    claims = pd.read_csv(out / "claims.csv")
    assert {"holds", "fails", "untested"} >= set(claims["status"]) and len(claims) > 10
    md = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 4
    for link in links:
        assert (out / link).stat().st_size > 5000
    html = (out / "report.html").read_text()
    assert all(f'src="{link}"' in html for link in links) and "<table" in html
    assert "$$" in md  # derived formulas, LaTeX from sympy
    # `report` rebuilds from the CSVs alone
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == md
    # `report --theory` predicts again from the stored inputs: this code, the same numbers
    assert main(["report", str(out), "--theory"]) == 0
    assert "theory recomputed for 18/18" in capsys.readouterr().out
    again = pd.read_csv(out / "init_profiles.csv")
    pd.testing.assert_frame_equal(again, profiles)


def test_report_theory_compares_a_revised_theory_without_measuring(monkeypatch):
    """repredict replaces both theory columns from each seed's measured inputs, nothing else."""
    frame = synthetic(1.0, seeds=(0, 1), depths=(2,))
    embed = [("pre", 2, s, -1, "embed", m, v, 0.0, np.nan) for s in (0, 1)
             for m, v in (("second_moment", 1.0), ("token_cosine", 0.1))]
    top = [("pre", 2, s, 1, "blocks.1.resid_post", "grad_token_cosine", 0.2, 0.0, np.nan)
           for s in (0, 1)]
    cols = list(frame.columns)
    frame = pd.concat([frame, pd.DataFrame(embed + top, columns=cols)], ignore_index=True)
    frame["theory_averaged"] = np.nan
    seen = []

    def fake(scheme, **kw):
        seen.append((kw["q0"], kw["rho0"], kw["rho_g"]))
        n = kw["depth"] + 1
        return {k: np.full(n, 7.0) for k in ("q", "q_agg", "rho", "g", "rg", "cos", "g_first")}

    monkeypatch.setattr(sweep_mod, "PREDICTIONS", {"theory": fake, "theory_averaged": fake})
    from analysis.testbed.model import ModelConfig
    out = sweep_mod.repredict(frame, ModelConfig(width=32, heads=2, max_seq_len=16), log=lambda s: None)
    assert seen == [(1.0, 0.1, 0.2)] * 4  # two seeds × two predictions, each its own inputs
    q = out[(out["metric"] == "second_moment") & (out["point"] != "embed")]
    assert (q["theory"] == 7.0).all() and (q["theory_averaged"] == 7.0).all()
    pd.testing.assert_series_equal(out.sort_values(["seed", "point", "metric"])["measured"].reset_index(drop=True),
                                   frame[out.columns].sort_values(["seed", "point", "metric"])["measured"].reset_index(drop=True))


def test_noise_floor_is_the_median_error_of_an_exact_theory():
    """With n seeds, an exact theory's error is |t_{n−1}|·SE: its median t_{n−1}(0.75)·SE, and
    its share within 2 SE P(|t_{n−1}| ≤ 2) — 0.82 for 3 seeds, the bar within_spread is read by."""
    from scipy import stats
    errs = add_errors(aggregate(synthetic(1.0)))
    row = errs[(errs["metric"] == "second_moment")].iloc[0]
    se = np.std([-0.001, 0, 0.001], ddof=1) / np.sqrt(3)
    assert row["noise_floor"] == pytest.approx(stats.t.ppf(0.75, 2) * se / row["measured"])
    assert row["within_expected"] == pytest.approx(0.8165, abs=1e-4)
    # a target below the floor is flagged unresolvable, one above it resolvable
    summary = error_summary(aggregate(synthetic(1.0)))
    loud = summary.assign(noise_floor=0.03)
    t = target_check(loud).set_index(["metric", "statistic"])
    assert not t.loc[("second_moment", "median"), "resolvable"]
    assert target_check(summary.assign(noise_floor=0.001)).set_index(
        ["metric", "statistic"]).loc[("second_moment", "median"), "resolvable"]


@pytest.mark.parametrize("argv,message", [
    (["--schemes", "pre,nope"], "unknown scheme 'nope'"),
    (["--depths", "8,4"], "depths must be increasing"),
    (["--depths", ","], "--depths is empty"),
    (["--format", "gif"], "unknown figure format 'gif'"),
    (["--out", "/proc/sigprop-cannot-write"], "is not writable"),
    (["report", "/tmp"], "holds no results"),
])
def test_bad_input_one_line_exit_2(argv, message, cli_error):
    assert message in cli_error(argv)


def test_a_fresh_process_with_bad_input_prints_one_line():
    r = subprocess.run([sys.executable, str(ROOT / "run_analysis.py"), "--schemes", "pre,nope"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: unknown scheme 'nope'")
