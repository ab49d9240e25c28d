"""Probes under torch.compile: installed before compiling they are traced; after, they fail loudly."""

import copy

import numpy as np
import pytest
import torch

from analysis.testbed.model import ModelConfig, build_model
from probes import Probe, enable_hook_guards


def _setup():
    torch.compiler.reset()
    model = build_model(ModelConfig(scheme="post", depth=2, width=32, heads=2, max_seq_len=16))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(3)]
    return model, batches


def _train(model, batches):
    for idx in batches:
        _, loss = model(idx, idx)
        loss.backward()


def test_probe_installed_before_compile_matches_eager():
    model, batches = _setup()
    with Probe(model) as eager:
        _train(model, batches)
    with Probe(model) as compiled:
        _train(torch.compile(model), batches)
    e, c = eager.frame(), compiled.frame()
    assert len(c) == len(e) and (c["count"] == 3).all()
    assert "grad_second_moment" in set(c["metric"])
    assert list(c["point"]) == list(e["point"]) and list(c["metric"]) == list(e["metric"])
    np.testing.assert_allclose(c["mean"], e["mean"], rtol=1e-4, atol=1e-6)
    torch.compiler.reset()


def test_probe_after_compile_without_hook_guards_fails_loudly(monkeypatch):
    model, batches = _setup()
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", True)  # torch's default
    compiled = torch.compile(model)
    _train(compiled, batches[:1])  # traced without hooks
    for target in (compiled, model):
        with Probe(target) as p:
            _train(compiled, batches)
        with pytest.raises(RuntimeError, match="compiled before the probe"):
            p.frame()
    torch.compiler.reset()


def test_hook_guards_retrace_when_probe_comes_and_goes():
    model, batches = _setup()
    enable_hook_guards()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model)
    _train(torch.compile(twin), batches[:1])  # the same code traced without hooks first
    with Probe(model) as p:
        _train(compiled, batches)
    before = p.frame()
    _train(compiled, batches)  # probe gone: the guard fails, the graph is retraced without it
    assert (before["count"] == 3).all() and p.frame().equals(before)
    torch.compiler.reset()


@pytest.mark.slow
def test_recompile_option_picks_up_hooks(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", True)
    model, batches = _setup()
    compiled = torch.compile(model)
    _train(compiled, batches[:1])
    with Probe(compiled, recompile=True) as p:
        _train(compiled, batches)
    assert (p.frame()["count"] == 3).all()
    torch.compiler.reset()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_fused_statistics_match_the_plain_ones(backend):
    # fuse=True runs each point's statistics as one compiled function around an eager model
    model, batches = _setup()
    frames = []
    for kw in ({}, dict(fuse=True, fuse_backend=backend)):
        with Probe(model, **kw) as probe:
            _train(model, batches)
            with torch.no_grad():
                model(batches[0][:1, :8], batches[0][:1, :8])  # another shape, forward only
        frames.append(probe.frame())
    assert probe._fused, "fuse=True compiled nothing"
    p, f = frames
    assert list(f["point"]) == list(p["point"]) and list(f["metric"]) == list(p["metric"])
    assert list(f["count"]) == list(p["count"])
    np.testing.assert_allclose(f["mean"], p["mean"], rtol=1e-4, atol=1e-7)
    torch.compiler.reset()


def test_an_unknown_fuse_backend_is_refused_by_name():
    model, _ = _setup()
    with pytest.raises(ValueError, match="unknown fuse_backend 'nonsense'"):
        Probe(model, fuse=True, fuse_backend="nonsense")
