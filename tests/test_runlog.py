"""Long runs as users expect: train_log.csv, TensorBoard, run status, run records, progress output,
the optimizer options of the common baseline."""

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import run_analysis
from analysis.infra import progress
from analysis.infra.budget import Cut
from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import ModelConfig, build_model
from analysis.testbed.parametrization import param_groups
from analysis.training.grid import collect, curves, train_grid
from analysis.training.train import TrainConfig, lr_at, train_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 400)
    return load_corpus(path)


@pytest.fixture(autouse=True)
def plain_output():
    """Every test starts with lines on and bars off, and leaves it so."""
    progress.configure(quiet=False, bars=False)
    yield
    progress.configure()


def tiny(scheme="pre", depth=2, **kw):
    return ModelConfig(scheme=scheme, depth=depth, width=32, heads=4, max_seq_len=32, **kw)


def fast(**kw):  # 24 steps of 4 × 32 tokens
    return TrainConfig(**{"tokens": 32 * 4 * 24, "batch_size": 4, "lr": 3e-3, "evals": 3,
                          "eval_batches": 2, "log_every": 5, **kw})


def quiet(_):
    pass


def test_train_log_rows_are_the_smoothed_losses_and_every_validation_point(corpus, tmp_path):
    tc = fast()
    r = train_run(tiny(), tc, corpus, tmp_path, log=quiet)
    log = pd.read_csv(tmp_path / "train_log.csv")
    train, val = log[log["split"] == "train"], log[log["split"] == "val"]
    # a row per 5 steps and the last partial window (steps 21..24)
    assert list(train["step"]) == [5, 10, 15, 20, 24]
    per_step = [v for _, v in r["train_loss"]]
    bounds = [0, 5, 10, 15, 20, 24]
    expected = [sum(per_step[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]
    assert train["loss"].tolist() == pytest.approx(expected, rel=1e-12)
    assert train["lr"].tolist() == pytest.approx([lr_at(s - 1, 24, tc) for s in train["step"]])
    # every validation point, at the steps done when it was measured
    assert list(val["step"]) == [s + 1 for s, _ in r["val_loss"]]
    assert val["loss"].tolist() == pytest.approx([v for _, v in r["val_loss"]], rel=1e-12)
    assert (log["tokens"] == log["step"] * 4 * 32).all()
    walls = log["wall_s"]  # in the order the rows were written
    assert (walls.diff().dropna() >= 0).all() and walls.iloc[-1] <= r["wall_s"] + 1e-3


def test_resumed_run_writes_the_same_log_as_an_uninterrupted_one(corpus, tmp_path):
    mc, tc = tiny("span"), fast(checkpoints=3)
    train_run(mc, tc, corpus, tmp_path / "full", log=quiet)

    class Killed(Exception):
        pass

    def kill_at_13(step, loss):
        if step == 13:  # checkpoints at steps 8, 16, 24: rows past 8 are written again
            raise Killed

    with pytest.raises(Killed):
        train_run(mc, tc, corpus, tmp_path / "killed", log=quiet, on_step=kill_at_13)
    assert pd.read_csv(tmp_path / "killed" / "train_log.csv")["step"].max() > 8
    train_run(mc, tc, corpus, tmp_path / "killed", log=quiet)
    full, resumed = (pd.read_csv(tmp_path / d / "train_log.csv").drop(columns="wall_s")
                     for d in ("full", "killed"))
    pd.testing.assert_frame_equal(full, resumed)


def test_status_ok_stalled_diverged_and_cut(corpus, tmp_path):
    ok = train_run(tiny(), fast(lr=1e-2), corpus, tmp_path / "ok", log=quiet)
    assert ok["status"] == "ok" and not ok["stall_reason"]
    # at lr 1e-6 the model learns nothing: its loss stays near ln 256, above the unigram entropy
    stalled = train_run(tiny(), fast(lr=1e-6), corpus, tmp_path / "stalled", log=quiet)
    plateau = corpus.unigram_bits("train") * math.log(2)
    assert stalled["status"] == "stalled" and stalled["final_train_loss"] > 0.95 * plateau
    assert "unigram entropy" in stalled["stall_reason"]
    assert ok["final_train_loss"] < 0.95 * plateau  # the same model at a working lr is not
    diverged = train_run(tiny("post"), fast(lr=50.0), corpus, tmp_path / "diverged", log=quiet)
    assert diverged["status"] == "diverged" and diverged["divergence_step"] is not None
    with pytest.raises(Cut):
        train_run(tiny(), fast(), corpus, tmp_path / "cut", log=quiet, deadline=0.0)
    cut = pd.read_json(tmp_path / "cut" / "result.json", typ="series")
    assert cut["status"] == "cut" and cut["steps"] < cut["planned_steps"]


def test_grid_tables_carry_status_record_environment_and_settings(corpus, tmp_path, monkeypatch):
    import analysis.training.train as train_mod
    first = tmp_path / "runs" / "pre-L2-d32-dense-s0" / "result.json"
    # the second run reaches its deadline at its first look: a row with status cut
    monkeypatch.setattr(train_mod, "past", lambda deadline: deadline is not None and first.exists())
    base, tc = tiny(), fast(lr=1e-2, beta2=0.99, decay_embeddings=False)
    with pytest.raises(Cut):
        train_grid(["pre"], [2, 3], base, tc, corpus, tmp_path, log=quiet, deadline=math.inf)
    runs, _ = collect(tmp_path)
    assert sorted(runs["status"]) == ["cut", "ok"]
    monkeypatch.undo()
    runs, _ = train_grid(["pre"], [2, 3], base, tc, corpus, tmp_path, log=quiet)
    assert list(runs["status"]) == ["ok", "ok"]
    on_disk = pd.read_csv(tmp_path / "train_runs.csv")
    row = on_disk.iloc[0]
    assert row["torch_version"] == torch.__version__ and row["device"] == "cpu"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode == 0:
        assert row["git_commit"].startswith(head.stdout.strip())
    assert row["wall_s"] > 0 and row["tokens_per_s"] > 0 and row["steps"] == 24
    assert math.isfinite(row["final_train_loss"]) and math.isfinite(row["final_val_loss"])
    assert row["final_val_bpb"] == pytest.approx(row["final_val_loss"] / math.log(2))
    assert (row["seed"], row["lr"], row["warmup_frac"], row["beta2"]) == (0, 1e-2, 0.05, 0.99)
    assert not row["decay_embeddings"] and row["batch_size"] == 4 and row["max_seq_len"] == 32
    # curves come from each run's train_log.csv, with its status
    c = curves(tmp_path)
    assert set(c["split"]) == {"train", "val"} and set(c["status"]) == {"ok"}


def test_tensorboard_events_hold_the_logged_scalars(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train_run(tiny(), fast(tensorboard=True), corpus, tmp_path, log=quiet)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    log = pd.read_csv(tmp_path / "train_log.csv")
    for split in ("train", "val"):
        rows = log[log["split"] == split]
        scalars = events.Scalars(f"loss/{split}")
        assert [e.step for e in scalars] == rows["step"].tolist()
        assert [e.value for e in scalars] == pytest.approx(rows["loss"].tolist(), rel=1e-6)
    assert {"lr", "tokens_per_s"} <= set(events.Tags()["scalars"])


def test_tensorboard_missing_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    code = run_analysis.main(["train", "--tensorboard", "--depths", "2", "--schemes", "pre",
                              "--out", str(tmp_path / "tb")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --tensorboard needs the tensorboard package")
    assert len(err.splitlines()) == 1 and not (tmp_path / "tb").exists()


def test_progress_lines_bars_and_quiet(corpus, tmp_path, capsys):
    train_run(tiny(), fast(), corpus, tmp_path / "lines")  # default log: progress.say
    out, err = capsys.readouterr()
    lines = [l for l in out.splitlines() if l.strip().startswith("step")]
    assert len(lines) == 3  # one line per evaluation, with the rate and time left
    assert all("tokens/s" in l and "lr" in l and "val" in l and "<" in l for l in lines)
    assert err == ""  # not a terminal: no bar
    progress.configure(bars=True)
    train_run(tiny(), fast(), corpus, tmp_path / "bars")
    out, err = capsys.readouterr()
    assert "bars" in err and "24/24" in err and "tokens/s" in err and "loss" in err
    progress.configure(quiet=True)
    train_run(tiny(), fast(), corpus, tmp_path / "quiet")
    assert capsys.readouterr() == ("", "")


def test_cli_train_quiet_prints_results_only_and_flags_reach_the_run(tmp_path, capfd):
    out = tmp_path / "grid"
    # two runs in two worker processes: workers are quiet too
    code = run_analysis.main(["train", "--schemes", "pre", "--depths", "1,2", "--tokens", "8192",
                              "--parallel", "2", "--quiet", "--beta1", "0.8", "--beta2", "0.99", "--weight-decay",
                              "0.05", "--no-decay-embeddings", "--warmup", "0.1",
                              "--min-lr-ratio", "0.2", "--log-every", "4", "--out", str(out)])
    printed = capfd.readouterr()  # file descriptors: the workers' output too
    assert code == 0 and printed.err == "", printed.err
    assert printed.out.strip().splitlines() == [printed.out.strip()]  # the one "wrote …" line
    row = pd.read_csv(out / "train_runs.csv").iloc[0]
    assert (row["beta1"], row["beta2"], row["weight_decay"], row["warmup_frac"],
            row["min_lr_ratio"]) == (0.8, 0.99, 0.05, 0.1, 0.2)
    assert not row["decay_embeddings"] and row["status"] in ("ok", "stalled")
    log = pd.read_csv(out / "runs" / row["run"] / "train_log.csv")
    assert list(log[log["split"] == "train"]["step"])[:3] == [4, 8, 12]
    assert (out / "runs" / row["run"] / "loss.png").exists()
    assert (out / "figures" / "train_loss_curves.png").exists()


@pytest.mark.parametrize("argv,message", [
    (["--beta2", "1.0"], "beta2 must be a finite number in [0, 1)"),
    (["--weight-decay", "-0.1"], "weight_decay must be a finite number >= 0"),
    (["--log-every", "0"], "log_every must be >= 1"),
    (["--stall-share", "1"], "stall_share must be a finite number in [0, 1)"),
])
def test_cli_train_bad_optimizer_and_logging_options(argv, message, tmp_path, capsys):
    code = run_analysis.main(["train", *argv, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_weight_decay_on_matrices_only_leaves_embeddings_norms_and_biases():
    model = build_model(tiny())
    decayed = {id(p) for g in param_groups(model, "adam", 0.1, decay_embeddings=False)
               if g["weight_decay"] for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {n for n, p in model.named_parameters()
                     if p.dim() >= 2 and n not in ("tok_embed.weight", "pos_embed.weight")}
    assert "head.weight" in names and not any("norm" in n or n.endswith(".bias") for n in names)
    default = {id(p) for g in param_groups(model, "adam", 0.1) if g["weight_decay"]
               for p in g["params"]}  # unchanged default: embeddings decayed too
    assert default == decayed | {id(model.tok_embed.weight), id(model.pos_embed.weight)}
    tied = build_model(tiny(tie_embeddings=True))
    groups = param_groups(tied, "adam", 0.1, decay_embeddings=False)
    assert not any(p is tied.tok_embed.weight for g in groups if g["weight_decay"]
                   for p in g["params"])


def test_grid_figure_marks_stalled_and_diverged_runs(corpus, tmp_path):
    from figures.train import loss_curves
    train_run(tiny(), fast(lr=1e-6), corpus, tmp_path / "runs" / "pre-L2-d32-dense-s0", log=quiet)
    train_run(tiny("post"), fast(lr=50.0), corpus, tmp_path / "runs" / "post-L2-d32-dense-s0",
              log=quiet)
    c = curves(tmp_path)
    assert set(c.groupby("run")["status"].first()) == {"stalled", "diverged"}
    import matplotlib.pyplot as plt
    from figures import train as figures_train
    drawn = []
    real = figures_train.save
    figures_train.save = lambda fig, path, fmt="png": drawn.append(fig) or real(fig, path, fmt)
    try:
        path = loss_curves(c, tmp_path / "curves", "png")
    finally:
        figures_train.save = real
    ax = drawn[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "pre L=2 (stalled)" in labels and "post L=2 (diverged)" in labels
    assert any(l.get_marker() == "x" for l in ax.get_lines())  # where the run diverged
    assert path.exists()
    plt.close("all")


def test_resume_survives_a_log_row_cut_short(corpus, tmp_path):
    mc, tc = tiny(), fast(lr=1e-2, checkpoints=3)
    with pytest.raises(Cut):  # cut at the first look: a checkpoint and a partial log
        train_run(mc, tc, corpus, tmp_path, log=quiet, deadline=0.0)
    with (tmp_path / "train_log.csv").open("a") as f:
        f.write("tra")  # a kill in the middle of writing a row
    r = train_run(mc, tc, corpus, tmp_path, log=quiet)
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert r["status"] == "ok" and list(log[log["split"] == "train"]["step"]) == [5, 10, 15, 20, 24]
