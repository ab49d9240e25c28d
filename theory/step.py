"""Theory of the first optimizer step: how much a block's output moves, against width, depth, lr.

Setting (mean field, as for the init recurrences): width d → ∞ with depth, vocabulary, tokens
and the base learning rate fixed; one step from initialization; hidden coordinates are Θ(1).
A block's relative update is r = ‖B₁(x) − B₀(x)‖ / ‖B₀(x)‖ on a fixed input x (DeepNet's
"model update", arXiv 2203.00555, per block). To first order in lr it is the sum of its
matrices' changes ΔW·u' pushed to the block output, so its width exponent is the largest of
theirs. Derivation for one matrix-like W (fan_in d_in ∝ d, init std s/√d_in, input u, output
gradient δ, batch tokens n, a measured token u'):

- **Adam**, first step: m̂ = g, v̂ = g² after bias correction, so ΔW = −η_W·sign(G) wherever
  |G| ≫ eps (Kingma & Ba 2015). (ΔW u')_i = −η_W Σ_j sign(G_ij)·u'_j, with G_ij = Σ_n δ_ni u_nj.
  Over the coordinates j, (G_ij, u'_j) are jointly Gaussian in mean field, so
  E[sign(G_ij)·u'_j] = √(2/π)·Cov_j(G_ij, u'_j)/σ_j(G_ij). The tokens of a batch share a
  component (their mean ū; q·ρ× = ū·ū'/d_in for inputs of second moment q and cross-token
  cosine ρ×), so the covariance is Θ(1) and the sum over j is coherent:
  (ΔW u')_i = −η_W·[d_in·√(2/π)·√(q ρ× χ)·(±1) + Θ(√d_in)], χ ∈ (0, 1] the share of the
  summed gradient Σ_n δ_ni carried by the common input direction (χ → 1 when the batch's
  gradient is coherent across tokens, N·ρ_gradient ≫ 1). W's output coordinates are s·√q, so
  r_W = η_W·d_in·√(2ρ×χ/π)/s + O(η_W √d_in): **Θ(η_W·d)**.
- **SGD**: ΔW = −η_W Σ_n δ_n u_nᵀ, so (ΔW u')_i = −η_W Σ_n δ_ni·(u_n·u'), and u_n·u' =
  d_in·q·ρ×_n is Θ(d). The gradient's coordinates are Θ(d^(-1/2)) under the standard
  parametrization (they come back through a readout of std d^(-1/2); the vocabulary is fixed)
  and Θ(1/d) under µP (readout effective std ∝ 1/d): r_W = **Θ(η_W·d·|δ|)**.

With η_W from the parametrization (analysis.testbed.parametrization: µP's Adam lr × 1/width_mult
for matrices, SGD × 1), the per-block update size grows as d^e with e below
(Yang & Hu, Tensor Programs V, arXiv 2203.03466, Table 3; our derivation above):

| optimizer | standard | mup | mup-nomult |
|---|---|---|---|
| adam | 1 | 0 | 0 (Adam ignores the gradient's scale) |
| sgd | 1/2 | 0 | 1 (gradients Θ(1) without the readout multiplier) |

The logits move by the readout's own change (Adam: Θ(lr·d)·multiplier; SGD: Θ(lr_h·m²·d), m the
output multiplier) plus the stream's change seen through the readout. Under µP the first is Θ(1)
and the second Θ(d^(-1/2)) (incoherent against a readout of effective std ∝ 1/d): the logits'
change does not grow with width, and at finite width its log–log slope lies between −1/2 and 0.

Finite width: the incoherent term makes Adam's r² = η²·(a·d² + b·d) and SGD's (standard)
r² = η²·(a·d + b), so a slope measured over small widths lies a little below the exponent.

**Depth.** A scheme's depth constants enter a block's update in two places only:
- an init gain g on a matrix (SpanNorm's ScaleInit β, DeepNorm's β) does not scale Adam's change
  of that matrix (every weight moves by ≈ η whatever its scale), nor SGD's change of an output
  projection (ΔW_o = −η Σ δ ūᵀ holds no W_o); it scales the change of what lies *behind* the
  matrix (W_v's change seen through W_o: ∝ g, and ∝ g² under SGD, whose gradient at W_v passes
  W_o), and an input scaled by g (values, FFN features) scales its mean ū by g;
- a skip weight α before an output norm divides the branch's change by √q_agg ≈ α.
So, with branch statistics that do not move with depth, the median block's update scales as L^k,
and the network's change as L^n. theory/depth_orders.py derives both from each scheme's block
function by these rules (`theory --scheme S` prints them):
- span (α = 1, β only on output projections): k = 0 under Adam and SGD, and all L blocks add
  up: n = 1, so the optimal lr falls as 1/L;
- post: no depth constant, k = 0; a change decays through the later blocks, n = 0;
- deepnorm (α = (2L)^(1/4); V, O, and FFN in/out × β = (8L)^(-1/4)): under Adam every path
  through a branch carries one β (Δ ∝ η·d·β), and the output norm divides by α: β/α, k = −1/2;
  under SGD a path carries β² (a β-scaled input or path, and a gradient that comes back through
  the β-scaled branch) and the gradient also passes the norm (1/α): β²/α², k = −1;
- pre: the branch's change is L-independent but the stream grows (q_l ≈ q_0 + c·l), so at the
  median block r ∝ 1/√q ∝ L^(-1/2) under Adam; under SGD the gradient reaching the branch also
  passes the final norm (1/√q_L), so k = −1 (an earlier hand derivation said −1/2, forgetting
  that factor); this ignores that pre's token correlation, and with it the coherence of the
  step, grows with depth, and q_0 keeps the slope shallower until c·L ≫ q_0.
Left out: a norm's own gain and bias. Under SGD they move the block output by O(η) per
coordinate (no coherent sum over d inputs, no depth constant): O(1/d) of a branch's change, but
DeepNorm's SGD branch change falls as d·β²/α² ∝ d/L, so at finite width the norm path takes over
as L nears d and the measured exponent lies above −1.
"""

from __future__ import annotations

from fractions import Fraction

import sympy

# per-block update size ∝ width^exponent, one step from init (module docstring)
BLOCK_EXPONENTS: dict[tuple[str, str], Fraction] = {
    ("adam", "standard"): Fraction(1), ("adam", "mup"): Fraction(0),
    ("adam", "mup-nomult"): Fraction(0),
    ("sgd", "standard"): Fraction(1, 2), ("sgd", "mup"): Fraction(0),
    ("sgd", "mup-nomult"): Fraction(1),
}


def block_exponent(optimizer: str, parametrization: str) -> Fraction:
    """The width exponent of a block's first-step relative update (ValueError if unknown)."""
    key = (optimizer, parametrization)
    if key not in BLOCK_EXPONENTS:
        known = ", ".join(f"{o}/{p}" for o, p in BLOCK_EXPONENTS)
        raise ValueError(f"no width exponent for optimizer {optimizer} with parametrization "
                         f"{parametrization} (known: {known})")
    return BLOCK_EXPONENTS[key]


def update_law(optimizer: str, parametrization: str) -> sympy.Expr:
    """r(d, η) = η·C·d^e as a sympy expression (C: the block's data constant, e its exponent)."""
    d, eta, C = sympy.symbols("d eta C", positive=True)
    e = block_exponent(optimizer, parametrization)
    return eta * C * d ** sympy.Rational(e.numerator, e.denominator)
