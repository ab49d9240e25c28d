"""diagnose's passes: the stream without logits, the chunked loss, sampled skip positions, memory refusals."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import analysis.checkpoints as loading
from analysis.diagnose import memory, passes as passes_mod
from analysis.diagnose.diagnosis import diagnose
from analysis.diagnose.measure import grad_on_stream
from analysis.diagnose.passes import Passes
from analysis.testbed.model import ModelConfig, build_model
from analysis.training.train import save_atomic
from probes import locate


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    import transformers
    folder = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, vocab_size=300)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y = [1, 2]\n" * 300)
    return path


def _windows(vocab: int, n: int = 4, T: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (n, T + 1), generator=torch.Generator().manual_seed(1))


def _stream_grad(loaded, model, w, chunked: bool) -> tuple[float, torch.Tensor]:
    """(loss, ∂loss/∂(block 0's input)) by the chunked passes or by the whole model's own loss."""
    for p in model.parameters():
        p.requires_grad_(False)
    seen = []
    block0 = model.get_submodule(locate(model).blocks[0])
    hook = grad_on_stream(block0)
    keep = block0.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]),
                                            with_kwargs=True)
    try:
        if chunked:
            loss = Passes.of(loaded, model, w[:1, :-1]).loss_backward(w, torch.Generator())
        else:
            x, y = w[:, :-1], w[:, 1:]
            logits = model(x)[0] if loaded.scheme else model(input_ids=x).logits
            out = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            out.backward()
            loss = float(out.detach())
    finally:
        hook.remove()
        keep.remove()
    return loss, seen[-1].grad.clone()  # the last forward: Passes.of checks its split on one first


@pytest.mark.parametrize("kind", ["testbed", "hf"])
def test_chunked_loss_gives_the_whole_models_loss_and_stream_gradient(gpt2, monkeypatch, kind):
    if kind == "testbed":
        mc = ModelConfig(scheme="pre", depth=3, width=32, heads=4, max_seq_len=64, vocab=300)
        loaded = loading.Loaded(model=build_model(mc), kind="sigprop", description="", vocab_size=300, max_len=64,
                                loss_kind="lm", scheme="pre")
        make = lambda: build_model(mc)  # noqa: E731
    else:
        loaded = loading.load(gpt2)
        make = lambda: loading.load(gpt2).model  # noqa: E731
    w = _windows(300)
    whole = _stream_grad(loaded, make(), w, chunked=False)
    monkeypatch.setattr(passes_mod, "CHUNK_BYTES", 4 * 4 * 300 * 5)  # 5 positions a chunk: several chunks
    chunked = _stream_grad(loaded, make(), w, chunked=True)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-5)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-4, atol=1e-7)


def test_stream_pass_computes_no_logits(gpt2):
    loaded = loading.load(gpt2)
    calls = []
    loaded.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    p = Passes.of(loaded, loaded.model, _windows(300)[:1, :-1])
    calls.clear()
    with torch.no_grad():
        p.stream(_windows(300))
    assert calls == []


def test_sampled_positions_are_a_subset_of_the_full_loss(gpt2):
    loaded = loading.load(gpt2)
    p = Passes.of(loaded, loaded.model, _windows(300)[:1, :-1])
    w = _windows(300, n=3, T=40)
    with torch.no_grad():
        full = p.sequence_losses(w, 0)
        logits = loaded.model(input_ids=w[:, :-1]).logits
        per_pos = F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")
        sampled = p.sequence_losses(w, 8)
        again = p.sequence_losses(w, 8)
    torch.testing.assert_close(full, per_pos.mean(1))
    torch.testing.assert_close(sampled, again)  # the same sample for the baseline and every skip
    for s in range(3):  # each sequence's loss is a mean of 8 of its own positions' losses
        pick = p._positions(w, 8)[s]
        assert len(set(pick.tolist())) == 8
        assert sampled[s].item() == pytest.approx(per_pos[s, pick].mean().item(), rel=1e-5)


def test_a_model_whose_logits_are_not_its_head_falls_back_to_the_whole_model(gpt2):
    loaded = loading.load(gpt2)
    loaded.model.register_forward_hook(lambda m, a, out: out.__setitem__("logits", out["logits"] * 2.0) or out)
    p = Passes.of(loaded, loaded.model, _windows(300)[:1, :-1])
    assert p.trunk is None and "not its head applied" in p.note


def test_a_diagnosis_that_does_not_fit_is_refused_before_loading(gpt2, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 10**8)
    with pytest.raises(ValueError, match=r"would need about .* GB .* but 0.10 GB of memory is available"):
        diagnose(str(gpt2), sequences=2, seq_len=16)
    shape = memory.Shape(parameters=1_543_714_304, depth=28, width=1536, ffn=8960, vocab=151_936)
    assert memory.backward_batch(shape, 256, "float32", 8) == 1  # 1.4 GB a sequence: one at a time
    assert memory.backward_batch(shape, 64, "float32", 8) == 2
    assert memory.need(shape, "bfloat16", 8, 256, gguf=False).weights == 2 * shape.parameters


def test_bfloat16_halves_the_weights_and_says_so(tmp_path, text):
    mc = ModelConfig(scheme="pre", depth=2, width=32, heads=4, max_seq_len=64)
    folder = tmp_path / "run"
    folder.mkdir()
    save_atomic({"model": build_model(mc).state_dict(), "model_config": mc.to_dict()}, folder / "checkpoint.pt")
    assert loading.load(folder, dtype=torch.bfloat16).model.tok_embed.weight.dtype == torch.bfloat16
    d = diagnose(str(folder), text=str(text), sequences=4, seq_len=16, grad_sequences=2, batch=2,
                 skip_sequences=2, init_sequences=2, dtype="bfloat16")
    assert d.meta["dtype"] == "bfloat16" and any("bfloat16" in n and "half the memory" in n for n in d.notes)
    assert d.table["second_moment"].notna().all() and math.isfinite(d.meta["loss_value"])
    with pytest.raises(ValueError, match="--dtype must be one of"):
        diagnose(str(folder), text=str(text), dtype="float16")


def test_gguf_metadata_is_parsed_once(tmp_path, monkeypatch):
    """transformers reads a GGUF three times (config, weights, tokenizer): one parse serves them all."""
    gguf = pytest.importorskip("gguf")
    from analysis.checkpoints.gguf import _one_reader
    made = []

    class Reader:
        def __init__(self, path, *a, **k):
            made.append(path)
    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    with _one_reader(gguf):
        first = gguf.GGUFReader(Path("/x.gguf"))
        assert gguf.GGUFReader("/x.gguf") is first and gguf.GGUFReader("/y.gguf") is not first
    assert made == [Path("/x.gguf"), "/y.gguf"] and gguf.GGUFReader is Reader
