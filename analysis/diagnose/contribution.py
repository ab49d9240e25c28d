"""What each block adds: its branches' size against the stream, and what skipping it costs.

Two measures that keep their meaning in trained models of any placement (the turn angle of the
stream does not: a trained post-norm block's LayerNorm alone turns it 10–30°):

- **relative contribution** ``branch_rel`` = ‖a_t‖⊕‖f_t‖ / ‖x_t‖ per token, ⊕ the root of the
  sum of squares, for the block's branch outputs a (attention) and f (FFN or MoE) as they are
  added to the stream — after a norm on the branch output where the block has one (Peri-LN,
  sandwich, OLMo 2: its gain sets the update's size), before any output norm of the block — over
  the block input x. 0 for a block whose
  branches output nothing, whatever its norms do. Mean and median over tokens, per batch.
- **skip test** (Gromov et al. 2024, arXiv 2403.17887): the block replaced by the identity, on a
  bounded number of sequences; the relative change of the head input ‖h' − h‖/‖h‖ and, where the
  model has a real loss, the loss change in nats. Per sequence, so each carries its standard error.

Branch outputs are found per family (``BRANCH_OUTPUTS``) or, failing that, as the block's
non-norm submodules (a ModuleList's items count as submodules) whose output has the stream's
shape; the report names which.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from probes.locate import Layout, branch_children, first_tensor

# Per family, branch outputs relative to a block (all must exist): modules whose output is a branch
# before the residual add. BERT-like blocks add and normalise inside their sublayer modules, so
# their dense projections are the branch outputs.
BRANCH_OUTPUTS: tuple[tuple[str, ...], ...] = (
    ("attention.output.dense", "output.dense"),  # BERT, RoBERTa, ELECTRA
    ("attention", "ffn"),  # DistilBERT
    ("attn", "mlp"),  # GPT-2
    ("self_attn", "mlp"),  # LLaMA, Mistral, Qwen2
    ("self_attn", "block_sparse_moe"),  # Mixtral
    ("attention", "mlp"),  # GPT-NeoX
)


def branch_outputs(model: nn.Module, layout: Layout) -> tuple[list[list[str]], str]:
    """Per block, the full paths of its branch-output modules, and how they were found."""
    if layout.post_branch_norms and all(layout.post_branch_norms):
        # Peri-LN, sandwich, OLMo 2: the branch ends in a norm whose gain sets what is added
        return [list(n) for n in layout.post_branch_norms], "the norms on the branch outputs (what is added to the stream)"
    first = model.get_submodule(layout.blocks[0])
    names = dict(first.named_modules())
    if hasattr(first, "attns") and hasattr(first, "ffns"):  # the sigprop testbed: exact
        rel = [f"attns.{i}" for i in range(len(first.attns))] + [f"ffns.{i}" for i in range(len(first.ffns))]
        how = "the testbed's attention and FFN modules"
    else:
        rel = next((list(c) for c in BRANCH_OUTPUTS if all(n in names for n in c)), [])
        how = f"known family ({', '.join(rel)})" if rel else ""
        if not rel:  # direct children (ModuleList items included) that are not norms
            rel = branch_children(first)
            how = f"generic: the block's non-norm submodules ({', '.join(rel)}), kept where they output the stream's shape"
    return [[f"{b}.{r}" for r in rel] for b in layout.blocks], how


class ContributionMeter:
    """Forward hooks accumulating each block's relative contribution (mean and median over tokens)."""

    def __init__(self, model: nn.Module, layout: Layout, branches: list[list[str]]):
        self.model, self.layout, self.branches = model, layout, branches
        L = len(layout.blocks)
        self._x2: list[torch.Tensor | None] = [None] * L
        self._b2: list[torch.Tensor | None] = [None] * L
        self._seen = [False] * L  # a stream-shaped branch output was added this forward
        self._shape: list[torch.Size | None] = [None] * L  # the stream's shape at the block input
        # per batch: [mean, median] over tokens, kept on the device (one host copy, in frame())
        self.samples: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self._handles: list[Any] = []

    def __enter__(self) -> "ContributionMeter":
        for i, path in enumerate(self.layout.blocks):
            block = self.model.get_submodule(path)
            self._handles.append(block.register_forward_pre_hook(self._block_in(i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._block_out(i)))
            for b in self.branches[i]:
                self._handles.append(self.model.get_submodule(b).register_forward_hook(self._branch(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _block_in(self, i: int) -> Callable:
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor):
                self._x2[i] = x.detach().float().square().sum(-1)
                self._b2[i] = torch.zeros_like(self._x2[i])
                self._seen[i], self._shape[i] = False, x.shape
        return hook

    def _branch(self, i: int) -> Callable:
        def hook(module, args, output):
            y = first_tensor(output)
            x2 = self._x2[i]
            if x2 is not None and isinstance(y, torch.Tensor) and y.shape == self._shape[i]:
                self._b2[i] += y.detach().float().square().sum(-1)  # others are not branch outputs
                self._seen[i] = True
        return hook

    def _block_out(self, i: int) -> Callable:
        def hook(module, args, output):
            x2, b2 = self._x2[i], self._b2[i]
            if x2 is None:
                return
            # no branch output seen: unknown, not zero (zero would read as a redundant block)
            r = (b2 / x2.clamp_min(1e-30)).sqrt().flatten() if self._seen[i] else torch.full_like(
                x2.flatten(), math.nan)
            self.samples[i].append(torch.stack([r.mean(), r.median()]))
            self._x2[i] = self._b2[i] = None
        return hook

    def frame(self) -> pd.DataFrame:
        """layer, branch_rel (mean over tokens), branch_rel_median, each with its standard error over batches."""
        rows = []
        for i, s in enumerate(self.samples):
            a = torch.stack(s).cpu().double().numpy() if s else np.zeros((0, 2))
            n = len(a)
            se = a.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.full(2, math.nan)
            mean = a.mean(0) if n else np.full(2, math.nan)
            rows.append(dict(layer=i, branch_rel=mean[0], branch_rel_se=se[0],
                             branch_rel_median=mean[1], branch_rel_median_se=se[1]))
        return pd.DataFrame(rows)


def _identity_hook(module, args, kwargs, output):
    """Replace a block's output by its input: the block is skipped."""
    x = args[0] if args else kwargs.get("hidden_states")
    if isinstance(output, torch.Tensor):
        return x
    if isinstance(output, tuple):
        return (x, *output[1:])
    if hasattr(output, "to_tuple"):
        output[next(iter(output.keys()))] = x
        return output
    return x


def skip_test(model: nn.Module, layout: Layout, windows: torch.Tensor,
              run: Callable[[torch.Tensor], torch.Tensor], batch: int,
              progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Per block: the head input's relative change and the loss change when the block is skipped.

    ``run(w)`` runs windows ``w`` forward and returns the per-sequence loss (NaN where the model has
    none); the head input is read with a hook on ``layout.final`` (or the last block). The blocks
    before the skipped one are not run again: they return their outputs from the unskipped pass
    (same windows, deterministic), so the test costs about L/2 forward passes, not L.
    """
    head = model.get_submodule(layout.final or layout.blocks[-1])
    blocks = [model.get_submodule(p) for p in layout.blocks]
    seen: list[torch.Tensor] = []
    grab = head.register_forward_hook(lambda m, a, o: seen.append(first_tensor(o).detach().float()))
    batches = [windows[s:s + batch] for s in range(0, len(windows), batch)]
    cached: list[list[Any]] = [[] for _ in batches]  # per batch, every block's output

    def keep(b: int):
        return lambda m, a, o: cached[b].append(o)

    def pass_over(skipped: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        seen.clear()
        losses = []
        for b, w in enumerate(batches):
            handles = ([blk.register_forward_hook(keep(b)) for blk in blocks] if skipped is None else [])
            own = [blocks[j].__dict__.get("forward") for j in range(skipped or 0)]  # e.g. accelerate's
            for j in range(skipped or 0):  # replay the prefix: the module returns its cached output
                blocks[j].forward = (lambda *a, _out=cached[b][j], **k: _out)
            try:
                with torch.no_grad():
                    losses.append(run(w).detach().float().cpu())
            finally:
                for h in handles:
                    h.remove()
                for j, f in enumerate(own):
                    if f is None:
                        del blocks[j].forward
                    else:
                        blocks[j].forward = f
        return torch.cat(seen), torch.cat(losses)

    try:
        h0, loss0 = pass_over(None)
        rows = []
        for i, path in enumerate(layout.blocks):
            if progress:
                progress(f"skip test: block {i + 1}/{len(layout.blocks)}")
            handle = blocks[i].register_forward_hook(  # before the head-input hook
                _identity_hook, with_kwargs=True, prepend=True)
            try:
                h, loss = pass_over(i)
            finally:
                handle.remove()
            change = ((h - h0).flatten(1).norm(dim=1) / h0.flatten(1).norm(dim=1).clamp_min(1e-30)).cpu()
            delta = loss - loss0
            rows.append(dict(layer=i, skip_out_change=float(change.mean()),
                             skip_out_change_se=_se(change), skip_loss_delta=float(delta.mean()),
                             skip_loss_delta_se=_se(delta)))
    finally:
        grab.remove()
    return pd.DataFrame(rows)


def _se(v: torch.Tensor) -> float:
    return float(v.std() / math.sqrt(len(v))) if len(v) > 1 and torch.isfinite(v).all() else math.nan
