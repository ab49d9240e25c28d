"""Two `diagnose` folders of the same model and text, compared statistic by statistic.

Why: a diagnosis run on another device (a GPU) or another library version must read the same
model the same way. This prints the verdicts and, per statistic, the median and largest relative
difference over the points both measured, and the largest difference in standard errors where
the statistic carries one.

    python tools/compare_diagnoses.py results/diagnose-smollm2 results/gpu-h200/released/smollm2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from figures.report import markdown_table

STATISTICS = ["second_moment", "q_rel_median", "token_cosine", "effective_rank", "branch_rel_median",
              "massive_ratio", "grad_rel", "grad_scale_free"]


def compare(reference: Path, other: Path) -> tuple[dict, pd.DataFrame]:
    """Both diagnoses' verdicts and sample sizes, and one row of differences per statistic."""
    meta = {name: json.loads((folder / "diagnosis.json").read_text())
            for name, folder in (("reference", reference), ("other", other))}
    both = pd.read_csv(reference / "diagnosis.csv").merge(
        pd.read_csv(other / "diagnosis.csv"), on=["layer", "point"], suffixes=("_a", "_b"))
    rows = []
    for stat in (s for s in STATISTICS if f"{s}_a" in both and f"{s}_b" in both):
        a, b = both[f"{stat}_a"].astype(float), both[f"{stat}_b"].astype(float)
        keep = np.isfinite(a) & np.isfinite(b) & (a != 0)
        rel = ((b - a) / a.abs())[keep].abs()
        row = dict(statistic=stat, points=int(keep.sum()), median_rel_diff=rel.median(), max_rel_diff=rel.max())
        if f"{stat}_se_a" in both:
            se = np.hypot(both[f"{stat}_se_a"], both[f"{stat}_se_b"])[keep]
            row["max_diff_in_se"] = float(((b - a)[keep].abs() / se.where(se > 0)).max())
        rows.append(row)
    facts = {k: {name: m.get(k) for name, m in meta.items()}
             for k in ("verdict", "device", "sequences_used", "grad_sequences_used")}
    return facts, pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("reference", type=Path)
    p.add_argument("other", type=Path)
    args = p.parse_args()
    facts, table = compare(args.reference, args.other)
    for key, pair in facts.items():
        print(f"- {key}: {pair['reference']} | {pair['other']}")
    print()
    print(markdown_table(table))


if __name__ == "__main__":
    main()
