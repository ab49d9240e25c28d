"""Find the residual stream of a model: its blocks, each block's output norm, the final norm.

Recognised without running the model: sigprop's testbed (``blocks`` with ``output_norm``), Hugging
Face BERT/RoBERTa/ELECTRA (``encoder.layer``; post-norm, output norm ``output.LayerNorm``),
DistilBERT (``transformer.layer``), GPT-2 (``h``, ``ln_f``), GPT-NeoX (``layers``,
``final_layer_norm``), LLaMA/Mistral/Qwen2 (``layers``, ``norm``); otherwise the longest
``nn.ModuleList`` whose children share one class. ``confirm_placement`` runs one forward pass to
check the structural guess (and to find the output norms of unknown models).

Placement describes where the norms sit (``PLACEMENTS``): 'post' when every block's output is the
output of a norm inside it; otherwise by the norms of the branches (attention, FFN) — 'pre' when
no block has a norm on a branch output (norms only on branch inputs, or none), 'peri' when every
block has norms both on its branches' inputs and on their outputs before the residual add
(Peri-LN / sandwich: Gemma 2 and 3, GLM-4), 'post-branch' when every block has norms only on its
branch outputs (OLMo 2); 'other' for mixtures (Mix-LN), 'unknown' when the structure does not
say and no forward check has run. Per block, ``Layout.pre_branch_norms`` / ``post_branch_norms``
name the norms: from the scheme for the testbed, from module names for Gemma 2/3, GLM-4 and
OLMo 2, and measured by ``confirm_placement`` for any model (see there).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
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
# Families with norms on branch outputs, by the names of their norms relative to a block (all must
# exist): (pre-branch norms, post-branch norms). A family with no pre-branch names must also lack
# every name in PRE_NORMS.
BRANCH_NORMS = (
    (("input_layernorm", "pre_feedforward_layernorm"),
     ("post_attention_layernorm", "post_feedforward_layernorm")),  # Gemma 2, Gemma 3
    (("input_layernorm", "post_attention_layernorm"),
     ("post_self_attn_layernorm", "post_mlp_layernorm")),  # GLM-4
    ((), ("post_attention_layernorm", "post_feedforward_layernorm")),  # OLMo 2
)
# Placement names and what they mean, for reports.
PLACEMENTS = {
    "pre": "norms on branch inputs only",
    "post": "every block ends in a norm",
    "peri": "norms before and after each branch",
    "post-branch": "norms after each branch, before the residual add",
    "other": "mixed across blocks",
    "unknown": "not known from the structure",
}
# Probe point sites, in stream order: the embedding output, a block's aggregate before its output
# norm (post-norm blocks only), a block's output, the head input.
SITES = ("embed", "pre_norm_sum", "resid_post", "final")


def point_name(layer: int, site: str = "resid_post") -> str:
    """The stable name of a probe point: ``blocks.{layer}.{site}`` for 'pre_norm_sum' and
    'resid_post' (``layer`` zero-based), just the site for 'embed' and 'final' (``layer`` ignored)."""
    if site not in SITES:
        raise ValueError(f"site={site!r} is not one of {', '.join(SITES)}")
    return site if site in ("embed", "final") else f"blocks.{layer}.{site}"


@dataclass(frozen=True)
class Layout:
    """Where the residual stream is: module paths (as in ``model.named_modules()``) and the placement."""

    blocks: tuple[str, ...]
    output_norms: tuple[str | None, ...]  # per block: the norm whose output is the block output
    final: str | None  # the module whose output is the head input; None: the last block's output
    placement: str  # a key of PLACEMENTS (see the module docstring)
    how: str  # how the blocks were found, for reports and error messages
    checked: bool = False  # True once confirm_placement has run a forward pass
    notes: tuple[str, ...] = field(default_factory=tuple)
    # per block: norms on a branch input (their input is the stream) and on a branch output (their
    # output is added to the stream); both () when not known (structure silent, no forward check)
    pre_branch_norms: tuple[tuple[str, ...], ...] = ()
    post_branch_norms: tuple[tuple[str, ...], ...] = ()

    def branch_norms(self) -> tuple[str, ...]:
        """Per block: 'pre', 'post', 'both' or 'none' (where its branch norms are); () when not known."""
        if not self.pre_branch_norms:
            return ()
        kinds = {(True, False): "pre", (False, True): "post", (True, True): "both", (False, False): "none"}
        return tuple(kinds[bool(a), bool(b)] for a, b in zip(self.pre_branch_norms, self.post_branch_norms))

    def describe(self) -> str:
        """One line for reports: how many blocks, how found, the placement and how it is known."""
        source = "forward check" if self.checked else "structure"
        return (f"{len(self.blocks)} blocks ({self.how}); placement {self.placement} "
                f"({PLACEMENTS.get(self.placement, '?')}; from {source}); "
                f"head input: {self.final or 'the last block output'}")

    def points(self) -> list[str]:
        """Stable point names in stream order: embed, blocks.{i}.pre_norm_sum, blocks.{i}.resid_post, final."""
        names = ["embed"]
        for i, norm in enumerate(self.output_norms):
            if norm is not None:
                names.append(point_name(i, "pre_norm_sum"))
            names.append(point_name(i))
        return names + ["final"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (OptimizedModule) wraps, else ``model`` itself."""
    return getattr(model, "_orig_mod", model)


def _placement(output_norms: list[str | None] | tuple[str | None, ...], known: bool,
               pre: tuple[tuple[str, ...], ...] = (), post: tuple[tuple[str, ...], ...] = ()) -> str:
    """The placement from the output norms and, where known, the branch norms (per block)."""
    if all(n is not None for n in output_norms):
        return "post"
    if any(n is not None for n in output_norms):
        return "other"
    if not post or not any(post):
        return "pre" if known or post else "unknown"
    if all(post):
        if all(pre):
            return "peri"
        if not any(pre):
            return "post-branch"
    return "other"


# --- branch norms: a block as a linear dataflow graph ------------------------------------------
# Nodes: '' (the block input) and modules (or, for the testbed trace, scheme calls). Each norm's
# input and the block output are written as linear combinations of earlier node outputs. Then a
# norm whose input involves the stream (the block input, or a norm that carries the stream) is
# on the stream if its output is added to something (post-norm's inner norm), else it feeds a
# branch: pre-branch; a norm whose input does not involve the stream but whose output is added
# is post-branch; any other (q/k norms inside attention) is internal.

Combo = dict[str, float]


def _branch_classes(norms: list[str], inputs: dict[str, Combo | None], final: Combo | None,
                    output_norm: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(pre-branch norms, post-branch norms) of one block, ``norms`` in the order they run."""
    used = set(final or ())
    for c in inputs.values():
        used |= set(c or ())
    stream, pre, post = {""}, [], []
    for n in norms:
        if n == output_norm:
            continue
        c = inputs.get(n)
        on_stream = c is not None and any(k in stream for k in c)
        if on_stream and n in used:
            stream.add(n)
        elif on_stream:
            pre.append(n)
        elif n in used:
            post.append(n)
    return tuple(pre), tuple(post)


def _testbed_branch_norms(block: nn.Module, prefix: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """A testbed block's branch norms, read from the structure it was built from (None if not one)."""
    structure = getattr(block, "structure", None)
    pre, post = (getattr(structure, f"{k}_branch_norms", None) for k in ("pre", "post"))
    if pre is None or post is None or not hasattr(block, "norms"):
        return None
    return tuple(f"{prefix}.norms.{k}" for k in pre), tuple(f"{prefix}.norms.{k}" for k in post)


def _named_branch_norms(blocks: list[nn.Module], prefix: list[str]
                        ) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]] | None:
    """Branch norms of a known family from its norm names (BRANCH_NORMS), else None."""
    for pre, post in BRANCH_NORMS:
        if not all(_child(b, n) is not None for b in blocks for n in pre + post):
            continue
        if not pre and any(_child(b, n) is not None for b in blocks for n in PRE_NORMS):
            continue
        return (tuple(tuple(f"{p}.{n}" for n in pre) for p in prefix),
                tuple(tuple(f"{p}.{n}" for n in post) for p in prefix))
    return None


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
        if not paths or not all(paths):  # '' names the model itself, not its blocks
            raise ValueError(f"blocks path is empty ({blocks!r}): give the module path of the "
                             "blocks' ModuleList, as named in model.named_modules()")
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
    pre: tuple[tuple[str, ...], ...] = ()
    post: tuple[tuple[str, ...], ...] = ()
    traced = [_testbed_branch_norms(b, p) for b, p in zip(block_modules, paths)]
    if all(t is not None for t in traced):
        pre, post = tuple(t[0] for t in traced), tuple(t[1] for t in traced)
    elif output_norm is None and all(n is None for n in norms):
        pre, post = _named_branch_norms(block_modules, paths) or ((), ())
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
    return Layout(tuple(paths), tuple(norms), final_path, _placement(norms, known, pre, post), how,
                  pre_branch_norms=pre, post_branch_norms=post)


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


# Stream-shaped tensors are compared on this many fixed random coordinates (the relations are
# linear per coordinate, so a subset decides them; it keeps the check cheap for large models).
_SAMPLE = 8192


def branch_children(block: nn.Module) -> list[str]:
    """Direct children of a block (ModuleList items count) that may be branches: not norms, dropouts."""
    kids = []
    for n, m in block.named_children():
        kids += [(f"{n}.{k}", c) for k, c in m.named_children()] if isinstance(m, nn.ModuleList) else [(n, m)]
    return [n for n, m in kids if not _is_norm(m) and not isinstance(m, (nn.Dropout, nn.Identity))]


def _combo(target: torch.Tensor, basis: list[tuple[str, torch.Tensor]], tol: float,
           prefer: set[str] = frozenset()) -> Combo | None:
    """``target`` as a linear combination of the fewest basis vectors that fit it within ``tol``
    (relative residual), else None: greedy selection by correlation with the residual, then each
    term dropped again if the rest still fits (near-collinear vectors, such as a branch output and
    its norm's, cannot both enter by rounding noise). The block input ('') is taken first and
    dropped last; among candidates within 1% of the best correlation, one in ``prefer`` wins: at
    init a branch output whose per-token RMS hardly varies is nearly a multiple of its norm's
    output, and then the norm's is taken as the added one."""
    scale = float(target.norm())
    if not basis or not scale or not math.isfinite(scale):  # non-finite activations: nothing to fit
        return None
    vecs = {n: v for n, v in basis if float(v.norm()) and math.isfinite(float(v.norm()))}
    if not vecs:
        return None

    def fit(names: list[str]) -> tuple[float, torch.Tensor]:
        B = torch.stack([vecs[n] for n in names], 1)
        c = torch.linalg.lstsq(B, target[:, None], driver="gelsd").solution[:, 0]
        return float((target - B @ c).norm()) / scale, c

    chosen: list[str] = [""] if "" in vecs else []  # the block input first: it is nearly a multiple
    res, c = fit(chosen) if chosen else (1.0, None)  # of its norm's output at init, like a branch
    residual = target - vecs[""] * c[0] if chosen else target
    while res > tol and len(chosen) < len(vecs):
        score = {n: float((residual @ vecs[n]).abs() / vecs[n].norm()) for n in vecs if n not in chosen}
        top = max(score.values())
        best = max(score, key=lambda n: (n in prefer and score[n] >= 0.99 * top, score[n]))
        chosen.append(best)
        res, c = fit(chosen)
        residual = target - torch.stack([vecs[n] for n in chosen], 1) @ c
    if res > tol:
        return None
    for n in reversed(list(chosen)):  # the latest additions go first, the block input last
        if len(chosen) > 1 and fit([k for k in chosen if k != n])[0] <= tol:
            chosen.remove(n)
    return dict(zip(chosen, fit(chosen)[1].tolist()))


def _measured_branch_norms(p: str, norms: list[str], kids: list[str], samples: dict[tuple[str, str], torch.Tensor],
                           starts: dict[str, int], ends: dict[str, int], output_norm: str | None, tol: float
                           ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """One block's branch norms from the sampled inputs and outputs of its norms and children."""
    x = samples.get((p, "in"))
    if x is None:
        return (), ()
    nodes = sorted((n for n in norms + kids if (n, "out") in samples and n in ends),
                   key=lambda n: (n not in norms, ends[n]))  # norms first: a wrapper equal to its norm drops
    kept: list[tuple[str, torch.Tensor]] = [("", x)]
    for n in nodes:
        v = samples[(n, "out")]
        if float(v.norm()) and all(float((v - u).norm()) > tol * float(u.norm()) for _, u in kept):
            kept.append((n, v))
    inputs: dict[str, Combo | None] = {}
    ran = sorted((n for n in norms if n in starts), key=starts.get)
    for n in ran:
        u = samples.get((n, "in"))
        before = [(k, v) for k, v in kept if k == "" or ends[k] < starts[n]]
        inputs[n] = None if u is None else _combo(u, before, tol, set(norms))
    final = None if output_norm or (p, "out") not in samples else _combo(samples[(p, "out")], kept, tol, set(norms))
    return _branch_classes(ran, inputs, final, output_norm)


def confirm_placement(model: nn.Module, layout: Layout, *args: Any, **kwargs: Any) -> Layout:
    """Run ``model(*args, **kwargs)`` once (no grad) and return ``layout`` with the placement measured.

    A block counts as post-norm when its output equals the output of a norm inside it (that norm
    becomes its output norm). Branch norms: each norm's input and the block output are fitted
    (least squares on sampled coordinates, within rounding) as linear combinations of the block
    input and the outputs of earlier norms and of the block's direct non-norm children (the
    branches); the graph then says which norms are pre-branch (input involves the stream, output
    not added to anything) and post-branch (input from branches only, output added). Raises
    ValueError if a block does not map [batch, seq, d] to the same shape, or if the measured output
    norms contradict a structural 'post' (or a structural placement without output norms).
    """
    model = unwrap(model)
    modules = dict(model.named_modules())
    outs: dict[str, torch.Tensor] = {}
    ins: dict[str, torch.Tensor] = {}
    samples: dict[tuple[str, str], torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    starts: dict[str, int] = {}
    ends: dict[str, int] = {}
    order = itertools.count()
    index: dict[tuple[int, torch.device], torch.Tensor] = {}
    handles = []

    def sample(block: str, name: str, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shapes.get(block):
            return
        key = (t.numel(), t.device)
        if key not in index:
            gen = torch.Generator().manual_seed(0)
            index[key] = torch.randperm(t.numel(), generator=gen)[:_SAMPLE].to(t.device)
        samples[name] = t.detach().reshape(-1)[index[key]].to("cpu", torch.float64)

    def block_input(a, kw):
        return a[0] if a else kw.get("hidden_states")

    def keep(name, block, norm):
        def hook(module, a, kw, out):
            ends[name] = next(order)
            t = first_tensor(out)
            if t is not None and (norm or name == block):
                outs[name] = t
            sample(block, (name, "out"), t)
            if name == block:
                x = block_input(a, kw)
                if isinstance(x, torch.Tensor):
                    ins[name] = x
        return hook

    def start(name, block):
        def hook(module, a, kw):
            starts[name] = next(order)
            x = block_input(a, kw)
            if name == block and isinstance(x, torch.Tensor):
                shapes[block] = tuple(x.shape)
            sample(block, (name, "in"), x)
        return hook

    norm_paths = {p: [f"{p}.{n}" for n, m in modules[p].named_modules() if n and _is_norm(m)]
                  for p in layout.blocks}
    kid_paths = {p: [f"{p}.{n}" for n in branch_children(modules[p])] for p in layout.blocks}
    for p in layout.blocks:
        for name in [p, *norm_paths[p], *kid_paths[p]]:
            norm = name in norm_paths[p]
            if name == p or norm:
                handles.append(modules[name].register_forward_pre_hook(start(name, p), with_kwargs=True))
            handles.append(modules[name].register_forward_hook(keep(name, p, norm), with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    measured: list[str | None] = []
    pre, post = [], []
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
        tol = max(1e-4, 4 * torch.finfo(y.dtype).eps) if y.is_floating_point() else 1e-4
        a, b = _measured_branch_norms(p, norm_paths[p], kid_paths[p], samples, starts, ends, measured[-1], tol)
        pre.append(a)
        post.append(b)
    base = _placement(measured, known=True)  # from the output norms alone: 'pre', 'post' or 'other'
    notes = list(layout.notes)
    if layout.placement not in ("unknown", "other") and base != _placement(layout.output_norms, known=True):
        raise ValueError(f"structure says '{layout.placement}' but the forward check measured "
                         f"'{base}' ({layout.how}); pass output_norm= to say which norm ends a block")
    norms = layout.output_norms if layout.placement != "unknown" else tuple(measured)
    pre_t, post_t = tuple(pre), tuple(post)
    if layout.pre_branch_norms:  # the structure's are kept, as its output norms are (below float32
        if (pre_t, post_t) != (layout.pre_branch_norms, layout.post_branch_norms):  # the fit can blur)
            notes.append(f"the forward check's branch norms ({_placement(norms, True, pre_t, post_t)}) differ "
                         "from the structure's; the structure's are kept")
        pre_t, post_t = layout.pre_branch_norms, layout.post_branch_norms
    placement = _placement(norms, True, pre_t, post_t)
    if layout.placement != "unknown" and placement != layout.placement:
        notes.append(f"structure said '{layout.placement}', the forward check's branch norms say '{placement}'")
    notes.append(f"forward check: {placement}")
    return dataclasses.replace(layout, output_norms=tuple(norms), placement=placement, checked=True,
                               notes=tuple(notes), pre_branch_norms=pre_t, post_branch_norms=post_t)
