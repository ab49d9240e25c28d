"""`diagnose` on GGUF files (llama.cpp / ollama): tiny LLaMA files written with gguf's own writer load
back with the reference model's weights; quantization is reported; bad input is one line."""

import builtins
import re
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import numpy as np  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

import analysis.checkpoints as loading  # noqa: E402
from analysis.checkpoints import guards  # noqa: E402
from analysis.diagnose.diagnosis import diagnose  # noqa: E402

Q = gguf.GGMLQuantizationType
LAYERS, WIDTH, HEADS, FFN = 2, 32, 4, 64
# a byte-level BPE vocabulary: the 256 byte symbols, four merges and an end-of-text token
BYTES = list(bytes_to_unicode().values())
MERGES = ["Ġ Ġ", "ĠĠ ĠĠ", "r e", "Ġ re"]
TOKENS = BYTES + [m.replace(" ", "") for m in MERGES] + ["<|endoftext|>"]
VOCAB = len(TOKENS)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y = [1, 2]\n" * 40)
    return path


def _reference() -> "transformers.LlamaForCausalLM":
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FFN,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=HEADS, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a wrong mapping would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of the q/k rows (rotary halves interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(path: Path, model, weights: Q = Q.F32, arch: str = "llama", tokenizer: bool = True,
           split_max_tensors: int = 0) -> Path:
    """``model`` as llama.cpp would write it: 2-D weights in ``weights``, norms in F32; split into
    PATH-0000i-of-0000n.gguf files of at most ``split_max_tensors`` tensors if that is > 0."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(TOKENS)
        w.add_token_types([1] * (VOCAB - 1) + [3])  # 3: control
        w.add_token_merges(MERGES)
        w.add_bos_token_id(VOCAB - 1)
        w.add_eos_token_id(VOCAB - 1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        a = t.detach().float().numpy()
        if ".attn_q." in name or ".attn_k." in name:
            a = _permute(a, cfg.num_attention_heads)
        if a.ndim == 1 or weights == Q.F32:
            w.add_tensor(name, a.astype(np.float32))
        elif weights == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, weights), raw_dtype=weights)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    ref = _reference()
    return ref, {q: _write(d / f"tiny-{q.name}.gguf", ref, q) for q in (Q.F32, Q.F16, Q.Q8_0)}


IDS = torch.tensor([[1, 5, 17, 42, 99, 200, 255, 7, 3, 60]])


def test_gguf_loads_the_reference_weights_and_its_tokenizer(files):
    ref, paths = files
    with torch.no_grad():
        want = ref(IDS).logits
        for q, tol in ((Q.F32, 1e-5), (Q.F16, 2e-2), (Q.Q8_0, 5e-2)):
            got = loading.load(paths[q])
            assert got.kind == "gguf" and got.loss_kind == "lm" and got.vocab_size == VOCAB
            assert got.nbytes == 4 * sum(p.numel() for p in ref.parameters())  # float32 size, not file
            assert all(p.dtype == torch.float32 for p in got.model.parameters())
            err = (got.model(IDS).logits - want).abs().max().item()
            assert err < tol, (q.name, err)
            quant = "F32 (all tensors)" if q == Q.F32 else f"{q.name} (all 2-D weights), F32 (all 1-D: norms)"
            how = "read as float32" if q == Q.F32 else "dequantized to float32"
            assert f"{how} from {quant}" in got.description, got.description
            assert any(f"{how} from GGUF {quant}" in n and "dequantized in" in n for n in got.notes), got.notes
    # the tokenizer is the file's own byte-level BPE: merges applied, text round-trips
    assert got.tokenizer.endswith(paths[Q.Q8_0].name) and got.encode is not None
    ids = got.encode("    return re")
    assert TOKENS.index("ĠĠ") in ids and TOKENS.index("Ġre") in ids
    assert got.decode(ids) == "    return re"
    # the re-initialized twin: same architecture, the family's own initializer
    twin = got.rebuild()
    assert type(twin) is type(got.model) and twin.config.num_hidden_layers == LAYERS
    assert not torch.equal(twin.lm_head.weight, got.model.lm_head.weight)


def test_diagnose_gguf_end_to_end(files, text, tmp_path):
    _, paths = files
    d = diagnose(str(paths[Q.Q8_0]), text=str(text), sequences=4, seq_len=16, grad_sequences=2,
                 batch=2, skip_sequences=2, init_sequences=4)
    assert d.meta["kind"] == "gguf" and d.meta["placement"] == "pre" and d.meta["blocks"] == LAYERS
    assert "dequantized to float32 from Q8_0" in d.meta["model"]
    assert any("dequantized in" in n for n in d.notes)
    assert any(c.startswith("init_") for c in d.table.columns)  # the re-initialized twin ran
    assert f"tokenized by TokenizersBackend from {paths[Q.Q8_0]}" in d.meta["text"], d.meta["text"]


def test_gguf_without_a_tokenizer_falls_back_to_bytes(files, tmp_path):
    ref, _ = files
    got = loading.load(_write(tmp_path / "notok.gguf", ref, Q.F16, tokenizer=False))
    assert got.tokenizer == "bytes" and got.encode is None
    assert any("tokenizer did not load" in n and "using bytes" in n for n in got.notes), got.notes


def _one_line(path, **kw) -> str:
    with pytest.raises(ValueError) as e:
        loading.load(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_gguf_is_refused_with_one_line(cli_error, files, tmp_path, text, capsys, monkeypatch):
    ref, paths = files
    out = ["--out", str(tmp_path / "o"), "--text", str(text), "--sequences", "2", "--seq-len", "16"]
    # an architecture the loader does not know: named, with the ones it does
    odd = _write(tmp_path / "odd.gguf", ref, Q.F16, arch="tinyllama-x")
    msg = _one_line(odd)
    assert "'tinyllama-x' is not supported" in msg and "llama" in msg and "qwen2" in msg
    assert "not supported" in cli_error(["diagnose", str(odd), *out])
    # truncated: the header is fine, the tensor data is cut
    cut = tmp_path / "cut.gguf"
    whole = paths[Q.F16].stat().st_size
    cut.write_bytes(paths[Q.F16].read_bytes()[:-1000])
    m = re.search(r"truncated: its header promises (\d+) bytes, up to the end of tensor \S+, but the "
                  r"file holds (\d+), (\d+) short", _one_line(cut))
    assert m and whole - 32 < int(m[1]) <= whole and int(m[2]) == whole - 1000, m  # 32: alignment
    assert int(m[3]) == int(m[1]) - int(m[2])
    assert "truncated" in cli_error(["diagnose", str(cut), *out])
    # cut inside the header, and not a GGUF at all
    head = tmp_path / "head.gguf"
    head.write_bytes(paths[Q.F16].read_bytes()[:300])
    assert "not a readable GGUF file" in _one_line(head)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is a text file, not a model" * 4)
    assert "magic" in _one_line(junk)
    # a GGUF under another name is still read as one, not refused as a pickle
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(cut.read_bytes())
    assert "truncated" in _one_line(renamed)
    # a quantization type gguf-py cannot dequantize (Q8_1: llama.cpp's activation type)
    q81 = tmp_path / "q81.gguf"
    w = gguf.GGUFWriter(str(q81), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, gguf.GGML_QUANT_SIZES[Q.Q8_1][1]), np.uint8), raw_dtype=Q.Q8_1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert "quantization type Q8_1" in _one_line(q81)
    # the memory guard counts the dequantized float32 size, not the (half-size) F16 file
    f32 = 4 * sum(p.numel() for p in ref.parameters())
    size = paths[Q.F16].stat().st_size
    assert size < 0.6 * f32
    monkeypatch.setattr(guards, "available_memory", lambda: int((size + f32) / 2 / guards.MEMORY_FRACTION))
    assert "dequantized to float32" in _one_line(paths[Q.F16])
    monkeypatch.undo()
    # the extra missing: one line naming it
    real_import = builtins.__import__

    def no_gguf(name, *a, **k):
        if name == "gguf" or name.startswith("gguf."):
            raise ImportError("No module named 'gguf'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    assert "pip install -e .[gguf]" in _one_line(paths[Q.F16])
    assert "pip install -e .[gguf]" in cli_error(["diagnose", str(paths[Q.F16]), *out])


def test_split_gguf_is_refused_naming_its_parts(cli_error, files, tmp_path):
    ref, paths = files
    split = tmp_path / "split"
    split.mkdir()
    _write(split / "tiny.gguf", ref, Q.F16, split_max_tensors=8)  # 21 tensors: three parts
    parts = sorted(split.iterdir())
    assert [p.name for p in parts] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    first = parts[0]
    for i, part in enumerate(parts, 1):
        msg = _one_line(part)
        assert msg.startswith(f"{part} is part {i} of 3 of a split GGUF model"), msg
        assert "reads single-file GGUFs only" in msg
        assert f"llama-gguf-split --merge {first} merged.gguf" in msg
    # renamed, the metadata still tells (split.no, split.count, split.tensors.count); the later parts
    # carry no architecture, so the split is named before the architecture is checked
    renamed = tmp_path / "renamed.gguf"
    renamed.write_bytes(parts[1].read_bytes())
    msg = _one_line(renamed)
    assert "is part 2 of 3 of a split GGUF model" in msg
    assert "split.* metadata says; it holds 8 of 21 tensors" in msg
    # the folder holding the parts holds one model (refused as a split), not three
    assert "part 1 of 3" in _one_line(split)
    assert "reads single-file GGUFs only" in cli_error(["diagnose", str(split), "--out", str(tmp_path / "o")])
    # a one-part "split" name is a whole model
    whole = tmp_path / "tiny-00001-of-00001.gguf"
    whole.write_bytes(paths[Q.F16].read_bytes())
    assert loading.load(whole).kind == "gguf"


def test_folder_holding_one_gguf_loads_it(files, tmp_path):
    _, paths = files
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.Q8_0.gguf").write_bytes(paths[Q.Q8_0].read_bytes())
    got = loading.load(tmp_path / "m")
    assert got.kind == "gguf" and "model.Q8_0.gguf" in got.description
