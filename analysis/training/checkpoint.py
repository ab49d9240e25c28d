"""A run's checkpoint: written atomically, reloaded with ``weights_only=True``, refused when it
was written under another sharding.

``checkpoint.pt`` holds the model and optimizer state (under FSDP gathered whole, so it resumes
on any number of ranks), the data generator's state, the run's ``RunState`` and its model config.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from analysis.infra.distributed import World
from analysis.testbed.model import ModelConfig, Testbed


@dataclass
class RunState:
    """What a checkpoint restores besides model and optimizer."""

    step: int = 0
    loss_ema: float | None = None
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    updates: list[tuple[int, int, float]] = field(default_factory=list)  # (step, block, size)
    # timed windows of training steps only, between two host syncs: (first step, steps, seconds)
    windows: list[tuple[int, int, float]] = field(default_factory=list)
    wall_s: float = 0.0  # seconds since the run began, over every (re)start, at the checkpoint


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def weights_and_moments(model: Testbed, opt: torch.optim.Optimizer, fsdp: bool) -> dict[str, Any]:
    """The checkpoint's model and optimizer state; under FSDP gathered whole (a collective: every
    rank calls it), the optimizer keyed by parameter name."""
    if not fsdp:
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(model, options=whole),
            "optimizer": get_optimizer_state_dict(model, opt, options=whole), "sharded": True}


def load_weights_and_moments(model: Testbed, opt: torch.optim.Optimizer, ckpt: dict[str, Any],
                             fsdp: bool, path: Path) -> None:
    """Restore a checkpoint written by ``weights_and_moments`` (FSDP: into any world size)."""
    if bool(ckpt.get("sharded")) != fsdp:
        raise ValueError(f"{path} was written {'with' if ckpt.get('sharded') else 'without'} "
                         f"--fsdp: resume it {'with' if ckpt.get('sharded') else 'without'} --fsdp "
                         "(any number of ranks)")
    if not fsdp:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt["model"], options=whole)
    set_optimizer_state_dict(model, opt, ckpt["optimizer"], options=whole)


def save_checkpoint(path: Path, model: Testbed, opt: torch.optim.Optimizer,
                    data_gen: torch.Generator, state: RunState, mc: ModelConfig, fsdp: bool,
                    world: World) -> None:
    """Write the run's checkpoint (every rank calls it: under FSDP the state is gathered; rank 0
    alone writes, as every rank holds the same state)."""
    weights = weights_and_moments(model, opt, fsdp)
    if world.main:
        save_atomic({**weights, "data_gen": data_gen.get_state(), "state": asdict(state),
                     "model_config": mc.to_dict()}, path)


def resume(path: Path, model: Testbed, opt: torch.optim.Optimizer, data_gen: torch.Generator,
           fsdp: bool, device: torch.device) -> RunState | None:
    """Restore model, optimizer and data generator from the checkpoint at ``path`` and return
    its RunState; None (nothing restored) when there is none."""
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location=device, weights_only=True)
    load_weights_and_moments(model, opt, ckpt, fsdp, path)
    data_gen.set_state(ckpt["data_gen"])
    known = {f.name for f in fields(RunState)}  # checkpoints of older versions carry more
    return RunState(**{k: v for k, v in ckpt["state"].items() if k in known})
