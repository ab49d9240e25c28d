"""probes.metrics on matrices with known answers, and against direct (T×T, SVD) computations."""

import math

import numpy as np
import pytest
import torch

from probes import metrics as M


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_identical_tokens_are_fully_collapsed():
    x = torch.randn(1, 37, generator=_gen()).repeat(23, 1)  # X = 1 xᵀ: rank 1, all tokens equal
    assert M.token_cosine(x).item() == pytest.approx(1.0, abs=1e-6)
    assert M.effective_rank(x).item() == pytest.approx(1.0, abs=1e-4)
    assert M.stable_rank(x).item() == pytest.approx(1.0, abs=1e-5)
    assert M.dong_residual(x).item() == pytest.approx(0.0, abs=2e-3)  # sqrt of a float32 cancellation


def test_rank_one_positive_scales_cosine_one_rank_one():
    g = _gen(1)
    u = torch.rand(16, 1, generator=g) + 0.5
    v = torch.randn(1, 40, generator=g)
    x = u * v  # rank 1, tokens parallel but of different lengths: not 1x̄ᵀ
    assert M.token_cosine(x).item() == pytest.approx(1.0, abs=1e-6)
    assert M.effective_rank(x).item() == pytest.approx(1.0, abs=1e-4)
    assert M.dong_residual(x).item() > 0.05


@pytest.mark.parametrize("n", [1, 5, 32])
def test_orthonormal_rows_have_full_effective_rank(n):
    q, _ = torch.linalg.qr(torch.randn(64, n, generator=_gen(n), dtype=torch.float64))
    x = q.T.contiguous()  # n orthonormal rows of width 64
    assert M.effective_rank(x).item() == pytest.approx(n, rel=1e-6)
    assert M.stable_rank(x).item() == pytest.approx(n, rel=1e-6)
    if n > 1:
        assert M.token_cosine(x).item() == pytest.approx(0.0, abs=1e-9)


def test_gaussian_token_cosine_is_zero_within_its_spread():
    d, T, B = 2048, 24, 96
    x = torch.randn(B, T, d, generator=_gen(2))
    per_seq = torch.stack([M.token_cosine(x[b]) for b in range(B)]).double()
    # independent isotropic tokens: each cosine has mean 0, variance 1/d, and distinct pairs
    # are uncorrelated, so a sequence's mean over P = T(T-1)/2 pairs has std 1/sqrt(d·P)
    sd = 1.0 / math.sqrt(d * T * (T - 1) / 2)
    assert abs(M.token_cosine(x).item()) < 5 * sd / math.sqrt(B)
    assert per_seq.std().item() == pytest.approx(sd, rel=0.25)


def test_token_cosine_matches_the_pair_matrix():
    x = torch.randn(3, 11, 8, generator=_gen(3)) + 0.7  # a shared mean direction: cosine > 0
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    gram = u @ u.transpose(1, 2)
    T = x.shape[1]
    ref = ((gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)) / (T * (T - 1))).mean()
    assert M.token_cosine(x).item() == pytest.approx(ref.item(), rel=1e-5)
    assert ref.item() > 0.1


def test_moments_match_numpy():
    x = torch.randn(2, 5, 7, generator=_gen(4)) * 3 + 1
    a = x.double().numpy()
    assert M.second_moment(x).item() == pytest.approx((a ** 2).mean(), rel=1e-6)
    assert M.mean(x).item() == pytest.approx(a.mean(), rel=1e-6)
    assert M.variance(x).item() == pytest.approx(a.var(axis=-1).mean(), rel=1e-6)
    assert M.max_abs(x).item() == pytest.approx(np.abs(a).max(), rel=1e-7)


def test_svd_metrics_and_dong_match_direct_computation():
    x = torch.randn(2, 9, 6, generator=_gen(5)) + torch.randn(6, generator=_gen(6))
    ref_e, ref_s, ref_d = [], [], []
    for X in x.double():
        s = np.linalg.svd(X.numpy(), compute_uv=False)
        p = s / s.sum()
        ref_e.append(math.exp(-(p * np.log(p)).sum()))
        ref_s.append((s ** 2).sum() / s[0] ** 2)
        ref_d.append(np.linalg.norm(X.numpy() - X.numpy().mean(0)) / np.linalg.norm(X.numpy()))
    assert M.effective_rank(x).item() == pytest.approx(np.mean(ref_e), rel=1e-5)
    assert M.stable_rank(x).item() == pytest.approx(np.mean(ref_s), rel=1e-5)
    assert M.dong_residual(x).item() == pytest.approx(np.mean(ref_d), rel=1e-5)


def test_token_sample_is_bounded():
    x = torch.randn(10, 1000, 4)
    s = M.token_sample(x, max_seqs=3, max_tokens=50)
    assert s.shape == (3, 50, 4)
    assert torch.equal(s[0, 0], x[0, 0]) and torch.equal(s[0, 1], x[0, 20])


def test_layer_cosine_and_angular_distance():
    a = torch.randn(2, 6, 16, generator=_gen(7))
    b = torch.randn(2, 6, 16, generator=_gen(8))
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    assert M.layer_cosine(a, b).item() == pytest.approx(cos.mean().item(), rel=1e-5)
    assert M.angular_distance(a, b).item() == pytest.approx((torch.arccos(cos) / math.pi).mean().item(), rel=1e-5)
    assert M.layer_cosine(a, 2 * a).item() == pytest.approx(1.0, abs=1e-6)
    assert M.angular_distance(a, -a).item() == pytest.approx(1.0, abs=2e-4)  # arccos near -1 in float32


def test_low_precision_is_upcast_and_bad_input_rejected():
    x = torch.randn(2, 8, 16, generator=_gen(9))
    assert M.second_moment(x.bfloat16()).dtype == torch.float32
    assert M.second_moment(x.bfloat16()).item() == pytest.approx(M.second_moment(x).item(), rel=2e-2)
    with pytest.raises(TypeError, match="floating-point"):
        M.second_moment(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[seq, d\]"):
        M.token_cosine(torch.ones(5))


def test_resolve_metrics():
    assert M.resolve_metrics(None) == M.DEFAULT_METRICS
    assert set(M.resolve_metrics("all")) == set(M.METRICS)
    assert "grad_second_moment" not in M.resolve_metrics("forward")
    assert M.resolve_metrics(["token_cosine", "token_cosine"]) == ("token_cosine",)
    with pytest.raises(ValueError, match="known: second_moment"):
        M.resolve_metrics(["second_momnet"])


@pytest.mark.parametrize("T", [1, 7, 40])
def test_summarize_equals_the_single_metrics(T):
    x = torch.randn(3, T, 24, generator=_gen(10)) + 0.3
    x_in = x + 0.5 * torch.randn(3, T, 24, generator=_gen(11))
    names = tuple(n for n, m in M.METRICS.items() if m.kind != "grad")
    got = M.summarize(x, names, x_in, max_seqs=2, max_tokens=16)
    for name, value in zip(names, got):
        m = M.METRICS[name]
        ref = (m.fn(x_in, x) if m.kind == "pair" else m.fn(x, 2, 16) if m.sampled else m.fn(x))
        if name == "token_cosine" and T == 1:
            assert math.isnan(value) and math.isnan(ref)
        else:
            assert value.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6), name


def test_grad_first_token_share():
    g = torch.randn(3, 16, 32, dtype=torch.float64)
    g[:, 0] *= 3.0  # the first token carries 9× the power of the others
    power = (g ** 2).sum(-1).mean(0)
    assert M.grad_first_token(g).item() == pytest.approx((power[0] / power.mean()).item())
    even = torch.ones(2, 8, 4)
    assert M.grad_first_token(even).item() == pytest.approx(1.0)
    sink = torch.zeros(2, 8, 4)
    sink[:, 0] = 1.0
    assert M.grad_first_token(sink).item() == pytest.approx(8.0)  # all of it: T


def test_token_cosine_survives_underflowing_gradients():
    """Deep PostNorm gradients reach 1e-25 in float32, where squares underflow: the cosine must
    stay a cosine (it once read 5e10 here), and tiny but representable scales must not matter."""
    y = torch.randn(2, 6, 64, generator=_gen(3)) + 0.5
    assert abs(M.token_cosine(y * 1e-25).item()) <= 1.0
    assert abs(M.grad_token_cosine(y * 1e-30).item()) <= 1.0
    assert M.token_cosine(y * 1e-12).item() == pytest.approx(M.token_cosine(y).item(), rel=1e-5)
    out = M.summarize(y * 1e-25, ("token_cosine",))
    assert abs(out[0].item()) <= 1.0


@pytest.mark.parametrize("T,d", [(16, 48), (48, 16)])
def test_singular_values_match_svd_and_skip_non_finite_sequences(T, d):
    x = torch.randn(3, T, d) * torch.logspace(0, -3, d)  # a wide spread of singular values
    s = M.singular_values(x)
    ref = torch.linalg.svdvals(x.double())
    assert s.shape == ref.shape and torch.allclose(s, ref, rtol=1e-6, atol=1e-9)
    x[1, 0, 0] = math.nan
    assert torch.isnan(M.singular_values(x)[1]).all() and torch.isfinite(M.singular_values(x)[[0, 2]]).all()
    # one damaged sequence leaves the others' effective rank defined: the mean of the finite ones
    er = [float(M.effective_rank(x[i:i + 1])) for i in (0, 2)]
    assert float(M.effective_rank(x)) == pytest.approx(sum(er) / 2, rel=1e-5)


def test_one_massive_token_does_not_decide_the_robust_statistics():
    x = torch.randn(4, 64, 128, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 0, 7] = 3e4  # a massive activation on the first token (attention sink), as in trained LLMs
    assert float(M.second_moment(y)) > 50 * float(M.second_moment(x))  # the raw mean is decided by it
    assert float(M.median_token_second_moment(y)) == pytest.approx(float(M.median_token_second_moment(x)), rel=0.02)
    assert float(M.first_token_second_moment(y)) > 1e6
    assert float(M.massive_ratio(y)) > 1e4 and float(M.massive_ratio(x)) < 10
    assert float(M.effective_rank(y)) < 2 < 40 < float(M.effective_rank(x))  # one token's spectrum
    assert float(M.effective_rank_normalized(y)) == pytest.approx(float(M.effective_rank_normalized(x)), rel=0.05)
    assert abs(float(M.token_cosine(y)) - float(M.token_cosine(x))) < 0.01  # unit vectors: robust already
