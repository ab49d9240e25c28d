"""The architecture a scheme is evaluated on, defined once for every interpretation.

The testbed (analysis.testbed.ModelConfig), the theory (theory.solve.TheoryConfig) and the init
analysis (analysis.init.pipeline.AnalysisConfig) all extend :class:`Shape`, so a field, its
default and its check exist in one place; each adds only what is its own (the model's dtype and
vocabulary, the theory's sequence length, the analysis's grid). It lives in theory/ because
theory/ may not import analysis/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

FFN_KINDS = ("gelu", "relu", "swiglu")
NORM_KINDS = ("layernorm", "rmsnorm")
# causal: softmax over keys s ≤ t (decoders); bidirectional: softmax over all T keys (BERT-style
# encoders); uniform: every token takes the plain mean of the values over all T tokens (no query or
# key weights), the bidirectional averaging of classical Pre-/Post-LN and rank-collapse analyses
# (Xiong et al. 2020, arXiv 2002.04745; Noci et al. 2022, arXiv 2206.03126)
ATTENTION_KINDS = ("causal", "bidirectional", "uniform")


@dataclass(frozen=True, kw_only=True)
class Shape:
    """Width, heads, sublayer kinds and init scale of the blocks (the scheme and depth aside)."""

    width: int = 256
    heads: int = 4
    ffn: str = "gelu"
    norm: str = "layernorm"
    sigma: float = 1.0  # weights ~ N(0, sigma^2 / fan_in)
    embed_std: float = 1.0  # token + position embedding has second moment embed_std^2
    experts: int = 0  # 0: dense FFN; E > 0: top-k MoE of E FFNs
    top_k: int = 2
    attention: str = "causal"  # one of ATTENTION_KINDS; configs saved without it were causal

    def validate_shape(self) -> None:
        """Raise ValueError naming the first bad shape setting."""
        checks = [
            (self.width >= 1 and self.heads >= 1,
             f"width and heads must be >= 1, got {self.width}, {self.heads}"),
            (self.heads < 1 or self.width % self.heads == 0,  # no modulo by 0
             f"width {self.width} is not divisible by heads {self.heads}"),
            (self.ffn in FFN_KINDS, f"unknown ffn kind '{self.ffn}' (known: {', '.join(FFN_KINDS)})"),
            (self.norm in NORM_KINDS,
             f"unknown norm kind '{self.norm}' (known: {', '.join(NORM_KINDS)})"),
            (self.experts >= 0, f"experts must be >= 0, got {self.experts}"),
            (self.experts == 0 or 1 <= self.top_k <= self.experts,
             f"top-k {self.top_k} must be between 1 and the number of experts {self.experts}"),
            (0 < self.sigma < math.inf and 0 < self.embed_std < math.inf,
             f"sigma and embed_std must be finite and > 0, got {self.sigma}, {self.embed_std}"),
            (self.attention in ATTENTION_KINDS,
             f"unknown attention kind '{self.attention}' (known: {', '.join(ATTENTION_KINDS)})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def shape_fields(self) -> dict:
        """The shape fields as keyword arguments: ``TheoryConfig(**mc.shape_fields(), ...)``."""
        return {f.name: getattr(self, f.name) for f in fields(Shape)}
