"""One plotting style for every figure: colour-blind-safe colours fixed per scheme."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from analysis.infra.files import save_figure  # noqa: E402

# Okabe & Ito (2008) colour-blind-safe palette, then four of Paul Tol's colours for
# SpanNorm's further readings; a scheme keeps its colour in every figure.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000",
           "#882255", "#44AA99", "#999933", "#332288"]
KNOWN = ["pre", "post", "span", "deepnorm", "b2t", "peri", "mixln", "lns",
         "span_fwd", "span_alt", "span_dlr", "span_dlr_all"]
FORMATS = ("png", "svg", "pdf")


def color(scheme: str) -> str:
    """The scheme's colour (registered-later schemes get a stable fallback)."""
    i = KNOWN.index(scheme) if scheme in KNOWN else sum(map(ord, scheme))
    return PALETTE[i % len(PALETTE)]


def new_figure(ncols: int = 1, width: float = 5.0, height: float = 3.6, nrows: int = 1):
    """A figure with ``ncols`` × ``nrows`` axes (row by row), in the house style."""
    plt.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.spines.top": False, "axes.spines.right": False})
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save(fig, path: str | Path, fmt: str = "png") -> Path:
    """Write ``fig`` as ``path`` with extension ``fmt`` and close it."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown figure format '{fmt}' (known: {', '.join(FORMATS)})")
    path = Path(path).with_suffix(f".{fmt}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    save_figure(fig, path, dpi=150, bbox_inches="tight")  # legends outside the axes stay whole
    plt.close(fig)
    return path


def legend(ax, **kwargs) -> None:
    """The axes' legend, where anything on them is labelled (an empty legend only warns)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)
