"""Calibrate diagnose's thresholds: its per-block measures on many trained checkpoints at once.

    python -m analysis.diagnose.calibration --out results/diagnose-calibration CHECKPOINT ...

Runs ``diagnose`` on each checkpoint (sigprop runs, Hugging Face folders) with the same settings
and writes ``blocks.csv`` (one row per block: relative contribution, turn angle, skip test, each
with its spread, trained and re-initialized), ``checkpoints.csv`` (one row per checkpoint: verdict,
findings) and ``summary.csv`` (per placement: quantiles of each measure). The redundancy
thresholds in ``THRESHOLDS`` were chosen from these files (README, "Diagnose: calibration").
"""

from __future__ import annotations

import sys

import pandas as pd

from analysis.diagnose.atlas import collect
from analysis.diagnose.findings import THRESHOLDS

BLOCK_COLUMNS = ("branch_rel", "branch_rel_median", "branch_rel_median_se", "angle_deg", "skip_out_change",
                 "skip_out_change_se", "skip_loss_delta", "skip_loss_delta_se", "init_branch_rel_median",
                 "init_angle_deg")


def calibrate(paths: list[str], *, text: str | None, sequences: int, seq_len: int,
              skip_sequences: int, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(blocks, checkpoints) tables over ``paths``, each diagnosed with the same settings."""
    layers, checkpoints = collect(paths, log=log, text=text, sequences=sequences, seq_len=seq_len,
                                  grad_sequences=0, skip_sequences=skip_sequences,
                                  init_sequences=min(sequences, 16), tolerance=0.0)
    blocks = layers[(layers.layer >= 0) & (layers.layer < layers.depth)]
    keep = ["checkpoint", "placement", "depth", "verdict", "layer", *[c for c in BLOCK_COLUMNS if c in blocks],
            "relative_depth"]
    return blocks[keep].reset_index(drop=True), checkpoints


def summary(blocks: pd.DataFrame) -> pd.DataFrame:
    """Per placement and verdict: minimum, 1st, 5th and 50th percentile of each redundancy measure."""
    cols = ["branch_rel_median", "skip_out_change", "angle_deg", "init_branch_rel_median"]
    keys = ["placement", "verdict"]
    q = blocks.groupby(keys)[cols].quantile([0.0, 0.01, 0.05, 0.5]).unstack()
    q.columns = [f"{c}_q{int(p * 100):02d}" for c, p in q.columns]
    q["checkpoints"] = blocks.groupby(keys)["checkpoint"].nunique()
    q["blocks"] = blocks.groupby(keys).size()
    q["below_contribution_threshold"] = blocks.assign(
        b=blocks.branch_rel_median < THRESHOLDS["redundant_contribution"][0]).groupby(keys)["b"].sum()
    q["below_skip_threshold"] = blocks.assign(
        b=blocks.skip_out_change < THRESHOLDS["redundant_skip"][0]).groupby(keys)["b"].sum()
    return q.reset_index()


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis.diagnose.calibration``: the same as `sigprop calibrate` (analysis/cli/calibrate.py)."""
    from analysis.cli import module_main
    return module_main("calibrate", argv)


if __name__ == "__main__":
    sys.exit(main())
