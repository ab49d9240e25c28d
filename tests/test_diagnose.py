"""`diagnose`: sigprop checkpoints, Hugging Face folders, state_dicts; collapse flagged; bad input refused."""

import builtins
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import analysis.checkpoints as checkpoints
from analysis.checkpoints import guards
from analysis.testbed.corpus import load_corpus
from analysis.diagnose.diagnosis import diagnose
from analysis.diagnose.findings import THRESHOLDS
from analysis.testbed.model import ModelConfig, build_model
from analysis.training.train import TrainConfig, save_atomic, train_run
from run_analysis import main

FAST = dict(sequences=8, seq_len=32, grad_sequences=4, batch=4)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y = [1, 2]\n" * 300)
    return path


def _save_testbed(folder: Path, mc: ModelConfig, model=None) -> Path:
    model = model or build_model(mc)
    save_atomic({"model": model.state_dict(), "model_config": mc.to_dict()}, folder / "checkpoint.pt")
    return folder


def _collapsed(tmp_path: Path) -> Path:
    """A post-norm testbed whose blocks 1.. end in a norm with γ = 0, β = c: every token becomes c."""
    mc = ModelConfig(scheme="post", depth=6, width=32, heads=4, max_seq_len=64)
    model = build_model(mc)
    c = torch.randn(32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for block in model.blocks[1:]:
            block.output_norm.weight.zero_()
            block.output_norm.bias.copy_(c)
    return _save_testbed(tmp_path / "collapsed", mc, model)


def _severities(d) -> dict[str, str]:
    return dict(zip(d.findings["id"], d.findings["severity"]))


def test_trained_toolkit_checkpoint_end_to_end(tmp_path, text, capsys):
    mc = ModelConfig(scheme="pre", depth=3, width=32, heads=4, max_seq_len=32)
    tc = TrainConfig(tokens=32 * 4 * 12, batch_size=4, lr=3e-3, evals=2, eval_batches=1)
    train_run(mc, tc, load_corpus(text), tmp_path / "run", log=lambda s: None)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["step"] > 0  # really trained
    out = tmp_path / "out"
    rc = main(["diagnose", str(tmp_path / "run"), "--text", str(text), "--sequences", "8",
               "--seq-len", "32", "--grad-sequences", "4", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "verdict:" in printed and "placement pre" in printed
    doc = json.loads((out / "diagnosis.json").read_text())
    assert doc["kind"] == "sigprop" and doc["placement"] == "pre" and doc["blocks"] == 3
    assert doc["thresholds"]["collapse_cosine"]["value"] == THRESHOLDS["collapse_cosine"][0]
    table = pd.read_csv(out / "diagnosis.csv")
    assert list(table["layer"]) == [-1, 0, 1, 2, 3]
    blocks = table[table.layer.between(0, 2)]
    assert (blocks["second_moment"] > 0).all() and blocks["grad_second_moment"].gt(0).all()
    assert blocks["angle_deg"].between(0, 180).all()
    assert table.loc[table.layer == 2, "grad_rel"].item() == pytest.approx(1.0)
    # the theory columns exist and are at initialization (finite for the testbed's own scheme)
    assert table["theory_token_cosine"].iloc[:4].notna().all()
    assert any(f["id"] == "theory_at_init" and "re-initialized" in f["message"] for f in doc["findings"])
    # the re-initialized twin: measured beside the trained model; the theory describes it, not the trained one
    assert table["init_token_cosine"].iloc[:4].notna().all() and table["init_q_rel"].iloc[0] == 1.0
    assert (table["theory_token_cosine"] - table["init_token_cosine"]).iloc[:4].abs().max() < 0.15
    assert table["branch_rel_median"].iloc[1:4].gt(0).all() and table["skip_out_change"].iloc[1:4].gt(0).all()
    assert table["skip_loss_delta"].iloc[1:4].notna().all()  # a real loss: the skip test's loss change
    assert table["point"].iloc[-1] == "final"  # pre-norm's final norm: the head input, its own row
    from analysis.diagnose.report import glossary_for
    assert [c for c in table.columns if glossary_for(c) is None] == []  # every column explained
    assert "Columns" in (out / "report.md").read_text() and doc["max_effective_rank"] == 32
    assert (out / "figures" / "diagnosis.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "# Diagnosis" in report and "Verdict:" in report and "figures/diagnosis.png" in report
    page = (out / "report.html").read_text()
    assert page.count("<table") >= 2
    # the verdict first, then the figure, then the tables
    assert page.index('class="summary') < page.index("<img") < page.index("<table")


def test_collapse_is_flagged_and_healthy_is_not(tmp_path, text):
    bad = diagnose(str(_collapsed(tmp_path)), text=str(text), **FAST)
    sev = _severities(bad)
    assert sev.get("rank_collapse") == "critical", bad.findings
    assert bad.verdict.startswith("COLLAPSED")
    row = bad.findings.set_index("id").loc["rank_collapse"]
    assert row["threshold"] == THRESHOLDS["collapse_cosine"][0] and row["value"] >= row["threshold"]
    assert "from block 1 on" in row["message"]  # where: the first collapsed block
    assert sev.get("redundant_blocks") == "warning"  # every block's output is reset to c downstream:
    assert "blocks 0–5" in bad.findings.set_index("id").loc["redundant_blocks", "message"]  # skipping any changes nothing
    assert bad.table.loc[bad.table.layer == 5, "effective_rank"].item() < 1.5
    assert "final" not in set(bad.table["point"])  # post-norm: no final norm, no row repeating block 5

    mc = ModelConfig(scheme="pre", depth=6, width=32, heads=4, max_seq_len=64)
    good = diagnose(str(_save_testbed(tmp_path / "healthy", mc)), text=str(text), **FAST)
    assert not (good.findings["severity"] == "critical").any(), good.findings
    assert "redundant_blocks" not in set(good.findings["id"])
    assert good.verdict.startswith("HEALTHY")


transformers = pytest.importorskip("transformers")

HF = {
    "bert": (lambda t: t.BertForMaskedLM(t.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                      intermediate_size=64, vocab_size=120,
                                                      max_position_embeddings=64)), "post", "masked-lm"),
    "gpt2": (lambda t: t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=120,
                                                      n_positions=64, bos_token_id=0, eos_token_id=0)),
             "pre", "lm"),
    "gpt2-headless": (lambda t: t.GPT2Model(t.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=120,
                                                         n_positions=64)), "pre", "surrogate"),
    "llama": (lambda t: t.LlamaForCausalLM(t.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                         num_key_value_heads=2, intermediate_size=64,
                                                         vocab_size=120)), "pre", "lm"),
}


def _hf_folder(name: str, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    folder = tmp_path / name
    HF[name][0](transformers).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", list(HF))
def test_hugging_face_folders(name, tmp_path, text):
    d = diagnose(str(_hf_folder(name, tmp_path)), text=str(text), **FAST)
    _, placement, loss = HF[name]
    assert d.meta["kind"] == "hf" and d.meta["placement"] == placement and d.meta["loss"] == loss
    assert d.meta["blocks"] == 3 and math.isfinite(d.meta["loss_value"])
    assert d.table["grad_second_moment"].iloc[:4].gt(0).all()
    assert d.table["theory_q_rel"].iloc[:4].notna().all()  # placement known: theory at init
    assert not (d.findings["severity"] == "critical").any(), d.findings


def test_gpt2_cli_and_bare_state_dict_with_hf_config(tmp_path, text, capsys):
    folder = _hf_folder("gpt2", tmp_path)
    assert main(["diagnose", str(folder), "--text", str(text), "--sequences", "4", "--seq-len", "16",
                 "--out", str(tmp_path / "o1")]) == 0
    one = pd.read_csv(tmp_path / "o1" / "diagnosis.csv")
    from safetensors.torch import load_file, save_file
    sd = load_file(str(folder / "model.safetensors"))
    save_file(sd, str(tmp_path / "weights.safetensors"))
    assert main(["diagnose", str(tmp_path / "weights.safetensors"), "--text", str(text), "--sequences",
                 "4", "--seq-len", "16", "--out", str(tmp_path / "o2")]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["diagnose", str(tmp_path / "weights.safetensors"), "--config", str(folder / "config.json"),
                 "--text", str(text), "--sequences", "4", "--seq-len", "16", "--out", str(tmp_path / "o2")]) == 0
    two = pd.read_csv(tmp_path / "o2" / "diagnosis.csv")
    pd.testing.assert_series_equal(one["second_moment"], two["second_moment"], rtol=1e-5)


def test_state_dict_with_sigprop_config(tmp_path, text):
    mc = ModelConfig(scheme="span", depth=2, width=32, heads=4, max_seq_len=64)
    torch.save(build_model(mc).state_dict(), tmp_path / "sd.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(mc.to_dict()))
    d = diagnose(str(tmp_path / "sd.pt"), config=str(tmp_path / "cfg.json"), text=str(text), **FAST)
    assert d.meta["kind"] == "state_dict" and d.meta["placement"] == "post" and d.meta["theory_scheme"] == "span"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # would create a file if unpickled with code execution
        return builtins.open, (self.marker, "w")


def test_bad_input_is_refused_with_one_line(cli_error, tmp_path, capsys, text):
    out = ["--out", str(tmp_path / "o"), "--text", str(text), "--sequences", "2", "--seq-len", "16"]
    assert "does not exist" in cli_error(["diagnose", str(tmp_path / "nope.pt"), *out])
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a zip archive at all" * 10)
    assert "not a readable torch file" in cli_error(["diagnose", str(tmp_path / "corrupt.pt"), *out])
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert "not a readable safetensors" in cli_error(["diagnose", str(tmp_path / "corrupt.safetensors"), *out])
    # a good checkpoint cut in half
    mc = ModelConfig(scheme="pre", depth=2, width=32, heads=4, max_seq_len=64)
    whole = _save_testbed(tmp_path / "whole", mc) / "checkpoint.pt"
    (tmp_path / "half.pt").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert "not a readable torch file" in cli_error(["diagnose", str(tmp_path / "half.pt"), *out])
    # a pickle that needs code: refused, and the code never ran
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Evil(str(marker))}, tmp_path / "evil.pt")
    err = cli_error(["diagnose", str(tmp_path / "evil.pt"), *out])
    assert "refused" in err and "run code" in err and "open" in err
    assert not marker.exists()
    (tmp_path / "empty").mkdir()
    assert "neither config.json" in cli_error(["diagnose", str(tmp_path / "empty"), *out])


def test_hf_remote_code_and_unknown_family_refused(cli_error, tmp_path, capsys, text):
    out = ["--out", str(tmp_path / "o"), "--text", str(text)]
    folder = _hf_folder("gpt2", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "evil.EvilModel"}}))
    assert "custom model code" in cli_error(["diagnose", str(folder), *out])
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "my_private_arch"}))
    err = cli_error(["diagnose", str(folder), *out])
    assert "unsupported architecture" in err and "llama" in err


def test_hf_folder_with_a_pickle_that_needs_code_is_refused(cli_error, tmp_path, capsys, text):
    folder = _hf_folder("gpt2", tmp_path)
    from safetensors.torch import load_file
    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({**sd, "extra": _Evil(str(marker))}, folder / "pytorch_model.bin")
    err = cli_error(["diagnose", str(folder), "--out", str(tmp_path / "o"), "--text", str(text)])
    assert "refused" in err and "weights_only=True" in err
    assert not marker.exists()
    torch.save(sd, folder / "pytorch_model.bin")  # the same weights as a plain .bin: accepted
    d = diagnose(str(folder), text=str(text), **FAST)
    assert "torch .bin" in d.meta["model"] and d.meta["blocks"] == 3


def test_tokenizer_is_found_beside_the_weights_and_foreign_text_is_flagged(cli_error, tmp_path, text, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    folder = _hf_folder("gpt2", tmp_path)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # a word tokenizer: drops line breaks and indents
    tok.train_from_iterator([text.read_text()], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    d = diagnose(str(folder), text=str(text), **FAST)
    assert f"from {folder}" in d.meta["text"] and "bytes" not in d.meta["text"]
    assert math.isfinite(d.meta["loss_value"])
    # a bare state_dict with --config: the tokenizer beside the weights is used, not bytes
    bare = tmp_path / "bare"
    bare.mkdir()
    (folder / "model.safetensors").rename(bare / "weights.safetensors")
    for f in folder.glob("tok*"):
        f.rename(bare / f.name)
    d = diagnose(str(bare / "weights.safetensors"), config=str(folder / "config.json"), text=str(text), **FAST)
    assert f"from {bare}" in d.meta["text"]
    d = diagnose(str(bare / "weights.safetensors"), config=str(folder / "config.json"), tokenizer=str(bare),
                 **FAST)  # --tokenizer; the default text (Python source) is foreign to a word tokenizer
    assert any("does not keep it" in n and "line breaks" in n and "--text" in n for n in d.notes), d.notes
    err = cli_error(["diagnose", str(bare / "weights.safetensors"), "--config", str(folder / "config.json"),
                        "--tokenizer", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "holds no tokenizer" in err


def test_unlocatable_blocks_say_how_to_point_at_them(cli_error, tmp_path, capsys, text):
    folder = _hf_folder("gpt2", tmp_path)
    out = ["--out", str(tmp_path / "o"), "--text", str(text), "--sequences", "2", "--seq-len", "16"]
    err = cli_error(["diagnose", str(folder), "--blocks", "transformer.nothing", *out])
    assert "--blocks" in err and "not a submodule" in err
    # a module that does not map [batch, seq, d] to itself is not a residual block: the check says so
    err = cli_error(["diagnose", str(folder), "--blocks", "transformer.h.0.attn.c_attn", *out])
    assert "do not look like residual blocks" in err and "--blocks" in err and "GPT-2" in err


def test_nan_weights_are_a_finding_not_a_crash(tmp_path, text):
    mc = ModelConfig(scheme="pre", depth=3, width=32, heads=4, max_seq_len=64)
    model = build_model(mc)
    with torch.no_grad():
        model.blocks[1].ffns[0].up.weight[0, 0] = float("nan")
        model.blocks[1].attns[0].q.weight[1, 1] = float("inf")
    d = diagnose(str(_save_testbed(tmp_path / "nan", mc, model)), text=str(text), **FAST)
    sev = _severities(d)
    assert sev["non_finite_weights"] == "critical" and sev["non_finite_activations"] == "critical"
    assert d.findings.set_index("id").loc["non_finite_weights", "value"] == 2
    assert "block 1" in d.findings.set_index("id").loc["non_finite_activations", "message"]
    assert d.verdict.startswith("UNUSABLE")
    # the finite layers before the damage keep their effective rank
    assert d.table.loc[d.table.layer <= 0, "effective_rank"].notna().all()


def test_checkpoint_larger_than_memory_is_refused_with_sizes(cli_error, tmp_path, capsys, monkeypatch, text):
    mc = ModelConfig(scheme="pre", depth=2, width=32, heads=4, max_seq_len=64)
    folder = _save_testbed(tmp_path / "big", mc)
    monkeypatch.setattr(guards, "available_memory", lambda: 1000)
    err = cli_error(["diagnose", str(folder), "--out", str(tmp_path / "o"), "--text", str(text)])
    assert "GB of weights" in err and "0.00 GB of memory" in err


def test_fail_on_sets_the_exit_status(tmp_path, text, capsys):
    folder = _collapsed(tmp_path)
    args = ["diagnose", str(folder), "--text", str(text), "--sequences", "4", "--seq-len", "16",
            "--grad-sequences", "2", "--skip-sequences", "0", "--init-sequences", "0"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0  # reporting alone never fails
    assert main([*args, "--out", str(tmp_path / "b"), "--fail-on", "collapsed"]) == 1
    assert main([*args, "--out", str(tmp_path / "c"), "--fail-on", "warnings"]) == 1
    assert main([*args, "--out", str(tmp_path / "d"), "--fail-on", "unusable"]) == 0
    assert "--fail-on collapsed: verdict COLLAPSED, exit status 1" in capsys.readouterr().err
    doc = json.loads((tmp_path / "a" / "diagnosis.json").read_text())
    assert doc["init_sequences"] == 0 and all(v is None for v in (r.get("theory_q_rel") for r in doc["layers"]))


def test_encoders_get_bidirectional_attention_theory_and_vision_configs_are_refused(cli_error, tmp_path, text, capsys):
    d = diagnose(str(_hf_folder("bert", tmp_path)), text=str(text), **FAST)
    assert d.meta["encoder"] is True
    msg = d.findings.set_index("id").loc["theory_at_init", "message"]
    assert "bidirectional attention" in msg
    gpt = diagnose(str(_hf_folder("gpt2", tmp_path)), text=str(text), **FAST)
    assert gpt.meta["encoder"] is False and "causal attention" in gpt.findings.set_index("id").loc[
        "theory_at_init", "message"]
    vit = tmp_path / "vit"
    transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, image_size=32, patch_size=8)
                          ).save_pretrained(vit)
    capsys.readouterr()  # transformers' save progress bar
    err = cli_error(["diagnose", str(vit), "--out", str(tmp_path / "o"), "--text", str(text)])
    assert "vit" in err and "text" in err


def test_sampling_stops_once_the_statistics_converge(tmp_path, text):
    folder = _save_testbed(tmp_path / "m", ModelConfig(scheme="pre", depth=2, width=32, heads=4, max_seq_len=64))
    kw = dict(text=str(text), sequences=40, seq_len=32, grad_sequences=4, batch=4, skip_sequences=0,
              init_sequences=0)
    early = diagnose(str(folder), **kw)  # a repetitive text: every window alike, the errors tiny
    assert 12 <= early.meta["sequences_used"] < 40 and any("sampling stopped" in n for n in early.notes)
    full = diagnose(str(folder), tolerance=0.0, **kw)
    assert full.meta["sequences_used"] == 40
    with pytest.raises(ValueError, match="--tolerance"):
        diagnose(str(folder), tolerance=1.5, **kw)


@pytest.mark.parametrize("name", ["testbed", "llama"])
def test_skip_test_replaying_the_prefix_equals_running_every_block(name, tmp_path):
    from analysis.diagnose.contribution import _identity_hook, skip_test
    from probes import locate
    if name == "testbed":
        model = build_model(ModelConfig(scheme="post", depth=4, width=32, heads=4, max_seq_len=64)).eval()
        run = lambda w: torch.nn.functional.cross_entropy(  # noqa: E731
            model(w[:, :-1])[0].transpose(1, 2), w[:, 1:], reduction="none").mean(1)
    else:
        model = HF["llama"][0](transformers).eval()
        run = lambda w: torch.nn.functional.cross_entropy(  # noqa: E731
            model(input_ids=w[:, :-1]).logits.transpose(1, 2), w[:, 1:], reduction="none").mean(1)
    layout = locate(model)
    w = torch.randint(0, 64, (6, 17), generator=torch.Generator().manual_seed(0))
    fast = skip_test(model, layout, w, run, batch=4)
    with torch.no_grad():
        base = run(w)
        for i, path in enumerate(layout.blocks):  # naive: every block runs, block i is the identity
            h = model.get_submodule(path).register_forward_hook(_identity_hook, with_kwargs=True)
            delta = (run(w) - base).mean()
            h.remove()
            assert fast.loc[i, "skip_loss_delta"] == pytest.approx(float(delta), abs=1e-5)
    assert fast["skip_out_change"].gt(0).all() and fast["skip_loss_delta_se"].notna().all()


def test_calibration_tables_over_several_checkpoints(tmp_path, text, capsys):
    from analysis.diagnose import calibration
    paths = [str(_save_testbed(tmp_path / s, ModelConfig(scheme=s, depth=2, width=32, heads=4, max_seq_len=64)))
             for s in ("pre", "post")]
    out = tmp_path / "cal"
    assert calibration.main([*paths, "--out", str(out), "--text", str(text), "--sequences", "4",
                             "--seq-len", "16", "--skip-sequences", "2"]) == 0
    blocks = pd.read_csv(out / "blocks.csv")
    assert len(blocks) == 4 and set(blocks["placement"]) == {"pre", "post"}
    assert blocks["branch_rel_median"].gt(0).all() and blocks["skip_out_change"].gt(0).all()
    summary = pd.read_csv(out / "summary.csv").set_index("placement")
    assert summary.loc["pre", "blocks"] == 2 and summary.loc["post", "below_contribution_threshold"] == 0
    assert calibration.main([str(tmp_path / "nope"), "--out", str(tmp_path / "cal2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_massive_activations_are_a_finding_and_robust_statistics_ignore_them(tmp_path, text):
    mc = ModelConfig(scheme="pre", depth=3, width=32, heads=4, max_seq_len=64)
    model = build_model(mc)
    with torch.no_grad():
        model.pos_embed.weight[0, 5] = 500.0  # the first position carries one huge coordinate
    d = diagnose(str(_save_testbed(tmp_path / "sink", mc, model)), text=str(text), **FAST)
    found = d.findings.set_index("id")
    assert "massive_activations" in found.index, found
    msg = found.loc["massive_activations", "message"]
    assert "token 0, coordinate 5" in msg and "from block 0" in msg
    t = d.table.set_index("layer")
    assert t.loc[0, "massive_ratio"] > 100 and t.loc[0, "first_token_second_moment"] > 100 * t.loc[0, "median_token_second_moment"]
    assert t.loc[2, "q_rel_median"] < 10 < t.loc[2, "second_moment"] / t.loc[2, "median_token_second_moment"]
    assert t.loc[2, "effective_rank_normalized"] > 2 * t.loc[2, "effective_rank"]  # raw: one token's spectrum
    assert "stream_explodes" not in found.index


def test_atlas_draws_several_checkpoints_and_checks_claims(cli_error, tmp_path, text, capsys):
    paths = []
    for scheme in ("pre", "post"):
        mc = ModelConfig(scheme=scheme, depth=6, width=32, heads=4, max_seq_len=64)
        paths.append(str(_save_testbed(tmp_path / scheme, mc)))
    out = tmp_path / "atlas"
    assert main(["atlas", *paths, "--text", str(text), "--sequences", "8", "--seq-len", "32",
                 "--grad-sequences", "4", "--skip-sequences", "2", "--init-sequences", "4",
                 "--out", str(out)]) == 0
    layers = pd.read_csv(out / "atlas_layers.csv")
    assert set(layers["checkpoint"]) == {"pre", "post"} and layers["relative_depth"].max() < 1.2
    claims = pd.read_csv(out / "claims.csv").set_index("claim")
    assert claims.loc["deep_blocks_contribute_less:pre", "status"] in ("holds", "fails")
    assert claims.loc["post_contributions_flat:post", "status"] in ("holds", "fails")
    assert claims.loc["deep_blocks_cheap_to_skip:pre", "evidence"].startswith("median loss change")
    assert "deep_blocks_contribute_less:post" not in claims.index  # placement decides what applies
    assert (out / "figures" / "atlas.png").stat().st_size > 1000 and "# Atlas" in (out / "report.md").read_text()
    assert "claims:" in capsys.readouterr().out
    err = cli_error(["atlas", paths[0], paths[0], "--out", str(tmp_path / "o"), "--text", str(text)])
    assert "share the name" in err


def test_exploding_stream_is_measured_from_block_0_and_gradients_need_the_scale_free_ratio(tmp_path, text):
    mc = ModelConfig(scheme="pre", depth=4, width=32, heads=4, max_seq_len=64)
    model = build_model(mc)
    with torch.no_grad():
        for block in model.blocks[1:]:  # later blocks write 300× larger branches: the stream explodes
            block.attns[0].o.weight.mul_(300.0)
            block.ffns[0].down.weight.mul_(300.0)
    d = diagnose(str(_save_testbed(tmp_path / "boom", mc, model)), text=str(text), **FAST)
    found = d.findings.set_index("id")
    # pre-norm: every branch and the head read the stream through a norm, so the growth is reported, not warned
    assert "stream_grows" in found.index and "from block 0's output" in found.loc["stream_grows", "message"]
    assert found.loc["stream_grows", "severity"] == "info" and "stream_explodes" not in found.index

    from types import SimpleNamespace
    from analysis.diagnose.findings import findings
    layout = SimpleNamespace(blocks=("b0", "b1"), placement="pre", describe=lambda: "2 blocks")
    loaded = SimpleNamespace(scheme=None, theory_shape={})
    base = dict(second_moment=[1.0, 1e2, 1e4, 1e4], q_rel=[1, 1e2, 1e4, 1e4], q_rel_median=[1, 1e2, 1e4, 1e4],
                token_cosine=[0.1] * 4, effective_rank=[10.0] * 4, effective_rank_normalized=[10.0] * 4,
                dong_residual=[0.9] * 4, angle_deg=[float("nan"), 30, 30, float("nan")],
                layer=[-1, 0, 1, 2], point=["embed", "b0", "b1", "final"])
    for g, free, expect in [([1e5, 1e3, 1.0, 1.0], [0.5, 0.6, 1.0, 1.0], "gradient_scale"),
                            ([1e5, 1e3, 1.0, 1.0], [1e4, 1e2, 1.0, 1.0], "gradients_explode")]:
        t = pd.DataFrame(dict(base, grad_second_moment=g, grad_rel=g, grad_scale_free=free))
        ids = {f["id"] for f in findings(t, [], [1.0], layout, loaded, None)}
        assert expect in ids and ({"gradient_scale", "gradients_explode"} - {expect}).isdisjoint(ids), ids


def test_contribution_is_unknown_not_zero_when_no_branch_output_is_seen():
    """A branch module whose output is not stream-shaped cannot be measured: NaN, never a redundant 0."""
    from torch import nn

    from analysis.diagnose.contribution import ContributionMeter
    from probes import locate

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide = nn.Linear(8, 16)

        def forward(self, x):
            return x + self.wide(x)[..., :8]

    model = nn.Sequential()
    model.layers = nn.ModuleList([Block(), Block()])
    model.forward = lambda x: model.layers[1](model.layers[0](x))
    layout = locate(model, blocks="layers")
    with ContributionMeter(model, layout, [["layers.0.wide"], ["layers.1.wide"]]) as meter:
        model(torch.randn(2, 5, 8))
    assert meter.frame()["branch_rel"].isna().all()


def test_mup_checkpoint_is_diagnosed_without_the_standard_init_theory(tmp_path, text):
    """A µP testbed loads with its multipliers (same logits as built) and its diagnosis says why
    the init theory, written for the standard parametrization, is not compared."""
    mc = ModelConfig(scheme="pre", depth=2, width=64, heads=4, max_seq_len=32,
                     parametrization="mup", base_width=32)
    model = build_model(mc)
    folder = _save_testbed(tmp_path / "mup", mc, model)
    loaded = checkpoints.load(folder)
    idx = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.model(idx)[0], model(idx)[0])
    d = diagnose(folder, text=str(text), sequences=4, seq_len=32, grad_sequences=2,
                 skip_sequences=0, init_sequences=4, log=lambda s: None)
    assert any("standard parametrization" in n for n in d.notes)


def test_a_head_the_checkpoint_does_not_hold_is_not_used_for_the_loss(tmp_path):
    """A sentence-embedding export of a masked LM (all-mpnet-base-v2): config says ForMaskedLM, no head weights."""
    import transformers
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=100, architectures=["BertForMaskedLM"])
    transformers.BertModel(cfg).save_pretrained(tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "config.json").read_text())  # as the export ships it
    (tmp_path / "export" / "config.json").write_text(json.dumps(dict(saved, architectures=["BertForMaskedLM"])))
    loaded = checkpoints.load(tmp_path / "export")
    assert loaded.loss_kind == "surrogate" and "no weights for the BertForMaskedLM head" in loaded.notes[0]
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "whole")
    assert checkpoints.load(tmp_path / "whole").loss_kind == "masked-lm"
