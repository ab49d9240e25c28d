"""Speed figures of the theory side: deriving every scheme, evaluating a recurrence to 10^4,
the position-resolved profile and the spread across initializations."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

from theory import interpreter as I
from theory import solve as S
from theory.positional import predict_positional
from theory.schemes import SCHEMES
from theory.spread import NOISES, predict_spread


def _times(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(_times(fn, repeats))


def _derive_all() -> None:
    for name in SCHEMES:
        try:
            I.derive_block(SCHEMES[name])
        except TypeError:  # Mix-LN: one derivation per block kind
            I.derive_block(SCHEMES[name], l=1, L=8)
            I.derive_block(SCHEMES[name], l=8, L=8)


def run(args: argparse.Namespace | None = None) -> dict[str, float]:
    """Print (and return) median timings: derivation of all schemes, depth-10^4 evaluation."""
    repeats = 5
    t = time.perf_counter()
    _derive_all()
    derive_cold = time.perf_counter() - t  # first call in the process: sympy's own caches cold
    derive = _median_time(_derive_all, repeats)  # derive_block bypasses our cache, not sympy's
    evals: dict[str, tuple[float, float, float]] = {}  # scheme -> (first call, median, max)
    for n in SCHEMES:  # every registered scheme, full profile (fwd + bwd) to depth 10^4
        def profile(n: str = n) -> None:
            S.predict_profile(n, depth=10000, width=512)
        first = _times(profile, 1)[0]  # compiles (and builds tables) on the first call
        ts = _times(profile, repeats)
        evals[n] = (first, statistics.median(ts), max(ts))
    closed = _median_time(lambda: S.closed_forms.__wrapped__("pre"), 3)
    positional = _median_time(lambda: predict_positional("post", depth=256, width=512,
                                                         seq_len=128), 3)
    spread = {name: _median_time(lambda n=noises: predict_spread(
        "pre", depth=16, width=256, heads=4, seq_len=64, rho0=0.2, noises=n), 3)
        for name, noises in (("tokens", NOISES), ("token_means", tuple(k for k in NOISES if k != "tokens")))}
    f = I.compile_recurrence(I.derive("pre"), {"d": 512, "T": 128, "sigma": 1.0}, T_val=128)

    def forward_1e4() -> None:
        q, rho = 1.0, 0.2
        for l in range(1, 10001):
            q, rho = f(q, rho, 0.0, l, 10000)[:2]

    fwd = _median_time(forward_1e4, repeats)
    print(f"theory bench (median of {repeats}, one process, CPU):")
    print(f"  derive all {len(SCHEMES)} schemes, first call in process:  {derive_cold:.3f} s")
    print(f"  derive all {len(SCHEMES)} schemes (our cache bypassed):    {derive:.3f} s")
    print(f"  pre block recurrence iterated to depth 10^4:    {fwd:.3f} s")
    print(f"  closed forms of pre (uncached):                 {closed:.3f} s")
    print(f"  position-resolved profile, post, L = 256, T = 128: {positional:.3f} s")
    print(f"  spread across initializations, pre, L = 16, T = 64, width 256: {spread['tokens']:.3f} s "
          f"(without the per-token channel {spread['token_means']:.3f} s)")
    print(f"  full profile to depth 10^4 (fwd + bwd), per scheme: median / max of {repeats} "
          "[first call, compiling]:")
    for n, (first, med, worst) in evals.items():
        print(f"    {n:9} {med:.3f} s / {worst:.3f} s  [{first:.3f} s]")
    out = {"derive_all_cold_s": derive_cold, "derive_all_s": derive, "forward_1e4_s": fwd,
           "closed_pre_s": closed, "positional_post_256_s": positional,
           "spread_pre_16_s": spread["tokens"], "spread_pre_16_token_means_s": spread["token_means"]}
    for n, (first, med, worst) in evals.items():
        out.update({f"profile_1e4_{n}_s": med, f"profile_1e4_{n}_max_s": worst,
                    f"profile_1e4_{n}_first_s": first})
    return out
