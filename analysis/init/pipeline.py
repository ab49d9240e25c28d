"""The main analysis: init sweep, theory at the same configuration, comparison — as tables.

Files in a run folder (stable names): ``config.json``, ``theory.json``, ``init_profiles.csv``, ``errors.csv``,
``targets.csv``, ``disagreements.csv`` and ``claims.csv``; figures/ draws from them and writes
the report, and ``report RUN_DIR`` rebuilds it from these files alone.
"""

from __future__ import annotations

import json
import shlex
import time
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from analysis.infra import files, progress
from analysis.infra.checks import check_int, check_list
from analysis.init.compare import add_errors, aggregate, disagreements, error_summary, target_check
from analysis.testbed.corpus import load_corpus
from analysis.init.measured_claims import check_claims
from analysis.testbed.memory import check_time
from analysis.testbed.model import ModelConfig
from analysis.init.sweep import (check_memory, check_theory_cost, complete_points, init_sweep,
                                 read_profiles, repredict)
from analysis.infra.records import read_record, refuse_other
from analysis.infra.device import resolve_device
from analysis.init.derivations import collect, write_json
from theory.claim_table import COLUMNS, claims_frame
from theory.schemes import SCHEMES
from theory.shape import Shape

TABLES = ("init_profiles", "errors", "targets", "disagreements", "claims")


@dataclass(frozen=True, kw_only=True)
class AnalysisConfig(Shape):
    """The grid of one analysis and the data it reads; the model shape is the shared Shape."""

    schemes: list[str] = field(default_factory=lambda: ["pre", "post", "span", "deepnorm"])
    depths: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32, 64, 128, 256])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seq_len: int = 64
    batch_size: int = 4
    batches: int = 2
    device: str = "cpu"
    corpus: str | None = None
    compile: bool = False  # probed models run under torch.compile

    # settings that change no statistic: a folder's sweep may resume under other values
    RESUMABLE_ACROSS = ("device", "compile")

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        resolve_device(self.device)  # the gpu preset where CUDA is not: one line
        # not empty, nothing twice (each would be measured twice and counted twice in every
        # statistic), depths increasing
        for name in ("schemes", "depths", "seeds"):
            check_list(getattr(self, name), name, increasing=name == "depths")
        for s in self.schemes:
            if s not in SCHEMES:
                raise ValueError(f"unknown scheme '{s}' (known: {', '.join(SCHEMES)})")
        for name in ("batches", "batch_size", "seq_len"):
            check_int(getattr(self, name), name)
        for d in self.depths:
            check_int(d, "each of depths")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        self.model_config(self.schemes[0], self.depths[0]).validate()
        deepest = [self.model_config(s, self.depths[-1]) for s in self.schemes]
        check_time(deepest, self.batches * self.batch_size * self.seq_len, self.batch_size,
                   self.device, lower="--batches, --batch or the deepest depth")

    def model_config(self, scheme: str, depth: int) -> ModelConfig:
        """The testbed configuration of one grid point."""
        return ModelConfig(scheme=scheme, depth=depth, max_seq_len=self.seq_len,
                           **self.shape_fields())


PRESETS = {
    "cpu": AnalysisConfig(),
    "gpu": AnalysisConfig(depths=[2, 4, 8, 16, 32, 64, 128, 256, 512, 1024], width=1024, heads=8,
                          seq_len=128, batch_size=8, device="cuda"),
}


# the sweep's command-line flag of each setting other_schemes_command repeats
SWEEP_FLAGS = {"depths": "--depths", "seeds": "--seeds", "width": "--width", "heads": "--heads",
               "seq_len": "--seq-len", "batch_size": "--batch", "batches": "--batches",
               "corpus": "--corpus", "device": "--device"}


def other_schemes_command(config: dict) -> tuple[list[str], str | None]:
    """The schemes an analysis with settings ``config`` (config.json's dict) did not run, and the
    command that runs them on the same grid (None when every scheme was run)."""
    rest = [s for s in SCHEMES if s not in config.get("schemes", [])]
    if not rest:
        return [], None
    gpu = config.get("device") == "cuda" and config.get("width") == PRESETS["gpu"].width
    base = asdict(PRESETS["gpu" if gpu else "cpu"])
    cmd = ["python", "run_analysis.py", "sweep", *(["--preset", "gpu"] if gpu else []),
           "--schemes", ",".join(rest)]
    for key, flag in SWEEP_FLAGS.items():
        value = config.get(key, base[key])
        if value != base[key] and value is not None:
            cmd += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    if config.get("compile"):
        cmd.append("--compile")
    return rest, shlex.join(cmd)


def check_same_settings(cfg: AnalysisConfig, out: Path) -> None:
    """Refuse a folder that holds an analysis of other settings, naming the first difference."""
    old = read_record(out / "config.json")
    if old is None:
        return
    # a setting newer than the folder (e.g. attention) had its default there
    defaults = json.loads(json.dumps(asdict(AnalysisConfig())))
    for key, value in asdict(cfg).items():
        was = old[key] if key in old else defaults[key]
        if key not in AnalysisConfig.RESUMABLE_ACROSS and was != value:
            raise refuse_other(out, "an analysis", key, was, value)


def analyse(cfg: AnalysisConfig, log: Callable[[str], None] = progress.say, out: Path | None = None,
            deadline: float | None = None) -> tuple[dict[str, pd.DataFrame], dict]:
    """Run theory, the sweep and the comparison; every table of the run folder and theory.json.

    With ``out``, config.json and theory.json are written first and each grid point's rows as it
    finishes, so a cut run keeps its finished points and a re-run with the same settings resumes
    (at ``deadline`` the sweep raises analysis.infra.budget.Cut between points).
    """
    cfg.validate()
    if out is not None:
        check_same_settings(cfg, out)
    check_theory_cost(cfg.depths, cfg.seq_len)  # before any work
    check_memory([cfg.model_config(s, d) for s in cfg.schemes for d in cfg.depths],
                 cfg.batch_size, cfg.device)
    corpus = load_corpus(cfg.corpus)
    t0 = time.perf_counter()
    theory, _ = collect(cfg.schemes, latex=True)
    log(f"theory: recurrences, closed forms and {len(theory['claims'])} claims derived in "
        f"{time.perf_counter() - t0:.1f} s")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        files.write_json(out / "config.json", asdict(cfg), indent=1)
        write_json(theory, out)
    log(f"init sweep: {len(cfg.schemes)} schemes × {len(cfg.depths)} depths × {len(cfg.seeds)} seeds, "
        f"width {cfg.width}, {cfg.batches} batches of {cfg.batch_size} × {cfg.seq_len} tokens, on {cfg.device}")
    t0 = time.perf_counter()
    profiles = init_sweep(cfg.schemes, cfg.depths, cfg.seeds, cfg.model_config(cfg.schemes[0], cfg.depths[0]),
                          corpus, batches=cfg.batches, batch_size=cfg.batch_size, device=cfg.device, log=log,
                          out_dir=out, compile=cfg.compile, deadline=deadline)
    log(f"sweep done in {time.perf_counter() - t0:.0f} s; comparing with theory")
    return compare_tables(profiles, theory["claims"], cfg.schemes), theory


def compare_tables(profiles: pd.DataFrame, theory_claims: list[dict],
                   schemes: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Every derived table from the init profiles and theory's claims (what ``report`` recomputes).

    ``schemes``: the schemes the analysis ran; the claims table lists only claims about them (a
    claim of a scheme not in the grid is not a result of this run: ``other_schemes_command`` says
    how to run those). A claim of a scheme that was run but not measured enough stays 'untested'.
    """
    agg = aggregate(profiles)
    errs = add_errors(agg)
    summary = error_summary(agg)
    theory = claims_frame(theory_claims)
    theory["method"] = "theory, " + theory["method"].astype(str)
    claims = pd.concat([theory, check_claims(errs)], ignore_index=True)[COLUMNS]
    if schemes is not None:
        claims = claims[claims["scheme"].isin(schemes)].reset_index(drop=True)
    return {"init_profiles": profiles, "errors": summary, "targets": target_check(summary),
            "disagreements": disagreements(errs), "claims": claims}


def save_tables(tables: dict[str, pd.DataFrame], cfg: AnalysisConfig, theory: dict, out: Path) -> None:
    """Write config.json, theory.json and every table as CSV into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(out / "config.json", asdict(cfg), indent=1)
    write_json(theory, out)
    for name in TABLES:
        files.write_csv(tables[name], out / f"{name}.csv", index=False)


def load_tables(run_dir: str | Path, warn: Callable[[str], None] = print, theory_again: bool = False,
                log: Callable[[str], None] = progress.say
                ) -> tuple[dict[str, pd.DataFrame], AnalysisConfig, dict]:
    """Read a run folder back (ValueError if it holds no results or a file is broken). Grid points
    missing from init_profiles.csv or part-written (a cut sweep) are left out, and ``warn`` is
    told which: the statistics then cover only the rest. ``theory_again``: both theories'
    predictions and the derived claims are computed afresh by this code from the stored
    measurements (sweep.repredict), so a revised theory is compared without measuring again."""
    run_dir = Path(run_dir)
    profiles = run_dir / "init_profiles.csv"
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a folder")
    needed = [profiles, run_dir / "config.json", run_dir / "theory.json"]
    if not all(p.exists() for p in needed):
        raise ValueError(f"{run_dir} holds no results (init_profiles.csv, config.json and "
                         f"theory.json are written by `run_analysis.py` or `sweep`)")
    cfg = config_from_record(run_dir / "config.json")
    theory = read_record(run_dir / "theory.json")
    if not theory_again:  # else rebuilt below: a broken one is replaced
        _check_claims(theory, run_dir / "theory.json")
    frame, problems = complete_points(checked_profiles(profiles), cfg.seeds, keep_seeds=True)
    grid = {(s, d) for s in cfg.schemes for d in cfg.depths}
    absent = sorted(grid - set(zip(frame["scheme"], frame["depth"].astype(int))),
                    key=lambda p: (cfg.schemes.index(p[0]), p[1]))
    problems += [f"{s} L={d}: not measured" for s, d in absent
                 if not any(p.startswith(f"{s} L={d}:") for p in problems)]
    if not len(frame):
        raise ValueError(f"{profiles} has no complete grid point ({'; '.join(problems[:5])})")
    if theory_again:
        frame = repredict(frame, cfg.model_config(cfg.schemes[0], cfg.depths[0]), log=log)
        theory, _ = collect(cfg.schemes, latex=True)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        warn(f"warning: {profiles} lacks parts of {len(problems)} of {len(grid)} grid points, "
             f"left out of every statistic: {shown} (a cut sweep: the same sweep command with "
             "this --out resumes it)")
    return compare_tables(frame.reset_index(drop=True), theory["claims"], cfg.schemes), cfg, theory


def _check_claims(theory: dict | None, path: Path) -> None:
    """Refuse a theory.json whose claims the claims table cannot read, naming the first."""
    if not isinstance(theory, dict) or not isinstance(theory.get("claims"), list):
        raise ValueError(f"{path} has no list of claims: not a sweep's theory.json")
    odd = next((i for i, c in enumerate(theory["claims"]) if not isinstance(c, dict)), None)
    try:
        if odd is not None:
            raise ValueError(f"claim {odd + 1} is {json.dumps(theory['claims'][odd])[:40]}, expected "
                             f"an object of {', '.join(COLUMNS)}")
        claims_frame(theory["claims"])
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: {e}; restore it, or rebuild it with `report "
                         f"{path.parent} --theory`") from None


# init_profiles.csv's columns of numbers (empty where a row was cut or a value not measured)
NUMBER_COLUMNS = {"depth": True, "seed": True, "layer": True, "measured": False, "spread": False,
                  "theory": False, "theory_averaged": False}  # column → whole numbers only


def checked_profiles(path: Path) -> pd.DataFrame:
    """init_profiles.csv read back (sweep.read_profiles), every column of numbers checked to hold
    numbers: ValueError naming the file, the column, the line and what was expected."""
    again = "restore it, or delete it and run the same sweep again into this folder"
    try:
        frame = read_profiles(path)
    except UnicodeDecodeError as e:  # a binary file
        raise ValueError(f"{path} is not a CSV text file (byte {e.start} is not UTF-8 text: a binary "
                         f"or corrupt file); {again}") from None
    for column, whole in NUMBER_COLUMNS.items():
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column].notna() & (values.isna() | (values % 1 != 0 if whole else False))
        if bad.any():
            row = int(bad.to_numpy().argmax())
            raise ValueError(f"{path}: column {column} holds {str(frame[column].iloc[row])[:40]!r} on "
                             f"line {row + 2}, expected {'an integer' if whole else 'a number'} (or "
                             f"nothing); {again}")
        frame[column] = values
    return frame


def config_from_record(path: Path) -> AnalysisConfig:
    """The AnalysisConfig a sweep saved at ``path``, or ValueError naming what is wrong."""
    record = read_record(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a JSON object of sweep settings")
    known = {f.name for f in fields(AnalysisConfig)}
    unknown = sorted(set(record) - known)
    if unknown:
        raise ValueError(f"{path} has unknown setting(s) {', '.join(unknown)}: not a sweep's "
                         "config.json")
    hints = typing.get_type_hints(AnalysisConfig)
    for name, value in record.items():
        if not _is_a(value, hints[name]):
            raise ValueError(f"{path}: field {name} is {json.dumps(value)[:80]}, expected "
                             f"{_expected(hints[name])}: not a sweep's config.json, or it was "
                             "edited; restore it, or run the sweep again into a new --out folder")
    try:
        cfg = AnalysisConfig(**record)
        replace(cfg, device="cpu").validate()  # not the device: it may be absent here
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}; restore it, or run the sweep again into a new --out "
                         "folder") from None
    return cfg


def _is_a(value: Any, hint: Any) -> bool:
    """Whether a JSON ``value`` has the type ``hint`` (int, float, str, bool, None, lists, dicts
    and unions of them; a whole number is a float too, true and false are not numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_is_a(v, args[0]) for v in value) if args else \
            isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict) and (not args or all(_is_a(v, args[1]) for v in value.values()))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # a type JSON cannot say: not checked here


def _expected(hint: Any) -> str:
    """A type as the words of a refusal: 'a list of integers', 'a string or null'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    if origin is list:
        return f"a list of {_expected(args[0]).removeprefix('an ').removeprefix('a ')}s" if args \
            else "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))
