"""The coordinate check (microsoft/mup's coord_check.py): coordinate sizes over the first steps
against width, one curve per layer; a parametrization is right when the curves are flat.

For every scheme × parametrization × width × seed, :func:`analysis.width.steps.measure_steps`
takes k steps; the log–log slope against width of each site's activation size, change since
init and per-block update is fitted per seed (spread: the standard error over seeds) and set
beside the one-step theory's exponent (theory.step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from analysis.infra import progress
from analysis.infra.checks import check_int, check_list
from analysis.infra.device import resolve_device
from analysis.testbed.corpus import Corpus
from analysis.testbed.memory import check_time
from analysis.testbed.model import ModelConfig
from analysis.width.steps import StepConfig, measure_steps
from theory.claim_table import Claim, claims_frame
from theory.step import block_exponent

METRICS = ("act_rms", "change_rms", "update")
FLAT = 0.1  # |slope| at most this: width-independent (the and mup's criterion)
GROWTH_TOL = 0.2  # a growing exponent is approached from below at finite width (theory.step)
METHOD = "measured at the first steps across widths (log–log slope in width)"
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}


@dataclass(frozen=True)
class CoordCheckConfig:
    """What the coordinate check measures."""

    schemes: tuple[str, ...] = ("pre", "span")
    parametrizations: tuple[str, ...] = ("standard", "mup")
    optimizer: str = "adam"
    lr: float | None = None  # None: DEFAULT_LR of the optimizer
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    base_width: int = 64
    depth: int = 4
    heads: int = 4
    seq_len: int = 64
    batch_size: int = 8
    steps: int = 3
    seeds: tuple[int, ...] = (0, 1)
    device: str = "cpu"
    corpus: str | None = None

    @property
    def step_config(self) -> StepConfig:
        """The optimizer settings of every run."""
        lr = self.lr if self.lr is not None else DEFAULT_LR.get(self.optimizer, 1e-3)
        return StepConfig(optimizer=self.optimizer, lr=lr, steps=self.steps,
                          batch_size=self.batch_size)

    def model_config(self, scheme: str, parametrization: str, width: int) -> ModelConfig:
        """The model of one run."""
        return ModelConfig(scheme=scheme, depth=self.depth, width=width, heads=self.heads,
                           max_seq_len=self.seq_len, parametrization=parametrization,
                           base_width=self.base_width)

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        resolve_device(self.device)  # the gpu preset where CUDA is not: one line
        for name in ("schemes", "parametrizations", "seeds"):
            check_list(getattr(self, name), name)  # not empty, nothing twice
        check_list(self.widths, "widths", increasing=True)
        for name in ("base_width", "depth", "heads", "seq_len"):
            check_int(getattr(self, name), name)
        self.step_config.validate()
        if len(set(self.widths)) < 2:
            raise ValueError(f"a slope against width needs >= 2 distinct widths, got {list(self.widths)}")
        if max(self.widths) < 2 * min(self.widths):  # a slope over less is mostly noise
            raise ValueError(f"the widths must span at least a factor 2 for a slope, got "
                             f"{min(self.widths)}…{max(self.widths)}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        for s in self.schemes:  # each model's own checks: scheme, parametrization, width vs heads
            for p in self.parametrizations:
                for w in self.widths:
                    self.model_config(s, p, w)
        check_time([self.model_config(self.schemes[0], self.parametrizations[0], self.widths[-1])],
                   self.steps * self.batch_size * self.seq_len, self.batch_size, self.device,
                   lower="--steps, --batch or the largest width")


PRESETS = {
    "cpu": CoordCheckConfig(),
    "gpu": CoordCheckConfig(widths=(128, 256, 512, 1024, 2048, 4096), base_width=128, depth=8,
                            heads=8, seq_len=256, batch_size=16, steps=5, seeds=(0, 1, 2),
                            schemes=("pre", "post", "span"), device="cuda"),
}


def run(cfg: CoordCheckConfig, corpus: Corpus, log: Callable[[str], None] = progress.say) -> pd.DataFrame:
    """Every run's rows (analysis.width.steps), with progress on ``log``."""
    cfg.validate()
    sc = cfg.step_config
    grid = [(s, p, w, seed) for s in cfg.schemes for p in cfg.parametrizations
            for w in cfg.widths for seed in cfg.seeds]
    frames, t0 = [], time.perf_counter()
    bar = progress.bar(len(grid), "coordcheck", unit="run", leave=False)
    for i, (s, p, w, seed) in enumerate(grid, 1):
        bar.set_postfix_str(f"{s} {p} width {w} seed {seed}", refresh=False)
        frames.append(measure_steps(cfg.model_config(s, p, w), sc, corpus, seed, cfg.device))
        bar.update()
        if i % (len(cfg.widths) * len(cfg.seeds)) == 0:  # a scheme × parametrization done
            log(f"  {s} {p}: widths {min(cfg.widths)}…{max(cfg.widths)} done "
                f"[{i}/{len(grid)} runs, {time.perf_counter() - t0:.0f} s]")
    bar.close()
    return pd.concat(frames, ignore_index=True)


def slopes(raw: pd.DataFrame) -> pd.DataFrame:
    """Per scheme, parametrization, optimizer, step, site and metric: the log–log slope against
    width (mean over seeds), its standard error over seeds, and the theory's exponent (update)."""
    rows = []
    keys = ["scheme", "parametrization", "optimizer", "step", "site"]
    for key, g in raw.groupby(keys, sort=False):
        for metric in METRICS:
            per_seed = []
            for _, s in g.groupby("seed"):
                s = s[np.isfinite(s[metric]) & (s[metric] > 0)]
                if s["width"].nunique() >= 2:
                    per_seed.append(np.polyfit(np.log(s["width"]), np.log(s[metric]), 1)[0])
            if not per_seed:
                continue
            theory = (float(block_exponent(key[2], key[1]))
                      if metric == "update" and key[4] != "head" else np.nan)
            rows.append({**dict(zip(keys, key)), "metric": metric, "slope": float(np.mean(per_seed)),
                         "slope_se": (float(np.std(per_seed, ddof=1) / np.sqrt(len(per_seed)))
                                      if len(per_seed) > 1 else np.nan),
                         "seeds": len(per_seed), "theory": theory})
    return pd.DataFrame(rows)


def _worst(rows: pd.DataFrame, by: pd.Series) -> str:
    r = rows.loc[by.idxmax()]
    se = "" if np.isnan(r["slope_se"]) else f" ± {r['slope_se']:.2f}"
    return f"{r['metric']} of {r['site']} at step {r['step']}: slope {r['slope']:+.2f}{se}"


def claims(sl: pd.DataFrame) -> pd.DataFrame:
    """Two claims per scheme × parametrization × optimizer: stable in width (the µP check) and
    the step-1 update exponent against theory."""
    out = []
    for (scheme, par, opt), g in sl.groupby(["scheme", "parametrization", "optimizer"], sort=False):
        blocks = g[g["site"] != "head"]
        head = g[(g["site"] == "head") & (g["metric"] == "change_rms")]
        flat = blocks[blocks["metric"].isin(["act_rms", "update"])]
        excess = pd.concat([flat["slope"].abs() - FLAT, head["slope"] - FLAT])
        both = pd.concat([flat, head])
        ok = bool((excess <= 0).all())
        qualifiers = {"parametrization": par, "optimizer": opt}
        out.append(Claim(f"{scheme}_{par}_{opt}_width_stable", scheme,
                         f"at every step, every block's activation size and update size are "
                         f"width-independent (|slope| ≤ {FLAT}) and the logits' change does "
                         f"not grow (slope ≤ {FLAT})", METHOD,
                         "holds" if ok else "fails",
                         ("largest: " if ok else "worst: ") + _worst(both, excess), qualifiers))
        step1 = blocks[(blocks["metric"] == "update") & (blocks["step"] == 1)]
        if step1.empty:
            continue
        e = float(step1["theory"].iloc[0])
        tol = FLAT if e == 0 else GROWTH_TOL
        med = float(step1["slope"].median())
        se = float(np.sqrt((step1["slope_se"] ** 2).mean())) if step1["slope_se"].notna().any() else np.nan
        out.append(Claim(f"{scheme}_{par}_{opt}_update_exponent", scheme,
                         f"the step-1 per-block update size grows as width^{e:g} "
                         f"(theory.step), within {tol}", METHOD,
                         "holds" if abs(med - e) <= tol else "fails",
                         f"median slope over blocks {med:+.2f}" +
                         ("" if np.isnan(se) else f" (± {se:.2f} over seeds)") +
                         f"; blocks {', '.join(f'{s:+.2f}' for s in step1['slope'])}; theory {e:g}",
                         dict(qualifiers)))
    return claims_frame(out)
