"""Placement and branch norms: testbed schemes (structure vs forward check) and Hugging Face families."""

import pytest
import torch

from analysis.testbed.model import ModelConfig, build_model
from probes import PLACEMENTS, confirm_placement, locate
from theory.schemes import SCHEMES, block_structure, get_scheme

# scheme: expected placement (depth 4, so Mix-LN has one post block and three pre blocks)
TESTBED = {"pre": "pre", "post": "post", "peri": "peri", "span": "post", "deepnorm": "post",
           "b2t": "post", "mixln": "other", "lns": "pre"}


# From the schemes' formulas (README, Schemes), norms numbered in call order: (pre-branch, post-branch)
# of an inner block. pre: N0 feeds A, N1 feeds F; peri: N0 → A → N1 added, N2 → F → N3 added; span:
# N0, N1 feed A, F and N2 is the output norm; post/deepnorm/b2t: every norm is on the stream.
BY_FORMULA = {"pre": ((0, 1), ()), "lns": ((0, 1), ()), "peri": ((0, 2), (1, 3)), "span": ((0, 1), ()),
              "post": ((), ()), "deepnorm": ((), ()), "b2t": ((), ())}


def test_block_structure_branch_norms_follow_the_formulas():
    for name, (pre, post) in BY_FORMULA.items():
        s = get_scheme(name)
        b = block_structure(s, 2, 4, {k: float(v) for k, v in s.resolve(4).items()})
        assert (b.pre_branch_norms, b.post_branch_norms) == (pre, post), name


@pytest.mark.parametrize("name", list(TESTBED))
def test_testbed_placement_matches_structure(name):
    assert set(TESTBED) <= set(SCHEMES)
    L = 4
    model = build_model(ModelConfig(scheme=name, depth=L, width=32, heads=4, max_seq_len=16))
    layout = locate(model)
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    checked = confirm_placement(model, layout, idx)
    assert layout.placement == checked.placement == TESTBED[name]
    assert "forward check: " + TESTBED[name] in checked.notes[-1]
    assert not any("differ" in n for n in checked.notes)  # the forward fit agrees with the trace
    s = get_scheme(name)
    params = {k: float(v) for k, v in s.resolve(L).items()}
    for i, p in enumerate(layout.blocks):
        b = block_structure(s, i + 1, L, params)
        pre, post = b.pre_branch_norms, b.post_branch_norms
        assert layout.pre_branch_norms[i] == tuple(f"{p}.norms.{k}" for k in pre)
        assert layout.post_branch_norms[i] == tuple(f"{p}.norms.{k}" for k in post)
    assert PLACEMENTS[checked.placement] in checked.describe()
    # the probe's point names do not depend on the branch norms
    assert checked.points() == layout.points()


def test_generic_model_branch_norms_from_forward_only():
    """A model the structure knows nothing of: the forward check alone finds peri blocks."""
    from torch import nn

    class Sandwich(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.n1, self.n2, self.n3, self.n4 = (nn.LayerNorm(d) for _ in range(4))
            self.f, self.g = nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, x):
            h = x + self.n2(self.f(self.n1(x)))
            return h + self.n4(self.g(self.n3(h)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList(Sandwich(16) for _ in range(3))

        def forward(self, x):
            for b in self.stack:
                x = b(x)
            return x

    torch.manual_seed(0)
    net = Net()
    layout = locate(net)
    assert layout.placement == "unknown" and layout.branch_norms() == ()
    checked = confirm_placement(net, layout, torch.randn(2, 6, 16))
    assert checked.placement == "peri" and checked.branch_norms() == ("both",) * 3
    assert checked.pre_branch_norms[0] == ("stack.0.n1", "stack.0.n3")
    assert checked.post_branch_norms[0] == ("stack.0.n2", "stack.0.n4")


transformers = pytest.importorskip(
    "transformers", reason="Hugging Face tests need transformers (pip install -e .[hf])")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99)
# name: (model class, config class, extra config, placement, block 0's pre-branch and post-branch norm names)
HF = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=32,
                                                   bos_token_id=0, eos_token_id=0), "pre", ("ln_1", "ln_2"), ()),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(SMALL, num_key_value_heads=2), "pre",
              ("input_layernorm", "post_attention_layernorm"), ()),
    "bert": ("BertForMaskedLM", "BertConfig", dict(SMALL, max_position_embeddings=32), "post", (), ()),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(SMALL, num_key_value_heads=2, head_dim=8), "peri",
               ("input_layernorm", "pre_feedforward_layernorm"),
               ("post_attention_layernorm", "post_feedforward_layernorm")),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(SMALL, num_key_value_heads=2, head_dim=8), "peri",
               ("input_layernorm", "pre_feedforward_layernorm"),
               ("post_attention_layernorm", "post_feedforward_layernorm")),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", dict(SMALL, num_key_value_heads=2, pad_token_id=0, eos_token_id=0),
              "post-branch", (), ("post_attention_layernorm", "post_feedforward_layernorm")),
    "glm4": ("Glm4ForCausalLM", "Glm4Config", dict(SMALL, num_key_value_heads=2, head_dim=8, pad_token_id=0), "peri",
             ("input_layernorm", "post_attention_layernorm"), ("post_self_attn_layernorm", "post_mlp_layernorm")),
}


@pytest.mark.parametrize("name", list(HF))
def test_hf_family_placement(name):
    cls_name, cfg_name, cfg, placement, pre0, post0 = HF[name]
    if not hasattr(transformers, cls_name):
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**cfg)).eval()
    layout = locate(model)
    assert layout.placement == placement  # from the structure (module names)
    idx = torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(1))
    checked = confirm_placement(model, layout, input_ids=idx)
    assert checked.placement == placement
    assert not any("differ" in n for n in checked.notes)  # the forward fit agrees with the names
    block0 = checked.blocks[0]
    assert checked.pre_branch_norms[0] == tuple(f"{block0}.{n}" for n in pre0)
    assert checked.post_branch_norms[0] == tuple(f"{block0}.{n}" for n in post0)
    # the forward check alone (structure withheld) finds the same
    import dataclasses
    blind = dataclasses.replace(layout, placement="unknown", output_norms=(None,) * len(layout.blocks),
                                pre_branch_norms=(), post_branch_norms=())
    measured = confirm_placement(model, blind, input_ids=idx)
    assert measured.placement == placement
    if placement != "post":
        assert (measured.pre_branch_norms, measured.post_branch_norms) == \
            (checked.pre_branch_norms, checked.post_branch_norms)
