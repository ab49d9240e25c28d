"""Hugging Face families built from tiny configs (no download), saved, reloaded, located and probed."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face tests need transformers (pip install -e .[hf])")

from probes import Probe, confirm_placement, locate  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=99)

# name: (model class, config, structural placement, block list, final norm, output norm of block 0)
CASES = {
    "bert": ("BertForMaskedLM", lambda t: t.BertConfig(**SMALL, max_position_embeddings=32), "post",
             "bert.encoder.layer", None, "bert.encoder.layer.0.output.LayerNorm"),
    "roberta": ("RobertaModel", lambda t: t.RobertaConfig(**SMALL, max_position_embeddings=40), "post",
                "encoder.layer", None, "encoder.layer.0.output.LayerNorm"),
    "gpt2": ("GPT2LMHeadModel", lambda t: t.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=99,
                                                        n_positions=32, bos_token_id=0, eos_token_id=0),
             "pre", "transformer.h", "transformer.ln_f", None),
    "gpt_neox": ("GPTNeoXForCausalLM", lambda t: t.GPTNeoXConfig(**SMALL), "pre", "gpt_neox.layers",
                 "gpt_neox.final_layer_norm", None),
    "llama": ("LlamaForCausalLM", lambda t: t.LlamaConfig(**SMALL, num_key_value_heads=2), "pre",
              "model.layers", "model.norm", None),
    "mistral": ("MistralForCausalLM", lambda t: t.MistralConfig(**SMALL, num_key_value_heads=2), "pre",
                "model.layers", "model.norm", None),
    "qwen2": ("Qwen2ForCausalLM", lambda t: t.Qwen2Config(**SMALL, num_key_value_heads=2), "pre",
              "model.layers", "model.norm", None),
}


def _reloaded(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cls_name, make_config, *_ = CASES[name]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    cls(make_config(transformers)).save_pretrained(tmp_path)
    return cls.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", list(CASES))
def test_locate_and_probe_reloaded_hf_model(name, tmp_path, monkeypatch):
    model = _reloaded(name, tmp_path, monkeypatch)
    _, _, placement, block_list, final, norm0 = CASES[name]
    layout = locate(model)
    assert layout.blocks == tuple(f"{block_list}.{i}" for i in range(3))
    assert layout.placement == placement
    assert layout.final == final and layout.output_norms[0] == norm0
    idx = torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(1))
    checked = confirm_placement(model, layout, input_ids=idx)
    assert checked.checked and checked.placement == placement

    seen = []  # the direct route: the input of block 0's output norm, for post-norm families
    handle = model.get_submodule(norm0).register_forward_hook(
        lambda mod, args, out: seen.append(args[0].detach())) if norm0 else None
    with Probe(model) as p:
        for _ in range(2):
            out = model(input_ids=idx, output_hidden_states=True)
            out.logits.float().square().mean().backward() if hasattr(out, "logits") else \
                out.last_hidden_state.square().mean().backward()
    if handle:
        handle.remove()
    df = p.frame()
    assert set(df["point"]) == set(layout.points())
    assert (df["count"] == 2).all()
    assert (df.loc[df.metric == "grad_second_moment", "mean"] > 0).all()
    sm = df[df.metric == "second_moment"].set_index("point")["mean"]
    hidden = out.hidden_states  # HF's own per-layer states: embed, then each block's output
    assert sm["embed"] == pytest.approx(hidden[0].square().mean().item(), rel=1e-5)
    for i in range(2):  # the last entry is after the final norm in some families
        assert sm[f"blocks.{i}.resid_post"] == pytest.approx(hidden[i + 1].square().mean().item(), rel=1e-5)
    if placement == "post":  # LayerNorm at init (γ=1, β=0): the stream has unit second moment
        for i in range(3):
            assert sm[f"blocks.{i}.resid_post"] == pytest.approx(1.0, abs=1e-3)
        direct = np.mean([t.square().mean().item() for t in seen])
        assert sm["blocks.0.pre_norm_sum"] == pytest.approx(direct, rel=1e-5)
        assert sm["blocks.0.pre_norm_sum"] != pytest.approx(1.0, abs=1e-4)  # not yet normalized
    else:
        assert not any("pre_norm_sum" in n for n in sm.index)


def test_generic_fallback_finds_hf_blocks_when_names_are_unknown(tmp_path, monkeypatch):
    model = _reloaded("gpt2", tmp_path, monkeypatch)
    inner = model.transformer
    inner.blocks_renamed = inner.h  # the same ModuleList under a name the known list lacks
    del inner.h
    layout = locate(model)
    assert "generic" in layout.how and len(layout.blocks) == 3
    assert np.all([b.startswith("transformer.blocks_renamed.") for b in layout.blocks])
