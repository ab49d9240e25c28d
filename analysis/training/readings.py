"""The SpanNorm readings study: which reading of arXiv 2601.22580 delivers its claims.

Five readings of the abstract (theory/schemes.py: span, span_fwd, span_alt, span_dlr,
span_dlr_all) and two baselines (pre, deepnorm) go through the same five stages, each an
ordinary sigprop command or function writing its own resumable folder under the study's folder:

- ``onestep``  one Adam and one SGD step from init across depth: each block's update and the
               network's change, against theory.depth_orders (analysis.width.onestep);
- ``lrsweep``  the optimal learning rate across depth (``lrsweep``, one width, standard
               parametrization): does the optimum stay put as L doubles?
- ``scan``     the training grid's learning rate, tuned per scheme at the shallowest depth in
               the grid's own regime (``train`` at depth L₀, one seed, a few lrs);
- ``grid``     the training grid at that one lr up to the deepest depth, dense (``train``);
- ``moe``      the same with a mixture of experts, at fewer depths.

``verdicts`` (analysis.training.readings_verdicts) then reads them all into the verdict table.
Every stage resumes where it stopped; a stage whose inputs are missing says which stage to run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from analysis.infra.files import write_json

READINGS = ("span", "span_fwd", "span_alt", "span_dlr", "span_dlr_all")
BASELINES = ("pre", "deepnorm")
STAGES = ("onestep", "lrsweep", "scan", "grid", "moe")


def _lr_grid(lo: int, hi: int) -> tuple[float, ...]:
    return tuple(float(f"{1e-3 * 2 ** k:.3g}") for k in range(lo, hi + 1))


@dataclass(frozen=True)
class ReadingsPlan:
    """What the study trains; every size is data, overridden by a preset."""

    schemes: tuple[str, ...] = READINGS + BASELINES
    width: int = 64
    heads: int = 4
    seeds: tuple[int, ...] = (0, 1)
    # lrsweep: short runs across depth
    sweep_depths: tuple[int, ...] = (4, 8, 16, 32, 64)
    sweep_lrs: tuple[float, ...] = _lr_grid(-2, 6)  # 2.5e-4 … 6.4e-2
    sweep_steps: int = 50
    sweep_batch: int = 4
    # the training grid: 3 × the committed CPU grid's 131,072 tokens per run
    tokens: int = 393_216
    scan_lrs: tuple[float, ...] = _lr_grid(0, 6)  # 1e-3 … 6.4e-2, at the first grid depth
    grid_depths: tuple[int, ...] = (4, 8, 16, 32, 64)
    moe: str = "4,2"
    moe_depths: tuple[int, ...] = (4, 16, 64)
    seq_len: int = 64
    batch: int = 16
    # one step from init: the committed onestep study's width, 3 seeds
    step_width: int = 256
    step_depths: tuple[int, ...] = (4, 8, 16, 32, 64)
    step_seeds: tuple[int, ...] = (0, 1, 2)

    def lrsweep_argv(self, out: Path) -> list[str]:
        """The ``lrsweep`` command line of the study."""
        return ["lrsweep", "--schemes", _join(self.schemes), "--parametrizations", "standard",
                "--widths", str(self.width), "--depths", _join(self.sweep_depths),
                "--lrs", _join(self.sweep_lrs), "--steps", str(self.sweep_steps),
                "--batch", str(self.sweep_batch), "--seq-len", str(self.seq_len),
                "--heads", str(self.heads), "--seeds", _join(self.seeds), "--out", str(out)]

    def train_argv(self, out: Path, schemes: tuple[str, ...], depths: tuple[int, ...], lr: float,
                   seeds: tuple[int, ...], moe: str | None = None) -> list[str]:
        """A ``train`` command line of the study (scan, grid or moe)."""
        return ["train", "--schemes", _join(schemes), "--depths", _join(depths),
                "--width", str(self.width), "--heads", str(self.heads),
                "--seq-len", str(self.seq_len), "--batch", str(self.batch),
                "--tokens", str(self.tokens), "--lr", f"{lr:g}", "--seeds", _join(seeds),
                *(["--moe", moe] if moe else []), "--out", str(out)]


PRESETS = {
    "cpu": ReadingsPlan(),
    # the whole study in a minute: what the slow test and the docs' tiny command run
    "tiny": ReadingsPlan(width=32, heads=2, seeds=(0, 1), sweep_depths=(2, 4), sweep_lrs=_lr_grid(0, 2),
                         sweep_steps=4, tokens=2048, scan_lrs=_lr_grid(1, 2), grid_depths=(2, 4),
                         moe_depths=(2,), seq_len=16, batch=4, step_width=32,
                         step_depths=(2, 4), step_seeds=(0, 1)),
}


def _join(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def scan_folder(root: Path, lr: float) -> Path:
    return root / "scan" / f"lr-{lr:g}"


def grid_folder(root: Path, stage: str, scheme: str) -> Path:
    return root / stage / scheme


def tuned_lrs(root: Path, plan: ReadingsPlan, schemes: tuple[str, ...] | None = None
              ) -> dict[str, float]:
    """Each scheme's lr with the lowest validation loss at the first grid depth (seed mean);
    ValueError if one of ``schemes`` (default: the plan's) has no finished scan run."""
    frames = [pd.read_csv(scan_folder(root, lr) / "train_runs.csv")
              for lr in plan.scan_lrs if (scan_folder(root, lr) / "train_runs.csv").exists()]
    if not frames:
        raise ValueError(f"no learning-rate scan in {root / 'scan'}: run the study's scan stage first")
    runs = pd.concat(frames)
    runs = runs[~runs["diverged"].astype(bool)]
    best = {}
    for scheme, rows in runs.groupby("scheme"):
        by_lr = rows.groupby("lr")["final_val_bpb"].mean()
        best[scheme] = float(by_lr.idxmin())
    missing = [s for s in (schemes or plan.schemes) if s not in best]
    if missing:
        raise ValueError(f"the learning-rate scan in {root / 'scan'} has no finished run of "
                         f"{', '.join(missing)}: run the scan stage again")
    return best


def one_step_study(out: Path, plan: ReadingsPlan, schemes: tuple[str, ...]) -> pd.DataFrame:
    """The one-step depth study of every scheme under Adam and SGD, resumable per scheme and
    optimizer (``out/parts``); writes ``depth.csv`` and ``depth_claims.csv``, returns the claims."""
    from analysis.infra.files import write_csv
    from analysis.testbed.corpus import load_corpus
    from analysis.width.onestep import depth_claims, depth_study
    corpus = load_corpus()
    (out / "parts").mkdir(parents=True, exist_ok=True)
    for scheme in schemes:
        for opt in ("adam", "sgd"):
            part = out / "parts" / f"{scheme}-{opt}.csv"
            if part.exists():
                continue
            frames = [depth_study(scheme, list(plan.step_depths), plan.step_width, opt, seed,
                                  corpus, plan.heads, plan.seq_len)
                      .assign(scheme=scheme, optimizer=opt, seed=seed) for seed in plan.step_seeds]
            write_csv(pd.concat(frames, ignore_index=True), part, index=False)
            print(f"  one step {scheme} {opt}: depths {_join(plan.step_depths)}", flush=True)
    study = pd.concat([pd.read_csv(f) for f in sorted((out / "parts").glob("*.csv"))],
                      ignore_index=True)
    claims = depth_claims(study)
    write_csv(study, out / "depth.csv", index=False)
    write_csv(claims, out / "depth_claims.csv", index=False)
    return claims


def run_stage(stage: str, root: Path, plan: ReadingsPlan, command: Callable[[list[str]], int],
              schemes: tuple[str, ...] | None = None) -> None:
    """Run one stage (for ``schemes`` only, where given) through ``command`` (the CLI's main);
    ValueError if a command fails."""
    only = tuple(schemes or plan.schemes)

    def call(argv: list[str]) -> None:
        if command(argv) != 0:
            raise ValueError(f"the study's {stage} stage failed in: {' '.join(argv)}")

    if stage == "onestep":
        one_step_study(root / "onestep", plan, only)
    elif stage == "lrsweep":
        call(replace(plan, schemes=only).lrsweep_argv(root / "lrsweep"))
    elif stage == "scan":
        for lr in plan.scan_lrs:
            call(plan.train_argv(scan_folder(root, lr), only, plan.grid_depths[:1], lr,
                                 plan.seeds[:1]))
    elif stage in ("grid", "moe"):
        lrs = tuned_lrs(root, plan, only)
        depths = plan.grid_depths if stage == "grid" else plan.moe_depths
        for scheme in only:
            call(plan.train_argv(grid_folder(root, stage, scheme), (scheme,), depths, lrs[scheme],
                                 plan.seeds, plan.moe if stage == "moe" else None))
        write_json(root / f"{stage}_lrs.json", lrs, indent=1)
    else:
        raise ValueError(f"unknown stage '{stage}' (known: {', '.join(STAGES)})")
