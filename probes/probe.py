"""``Probe``: streaming forward and backward statistics of a model's residual stream.

    with Probe(model) as p:            # install before torch.compile (see below)
        for idx, tgt in batches:
            logits, loss = model(idx, tgt)
            loss.backward()
    df = p.frame()                     # layer, point, site, metric, mean, spread, count, std

Each forward pass adds one sample per (point, forward metric); each backward pass one sample per
(point, gradient metric). A sample is a statistic of the whole batch at that point (for example
E[x²] over batch × seq × width). Per (point, metric) the probe keeps Σv, Σv² and n in float64 on
the point's device: memory O(points × metrics), independent of batch, sequence and width, and no
host synchronisation until ``frame()`` (one per device). In the frame, ``mean`` = Σv/n,
``std`` = the sample standard deviation across the n batches (ddof 1) and ``spread`` = std/√n,
the standard error of ``mean`` (NaN when n < 2). Spread is over batches only: for spread over
initialisation seeds, run one probe per seed and combine the frames.

torch.compile: forward hooks present when Dynamo traces are inlined into the compiled graph, and
tensor hooks on intermediates run in the compiled backward (no graph break), so statistics are
computed inside the compiled region. By default Dynamo does not guard on module hooks
(``torch._dynamo.config.skip_nnmodule_hook_guards``): code traced without the probe's hooks keeps
running without them, even for another instance of the same class. ``enable_hook_guards()``
turns those guards on (``Probe.install`` calls it; it is global and stays on), so that code
compiled after it retraces whenever hooks are added or removed. Supported: enter the probe, or
call ``enable_hook_guards()``, before the first ``torch.compile`` call. Code compiled before that
cannot see the hooks: ``frame()`` then raises instead of returning partial statistics, and
``Probe(..., recompile=True)`` calls ``torch.compiler.reset()`` (global: everything compiled
recompiles) on entry and exit to recover.

torch.distributed (DDP, FSDP under torchrun): each rank accumulates its own batches; ``frame()``
all-reduces the sums (one collective per device), so every rank's frame is the frame of one
process that ran all the ranks' batches, one after another. ``frame()`` is then a collective:
call it on every rank. ``all_reduce=False`` keeps each rank's own statistics.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from probes.locate import Layout, first_tensor, locate, point_name, unwrap
from probes.metrics import METRICS, SAMPLE_SEQS, SAMPLE_TOKENS, resolve_metrics, summarize


@dataclass
class _Point:
    name: str
    site: str  # 'embed', 'pre_norm_sum', 'resid_post', 'final'
    layer: int  # block index; -1 for embed, number of blocks for final
    forward: tuple[str, ...]
    grad: tuple[str, ...]
    fwd_acc: torch.Tensor | None = None  # [len(forward), 3]: Σv, Σv², n
    grad_acc: torch.Tensor | None = None  # [len(grad), 3]


def enable_hook_guards() -> None:
    """Make Dynamo guard on module hooks, so compiled code retraces when probes come and go."""
    import torch._dynamo.config as dynamo_config  # imported late: torch._dynamo is heavy

    dynamo_config.skip_nnmodule_hook_guards = False


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else default


def _forward_into(acc: torch.Tensor, x: torch.Tensor, x_in: Any, names: tuple[str, ...],
                  max_seqs: int, max_tokens: int) -> None:
    """Add the forward/pair metrics ``names`` of ``x`` to ``acc`` (Σv, Σv², n per metric)."""
    Probe._accumulate(acc, summarize(x, names, x_in, max_seqs, max_tokens))


def _grad_into(acc: torch.Tensor, g: torch.Tensor, names: tuple[str, ...]) -> None:
    """Add the gradient metrics ``names`` of ``g`` to ``acc``."""
    Probe._accumulate(acc, torch.stack([METRICS[m].fn(g) for m in names]))


class Probe:
    """Context manager that hooks a model's residual stream and accumulates statistics on device."""

    def __init__(self, model: nn.Module, metrics: str | Iterable[str] | None = None, *,
                 points: str | Iterable[str] | None = None, blocks: str | list[str] | None = None,
                 final: str | None = None, output_norm: str | None = None, layout: Layout | None = None,
                 max_seqs: int = SAMPLE_SEQS, max_tokens: int = SAMPLE_TOKENS, recompile: bool = False,
                 all_reduce: bool | None = None, sampled_without_grad_only: bool = False,
                 fuse: bool = False, fuse_backend: str = "inductor"):
        """Probe ``model``; ``points`` are fnmatch patterns over point names (default: all).
        ``all_reduce`` (None: when torch.distributed runs more than one rank) sums the statistics
        over the ranks at ``frame()``. ``sampled_without_grad_only``: the sampled (SVD) metrics
        are taken on forward passes under no_grad only, where a caller runs backward passes as
        well as enough forward ones (diagnose: their eigensolves were most of its probing time).
        ``fuse``: when the model runs eagerly, each point's statistics and their accumulation run
        as one ``torch.compile``d function (``fuse_backend``), a few fused kernels instead of about
        150 ops per point; an eager GPU step is bound by the host's dispatch, so every op counts.
        Inside a compiled model the statistics are traced into its graph either way."""
        self.model = model
        self.root = unwrap(model)
        self.layout = layout or locate(model, blocks, final, output_norm)
        self.metrics = resolve_metrics(metrics)
        self._explicit_grad = metrics is not None and any(METRICS[m].kind == "grad" for m in self.metrics)
        self.max_seqs, self.max_tokens, self.recompile = max_seqs, max_tokens, recompile
        self.sampled_without_grad_only = sampled_without_grad_only
        self.all_reduce = all_reduce
        if fuse and fuse_backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"unknown fuse_backend '{fuse_backend}' (torch.compile backends: "
                             f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))})")
        self.fuse, self.fuse_backend = fuse, fuse_backend
        self._fused: dict[Any, Any] = {}  # plain function → its compiled form
        all_points = self.layout.points()
        patterns = [points] if isinstance(points, str) else list(points or ["*"])
        chosen = [n for n in all_points if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not chosen:
            raise ValueError(f"points={patterns} match no point; points are: {', '.join(all_points)}")
        L = len(self.layout.blocks)
        fwd = tuple(m for m in self.metrics if METRICS[m].kind == "forward")
        pair = tuple(m for m in self.metrics if METRICS[m].kind == "pair")
        grad = tuple(m for m in self.metrics if METRICS[m].kind == "grad")
        self.points: dict[str, _Point] = {}
        for name in chosen:
            site = name.rsplit(".", 1)[-1]
            layer = -1 if name == "embed" else L if name == "final" else int(name.split(".")[1])
            self.points[name] = _Point(name, site, layer, fwd + (pair if site == "resid_post" else ()), grad)
        self._handles: list[Any] = []
        # [model forward passes, point hooks run]: device counters, because a Python int bumped
        # inside a traced hook is guarded on by Dynamo and would force a recompile every step
        self._calls: torch.Tensor | None = None
        self._saw_grad_off = False  # a forward ran under torch.no_grad
        self._saw_no_grad = False  # grad was on but a point did not require grad (frozen model)

    # --- installing -------------------------------------------------------------------------

    def __enter__(self) -> "Probe":
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def install(self) -> "Probe":
        """Allocate the accumulators (first time only) and register the hooks (``with`` does this)."""
        if self._handles:
            return self
        enable_hook_guards()
        modules = dict(self.root.named_modules())
        default = _device_of(self.root, torch.device("cpu"))
        blocks = [modules[p] for p in self.layout.blocks]
        for pt in self.points.values():
            if pt.fwd_acc is not None:  # installed before: keep accumulating
                continue
            owner = (blocks[0] if pt.site == "embed" else blocks[-1] if pt.site == "final"
                     else blocks[pt.layer])
            dev = _device_of(owner, default)
            pt.fwd_acc = torch.zeros(len(pt.forward), 3, dtype=torch.float64, device=dev)
            pt.grad_acc = torch.zeros(len(pt.grad), 3, dtype=torch.float64, device=dev)
        if self._calls is None:
            self._calls = torch.zeros(1, 3, dtype=torch.float64, device=default)  # the 3rd is unused
        add = self._handles.append
        add(self.model.register_forward_pre_hook(self._count))
        last = len(blocks) - 1
        for i, block in enumerate(blocks):
            names = {"in": "embed" if i == 0 else None, "out": point_name(i),
                     "final": "final" if i == last and self.layout.final is None else None}
            if any(n in self.points for n in names.values() if n):
                add(block.register_forward_hook(self._block_hook(names), with_kwargs=True))
            norm, name = self.layout.output_norms[i], point_name(i, "pre_norm_sum")
            if norm is not None and name in self.points:
                add(modules[norm].register_forward_hook(self._input_hook(name), with_kwargs=True))
        if self.layout.final is not None and "final" in self.points:
            add(modules[self.layout.final].register_forward_hook(self._output_hook("final")))
        if self.recompile:
            torch.compiler.reset()
        return self

    def remove(self) -> None:
        """Remove the hooks; the statistics stay readable with ``frame()``."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.recompile:
            torch.compiler.reset()

    def reset(self) -> None:
        """Zero every accumulator (keeps the hooks)."""
        for pt in self.points.values():
            for acc in (pt.fwd_acc, pt.grad_acc):
                if acc is not None:
                    acc.zero_()
        if self._calls is not None:
            self._calls.zero_()

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators (all the memory a probe keeps between steps)."""
        return sum(a.numel() * a.element_size() for pt in self.points.values()
                   for a in (pt.fwd_acc, pt.grad_acc) if a is not None)

    # --- hooks ------------------------------------------------------------------------------

    def _count(self, module: nn.Module, args: Any) -> None:
        self._calls[0, 0].add_(1)

    def _block_hook(self, names: dict[str, str | None]):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs.get("hidden_states")
            out = first_tensor(output)
            if names["in"] in self.points:
                self._record(names["in"], x_in)
            if names["out"] in self.points:
                self._record(names["out"], out, x_in)
            if names["final"] in self.points:
                self._record(names["final"], out)
        return hook

    def _input_hook(self, name: str):
        def hook(module, args, kwargs, output):
            self._record(name, args[0] if args else next(iter(kwargs.values()), None))
        return hook

    def _output_hook(self, name: str):
        def hook(module, args, output):
            self._record(name, first_tensor(output))
        return hook

    def _record(self, name: str, x: Any, x_in: Any = None) -> None:
        pt = self.points[name]
        self._calls[0, 1].add_(1)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"probe point '{name}' carries {type(x).__name__}, not a tensor; "
                            "pass blocks= / final= to choose modules that return tensors")
        if not x.is_floating_point():
            raise TypeError(f"probe point '{name}' carries a {x.dtype} tensor; probes need floating point")
        pair = len(pt.forward) - sum(METRICS[m].kind == "forward" for m in pt.forward)
        if pair and not (isinstance(x_in, torch.Tensor) and x_in.shape == x.shape):
            raise TypeError(f"probe point '{name}': the block input is not a tensor of the output's "
                            "shape, so layer_cosine/angular_distance cannot be computed; drop them")
        if pt.forward:
            skip = self.sampled_without_grad_only and torch.is_grad_enabled()
            names = tuple(m for m in pt.forward if not (skip and METRICS[m].sampled))
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                if names == pt.forward:
                    self._run(_forward_into)(pt.fwd_acc, x, x_in, names, self.max_seqs, self.max_tokens)
                else:  # the skipped metrics add nothing, not even a count
                    v = summarize(x, names, x_in, self.max_seqs, self.max_tokens)
                    keep = torch.tensor([m in names for m in pt.forward], device=v.device)
                    full = torch.zeros(len(pt.forward), dtype=v.dtype, device=v.device)
                    full[keep] = v
                    self._accumulate(pt.fwd_acc, full, keep)
        if pt.grad:
            if not torch.is_grad_enabled():
                self._saw_grad_off = True
            elif not x.requires_grad:
                self._saw_no_grad = True
            else:
                x.register_hook(self._grad_hook(pt))

    def _grad_hook(self, pt: _Point):
        def hook(g: torch.Tensor) -> None:
            with torch.no_grad(), torch.autocast(g.device.type, enabled=False):
                self._run(_grad_into)(pt.grad_acc, g, pt.grad)
        return hook

    def _run(self, fn: Callable[..., None]) -> Callable[..., None]:
        """``fn``, or its compiled form where ``fuse`` is set and no compiled model traces us."""
        if not self.fuse or torch.compiler.is_compiling():
            return fn
        if fn not in self._fused:  # dynamic shapes: one graph for every batch and width
            self._fused[fn] = torch.compile(fn, backend=self.fuse_backend, dynamic=True)
        return self._fused[fn]

    @staticmethod
    def _accumulate(acc: torch.Tensor, v: torch.Tensor, counted: torch.Tensor | None = None) -> None:
        v = v.to(acc.device, torch.float64)
        n = torch.ones_like(v) if counted is None else counted.to(acc.device, torch.float64)
        acc.add_(torch.stack([v, v * v, n], dim=-1))

    # --- reading ----------------------------------------------------------------------------

    def frame(self) -> pd.DataFrame:
        """A tidy DataFrame: layer, point, site, metric, mean, spread (standard error over batches), count, std."""
        if self._calls is None:
            raise RuntimeError("the probe was never installed: use `with Probe(model) as p:`")
        keys, accs = [], [self._calls]
        for pt in self.points.values():
            keys += [(pt, m, "forward") for m in pt.forward] + [(pt, m, "grad") for m in pt.grad]
            accs += [pt.fwd_acc, pt.grad_acc]
        if any(a is None for a in accs):
            raise RuntimeError("the probe was never installed: use `with Probe(model) as p:`")
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for a in accs:
            by_device.setdefault(a.device, []).append(a)
        reduce = self.all_reduce if self.all_reduce is not None else (
            dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
        host = {}
        for dev, ts in by_device.items():  # the one sync per device
            sums = torch.cat(ts)  # a copy: the accumulators keep this rank's own sums
            if reduce:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            host[dev] = sums.cpu()
        offsets = {dev: 0 for dev in host}
        rows = []
        for a in accs:
            rows.append(host[a.device][offsets[a.device]:offsets[a.device] + len(a)])
            offsets[a.device] += len(a)
        data = torch.cat(rows).numpy()
        calls, fired, data = int(data[0, 0]), int(data[0, 1]), data[1:]
        df = pd.DataFrame({
            "layer": [k[0].layer for k in keys], "point": [k[0].name for k in keys],
            "site": [k[0].site for k in keys], "metric": [k[1] for k in keys],
            "kind": [k[2] for k in keys], "s1": data[:, 0], "s2": data[:, 1], "count": data[:, 2]})
        df["count"] = df["count"].round().astype("int64")
        self._check(df, calls, fired)
        n = df["count"].where(df["count"] > 0)
        df["mean"] = df["s1"] / n
        var = ((df["s2"] - n * df["mean"] ** 2) / (n - 1)).where(n > 1).clip(lower=0)
        df["std"] = var ** 0.5
        df["spread"] = df["std"] / n ** 0.5
        keep = (df["kind"] == "forward") | (df["count"] > 0)  # grad rows of forward-only use (see _check)
        return df.loc[keep, ["layer", "point", "site", "metric", "mean", "spread", "count", "std"]
                      ].reset_index(drop=True)

    def _check(self, df: pd.DataFrame, calls: int, fired: int) -> None:
        fwd, grad = df[df["kind"] == "forward"], df[df["kind"] == "grad"]
        if (fwd["count"] == 0).all() if len(fwd) else not fired:
            if calls:
                raise RuntimeError(
                    f"the model ran {calls} time(s) but no probe hook fired: it was probably "
                    "compiled before the probe was installed (Dynamo ignores hooks added after "
                    "compiling unless probes.enable_hook_guards() ran first). Enter the probe (or "
                    "call enable_hook_guards()) before torch.compile, or pass recompile=True.")
            raise RuntimeError("no statistics recorded: run the model's forward inside the "
                               "`with Probe(model) as p:` block (or it was compiled before the probe "
                               "was installed: enter the probe first, then torch.compile, or pass "
                               "recompile=True)")
        if self.sampled_without_grad_only:  # those wait for a forward pass under no_grad
            fwd = fwd[~fwd["metric"].map(lambda m: METRICS[m].sampled)]
        silent = sorted(set(fwd.loc[fwd["count"] == 0, "point"]))
        if silent:
            raise RuntimeError(f"points {', '.join(silent)} recorded nothing while others did: "
                               "their modules did not run or were compiled without the probe's hooks")
        if not len(grad) or (grad["count"] > 0).all():
            return
        if (grad["count"] > 0).any():
            missing = sorted(set(grad.loc[grad["count"] == 0, "point"]))
            raise RuntimeError(f"the loss does not depend on the probed points {', '.join(missing)}: "
                               "no gradient reached them")
        if self._saw_no_grad:
            raise RuntimeError("the model has no gradients at the probed points (its parameters do "
                               "not require grad and neither do its inputs); use metrics='forward' "
                               "or enable requires_grad")
        if self._saw_grad_off and not self._explicit_grad:
            return  # forward-only use (torch.no_grad) with default metrics: no gradient rows
        if self._saw_grad_off:
            raise RuntimeError("gradient metrics were requested but the forward ran under "
                               "torch.no_grad(); run it with grad enabled and call backward()")
        raise RuntimeError("no gradient reached any probed point: call loss.backward() inside the "
                           "probe, on a loss that depends on the model's output")
