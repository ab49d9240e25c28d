"""A run's checkpoint: written atomically, reloaded with ``weights_only=True``, refused when it
was written under another sharding.

``checkpoint.pt`` holds the model and optimizer state (under FSDP gathered whole, so it resumes
on any number of ranks), the data generator's state, the run's ``RunState`` and its model config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from analysis.infra.distributed import World
from analysis.infra.files import save_torch
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
    """torch.save to a temp file in the same folder, then rename over ``path``
    (analysis.infra.files: a full disk an OSError naming ``path``)."""
    save_torch(obj, path)


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
    ckpt, state = read_checkpoint(path, model)
    try:
        load_weights_and_moments(model, opt, ckpt, fsdp, path)
        data_gen.set_state(ckpt["data_gen"])
    except (RuntimeError, KeyError, TypeError, IndexError) as e:  # what the checks did not see
        raise _unusable(path, f"it does not restore ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:160]})") from None
    except ValueError as e:  # the optimizer's own refusal; the sharding refusal names the file
        if str(path) in str(e):
            raise
        raise _unusable(path, f"its optimizer state does not fit the model ({e})") from None
    return state


RESTART = "delete it to restart the run, or restore it"  # what to do with a checkpoint refused
CHECKPOINT_KEYS = ("model", "optimizer", "data_gen", "state")


def _unusable(path: Path, reason: str) -> ValueError:
    return ValueError(f"{path} cannot resume this run: {reason}; {RESTART}")


def read_checkpoint(path: Path, model: Testbed) -> tuple[dict[str, Any], RunState]:
    """The checkpoint at ``path`` and its RunState, checked before anything is restored from it:
    read with ``torch.load(weights_only=True)`` (analysis.checkpoints.guards: a pickle that would
    run code, random bytes or a cut file each refused as such), the keys the run writes, the
    model's weight names and shapes, finite weights and Adam moments, a RunState of the right
    types. Anything else is a one-line ValueError naming the file and saying what to do."""
    from analysis.checkpoints.guards import check_weights, non_finite, torch_load
    ckpt = torch_load(path, advice=RESTART)
    if not isinstance(ckpt, dict):
        raise _unusable(path, f"it holds a {type(ckpt).__name__}, not a run's checkpoint (a dict "
                              f"of {', '.join(CHECKPOINT_KEYS)})")
    lacking = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if lacking:
        raise _unusable(path, f"it lacks {', '.join(lacking)} (a run's checkpoint holds "
                              f"{', '.join(CHECKPOINT_KEYS)}): not a checkpoint of a sigprop run")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    try:
        check_weights(expected, ckpt["model"], path, "this run's settings describe")
    except ValueError as e:
        raise _unusable(path, str(e).removeprefix(f"{path}: ")) from None
    opt = ckpt["optimizer"]
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict)
            and isinstance(opt.get("param_groups"), list)):
        raise _unusable(path, "its optimizer state is not an optimizer's state_dict (state, "
                              "param_groups)")
    moments = {f"{p}.{k}": v for p, st in opt["state"].items() if isinstance(st, dict)
               for k, v in st.items()}
    bad = non_finite(moments)
    if bad:
        raise _unusable(path, f"its optimizer {bad.replace('weight ', 'moment ', 1)}")
    gen = ckpt["data_gen"]
    if not (isinstance(gen, torch.Tensor) and gen.dtype == torch.uint8 and gen.dim() == 1):
        raise _unusable(path, "data_gen is not a random generator's state (a 1-d uint8 tensor)")
    return ckpt, _run_state(ckpt["state"], path)


def _run_state(saved: Any, path: Path) -> RunState:
    """The RunState saved in a checkpoint, its fields' types checked."""
    if not isinstance(saved, dict):
        raise _unusable(path, f"its state is a {type(saved).__name__}, not a dict of RunState fields")
    known = {f.name for f in fields(RunState)}  # checkpoints of older versions carry more
    state = RunState(**{k: v for k, v in saved.items() if k in known})
    number = (int, float)
    if not (isinstance(state.step, int) and not isinstance(state.step, bool) and state.step >= 0):
        raise _unusable(path, f"its step is {state.step!r}, not a whole number >= 0")
    if not (state.loss_ema is None or isinstance(state.loss_ema, number)) or \
            not isinstance(state.wall_s, number):
        raise _unusable(path, "its loss_ema or wall_s is not a number")
    for name in ("train_loss", "val_loss", "updates", "windows"):
        rows = getattr(state, name)
        if not (isinstance(rows, list) and all(isinstance(r, (list, tuple)) and
                                               all(isinstance(v, number) for v in r) for r in rows)):
            raise _unusable(path, f"its {name} is not a list of rows of numbers")
    return state
