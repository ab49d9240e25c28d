"""The main analysis report: figures from the aggregated profiles, tables, formulas, verdicts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from figures import init as F
from figures.report import Block, claims_summary, write_report
from figures.train import training_blocks
from theory.claim_table import tally


def detail_depth(depths: list[int]) -> int:
    """The depth shown layer by layer: the deepest ≤ 64 (readable), else the shallowest."""
    small = [d for d in depths if d <= 64]
    return max(small) if small else min(depths)


def formulas(theory: dict) -> list[tuple[str, str]]:
    """(title, LaTeX) pairs from theory.json: each scheme's closed forms in L."""
    out = []
    for rep in theory.get("schemes", []):
        cf = rep["closed_form"]
        for key, label in (("q_L", "stream second moment q_L"), ("g0_over_gL", "gradient ratio g_0/g_L")):
            if cf.get(key) and cf[key] != "—":
                out.append((f"{rep['scheme']}: {label} ({cf['assumptions']})", cf[key]))
    beta = theory.get("span_beta")
    if beta:
        out.append(("SpanNorm ScaleInit β(L)", beta["default"].replace("beta", r"\beta")))
    return out


def draw(agg: pd.DataFrame, out: Path, fmt: str = "png") -> list[Path]:
    """Every init figure into ``out/figures``."""
    folder = out / "figures"
    depth = detail_depth(sorted(agg["depth"].unique()))
    return [F.variance_vs_depth(agg, folder / "variance_vs_depth", fmt),
            F.profiles_at_depth(agg, depth, folder / f"profiles_L{depth}", fmt),
            F.gradient_ratio_vs_depth(agg, folder / "gradient_ratio_vs_depth", fmt),
            F.rank_collapse_vs_depth(agg, folder / "rank_collapse_vs_depth", fmt)]


def targets_line(targets: pd.DataFrame) -> str | None:
    """How many error targets of the position-resolved theory were met, and how many of the
    missed ones cannot be resolved with this many seeds (targets.csv); None without targets."""
    resolved = targets[targets["prediction"] == "resolved"] if "prediction" in targets else targets
    if "passes" not in resolved or not len(resolved):
        return None
    passed = resolved["passes"].astype(bool)
    line = f"Error targets of the position-resolved theory: {int(passed.sum())} of {len(resolved)} met"
    if "resolvable" in resolved and (~passed).any():
        unresolved = int((~passed & ~resolved["resolvable"].astype(bool)).sum())
        line += (f"; {unresolved} of the {int((~passed).sum())} missed cannot be resolved with "
                 "this many seeds")
    return line


def report_blocks(tables: dict[str, pd.DataFrame], config: dict, figures: list[Path], out: Path,
                  formulas: list[tuple[str, str]] = (), extra: list[Block] = (),
                  not_run: tuple[list[str], str | None] = ([], None)) -> list[Block]:
    """The report's blocks: the verdict summary first, then the figures, then the tables
    (claims, targets, errors, disagreements) and formulas. ``not_run``: the schemes the grid did
    not run and the command that runs them (pipeline.other_schemes_command)."""
    claims, targets, errors = tables["claims"], tables["targets"], tables["errors"]
    bad = tables["disagreements"]
    verdict = ", ".join(f"{n} {s}" for s, n in tally(claims)._asdict().items())
    grid = (f"schemes {', '.join(config['schemes'])}; depths {', '.join(map(str, config['depths']))}; "
            f"seeds {', '.join(map(str, config['seeds']))}; width {config['width']}, {config['heads']} heads, "
            f"{config['ffn']} FFN, {config['norm']}; {config['batches']} batches of "
            f"{config['batch_size']} × {config['seq_len']} tokens per seed; device {config['device']}")
    lines = [f"Claims of the schemes run here ({', '.join(config['schemes'])}); claims.csv holds "
             "the same rows."]
    rest, command = not_run
    if rest:
        lines.append(f"Not run: {', '.join(rest)}; for their claims: `{command}`")
    line = targets_line(targets)
    if line:
        lines.append(line + f"; {len(bad)} disagreement rows.")
    blocks: list[Block] = [
        ("h1", "sigprop: signal propagation at initialization, theory against measurement"),
        claims_summary(claims, lines),
        ("p", f"Grid: {grid}. Measured values are means over seeds with their standard error "
              "(across seeds; over batches when there is one seed); error bars show ± 2 standard "
              "errors. Layers: -1 is the embedding, i is block i (the theory's l = i + 1)."),
        ("h2", "Figures"),
        *[("img", p.relative_to(out).as_posix()) for p in figures],
        ("h2", f"Claims ({verdict})"),
        ("table", claims),
        ("h2", "Targets"),
        ("p", "Median and 99th-percentile error over every compared layer and depth, against the "
              "targets (forward second moment: median ≤ 2 %, p99 ≤ 5 %; gradient: median ≤ 5 %), "
              "for the position-resolved theory. noise_floor: the same statistic of the error "
              "that an exactly right theory would show, given the measured spread (Student's t "
              "with seeds − 1 degrees of freedom); resolvable is false where it exceeds the "
              "target: there more seeds, not a better theory, would decide. averaged_error: the "
              "sequence-averaged recurrence's error, the baseline, not checked against the "
              "target."),
        ("table", targets),
        ("h2", "Errors per scheme and metric"),
        ("p", "Relative error for second moments and gradient ratios, absolute error for cosines. "
              "within_spread: the share of rows whose theory lies within 2 standard errors of the "
              "measured mean; within_expected: that share for an exactly right theory (0.82 with "
              "3 seeds, not 0.95); noise_floor(_p99): the median (99th-percentile) error of an "
              "exactly right theory at the typical spread. prediction: resolved = the position-resolved theory (token-by-token "
              "covariances; solid lines in the figures), averaged = the sequence-averaged symbolic "
              "recurrence (dotted lines), which cannot see that causal attention sends the "
              "gradient of every later token to the first ones."),
        ("table", errors),
        ("h2", f"Disagreements ({len(bad)} rows with error > 5 % outside the measured spread)"),
    ]
    if len(bad):
        cols = ["scheme", "depth", "point", "metric", "measured", "spread", "theory", "error"]
        blocks.append(("p", "Rows of the position-resolved theory, largest error first."))
        blocks.append(("table", bad[cols].head(40)))
        if len(bad) > 40:
            blocks.append(("p", f"… and {len(bad) - 40} more in disagreements.csv."))
    if formulas:
        blocks.append(("h2", "Derived formulas"))
        for title, latex in formulas:
            blocks += [("h3", title), ("math", latex)]
    return blocks + list(extra)


def write(tables: dict[str, pd.DataFrame], agg: pd.DataFrame, config: dict, theory: dict,
          out: Path, fmt: str = "png") -> tuple[Path, Path]:
    """Draw the figures and write report.md and report.html into ``out``.

    A training grid written to the same folder (train_runs.csv) adds its section.
    """
    figures = draw(agg, out, fmt)
    extra: list[Block] = []
    if (out / "train_runs.csv").exists():
        train_figs = sorted((out / "figures").glob("train_*.*"))
        extra = training_blocks(pd.read_csv(out / "train_runs.csv"), train_figs, out)
    from analysis.init.pipeline import other_schemes_command  # the sweep's own flags
    return write_report(report_blocks(tables, config, figures, out, formulas(theory), extra,
                                      other_schemes_command(config)), out, "sigprop report")
