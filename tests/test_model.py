"""Testbed: shapes and finiteness at many depths, MoE routing, determinism."""

import inspect
import sys

import pytest
import torch

from analysis.testbed.model import ModelConfig, MoE, build_model

SCHEMES = ["post", "pre", "span", "deepnorm", "b2t", "peri", "mixln", "lns"]


def forward_backward(cfg, seed=0):
    model = build_model(cfg, seed=seed)
    idx = torch.randint(0, 256, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(seed))
    logits, loss = model(idx, idx)
    loss.backward()
    return model, logits, loss


@pytest.mark.parametrize("depth", [1, 2, 64])
@pytest.mark.parametrize("name", SCHEMES)
def test_shapes_and_finite(name, depth):
    cfg = ModelConfig(scheme=name, depth=depth, width=16, heads=2, max_seq_len=8)
    model, logits, loss = forward_backward(cfg)
    assert logits.shape == (2, 8, 256)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert len(model.blocks) == depth
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["post", "pre", "span", "deepnorm"])
def test_depth_1024_without_recursion(name):
    cfg = ModelConfig(scheme=name, depth=1024, width=16, heads=2, max_seq_len=8)
    limit = sys.getrecursionlimit()
    # headroom far below 1024 frames: building or running must not recurse per block
    sys.setrecursionlimit(len(inspect.stack()) + 150)
    try:
        model, logits, loss = forward_backward(cfg)
    finally:
        sys.setrecursionlimit(limit)
    assert torch.isfinite(loss)
    assert len(model.blocks) == 1024
    assert torch.isfinite(model.tok_embed.weight.grad).all()


def test_moe_routes_exactly_top_k():
    cfg = ModelConfig(scheme="pre", depth=2, width=32, heads=4, max_seq_len=8, experts=4, top_k=2,
                      dtype="float64")
    model = build_model(cfg)
    moe = model.blocks[0].ffns[0]
    assert isinstance(moe, MoE)
    x = torch.randn(3, 8, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = moe(x)
    chosen = moe.last_topk
    assert chosen.shape == (24, 2)
    assert all(len(set(row.tolist())) == 2 for row in chosen)
    # the output is the renormalized softmax mix of exactly the chosen experts
    flat = x.reshape(-1, 32)
    probs = torch.softmax(flat @ moe.router.weight.T, -1)
    want = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        p = probs[t, chosen[t]]
        assert set(chosen[t].tolist()) == set(probs[t].topk(2).indices.tolist())
        for w, e in zip(p / p.sum(), chosen[t]):
            want[t] += w * moe.experts[int(e)](flat[t:t + 1])[0]
    torch.testing.assert_close(out.reshape(-1, 32), want)


def test_moe_aux_loss_finite_positive_and_in_the_loss():
    cfg = ModelConfig(scheme="span", depth=3, width=32, heads=4, max_seq_len=8, experts=4, top_k=1)
    model, _, loss = forward_backward(cfg)
    aux = model.aux_loss()
    assert torch.isfinite(aux) and aux.item() > 0
    # Switch loss E·Σ f_e P_e is 1 per layer under perfect balance and at most E
    assert 0 < aux.item() / 3 <= 4
    assert model.tok_embed.weight.grad is not None
    dense = build_model(ModelConfig(scheme="span", depth=3, width=32, heads=4, max_seq_len=8))
    assert dense.aux_loss().item() == 0


def test_fixed_seed_is_deterministic():
    cfg = ModelConfig(scheme="span", depth=4, width=32, heads=4, max_seq_len=8, experts=2, top_k=1)
    idx = torch.randint(0, 256, (2, 8))
    a, _ = build_model(cfg, seed=7)(idx)
    b, _ = build_model(cfg, seed=7)(idx)
    c, _ = build_model(cfg, seed=8)(idx)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_bfloat16_runs():
    cfg = ModelConfig(scheme="deepnorm", depth=4, width=32, heads=4, max_seq_len=8, dtype="bfloat16")
    model, logits, loss = forward_backward(cfg)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)


def test_build_draws_every_weight_once_and_never_on_another_device(monkeypatch):
    import torch.nn as nn
    drawn = []
    real = nn.init.normal_

    def counting(tensor, *a, **kw):
        if tensor.device.type != "meta":  # the model is built without storage first
            drawn.append(tuple(tensor.shape))
        return real(tensor, *a, **kw)

    monkeypatch.setattr(nn.init, "normal_", counting)
    model = build_model(ModelConfig(scheme="span", depth=3, width=32, heads=4, experts=2, top_k=1))
    matrices = [tuple(p.shape) for p in model.parameters() if p.dim() == 2]
    assert sorted(drawn) == sorted(matrices)  # one draw per weight matrix, none on the CPU first


def test_tied_embeddings_and_dropout_as_in_nanogpt():
    cfg = ModelConfig(scheme="pre", depth=2, width=32, heads=4, max_seq_len=16, tie_embeddings=True,
                      dropout=0.2)
    model = build_model(cfg)
    assert model.head.weight is model.tok_embed.weight
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in build_model(ModelConfig(scheme="pre", depth=2, width=32, heads=4,
                                                   max_seq_len=16)).parameters()) - 256 * 32
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    assert model(x, x)[1].item() != model(x, x)[1].item()  # dropout draws anew
    model.eval()
    assert model(x, x)[1].item() == model(x, x)[1].item()
    _, loss = model(x, x)
    loss.backward()
    assert model.tok_embed.weight.grad is not None  # the head's gradient lands on the embedding
    with pytest.raises(ValueError, match="dropout must be in"):
        ModelConfig(dropout=1.0)
