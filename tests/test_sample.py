"""`sample`: text from a checkpoint, seeded draws, greedy decoding, context cropping, refusals."""

import pytest
import torch

from analysis.checkpoints import load
from analysis.sampling import generate, sample_text
from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import ModelConfig
from analysis.training.train import TrainConfig, train_run
from run_analysis import main

SEQ = 32  # the testbed's max_seq_len


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny pre-norm testbed trained a few steps on Python-like text (byte-level, vocab 256)."""
    root = tmp_path_factory.mktemp("sample")
    text = root / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 400)
    mc = ModelConfig(scheme="pre", depth=2, width=32, heads=4, max_seq_len=SEQ)
    tc = TrainConfig(tokens=32 * 4 * 24, batch_size=4, lr=3e-3, evals=3, eval_batches=2)
    train_run(mc, tc, load_corpus(text), root / "run", log=lambda s: None)
    assert (root / "run" / "checkpoint.pt").is_file()
    return root / "run"


def _greedy(loaded, ids: list[int], n: int) -> list[int]:
    """Argmax decoding written out independently of analysis.sampling."""
    model = loaded.model.eval()
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids[-SEQ:]]))[0]
            ids.append(int(logits[0, -1].argmax()))
    return ids


def test_text_starts_with_the_prompt_and_has_the_requested_length(run_dir):
    loaded = load(run_dir)
    new = generate(loaded, list(b"def "), 25, temperature=1.0, top_k=None, seed=0)
    assert len(new) == 25 and all(0 <= t < 256 for t in new)
    text = sample_text(run_dir, "def ", tokens=25, temperature=1.0, top_k=None, seed=0)
    assert text == "def " + bytes(new).decode("utf-8", errors="replace")
    assert sample_text(run_dir, "", tokens=5, seed=0)  # empty prompt: starts from a newline byte


def test_seeds_reproduce_and_differ(run_dir):
    a = sample_text(run_dir, "def ", tokens=40, temperature=1.0, top_k=0, seed=1)
    assert a == sample_text(run_dir, "def ", tokens=40, temperature=1.0, top_k=0, seed=1)
    assert a != sample_text(run_dir, "def ", tokens=40, temperature=1.0, top_k=0, seed=2)


def test_temperature_zero_and_top_k_one_are_argmax_decoding(run_dir):
    loaded = load(run_dir)
    prompt = list(b"class ")
    want = _greedy(loaded, prompt, 20)[len(prompt):]
    assert generate(loaded, prompt, 20, temperature=0, seed=0) == want
    assert generate(loaded, prompt, 20, temperature=0, seed=7) == want  # no draw: the seed is unused
    assert generate(loaded, prompt, 20, temperature=1.0, top_k=1, seed=3) == want


def test_generating_past_max_seq_len_crops_the_context(run_dir):
    loaded = load(run_dir)
    prompt = list(b"def add(a, b):\n    return a + b\n")  # 32 bytes: already the whole window
    assert len(prompt) == SEQ
    new = generate(loaded, prompt, 3 * SEQ, temperature=0)
    assert len(new) == 3 * SEQ
    assert new == _greedy(loaded, prompt, 3 * SEQ)[len(prompt):]


transformers = pytest.importorskip("transformers")


def _gpt2_with_tokenizer(folder):
    """A tiny GPT-2 and a byte-level BPE tokenizer trained here on a few lines (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n"] * 20
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tok.get_vocab_size()
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=16, bos_token_id=0,
        eos_token_id=0)).save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>").save_pretrained(folder)
    return folder, vocab


def test_hugging_face_gpt2_samples_through_its_tokenizer(tmp_path):
    folder, vocab = _gpt2_with_tokenizer(tmp_path / "gpt2")
    loaded = load(folder)
    assert loaded.encode is not None and loaded.max_len == 16
    ids = loaded.encode("def add")
    new = generate(loaded, ids, 30, temperature=1.0, top_k=0, seed=0)  # past n_positions: cropped
    assert len(new) == 30 and all(0 <= t < vocab for t in new)
    text = sample_text(folder, "def add", tokens=30, temperature=1.0, top_k=0, seed=0)
    assert text == loaded.decode(ids + new) and text.startswith("def add")
    assert text == sample_text(folder, "def add", tokens=30, temperature=1.0, top_k=0, seed=0)
    assert isinstance(sample_text(folder, "", tokens=3), str)  # empty prompt: the BOS token


def test_masked_lm_is_refused_with_one_line(tmp_path, capsys):
    folder = tmp_path / "bert"
    transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=120, max_position_embeddings=64)).save_pretrained(folder)
    with pytest.raises(ValueError, match="sample needs a causal language model; .* is a masked LM") as e:
        sample_text(folder, "def ", tokens=5)
    assert "\n" not in str(e.value)
    assert main(["sample", str(folder), "--tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: sample needs a causal language model")
    # a sigprop testbed with bidirectional attention is an encoder too
    from analysis.testbed.model import build_model
    from analysis.training.train import save_atomic
    mc = ModelConfig(scheme="pre", depth=2, width=32, heads=4, max_seq_len=SEQ, attention="bidirectional")
    save_atomic({"model": build_model(mc).state_dict(), "model_config": mc.to_dict()},
                tmp_path / "enc" / "checkpoint.pt")
    with pytest.raises(ValueError, match="is an encoder"):
        sample_text(tmp_path / "enc", "def ", tokens=5)


def test_cli_prints_text_and_refuses_bad_input(run_dir, tmp_path, capsys):
    assert main(["sample", str(run_dir), "--tokens", "20", "--seed", "1"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def ") and out.err == ""
    assert out.out == sample_text(run_dir, "def ", tokens=20, temperature=0.8, top_k=40, seed=1) + "\n"
    for argv, words in [(["--temperature", "-1"], "--temperature"), (["--tokens", "0"], "--tokens"),
                        (["--top-k", "-2"], "--top-k")]:
        assert main(["sample", str(run_dir), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
        assert "Traceback" not in err
    assert main(["sample", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: checkpoint path") and "does not exist" in err
