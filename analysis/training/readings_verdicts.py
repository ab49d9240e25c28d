"""The verdicts of the SpanNorm readings study: each reading against the paper's claims.

Reads the study's folders (analysis.training.readings) and writes, into one results folder:

- ``lr_drift.csv``   per scheme, the optimal lr at each depth and its drift per doubling of L
                     (weighted fit over the depths where the optimum is resolved), beside
                     theory.depth_orders' prediction;
- ``onestep.csv``    the one-step depth exponents (block update, network change), measured and
                     derived;
- ``train_runs.csv`` every run of the training grid, dense and MoE;
- ``verdicts.csv``   reading × claim → holds / fails / untested, with its numbers;
- ``readings.md`` and figures.

The claims, each decided by one rule stated in its row:
init_bounds (theory at init: forward variance, g_0/g_L and the last layer's token correlation stay
bounded from L = 64 to 1024), lr_transfer (the optimum moves by at most DRIFT_TOL per doubling,
decided only where its standard error allows), stability (every grid run trains: no divergence, no stall), depth_efficiency
(the loss falls with depth, slope 2 SE below 0), ge_pre (at the deepest depth not worse than pre
by more than GE_TOL at 2 SE), moe (stable with experts at every depth and not worse than pre with experts).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.infra.files import write_csv, write_text
from analysis.training.claims import (COSINE_COLLAPSED, better_at_deepest, deepest_difference,
                                      depth_slope, stability)
from analysis.training.readings import BASELINES, READINGS, ReadingsPlan, grid_folder

DRIFT_TOL = 0.25  # |log2 optimum change per doubling| that still counts as "transfers"
MIN_SE = 0.25  # floor on a depth's log2-optimum SE (a quarter grid step): one seed pair agrees by luck
BOUND_SLOPE = 0.1  # init: a quantity is bounded if its log-log slope from L = 64 to 1024 is below
INIT_DEPTHS = (64, 1024)
GE_TOL = 0.1  # bits/byte: the resolution at which "not worse than pre" is decided
COLUMNS = ["reading", "claim", "status", "evidence"]


def _runs(root: Path, stage: str, schemes) -> pd.DataFrame:
    frames = [pd.read_csv(grid_folder(root, stage, s) / "train_runs.csv") for s in schemes
              if (grid_folder(root, stage, s) / "train_runs.csv").exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def lr_drift(optima: pd.DataFrame) -> pd.DataFrame:
    """Per scheme: the drift of log2(optimal lr) per doubling of depth, a weighted fit over the
    resolved, unstalled depths (each weighted by 1/max(SE, MIN_SE)²), its standard error, the
    depths used and those left out, and theory.depth_orders' prediction under Adam."""
    from theory.depth_orders import depth_orders
    rows = []
    for scheme, g in optima.groupby("scheme", sort=False):
        g = g.sort_values("depth")
        ok = g[g["inside_grid"].astype(bool) & ~g["stalled"].astype(bool)]
        out = {"scheme": scheme, "depths": ",".join(map(str, ok["depth"])),
               "left_out": "; ".join(f"L={r.depth} " + ("stalled" if r.stalled else "optimum at the grid's edge")
                                     for r in g.itertuples() if r.depth not in set(ok["depth"])),
               **{f"log2_lr_L{r.depth}": r.log2_best_lr for r in g.itertuples()},
               "predicted": float(depth_orders(scheme, "adam").lr_drift),
               "predicted_fixed_width": float(-depth_orders(scheme, "adam").network_fixed_width)}
        if len(ok) >= 2:
            x = np.log2(ok["depth"].to_numpy(float))
            y = ok["log2_best_lr"].to_numpy(float)
            w = 1 / np.maximum(ok["log2_se"].fillna(MIN_SE).to_numpy(float), MIN_SE) ** 2
            X = np.stack([np.ones_like(x), x], axis=1)
            cov = np.linalg.inv(X.T @ (w[:, None] * X))
            beta = cov @ X.T @ (w * y)
            out.update(drift=float(beta[1]), drift_se=float(math.sqrt(cov[1, 1])))
        else:
            out.update(drift=math.nan, drift_se=math.nan)
        rows.append(out)
    frame = pd.DataFrame(rows)
    tol = np.maximum(DRIFT_TOL, 2 * frame["drift_se"])
    frame["prediction"] = np.where(frame["drift"].isna(), "untested",
                                   np.where((frame["drift"] - frame["predicted"]).abs() <= tol,
                                            "holds", "fails"))
    return frame


def init_bounds(scheme: str) -> tuple[str, str]:
    """The paper's init claims from the theory: forward variance, g_0/g_L and the last layer's
    token correlation bounded as L grows (log-log slope from 64 to 1024 below BOUND_SLOPE) and
    tokens not collapsed (correlation below COSINE_COLLAPSED at L = 1024)."""
    from theory.solve import predict_profile
    stats = {}
    for L in INIT_DEPTHS:
        p = predict_profile(scheme, depth=L, rho0=0.1)
        stats[L] = {"q": float(np.nanmax(p["q"]) / p["q"][0]), "g": float(p["g"][0] / p["g"][-1]),
                    "rho": float(p["rho"][-1])}
    lo, hi = INIT_DEPTHS
    slope = {k: math.log(stats[hi][k] / stats[lo][k]) / math.log(hi / lo) for k in ("q", "g")}
    bad = [f"{name} grows as L^{slope[k]:.2f}" for k, name in (("q", "max q_l/q_0"), ("g", "g_0/g_L"))
           if abs(slope[k]) > BOUND_SLOPE]
    if stats[hi]["rho"] >= COSINE_COLLAPSED:
        bad.append(f"token correlation {stats[hi]['rho']:.3f} at L = {hi} (collapsed ≥ {COSINE_COLLAPSED})")
    evidence = "; ".join(f"L={L}: max q_l/q_0 {s['q']:.3g}, g_0/g_L {s['g']:.3g}, ρ_L {s['rho']:.3f}"
                         for L, s in stats.items())
    return ("fails" if bad else "holds"), (", ".join(bad) + "; " if bad else "") + evidence


def lr_transfer(row) -> tuple[str, str]:
    """The optimum stays put across depth. Holds: |drift| ≤ DRIFT_TOL with its 2-SE interval
    inside ±2·DRIFT_TOL, every depth trainable; fails: a depth that stalls at every lr, or
    |drift| > DRIFT_TOL and 2 SE from 0; otherwise untested (too noisy to decide)."""
    if not np.isfinite(row.drift):
        return "fails", f"optimum resolved at fewer than 2 depths ({row.left_out or 'none'})"
    d, se = abs(row.drift), row.drift_se
    evidence = (f"log2 optimum per doubling {row.drift:+.2f} ± {row.drift_se:.2f} over L = "
                f"{row.depths} (theory {row.predicted:+.2g})")
    if "stalled" in (row.left_out or ""):
        return "fails", f"{evidence}; {row.left_out}"
    if d <= DRIFT_TOL and d + 2 * se <= 2 * DRIFT_TOL:
        status = "holds"
    elif d > DRIFT_TOL and d > 2 * se:
        status = "fails"
    else:
        status, evidence = "untested", f"{evidence}: too noisy to decide (tolerance {DRIFT_TOL})"
    return status, evidence + (f"; {row.left_out}" if row.left_out else "")


def depth_efficiency(runs: pd.DataFrame, scheme: str, kind: str) -> tuple[str, str]:
    """The loss falls with depth: bits/byte per doubling 2 SE below 0 over the trained runs
    (pre's slope quoted beside it: the budget's own limit)."""
    slope, se, n = depth_slope(runs, scheme, kind)
    if n < 3:
        return "untested", f"needs ≥ 3 trained depths, got {n}"
    by_depth = runs[(runs["scheme"] == scheme) & (runs["moe"] == kind)].groupby("depth")["final_val_bpb"].mean()
    ok = slope + 2 * se < 0
    evidence = (f"bits/byte per doubling {slope:+.3f} ± {se:.3f}; " +
                ", ".join(f"L={d}: {v:.3f}" for d, v in by_depth.items()))
    if scheme != "pre":
        pre, pre_se, pre_n = depth_slope(runs, "pre", kind)
        if pre_n >= 3:
            evidence += f" (pre: {pre:+.3f} ± {pre_se:.3f})"
    return ("holds" if ok else "fails"), evidence


def not_worse_than_pre(runs: pd.DataFrame, scheme: str, kind: str) -> tuple[str, str]:
    """At the deepest depth both trained, ``scheme``'s final loss against pre's. Fails: worse by
    more than 2 SE (or it diverged where pre did not); holds: the difference plus 2 SE is at most
    GE_TOL (not worse, at that resolution); otherwise untested (the seeds disagree too much)."""
    status, evidence = better_at_deepest(runs, kind, a=scheme, b="pre")
    c = deepest_difference(runs, kind, scheme, "pre")
    if c is None or c["diverged"]:
        return status, evidence
    diff, se = c["diff"], c["se"]
    if diff > 2 * se:
        return "fails", evidence
    if diff + 2 * se <= GE_TOL:
        return "holds", evidence
    return "untested", (f"{evidence}: too noisy to decide (the difference could be up to "
                        f"{diff + 2 * se:+.2f}, beyond {GE_TOL} bits/byte)")


def verdicts(drift: pd.DataFrame, dense: pd.DataFrame, moe: pd.DataFrame, unigram_bpb: float,
             schemes) -> pd.DataFrame:
    """reading × claim table (module docstring)."""
    rows = []
    drift = drift.set_index("scheme")
    for s in schemes:
        def add(claim, result):
            rows.append({"reading": s, "claim": claim, "status": result[0], "evidence": result[1]})
        add("init_bounds", init_bounds(s))
        add("lr_transfer", lr_transfer(drift.loc[s].rename(s)) if s in drift.index
            else ("untested", "no lrsweep of this scheme"))
        kind = "dense"
        add("stability", stability(dense, s, kind, unigram_bpb) if len(dense)
            else ("untested", "no training grid"))
        add("depth_efficiency", depth_efficiency(dense, s, kind) if len(dense)
            else ("untested", "no training grid"))
        if s != "pre":
            add("ge_pre", not_worse_than_pre(dense, s, kind) if len(dense)
                else ("untested", "no training grid"))
        if len(moe):
            k = moe["moe"].iloc[0]
            st, ev = stability(moe, s, k, unigram_bpb)
            if s != "pre":
                st2, ev2 = not_worse_than_pre(moe, s, k)
                st = ("fails" if "fails" in (st, st2) else "holds" if st == st2 == "holds"
                      else "untested")
                ev = f"{ev}; {ev2}"
            add("moe", (st, f"{k}: {ev}"))
        else:
            add("moe", ("untested", "no MoE grid"))
    return pd.DataFrame(rows, columns=COLUMNS)


def grid_summary(runs: pd.DataFrame, schemes, plateau_bpb: float) -> pd.DataFrame:
    """One row per scheme and dense / MoE, one column per depth: the final validation bits/byte's
    seed mean ± standard error, and how many seeds stalled (final loss above ``plateau_bpb`` or
    status stalled) or diverged."""
    rows = []
    for kind in sorted(runs["moe"].unique(), key=lambda k: (k != "dense", k)):
        for scheme in schemes:
            r = runs[(runs["scheme"] == scheme) & (runs["moe"] == kind)]
            if not len(r):
                continue
            row = {"scheme": scheme, "kind": kind, "lr": f"{r['lr'].iloc[0]:g}"}
            for depth, g in r.groupby("depth"):
                v = g["final_val_bpb"]
                bad = int((g["diverged"].astype(bool) | (v > plateau_bpb)
                           | g.get("status", pd.Series("", g.index)).eq("stalled")).sum())
                se = v.std() / math.sqrt(len(v)) if len(v) > 1 else math.nan
                row[f"L={depth}"] = (f"{v.mean():.3f} ± {se:.3f}" if np.isfinite(se) else f"{v.mean():.3f}") + (
                    f" ({bad} of {len(v)} stalled)" if bad else "")
            rows.append(row)
    return pd.DataFrame(rows)


def build(root: Path, out: Path, plan: ReadingsPlan, fmt: str = "png") -> pd.DataFrame:
    """Read the study in ``root``, write the results into ``out``; the verdict table."""
    from analysis.testbed.corpus import load_corpus
    from figures.readings import drift_figure, grid_figure, onestep_figure
    from analysis.width.lrsweep import optima as find_optima
    schemes = list(plan.schemes)
    unigram = load_corpus().unigram_bits()
    sweep = root / "lrsweep" / "lrsweep.csv"  # every scheme's runs, however the work was split
    raw = pd.read_csv(sweep) if sweep.exists() and sweep.stat().st_size else pd.DataFrame()
    raw = raw[raw["scheme"].isin(schemes) & (raw["width"] == plan.width)] if len(raw) else raw
    optima = find_optima(raw, 0.95 * unigram * math.log(2)) if len(raw) else pd.DataFrame()
    if len(optima):  # the study's order, however the work was split
        optima = optima.sort_values("scheme", key=lambda c: c.map(schemes.index), kind="stable")
    drift = lr_drift(optima) if len(optima) else pd.DataFrame(columns=["scheme"])
    dense, moe = _runs(root, "grid", schemes), _runs(root, "moe", schemes)
    table = verdicts(drift, dense, moe, unigram, schemes)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(table, out / "verdicts.csv", index=False)
    write_csv(drift, out / "lr_drift.csv", index=False)
    runs = pd.concat([dense, moe], ignore_index=True)
    write_csv(runs, out / "train_runs.csv", index=False)
    figs = []
    steps = root / "onestep" / "depth.csv"
    if steps.exists():  # the claims again, with this code's theory
        from analysis.width.onestep import depth_claims
        study = pd.read_csv(steps)
        write_csv(depth_claims(study), out / "onestep.csv", index=False)
        figs.append(onestep_figure(study, out / "figures" / "onestep_depth", fmt))
    if len(optima):
        write_csv(optima, out / "lr_optima.csv", index=False)
        figs.append(drift_figure(optima, drift, out / "figures" / "lr_optimum_vs_depth", fmt))
    if len(runs):
        from analysis.training.claims import STALL
        figs.append(grid_figure(runs, out / "figures" / "loss_vs_depth", fmt, STALL * unigram))
    from analysis.training.claims import STALL
    summary = grid_summary(runs, schemes, STALL * unigram) if len(runs) else pd.DataFrame()
    write_csv(summary, out / "grid_summary.csv", index=False)
    write_text(out / "readings.md", report(table, drift, figs, out, plan, summary))
    return table


def report(table: pd.DataFrame, drift: pd.DataFrame, figs, out: Path, plan: ReadingsPlan,
           summary: pd.DataFrame | None = None) -> str:
    """readings.md: the verdict matrix first, then the lr drift against theory, then figures."""
    matrix = table.pivot(index="reading", columns="claim", values="status").reindex(
        [s for s in plan.schemes if s in set(table["reading"])]).fillna("—")
    claims = [c for c in ("init_bounds", "lr_transfer", "stability", "depth_efficiency", "ge_pre", "moe")
              if c in matrix.columns]
    lines = ["# SpanNorm readings: verdicts", "",
             f"Readings {', '.join(READINGS)}; baselines {', '.join(BASELINES)}. Width {plan.width}; "
             f"lrsweep {plan.sweep_steps} steps × batch {plan.sweep_batch} at L = "
             f"{', '.join(map(str, plan.sweep_depths))}; grid {plan.tokens:,} tokens per run at L = "
             f"{', '.join(map(str, plan.grid_depths))} (MoE {plan.moe} at L = "
             f"{', '.join(map(str, plan.moe_depths))}), seeds {', '.join(map(str, plan.seeds))}.", "",
             "| reading | " + " | ".join(claims) + " |", "|---|" + "---|" * len(claims)]
    for reading, row in matrix.iterrows():
        lines.append(f"| {reading} | " + " | ".join(str(row.get(c, "")) for c in claims) + " |")
    lines += ["", "## Optimal learning rate across depth, against the one-step theory", "",
              "| scheme | drift per doubling (log2) | theory (width → ∞ first) | prediction | "
              "theory at a fixed width (L → ∞ first) | depths | left out |",
              "|---|---|---|---|---|---|---|"]
    for r in drift.itertuples():
        d = "—" if not np.isfinite(r.drift) else f"{r.drift:+.2f} ± {r.drift_se:.2f}"
        lines.append(f"| {r.scheme} | {d} | {r.predicted:+.2g} | {r.prediction} | "
                     f"{r.predicted_fixed_width:+.2g} | {r.depths} | {r.left_out or '—'} |")
    if summary is not None and len(summary):
        lines += ["", "## The training grid: final validation bits/byte (seed mean ± SE)", "",
                  _markdown(summary)]
    lines += ["", "## Figures", ""] + [f"![{f.stem}]({f.relative_to(out)})" for f in figs]
    lines += ["", "## Evidence", "", "| reading | claim | status | evidence |", "|---|---|---|---|"]
    lines += [f"| {r.reading} | {r.claim} | {r.status} | {r.evidence} |" for r in table.itertuples()]
    return "\n".join(lines) + "\n"


def _markdown(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)
    body = ["| " + " | ".join("—" if pd.isna(v) else str(v) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([head, *body])
