"""Training: tiny grid end to end on CPU, divergence as an outcome, resume after a kill."""

import json
import math

import pandas as pd
import pytest
import torch

import analysis.training.grid as grid_mod
from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import ModelConfig
from analysis.training.train import TrainConfig, lr_at, train_run
from analysis.training.grid import RUN_COLUMNS, train_grid


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 400)
    return load_corpus(path)


def tiny(scheme="pre", depth=2, **kw):
    return ModelConfig(scheme=scheme, depth=depth, width=32, heads=4, max_seq_len=32, **kw)


def fast(**kw):
    return TrainConfig(**{"tokens": 32 * 4 * 24, "batch_size": 4, "lr": 3e-3, "evals": 3,
                          "eval_batches": 2, **kw})


def test_lr_schedule_warms_up_then_decays():
    tc = TrainConfig(lr=1.0, warmup_frac=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, tc) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_tiny_grid_end_to_end_with_a_forced_divergence(corpus, tmp_path, monkeypatch):
    seen = []
    real = grid_mod.train_run

    def with_huge_lr_for_post(mc, tc, *a, **kw):
        seen.append(mc.scheme)
        if mc.scheme == "post":
            tc = TrainConfig(**{**tc.__dict__, "lr": 50.0})
        return real(mc, tc, *a, **kw)

    monkeypatch.setattr(grid_mod, "train_run", with_huge_lr_for_post)
    runs, profiles = train_grid(["post", "span"], [2], tiny(), fast(), corpus, tmp_path, log=lambda s: None)
    assert seen == ["post", "span"]  # the grid went on after the divergence
    assert list(runs.columns[:len(RUN_COLUMNS)]) == RUN_COLUMNS
    on_disk = pd.read_csv(tmp_path / "train_runs.csv")
    assert len(on_disk) == 2
    post = runs.set_index("scheme").loc["post"]
    span = runs.set_index("scheme").loc["span"]
    assert bool(post["diverged"]) and post["divergence_step"] is not None
    assert not bool(span["diverged"]) and 0 < span["final_val_bpb"] < 8
    assert span["tokens"] == 32 * 4 * 24 and span["tokens_per_s"] > 0
    # probes measured the span run at init and at the end, for every block
    sp = profiles[(profiles["scheme"] == "span") & (profiles["metric"] == "grad_second_moment")]
    assert {"init", "end"} <= set(sp["tag"])
    assert set(sp[sp["tag"] == "end"]["point"]) >= {"blocks.0.resid_post", "blocks.1.resid_post"}
    upd = profiles[(profiles["scheme"] == "span") & (profiles["metric"] == "update_size")]
    assert len(upd) >= 2 and (upd["mean"] > 0).all()


def test_resume_after_kill_matches_uninterrupted(corpus, tmp_path):
    mc, tc = tiny("span", experts=2, top_k=1), fast(checkpoints=3)
    full = train_run(mc, tc, corpus, tmp_path / "full", log=lambda s: None)

    class Killed(Exception):
        pass

    def kill_at_13(step, loss):
        if step == 13:  # checkpoints are at steps 8, 16, 24: the kill loses steps 9..13
            raise Killed

    with pytest.raises(Killed):
        train_run(mc, tc, corpus, tmp_path / "killed", log=lambda s: None, on_step=kill_at_13)
    assert not (tmp_path / "killed" / "result.json").exists()
    logs = []
    resumed = train_run(mc, tc, corpus, tmp_path / "killed", log=logs.append)
    assert any("resumed at step 8" in line for line in logs)
    assert resumed["train_loss"] == full["train_loss"]
    assert resumed["val_loss"] == full["val_loss"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_grid_does_not_redo_finished_runs(corpus, tmp_path, monkeypatch):
    calls = []
    real = grid_mod.train_run

    def killed_on_second(mc, *a, **kw):
        calls.append(mc.depth)
        if mc.depth == 3 and len(calls) == 2:
            raise KeyboardInterrupt
        return real(mc, *a, **kw)

    monkeypatch.setattr(grid_mod, "train_run", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        train_grid(["pre"], [2, 3], tiny(), fast(), corpus, tmp_path, log=lambda s: None)
    finished = json.loads((tmp_path / "runs" / "pre-L2-d32-dense-s0" / "result.json").read_text())
    runs, _ = train_grid(["pre"], [2, 3], tiny(), fast(), corpus, tmp_path, log=lambda s: None)
    assert calls == [2, 3, 3]
    assert len(runs) == 2
    again = json.loads((tmp_path / "runs" / "pre-L2-d32-dense-s0" / "result.json").read_text())
    assert again == finished


def test_checkpoint_round_trip(corpus, tmp_path):
    mc = tiny("deepnorm")
    train_run(mc, fast(), corpus, tmp_path, log=lambda s: None)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["model_config"]["scheme"] == "deepnorm" and ckpt["state"]["step"] == 24
    from analysis.testbed.model import build_model
    model = build_model(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    x, y = corpus.batch("val", 2, 32, generator=torch.Generator().manual_seed(0))
    _, loss = model(x, y)
    assert math.isfinite(loss.item()) and loss.item() < math.log(256)  # it learned something


def test_bad_training_input(corpus, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ValueError, match="shorter than the context"):
        train_run(tiny(), fast(), load_corpus(short), tmp_path / "r")
    with pytest.raises(ValueError, match="unknown device"):
        train_run(tiny(), fast(device="tpu9"), corpus, tmp_path / "r")
    with pytest.raises(ValueError, match="less than one batch"):
        train_run(tiny(), fast(tokens=10), corpus, tmp_path / "r")


def test_train_command_writes_tables_figures_and_section(corpus, tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    text = tmp_path / "t.txt"
    text.write_text("for i in range(10):\n    print(i * i)\n" * 300)
    out = tmp_path / "out"
    cmd = [sys.executable, str(root / "run_analysis.py"), "train", "--schemes", "pre,span",
           "--depths", "2", "--width", "32", "--seq-len", "32", "--batch", "4", "--tokens", "2048",
           "--corpus", str(text), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    runs = pd.read_csv(out / "train_runs.csv")
    assert list(runs.columns[:len(RUN_COLUMNS)]) == RUN_COLUMNS and len(runs) == 2
    assert len(pd.read_csv(out / "train_profiles.csv")) > 0
    md = (out / "train.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", md)
    assert len(links) == 4  # loss vs depth, loss curves, profiles, update sizes
    assert all((out / link).stat().st_size > 1000 for link in links)
    bad = subprocess.run(cmd[:-2] + ["--moe", "2,3", "--out", str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: top-k 3 must be between 1 and the number of experts 2"]


def test_divergence_is_recorded_at_its_step_though_losses_are_read_in_windows(corpus, tmp_path):
    steps = []
    r = train_run(tiny("post"), fast(lr=50.0, check_every=8), corpus, tmp_path, log=lambda s: None,
                  on_step=lambda step, loss: steps.append(step))
    assert r["diverged"]
    d = r["divergence_step"]
    assert r["train_loss"][-1][0] == d and steps[-1] == d  # nothing read past the divergence
    assert [s for s, _ in r["train_loss"]] == list(range(d + 1))  # every step read, in order
    assert r["steps"] >= d + 1  # up to check_every - 1 further steps ran before the host looked


def test_a_changed_setting_never_reuses_a_run(corpus, tmp_path):
    quiet = dict(log=lambda s: None)
    train_grid(["pre"], [2], tiny(), fast(), corpus, tmp_path, **quiet)
    for change, message in [(dict(tokens=32 * 4 * 12), "tokens = 3072, not 1536"),
                            (dict(lr=1e-3), "lr = 0.003, not 0.001"),
                            (dict(warmup_frac=0.2), "warmup_frac = 0.05, not 0.2")]:
        with pytest.raises(ValueError, match=message):
            train_grid(["pre"], [2], tiny(), fast(**change), corpus, tmp_path, **quiet)
    with pytest.raises(ValueError, match="ffn = gelu, not relu"):
        train_grid(["pre"], [2], tiny(ffn="relu"), fast(), corpus, tmp_path, **quiet)
    runs, _ = train_grid(["pre"], [2], tiny(), fast(seed=1), corpus, tmp_path, **quiet)
    assert sorted(runs["seed"]) == [0, 1]  # another seed is another run, beside the first
    assert {"lr", "batch_size", "warmup_frac", "corpus", "heads", "ffn"} <= set(runs.columns)


def test_two_seed_grid_end_to_end(corpus, tmp_path):
    from figures.train import loss_vs_depth, profiles_init_vs_end
    runs, profiles = train_grid(["pre", "span"], [2], tiny(), fast(), corpus, tmp_path,
                                log=lambda s: None, seeds=[0, 1])
    assert len(runs) == 4 and set(runs.groupby("scheme")["seed"].nunique()) == {2}
    assert runs["final_val_bpb"].notna().all()
    assert set(profiles["seed"]) == {0, 1}
    for fig in (loss_vs_depth(runs, tmp_path / "loss"),
                profiles_init_vs_end(profiles, tmp_path / "prof", 2)):
        assert fig.stat().st_size > 1000
    with pytest.raises(ValueError, match="seeds must be distinct"):
        train_grid(["pre"], [2], tiny(), fast(), corpus, tmp_path, seeds=[0, 0])
