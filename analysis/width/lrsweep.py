"""Learning-rate sweeps: validation loss after N steps over a log-spaced lr grid, at several widths
and depths per scheme, with seeds; the optimal lr of each curve with its spread over seeds.

Two sweeps share one grid of runs: across depth at the base width (does a scheme's optimal lr
move with L? depth-µP, Yang et al. arXiv 2310.02244, predicts not for branches scaled by
1/√L), and across width at the first depth, per parametrization (µP predicts not; the standard
parametrization's optimum falls with width). Each run is a short warmup-and-cosine Adam (or SGD)
run from the same seed's init on the same batches (analysis.width.steps' optimizer and groups).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from analysis.infra import files, progress
from analysis.infra.checks import check_int, check_list, check_number
from analysis.infra.device import resolve_device
from analysis.infra.records import read_record, refuse_other
from analysis.testbed.corpus import Corpus
from analysis.testbed.memory import check_time
from analysis.testbed.model import ModelConfig, build_model
from analysis.testbed.parametrization import set_lr
from analysis.training.train import TrainConfig, evaluate, lr_schedule
from analysis.width.steps import StepConfig, make_step_optimizer
from theory.claim_table import Claim, claims_frame


MIN_LR_RATIO = TrainConfig.min_lr_ratio  # the cosine decays to lr × this, as in a training run


@dataclass(frozen=True)
class LRSweepConfig:
    """What the sweep trains."""

    schemes: tuple[str, ...] = ("pre", "span")
    parametrizations: tuple[str, ...] = ("standard", "mup")  # the width sweep's; depth: the first
    optimizer: str = "adam"
    lrs: tuple[float, ...] = tuple(float(f"{1e-3 * 2 ** k:.3g}") for k in range(-1, 6))
    widths: tuple[int, ...] = (64, 128, 256)  # the first is the depth sweep's and µP's base
    depths: tuple[int, ...] = (4, 8, 16, 32)  # the first is the width sweep's
    heads: int = 4
    seq_len: int = 64
    batch_size: int = 4
    steps: int = 50
    warmup_frac: float = 0.1
    eval_batches: int = 4
    seeds: tuple[int, ...] = (0, 1)
    device: str = "cpu"
    corpus: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        resolve_device(self.device)  # the gpu preset where CUDA is not: one line
        for name in ("schemes", "parametrizations", "seeds"):
            check_list(getattr(self, name), name)  # not empty, nothing twice
        for name in ("lrs", "widths", "depths"):
            check_list(getattr(self, name), name, increasing=True)
        for lr in self.lrs:
            check_number(lr, "each of lrs", 0, lo_open=True)
        for name in ("heads", "seq_len", "eval_batches"):
            check_int(getattr(self, name), name)
        check_number(self.warmup_frac, "warmup_frac", 0, 1, hi_open=True)
        StepConfig(optimizer=self.optimizer, lr=min(self.lrs), steps=self.steps,
                   batch_size=self.batch_size).validate()
        if len(self.lrs) < 3:
            raise ValueError(f"--lrs needs >= 3 increasing learning rates, got {list(self.lrs)}")
        for s, p, w, d in self.runs():  # each model's own checks: scheme, parametrization, shape
            self.model_config(s, p, w, d)
        check_time([self.model_config(self.schemes[0], self.parametrizations[0], self.widths[-1],
                                      self.depths[-1])],
                   self.steps * self.batch_size * self.seq_len, self.batch_size, self.device,
                   lower="--steps, --batch or the largest width")

    def model_config(self, scheme: str, parametrization: str, width: int, depth: int) -> ModelConfig:
        """The model of one run (µP's base width: the first width)."""
        return ModelConfig(scheme=scheme, depth=depth, width=width, heads=self.heads,
                           max_seq_len=self.seq_len, parametrization=parametrization,
                           base_width=self.widths[0])

    def runs(self) -> list[tuple[str, str, int, int]]:
        """(scheme, parametrization, width, depth) of every curve: depths at the first width
        under the first parametrization, widths at the first depth under each."""
        out = []
        for s in self.schemes:
            out += [(s, self.parametrizations[0], self.widths[0], d) for d in self.depths]
            out += [(s, p, w, self.depths[0]) for p in self.parametrizations for w in self.widths
                    if (s, p, w, self.depths[0]) not in out]
        return out


PRESETS = {
    "cpu": LRSweepConfig(),
    "gpu": LRSweepConfig(schemes=("pre", "post", "span"), widths=(128, 256, 512, 1024),
                         depths=(6, 12, 24, 48, 96), heads=8, seq_len=256, batch_size=16,
                         steps=300, seeds=(0, 1, 2), device="cuda",
                         lrs=tuple(float(f"{1e-3 * 2 ** k:.3g}") for k in range(-4, 5))),
}


def train_short(mc: ModelConfig, cfg: LRSweepConfig, lr: float, seed: int, corpus: Corpus,
                timing: dict | None = None) -> float:
    """Validation loss (nats) after ``cfg.steps`` steps at peak ``lr``; inf once the loss is not
    finite (the run diverged). ``timing`` gets the seconds of the training steps ("train_s") and
    of the evaluation ("eval_s")."""
    t0 = time.perf_counter()
    model = build_model(mc, seed=seed, device=cfg.device)
    opt = make_step_optimizer(model, StepConfig(optimizer=cfg.optimizer, lr=lr, steps=cfg.steps,
                                                batch_size=cfg.batch_size))
    # the schedule (train's defaults: cosine to 0.1 × lr) and the validation of `train`
    data = torch.Generator().manual_seed(seed)
    for step in range(cfg.steps):
        set_lr(opt, lr_schedule(step, cfg.steps, lr, cfg.warmup_frac, MIN_LR_RATIO))
        x, y = corpus.batch("train", cfg.batch_size, cfg.seq_len, generator=data, device=cfg.device)
        _, loss = model(x, y)
        if not torch.isfinite(loss):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    t1 = time.perf_counter()
    value = math.inf
    if torch.isfinite(loss):
        value = evaluate(model, corpus, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
    if timing is not None:
        timing.update(train_s=t1 - t0, eval_s=time.perf_counter() - t1)
    return value if math.isfinite(value) else math.inf


KEY = ["scheme", "parametrization", "width", "depth", "lr", "seed"]
# what changes no loss: a sweep resumes under other values of these
EXECUTION_ONLY = ("device", "schemes", "parametrizations", "lrs", "widths", "depths", "seeds")


def check_same_sweep(folder: Path, cfg: LRSweepConfig) -> None:
    """Write ``folder/settings.json``, refusing a folder whose sweep had other settings (named)."""
    now = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in EXECUTION_ONLY}
    old = read_record(folder / "settings.json")
    for key, value in now.items():
        if old is not None and old.get(key, value) != value:
            raise refuse_other(folder, "a learning-rate sweep", key, old[key], value)
    files.write_json(folder / "settings.json", now, indent=1)


def run(cfg: LRSweepConfig, corpus: Corpus, log: Callable[[str], None] = progress.say,
        out: Path | None = None) -> pd.DataFrame:
    """One row per run: scheme, parametrization, width, depth, lr, seed, loss, train_s, eval_s.

    With ``out``, each finished curve is appended to ``out/lrsweep.csv`` and a run already there
    (same settings, checked against ``out/settings.json``) is read back, not trained again.
    """
    cfg.validate()
    rows, t0 = [], time.perf_counter()
    curves = cfg.runs()
    done: dict[tuple, float] = {}  # at the base width every parametrization is the same model
    kept: dict[tuple, dict] = {}
    if out is not None:
        check_same_sweep(out, cfg)
        files.repair_tail(out / "lrsweep.csv")  # a row torn by a kill: cut, trained again
        if (out / "lrsweep.csv").exists() and (out / "lrsweep.csv").stat().st_size:
            old = pd.read_csv(out / "lrsweep.csv")
            kept = {tuple(r[k] for k in KEY): r for r in old.to_dict("records")}
            if kept:
                log(f"  resuming: {len(kept)} finished runs in {out / 'lrsweep.csv'}")
    bar = progress.bar(len(curves) * len(cfg.lrs) * len(cfg.seeds), "lrsweep", unit="run",
                       leave=False)
    for i, (s, p, w, d) in enumerate(curves, 1):
        mc = cfg.model_config(s, p, w, d)
        for lr in cfg.lrs:
            for seed in cfg.seeds:
                bar.set_postfix_str(f"{s} {p} width {w} depth {d} lr {lr:g}", refresh=False)
                key = (s, p if w != cfg.widths[0] else "base", w, d, lr, seed)
                timing = {"train_s": 0.0, "eval_s": 0.0}  # a shared run is timed once
                if (s, p, w, d, lr, seed) in kept:
                    row = kept[(s, p, w, d, lr, seed)]
                    done[key] = float(row["loss"])
                    timing = {"train_s": row["train_s"], "eval_s": row["eval_s"]}
                elif key not in done:
                    done[key] = train_short(mc, cfg, lr, seed, corpus, timing)
                rows.append({"scheme": s, "parametrization": p, "width": w, "depth": d, "lr": lr,
                             "seed": seed, "loss": done[key], **timing})
                bar.update()
        curve = rows[-len(cfg.lrs) * len(cfg.seeds):]
        if out is not None:
            new_rows = [r for r in curve if tuple(r[k] for k in KEY) not in kept]
            if new_rows:
                path = out / "lrsweep.csv"
                files.append_csv(pd.DataFrame(new_rows).assign(optimizer=cfg.optimizer,
                                                               steps=cfg.steps), path, index=False)
                kept.update({tuple(r[k] for k in KEY): r for r in new_rows})
        best = min(curve, key=lambda r: r["loss"])
        log(f"  [{i}/{len(curves)}] {s} {p} width {w} depth {d}: best lr {best['lr']:g} "
            f"(loss {best['loss']:.3f}) [{time.perf_counter() - t0:.0f} s]")
    bar.close()
    return pd.DataFrame(rows).assign(optimizer=cfg.optimizer, steps=cfg.steps)


def _argmin_log_lr(lrs: np.ndarray, losses: np.ndarray) -> float:
    """log2 of the optimal lr: the vertex of a parabola through the grid minimum and its two
    neighbours (the grid point itself at an edge, or when the parabola opens downward)."""
    x = np.log2(lrs)
    i = int(np.argmin(losses))
    if i == 0 or i == len(x) - 1 or not np.isfinite(losses[i - 1:i + 2]).all():
        return float(x[i])
    a, b, _ = np.polyfit(x[i - 1:i + 2], losses[i - 1:i + 2], 2)
    return float(np.clip(-b / (2 * a), x[i - 1], x[i + 1])) if a > 0 else float(x[i])


def optima(raw: pd.DataFrame, plateau: float = math.inf) -> pd.DataFrame:
    """Per curve: the optimal lr (from the seed-mean losses), the spread of per-seed optima (in
    log2 grid units), whether it lies inside the grid, whether it is resolved, and the best loss.
    A curve whose best loss is at or above ``plateau`` stalled (every lr) and is not resolved."""
    rows = []
    for key, g in raw.groupby(["scheme", "parametrization", "width", "depth"], sort=False):
        mean = g.groupby("lr")["loss"].mean()
        lrs, losses = mean.index.to_numpy(float), mean.to_numpy(float)
        best = _argmin_log_lr(lrs, losses)
        per_seed = []
        for _, s in g.groupby("seed"):
            curve = s.set_index("lr")["loss"].sort_index()
            per_seed.append(_argmin_log_lr(curve.index.to_numpy(float), curve.to_numpy(float)))
        se = float(np.std(per_seed, ddof=1) / np.sqrt(len(per_seed))) if len(per_seed) > 1 else np.nan
        i = int(np.argmin(losses))
        # resolved: every lr whose loss is within 2 standard errors (of the difference) of the
        # best lies strictly inside the grid; a flat curve (a run stalled on a plateau, or too
        # few seeds) has no optimum to compare
        se_at = (g.groupby("lr")["loss"].std(ddof=1) / np.sqrt(g.groupby("lr")["loss"].count()))
        se_at = se_at.reindex(mean.index).fillna(0).to_numpy(float)
        margin = [losses[j] - losses[i] - 2 * np.hypot(se_at[j], se_at[i]) for j in (0, len(lrs) - 1)]
        near = losses - losses[i] <= 2 * np.hypot(se_at, se_at[i])
        rows.append({**dict(zip(["scheme", "parametrization", "width", "depth"], key)),
                     "best_lr": 2 ** best, "log2_best_lr": best, "log2_se": se,
                     "inside_grid": 0 < i < len(lrs) - 1,
                     "resolved": bool(np.min(margin) > 0 and losses[i] < plateau),
                     "stalled": bool(losses[i] >= plateau),
                     "near_best": ",".join(f"{v:g}" for v in lrs[near]),
                     "best_loss": float(losses[i]),
                     "grid_step_log2": float(np.median(np.diff(np.log2(lrs))))})
    return pd.DataFrame(rows)


def curves_table(raw: pd.DataFrame) -> pd.DataFrame:
    """Mean loss and its standard error over seeds per curve and lr (diverged runs: inf)."""
    g = raw.groupby(["scheme", "parametrization", "width", "depth", "lr"], sort=False)["loss"]
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["loss_se"] = out["std"] / np.sqrt(out["count"])
    return out.rename(columns={"mean": "loss"}).drop(columns=["std"])


def claims(opt: pd.DataFrame, cfg: LRSweepConfig) -> pd.DataFrame:
    """Per scheme: is the optimal lr depth-independent within one grid step? Per scheme and
    parametrization: width-independent within one grid step?"""
    out = []
    step = float(np.median(np.diff(np.log2(cfg.lrs))))
    p0, w0, d0 = cfg.parametrizations[0], cfg.widths[0], cfg.depths[0]
    method = f"measured: the lr of least loss after {cfg.steps} steps, over an lr grid"

    def verdict(name: str, statement: str, rows: pd.DataFrame, by: str, scheme: str, par: str):
        if rows[by].nunique() < 2:
            out.append(Claim(name, scheme, statement, method, "untested",
                             f"needs >= 2 {by}s, got {rows[by].nunique()}", {"parametrization": par}))
            return
        ok = rows[rows["inside_grid"] & rows["resolved"]]
        spread = ok["log2_best_lr"].max() - ok["log2_best_lr"].min() if len(ok) else 0.0
        edge = rows[~rows["inside_grid"]]
        flat = rows[rows["inside_grid"] & ~rows["resolved"]]
        se = rows["log2_se"].max()
        ev = (f"optimal lr {', '.join(f'{r[by]}: {r.best_lr:.3g}' for _, r in rows.iterrows())}; "
              f"range over the resolved {spread / step:.2f} grid steps (×{2 ** step:.3g} each)"
              + ("" if np.isnan(se) else f", per-seed spread up to {se / step:.2f} steps"))
        if len(edge):  # an optimum on the grid's edge may lie beyond it: nothing to decide
            ev += (f"; at the grid's edge for {by} {', '.join(map(str, edge[by]))} (widen --lrs)")
        for _, r in flat.iterrows():  # a flat curve has no optimum to compare
            ev += (f"; {by} {r[by]} not resolved: " +
                   ("its best loss stalled on the byte-frequency plateau" if r["stalled"] else
                    "a grid end lies within 2 standard errors of its best loss"))
        # the resolved optima already a grid step apart: no further curve can make it hold
        status = ("fails" if len(ok) >= 2 and spread > step else
                  "untested" if len(edge) or len(flat) or len(ok) < 2 else "holds")
        out.append(Claim(name, scheme, statement, method, status, ev, {"parametrization": par}))

    for s in cfg.schemes:
        rows = opt[(opt["scheme"] == s) & (opt["parametrization"] == p0) & (opt["width"] == w0)]
        verdict(f"{s}_lr_depth_transfer",
                f"{s}'s optimal lr is depth-independent within one grid step "
                f"(depths {min(cfg.depths)}…{max(cfg.depths)}, width {w0})", rows.sort_values("depth"),
                "depth", s, p0)
        for p in cfg.parametrizations:
            rows = opt[(opt["scheme"] == s) & (opt["parametrization"] == p) & (opt["depth"] == d0)]
            verdict(f"{s}_{p}_lr_width_transfer",
                    f"under {p}, {s}'s optimal lr is width-independent within one grid step "
                    f"(widths {min(cfg.widths)}…{max(cfg.widths)}, depth {d0})",
                    rows.sort_values("width"), "width", s, p)
    return claims_frame(out)
