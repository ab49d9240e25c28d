"""Where `diagnose`, `atlas` and `sample` find a model: a Hugging Face id already in the local hub
cache (never downloaded), and a folder holding one model or several (refused: name one file)."""

import hashlib
import os
import socket
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
import huggingface_hub  # noqa: E402,F401  imported first on purpose: it reads the cache variables now

import analysis.checkpoints as loading  # noqa: E402
from analysis.checkpoints import hf  # noqa: E402
from run_analysis import main  # noqa: E402

COMMIT = "5e1f" * 10  # a snapshot's commit hash as the cache names it


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may reach the network: a connection or a name look-up fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 saved as Hugging Face saves one, sharded (three shards and an index)."""
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=120, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder, max_shard_size="50KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert (folder / "model-00003-of-00003.safetensors").is_file()
    return folder


def _cache(hub: Path, repo_id: str, model: Path, ref: bool = True) -> Path:
    """``model`` laid out as the hub cache holds a download: blobs, a snapshot of links, refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in model.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def _one_line(path, **kw) -> str:
    with pytest.raises(ValueError) as e:
        loading.load(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_hub_id_in_the_cache_loads_its_snapshot(gpt2, tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hub"
    snapshot = _cache(hub, "tiny-org/tiny-gpt2.v1", gpt2)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))  # after huggingface_hub's import: read at call time
    got = loading.load("tiny-org/tiny-gpt2.v1")
    assert got.kind == "hf" and got.loss_kind == "lm" and got.vocab_size == 120
    assert _same_weights(got.model, transformers.GPT2LMHeadModel.from_pretrained(gpt2))
    assert got.notes[0] == f"tiny-org/tiny-gpt2.v1 read from the local Hugging Face cache: {snapshot}"
    # the CLI commands that load a checkpoint take the id too
    assert main(["sample", "tiny-org/tiny-gpt2.v1", "--tokens", "3", "--prompt", ""]) == 0
    capsys.readouterr()
    # HF_HOME/hub when HF_HUB_CACHE is unset
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf.hub_cache() == tmp_path / "home" / "hub"
    _cache(tmp_path / "home" / "hub", "org/other", gpt2)
    assert loading.load("org/other").kind == "hf"


def test_hub_id_not_in_the_cache_is_one_line_and_nothing_is_downloaded(cli_error, gpt2, tmp_path,
                                                                        monkeypatch):
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    msg = _one_line("HuggingFaceTB/SmolLM2-135M")
    assert msg.startswith("checkpoint path HuggingFaceTB/SmolLM2-135M does not exist")
    assert f"{hub} has no models--HuggingFaceTB--SmolLM2-135M" in msg and "nothing is downloaded" in msg
    err = cli_error(["diagnose", "HuggingFaceTB/SmolLM2-135M", "--out", str(tmp_path / "o")])
    assert "not in the local cache" in err and str(hub) in err
    # in the cache but with no snapshot of its main revision (refs/main missing: an interrupted fetch)
    _cache(hub, "org/partial", gpt2, ref=False)
    assert "models--org--partial has no snapshot of its main revision" in _one_line("org/partial")


def test_local_paths_win_and_only_id_shaped_paths_are_looked_up(gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _cache(tmp_path / "hub", "org/tiny", gpt2)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "tiny").mkdir()  # a local folder of that name: read as the folder, not the id
    assert "holds neither config.json" in _one_line("org/tiny")
    for path in ("nope.pt", "a/b/c", "./org/x", "org/--x", "org/a..b"):
        msg = _one_line(path)
        assert msg == f"checkpoint path {Path(path)} does not exist", msg
    assert hf.looks_like_hub_id("Qwen/Qwen2.5-0.5B") and hf.looks_like_hub_id("a/b")
    assert not hf.looks_like_hub_id("/abs/path") and not hf.looks_like_hub_id("org/name/")


def test_folder_with_two_models_asks_for_one_file(cli_error, gpt2, tmp_path):
    def folder(name: str, files: dict[str, Path | bytes]) -> Path:
        d = tmp_path / name
        d.mkdir()
        for fname, content in files.items():
            (d / fname).write_bytes(content.read_bytes() if isinstance(content, Path) else content)
        return d

    hf = {f.name: f for f in gpt2.iterdir()}  # config.json, three shards and their index
    gguf = b"GGUF" + bytes(60)  # refused before any is read: content does not matter
    two_gguf = folder("two-gguf", {"a.Q4_0.gguf": gguf, "a.Q8_0.gguf": gguf})
    msg = _one_line(two_gguf)
    assert f"folder {two_gguf} holds 2 models: a.Q4_0.gguf (GGUF); a.Q8_0.gguf (GGUF)" in msg
    assert f"pass one of these files instead of the folder, e.g. {two_gguf / 'a.Q4_0.gguf'}" in msg
    assert "holds 2 models" in cli_error(["diagnose", str(two_gguf), "--out", str(tmp_path / "o")])
    both = folder("hf-and-run", {**hf, "checkpoint.pt": b"x"})
    msg = _one_line(both)
    assert "holds 2 models: config.json (a Hugging Face model with model.safetensors.index.json); " \
           "checkpoint.pt (a sigprop run)" in msg
    pair = folder("two-state-dicts", {"a.safetensors": b"x", "b.safetensors": b"x"})
    assert "a.safetensors (a bare state_dict: add --config); b.safetensors" in _one_line(pair)
    split = folder("split-and-one", {"m-00001-of-00002.gguf": gguf, "m-00002-of-00002.gguf": gguf,
                                     "other.gguf": gguf})
    assert "holds 2 models: other.gguf (GGUF); m-00001-of-00002.gguf (part 1 of a GGUF split in 2 " \
           "parts)" in _one_line(split)
    many = folder("many", {f"q{i}.gguf": gguf for i in range(8)})
    assert "holds 8 models" in (msg := _one_line(many)) and "; and 2 more;" in msg
    # the Hugging Face model of a two-model folder is named by its config.json
    assert loading.load(both / "config.json").kind == "hf"


def test_sharded_folder_and_mistral_copy_are_one_model(gpt2, tmp_path):
    got = loading.load(gpt2)  # three shards and an index: one model
    assert got.kind == "hf" and _same_weights(got.model, transformers.GPT2LMHeadModel.from_pretrained(gpt2))
    # Mistral's repos add their own format's copy of the weights: params.json + consolidated.safetensors
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    for f in gpt2.iterdir():
        (mistral / f.name).write_bytes(f.read_bytes())
    (mistral / "params.json").write_text("{}")
    (mistral / "consolidated.safetensors").write_bytes(b"x")
    assert [f.path.name for f in loading.folder_models(mistral)] == ["config.json"]
    # shards without config.json are no model of their own; a single model.safetensors is a state_dict
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in gpt2.glob("model*"):
        (bare / f.name).write_bytes(f.read_bytes())
    assert loading.folder_models(bare) == []
    (bare / "model.safetensors").write_bytes(b"x")
    assert [f.path.name for f in loading.folder_models(bare)] == ["model.safetensors"]


def test_diagnose_cli_takes_a_cached_hub_id(gpt2, tmp_path, monkeypatch, capsys):
    _cache(tmp_path / "hub", "org/tiny", gpt2)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 50)
    assert main(["diagnose", "org/tiny", "--text", str(text), "--sequences", "2", "--seq-len", "16",
                 "--grad-sequences", "1", "--skip-sequences", "1", "--init-sequences", "0",
                 "--out", str(tmp_path / "o")]) == 0
    assert "org/tiny read from the local Hugging Face cache" in (tmp_path / "o" / "report.md").read_text()
