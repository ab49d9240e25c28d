"""The architecture a scheme is evaluated on, defined once for every interpretation.

The testbed (analysis.testbed.ModelConfig), the theory (theory.solve.TheoryConfig) and the init
analysis (analysis.init.pipeline.AnalysisConfig) all extend :class:`Shape`, so a field, its
default and its check exist in one place; each adds only what is its own (the model's dtype and
vocabulary, the theory's sequence length, the analysis's grid). It lives in theory/ because
theory/ may not import analysis/.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

FFN_KINDS = ("gelu", "relu", "swiglu")
NORM_KINDS = ("layernorm", "rmsnorm")


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

    def validate_shape(self) -> None:
        """Raise ValueError naming the first bad shape setting."""
        checks = [
            (self.width >= 1 and self.heads >= 1,
             f"width and heads must be >= 1, got {self.width}, {self.heads}"),
            (self.width % self.heads == 0,
             f"width {self.width} is not divisible by heads {self.heads}"),
            (self.ffn in FFN_KINDS, f"unknown ffn kind '{self.ffn}' (known: {', '.join(FFN_KINDS)})"),
            (self.norm in NORM_KINDS,
             f"unknown norm kind '{self.norm}' (known: {', '.join(NORM_KINDS)})"),
            (self.experts >= 0, f"experts must be >= 0, got {self.experts}"),
            (self.experts == 0 or 1 <= self.top_k <= self.experts,
             f"top-k {self.top_k} must be between 1 and the number of experts {self.experts}"),
            (self.sigma > 0 and self.embed_std > 0, "sigma and embed_std must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def shape_fields(self) -> dict:
        """The shape fields as keyword arguments: ``TheoryConfig(**mc.shape_fields(), ...)``."""
        return {f.name: getattr(self, f.name) for f in fields(Shape)}
