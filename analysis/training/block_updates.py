"""Block-level measurements of a testbed model: each block's (input, output) on a batch, and the
size of a parameter update per block with the block's own input held fixed."""

from __future__ import annotations

import torch

from analysis.testbed.model import Testbed


@torch.no_grad()
def trace_blocks(model: Testbed, x: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                           torch.Tensor]:
    """Each block's (input, output) on batch ``x``, and the logits."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [b.register_forward_hook(lambda m, args, out: pairs.append((args[0], out)))
             for b in model.blocks]
    try:
        logits, _ = model(x)
    finally:
        for h in hooks:
            h.remove()
    return pairs, logits


def snapshot_blocks(model: Testbed, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each block's (input, output) on batch ``x``, for measuring the next update's size."""
    return trace_blocks(model, x)[0]


@torch.no_grad()
def update_sizes(model: Testbed, snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """‖B_new(x) − B_old(x)‖ / ‖B_old(x)‖ per block, on the block's own saved input x.

    The input is held fixed, so each figure is the change from that block's own parameter
    update alone (DeepNet's "model update", arXiv 2203.00555, taken per block).
    """
    sizes = [torch.linalg.vector_norm((b(x) - y).float()) / torch.linalg.vector_norm(y.float())
             for b, (x, y) in zip(model.blocks, snapshot)]
    return torch.stack(sizes).tolist()
