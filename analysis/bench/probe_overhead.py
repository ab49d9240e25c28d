"""Benchmark: a probed training step against an unprobed one, eager and compiled.

Five copies of one testbed model (eager, eager + probe, eager + fused probe, compiled, compiled +
probe) take turns:
each round runs ``steps_per_round`` optimizer steps of every copy and times them (the benchmark
synchronises the device once per round; the probe itself never does), and the figure per copy
is the median over rounds of the mean step time. Interleaving the copies makes slow drifts of a
shared machine hit them all alike. The probe uses the default metrics (moments, token cosine, Dong residual, layer cosine,
gradient second moment) at every point; the compiled probed copy is compiled inside the probe;
the fused probe (``Probe(fuse=True)``) compiles only its statistics around the eager model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from dataclasses import dataclass

import torch

from analysis.infra.device import synchronize
from analysis.testbed.model import ModelConfig, build_model
from probes import Probe

# name: (ModelConfig keywords, batch size, rounds, steps per round)
SHAPES = {
    "small": (dict(depth=4, width=128, heads=4, max_seq_len=128), 8, 15, 1),
    "gpt2": (dict(depth=12, width=768, heads=12, max_seq_len=1024), 8, 20, 3),  # GPT-2 small, T 1024
    "tiny": (dict(depth=2, width=32, heads=4, max_seq_len=32), 4, 3, 1),  # the campaign's rehearsal
}


@dataclass
class _Run:
    name: str
    model: torch.nn.Module
    step_model: torch.nn.Module
    opt: torch.optim.Optimizer
    probe: Probe | None
    times: list[float]


def _step(run: _Run, idx: torch.Tensor, autocast: bool) -> None:
    ctx = torch.autocast(idx.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        _, loss = run.step_model(idx, idx)
    loss.backward()
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)


# mode: (unprobed copy, probed copy); the copies are these pairs' members, each built once
PAIRS = {"eager": ("eager", "eager+probe"), "eager, fused probe": ("eager", "eager+fused probe"),
         "compiled": ("compiled", "compiled+probe")}
COPIES = tuple(dict.fromkeys(name for pair in PAIRS.values() for name in pair))


def _compiles(name: str) -> bool:
    """Whether the copy ``name`` runs torch.compile (the model, or the fused probe's statistics)."""
    return name.startswith("compiled") or "fused" in name


def _make_runs(base: torch.nn.Module, compile_ok: bool, backend: str = "inductor") -> list[_Run]:
    runs = []
    for name in COPIES:
        if _compiles(name) and not compile_ok:
            continue
        model = copy.deepcopy(base)
        probe = (Probe(model, fuse="fused" in name, fuse_backend=backend).install()
                 if name.endswith("probe") else None)
        step_model = torch.compile(model, backend=backend) if name.startswith("compiled") else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runs.append(_Run(name, model, step_model, opt, probe, []))
    return runs


def benchmark(shape: str = "small", device: str = "cpu", compile: bool = True, rounds: int | None = None,
              seed: int = 0, backend: str = "inductor", ops: list[dict] | None = None
              ) -> dict[str, list[float]]:
    """Step times in ms per copy, one per round (keys: COPIES; the fused probe and the compiled
    copies need ``compile``);
    with ``ops`` given, after the timed rounds one more step of each copy runs under the profiler
    and ``ops`` receives its ``op_rows``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape '{shape}' (known: {', '.join(SHAPES)})")
    kw, batch, n_rounds, per_round = SHAPES[shape]
    n_rounds = rounds or n_rounds
    dev = torch.device(device)
    autocast = dev.type == "cuda"  # bf16 autocast, as GPU training would run
    base = build_model(ModelConfig(scheme="pre", **kw), seed=seed, device=dev)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, base.cfg.vocab, (batch, kw["max_seq_len"]), generator=gen).to(dev)
    runs = _make_runs(base, compile, backend)
    for run in list(runs):  # warm-up: compiles, allocator, AdamW state
        try:
            for _ in range(2):
                _step(run, idx, autocast)
        except Exception as e:  # compile can fail on a machine without a C compiler: say so, go on
            if not _compiles(run.name):
                raise
            print(f"  {run.name}: torch.compile failed ({type(e).__name__}: {str(e)[:120]}); skipped")
            runs.remove(run)
    synchronize(dev)
    for _ in range(n_rounds):
        for run in runs:
            t0 = time.perf_counter()
            for _ in range(per_round):
                _step(run, idx, autocast)
            synchronize(dev)
            run.times.append((time.perf_counter() - t0) / per_round * 1e3)
    if ops is not None:
        for run in runs:
            ops += op_rows(run, idx, autocast)
    for run in runs:
        if run.probe is not None:
            df = run.probe.frame()  # fails loudly if the probed copy recorded nothing
            run.probe.remove()
            if df["count"].min() < n_rounds * per_round:
                raise RuntimeError(f"{run.name}: the probe missed steps ({df['count'].min()} recorded)")
    return {run.name: run.times for run in runs}


def op_rows(run: _Run, idx: torch.Tensor, autocast: bool, top: int = 15) -> list[dict]:
    """One profiled step of ``run``: a row with every op's calls and self time (host and device) in
    all, then the ``top`` ops by self device time (host time on a CPU). What the step launches,
    not only how long it takes: an eager step bound by the host's dispatch shows it in ``calls``."""
    from torch.profiler import ProfilerActivity, profile
    on_cuda = idx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        _step(run, idx, autocast)
        synchronize(idx.device)
    device_us = lambda e: getattr(e, "self_device_time_total", 0.0) if on_cuda else 0.0  # noqa: E731
    events = [e for e in prof.key_averages() if e.key.startswith("aten::") or device_us(e) > 0]
    row = lambda key, calls, host, dev: dict(copy=run.name, op=key, calls=calls,  # noqa: E731
                                             self_host_ms=host / 1e3, self_device_ms=dev / 1e3)
    rows = [row("(all aten ops)", sum(e.count for e in events if e.key.startswith("aten::")),
                sum(e.self_cpu_time_total for e in events), sum(device_us(e) for e in events))]
    key = device_us if on_cuda else (lambda e: e.self_cpu_time_total)
    for e in sorted(events, key=key, reverse=True)[:top]:
        rows.append(row(e.key, e.count, e.self_cpu_time_total, device_us(e)))
    return rows


def overhead_rows(times: dict[str, list[float]]) -> list[dict]:
    """Per mode with both copies timed: median unprobed and probed ms, and the median and
    quartiles of the per-round overhead (the copies alternate within a round, so a round's ratio
    cancels the machine's drift; the median lies between its quartiles)."""
    rows = []
    for mode, (unprobed, with_probe) in PAIRS.items():
        if unprobed in times and with_probe in times:
            plain, probed = times[unprobed], times[with_probe]
            ratios = [b / a - 1 for a, b in zip(plain, probed)]
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            rows.append(dict(mode=mode, rounds=len(plain), unprobed_ms=statistics.median(plain),
                             probed_ms=statistics.median(probed), overhead=statistics.median(ratios),
                             overhead_q1=q[0], overhead_q3=q[2]))
    return rows


def run(args: argparse.Namespace) -> None:
    """Print the probe-overhead table for ``args.device`` (and ``args.shape`` where given)."""
    threads = torch.get_num_threads()
    if str(args.device) == "cpu":  # one thread: oversubscribed OpenMP threads on a shared CPU swamp the figures
        torch.set_num_threads(1)
    try:
        _report(args)
    finally:
        torch.set_num_threads(threads)


def _report(args: argparse.Namespace) -> None:
    shape = getattr(args, "shape", None) or ("gpt2" if str(args.device).startswith("cuda") else "small")
    kw, batch, n_rounds, per_round = SHAPES[shape]
    name = torch.cuda.get_device_name(args.device) if str(args.device).startswith("cuda") else "cpu"
    print(f"probe overhead: scheme pre, d={kw['width']} L={kw['depth']} T={kw['max_seq_len']} "
          f"B={batch}, AdamW step, {args.device} ({name}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; median of {n_rounds} interleaved rounds × {per_round} steps")
    t0 = time.perf_counter()
    times = benchmark(shape, args.device, compile=getattr(args, "compile", None) is not False,
                      rounds=getattr(args, "probe_rounds", None))
    print(f"  {'mode':<19} {'unprobed ms':>12} {'probed ms':>10} {'overhead':>9}   (quartiles of the per-round ratio)")
    for r in overhead_rows(times):
        print(f"  {r['mode']:<19} {r['unprobed_ms']:>12.2f} {r['probed_ms']:>10.2f} "
              f"{100 * r['overhead']:>+8.1f}%   ({100 * r['overhead_q1']:+.1f}% .. "
              f"{100 * r['overhead_q3']:+.1f}%)")
    print(f"  ({time.perf_counter() - t0:.0f} s in all, compiles included)")
