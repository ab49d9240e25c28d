"""SpanNorm's readings (issue 29): the schemes, their learning-rate gains, the one-step depth
theory derived from the block functions, and the study's verdict rules."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.testbed.model import ModelConfig, build_model
from analysis.testbed.parametrization import lr_multipliers, param_groups
from theory.depth_orders import depth_orders
from theory.schemes import SCHEMES, Scheme, register

F = Fraction


@pytest.fixture(scope="module")
def corpus():
    from analysis.testbed.corpus import load_corpus
    return load_corpus()


@pytest.mark.parametrize("reading", ["span_fwd", "span_dlr"])
def test_readings_that_differ_only_in_training_are_span_at_init(reading):
    """span_fwd moves β from the init into the forward pass, span_dlr adds learning rates only:
    from the same seed both compute span's logits exactly."""
    x = torch.randint(0, 256, (2, 16))
    logits = {}
    for s in ("span", reading):
        model = build_model(ModelConfig(scheme=s, depth=6, width=32, heads=2, max_seq_len=16),
                            seed=3)
        logits[s] = model(x)[0]
    torch.testing.assert_close(logits["span"], logits[reading], rtol=1e-5, atol=1e-5)


def test_span_alt_is_a_different_network():
    x = torch.randint(0, 256, (2, 16))
    outs = [build_model(ModelConfig(scheme=s, depth=6, width=32, heads=2, max_seq_len=16),
                        seed=3)(x)[0] for s in ("span", "span_alt")]
    assert not torch.allclose(*outs)


def test_scheme_learning_rate_gains_reach_the_optimizer():
    """span_dlr at L = 16: inner matrices × 16^(-1/2), output projections × 1/16, all else × 1;
    under µP the width rule multiplies on top."""
    model = build_model(ModelConfig(scheme="span_dlr", depth=16, width=32, heads=2,
                                    max_seq_len=16))
    mult = lr_multipliers(model, "adam")
    for name, m in mult.items():
        if name.endswith((".q.weight", ".k.weight", ".v.weight", ".up.weight")):
            assert m == pytest.approx(0.25), name
        elif name.endswith((".o.weight", ".down.weight")):
            assert m == pytest.approx(1 / 16), name
        else:
            assert m == 1.0, name
    groups = param_groups(model, "adam")
    assert sorted({g["lr_mult"] for g in groups}) == pytest.approx([1 / 16, 0.25, 1.0])
    mup = build_model(ModelConfig(scheme="span_dlr", depth=16, width=64, heads=2, max_seq_len=16,
                                  parametrization="mup", base_width=32))
    assert lr_multipliers(mup, "adam")["blocks.0.attns.0.o.weight"] == pytest.approx(1 / 32)
    plain = build_model(ModelConfig(scheme="span", depth=16, width=32, heads=2, max_seq_len=16))
    assert set(lr_multipliers(plain, "adam").values()) == {1.0}


def test_scheme_learning_rate_gains_reach_moe_experts():
    model = build_model(ModelConfig(scheme="span_dlr", depth=4, width=32, heads=2, max_seq_len=16,
                                    experts=2, top_k=1))
    mult = lr_multipliers(model, "sgd")
    assert mult["blocks.0.ffns.0.experts.1.down.weight"] == pytest.approx(0.25)
    assert mult["blocks.0.ffns.0.router.weight"] == 1.0


# (stream, block update, network change) exponents, derived by hand in theory/depth_orders.py's
# rules; each differs from at least one other scheme's, so a wrong rule shows.
DERIVED = {
    ("span", "adam"): (0, 0, 1), ("span", "sgd"): (0, 0, 1),
    ("span_fwd", "adam"): (0, F(-1, 2), F(1, 2)), ("span_fwd", "sgd"): (0, -1, 0),
    ("span_alt", "adam"): (F(1, 2), 0, 1), ("span_alt", "sgd"): (F(1, 2), 0, 1),
    ("span_dlr", "adam"): (0, -1, 0), ("span_dlr", "sgd"): (0, -1, 0),
    ("pre", "adam"): (F(1, 2), F(-1, 2), F(1, 2)), ("pre", "sgd"): (F(1, 2), -1, 0),
    ("deepnorm", "adam"): (0, F(-1, 2), F(1, 2)), ("deepnorm", "sgd"): (0, -1, 0),
    ("post", "adam"): (0, 0, 0),
}


@pytest.mark.parametrize("key", DERIVED)
def test_depth_orders_follow_from_the_block_functions(key):
    d = depth_orders(*key)
    assert (d.stream, d.block, d.network) == DERIVED[key]
    assert d.lr_drift == -d.network


def test_only_the_depth_mup_reading_is_predicted_to_keep_adams_lr():
    keeps = {s for s in ("span", "span_fwd", "span_alt", "span_dlr", "pre", "deepnorm")
             if depth_orders(s, "adam").lr_drift == 0}
    assert keeps == {"span_dlr"}


def test_depth_orders_read_a_new_schemes_constants():
    """A scheme written in a test: PreNorm with branches × L^(-1/2) in the forward pass keeps
    its stream bounded (1 + L·(1/L)) and its block update at L^(-1/2)."""
    def scaled_pre(x, op, *, l, L, c):
        h = x + c * op.attn(op.norm(x))
        return h + c * op.ffn(op.norm(h))
    register(Scheme("test_scaled_pre", scaled_pre, "h = x + c·A(N(x)); y = h + c·F(N(h))",
                    "test", True, {"c": lambda L: L ** F(-1, 2)}), replace=True)
    try:
        d = depth_orders("test_scaled_pre", "adam")
    finally:
        del SCHEMES["test_scaled_pre"]
    assert (d.stream, d.block, d.network) == (0, F(-1, 2), F(1, 2))


def test_depth_orders_refuse_an_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer"):
        depth_orders("span", "lion")


def test_one_step_network_change_follows_theory_for_span_and_span_dlr(corpus):
    """One Adam step at width 64, L = 4 and 16: span's network change grows with depth (all L
    blocks add up), span_dlr's does not (depth-µP's learning rates)."""
    from analysis.width.onestep import depth_slopes, depth_study
    frames = [depth_study(s, [4, 16], 64, "adam", 0, corpus).assign(scheme=s, optimizer="adam",
                                                                     seed=0)
              for s in ("span", "span_dlr")]
    slopes = depth_slopes(pd.concat(frames), "network").set_index("scheme")["slope"]
    assert slopes["span"] > 0.5
    assert abs(slopes["span_dlr"]) < 0.25


# --- the study's rules ------------------------------------------------------------------------


def _optima(scheme, log2_lrs, stalled=()):
    return pd.DataFrame({"scheme": scheme, "width": 64, "depth": [4, 8, 16, 32][:len(log2_lrs)],
                         "log2_best_lr": log2_lrs, "log2_se": 0.1, "inside_grid": True,
                         "stalled": [d in stalled for d in [4, 8, 16, 32][:len(log2_lrs)]]})


def test_lr_drift_recovers_a_known_slope_and_judges_the_prediction():
    from analysis.training.readings_verdicts import lr_drift
    frame = lr_drift(pd.concat([_optima("span", [-7, -8, -9, -10]),
                                _optima("span_dlr", [-6, -6.1, -5.9, -6])]))
    frame = frame.set_index("scheme")
    assert frame.loc["span", "drift"] == pytest.approx(-1.0)
    assert frame.loc["span", "prediction"] == "holds"  # theory: −1 per doubling
    assert abs(frame.loc["span_dlr", "drift"]) < 0.1
    assert frame.loc["span_dlr", "prediction"] == "holds"


def test_lr_drift_leaves_out_stalled_depths_and_says_so():
    from analysis.training.readings_verdicts import lr_drift, lr_transfer
    frame = lr_drift(_optima("span_dlr", [-6, -6, -6, -3], stalled=(32,))).set_index("scheme")
    row = frame.loc["span_dlr"]
    assert row["depths"] == "4,8,16" and "L=32 stalled" in row["left_out"]
    status, evidence = lr_transfer(row.rename("span_dlr"))
    assert status == "fails" and "stalled" in evidence  # a depth it cannot train is no transfer


def _runs(scheme, bpb_by_depth, seeds=(0, 1), moe="dense", diverged=()):
    rows = []
    for d, v in bpb_by_depth.items():
        for s in seeds:
            rows.append({"scheme": scheme, "depth": d, "seed": s, "moe": moe, "lr": 1e-3,
                         "final_val_bpb": v + 0.01 * s, "diverged": d in diverged,
                         "divergence_step": 5 if d in diverged else math.nan})
    return pd.DataFrame(rows)


def test_verdicts_decide_each_claim_from_its_numbers():
    from analysis.training.readings_verdicts import verdicts
    dense = pd.concat([_runs("span_dlr", {4: 3.2, 8: 3.1, 16: 3.0}),
                       _runs("pre", {4: 3.2, 8: 3.15, 16: 3.1}),
                       _runs("span", {4: 3.1, 8: 3.2, 16: 4.9})])
    drift = pd.DataFrame({"scheme": ["span_dlr", "span"], "drift": [0.05, -0.9],
                          "drift_se": [0.1, 0.1], "predicted": [0.0, -1.0], "depths": ["4,8,16"] * 2,
                          "left_out": ["", ""]})
    table = verdicts(drift, dense, pd.DataFrame(), unigram_bpb=5.0, schemes=["span_dlr", "span", "pre"])
    status = table.set_index(["reading", "claim"])["status"]
    assert status["span_dlr", "lr_transfer"] == "holds" and status["span", "lr_transfer"] == "fails"
    assert status["span_dlr", "stability"] == "holds"
    assert status["span", "stability"] == "fails"  # 4.9 > 0.95 × 5.0: stalled at L = 16
    assert status["span_dlr", "depth_efficiency"] == "holds"
    assert status["span", "depth_efficiency"] == "fails"
    assert status["span_dlr", "ge_pre"] == "holds" and status["span", "ge_pre"] == "fails"
    assert status["span_dlr", "moe"] == "untested"
    assert status["span_dlr", "init_bounds"] == "holds"
    assert ("pre", "ge_pre") not in status.index
    assert list(table.columns) == ["reading", "claim", "status", "evidence"]


@pytest.mark.slow
def test_the_tiny_study_runs_resumes_and_writes_its_verdicts(tmp_path):
    """`readings --preset tiny`: every stage, then again (everything kept, nothing retrained)."""
    from analysis.cli import main
    out = tmp_path / "study"
    assert main(["readings", "--preset", "tiny", "--quiet", "--out", str(out)]) == 0
    table = pd.read_csv(out / "verdicts" / "verdicts.csv")
    assert set(table["reading"]) == {"span", "span_fwd", "span_alt", "span_dlr", "span_dlr_all",
                                     "pre", "deepnorm"}
    assert {"init_bounds", "lr_transfer", "stability", "depth_efficiency", "moe"} <= set(table["claim"])
    runs = pd.read_csv(out / "verdicts" / "train_runs.csv")
    assert set(runs["moe"]) == {"dense", "moe4k2"} and runs["seed"].nunique() == 2
    stamp = (out / "grid" / "span" / "train_runs.csv").stat().st_mtime
    assert main(["readings", "--preset", "tiny", "--quiet", "--out", str(out)]) == 0
    assert (out / "grid" / "span" / "train_runs.csv").stat().st_mtime >= stamp
    assert len(pd.read_csv(out / "verdicts" / "train_runs.csv")) == len(runs)


def test_the_docs_theory_table_is_what_depth_orders_derives():
    """docs/span-readings.md's exponent table, row by row, against theory.depth_orders."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "span-readings.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `") and line.count("|") == 9]
    assert len(rows) == 7
    for line in rows:
        cells = [c.strip().strip("`").replace("−", "-") for c in line.strip("|").split("|")]
        a, g = depth_orders(cells[0], "adam"), depth_orders(cells[0], "sgd")
        want = [a.stream, a.block, a.network, a.lr_drift, g.block, g.network, g.lr_drift]
        assert [Fraction(c) for c in cells[1:]] == want, cells[0]


@pytest.mark.parametrize("drift,se,status", [(0.05, 0.1, "holds"), (-0.33, 0.08, "fails"),
                                             (-0.18, 0.21, "untested"), (-0.2, 0.2, "untested")])
def test_lr_transfer_is_decided_only_where_the_spread_allows(drift, se, status):
    from analysis.training.readings_verdicts import lr_transfer
    row = pd.Series({"drift": drift, "drift_se": se, "depths": "4,8,16,32,64", "left_out": "",
                     "predicted": 0.0})
    assert lr_transfer(row)[0] == status


def test_the_docs_verdict_matrix_is_the_committed_one():
    """docs/span-readings.md's verdict matrix, cell by cell, against results/span-readings."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    committed = pd.read_csv(root / "results" / "span-readings" / "verdicts.csv")
    lines = (root / "docs" / "span-readings.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| reading | init_bounds"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("*`") for c in line.strip("|").split("|")])
    shown = {(r[0], claim): status for r in rows for claim, status in zip(header[1:], r[1:])
             if status != "—"}
    assert shown == {(r.reading, r.claim): r.status for r in committed.itertuples()}
