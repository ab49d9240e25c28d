"""Training under torch.compile: many runs in one process all train compiled, and throughput
leaves the compiling steps out."""

import pytest
import torch
from torch._dynamo.utils import counters

from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import ModelConfig
from analysis.training.train import TrainConfig, train_run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("def add(a, b):\n    return a + b\n" * 300)
    return load_corpus(path)


def _compiled_run(corpus, depth, run_dir, scheme="pre", **kw):
    mc = ModelConfig(scheme=scheme, depth=depth, width=16, heads=2, max_seq_len=16)
    # the eager backend: dynamo traces, guards and counts recompiles as with inductor, minus codegen
    tc = TrainConfig(**{"tokens": 16 * 2 * 4, "batch_size": 2, "evals": 1, "eval_batches": 1,
                        "checkpoints": 1, "profile_fractions": (), "compile": True,
                        "compile_backend": "eager", **kw})
    return train_run(mc, tc, corpus, run_dir, log=lambda s: None)


def test_twelve_compiled_runs_in_one_process_never_fall_back(corpus, tmp_path):
    for depth in range(1, 13):  # 12 whole-model graphs: above dynamo's recompile limit of 8
        before = counters["frames"]["ok"]
        r = _compiled_run(corpus, depth, tmp_path / f"L{depth}", compile_scope="model")
        assert r["compiled"] and counters["frames"]["ok"] > before, depth  # traced afresh


def test_runs_compiled_by_block_share_their_graphs_across_depths(corpus, tmp_path):
    torch.compiler.reset()
    counters.clear()
    for depth in range(1, 7):
        for scheme in ("pre", "span"):
            r = _compiled_run(corpus, depth, tmp_path / f"{scheme}{depth}", scheme=scheme,
                              tokens=16 * 2 * 2)
            assert r["compiled"]
    assert counters["stats"]["unique_graphs"] == 2  # one per scheme, for 12 runs of 1..6 blocks


def test_without_a_reset_per_run_the_limit_is_hit_loudly(corpus, tmp_path, monkeypatch):
    torch.compiler.reset()
    monkeypatch.setattr(torch.compiler, "reset", lambda: None)  # what the grid did before
    with pytest.raises(Exception, match="recompile_limit"):
        for depth in range(1, 10):
            _compiled_run(corpus, depth, tmp_path / f"L{depth}", compile_scope="model")
    assert depth == 9  # the 9th model: a hard failure, not a silent eager run


def test_tokens_per_s_counts_only_steps_after_the_warm_up(corpus, tmp_path):
    r = _compiled_run(corpus, 2, tmp_path / "r", tokens=16 * 2 * 12, timing_warmup=3, check_every=4)
    windows = r["timed_windows"]
    assert windows and min(first for first, _, _ in windows) >= 3
    assert sum(n for _, n, _ in windows) <= 12 - 3
    timed = sum(n for _, n, _ in windows) * 2 * 16 / sum(s for _, _, s in windows)
    assert r["tokens_per_s"] == pytest.approx(timed)


def test_blocks_that_branch_on_l_get_a_graph_each_past_the_default_limit(corpus, tmp_path):
    torch.compiler.reset()
    counters.clear()
    # LayerNorm Scaling multiplies by l^-1/2: a graph per block, 12 > the default limit of 8
    r = _compiled_run(corpus, 12, tmp_path / "lns", scheme="lns", compile_scope="blocks",
                      tokens=16 * 2 * 2)
    # torch 2.13 traces one graph per block; 2.11 generalizes l after a few: never a fallback
    assert r["compiled"] and 1 < counters["stats"]["unique_graphs"] <= 12
