"""Training claims on synthetic grids with known answers: a diverged run, a stalled one, a flat
stack, a collapsing one; missing data is 'untested'."""

import numpy as np
import pandas as pd

from analysis.training.claims import check_training_claims

DEPTHS = (4, 8, 16)
UNIGRAM = 4.7  # bits/byte of byte frequencies alone
SLOPE = {"pre": -0.05, "post": -0.2, "span": -0.2, "deepnorm": -0.1}  # bits/byte per doubling


def synthetic_runs() -> pd.DataFrame:
    rows = []
    for scheme, slope in SLOPE.items():
        for d in DEPTHS:
            for seed in (0, 1):
                diverged = scheme == "post" and d == 16
                rows.append(dict(scheme=scheme, depth=d, moe="dense", seed=seed, lr=1e-3,
                                 final_val_bpb=np.nan if diverged else 3 + slope * np.log2(d) + 0.01 * seed,
                                 diverged=diverged, divergence_step=7 if diverged else None,
                                 first_train_loss=5.5, final_train_loss=2.5))
    runs = pd.DataFrame(rows)
    stalled = (runs["scheme"] == "deepnorm") & (runs["depth"] == 16)
    runs.loc[stalled, "final_val_bpb"] = 4.6  # the plateau of byte frequencies alone
    return runs


def synthetic_profiles() -> pd.DataFrame:
    L, rows = 16, []
    for scheme in SLOPE:
        for seed in (0, 1):
            for tag in ("init", "end"):
                for i in range(L):
                    point = f"blocks.{i}.resid_post"
                    flat = scheme == "pre" and tag == "end" and i >= L // 2  # deep blocks do little
                    rows.append((scheme, seed, tag, i, point, "layer_cosine", 0.999 if flat else 0.9))
                    collapsed = scheme == "post" and tag == "end"
                    rows.append((scheme, seed, tag, i, point, "token_cosine", 0.99 if collapsed else 0.4))
                    rank = {"init": 40.0, "end": 5.0 if collapsed else 20.0}[tag]
                    rows.append((scheme, seed, tag, i, point, "effective_rank", rank))
                    rows.append((scheme, seed, tag, i, point, "grad_second_moment", 1.0))
                    rows.append((scheme, seed, "step8", i, f"blocks.{i}", "update_size",
                                 0.01 * (1 + 9 * (scheme == "pre") * i / (L - 1))))
                g0 = {"pre": 30.0, "post": 1e-4, "span": 1.2, "deepnorm": 0.9}[scheme]
                rows.append((scheme, seed, tag, -1, "embed", "grad_second_moment", g0))
    p = pd.DataFrame(rows, columns=["scheme", "seed", "tag", "layer", "point", "metric", "mean"])
    p["site"] = np.where(p["point"].str.endswith("resid_post"), "resid_post",
                         np.where(p["point"] == "embed", "embed", ""))
    return p.assign(depth=L, moe="dense")


def statuses(runs, profiles):
    return check_training_claims(runs, profiles, UNIGRAM).set_index("claim")["status"]


def test_known_answers():
    s = statuses(synthetic_runs(), synthetic_profiles())
    assert s["pre_trains_stably_dense"] == "holds"
    assert s["deepnorm_trains_stably_dense"] == "fails"  # stalled at L = 16
    assert s["post_unstable_dense"] == "holds"  # diverged at L = 16
    assert s["span_gains_from_depth_dense"] == "holds"  # slope −0.2 against −0.05
    assert s["span_not_worse_than_pre_deepest_dense"] == "holds"
    assert s["pre_deep_blocks_turn_less_dense"] == "holds"  # the flat stack
    assert s["span_deep_blocks_turn_less_dense"] == "fails"  # every block turns alike
    assert s["post_tokens_distinct_dense"] == "fails" and s["span_tokens_distinct_dense"] == "holds"
    assert s["post_rank_not_collapsed_dense"] == "fails" and s["span_rank_not_collapsed_dense"] == "holds"
    assert s["span_rank_not_below_pre_dense"] == "holds"
    assert s["span_gradient_band_dense"] == "holds" and s["post_gradient_band_dense"] == "fails"
    assert s["pre_gradient_band_dense"] == "fails"  # g_0/g_L = 30
    assert s["pre_update_size_even_dense"] == "fails" and s["span_update_size_even_dense"] == "holds"


def test_a_rank_collapsed_already_at_init_is_not_a_kept_rank():
    # deep PostNorm on the GPU grid: effective rank 1.0 at init and 1.0 after training
    p = synthetic_profiles()
    p.loc[(p["scheme"] == "post") & (p["metric"] == "effective_rank"), "mean"] = 1.0
    claims = check_training_claims(synthetic_runs(), p, UNIGRAM).set_index("claim")
    assert claims.loc["post_rank_not_collapsed_dense", "status"] == "fails"
    assert "collapsed" in claims.loc["post_rank_not_collapsed_dense", "evidence"]
    assert claims.loc["span_rank_not_collapsed_dense", "status"] == "holds"


def test_worse_span_fails_and_missing_data_is_untested():
    runs = synthetic_runs()
    runs.loc[runs["scheme"] == "span", "final_val_bpb"] += 1.0  # span uniformly worse
    runs.loc[runs["scheme"] == "span", "final_val_bpb"] += 0.3 * np.log2(runs["depth"])  # and gains less
    s = statuses(runs, synthetic_profiles())
    assert s["span_not_worse_than_pre_deepest_dense"] == "fails"
    assert s["span_gains_from_depth_dense"] == "fails"
    few = synthetic_runs()[lambda r: r["depth"] == 4]
    s = statuses(few, synthetic_profiles().iloc[:0])
    assert s["span_gains_from_depth_dense"] == "untested"  # one depth: no slope
    assert s["pre_deep_blocks_turn_less_dense"] == "untested"  # no profiles
    moe = synthetic_runs().assign(moe="moe8k2")
    claims = check_training_claims(pd.concat([synthetic_runs(), moe]), synthetic_profiles(), UNIGRAM)
    assert {"span_gains_from_depth_dense", "span_gains_from_depth_moe8k2"} <= set(claims["claim"])


def test_a_grid_gets_the_claims_of_its_own_schemes_a_reading_included():
    runs = synthetic_runs().replace({"scheme": {"span": "span_dlr_all"}})
    runs = runs[runs["scheme"].isin(["pre", "span_dlr_all"])]
    profiles = synthetic_profiles().replace({"scheme": {"span": "span_dlr_all"}})
    s = statuses(runs, profiles)
    assert {c.split("_")[0] for c in s.index} == {"pre", "span"}  # nothing about post or deepnorm
    assert s["span_dlr_all_trains_stably_dense"] == "holds"
    assert s["span_dlr_all_tokens_distinct_dense"] == "holds"
    assert "span_gains_from_depth_dense" not in s  # span itself was not trained


def test_a_cut_run_is_no_evidence_neither_its_losses_nor_its_profiles():
    runs = synthetic_runs().assign(status="ok")
    runs.loc[(runs["scheme"] == "post") & (runs["depth"] == 16), "status"] = "cut"
    s = statuses(runs, synthetic_profiles())  # the profiles are of L = 16, post's cut depth
    assert s["post_tokens_distinct_dense"] == "untested"
    assert s["pre_tokens_distinct_dense"] == "holds"
