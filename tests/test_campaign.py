"""The campaign: the CPU rehearsal end to end, a cut resumed, bad input refused in one line."""

import json
import tarfile
import time

import pandas as pd
import pytest

import analysis.training.campaign as campaign_mod
from analysis.infra.budget import Cut
from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import ModelConfig
from analysis.training.train import TrainConfig, train_run
from run_analysis import main

TINY = ["campaign", "--device", "cpu", "--tiny", "--compile-backend", "aot_eager"]


def test_tiny_campaign_end_to_end(tmp_path, capsys):
    out = tmp_path / "c"
    assert main([*TINY, "--out", str(out)]) == 0
    state = json.loads((out / "campaign.json").read_text())
    assert state["stages"] == {s: "done" for s in campaign_mod.STAGES}
    for f in ["dense/train_runs.csv", "moe/train_runs.csv", "probe_overhead.csv", "throughput.csv",
              "probe_overhead_rounds.csv",
              "init/errors.csv", "init/claims.csv", "report.md", "dense/figures/train_loss_vs_depth.png"]:
        assert (out / f).stat().st_size > 0, f
    bundle = out / "campaign-bundle.tar.gz"
    assert bundle.stat().st_size < 5e6
    names = tarfile.open(bundle).getnames()
    assert "report.md" in names and not any("checkpoint" in n for n in names)
    ops = pd.read_csv(out / "probe_overhead_ops.csv").query("op == '(all aten ops)'").set_index("copy")
    assert ops.loc["eager+probe", "calls"] > ops.loc["eager", "calls"]  # the probe's own ops, counted
    modes = set(pd.read_csv(out / "probe_overhead.csv")["mode"])
    assert modes == {"eager", "eager, fused probe", "compiled"}
    report = (out / "report.md").read_text()
    assert "| dense_grid | done |" in report and "Probe overhead" in report
    assert "campaign complete" in capsys.readouterr().out


def test_a_cut_stage_is_reported_and_resumed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "c"
    ran = []

    def cut_once(cfg, folder, deadline, log):
        ran.append("probe_overhead")
        if len(ran) == 1:
            raise Cut("simulated time limit")
        (folder / "probe_overhead.csv").write_text("shape,mode\ntiny,eager\n")

    monkeypatch.setitem(campaign_mod.RUNNERS, "probe_overhead", cut_once)
    args = [*TINY, "--out", str(out), "--stages", "probe_overhead,throughput"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "cut at the time limit" in text and "remaining: probe_overhead" in text
    assert json.loads((out / "campaign.json").read_text())["stages"] == {"probe_overhead": "cut"}
    assert main(args) == 0
    assert json.loads((out / "campaign.json").read_text())["stages"] == {
        "probe_overhead": "done", "throughput": "done"}
    assert ran == ["probe_overhead", "probe_overhead"]
    capsys.readouterr()
    assert main(args) == 0  # everything done: kept, not redone
    assert capsys.readouterr().out.count("done earlier, kept") == 2 and len(ran) == 2


def test_a_failing_stage_is_recorded_and_the_next_stages_still_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "c"
    ran = []

    def broken(cfg, folder, deadline, log):
        raise RuntimeError("simulated CUDA error")

    def works(cfg, folder, deadline, log):
        ran.append("throughput")
        (folder / "throughput.csv").write_text("shape,mode\ntiny,eager\n")

    monkeypatch.setitem(campaign_mod.RUNNERS, "probe_overhead", broken)
    monkeypatch.setitem(campaign_mod.RUNNERS, "throughput", works)
    assert main([*TINY, "--out", str(out), "--stages", "probe_overhead,throughput"]) == 0
    text = capsys.readouterr().out
    assert "probe_overhead: FAILED (RuntimeError: simulated CUDA error)" in text
    assert "remaining: probe_overhead" in text and ran == ["throughput"]
    state = json.loads((out / "campaign.json").read_text())
    assert state["stages"] == {"probe_overhead": "failed", "throughput": "done"}
    assert "simulated CUDA error" in state["errors"]["probe_overhead"]
    assert "probe_overhead-error.txt" in tarfile.open(out / "campaign-bundle.tar.gz").getnames()


def test_a_run_cut_at_its_deadline_resumes_to_the_uninterrupted_result(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("def add(a, b):\n    return a + b\n" * 300)
    corpus = load_corpus(path)
    mc = ModelConfig(scheme="span", depth=2, width=16, heads=2, max_seq_len=16)
    tc = TrainConfig(tokens=16 * 2 * 20, batch_size=2, evals=4, eval_batches=1, check_every=4)
    full = train_run(mc, tc, corpus, tmp_path / "full", log=lambda s: None)
    with pytest.raises(Cut, match="checkpoint saved"):
        train_run(mc, tc, corpus, tmp_path / "cut", log=lambda s: None, deadline=time.time())
    resumed = train_run(mc, tc, corpus, tmp_path / "cut", log=lambda s: None)
    assert resumed["train_loss"] == full["train_loss"] and resumed["val_loss"] == full["val_loss"]


@pytest.mark.parametrize("extra,message", [
    (["--stages", "dense_grid,warp"], "unknown stage 'warp'"),
    (["--time-limit", "10"], "too small for any step"),
    (["--parallel", "0"], "parallel must be >= 1"),
])
def test_bad_campaign_input_is_one_line(tmp_path, capsys, extra, message):
    assert main([*TINY, "--out", str(tmp_path / "c"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_folder_of_another_campaign_is_refused_naming_the_difference(tmp_path, capsys, monkeypatch):
    out = tmp_path / "c"
    monkeypatch.setitem(campaign_mod.RUNNERS, "throughput",
                        lambda cfg, folder, deadline, log: (folder / "throughput.csv").write_text("a\n1\n"))
    assert main([*TINY, "--out", str(out), "--stages", "throughput"]) == 0
    capsys.readouterr()
    assert main([*TINY, "--out", str(out), "--stages", "throughput", "--no-compile"]) == 2
    err = capsys.readouterr().err.strip()
    assert "compile = True, not False" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_tiny_campaign_with_inductor_as_on_the_gpu(tmp_path):
    out = tmp_path / "c"
    assert main(["campaign", "--device", "cpu", "--tiny", "--out", str(out)]) == 0
    state = json.loads((out / "campaign.json").read_text())
    assert state["settings"]["compile_backend"] == "inductor"
    assert state["stages"] == {s: "done" for s in campaign_mod.STAGES}


def test_the_probe_overhead_is_the_median_of_paired_rounds_and_lies_in_its_quartiles():
    from analysis.bench.probe_overhead import overhead_rows
    # per-round ratios 0.5, 0.1, 1.0: their median 0.5; the ratio of the medians would say 0.1
    (row,) = overhead_rows({"eager": [1.0, 2.0, 3.0], "eager+probe": [1.5, 2.2, 6.0]})
    assert row["overhead"] == pytest.approx(0.5)
    assert row["overhead_q1"] <= row["overhead"] <= row["overhead_q3"]
    assert (row["unprobed_ms"], row["probed_ms"]) == (2.0, 2.2)


def test_the_campaign_report_opens_with_verdicts_and_lists_every_recorded_stage(tmp_path):
    from figures.campaign import campaign_blocks
    state = {"settings": {"device": "cuda", "compile": True, "compile_backend": "inductor", "tiny": False},
             "selected": ["init_sweep"],  # the last invocation ran one stage; others were done before
             "stages": {"dense_grid": "done", "probe_overhead": "done", "init_sweep": "done"},
             "seconds": {"dense_grid": 360.0, "probe_overhead": 90.0, "init_sweep": 300.0}}
    runs = pd.DataFrame({"scheme": ["pre", "span", "pre", "span"], "depth": [12, 12, 96, 96],
                         "status": ["ok", "ok", "ok", "stalled"], "final_val_bpb": [2.6, 2.1, 2.9, 4.7]})
    overhead = pd.DataFrame({"mode": ["compiled"], "overhead": [0.27], "overhead_q1": [0.2],
                             "overhead_q3": [0.3]})
    blocks = campaign_blocks(tmp_path, state, {"dense": runs, "probe_overhead": overhead})
    lines = blocks[1][1].lines
    assert lines[0] == ("Dense grid: best final validation loss (bits/byte) L = 12 span 2.100, "
                        "L = 96 pre 2.900; not ok: span L = 96 stalled.")
    assert lines[1] == "Probe overhead, compiled: +27 % (quartiles +20 … +30 %) (target ≤ 5 %: fails)."
    stage_table = next(p for kind, p in blocks if kind == "table")
    assert list(stage_table["stage"]) == ["dense_grid", "probe_overhead", "init_sweep"]
