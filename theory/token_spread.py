"""Per-token fluctuations: the part of a realized power's fluctuation that differs between tokens.

theory/spread.py carries, for every realized power, the fluctuation of its token mean. But a
norm divides each token by that token's own realized power, and the gradient a block sends down
is concentrated on a few tokens (the first, under causal attention). So what scales the gradient
is the fluctuation of those tokens' powers, which averages away in the token mean. In a stream
that is not normalized (PreNorm), these per-token fluctuations also persist from block to block,
so every later block reads the same ones: a covariance between blocks' gradient factors that the
token-mean theory cannot carry.

Each injected per-token fluctuation η (a T-vector of relative power fluctuations, Gaussian with
covariance C) is split into the part the token-mean theory already carries and the rest:
η = b·m + ε, m = wᵀη its token mean (w the power shares), b = Cw/(wᵀCw), so that ε is
uncorrelated with m, hence independent of every noise the token-mean theory counts. This module
carries ε; the variances of the two channels add. (The token-mean theory applies m to every token
alike, b ≡ 1; b deviates from 1 where tokens' powers are unequal: left out.)

Inside a block a deviation is a ``TokenForm``: per key, a T×k matrix mapping that key's k
independent unit noises to the T tokens' relative fluctuations. The keys are the stream's
deviation at the block input ("in", k = T), the gradient's arriving from above ("gin", k = T),
and the block's own injections, forward and backward (a sublayer's backward map passes the
arriving gradient's deviation through its Jacobian with respect to each token's power). Across
blocks the stream's ε_l = M_l·ε_{l−1} + Σ_j M_j·ξ_j goes up and the gradient's
γ_{l−1} = A_l·γ_l + B_l·ε_{l−1} + Σ_j G_j·ξ_j comes down; ``chain`` composes both exactly.

Per-token covariances of the injections (relative fluctuations; ρ the token correlation matrix):
a Gaussian linear map to n coordinates gives 2ρ∘ρ/n (a map applied before attention's mean
pattern gives the same on the output's ρ); the FFN's n_h units give
(E[φ_s²φ_t²] − E[φ²]²)/(n_h·E[φ²]²); the heads' patterns the covariance over draws of
diag(P S Pᵀ); the realized inner product of two independent sources i, j has covariance
K_i∘K_j/d; the embedding 2ρ₀∘ρ₀/d.
"""

from __future__ import annotations

import numpy as np


class TokenForm(dict):
    """Per-token fluctuations: {key: T×k matrix} (a 1×k matrix: the same for every token, or a
    contracted, scalar fluctuation)."""

    def plus(self, other: "TokenForm", c: float | np.ndarray = 1.0) -> "TokenForm":
        """self + c·other, c a number or a per-token vector."""
        out = TokenForm(self)
        col = np.asarray(c, float).reshape(-1, 1)
        for k, M in other.items():
            add = col * M
            out[k] = out[k] + add if k in out else add
        return out

    def times(self, c: float | np.ndarray) -> "TokenForm":
        """c·self, c a number or a per-token vector."""
        col = np.asarray(c, float).reshape(-1, 1)
        return TokenForm({k: col * M for k, M in self.items()})

    def contract(self, w: np.ndarray) -> "TokenForm":
        """Σ_t w_t·self_t: a scalar fluctuation (1×k per key)."""
        return TokenForm({k: (np.asarray(w, float) @ M)[None, :] for k, M in self.items()})


def correlation(K: np.ndarray) -> np.ndarray:
    """The token correlation matrix of a token covariance."""
    dg = np.sqrt(np.clip(np.diag(K), 1e-300, None))
    return K / np.outer(dg, dg)


def factor(C: np.ndarray) -> np.ndarray:
    """R with R·Rᵀ = C (C symmetric, positive semidefinite up to rounding): the components of
    negligible variance dropped."""
    lam, V = np.linalg.eigh((C + C.T) / 2)
    keep = lam > max(float(lam.max(initial=0.0)), 0.0) * 1e-10
    return V[:, keep] * np.sqrt(lam[keep])


def deviation(M: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The part of the per-token fluctuation M·ξ uncorrelated with its w-weighted token mean."""
    v = np.asarray(w, float) @ M
    vv = float(v @ v)
    return M - np.outer(M @ v, v) / vv if vv > 0 else M


def shares(K: np.ndarray) -> np.ndarray:
    """Each token's share of the token-mean power."""
    dg = np.diag(K)
    return dg / dg.sum()


def injection(C: np.ndarray, K: np.ndarray) -> np.ndarray:
    """The deviation part (T×k) of a per-token relative fluctuation of covariance C, of a power
    whose token covariance is K."""
    return deviation(factor(C), shares(K))


def projection_cov(K: np.ndarray, n: int) -> np.ndarray:
    """Per-token covariance of the relative power fluctuation of a Gaussian linear map's n output
    coordinates of token covariance K."""
    rho = correlation(K)
    return 2.0 * rho * rho / n


def chain(blocks: list[dict], embed: np.ndarray) -> dict[str, np.ndarray]:
    """Compose the blocks' per-token channels: the variances they add to ln q_l, ln(g_l/g_L) and
    block l's factor ln(g_{l−1}/g_l).

    ``embed``: the stream's deviation ε₀ at layer 0 (T×k). Block m (1-based) gives ``M``, the
    stream it passes up, ε_m = M["in"]·ε_{m−1} + Σ_j M[j]·ξ_j (empty where it normalizes the
    stream); ``q``, its forward statistic's deviation (1×k per key); ``G``, the per-token
    deviation γ_{m−1} of the gradient power at its input, γ_{m−1} = G["gin"]·γ_m + G["in"]·ε_{m−1}
    + Σ_j G[j]·ξ_j (γ_L = 0: the top gradient is given); and the gradient's token shares at its
    output and input, ``w_out``, ``w_in``. The deviation of ln g_l is w_l·γ_l. Block m's own keys
    are noises of that block only."""
    L = len(blocks)
    T = embed.shape[0]
    zero = np.zeros((T, T))
    sig = [embed @ embed.T]  # Cov(ε_l), l = 0..L
    for b in blocks:
        Min = b["M"].get("in", zero)
        sig.append(Min @ sig[-1] @ Min.T + sum((M @ M.T for k, M in b["M"].items() if k != "in"), zero))
    w = [b["w_in"] for b in blocks] + [blocks[-1]["w_out"]]

    def variance(a: int, alpha: dict[int, np.ndarray]) -> float:
        """Var(Σ_m alpha_m·γ_m) for levels m ≥ a: sensitivities up the backward chain (ν), then
        down the forward one (λ)."""
        nu = {a: alpha[a]}
        for m in range(a + 1, L):
            nu[m] = alpha.get(m, 0.0) + blocks[m - 1]["G"].get("gin", zero).T @ nu[m - 1]
        lam, var = np.zeros(T), 0.0
        for m in range(L, a, -1):
            G, M = blocks[m - 1]["G"], blocks[m - 1]["M"]
            for k in (set(G) | set(M)) - {"in", "gin"}:
                c = (G[k].T @ nu[m - 1] if k in G else 0.0) + (M[k].T @ lam if k in M else 0.0)
                var += float(np.sum(np.square(c)))
            lam = G.get("in", zero).T @ nu[m - 1] + M.get("in", zero).T @ lam
        return var + float(lam @ sig[a] @ lam)

    var_q = np.zeros(L + 1)
    for l, b in enumerate(blocks, 1):
        for k, M in b["q"].items():
            var_q[l] += float((M @ sig[l - 1] @ M.T).item()) if k == "in" else float(np.sum(M * M))
    var_g = np.array([variance(l, {l: w[l]}) for l in range(L)] + [0.0])
    var_block = np.array([0.0] + [variance(l - 1, {l - 1: w[l - 1], l: -w[l]}) for l in range(1, L + 1)])
    return {"var_ln_q": var_q, "var_ln_g": var_g, "var_ln_block": var_block}
