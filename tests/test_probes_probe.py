"""Probe on the testbed: every statistic equals a direct computation from retained tensors and grads."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from analysis.testbed.model import ModelConfig, build_model
from probes import SITES, Probe, confirm_placement, locate, point_name

MAX_SEQS, MAX_TOKENS = 2, 8  # T = 16 below, so the SVD metrics really use a sample


def _model(scheme, dtype="float64"):
    return build_model(ModelConfig(scheme=scheme, depth=3, width=32, heads=4, max_seq_len=16, dtype=dtype),
                       seed=3)


def _capture(model):
    """Forward hooks that keep each point's tensor (retain_grad) and block inputs: the direct route."""
    store, handles = [], []

    def keep(name, x):
        if x.requires_grad:
            x.retain_grad()
        store[-1][name] = x

    for i, block in enumerate(model.blocks):
        def block_hook(mod, args, out, i=i):
            if i == 0:
                keep("embed", args[0])
            keep(f"blocks.{i}.resid_post", out)
            store[-1][f"blocks.{i}.input"] = args[0]
        handles.append(block.register_forward_hook(block_hook))
        if block.output_norm is not None:
            handles.append(block.output_norm.register_forward_hook(
                lambda mod, args, out, i=i: keep(f"blocks.{i}.pre_norm_sum", args[0])))
    handles.append(model.final_norm.register_forward_hook(lambda mod, args, out: keep("final", out)))
    return store, handles


def _direct(x, metric, x_in=None):
    a = x.detach().double().numpy()
    if metric == "second_moment":
        return (a ** 2).mean()
    if metric == "variance":
        return a.var(axis=-1).mean()
    if metric == "mean":
        return a.mean()
    if metric == "max_abs":
        return np.abs(a).max()
    if metric == "token_cosine":
        u = a / np.linalg.norm(a, axis=-1, keepdims=True)
        g = u @ u.transpose(0, 2, 1)
        T = a.shape[1]
        return ((g.sum((1, 2)) - np.trace(g, axis1=1, axis2=2)) / (T * (T - 1))).mean()
    if metric == "dong_residual":
        return np.mean([np.linalg.norm(s - s.mean(0)) / np.linalg.norm(s) for s in a])
    if metric in ("median_token_second_moment", "massive_ratio"):
        per_token = np.sort((a ** 2).mean(-1).ravel())
        med = per_token[(len(per_token) - 1) // 2]  # torch.median: the lower middle value
        return med if metric == "median_token_second_moment" else np.abs(a).max() / math.sqrt(med)
    if metric == "first_token_second_moment":
        return (a[:, 0] ** 2).mean()
    if metric == "effective_rank_normalized":
        a = a / np.linalg.norm(a, axis=-1, keepdims=True)
        return _direct(torch.from_numpy(a), "effective_rank")
    if metric == "first_token":
        power = (a ** 2).sum(-1).mean(0)
        return power[0] / power.mean()
    if metric in ("effective_rank", "stable_rank"):
        T = a.shape[1]
        sample = a[:MAX_SEQS, np.arange(MAX_TOKENS) * T // MAX_TOKENS]
        out = []
        for s in sample:
            sv = np.linalg.svd(s, compute_uv=False)
            p = sv / sv.sum()
            out.append(math.exp(-(p * np.log(p)).sum()) if metric == "effective_rank"
                       else (sv ** 2).sum() / sv[0] ** 2)
        return np.mean(out)
    b = x_in.detach().double().numpy()
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return cos.mean() if metric == "layer_cosine" else (np.arccos(np.clip(cos, -1, 1)) / math.pi).mean()


def _scale(metric, sm, gsm):
    return {"mean": math.sqrt(sm), "max_abs": math.sqrt(sm), "second_moment": sm, "variance": sm,
            "median_token_second_moment": sm, "first_token_second_moment": sm,
            "grad_second_moment": gsm, "grad_median_token_second_moment": gsm,
            "grad_first_token_second_moment": gsm}.get(metric, 1.0)


@pytest.mark.parametrize("scheme,dtype,rtol", [("post", "float64", 1e-5), ("pre", "float64", 1e-5),
                                               ("mixln", "float64", 1e-5), ("span", "float32", 1e-5), ("post", "float32", 1e-5)])
def test_probe_equals_direct_computation(scheme, dtype, rtol):
    model = _model(scheme, dtype)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (3, 16), generator=gen) for _ in range(4)]
    store, handles = _capture(model)
    with Probe(model, "all", max_seqs=MAX_SEQS, max_tokens=MAX_TOKENS) as p:
        for idx in batches:
            store.append({})
            _, loss = model(idx, idx)
            loss.backward()
    for h in handles:
        h.remove()
    df = p.frame()
    expected_points = {"embed", "final"} | {f"blocks.{i}.resid_post" for i in range(3)} | {
        f"blocks.{i}.pre_norm_sum" for i, b in enumerate(model.blocks) if b.output_norm is not None}
    assert set(df["point"]) == expected_points
    assert (df["count"] == len(batches)).all()
    checked = 0
    for row in df.itertuples():
        if row.metric.startswith("grad_"):  # a forward metric applied to the gradient
            vals = [_direct(s[row.point].grad, row.metric.removeprefix("grad_")) for s in store]
        else:
            x_in = [s.get(f"blocks.{row.layer}.input") for s in store]
            vals = [_direct(s[row.point], row.metric, xi) for s, xi in zip(store, x_in)]
        sm = np.mean([_direct(s[row.point], "second_moment") for s in store])
        gsm = np.mean([_direct(s[row.point].grad, "second_moment") for s in store])
        atol = rtol * _scale(row.metric, sm, gsm)
        np.testing.assert_allclose(row.mean, np.mean(vals), rtol=rtol, atol=atol, err_msg=f"{row.point} {row.metric}")
        np.testing.assert_allclose(row.std, np.std(vals, ddof=1), rtol=rtol * 10, atol=atol,
                                   err_msg=f"{row.point} {row.metric} std")
        np.testing.assert_allclose(row.spread, np.std(vals, ddof=1) / math.sqrt(len(vals)), rtol=rtol * 10,
                                   atol=atol, err_msg=f"{row.point} {row.metric} spread")
        checked += 1
    assert checked == len(df) > 40


def test_layer_index_and_columns():
    model = _model("post")
    with Probe(model, ["second_moment", "layer_cosine"]) as p:
        model(torch.randint(0, 256, (2, 16)))
    df = p.frame()
    assert list(df.columns) == ["layer", "point", "site", "metric", "mean", "spread", "count", "std"]
    layers = df.drop_duplicates("point").set_index("point")["layer"]
    assert layers["embed"] == -1 and layers["blocks.0.resid_post"] == 0 and layers["final"] == 3
    assert set(df.loc[df.metric == "layer_cosine", "site"]) == {"resid_post"}
    assert df["spread"].isna().all()  # one batch: no spread


def test_points_filter_and_streaming_memory_is_tiny():
    model = _model("post")
    with Probe(model, points=["blocks.*.resid_post"]) as p:
        for _ in range(3):
            _, loss = model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))
            loss.backward()
    assert set(p.frame()["point"]) == {f"blocks.{i}.resid_post" for i in range(3)}
    assert p.nbytes < 1000
    with pytest.raises(ValueError, match="match no point"):
        Probe(model, points="blocks.*.nonsense")


def test_reset_and_hooks_removed_on_exit():
    model = _model("pre")
    idx = torch.randint(0, 256, (2, 16))
    with Probe(model, "forward") as p:
        model(idx)
        p.reset()
        model(idx)
        model(idx)
    model(idx)  # after exit: not counted
    assert (p.frame()["count"] == 2).all()
    assert not any(m._forward_hooks for m in model.modules())


def test_forward_only_under_no_grad_drops_grad_rows_unless_asked():
    model = _model("pre")
    with Probe(model) as p, torch.no_grad():
        model(torch.randint(0, 256, (2, 16)))
    assert "grad_second_moment" not in set(p.frame()["metric"])
    with Probe(model, ["second_moment", "grad_second_moment"]) as p, torch.no_grad():
        model(torch.randint(0, 256, (2, 16)))
    with pytest.raises(RuntimeError, match="no_grad"):
        p.frame()


def test_model_without_gradients_is_reported():
    model = _model("pre").requires_grad_(False)
    with Probe(model, ["grad_second_moment"]) as p:
        model(torch.randint(0, 256, (2, 16)))
    with pytest.raises(RuntimeError, match="no gradients at the probed points"):
        p.frame()


def test_loss_that_does_not_depend_on_points_is_reported():
    model = _model("pre")
    with Probe(model) as p:
        model(torch.randint(0, 256, (2, 16)))
        model.head.weight.square().sum().backward()
    with pytest.raises(RuntimeError, match="no gradient reached any probed point"):
        p.frame()
    with Probe(model, points=["embed", "final"]) as p:  # a loss on the embedding only
        x = model.tok_embed(torch.randint(0, 256, (2, 16)))
        model(torch.randint(0, 256, (2, 16)))
        for blk in model.blocks:
            x = blk(x)  # runs the blocks again: embed gets gradient, final never does
        x.sum().backward()
    with pytest.raises(RuntimeError, match="does not depend on the probed points final"):
        p.frame()


def test_nothing_ran_is_an_error():
    with Probe(_model("pre")) as p:
        pass
    with pytest.raises(RuntimeError, match="no statistics recorded"):
        p.frame()


class _Residual(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(x)


class _IntBlock(nn.Module):
    def forward(self, x):
        return x.round().long()


def test_generic_fallback_override_and_errors():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 8)
            self.stack = nn.ModuleList(_Residual(8) for _ in range(5))
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            x = self.stem(x)
            for b in self.stack:
                x = b(x)
            return self.out(x)

    net = Net()
    layout = locate(net)
    assert layout.blocks == tuple(f"stack.{i}" for i in range(5)) and "generic" in layout.how
    assert layout.placement == "unknown"
    assert confirm_placement(net, layout, torch.randn(2, 6, 4)).placement == "pre"
    with Probe(net, blocks=["stack.1", "stack.3"], final="out") as p:
        net(torch.randn(2, 6, 4)).sum().backward()
    df = p.frame()
    assert set(df["point"]) == {"embed", "blocks.0.resid_post", "blocks.1.resid_post", "final"}
    with pytest.raises(ValueError, match="pass blocks="):
        locate(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="not a submodule"):
        locate(net, blocks="stak")
    ints = nn.Sequential(nn.Linear(4, 4))
    ints.blocks = nn.ModuleList([_IntBlock(), _IntBlock()])
    ints.forward = lambda x: ints.blocks[1](ints.blocks[0](x).float())
    with Probe(ints, "forward") as p:
        with pytest.raises(TypeError, match="torch.int64 tensor"):
            ints(torch.randn(2, 3, 4))


def test_bf16_autocast_and_bf16_model_match_float32():
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    frames = {}
    for mode in ("float32", "autocast", "bfloat16"):
        model = _model("pre", "bfloat16" if mode == "bfloat16" else "float32")
        with Probe(model, ["second_moment", "token_cosine", "grad_second_moment"]) as p:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
                _, loss = model(idx, idx)
            loss.backward()
        frames[mode] = p.frame()
    ref = frames["float32"]["mean"].to_numpy()
    for mode in ("autocast", "bfloat16"):
        got = frames[mode]["mean"].to_numpy()
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=0.1, atol=1e-3 * np.abs(ref).max(), err_msg=mode)


def test_sampled_metrics_can_wait_for_forward_only_passes():
    """diagnose's backward passes skip the SVD metrics: they count only the no_grad batches, the rest all."""
    from analysis.testbed.model import ModelConfig, build_model
    from probes import Probe
    model = build_model(ModelConfig(scheme="pre", depth=2, width=16, heads=2, max_seq_len=16))
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    with Probe(model, metrics=["second_moment", "effective_rank", "grad_second_moment"],
               sampled_without_grad_only=True) as p:
        for _ in range(2):
            model.tok_embed.weight.requires_grad_(True)
            model(x, x)[1].backward()
        mid = p.frame()  # backward passes only so far: the rank has no count, and that is no error
        with torch.no_grad():
            for _ in range(3):
                model(x)
    f = p.frame().set_index(["point", "metric"])
    assert (mid[mid.metric == "effective_rank"]["count"] == 0).all()
    assert f.loc[("blocks.0.resid_post", "second_moment"), "count"] == 5
    assert f.loc[("blocks.0.resid_post", "effective_rank"), "count"] == 3
    assert f.loc[("blocks.0.resid_post", "grad_second_moment"), "count"] == 2


def test_point_name_is_the_stable_format():
    """The names are an output format: pinned here literally, and the ones Layout.points() lists."""
    assert point_name(0) == "blocks.0.resid_post"
    assert point_name(11, "pre_norm_sum") == "blocks.11.pre_norm_sum"
    assert point_name(-1, "embed") == "embed" and point_name(3, "final") == "final"
    assert SITES == ("embed", "pre_norm_sum", "resid_post", "final")
    with pytest.raises(ValueError, match="resid_pre"):
        point_name(0, "resid_pre")
    layout = locate(_model("post"))
    assert layout.points() == ["embed"] + [point_name(i, s) for i in range(3)
                                           for s in ("pre_norm_sum", "resid_post")] + ["final"]
