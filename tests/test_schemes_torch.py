"""Each scheme's torch block against its formula, computed here step by step with plain ops."""

import math

import pytest
import torch

from analysis.testbed.model import ModelConfig, build_model
from theory.schemes import SCHEMES, get_scheme, scheme

WIDTH, HEADS, T, L = 64, 4, 12, 8


def ref_norm(x, mod, kind):
    eps = 1e-5
    if kind == "layernorm":
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * mod.weight + mod.bias
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps) * mod.weight


def ref_attn(x, m):
    B, T_, D = x.shape
    dh = D // HEADS

    def split(w):
        return (x @ w.T).view(B, T_, HEADS, dh).transpose(1, 2)

    q, k, v = split(m.q.weight), split(m.k.weight), split(m.v.weight)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    mask = torch.ones(T_, T_, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.softmax(scores, -1) @ v
    return y.transpose(1, 2).reshape(B, T_, D) @ m.o.weight.T


def ref_mlp(x, m, kind):
    u = x @ m.up.weight.T
    if kind == "swiglu":
        g = x @ m.gate.weight.T
        h = g * torch.sigmoid(g) * u
    elif kind == "gelu":
        h = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
    else:
        h = torch.clamp(u, min=0)
    return h @ m.down.weight.T


def block_formula(name, blk, x, l, kind_norm, kind_ffn):
    """DESIGN.md's table, written out by hand (norm k = the k-th norm the formula reaches)."""
    def N(i, v):
        return ref_norm(v, blk.norms[i], kind_norm)

    def A(i, v):
        return ref_attn(v, blk.attns[i])

    def Fn(i, v):
        return ref_mlp(v, blk.ffns[i], kind_ffn)

    if name == "post" or (name == "mixln" and l <= L // 4):
        h = N(0, x + A(0, x))
        return N(1, h + Fn(0, h))
    if name in ("pre", "mixln"):
        h = x + A(0, N(0, x))
        return h + Fn(0, N(1, h))
    if name == "span":
        a = A(0, N(0, x))
        f = Fn(0, N(1, x + a))
        return N(2, 1.0 * x + a + f)
    if name == "deepnorm":
        alpha = (2 * L) ** 0.25
        h = N(0, alpha * x + A(0, x))
        return N(1, alpha * h + Fn(0, h))
    if name == "b2t":
        h = N(0, x + A(0, x))
        return N(1, h + Fn(0, h) + x)
    if name == "peri":
        h = x + N(1, A(0, N(0, x)))
        return h + N(3, Fn(0, N(2, h)))
    if name == "lns":
        h = x + A(0, N(0, x) / math.sqrt(l))
        return h + Fn(0, N(1, h) / math.sqrt(l))
    raise AssertionError(name)


def expected_gains(name):
    """Init gain per linear layer name, from DESIGN.md's table (not from the code)."""
    if name == "deepnorm":
        b = (8 * L) ** -0.25
        return {"q": 1, "k": 1, "v": b, "o": b, "up": b, "gate": b, "down": b}
    if name == "span":
        b = (2 * L) ** -0.5
        return {"q": 1, "k": 1, "v": 1, "o": b, "up": 1, "gate": 1, "down": b}
    return {"q": 1, "k": 1, "v": 1, "o": 1, "up": 1, "gate": 1, "down": 1}


def randomize_norms(model):
    # identity affines would hide a norm applied at the wrong place
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            with torch.no_grad():
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=g))


BUILTIN = ["post", "pre", "span", "deepnorm", "b2t", "peri", "mixln", "lns"]


@pytest.mark.parametrize("norm,ffn", [("layernorm", "gelu"), ("rmsnorm", "swiglu"), ("layernorm", "relu")])
@pytest.mark.parametrize("name", BUILTIN)
def test_block_equals_formula(name, norm, ffn):
    cfg = ModelConfig(scheme=name, depth=L, width=WIDTH, heads=HEADS, max_seq_len=T, norm=norm,
                      ffn=ffn, dtype="float64")
    model = build_model(cfg, seed=0)
    randomize_norms(model)
    x = torch.randn(2, T, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for l in (1, 2, 3, L):  # mixln switches from post to pre after block ⌊L/4⌋ = 2
        blk = model.blocks[l - 1]
        got = blk(x)
        want = block_formula(name, blk, x, l, norm, ffn)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", BUILTIN)
def test_init_scalings(name):
    cfg = ModelConfig(scheme=name, depth=L, width=WIDTH, heads=HEADS, max_seq_len=T, sigma=1.3,
                      ffn="swiglu")
    model = build_model(cfg, seed=0)
    gains = expected_gains(name)
    for mod_name, p in model.blocks.named_parameters():
        kind = mod_name.split(".")[-2]
        if kind not in gains:
            continue
        want = gains[kind] * 1.3 / math.sqrt(p.shape[1])
        # std of ≥ 4096 Gaussian draws: relative standard error ≈ 1.1%
        assert p.std().item() == pytest.approx(want, rel=0.05), mod_name


def test_final_norm_only_where_the_scheme_has_one():
    for name in BUILTIN:
        model = build_model(ModelConfig(scheme=name, depth=2, width=16, heads=2, max_seq_len=8))
        has = not isinstance(model.final_norm, torch.nn.Identity)
        assert has == SCHEMES[name].final_norm
    assert SCHEMES["pre"].final_norm and not SCHEMES["post"].final_norm


@pytest.fixture
def user_scheme():
    """A user's own scheme (span_alt without ScaleInit), registered for one test."""
    @scheme("user_span_alt", formula="a = A(N(x)); f = F(N(x + a)); y = x + N(a + f)",
            source="alternative reading of arXiv 2601.22580", final_norm=True)
    def block(x, op, *, l, L):
        a = op.attn(op.norm(x))
        f = op.ffn(op.norm(x + a))
        return x + op.norm(a + f)
    yield get_scheme("user_span_alt")
    del SCHEMES["user_span_alt"]


def test_user_registered_scheme(user_scheme):
    model = build_model(ModelConfig(scheme="user_span_alt", depth=3, width=WIDTH, heads=HEADS,
                                    max_seq_len=T, dtype="float64"))
    randomize_norms(model)
    blk = model.blocks[0]
    x = torch.randn(2, T, WIDTH, dtype=torch.float64)
    a = ref_attn(ref_norm(x, blk.norms[0], "layernorm"), blk.attns[0])
    f = ref_mlp(ref_norm(x + a, blk.norms[1], "layernorm"), blk.ffns[0], "gelu")
    want = x + ref_norm(a + f, blk.norms[2], "layernorm")
    torch.testing.assert_close(blk(x), want, atol=1e-5, rtol=0)
    assert blk.output_norm is None and not isinstance(model.final_norm, torch.nn.Identity)


def test_output_norm_is_the_last_norm_of_normalized_outputs():
    for name, index in [("post", 1), ("span", 2), ("deepnorm", 1), ("b2t", 1), ("pre", None), ("peri", None)]:
        blk = build_model(ModelConfig(scheme=name, depth=2, width=16, heads=2, max_seq_len=8)).blocks[0]
        assert blk.structure.output_norm == index, name
