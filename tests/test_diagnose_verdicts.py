"""Verdicts that hold against their own evidence: a grown stream read through norms is not exploding,
a block that matters to the skip test is not redundant, and dead blocks still are."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from analysis.diagnose.diagnosis import diagnose
from analysis.diagnose.findings import THRESHOLDS, redundant_blocks
from analysis.diagnose.headroom import raw_readers
from analysis.testbed.model import ModelConfig, build_model
from analysis.training.train import save_atomic
from theory.schemes import SCHEMES, scheme

FAST = dict(sequences=8, seq_len=32, grad_sequences=4, batch=4, skip_sequences=4, init_sequences=4)
GROWTH = 2.3  # per-block gain: the stream's second moment grows ~GROWTH^(2(L-1)) ≈ 10⁵ over 8 blocks


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y = [1, 2]\n" * 300)
    return path


@pytest.fixture(scope="module")
def pre_without_final_norm():
    """A pre-norm scheme whose head reads the stream raw (registered for this module only)."""
    @scheme("test_pre_nofinal", formula="pre, no final norm", source="test", final_norm=False)
    def block(x, op, *, l, L):
        h = x + op.attn(op.norm(x))
        return h + op.ffn(op.norm(h))
    yield "test_pre_nofinal"
    SCHEMES.pop("test_pre_nofinal")


def _save(folder: Path, mc: ModelConfig, model) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    save_atomic({"model": model.state_dict(), "model_config": mc.to_dict()}, folder / "checkpoint.pt")
    return str(folder)


def _grown(scheme_name: str, depth: int = 8):
    """A testbed whose branch outputs are scaled by GROWTH^l: the stream grows ~10⁵ from block 0 to the last."""
    mc = ModelConfig(scheme=scheme_name, depth=depth, width=32, heads=4, max_seq_len=64)
    model = build_model(mc)
    with torch.no_grad():
        for l, block in enumerate(model.blocks):
            gain = GROWTH ** l
            if scheme_name == "peri":  # the post-branch norms' gains, as a trained Peri-LN model learns them
                for i in block.structure.post_branch_norms:
                    block.norms[i].weight.mul_(gain)
            else:  # the output projections
                block.attns[0].o.weight.mul_(gain)
                block.ffns[0].down.weight.mul_(gain)
    return mc, model


def _growth(d) -> float:
    b = d.table[(d.table.layer >= 0) & (d.table.layer < d.meta["blocks"])]
    return float(b.q_rel_median.iloc[-1] / b.q_rel_median.iloc[0])


@pytest.mark.parametrize("name", ["peri", "pre"])
def test_a_stream_grown_10_4_to_10_6_behind_norms_is_not_exploding(tmp_path, text, name):
    mc, model = _grown(name)
    d = diagnose(_save(tmp_path / name, mc, model), text=str(text), **FAST)
    found = dict(zip(d.findings["id"], d.findings["severity"]))
    assert 1e4 <= _growth(d) <= 1e6
    assert "stream_explodes" not in found and found["stream_grows"] == "info"
    assert d.meta["stream_readers"] == []
    assert not d.verdict.startswith("WARNINGS") or "stream explodes" not in d.verdict
    # the headroom columns: a grown stream leaves less fp16 range at the top than at the bottom
    b = d.table[(d.table.layer >= 0) & (d.table.layer < mc.depth)]
    assert b.fp16_range_headroom.iloc[-1] < b.fp16_range_headroom.iloc[0]
    assert (b.precision_headroom == b.branch_rel_median * 256).all()


def test_the_same_growth_read_raw_by_the_head_explodes(tmp_path, text, pre_without_final_norm):
    mc, model = _grown(pre_without_final_norm)
    d = diagnose(_save(tmp_path / "raw", mc, model), text=str(text), **FAST)
    found = d.findings.set_index("id")
    assert 1e4 <= _growth(d) <= 1e6
    assert found.loc["stream_explodes", "severity"] == "warning"
    assert "the head (no final norm)" in found.loc["stream_explodes", "message"]
    assert d.meta["stream_readers"] == ["head"] and "stream explodes" in d.verdict


def test_dead_blocks_are_still_redundant(tmp_path, text):
    mc = ModelConfig(scheme="pre", depth=6, width=32, heads=4, max_seq_len=64)
    model = build_model(mc)
    with torch.no_grad():
        for i in (2, 4):  # branches that output nothing: the block is the identity
            model.blocks[i].attns[0].o.weight.zero_()
            model.blocks[i].ffns[0].down.weight.zero_()
    d = diagnose(_save(tmp_path / "dead", mc, model), text=str(text), **FAST)
    found = d.findings.set_index("id")
    assert found.loc["redundant_blocks", "layers"] == "2,4"
    assert found.loc["redundant_blocks", "severity"] == "warning" and "redundant" in d.verdict
    row = d.table.set_index("layer")
    assert row.loc[2, "skip_out_change"] == 0.0 and row.loc[2, "branch_rel_median"] == 0.0


def _rows(contribution, skip_change, loss, loss_se) -> pd.DataFrame:
    return pd.DataFrame(dict(layer=range(len(contribution)), branch_rel_median=contribution,
                             skip_out_change=skip_change, skip_loss_delta=loss, skip_loss_delta_se=loss_se))


def test_a_small_contribution_that_the_skip_test_contradicts_is_not_redundant():
    """The released Peri-LN decoder's numbers: contribution 0.0157 and 0.00712, skipping costs 5.19 and 15.7 nats."""
    b = _rows([0.0157, 0.00712, 0.3], [0.998, 0.9, 0.5], [5.19, 15.7, 0.4], [0.3, 0.8, 0.05])
    assert redundant_blocks(b) == []
    # the same contributions, with a skip test that agrees (head input barely moves, or a loss within noise)
    assert redundant_blocks(_rows([0.0157, 0.00712, 0.3], [0.005, 0.5, 0.5], [0.0, 0.01, 0.4],
                                  [0.01, 0.02, 0.05])) == [0, 1]
    # a large contribution is not redundant on a noisy loss alone (a random model's loss moves little)
    assert redundant_blocks(_rows([0.3], [0.2], [0.002], [0.0015])) == []
    # no skip test: no redundancy verdict at all
    assert redundant_blocks(pd.DataFrame(dict(layer=[0], branch_rel_median=[0.001]))) == []


def test_post_norm_block_with_dead_branches_but_live_norms_follows_its_skip_test(tmp_path, text):
    """Zero branches, affine norms: the verdict is whatever the skip test says, never the contribution alone."""
    mc = ModelConfig(scheme="post", depth=4, width=32, heads=4, max_seq_len=64)
    model = build_model(mc)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.blocks[2].attns[0].o.weight.zero_()
        model.blocks[2].ffns[0].down.weight.zero_()
        for norm in model.blocks[2].norms:
            norm.weight.copy_(1.0 + 0.3 * torch.randn(norm.weight.shape, generator=gen))
            norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=gen))
    d = diagnose(_save(tmp_path / "zero", mc, model), text=str(text), **FAST)
    row = d.table.set_index("layer").loc[2]
    assert row.branch_rel_median == 0.0
    within = abs(row.skip_loss_delta) <= 2 * row.skip_loss_delta_se
    by_skip = row.skip_out_change < THRESHOLDS["redundant_skip"][0] or within
    found = d.findings.set_index("id")
    if by_skip:
        assert "2" in found.loc["redundant_blocks", "layers"].split(",")
    else:
        assert "redundant_blocks" not in found.index
        assert found.loc["small_contribution", "severity"] == "info" and "matter" in found.loc["small_contribution", "message"]


def test_raw_readers_by_placement():
    from probes import locate
    for name, final, expect in (("pre", True, []), ("peri", True, []), ("post", False, [])):
        mc = ModelConfig(scheme=name, depth=3, width=16, heads=2, max_seq_len=16)
        assert raw_readers(locate(build_model(mc)), final) == expect, name
    mc = ModelConfig(scheme="pre", depth=3, width=16, heads=2, max_seq_len=16)
    assert raw_readers(locate(build_model(mc)), False) == ["head"]
    plain = nn.Module()
    plain.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    assert raw_readers(locate(plain), False) == ["unknown"]
    assert math.isfinite(GROWTH)


def _layers(name, placement, encoder, depth, peak, headroom, skip, verdict="HEALTHY", loss="lm"):
    """A synthetic atlas_layers table for one checkpoint: per-block columns from callables of l."""
    rows = [dict(checkpoint=name, placement=placement, encoder=encoder, depth=depth, verdict=verdict, loss=loss,
                 origin="released", scheme=placement,
                 layer=l, relative_depth=(l + 1) / depth, peak_ratio=peak(l), precision_headroom=headroom(l),
                 skip_loss_delta=skip(l)) for l in range(depth)]
    return pd.DataFrame(rows)


def test_cross_checkpoint_claims_decide_on_their_numbers():
    from analysis.diagnose.atlas import cross_claims
    layers = pd.concat([
        _layers("dec6", "pre", False, 6, lambda l: 900.0, lambda l: 100 - 10 * l, lambda l: 1.0 if l < 2 else 0.5),
        _layers("dec12", "pre", False, 12, lambda l: 3000.0, lambda l: 80 - 5 * l, lambda l: 1.0 if l < 4 else 0.2),
        _layers("dec24", "pre", False, 24, lambda l: 4000.0, lambda l: 60 - 2 * l, lambda l: 1.0 if l < 8 else 0.05),
        _layers("dec48", "pre", False, 48, lambda l: 5000.0, lambda l: 60 - l, lambda l: 1.0 if l < 16 else 0.01),
        _layers("enc", "post", True, 6, lambda l: 12.0, lambda l: 150.0, lambda l: float("nan"), loss="surrogate"),
    ], ignore_index=True)
    c = cross_claims(layers).set_index("claim")
    assert c.loc["massive_in_pre_decoders:released", "status"] == "holds"
    assert c.loc["headroom_falls_with_depth_pre", "status"] == "holds"
    assert c.loc["deep_skip_cheaper_with_depth:pre", "status"] == "holds"
    assert "ρ = -1.00 (one-sided p = 0.042" in c.loc["deep_skip_cheaper_with_depth:pre", "evidence"]
    three = cross_claims(layers[layers.checkpoint != "dec48"]).set_index("claim")  # 1 in 6 orderings by chance
    assert three.loc["deep_skip_cheaper_with_depth:pre", "status"] == "untested"
    assert c.loc["deep_skip_cheaper_with_depth:post", "status"] == "untested"  # one encoder, a surrogate loss
    # an encoder with massive activations breaks the first claim; a flat headroom breaks the second
    layers.loc[layers.checkpoint == "enc", "peak_ratio"] = 500.0
    layers.loc[layers.checkpoint == "dec6", "precision_headroom"] = 50.0
    c = cross_claims(layers).set_index("claim")
    assert c.loc["massive_in_pre_decoders:released", "status"] == "fails"
    assert "enc ×500" in c.loc["massive_in_pre_decoders:released", "evidence"]
    assert c.loc["headroom_falls_with_depth_pre", "status"] == "fails"
    # collapsed checkpoints and surrogate losses are left out of the skip-cost trend: too few depths
    layers.loc[layers.checkpoint.isin(["dec24", "dec48"]), "verdict"] = "COLLAPSED"
    assert cross_claims(layers).set_index("claim").loc["deep_skip_cheaper_with_depth:pre", "status"] == "untested"


def test_text_for_gives_one_checkpoint_its_own_text(tmp_path, text):
    from analysis.diagnose.atlas import collect
    mc = ModelConfig(scheme="pre", depth=2, width=16, heads=2, max_seq_len=32)
    a, b = (_save(tmp_path / n, mc, build_model(mc)) for n in ("a", "b"))
    prose = tmp_path / "prose.txt"
    prose.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    _, ckpts = collect([a, b], log=lambda m: None, texts={b: str(prose)}, text=str(text), sequences=4, seq_len=16,
                       grad_sequences=2, batch=4, skip_sequences=0, init_sequences=0)
    assert str(text) in ckpts.text[0] and str(prose) in ckpts.text[1]
    with pytest.raises(ValueError, match="not one of the checkpoints"):
        collect([a], texts={b: str(prose)}, text=str(text))
