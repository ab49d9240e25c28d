"""Collapse and moment statistics of one residual-stream tensor, as 0-d device tensors.

Every function takes activations ``x`` of shape [batch, seq, d] (a [seq, d] matrix is one
sequence) and returns a 0-d tensor (float32, or float64 for float64 input) on ``x``'s device, without a host synchronisation
and without allocating a tensor as large as ``x`` (reductions and batched matmuls only), so that
probes cost O(batch·seq) extra memory at most. Token-level statistics are averaged first over
the tokens (or token pairs) of a sequence, then over the sequences of the batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

# The bounded sample the SVD metrics take by default (first sequences, evenly spaced tokens): an
# effective rank is at most min(SAMPLE_TOKENS, T, d).
SAMPLE_SEQS, SAMPLE_TOKENS = 4, 256
_TINY = 1e-30  # guards divisions by a zero norm; a zero token then counts as cosine 0


def as_sequences(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached and viewed as [batch, seq, d], at least float32 (leading dimensions fold into the batch)."""
    if not x.is_floating_point():
        raise TypeError(f"probes need a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"probes need at least [seq, d] activations, got shape {tuple(x.shape)}")
    x = x.detach()
    if x.dim() == 2:
        x = x.unsqueeze(0)
    elif x.dim() > 3:
        x = x.reshape(-1, x.shape[-2], x.shape[-1])
    # float32/float64 stay as they are; bf16/fp16 are upcast so the sums do not lose digits
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _inverse_norms(norms: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1/‖x_t‖ per token, 0 for a token whose norm underflows (it then counts as cosine 0).

    Tiny gradients (deep PostNorm: 1e-25 in float32) have squares below the dtype's smallest
    normal number, so ‖x_t‖ comes out 0 or far too small and x_t/‖x_t‖ explodes (token cosines of
    1e21 were measured before this guard). The floor is 1000·sqrt(tiny·d), where the sum of squares
    is still exact to float rounding.
    """
    floor = 1e3 * math.sqrt(torch.finfo(x.dtype).tiny * x.shape[-1])
    return torch.where(norms > floor, 1.0 / norms.clamp_min(floor), torch.zeros_like(norms))


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """q = E[x²]: the mean of x² over all elements (DESIGN.md; Xiong et al. 2020, arXiv 2002.04745)."""
    x = as_sequences(x)
    return torch.linalg.vector_norm(x).square() / x.numel()


def variance(x: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the variance across features, each token's own mean removed (1/d, not 1/(d-1))."""
    return as_sequences(x).var(dim=-1, correction=0).mean()


def mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of x over all elements."""
    return as_sequences(x).mean()


def max_abs(x: torch.Tensor) -> torch.Tensor:
    """max |x| over all elements (an outlier-feature indicator)."""
    return torch.linalg.vector_norm(as_sequences(x), ord=math.inf)


def median_token_second_moment(x: torch.Tensor) -> torch.Tensor:
    """The median over tokens of ‖x_t‖²/d: the stream's size that one massive token cannot move."""
    x = as_sequences(x)
    return x.square().mean(-1).flatten().median()


def first_token_second_moment(x: torch.Tensor) -> torch.Tensor:
    """‖x_0‖²/d of each sequence's first token, averaged: the attention-sink position, kept apart."""
    return as_sequences(x)[:, 0].square().mean()


def massive_ratio(x: torch.Tensor) -> torch.Tensor:
    """max |x_ti| over the median token's RMS: ~1 to 10 for Gaussian streams, ≥ 100 for the massive
    activations of trained LLMs (Sun et al. 2024, arXiv 2402.17762)."""
    x = as_sequences(x)
    rms = x.square().mean(-1).flatten().median().sqrt()
    return torch.linalg.vector_norm(x, ord=math.inf) / rms.clamp_min(_TINY)


def token_cosine(x: torch.Tensor) -> torch.Tensor:
    """ρ: mean cosine between distinct tokens i ≠ j of a sequence, averaged over sequences.

    Rank collapse drives ρ to 1 (Noci et al. 2022, arXiv 2206.03126). Computed without the
    T×T matrix: with unit rows u_i, Σ_{i≠j} u_i·u_j = ‖Σ_i u_i‖² − Σ_i ‖u_i‖². NaN for T < 2.
    A token whose norm is zero or underflows counts as cosine 0 with every other.
    """
    x = as_sequences(x)
    T = x.shape[1]
    norms = torch.linalg.vector_norm(x, dim=-1)  # [B, T]
    inv = _inverse_norms(norms, x)
    total = torch.bmm(inv.unsqueeze(1), x).squeeze(1)  # Σ_i u_i per sequence, [B, d]
    diag = (norms * inv).square().sum(-1)  # Σ_i ‖u_i‖² (= T unless a token is exactly 0)
    pairs = (total.square().sum(-1) - diag) / (T * (T - 1)) if T > 1 else torch.full_like(diag, math.nan)
    return pairs.mean()


def dong_residual(x: torch.Tensor) -> torch.Tensor:
    """‖X − 1x̄ᵀ‖_F / ‖X‖_F per sequence, averaged: 0 when all tokens are equal (rank collapse).

    Dong et al. 2021 (arXiv 2103.03404) measure the distance of X to the nearest matrix 1xᵀ;
    in the Frobenius norm that matrix is the token mean x̄, so ‖X − 1x̄ᵀ‖² = ‖X‖² − T‖x̄‖².
    Uses every token (it is as cheap as a second moment).
    """
    x = as_sequences(x)
    T = x.shape[1]
    total = torch.linalg.vector_norm(x, dim=(-2, -1)).square()
    centred = (total - T * x.mean(1).square().sum(-1)).clamp_min(0)
    return (centred.sqrt() / total.sqrt().clamp_min(_TINY)).mean()


def token_sample(x: torch.Tensor, max_seqs: int = SAMPLE_SEQS,
                 max_tokens: int = SAMPLE_TOKENS) -> torch.Tensor:
    """The bounded sample the SVD metrics use: the first ``max_seqs`` sequences, ≤ ``max_tokens`` evenly spaced tokens."""
    x = as_sequences(x)[:max_seqs]
    T = x.shape[1]
    if T > max_tokens:
        idx = torch.arange(max_tokens, device=x.device) * T // max_tokens
        x = x.index_select(1, idx)
    return x


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values of each [T, d] matrix in ``x``, descending: √eig of the smaller Gram matrix, in float64.

    Why not ``torch.linalg.svdvals``: the Gram matrix is one matmul plus a symmetric eigensolve,
    several times faster for these small matrices, and LAPACK's SVD oversubscribes on a few
    threads. Squaring the condition number costs nothing here: float64 keeps singular values down
    to ~1e-8 of the largest, far below what the rank metrics can see. A sequence holding NaN or
    inf gets NaN singular values (its rank is undefined) instead of an error.
    """
    x = x.double()
    gram = x @ x.mT if x.shape[-2] <= x.shape[-1] else x.mT @ x
    finite = torch.isfinite(gram).flatten(-2).all(-1)
    gram = torch.where(finite[..., None, None], gram, torch.zeros_like(gram))
    with _one_thread(gram):
        ev = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()
    return torch.where(finite[..., None], ev, torch.full_like(ev, math.nan))


@contextlib.contextmanager
def _one_thread(t: torch.Tensor):
    """One CPU thread for a small eigensolve: LAPACK's threaded eigensolver on eight 256 × 256 float64
    Gram matrices took 51 ms on one thread and 1.49 s on two threads of a busy 2-core machine (it
    was 80 % of a diagnosis's probing time). CUDA tensors: unchanged."""
    if t.device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def effective_rank(x: torch.Tensor, max_seqs: int = SAMPLE_SEQS,
                   max_tokens: int = SAMPLE_TOKENS) -> torch.Tensor:
    """exp of the Shannon entropy of the singular values normalised to sum 1 (Roy & Vetterli 2007, EUSIPCO).

    1 for a rank-1 matrix, n for n equal singular values: at most min(T, d) of ``token_sample``.
    Per sequence on ``token_sample``, averaged over the sequences whose values are finite.
    """
    s = singular_values(token_sample(x, max_seqs, max_tokens))  # [B, min(T, d)]
    p = s / s.sum(-1, keepdim=True).clamp_min(_TINY)
    return _finite_mean(torch.exp(-torch.special.xlogy(p, p).sum(-1))).to(x.dtype)


def _finite_mean(v: torch.Tensor) -> torch.Tensor:
    """Mean of the finite entries (NaN if none): one damaged sequence must not hide the others."""
    ok = torch.isfinite(v)
    return torch.where(ok, v, torch.zeros_like(v)).sum() / ok.sum()


def effective_rank_normalized(x: torch.Tensor, max_seqs: int = SAMPLE_SEQS,
                              max_tokens: int = SAMPLE_TOKENS) -> torch.Tensor:
    """``effective_rank`` of the tokens scaled to unit norm: each token one direction of equal weight,
    so one massive token counts as one token, not as the whole spectrum."""
    x = token_sample(x, max_seqs, max_tokens)
    u = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_TINY)
    return effective_rank(u, max_seqs, max_tokens)


def stable_rank(x: torch.Tensor, max_seqs: int = SAMPLE_SEQS,
                max_tokens: int = SAMPLE_TOKENS) -> torch.Tensor:
    """‖X‖_F² / ‖X‖_2² (Rudelson & Vershynin 2007), per sequence on ``token_sample``, averaged."""
    s = singular_values(token_sample(x, max_seqs, max_tokens))
    return _finite_mean(s.square().sum(-1) / s[..., 0].square().clamp_min(_TINY)).to(x.dtype)


def _token_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = as_sequences(a), as_sequences(b)
    if a.shape != b.shape:
        raise ValueError(f"layer cosine needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    B, T, d = a.shape
    dots = torch.bmm(a.reshape(B * T, 1, d), b.reshape(B * T, d, 1)).view(B, T)  # no [B,T,d] product
    na, nb = torch.linalg.vector_norm(a, dim=-1), torch.linalg.vector_norm(b, dim=-1)
    return (dots / (na * nb).clamp_min(_TINY)).clamp(-1.0, 1.0)


def layer_cosine(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of cos(x_l, x_{l+1}) for the same token at consecutive layers (Gromov et al. 2024, arXiv 2403.17887)."""
    return _token_cos(x_in, x_out).mean()


def angular_distance(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of arccos(cos(x_l, x_{l+1}))/π ∈ [0, 1] (Gromov et al. 2024, arXiv 2403.17887).

    arccos is ill-conditioned at ±1: in float32 the resolution near 0 and 1 is about 1e-4.
    """
    return (torch.arccos(_token_cos(x_in, x_out)) / math.pi).mean()


def grad_second_moment(g: torch.Tensor) -> torch.Tensor:
    """g = E[(∂loss/∂x)²] over all elements of the gradient at a point.

    It scales with the loss's reduction: a loss averaged over B·T tokens gives gradients 1/(B·T)
    times those of the summed loss, so g carries a factor 1/(B·T)². Compare across layers (ratios
    are reduction-free), or multiply by (B·T)² to get the per-token-loss scale.
    """
    return second_moment(g)


def grad_token_cosine(g: torch.Tensor) -> torch.Tensor:
    """ρ_g: ``token_cosine`` of the gradient ∂loss/∂x — how alike the tokens' gradients are.

    Attention's backward sums the gradients of later tokens, so a correlated top gradient adds
    up coherently; signal-propagation theory needs it as an input (reduction-free: a ratio).
    """
    return token_cosine(g)


def grad_first_token(g: torch.Tensor) -> torch.Tensor:
    """The first token's gradient power over the mean over tokens: E‖g_0‖² / mean_t E‖g_t‖².

    1 when positions share the gradient evenly; T when the first token takes all of it. Causal
    attention sends every later token's gradient back to the first keys, and deep PostNorm
    compounds it block after block (a gradient sink).
    """
    g = as_sequences(g)
    power = g.square().sum(-1).mean(0)  # [T]: mean over sequences
    return power[0] / power.mean().clamp_min(_TINY)


def summarize(x: torch.Tensor, names: tuple[str, ...], x_in: torch.Tensor | None = None,
              max_seqs: int = SAMPLE_SEQS, max_tokens: int = SAMPLE_TOKENS) -> torch.Tensor:
    """The forward/pair metrics ``names`` of ``x`` as one 1-d tensor, sharing passes over ``x``.

    Equal to calling each metric's function (tests check it); it reads ``x`` about five times
    instead of once or twice per metric: per-token norms feed the second moment, token cosine,
    Dong residual and layer cosine; one batched matmul gives Σ_i u_i and the token mean together.
    """
    x = as_sequences(x)
    B, T, d = x.shape
    want = set(names)
    out: dict[str, torch.Tensor] = {}
    norms = torch.linalg.vector_norm(x, dim=-1)  # [B, T]
    sq = norms.square()
    if "second_moment" in want:
        out["second_moment"] = sq.sum() / x.numel()
    if want & {"variance", "mean"}:
        # E[x²] − mean² per token: shares the norms pass (var_mean is a slow Welford pass on CPU);
        # relative error ~1e-7·(1 + mean²/var) in float32, negligible unless tokens are far off-centre
        mu = x.mean(-1)
        out["variance"] = (sq / d - mu.square()).clamp_min(0).mean()
        out["mean"] = mu.mean()
    if "max_abs" in want:
        out["max_abs"] = torch.linalg.vector_norm(x, ord=math.inf)
    if want & {"token_cosine", "dong_residual"}:
        inv = _inverse_norms(norms, x)
        weights = torch.stack([inv, torch.full_like(inv, 1.0 / T)], dim=1)  # [B, 2, T]
        sums = torch.bmm(weights, x)  # [B, 2, d]: Σ_i u_i and the token mean x̄
        if "token_cosine" in want:
            diag = (norms * inv).square().sum(-1)
            pairs = ((sums[:, 0].square().sum(-1) - diag) / (T * (T - 1)) if T > 1
                     else torch.full_like(diag, math.nan))
            out["token_cosine"] = pairs.mean()
        if "dong_residual" in want:
            total = sq.sum(-1)
            centred = (total - T * sums[:, 1].square().sum(-1)).clamp_min(0)
            out["dong_residual"] = (centred.sqrt() / total.sqrt().clamp_min(_TINY)).mean()
    if want & {"median_token_second_moment", "massive_ratio"}:
        med = (sq / d).flatten().median()
        out["median_token_second_moment"] = med
        if "massive_ratio" in want:
            out["massive_ratio"] = torch.linalg.vector_norm(x, ord=math.inf) / med.sqrt().clamp_min(_TINY)
    if "first_token_second_moment" in want:
        out["first_token_second_moment"] = sq[:, 0].mean() / d
    if "effective_rank_normalized" in want:
        out["effective_rank_normalized"] = effective_rank_normalized(x, max_seqs, max_tokens)
    if want & {"effective_rank", "stable_rank"}:
        sv = singular_values(token_sample(x, max_seqs, max_tokens))
        p = sv / sv.sum(-1, keepdim=True).clamp_min(_TINY)
        out["effective_rank"] = _finite_mean(torch.exp(-torch.special.xlogy(p, p).sum(-1)))
        out["stable_rank"] = _finite_mean(sv.square().sum(-1) / sv[..., 0].square().clamp_min(_TINY))
    if want & {"layer_cosine", "angular_distance"}:
        a = as_sequences(x_in)
        if a.shape != x.shape:
            raise ValueError(f"layer cosine needs equal shapes, got {tuple(a.shape)} and {tuple(x.shape)}")
        dots = torch.bmm(a.reshape(B * T, 1, d), x.reshape(B * T, d, 1)).view(B, T)
        cos = (dots / (torch.linalg.vector_norm(a, dim=-1) * norms).clamp_min(_TINY)).clamp(-1.0, 1.0)
        out["layer_cosine"] = cos.mean()
        out["angular_distance"] = (torch.arccos(cos) / math.pi).mean()
    return torch.stack([out[n].to(x.dtype) for n in names])


@dataclass(frozen=True)
class Metric:
    """A named statistic: ``kind`` is 'forward' (f(x)), 'pair' (f(block input, block output)) or 'grad' (f(∂loss/∂x))."""

    name: str
    kind: str
    fn: Callable[..., torch.Tensor]
    sampled: bool = False  # takes the (max_seqs, max_tokens) sample bounds


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("second_moment", "forward", second_moment),
    Metric("variance", "forward", variance),
    Metric("mean", "forward", mean),
    Metric("max_abs", "forward", max_abs),
    Metric("token_cosine", "forward", token_cosine),
    Metric("dong_residual", "forward", dong_residual),
    Metric("median_token_second_moment", "forward", median_token_second_moment),
    Metric("first_token_second_moment", "forward", first_token_second_moment),
    Metric("massive_ratio", "forward", massive_ratio),
    Metric("effective_rank", "forward", effective_rank, sampled=True),
    Metric("effective_rank_normalized", "forward", effective_rank_normalized, sampled=True),
    Metric("stable_rank", "forward", stable_rank, sampled=True),
    Metric("layer_cosine", "pair", layer_cosine),
    Metric("angular_distance", "pair", angular_distance),
    Metric("grad_second_moment", "grad", grad_second_moment),
    Metric("grad_token_cosine", "grad", grad_token_cosine),
    Metric("grad_first_token", "grad", grad_first_token),
)}

# Cheap enough to leave on during training: no SVD (which may synchronise on CUDA).
DEFAULT_METRICS: tuple[str, ...] = ("second_moment", "variance", "mean", "max_abs", "token_cosine",
                                    "dong_residual", "layer_cosine", "angular_distance",
                                    "grad_second_moment", "grad_token_cosine")


def resolve_metrics(metrics: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Metric names from None (defaults), 'all', 'default', 'forward', or an iterable of names."""
    if metrics is None or metrics == "default":
        return DEFAULT_METRICS
    if metrics == "all":
        return tuple(METRICS)
    if metrics == "forward":
        return tuple(n for n in DEFAULT_METRICS if METRICS[n].kind != "grad")
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; known: "
                         f"{', '.join(METRICS)} (or 'default', 'forward', 'all')")
    return tuple(dict.fromkeys(names))
