"""Nothing read from a file is trusted: a run's checkpoint before resuming, weights that make
non-finite logits, token ids outside the vocabulary, split GGUFs, a sweep folder's records and
tables, sigprop's result folders given as checkpoints, a campaign cut before any run finished.
Each bad input is one line, ``error: …``, exit status 2, never a traceback."""

import builtins
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import analysis.training.campaign as campaign_mod
from analysis.checkpoints import load
from run_analysis import main

TRAIN = ["train", "--schemes", "pre", "--depths", "2", "--width", "16", "--heads", "2",
         "--seq-len", "16", "--batch", "2", "--tokens", "256", "--quiet"]
RUN = "runs/pre-L2-d16-dense-s0"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # would create a file if unpickled with code execution
        return builtins.open, (self.marker, "w")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 300)
    return str(path)


@pytest.fixture(scope="module")
def train(corpus):
    """The `train` command line of the grid below (on a small corpus: quick to read)."""
    return [*TRAIN, "--corpus", corpus]


@pytest.fixture(scope="module")
def grid(tmp_path_factory, train):
    """A finished `train` grid of one tiny run (its checkpoint.pt, settings.json, result.json);
    its figures are not drawn (seconds of a busy CPU, and nothing here reads them)."""
    out = tmp_path_factory.mktemp("grid") / "g"
    with pytest.MonkeyPatch.context() as m:
        m.setattr("analysis.cli.train.grid_report", lambda *a, **k: [])
        assert main([*train, "--out", str(out)]) == 0
    assert (out / RUN / "checkpoint.pt").is_file()
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep's folder (config.json, theory.json, init_profiles.csv) as `sweep` writes it, with
    made-up measurements: a real sweep spends most of a minute deriving the theory, and these
    tests only read the files back (the control below reads this one whole)."""
    from dataclasses import asdict

    import pandas as pd

    from analysis.init.pipeline import AnalysisConfig
    from analysis.init.sweep import COLUMNS
    out = tmp_path_factory.mktemp("sweep") / "s"
    out.mkdir()
    cfg = AnalysisConfig(schemes=["pre"], depths=[2], seeds=[0], width=16, heads=2, seq_len=8,
                         batch_size=2, batches=1)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    (out / "theory.json").write_text(json.dumps({"claims": []}))
    rows = [dict(scheme="pre", depth=2, seed=0, layer=layer,
                 point="embed" if layer < 0 else f"blocks.{layer}.resid_post", metric=metric,
                 measured=1.0 + 0.1 * layer, spread=None, theory=1.0 + 0.12 * layer,
                 theory_averaged=1.0 + 0.11 * layer)
            for layer in (-1, 0, 1) for metric in ("second_moment", "token_cosine", "grad_second_moment")]
    pd.DataFrame(rows, columns=COLUMNS).to_csv(out / "init_profiles.csv", index=False)
    return out


def test_the_sweep_folder_of_these_tests_reads_back_whole(sweep):
    from analysis.init.pipeline import load_tables
    tables, cfg, _ = load_tables(sweep)
    assert cfg.depths == [2] and len(tables["init_profiles"]) == 9


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("w1 w2 w999 w3\n" * 200)
    return path


@pytest.fixture(scope="module")
def tok1000(tmp_path_factory):
    """A word tokenizer of 1000 ids (w0 … w999), too many for a byte-level model's 256."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(1000)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("tok") / "tok1000"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)
    return folder


def _copy(grid: Path, tmp_path: Path) -> Path:
    """A copy of the grid whose run is not finished: the next `train` resumes its checkpoint."""
    out = tmp_path / "g"
    shutil.copytree(grid, out, ignore=shutil.ignore_patterns(".sigprop.lock"))
    (out / RUN / "result.json").unlink()
    return out


def _ckpt(grid: Path) -> dict:
    return torch.load(grid / RUN / "checkpoint.pt", weights_only=True)


# --- 1. resuming a run: its checkpoint checked first ----------------------------------------------

def _random(path, grid):
    path.write_bytes(os.urandom(4000))


def _truncated(path, grid):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _nan_weights(path, grid):
    c = _ckpt(grid)
    c["model"] = {k: v * float("nan") if k == "tok_embed.weight" else v for k, v in c["model"].items()}
    torch.save(c, path)


def _wrong_shape(path, grid):
    c = _ckpt(grid)
    c["model"]["tok_embed.weight"] = torch.zeros(256, 8)
    torch.save(c, path)


def _lacks_key(path, grid):
    c = _ckpt(grid)
    del c["optimizer"]
    torch.save(c, path)


def _bad_step(path, grid):
    c = _ckpt(grid)
    c["state"]["step"] = "7"
    torch.save(c, path)


@pytest.mark.parametrize("breaks,words", [
    (_random, ["not a readable torch file", "not a torch checkpoint"]),
    (_truncated, ["not a readable torch file", "corrupt"]),
    (_nan_weights, ["cannot resume this run", "tok_embed.weight", "non-finite"]),
    (_wrong_shape, ["cannot resume this run", "tok_embed.weight", "[256, 8] in the file",
                    "[256, 16]"]),
    (_lacks_key, ["cannot resume this run", "lacks optimizer"]),
    (_bad_step, ["cannot resume this run", "step is '7'"]),
])
def test_train_refuses_to_resume_a_broken_checkpoint(grid, train, tmp_path, cli_error, breaks,
                                                     words):
    out = _copy(grid, tmp_path)
    ckpt = out / RUN / "checkpoint.pt"
    breaks(ckpt, grid)
    err = cli_error([*train, "--out", str(out)])
    assert str(ckpt) in err and "delete it to restart the run, or restore it" in err, err
    assert "would run code" not in err
    for w in words:
        assert w in err, (w, err)


def test_train_refuses_a_checkpoint_that_would_run_code_and_never_runs_it(grid, train, tmp_path,
                                                                         cli_error):
    out = _copy(grid, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({**_ckpt(grid), "x": _Evil(str(marker))}, out / RUN / "checkpoint.pt")
    err = cli_error([*train, "--out", str(out)])
    assert "would run code" in err and "open" in err and "delete it to restart the run" in err.lower()
    assert not marker.exists()


def test_an_intact_checkpoint_passes_the_checks_and_restores_its_state(grid):
    from analysis.testbed.model import ModelConfig, build_model
    from analysis.training.checkpoint import read_checkpoint
    c = _ckpt(grid)
    model = build_model(ModelConfig(**c["model_config"]))
    ckpt, state = read_checkpoint(grid / RUN / "checkpoint.pt", model)
    assert state.step == c["state"]["step"] > 0 and set(ckpt["model"]) == set(model.state_dict())


def test_diagnose_tells_corrupt_bytes_from_a_pickle_that_would_run_code(tmp_path, cli_error):
    out = ["--out", str(tmp_path / "o")]
    (tmp_path / "random.pt").write_bytes(os.urandom(4000))
    err = cli_error(["diagnose", str(tmp_path / "random.pt"), *out])
    assert "not a torch checkpoint" in err and "corrupt" in err and "would run code" not in err
    # a plain pickle (not torch's zip format) that imports: would run code, named
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Evil(str(marker)), protocol=4))
    with pytest.raises(ValueError, match=r"would run code \(it asks to import 'io.open'\)"):
        load(tmp_path / "evil.pkl")
    assert not marker.exists()


# --- 2. sampling from weights that give NaN -------------------------------------------------------

def test_sample_refuses_non_finite_logits(grid, tmp_path, cli_error, capsys):
    c = _ckpt(grid)
    c["model"] = {k: v * float("nan") if "blocks.1." in k else v for k, v in c["model"].items()}
    (tmp_path / "nan").mkdir()
    torch.save(c, tmp_path / "nan" / "checkpoint.pt")
    err = cli_error(["sample", str(tmp_path / "nan"), "--tokens", "5"])
    assert str(tmp_path / "nan") in err and "NaN or infinity" in err and "step 1 of 5" in err
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=256, n_positions=16, bos_token_id=0,
        eos_token_id=0))
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # transformers' progress bar
    err = cli_error(["sample", str(tmp_path / "hf"), "--tokens", "3", "--temperature", "0"])
    assert str(tmp_path / "hf") in err and "step 1 of 3" in err and "c_fc.weight" in err


# --- 3. token ids past the model's vocabulary -----------------------------------------------------

def test_token_ids_past_the_vocabulary_are_refused_not_clamped(grid, tok1000, text, tmp_path,
                                                                cli_error):
    run = str(grid / RUN)
    err = cli_error(["diagnose", run, "--tokenizer", str(tok1000), "--text", str(text),
                     "--sequences", "2", "--seq-len", "8", "--out", str(tmp_path / "o")])
    assert "of 1000 tokens" in err and "token id 999" in err and "vocabulary has 256" in err
    err = cli_error(["sample", run, "--tokenizer", str(tok1000), "--prompt", "w5 w999", "--tokens", "2"])
    assert "of 1000 tokens" in err and "token id 999" in err and "vocabulary has 256" in err


# --- 4. split GGUF --------------------------------------------------------------------------------

def test_split_gguf_is_refused_by_name_and_by_metadata(tmp_path, cli_error):
    gguf = pytest.importorskip("gguf")
    import numpy as np
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama", split_max_tensors=2)
    w.add_block_count(1)
    for name in ("token_embd.weight", "output_norm.weight", "output.weight"):
        w.add_tensor(name, np.ones((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    parts = sorted(tmp_path.glob("m-*.gguf"))
    assert [p.name for p in parts] == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    err = cli_error(["diagnose", str(parts[0]), "--out", str(tmp_path / "o")])
    assert "part 1 of 2 of a split GGUF" in err and "llama-gguf-split --merge" in err
    renamed = tmp_path / "renamed.gguf"  # the name no longer says: split.count does
    renamed.write_bytes(parts[1].read_bytes())
    err = cli_error(["diagnose", str(renamed), "--out", str(tmp_path / "o2")])
    assert "part 2 of 2" in err and "split.* metadata" in err and "llama-gguf-split --merge" in err


# --- 5. a sweep folder's records and tables -------------------------------------------------------

def _edit_csv(path: Path, line: int, column: str, value: str) -> None:
    lines = path.read_text().splitlines()
    i = lines[0].split(",").index(column)
    cells = lines[line - 1].split(",")
    cells[i] = value
    lines[line - 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("case,words", [
    ("depths_text", ["config.json", "field depths", '"2, 4"', "a list of integers"]),
    ("measured_text", ["init_profiles.csv", "column measured", "'abc'", "line 3", "a number"]),
    ("depth_fraction", ["init_profiles.csv", "column depth", "'2.5'", "an integer"]),
    ("binary_csv", ["init_profiles.csv", "not a CSV text file", "binary"]),
])
def test_report_refuses_records_of_the_wrong_type(sweep, tmp_path, cli_error, case, words):
    folder = tmp_path / "s"
    shutil.copytree(sweep, folder, ignore=shutil.ignore_patterns(".sigprop.lock"))
    if case == "depths_text":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "depths": "2, 4"}))
    elif case == "measured_text":
        _edit_csv(folder / "init_profiles.csv", 3, "measured", "abc")
    elif case == "depth_fraction":
        _edit_csv(folder / "init_profiles.csv", 2, "depth", "2.5")
    else:
        (folder / "init_profiles.csv").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(128, 256)) * 8)
    err = cli_error(["report", str(folder)])
    assert str(folder) in err
    for w in words:
        assert w in err, (w, err)


# --- 6. sigprop's result folders are not checkpoints; a config that contradicts its weights -------

def test_result_folders_given_as_checkpoints_say_what_they_are(sweep, grid, cli_error, tmp_path):
    for argv in (["diagnose", str(sweep), "--out", str(tmp_path / "o")],
                 ["sample", str(sweep / "config.json")]):
        err = cli_error(argv)
        assert "a sigprop sweep folder (results), not a checkpoint" in err
        assert "give a run folder or checkpoint.pt" in err and "unsupported architecture" not in err
    err = cli_error(["sample", str(grid)])
    assert "is a sigprop train folder (results)" in err and f"e.g. {grid / RUN}" in err


def test_a_config_that_contradicts_the_weights_names_the_weight_and_both_shapes(grid, tmp_path,
                                                                               cli_error):
    c = _ckpt(grid)
    torch.save(c["model"], tmp_path / "sd.pt")
    (tmp_path / "cfg.json").write_text(json.dumps({**c["model_config"], "width": 32}))
    err = cli_error(["sample", str(tmp_path / "sd.pt"), "--config", str(tmp_path / "cfg.json")])
    assert ("weight tok_embed.weight has shape [256, 16] in the file but [256, 32] in the model "
            "cfg.json describes") in err


# --- 7. a campaign cut before any run finished ends normally --------------------------------------

def test_a_campaign_cut_before_any_run_finished_ends_with_a_report_and_the_resume_command(
        tmp_path, capsys, monkeypatch, corpus):
    # a second of the time limit for the dense grid: its first run is cut at its first check
    monkeypatch.setitem(campaign_mod.START_SECONDS, "tiny", {s: 0.5 for s in campaign_mod.STAGES})
    out = tmp_path / "c"
    assert main(["campaign", "--device", "cpu", "--tiny", "--no-compile", "--time-limit", "31",
                 "--corpus", corpus, "--out", str(out)]) == 0
    got = capsys.readouterr()
    assert "error" not in got.err and "Traceback" not in got.err
    assert "remaining: " in got.out  # dense_grid, unless a fast machine finished it in time
    assert (f"Resume with: python run_analysis.py campaign --out {out} --device cpu --tiny "
            f"--no-compile --corpus {corpus} --time-limit 31") in got.out
    stages = json.loads((out / "campaign.json").read_text())["stages"]
    assert stages.get("dense_grid") in ("cut", "done"), stages
    runs = out / "dense" / "train_runs.csv"  # on a fast machine a first run may finish in time
    if not runs.exists() or len(runs.read_text().strip().splitlines()) < 2:
        assert "No training run has finished yet" in (out / "report.md").read_text()
