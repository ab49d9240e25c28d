"""The MoE's three dispatches compute one mixture, and the compiled ones have no graph break."""

import pytest
import torch

from analysis.testbed.model import MoE, ModelConfig, build_model


def _moe(ffn: str, width: int, dtype=torch.float32) -> MoE:
    torch.manual_seed(0)
    cfg = ModelConfig(scheme="pre", depth=2, width=width, heads=4, experts=4, top_k=2, ffn=ffn,
                      max_seq_len=16)
    return MoE(cfg).to(dtype)


def _run(moe: MoE, dispatch: str, x: torch.Tensor):
    moe.dispatch = dispatch
    moe.zero_grad()
    x = x.clone().requires_grad_()
    y = moe(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach().float(), x.grad.float(), moe.experts[1].down.weight.grad.float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("ffn,width", [("gelu", 32), ("relu", 32), ("swiglu", 48)])
def test_dense_is_exact_and_grouped_is_within_bf16_rounding(ffn, width):
    moe = _moe(ffn, width, torch.float64)
    x = torch.randn(3, 16, width, dtype=torch.float64)
    loop = _run(moe, "loop", x)
    for a, b in zip(_run(moe, "dense", x), loop):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(_run(moe.float(), "grouped", x.float()), loop):
        assert _rel(a, b) < 0.02  # bf16 has 8 bits of mantissa: ~0.4 % per rounding


def test_auto_dispatch_picks_grouped_for_bf16_and_loop_in_float32():
    moe = _moe("gelu", 32)
    flat = torch.randn(8, 32)
    assert moe.choose_dispatch(flat) == "loop"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe.choose_dispatch(flat) == "grouped"
    odd = _moe("swiglu", 32)  # hidden ⌈8·32/3⌉ = 86: not a grouped GEMM's multiple of 8
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert odd.choose_dispatch(flat) == "loop"


@pytest.mark.parametrize("autocast", [False, True], ids=["float32-dense", "bf16-grouped"])
def test_moe_testbed_compiles_as_one_graph_forward_and_backward(autocast):
    model = build_model(ModelConfig(scheme="span", depth=3, width=32, heads=4, experts=4, top_k=2,
                                    max_seq_len=16))
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.compiler.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break raises
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, loss = compiled(x, x)
        _, eager = model(x, x)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None for p in model.blocks[0].ffns[0].experts.parameters())
    torch.compiler.reset()
