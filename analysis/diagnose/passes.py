"""How ``diagnose`` runs a model: the stream without the head, and the head only where a loss needs it.

The forward statistics read the residual stream, so the forward passes stop at the head input and
never compute logits: for a large vocabulary the LM head costs more than all the blocks together
(a 256k vocabulary at width 512 is 131M multiply-adds per token against 3M per block).

``Passes`` splits a causal LM into its **trunk** (embedding, blocks, final norm: the head input h)
and its **head** (h → logits), checked once against the model's own logits on one batch; where the
split does not reproduce them (a family that scales or caps its logits), every pass falls back to
the whole model and says so. On top of the split:

- ``loss_backward``: the model's own loss, backward to the stream, with the logits computed in
  chunks of positions (``CHUNK_BYTES`` of logits at a time): the head's gradient is accumulated on
  a detached h, then sent through the trunk once. Same loss, same gradient, bounded memory.
- ``sequence_losses``: per-sequence loss on a random sample of positions (a different sample per
  sequence, drawn from a fixed seed), so the skip test pays for the head on that sample only; the
  sample's own spread is inside the standard error over sequences.

Masked LMs (BERT family: small vocabularies, 15 % of positions carry a loss) and models without a
head (a surrogate loss) run as before, through the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from analysis.checkpoints import Loaded

CHUNK_BYTES = 1 << 28  # float32 logits held at once in the chunked loss (256 MiB)
SPLIT_RTOL = 1e-4  # the split's logits must match the model's to this (relative to their RMS)


def _masked(loaded: Loaded, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(input with 15 % of positions masked, labels −100 elsewhere); at least one per sequence."""
    pick = torch.rand(x.shape, generator=gen).to(x.device) < 0.15
    pick[:, 0] |= ~pick.any(1)
    labels = torch.where(pick, x, torch.full_like(x, -100))
    mask_id = loaded.mask_token_id if loaded.mask_token_id is not None else 0
    return torch.where(pick, torch.full_like(x, mask_id), x), labels


def _readout(shape, device) -> torch.Tensor:
    """The surrogate's fixed random readout direction z ~ N(0, 1), one per position and coordinate."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(1234)).to(device)


def _testbed_trunk(model: nn.Module) -> tuple[Callable, Callable]:
    def trunk(x: torch.Tensor) -> torch.Tensor:
        h = model.tok_embed(x) + model.pos_embed(torch.arange(x.shape[1], device=x.device))
        for block in model.blocks:
            h = block(h)
        return model.final_norm(h)

    def head(h: torch.Tensor) -> torch.Tensor:
        logits = model.head(h)
        return logits * model.output_mult if model.output_mult != 1.0 else logits
    return trunk, head


def _hf_trunk(model: nn.Module) -> tuple[Callable, Callable] | None:
    base, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if base is None or base is model or head is None:
        return None
    return (lambda x: base(input_ids=x).last_hidden_state), head


@dataclass
class Passes:
    """The model's passes for ``diagnose`` (module docstring); build with ``Passes.of``."""

    loaded: Loaded
    model: nn.Module
    trunk: Callable[[torch.Tensor], torch.Tensor] | None  # token ids → head input; None: no split
    head: Callable[[torch.Tensor], torch.Tensor] | None
    note: str | None = None  # why the split is not used, for the report

    @classmethod
    def of(cls, loaded: Loaded, model: nn.Module, check: torch.Tensor | None = None) -> "Passes":
        """The passes of ``model``; ``check``: token ids [B, T] on which the split is verified."""
        if loaded.scheme is not None:
            return cls(loaded, model, *_testbed_trunk(model))
        if loaded.loss_kind != "lm":
            return cls(loaded, model, None, None)
        split = _hf_trunk(model)
        if split is None:
            return cls(loaded, model, None, None, "no separate LM head found: logits of every position computed")
        passes = cls(loaded, model, *split)
        if check is not None:
            with torch.no_grad():
                want = model(input_ids=check).logits.float()
                got = passes.head(passes.trunk(check)).float()
            err = float((got - want).norm() / want.norm().clamp_min(1e-30))
            if got.shape != want.shape or not err <= SPLIT_RTOL:
                return cls(loaded, model, None, None,
                           f"the model's logits are not its head applied to its last hidden state "
                           f"(relative difference {err:.2g}): every pass runs the whole model")
        return passes

    def stream(self, w: torch.Tensor) -> None:
        """Forward of windows ``w`` [B, T + 1] up to the head input: no logits."""
        x = w[:, :-1]
        if self.trunk is not None:
            self.trunk(x)
        elif self.loaded.scheme is not None:
            self.model(x)
        else:
            getattr(self.model, "base_model", self.model)(input_ids=x)

    def loss_backward(self, w: torch.Tensor, gen: torch.Generator) -> float:
        """The model's loss on windows ``w``, sent backward to the stream; its value."""
        x, y = w[:, :-1], w[:, 1:]
        if self.trunk is None:
            loss = self._whole_model_loss(x, gen)
            if loss.requires_grad:
                loss.backward()
            return float(loss.detach())
        h = self.trunk(x)
        h_free = h.detach().requires_grad_()
        chunk = max(1, CHUNK_BYTES // (4 * x.shape[0] * int(self.loaded.vocab_size)))
        total = torch.zeros((), device=h.device)
        for s in range(0, x.shape[1], chunk):  # logits of a chunk of positions at a time
            logits = self.head(h_free[:, s:s + chunk]).float()
            part = F.cross_entropy(logits.flatten(0, 1), y[:, s:s + chunk].flatten(), reduction="sum") / y.numel()
            part.backward()
            total += part.detach()
        extra = self._aux_loss()
        if h.requires_grad:
            torch.autograd.backward([h] + ([extra] if extra.requires_grad else []),
                                    [h_free.grad] + ([torch.ones_like(extra)] if extra.requires_grad else []))
        return float(total + extra.detach())

    def sequence_losses(self, w: torch.Tensor, positions: int = 0) -> torch.Tensor:
        """Per-sequence loss of windows ``w`` over ``positions`` sampled positions each (0: all)."""
        x, y = w[:, :-1], w[:, 1:]
        if self.loaded.loss_kind == "surrogate":
            getattr(self.model, "base_model", self.model)(input_ids=x)
            return torch.full((len(w),), math.nan)
        if self.loaded.loss_kind == "masked-lm":  # masks drawn from the windows' own seed: equal across calls
            gen = torch.Generator().manual_seed(int(w.sum()) % (2 ** 31))
            inp, y = _masked(self.loaded, x, gen)
            logits = self.model(input_ids=inp).logits
            ce = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none", ignore_index=-100)
            return ce.sum(1) / (y != -100).sum(1).clamp_min(1)
        T = x.shape[1]
        pick = self._positions(w, positions) if 0 < positions < T else None
        if self.trunk is None:
            logits = self.model(x)[0] if self.loaded.scheme is not None else self.model(input_ids=x).logits
            if pick is not None:
                logits, y = logits.gather(1, pick[..., None].expand(-1, -1, logits.shape[-1])), y.gather(1, pick)
        else:
            h = self.trunk(x)
            if pick is not None:
                h, y = h.gather(1, pick[..., None].expand(-1, -1, h.shape[-1])), y.gather(1, pick)
            logits = self.head(h)
        return F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").mean(1)

    def _positions(self, w: torch.Tensor, k: int) -> torch.Tensor:
        """``k`` positions per sequence, a sample of its own drawn from the window's content (fixed)."""
        rows = []
        for seq in w:
            gen = torch.Generator().manual_seed(int(seq.sum()) % (2 ** 31))
            rows.append(torch.randperm(w.shape[1] - 1, generator=gen)[:k].sort().values)
        return torch.stack(rows).to(w.device)

    def _whole_model_loss(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.loaded.loss_kind == "lm":
            return self.model(input_ids=x, labels=x).loss
        if self.loaded.loss_kind == "masked-lm":
            inp, labels = _masked(self.loaded, x, gen)
            return self.model(input_ids=inp, labels=labels).loss
        h = self.model(input_ids=x).last_hidden_state.float()
        return (h * _readout(h.shape[1:], h.device)).mean()  # the documented surrogate

    def _aux_loss(self) -> torch.Tensor:
        """The testbed's MoE load-balancing term, part of its training loss (0 elsewhere)."""
        cfg = getattr(self.model, "cfg", None)
        if self.loaded.scheme is not None and cfg is not None and cfg.experts:
            return cfg.aux_loss_coef * self.model.aux_loss()
        return torch.zeros(())
