"""Massive activations: where in the stream a few coordinates dwarf every other (Sun et al. 2024).

Trained LLMs carry activations thousands of times the median size on a few tokens (often the
first, the attention sink of Xiao et al. 2023, arXiv 2309.17453) and a few fixed coordinates, from
some block on (Sun et al. 2024, arXiv 2402.17762). They decide any mean over tokens, so the
diagnosis reports them as a finding of their own and reads the stream through robust statistics.
``PeakMeter`` hooks each block's output and keeps, per batch, the largest |x_ti|, its token
position t and coordinate i, and its ratio to the median token's RMS.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from probes.locate import Layout, first_tensor


class PeakMeter:
    """Forward hooks recording each block output's largest activation and where it sits."""

    def __init__(self, model: nn.Module, layout: Layout):
        self.model, self.layout = model, layout
        self.peaks: list[list[torch.Tensor]] = [[] for _ in layout.blocks]  # per batch: peak, ratio, t, c
        self._handles: list[Any] = []

    def __enter__(self) -> "PeakMeter":
        for i, path in enumerate(self.layout.blocks):
            self._handles.append(self.model.get_submodule(path).register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int) -> Callable:
        def hook(module, args, output):
            y = first_tensor(output)
            if not isinstance(y, torch.Tensor) or y.dim() != 3:
                return
            y = y.detach().float()
            a = y.abs()
            flat = a.argmax()  # stays on the device: no host sync per block (one copy, in frame())
            _, T, d = a.shape
            peak = a.flatten()[flat].double()
            rms = y.square().mean(-1).flatten().median().sqrt().double()
            self.peaks[i].append(torch.stack([peak, peak / rms.clamp_min(1e-30), flat // d % T, flat % d]))
        return hook

    def frame(self) -> pd.DataFrame:
        """Per block: the largest |x| seen, its ratio to the median token's RMS, the commonest (token, coordinate)."""
        rows = []
        for i, p in enumerate(self.peaks):
            if not p:
                continue
            a = torch.stack(p).cpu().numpy()
            (t, c), n = Counter((int(pt), int(pc)) for pt, pc in a[:, 2:]).most_common(1)[0]
            rows.append(dict(layer=i, peak_abs=float(a[:, 0].max()), peak_ratio=float(a[:, 1].max()),
                             peak_token=t, peak_coordinate=c, peak_share=n / len(p)))
        return pd.DataFrame(rows)
