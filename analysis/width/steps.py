"""The first k optimizer steps of one testbed model, measured on a fixed batch.

After each step t = 1…k, for every block ``blocks.{i}`` and for the logits (``head``):
- ``act_rms``: RMS of the output on the fixed batch (√q, the coordinate size of microsoft/mup's
  coordinate check);
- ``change_rms``: RMS of the output's change since initialization, upstream changes included;
- ``update`` (blocks only): ‖B_t(x) − B_{t−1}(x)‖ / ‖B_{t−1}(x)‖ with the block's own input x
  held fixed, DeepNet's "model update" per block (analysis.training.block_updates.update_sizes).
Steps run at a constant learning rate (no warmup, no decay, no weight decay): what the
one-step theory and the coordinate check are about.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd
import torch

from analysis.testbed.corpus import Corpus
from analysis.testbed.model import ModelConfig, Testbed, build_model
from analysis.testbed.parametrization import OPTIMIZERS, param_groups, set_lr
from analysis.training.block_updates import trace_blocks, update_sizes


@dataclass(frozen=True)
class StepConfig:
    """How the first steps are taken and measured."""

    optimizer: str = "adam"  # "adam" (β1, β2, eps below) or "sgd" (plain, no momentum)
    lr: float = 1e-3  # the base learning rate; the parametrization's multipliers apply on top
    steps: int = 3
    batch_size: int = 8
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer '{self.optimizer}' (known: {', '.join(OPTIMIZERS)})")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        for name, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {beta}")
        if not (self.eps > 0 and self.eps < float("inf")):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps}")


def make_step_optimizer(model: Testbed, sc: StepConfig) -> torch.optim.Optimizer:
    """Adam or SGD over the parametrization's groups, at ``sc.lr`` × each group's multiplier."""
    groups = param_groups(model, sc.optimizer)
    opt = (torch.optim.Adam(groups, lr=sc.lr, betas=(sc.beta1, sc.beta2), eps=sc.eps)
           if sc.optimizer == "adam" else torch.optim.SGD(groups, lr=sc.lr))
    set_lr(opt, sc.lr)
    return opt


def _rms(t: torch.Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


def measure_steps(mc: ModelConfig, sc: StepConfig, corpus: Corpus, seed: int = 0,
                  device: str = "cpu") -> pd.DataFrame:
    """One row per (step, site): act_rms, change_rms, update and the step's training loss."""
    sc.validate()
    model = build_model(mc, seed=seed, device=device)
    opt = make_step_optimizer(model, sc)
    data = torch.Generator().manual_seed(seed)
    fixed = corpus.batch("val", sc.batch_size, mc.max_seq_len,
                         generator=torch.Generator().manual_seed(20_000 + seed), device=device)[0]
    pairs, logits = trace_blocks(model, fixed)
    init = [y for _, y in pairs] + [logits]
    sites = [f"blocks.{i}" for i in range(mc.depth)] + ["head"]
    rows = []
    for t in range(1, sc.steps + 1):
        x, y = corpus.batch("train", sc.batch_size, mc.max_seq_len, generator=data, device=device)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        updates = update_sizes(model, pairs) + [float("nan")]
        pairs, logits = trace_blocks(model, fixed)
        now = [y for _, y in pairs] + [logits]
        for site, a, b, u in zip(sites, now, init, updates):
            rows.append({"step": t, "site": site, "act_rms": _rms(a), "change_rms": _rms(a - b),
                         "update": u, "loss": loss.item()})
    meta = {"scheme": mc.scheme, "depth": mc.depth, "width": mc.width,
            "parametrization": mc.parametrization, "seed": seed, **asdict(sc)}
    return pd.DataFrame(rows).assign(**meta)
