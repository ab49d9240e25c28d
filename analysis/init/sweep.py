"""Init sweep: schemes × depths × seeds measured with probes, and theory at the same configuration.

The result is one tidy table, ``init_profiles.csv``: scheme, depth, seed, layer, point, metric,
measured, spread, theory, theory_averaged. ``theory`` is the position-resolved prediction
(theory/positional.py), ``theory_averaged`` the sequence-averaged symbolic recurrence
(theory/interpreter.py); the comparison reports both. ``layer`` follows the probes: -1 is the embedding, i = 0..L-1 is block
i (``blocks.{i}``, the block l = i + 1 of the theory). Metrics:

- ``second_moment`` at ``embed``, ``blocks.{i}.resid_post`` and ``blocks.{i}.pre_norm_sum``
  (theory q_l and the aggregate q before the output norm)
- ``grad_rel``: E[(∂loss/∂x)²] at the point over its value at the last block's output (theory g_l)
- ``token_cosine``: mean cosine of distinct tokens (theory ρ_l)
- ``layer_cosine``: cos(x_{l-1}, x_l) of a block's input and output (theory cos)
- ``grad_token_cosine``: token cosine of the gradient (theory ρ_g; its value at the top block is
  the theory's input, like q_0 and ρ_0 at the embedding)
- ``grad_first_token``: the first token's gradient power over the token mean (resolved theory
  g_first; the averaged recurrence has no positions: NaN)
- ``grad_second_moment``, ``dong_residual``: measured only (theory NaN)

``spread`` is the standard error of the measured mean over the probe's batches (one seed).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from analysis.infra import files, progress
from analysis.infra.budget import Cut, past
from analysis.infra.device import available_memory, resolve_device
from analysis.testbed.corpus import Corpus
from analysis.testbed.memory import check_all_fit, size
from analysis.testbed.model import ModelConfig, build_model
from probes import Probe, point_name
from theory.positional import HELD_ENTRIES, predict_positional
from theory.solve import predict_profile

PROBE_METRICS = ["second_moment", "grad_second_moment", "grad_token_cosine", "grad_first_token",
                 "token_cosine", "layer_cosine", "dong_residual"]
COLUMNS = ["scheme", "depth", "seed", "layer", "point", "metric", "measured", "spread", "theory",
           "theory_averaged"]


def batch_generator(seed: int) -> torch.Generator:
    """The generator that draws an init seed's batches: the same text wherever it is drawn again."""
    return torch.Generator().manual_seed(1_000 + seed)


def measure(cfg: ModelConfig, seed: int, corpus: Corpus, batches: int, batch_size: int,
            device: str = "cpu", compile: bool = False, redraw_embedding: bool = False
            ) -> pd.DataFrame:
    """Probe frame of the testbed at init over ``batches`` corpus batches (forward and backward);
    ``compile``: the probed model runs under torch.compile (the probe is entered first);
    ``redraw_embedding``: every sequence, run alone, sees a token embedding table drawn afresh
    (the control for a table quenched once per model; the same text, the same blocks)."""
    model = build_model(cfg, seed=seed, device=device)
    gen = batch_generator(seed)
    with Probe(model, metrics=PROBE_METRICS) as p:
        if compile:
            torch.compiler.reset()  # one model per call: never the recompile limit
        fwd = torch.compile(model) if compile else model
        for b in range(batches):
            x, y = corpus.batch("train", batch_size, cfg.max_seq_len, generator=gen, device=device)
            for i, (xs, ys) in enumerate(zip(x.split(1), y.split(1)) if redraw_embedding else [(x, y)]):
                if redraw_embedding:
                    table = torch.Generator().manual_seed(10_000 * (seed + 1) + b * batch_size + i)
                    with torch.no_grad():  # the distribution build_model draws it from
                        model.tok_embed.weight.copy_(torch.randn(
                            model.tok_embed.weight.shape, generator=table) * cfg.embed_std / math.sqrt(2))
                _, loss = fwd(xs, ys)
                loss.backward()
                model.zero_grad(set_to_none=True)
    return p.frame()


def to_rows(frame: pd.DataFrame, depth: int) -> pd.DataFrame:
    """Probe frame → measured rows, with the gradient normalized by its value at the top block."""
    keep = frame[frame["site"].isin(["embed", "resid_post", "pre_norm_sum"])]
    rows = keep[["layer", "point", "metric", "mean", "spread"]].rename(
        columns={"mean": "measured"})
    g = rows[rows["metric"] == "grad_second_moment"]
    top = g[g["point"] == point_name(depth - 1)]["measured"].iloc[0]
    rel = g.assign(metric="grad_rel", measured=g["measured"] / top, spread=g["spread"] / top)
    return pd.concat([rows, rel], ignore_index=True)


PREDICTIONS = {"theory": predict_positional, "theory_averaged": predict_profile}


def theory_rows(cfg: ModelConfig, q0: float, rho0: float, rho_g: float) -> pd.DataFrame:
    """Both theories' per-layer predictions for ``cfg``, as rows matching the measured ones.

    ``theory``: the position-resolved interpretation (theory/positional.py), the one compared;
    ``theory_averaged``: the sequence-averaged symbolic recurrence (theory/interpreter.py).
    """
    frames = [predicted_rows(cfg, predict, column, q0, rho0, rho_g).set_index(["point", "metric"])
              for column, predict in PREDICTIONS.items()]
    return pd.concat(frames, axis=1).reset_index()


def predicted_rows(cfg: ModelConfig, predict: Callable[..., dict[str, np.ndarray]], column: str,
                   q0: float, rho0: float, rho_g: float) -> pd.DataFrame:
    """One theory's per-layer prediction for ``cfg`` from the measured inputs, as
    prediction_rows."""
    pred = predict(cfg.scheme, depth=cfg.depth, seq_len=cfg.max_seq_len,
                   scheme_params=cfg.scheme_params, q0=q0, rho0=rho0, rho_g=rho_g,
                   **cfg.shape_fields())
    return prediction_rows(pred, cfg.depth, column)


def prediction_rows(pred: dict[str, np.ndarray], depth: int, column: str) -> pd.DataFrame:
    """A theory's per-layer profile (q, rho, g, …, l = 0..depth) as (point, metric, column) rows
    named as the probes name them."""
    rows = []
    for l in range(depth + 1):
        point = "embed" if l == 0 else point_name(l - 1)
        for metric, key in (("second_moment", "q"), ("token_cosine", "rho"), ("grad_rel", "g"),
                            ("grad_token_cosine", "rg"), ("layer_cosine", "cos"),
                            ("grad_first_token", "g_first")):
            rows.append((point, metric, pred[key][l] if key in pred else np.nan))
        if l > 0 and np.isfinite(pred["q_agg"][l]):
            rows.append((point_name(l - 1, "pre_norm_sum"), "second_moment", pred["q_agg"][l]))
    return pd.DataFrame(rows, columns=["point", "metric", column])


def mean_theory_inputs(point: pd.DataFrame, depth: int) -> dict[str, float]:
    """theory_inputs averaged over the seeds of one (scheme, depth) point."""
    return pd.DataFrame([theory_inputs(r, depth) for _, r in point.groupby("seed")]).mean().to_dict()


def theory_inputs(rows: pd.DataFrame, depth: int) -> dict[str, float]:
    """The measured inputs theory takes for one seed: q_0 and ρ_0 at the embedding, ρ_g at the top."""
    embed = rows[rows["point"] == "embed"].set_index("metric")["measured"]
    top = rows[rows["point"] == point_name(depth - 1)].set_index("metric")["measured"]
    return {"q0": float(embed["second_moment"]), "rho0": float(embed["token_cosine"]),
            "rho_g": float(top["grad_token_cosine"])}


def repredict(profiles: pd.DataFrame, base: ModelConfig,
              log: Callable[[str], None] = progress.say) -> pd.DataFrame:
    """The profiles with both theory columns computed afresh by this code, from each seed's
    measured inputs: an improved theory is compared with measurements already made."""
    parts = []
    groups = profiles.groupby(["scheme", "depth", "seed"], sort=False)
    t0 = time.perf_counter()
    for k, ((scheme, depth, seed), rows) in enumerate(groups, 1):
        cfg = replace(base, scheme=scheme, depth=int(depth))
        try:
            inputs = theory_inputs(rows, int(depth))
        except KeyError as e:  # a row theory takes as input is missing
            raise ValueError(f"{scheme} L={int(depth)} seed {seed}: no measured {e} to predict "
                             "from (init_profiles.csv lacks the row)") from None
        theory = theory_rows(cfg, **inputs)
        rows = rows.drop(columns=list(PREDICTIONS)).merge(theory, on=["point", "metric"], how="left")
        parts.append(rows[COLUMNS])
        if k % 10 == 0 or k == groups.ngroups:
            log(f"  theory recomputed for {k}/{groups.ngroups} (scheme, depth, seed) "
                f"({time.perf_counter() - t0:.0f} s)")
    return pd.concat(parts, ignore_index=True)


def read_profiles(path: Path, need_rows: bool = True) -> pd.DataFrame:
    """init_profiles.csv, or ValueError naming what is wrong with it: empty, a column missing or
    renamed. A last line cut short (no newline at the end) is dropped: a cut mid-write."""
    path = Path(path)
    text_end = b""
    if path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            text_end = f.read(1)
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty: it has no header and no rows") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"{path} is not a readable CSV ({str(e).strip()})") from None
    lacking = [c for c in COLUMNS if c not in frame.columns]
    if lacking:
        raise ValueError(f"{path} lacks the column(s) {', '.join(lacking)} (it has "
                         f"{', '.join(map(str, frame.columns))}): not a sweep's init_profiles.csv, "
                         "or a column was renamed")
    if text_end not in (b"\n", b"") and len(frame):
        rows = frame[frame[["scheme", "depth"]].notna().all(axis=1)]
        cut = rows.iloc[-1] if len(rows) else None
        frame = frame.iloc[:-1].copy()  # the last line was cut short: its point is part-written
        if cut is not None:
            frame.attrs["cut_point"] = (cut["scheme"], int(cut["depth"]))
    if need_rows and not len(frame):
        raise ValueError(f"{path} has no rows")
    return frame


def check_memory(configs: list[ModelConfig], batch_size: int, device: str) -> None:
    """Refuse, before any work, grid points whose estimated memory exceeds what ``device`` has."""
    dev = resolve_device(device)
    check_all_fit(configs, batch_size, available_memory(dev), str(dev))


# the position-resolved theory costs O(L·T³) time and O(√L·T²) memory on the host: measured
# 1.4 s for post at L = 256, T = 128 (README, Benchmarks); forward, recomputed forward and backward
POSITIONAL_SECONDS_PER_UNIT = 1.4 / (256 * 128 ** 3)
THEORY_SECONDS_LIMIT = 3600.0  # per grid point and seed: beyond, a sweep is refused up front


def theory_cost(depth: int, seq_len: int) -> tuple[float, float]:
    """Estimated (seconds, bytes) of one position-resolved prediction at ``depth``, ``seq_len``:
    T×T float64 matrices, the checkpointed layers' and about 16 a block works with."""
    L, T = depth, seq_len
    held = L + 1 if (L + 1) * T * T <= HELD_ENTRIES else 2 * math.isqrt(L) + 2  # see predict_positional
    return POSITIONAL_SECONDS_PER_UNIT * L * T ** 3, 8.0 * T * T * (held + 16)


def check_theory_cost(depths: list[int], seq_len: int, available: float | None = None,
                      limit: float = THEORY_SECONDS_LIMIT) -> None:
    """Refuse, before any work, a grid whose position-resolved theory would not fit in the
    host's memory or would take longer than ``limit`` seconds per grid point and seed."""
    seconds, nbytes = theory_cost(max(depths), seq_len)
    available = available_memory("cpu") if available is None else available
    where = f"the position-resolved theory at depth {max(depths)}, seq-len {seq_len}"
    if nbytes > 0.9 * available:
        raise ValueError(f"{where} needs ≈ {size(nbytes)} of host memory (T×T matrices) but the "
                         f"host has {size(available)} free: lower --seq-len")
    if seconds > limit:
        raise ValueError(f"{where} would take ≈ {seconds / 3600:.3g} h per scheme and seed "
                         f"(O(L·T³)), over the limit of {limit / 3600:g} h: lower --seq-len or "
                         "the deepest depth")


def complete_points(profiles: pd.DataFrame, seeds: list[int],
                    keep_seeds: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """The rows of the (scheme, depth) points measured for every seed in full, and what the rest
    lacks ('pre L=64: seed 2 missing'): a sweep cut while it wrote leaves a point part-written.
    A seed with fewer rows than another seed of its point, or with a row lacking a key, is partial.
    ``keep_seeds``: keep the whole seeds of an incomplete point too (a report of what there is)."""
    keys = ["scheme", "depth", "seed", "layer", "point", "metric"]
    broken = profiles[keys].isna().any(axis=1)
    whole = profiles[~broken]
    problems = []
    keep = []
    cut_point = profiles.attrs.get("cut_point")
    for (scheme, depth), point in whole.groupby(["scheme", "depth"], sort=False):
        counts = point.groupby("seed").size()
        full = counts.max()
        missing = [s for s in seeds if s not in counts.index]
        partial = [int(s) for s, n in counts.items() if n < full]
        if (scheme, int(depth)) == cut_point and not partial:
            partial = [int(counts.index[-1])]  # the seed its cut last line belonged to
        label = f"{scheme} L={int(depth)}"
        if keep_seeds and len(partial) < len(counts):
            keep.append(point[~point["seed"].isin(partial)])
        if missing or partial:
            problems.append(label + ": " + "; ".join(
                part for part in (missing and f"seed {','.join(map(str, missing))} missing",
                                  partial and f"seed {','.join(map(str, partial))} part-written")
                if part))
        elif not keep_seeds:
            keep.append(point)
    if broken.any():
        problems.append(f"{int(broken.sum())} truncated row(s)")
    kept = pd.concat(keep) if keep else profiles.iloc[:0]
    return kept, problems


def init_sweep(schemes: list[str], depths: list[int], seeds: list[int], base: ModelConfig,
               corpus: Corpus, batches: int = 2, batch_size: int = 4, device: str = "cpu",
               log: Callable[[str], None] = progress.say, out_dir: Path | None = None,
               compile: bool = False, deadline: float | None = None) -> pd.DataFrame:
    """Measure and predict every (scheme, depth, seed); the tidy init_profiles table.

    With ``out_dir``, each (scheme, depth)'s rows are appended to ``out_dir/init_profiles.csv``
    as soon as its seeds are done, and points found there already are kept, not measured again:
    a cut sweep keeps what it finished and a re-run resumes. The memory of every point is
    estimated first; a point that cannot fit is refused before anything runs. At ``deadline``
    (time.time()) the sweep stops between points and raises analysis.infra.budget.Cut.
    """
    configs = [replace(base, scheme=s, depth=d) for s in schemes for d in depths]
    for cfg in configs:
        cfg.validate()
    check_memory(configs, batch_size, device)
    path = None if out_dir is None else Path(out_dir) / "init_profiles.csv"
    parts = []
    if path is not None and path.exists() and path.stat().st_size:
        kept, problems = complete_points(read_profiles(path, need_rows=False), seeds)
        if problems:  # a cut mid-write: measure those points again, keep the file whole
            log(f"  measuring again what a cut left part-written in {path}: {', '.join(problems)}")
            files.write_csv(kept, path, index=False)
        done = set(zip(kept["scheme"], kept["depth"]))
        parts.append(kept)
        configs = [c for c in configs if (c.scheme, c.depth) not in done]
        log(f"  kept {len(done)} finished grid points from {path}")
    t0 = time.perf_counter()
    bar = progress.bar(len(configs) * len(seeds), "init sweep", unit="run", leave=False)
    for k, cfg in enumerate(configs, 1):
        if past(deadline):
            bar.close()
            raise Cut(f"{len(configs) - k + 1} of {len(configs)} grid points not measured; the same "
                      "command resumes them")
        t = time.perf_counter()
        point = []
        for seed in seeds:
            bar.set_postfix_str(f"{cfg.scheme} L={cfg.depth} seed {seed}", refresh=False)
            rows = to_rows(measure(cfg, seed, corpus, batches, batch_size, device, compile), cfg.depth)
            bar.update()
            theory = theory_rows(cfg, **theory_inputs(rows, cfg.depth))
            rows = rows.merge(theory, on=["point", "metric"], how="left")
            point.append(rows.assign(scheme=cfg.scheme, depth=cfg.depth, seed=seed)[COLUMNS])
        parts += point
        if path is not None:
            files.append_csv(pd.concat(point), path, index=False)  # header first if new
        log(f"  [{k}/{len(configs)}] {cfg.scheme} L={cfg.depth}: {len(seeds)} seeds in "
            f"{time.perf_counter() - t:.1f} s (total {time.perf_counter() - t0:.0f} s)")
    bar.close()
    return pd.concat(parts, ignore_index=True)[COLUMNS]
