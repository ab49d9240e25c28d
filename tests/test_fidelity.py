"""The fidelity study's sublayer audit: theory's maps at the measured input Gram matrices."""

import numpy as np

from analysis.init.fidelity import random_corpus, seed_study, sublayer_audit, summarize
from analysis.testbed.model import ModelConfig


def test_audit_maps_match_their_sublayers_given_the_measured_input():
    """DeepNorm (gains on V, O and the FFN's both projections): given each sequence's measured
    input Gram the FFN map is exact in expectation and attention's within its softmax
    approximations, so the pooled bias is small; wrong gains or a wrong Gram would show ≥ 20 %."""
    cfg = ModelConfig(scheme="deepnorm", depth=3, width=64, heads=2, max_seq_len=16)
    corpus = random_corpus(1 << 16)
    audit, cos = sublayer_audit(cfg, [0, 1, 2, 3], corpus)
    assert set(audit["sublayer"]) == {"attn0", "ffn0"} and len(audit) == 3 * 2 * 4
    study = seed_study(cfg, [0, 1, 2], corpus).assign(corpus="random")
    summary = summarize(study, audit.assign(corpus="random")).set_index(["study", "what"])
    assert abs(summary.loc[("audit", "ffn q"), "pooled_bias"]) < 0.05
    assert abs(summary.loc[("audit", "attn q"), "pooled_bias"]) < 0.10
    assert abs(summary.loc[("audit", "ffn grad q"), "pooled_bias"]) < 0.05
    assert abs(summary.loc[("audit", "attn grad q"), "pooled_bias"]) < 0.15
    assert np.isfinite(study["z"]).any() and (study["se"] >= 0).all()
    assert len(cos) == 3 and cos["probe"].between(-1, 1).all()


def test_gradient_spread_reports_the_decades_between_seeds():
    import pandas as pd
    from analysis.init.fidelity import gradient_spread
    rows = [("post", 64, s, -1, "embed", "grad_rel", v, 0.0, 50.0)
            for s, v in enumerate([10.0, 100.0, 1000.0])]
    frame = pd.DataFrame(rows, columns=["scheme", "depth", "seed", "layer", "point", "metric",
                                        "measured", "spread", "theory"])
    row = gradient_spread(frame).iloc[0]
    assert row["log10_sd"] == 1.0 and abs(row["geometric_mean"] - 100) < 1e-9
    assert abs(row["mean"] - 370) < 1e-9 and row["theory"] == 50.0 and row["seeds"] == 3


def test_fidelity_bad_input_is_one_line(capsys):
    from analysis.init.fidelity import main
    assert main(["--seeds", "1"]) == 2
    assert main(["--schemes", "nope", "--seeds", "2"]) == 2
    assert main(["--grid", "/nonexistent/run"]) == 2
    assert main(["--corpora", "text,books"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)
    assert "unknown corpus books" in err[-1]
