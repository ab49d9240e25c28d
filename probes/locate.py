"""Find the residual stream of a model: its blocks, each block's output norm, the final norm.

Recognised without running the model: sigprop's testbed (``blocks`` with ``output_norm``), Hugging
Face BERT/RoBERTa/ELECTRA (``encoder.layer``; post-norm, output norm ``output.LayerNorm``),
DistilBERT (``transformer.layer``), GPT-2 (``h``, ``ln_f``), GPT-NeoX (``layers``,
``final_layer_norm``), LLaMA/Mistral/Qwen2 (``layers``, ``norm``); otherwise the longest
``nn.ModuleList`` whose children share one class. ``confirm_placement`` runs one forward pass to
check the structural guess (and to find the output norms of unknown models).

Placement describes the residual stream between blocks: 'post' when every block's output is the
output of a norm inside it, 'pre' when no block's is, 'other' when some are (Mix-LN), 'unknown'
when the structure does not say and no forward check has run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Paths (suffixes) of the block list in known families, most specific first.
BLOCK_LISTS = ("encoder.layer", "transformer.layer", "transformer.h", "model.layers", "gpt_neox.layers",
               "decoder.layers", "layers", "blocks", "h", "layer")
# Names, relative to the block list's parent, of a final norm whose output feeds the head.
FINAL_NORMS = ("final_norm", "ln_f", "norm", "final_layer_norm", "final_layernorm", "norm_f", "ln_final")
# Names, relative to a block, of a norm whose output is the block output (post-norm families).
POST_NORMS = ("output.LayerNorm", "output_layer_norm")
# Names, relative to a block, of a norm on the sublayer input only (pre-norm families).
PRE_NORMS = ("ln_1", "input_layernorm", "attention_norm", "ln_attn", "pre_attention_layernorm")


@dataclass(frozen=True)
class Layout:
    """Where the residual stream is: module paths (as in ``model.named_modules()``) and the placement."""

    blocks: tuple[str, ...]
    output_norms: tuple[str | None, ...]  # per block: the norm whose output is the block output
    final: str | None  # the module whose output is the head input; None: the last block's output
    placement: str  # 'pre', 'post', 'other' or 'unknown' (see the module docstring)
    how: str  # how the blocks were found, for reports and error messages
    checked: bool = False  # True once confirm_placement has run a forward pass
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """One line for reports: how many blocks, how found, the placement and how it is known."""
        source = "forward check" if self.checked else "structure"
        return (f"{len(self.blocks)} blocks ({self.how}); placement {self.placement} (from {source}); "
                f"head input: {self.final or 'the last block output'}")

    def points(self) -> list[str]:
        """Stable point names in stream order: embed, blocks.{i}.pre_norm_sum, blocks.{i}.resid_post, final."""
        names = ["embed"]
        for i, norm in enumerate(self.output_norms):
            if norm is not None:
                names.append(f"blocks.{i}.pre_norm_sum")
            names.append(f"blocks.{i}.resid_post")
        return names + ["final"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (OptimizedModule) wraps, else ``model`` itself."""
    return getattr(model, "_orig_mod", model)


def _placement(output_norms: list[str | None], known: bool) -> str:
    if all(n is not None for n in output_norms):
        return "post"
    if all(n is None for n in output_norms):
        return "pre" if known else "unknown"
    return "other"


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _block_norms(blocks: list[nn.Module], prefix: list[str], output_norm: str | None
                 ) -> tuple[list[str | None], bool]:
    """Per block, the output norm's full path, and whether the structure decided the placement."""
    if output_norm is not None:  # user override, relative to each block
        missing = [p for p, b in zip(prefix, blocks) if _child(b, output_norm) is None]
        if missing:
            raise ValueError(f"output_norm='{output_norm}' is not a submodule of {missing[0]}")
        return [f"{p}.{output_norm}" for p in prefix], True
    if all(hasattr(b, "output_norm") for b in blocks):  # sigprop's testbed: exact
        out = []
        for p, b in zip(prefix, blocks):
            norm = b.output_norm
            out.append(None if norm is None else
                       f"{p}.{next(n for n, m in b.named_modules() if m is norm)}")
        return out, True
    for name in POST_NORMS:
        if all(_child(b, name) is not None for b in blocks):
            return [f"{p}.{name}" for p in prefix], True
    known_pre = any(all(_child(b, n) is not None for b in blocks) for n in PRE_NORMS)
    return [None] * len(blocks), known_pre


def _generic_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) >= 1 and len({type(c) for c in m}) == 1]
    return sorted(lists, key=lambda nm: -len(nm[1]))


def locate(model: nn.Module, blocks: str | list[str] | None = None, final: str | None = None,
           output_norm: str | None = None) -> Layout:
    """The residual-stream layout of ``model`` (overrides: ``blocks`` path(s), ``final`` path, ``output_norm`` relative name)."""
    model = unwrap(model)
    modules = dict(model.named_modules())
    tried = []
    if blocks is not None:
        paths = [blocks] if isinstance(blocks, str) else list(blocks)
        missing = [p for p in paths if p not in modules]
        if missing:
            raise ValueError(f"blocks path '{missing[0]}' is not a submodule of {type(model).__name__}")
        if len(paths) == 1 and isinstance(modules[paths[0]], nn.ModuleList):
            paths = [f"{paths[0]}.{i}" for i in range(len(modules[paths[0]]))]
        how = "given by blocks="
    else:
        paths, how = [], ""
        tried.append(f"a ModuleList named (or ending in) {', '.join(BLOCK_LISTS)}")
        for suffix in BLOCK_LISTS:
            found = [(n, m) for n, m in modules.items() if isinstance(m, nn.ModuleList) and len(m)
                     and (n == suffix or n.endswith("." + suffix))]
            if found:
                name, mlist = max(found, key=lambda nm: len(nm[1]))
                paths, how = [f"{name}.{i}" for i in range(len(mlist))], f"known block list '{name}'"
                break
        if not paths:
            tried.append("the longest nn.ModuleList whose children share one class")
            generic = _generic_lists(model)
            if generic:
                name, mlist = generic[0]
                paths = [f"{name}.{i}" for i in range(len(mlist))]
                how = f"generic fallback: longest uniform ModuleList '{name}' ({type(mlist[0]).__name__})"
        if not paths:
            raise ValueError(f"no blocks found in {type(model).__name__}: tried {'; then '.join(tried)}. "
                             "pass blocks='path.to.ModuleList' (or a list of block module paths), "
                             "as named in model.named_modules().")
    block_modules = [modules[p] for p in paths]
    norms, known = _block_norms(block_modules, paths, output_norm)
    if output_norm is None and all(hasattr(b, "output_norm") for b in block_modules):
        how += "; output norms from the sigprop testbed's output_norm (exact)"
    if final is not None:
        if final not in modules:
            raise ValueError(f"final path '{final}' is not a submodule of {type(model).__name__}")
        final_path = final
    else:
        parent = paths[0].rsplit(".", 2)[0] if paths[0].count(".") >= 2 else ""
        final_path = None
        for scope in dict.fromkeys([parent, parent.rsplit(".", 1)[0] if "." in parent else "", ""]):
            for name in FINAL_NORMS:
                full = f"{scope}.{name}" if scope else name
                if full in modules and full not in paths:
                    final_path = full
                    break
            if final_path:
                break
    return Layout(tuple(paths), tuple(norms), final_path, _placement(norms, known), how)


def first_tensor(out: Any) -> torch.Tensor | None:
    """The hidden states in a module's output: the tensor itself, or the first of a tuple / ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "to_tuple"):  # Hugging Face ModelOutput
        return first_tensor(out.to_tuple())
    return None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def confirm_placement(model: nn.Module, layout: Layout, *args: Any, **kwargs: Any) -> Layout:
    """Run ``model(*args, **kwargs)`` once (no grad) and return ``layout`` with the placement measured.

    A block counts as post-norm when its output equals the output of a norm inside it (that norm
    becomes its output norm). Raises ValueError if a block does not map [batch, seq, d] to the
    same shape, or if the measurement contradicts a structural 'pre'/'post'.
    """
    model = unwrap(model)
    modules = dict(model.named_modules())
    outs: dict[str, torch.Tensor] = {}
    ins: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name):
        def hook(module, a, kw, out):
            t = first_tensor(out)
            if t is not None:
                outs[name] = t
            x = a[0] if a else kw.get("hidden_states")
            if isinstance(x, torch.Tensor):
                ins[name] = x
        return hook

    norm_paths = {p: [f"{p}.{n}" for n, m in modules[p].named_modules() if n and _is_norm(m)]
                  for p in layout.blocks}
    for p in layout.blocks:
        for name in [p, *norm_paths[p]]:
            handles.append(modules[name].register_forward_hook(keep(name), with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    measured: list[str | None] = []
    for p in layout.blocks:
        if p not in outs or p not in ins:
            raise ValueError(f"block {p} did not run (or took no tensor input) in the check forward pass")
        x, y = ins[p], outs[p]
        if y.dim() != 3 or x.shape != y.shape:
            raise ValueError(f"block {p} maps {tuple(x.shape)} to {tuple(y.shape)}, not [batch, seq, d] "
                             "to the same shape; pass blocks= to choose the residual blocks")
        match = [n for n in norm_paths[p] if n in outs and outs[n].shape == y.shape
                 and (outs[n] is y or torch.equal(outs[n], y))]
        measured.append(match[-1] if match else None)
    placement = _placement(measured, known=True)
    notes = list(layout.notes)
    if layout.placement in ("pre", "post") and placement != layout.placement:
        raise ValueError(f"structure says '{layout.placement}' but the forward check measured "
                         f"'{placement}' ({layout.how}); pass output_norm= to say which norm ends a block")
    norms = layout.output_norms if layout.placement != "unknown" else tuple(measured)
    notes.append(f"forward check: {placement}")
    return dataclasses.replace(layout, output_norms=tuple(norms), placement=placement, checked=True,
                               notes=tuple(notes))
