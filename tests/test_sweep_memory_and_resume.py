"""The init sweep on a device that may not hold it: memory estimated and refused up front, each
grid point written as it finishes, a cut sweep resumed, an out-of-memory error in one line."""

import json

import pandas as pd
import pytest
import torch

import analysis.init.sweep as sweep_mod
from analysis.testbed.memory import estimate
from analysis.testbed.model import ModelConfig, build_model
from run_analysis import main


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("def f(x):\n    return x * 2\n" * 400)
    return str(path)


def sweep_args(text, out, *extra):
    return ["sweep", "--schemes", "pre,post", "--depths", "2,3", "--seeds", "0", "--width", "16",
            "--heads", "2", "--seq-len", "16", "--batch", "2", "--batches", "1", "--corpus", text,
            "--out", str(out), *extra]


def test_estimate_counts_parameters_exactly_and_activations_from_above():
    cfg = ModelConfig(scheme="post", depth=4, width=32, heads=4, max_seq_len=32)
    est = estimate(cfg, 4, 32)
    model = build_model(cfg)
    assert est.params == 4 * sum(p.numel() for p in model.parameters())
    saved = {}

    def pack(t):  # what autograd really keeps, one entry per storage
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*[torch.zeros(4, 32, dtype=torch.long)] * 2)
    assert sum(saved.values()) <= est.activations <= 1.6 * sum(saved.values())
    deep = estimate(ModelConfig(scheme="mixln", depth=64, width=32, heads=4, max_seq_len=32), 4, 32)
    assert deep.activations > 10 * est.activations  # blocks of each structure, counted per block


def test_a_point_that_cannot_fit_is_refused_before_anything_runs(text, tmp_path, monkeypatch, capsys):
    sizes = {d: max(estimate(ModelConfig(scheme=s, depth=d, width=16, heads=2, max_seq_len=16), 2, 16).total
                    for s in ("pre", "post")) for d in (2, 3)}
    monkeypatch.setattr(sweep_mod, "available_memory", lambda dev: (sizes[2] + sizes[3]) / 2 / 0.9)
    measured = []
    monkeypatch.setattr(sweep_mod, "measure", lambda *a, **k: measured.append(a))
    assert main(sweep_args(text, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs ≈" in err[0] and " free" in err[0] and "depth 3" in err[0]
    assert "depths that fit: 2" in err[0]
    assert measured == []


def test_cut_sweep_keeps_finished_points_and_resumes(text, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real = sweep_mod.measure
    calls = []

    def oom_on_third(cfg, *a, **k):
        calls.append((cfg.scheme, cfg.depth))
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(cfg, *a, **k)

    monkeypatch.setattr(sweep_mod, "measure", oom_on_third)
    assert main(sweep_args(text, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory") and str(out) in err[0]
    kept = pd.read_csv(out / "init_profiles.csv")
    assert set(zip(kept["scheme"], kept["depth"])) == {("pre", 2), ("pre", 3)}
    assert json.loads((out / "config.json").read_text())["depths"] == [2, 3]

    calls.clear()
    monkeypatch.setattr(sweep_mod, "measure", lambda cfg, *a, **k: calls.append(cfg.depth) or real(cfg, *a, **k))
    assert main(sweep_args(text, out)) == 0
    assert calls == [2, 3]  # only post's two points: pre's were kept
    full = pd.read_csv(out / "init_profiles.csv")
    assert set(zip(full["scheme"], full["depth"])) == {("pre", 2), ("pre", 3), ("post", 2), ("post", 3)}
    assert len(full) == len(full.drop_duplicates())
    assert (out / "report.md").exists()


def test_a_folder_of_other_settings_is_refused_naming_the_difference(text, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"width": 32, "depths": [2, 3]}))
    (out / "init_profiles.csv").write_text("scheme,depth\n")  # a sweep of before stamps
    assert main(sweep_args(text, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "width = 32, not 16" in err and len(err.splitlines()) == 1
