"""sigprop command line: parses arguments and calls analysis/ and figures/."""

from __future__ import annotations

import argparse
import contextlib
import math
import shlex
import sys
from pathlib import Path

from analysis import progress


def _cmd_schemes(args: argparse.Namespace) -> int:
    from analysis.testbed.inspect import schemes_text
    print(schemes_text(args.scheme))
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from analysis.testbed.inspect import model_check_text
    from analysis.testbed.model import ModelConfig
    from analysis.device import available_memory, resolve_device
    from analysis.testbed.memory import check_fits
    experts, top_k = _parse_moe(args.moe)
    cfg = ModelConfig(scheme=args.scheme, depth=args.depth, width=args.width, heads=args.heads,
                      max_seq_len=args.seq_len, ffn=args.ffn, norm=args.norm, sigma=args.sigma,
                      experts=experts, top_k=top_k, dtype=args.dtype,
                      scheme_params=_parse_params(args.param))
    if args.batch < 1:
        raise ValueError(f"batch must be >= 1, got {args.batch}")
    dev = resolve_device(args.device)
    check_fits(cfg, args.batch, cfg.max_seq_len, available_memory(dev), str(dev))  # before building
    print(model_check_text(cfg, corpus=args.corpus, batch_size=args.batch, seed=args.seed,
                           device=args.device))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib
    parts = {"theory": "recurrences", "probes": "probe_overhead", "train": "training",
             "diagnose": "diagnosis", "components": "components",
             "width": "width"}  # flag → analysis/bench/ module
    if args.parallel < 1:  # checked before any part runs, whichever parts are asked for
        raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
    for flag in [f for f in parts if getattr(args, f)] or parts:  # no flag: every benchmark
        importlib.import_module(f"analysis.bench.{parts[flag]}").run(args)
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    import time

    from analysis.diagnose.diagnosis import (SEVERITY_ORDER, THRESHOLDS, diagnose, save, text_report,
                                             verdict_level)
    from figures.diagnose import diagnosis_blocks, diagnosis_figure
    from figures.report import write_report
    _check_format(args.format)
    out = _writable_dir(args.out or f"runs/diagnose-{time.strftime('%Y%m%d-%H%M%S')}")
    with _removed_if_empty(out):
        d = diagnose(args.path, blocks=args.blocks, config=args.config, tokenizer=args.tokenizer,
                     log=progress.say_err, **_measurement_settings(args))
    files = save(d, out)
    fig = diagnosis_figure(d.table, {k: v for k, (v, _) in THRESHOLDS.items()},
                           out / "figures" / "diagnosis", args.format, d.verdict,
                           d.meta["max_effective_rank"])
    files += [fig, *write_report(diagnosis_blocks(d.meta, d.verdict, d.findings, d.table,
                                                  str(fig.relative_to(out)), d.notes),
                                 out, "sigprop diagnosis")]
    print(text_report(d))
    print("wrote " + ", ".join(str(f) for f in files))
    level = verdict_level(d.verdict)
    if args.fail_on and SEVERITY_ORDER[level] >= SEVERITY_ORDER[args.fail_on]:
        print(f"--fail-on {args.fail_on}: verdict {level.upper()}, exit status 1", file=sys.stderr)
        return 1
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from analysis.sampling import sample_text
    print(sample_text(args.path, args.prompt, tokens=args.tokens, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed, device=args.device, config=args.config,
                      tokenizer=args.tokenizer))
    return 0


def _cmd_atlas(args: argparse.Namespace) -> int:
    import time

    from analysis.diagnose.atlas import atlas_claims, collect, summary
    from figures.diagnose import atlas_blocks, atlas_figure
    from figures.report import write_report
    _check_format(args.format)
    out = _writable_dir(args.out or f"runs/atlas-{time.strftime('%Y%m%d-%H%M%S')}")
    with _removed_if_empty(out):
        layers, checkpoints = collect(args.paths, log=progress.say_err, texts=_text_for(args.text_for),
                                      **_measurement_settings(args))
    claims, table = atlas_claims(layers), summary(layers)
    layers.to_csv(out / "atlas_layers.csv", index=False, float_format="%.6g")
    checkpoints.to_csv(out / "atlas_checkpoints.csv", index=False)
    claims.to_csv(out / "claims.csv", index=False)
    fig = atlas_figure(layers, out / "figures" / "atlas", args.format)
    files = write_report(atlas_blocks(checkpoints, claims, str(fig.relative_to(out)), table), out, "sigprop atlas")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    status = claims["status"].value_counts()
    print(f"claims: {status.get('holds', 0)} hold, {status.get('fails', 0)} fail, "
          f"{status.get('untested', 0)} untested")
    print(f"wrote {out}/atlas_layers.csv, atlas_checkpoints.csv, claims.csv, {fig}, "
          + ", ".join(str(f) for f in files))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from analysis.init.pipeline import PRESETS, analyse, save_tables

    cfg = _preset_with(
        PRESETS[args.preset], schemes=args.schemes and [s for s in args.schemes.split(",") if s],
        depths=args.depths and _parse_ints(args.depths, "--depths"),
        seeds=args.seeds and _parse_ints(args.seeds, "--seeds"),
        width=args.width, heads=args.heads, seq_len=args.seq_len, batch_size=args.batch,
        batches=args.batches, device=args.device, corpus=args.corpus, compile=args.compile)
    cfg.validate()
    _check_format(args.format)
    out = _writable_dir(args.out)
    args.out = str(out)  # what an interruption names, with the command that resumes
    print(f"sigprop analysis → {out}")
    tables, theory = analyse(cfg, out=out)
    save_tables(tables, cfg, theory, out)
    _write_report(tables, theory, out, args.format)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.init.pipeline import load_tables, save_tables
    _check_format(args.format)
    if args.theory and Path(args.run_dir).is_dir():
        _writable_dir(args.run_dir)  # before minutes of theory: an unwritable folder fails now
    tables, cfg, theory = load_tables(args.run_dir, warn=lambda s: print(s, file=sys.stderr),
                                      theory_again=args.theory)
    out = _writable_dir(args.run_dir)
    save_tables(tables, cfg, theory, out)
    _write_report(tables, theory, out, args.format)
    return 0


def _check_format(fmt: str) -> None:
    from figures.style import FORMATS
    if fmt not in FORMATS:
        raise ValueError(f"unknown figure format '{fmt}' (known: {', '.join(FORMATS)})")


def _write_report(tables, theory: dict, out, fmt: str) -> None:
    from analysis.init.compare import aggregate
    from analysis.records import read_record
    from figures.analysis_report import write
    config = read_record(out / "config.json")
    md, page = write(tables, aggregate(tables["init_profiles"]), config, theory, out, fmt)
    claims = tables["claims"]["status"].value_counts()
    print(f"claims: {claims.get('holds', 0)} hold, {claims.get('fails', 0)} fail, "
          f"{claims.get('untested', 0)} untested")
    print(f"wrote {md} and {page}")


TRAIN_PRESETS = {  # what `train` runs when a flag is not given, by device type
    "cpu": dict(schemes="pre,post,span,deepnorm", depths="2,4", width=64, heads=4, seq_len=64,
                batch=8, tokens=32_768, lr=2e-3),
    "cuda": dict(schemes="pre,post,span,deepnorm", depths="6,12,24,48,96,192", width=256, heads=4,
                 seq_len=256, batch=32, tokens=20_000_000, lr=1e-3),
}


def _cmd_train(args: argparse.Namespace) -> int:
    from analysis.testbed.corpus import load_corpus
    from analysis.testbed.model import ModelConfig
    from analysis.device import resolve_device
    from analysis.training.grid import train_grid
    from analysis.training.train import TrainConfig

    preset = TRAIN_PRESETS[resolve_device(args.device).type]
    opt = {k: preset[k] if getattr(args, k) is None else getattr(args, k) for k in preset}
    experts, top_k = _parse_moe(args.moe)
    depths = _parse_ints(opt["depths"], "--depths")
    schemes = [s for s in opt["schemes"].split(",") if s]
    base = ModelConfig(scheme=schemes[0] if schemes else "", depth=depths[0], width=opt["width"],
                       heads=opt["heads"], max_seq_len=opt["seq_len"], ffn=args.ffn, norm=args.norm,
                       experts=experts, top_k=top_k, tie_embeddings=args.tie_embeddings,
                       dropout=args.dropout, parametrization=args.parametrization,
                       base_width=args.base_width)
    seeds = _parse_ints(args.seeds, "--seeds")
    tc = TrainConfig(tokens=opt["tokens"], batch_size=opt["batch"], lr=opt["lr"],
                     grad_clip=args.grad_clip, device=args.device, seed=seeds[0],
                     compile=args.compile, beta1=args.beta1, beta2=args.beta2,
                     weight_decay=args.weight_decay, decay_embeddings=args.decay_embeddings,
                     warmup_frac=args.warmup, min_lr_ratio=args.min_lr_ratio,
                     log_every=args.log_every, tensorboard=args.tensorboard,
                     stall_fraction=args.stall_fraction, stall_share=args.stall_share)
    tc.validate(base.max_seq_len)  # before any folder is made
    if tc.tensorboard:
        from analysis.training.runlog import summary_writer_class
        summary_writer_class()  # a missing tensorboard package is refused before any training
    world, log = _join_ranks(args)
    if world.size > 1:
        from analysis.distributed import check_same, from_main
        check_same({k: v for k, v in vars(args).items() if k != "func"}, world)
        out = Path(from_main(str(_writable_dir(args.out)) if world.main else None, world))
    else:
        out = _writable_dir(args.out)
    args.out = str(out)  # what an interruption names, with the command that resumes
    corpus = load_corpus(args.corpus)
    try:
        runs, profiles = train_grid(schemes, depths, base, tc, corpus, out, parallel=args.parallel,
                                    seeds=seeds, world=world, ddp=args.ddp, fsdp=args.fsdp,
                                    log=log)
    finally:
        from analysis.distributed import leave
        leave()
    if not world.main:
        return 0
    figs = _grid_report(out, runs, profiles, args.format, corpus.unigram_bits())
    print(f"wrote {out / 'train_runs.csv'}, {out / 'train_profiles.csv'}, {out / 'claims.csv'}, "
          f"{out / 'train.md'} and {len(figs)} figures")
    return 0


def _join_ranks(args: argparse.Namespace):
    """(world, log) of a `train` under torchrun: --ddp trains each run on every rank, else the
    ranks split the grid; rank 0 speaks (other ranks of a split grid print their own runs'
    lines, marked). Outside torchrun: the world of one, and --ddp is refused."""
    from analysis.distributed import SINGLE, join, launched_by_torchrun
    together = args.ddp or args.fsdp  # every run on every rank
    if args.ddp and args.fsdp:
        raise ValueError("--ddp and --fsdp are two ways to train a run on every rank: choose one")
    if not (together or launched_by_torchrun()):
        return SINGLE, progress.say
    world = join(args.device, "--fsdp" if args.fsdp else "--ddp" if args.ddp
                 else "a grid across ranks")
    if world.main:
        return world, progress.say
    progress.configure(quiet=progress.is_quiet() or together, bars=False)  # one terminal: no bars
    return world, lambda message: progress.say(f"[rank {world.rank}] {message}")


def _grid_report(out, runs, profiles, fmt: str, unigram_bpb: float) -> list:
    """Figures, claims.csv and train.md of a training grid folder (``unigram_bpb``: the corpus's
    byte entropy, the plateau a stalled run sits on); the figure paths."""
    from analysis.training.claims import check_training_claims
    from analysis.training.grid import curves
    from figures.report import to_markdown
    from figures.train import (loss_curves, loss_vs_depth, profiles_init_vs_end, run_loss_figure,
                               training_blocks, update_sizes)
    every = curves(out)
    for run, curve in every.groupby("run"):  # each run's own figure, redrawn when it changed
        folder = out / "runs" / run
        figure = (folder / "loss").with_suffix(f".{fmt}")
        if not figure.exists() or figure.stat().st_mtime < (folder / "result.json").stat().st_mtime:
            run_loss_figure(curve, figure, fmt, unigram_bpb)
    figs = [loss_vs_depth(runs, out / "figures" / "train_loss_vs_depth", fmt),
            loss_curves(every, out / "figures" / "train_loss_curves", fmt, unigram_bpb)]
    if len(profiles):
        kinds = profiles["moe"].unique()
        kind = "dense" if "dense" in kinds else kinds[0]
        deepest = int(profiles[profiles["moe"] == kind]["depth"].max())
        figs.append(profiles_init_vs_end(profiles, out / "figures" / "train_profiles", deepest, fmt,
                                         moe=kind))
        if (profiles["metric"] == "update_size").any():
            figs.append(update_sizes(profiles, out / "figures" / "train_update_sizes", deepest, fmt,
                                     moe=kind))
    claims = check_training_claims(runs, profiles, unigram_bpb)
    claims.to_csv(out / "claims.csv", index=False)
    (out / "train.md").write_text(to_markdown(training_blocks(runs, figs, out, claims)))
    return figs


def _cmd_campaign(args: argparse.Namespace) -> int:
    import pandas as pd

    from analysis.testbed.corpus import load_corpus
    from analysis.training.campaign import CampaignConfig, remaining, run_campaign, with_stages
    from analysis.training.grid import collect
    cfg = with_stages(CampaignConfig(device=args.device, tiny=args.tiny,
                                     compile=args.compile is not False,
                                     compile_backend=args.compile_backend, parallel=args.parallel,
                                     tokens=args.tokens, corpus=args.corpus), args.stages)
    cfg.validate()
    _check_format(args.format)
    out = _writable_dir(args.out or "runs/campaign")
    args.out = str(out)  # what an interruption names, with the command that resumes
    print(f"sigprop campaign → {out} ({'tiny, ' if cfg.tiny else ''}{cfg.device}, time limit "
          f"{args.time_limit:g} s)")
    state = run_campaign(cfg, out, time_limit=args.time_limit)
    unigram = None
    for name in ("dense", "moe"):
        if (out / name / "train_runs.csv").exists():
            runs, profiles = collect(out / name)
            if len(runs):
                unigram = unigram or load_corpus(cfg.corpus).unigram_bits()
                _grid_report(out / name, runs, profiles, args.format, unigram)
    init = out / "init"
    if (init / "init_profiles.csv").exists() and (init / "theory.json").exists():
        from analysis.init.pipeline import load_tables
        tables, _, theory = load_tables(init)
        _write_report(tables, theory, init, args.format)
    from figures.campaign import write_campaign_report
    tables = {n: pd.read_csv(out / f"{n}.csv") for n in ("probe_overhead", "throughput")
              if (out / f"{n}.csv").exists()}
    run_columns = ["scheme", "depth", "moe", "status", "tokens", "final_val_bpb", "divergence_step",
                   "tokens_per_s", "mfu"]
    for name in ("dense", "moe"):
        if (out / name / "train_runs.csv").exists():
            tables[name] = pd.read_csv(out / name / "train_runs.csv")[run_columns]
    if (init / "targets.csv").exists():
        tables["init_targets"] = pd.read_csv(init / "targets.csv")
    report = write_campaign_report(out, state, tables)
    bundle = _bundle(out)
    todo = remaining(state, cfg)
    print(f"wrote {report} and {bundle} ({bundle.stat().st_size / 1e6:.2f} MB)")
    if todo:
        print("remaining: " + ", ".join(f"{s} (~{m:.1f} min)" for s, m in todo)
              + f"; about {sum(m for _, m in todo):.1f} minutes. Run the same command again.")
    else:
        print("campaign complete")
    return 0


def _cmd_coordcheck(args: argparse.Namespace) -> int:
    from analysis.testbed.corpus import load_corpus
    import sympy

    from analysis.width.coordcheck import PRESETS, claims, run, slopes
    from theory.step import update_law
    from figures.report import write_report
    from figures.width import coordcheck_figure
    cfg = _preset_with(
        PRESETS[args.preset], schemes=_parse_names(args.schemes),
        parametrizations=_parse_names(args.parametrizations), optimizer=args.optimizer,
        lr=args.lr, widths=args.widths and tuple(_parse_ints(args.widths, "--widths")),
        base_width=args.base_width, depth=args.depth, heads=args.heads, seq_len=args.seq_len,
        batch_size=args.batch, steps=args.steps,
        seeds=args.seeds and tuple(_parse_ints(args.seeds, "--seeds")), device=args.device,
        corpus=args.corpus)
    cfg.validate()
    _check_format(args.format)
    corpus = load_corpus(cfg.corpus)  # a bad corpus is refused before any folder is made
    out = _writable_dir(args.out or "runs/coordcheck")
    print(f"sigprop coordcheck → {out} ({len(cfg.schemes)} schemes × {len(cfg.parametrizations)} "
          f"parametrizations × {len(cfg.widths)} widths × {len(cfg.seeds)} seeds, "
          f"{cfg.optimizer} lr {cfg.step_config.lr:g}, {cfg.steps} steps)")
    raw = run(cfg, corpus)
    sl = slopes(raw)
    cl = claims(sl)
    raw.to_csv(out / "coordcheck.csv", index=False)
    sl.to_csv(out / "slopes.csv", index=False)
    cl.to_csv(out / "claims.csv", index=False)
    figs = [coordcheck_figure(raw, s, m, out / "figures" / f"coordcheck_{s}_{m}", args.format)
            for s in cfg.schemes for m in ("change_rms", "update")]
    laws = [(p, sympy.latex(update_law(cfg.optimizer, p))) for p in cfg.parametrizations]
    blocks = [("h1", "sigprop coordinate check"),
              ("p", f"{cfg.optimizer}, lr {cfg.step_config.lr:g}, widths "
                    f"{', '.join(map(str, cfg.widths))}, depth {cfg.depth}, {cfg.steps} steps, "
                    f"seeds {', '.join(map(str, cfg.seeds))}. One-step theory (theory/step.py): "
                    "a block's relative update r grows with width d as"),
              *[("math", rf"\text{{{p}: }} r = {law}") for p, law in laws],
              ("h2", "Claims"), ("table", cl[["claim", "status", "evidence"]]),
              ("h2", "Figures"), *[("img", str(f.relative_to(out))) for f in figs]]
    write_report(blocks, out, "sigprop coordinate check")
    for r in cl.itertuples():
        print(f"  {r.status:5}  {r.claim}: {r.evidence}")
    print(f"wrote {out / 'coordcheck.csv'}, slopes.csv, claims.csv, report.md and {len(figs)} figures")
    return 0


def _cmd_lrsweep(args: argparse.Namespace) -> int:
    from analysis.testbed.corpus import load_corpus
    from analysis.width.lrsweep import PRESETS, claims, curves_table, optima, run
    from figures.report import write_report
    from figures.width import lrsweep_figure
    cfg = _preset_with(
        PRESETS[args.preset], schemes=_parse_names(args.schemes),
        parametrizations=_parse_names(args.parametrizations), optimizer=args.optimizer,
        lrs=args.lrs and tuple(_parse_floats(args.lrs, "--lrs")),
        widths=args.widths and tuple(_parse_ints(args.widths, "--widths")),
        depths=args.depths and tuple(_parse_ints(args.depths, "--depths")), heads=args.heads,
        seq_len=args.seq_len, batch_size=args.batch, steps=args.steps,
        seeds=args.seeds and tuple(_parse_ints(args.seeds, "--seeds")), device=args.device,
        corpus=args.corpus)
    cfg.validate()
    _check_format(args.format)
    corpus = load_corpus(cfg.corpus)  # a bad corpus is refused before any folder is made
    out = _writable_dir(args.out or "runs/lrsweep")
    args.out = str(out)  # what an interruption names, with the command that resumes
    print(f"sigprop lrsweep → {out} ({len(cfg.runs())} curves × {len(cfg.lrs)} lrs × "
          f"{len(cfg.seeds)} seeds, {cfg.optimizer}, {cfg.steps} steps each)")
    raw = run(cfg, corpus, out=out)
    # a curve whose best loss sits on the byte-frequency plateau stalled (as `train` calls it)
    plateau = 0.95 * corpus.unigram_bits() * math.log(2)
    table, best = curves_table(raw), optima(raw, plateau)
    cl = claims(best, cfg)
    best.to_csv(out / "optima.csv", index=False)
    cl.to_csv(out / "claims.csv", index=False)
    p0, w0, d0 = cfg.parametrizations[0], cfg.widths[0], cfg.depths[0]
    figs = [lrsweep_figure(table[(table["parametrization"] == p0) & (table["width"] == w0)],
                           "depth", out / "figures" / "lr_vs_depth", args.format),
            lrsweep_figure(table[table["depth"] == d0], "width", out / "figures" / "lr_vs_width",
                           args.format)]
    blocks = [("h1", "sigprop learning-rate sweep"),
              ("p", f"{cfg.optimizer}, {cfg.steps} steps (warmup {cfg.warmup_frac:g}, cosine), "
                    f"batch {cfg.batch_size} × {cfg.seq_len}, seeds {', '.join(map(str, cfg.seeds))}"),
              ("h2", "Claims"), ("table", cl[["claim", "status", "evidence"]]),
              ("h2", "Optimal learning rates"), ("table", best),
              ("h2", "Figures"), *[("img", str(f.relative_to(out))) for f in figs]]
    write_report(blocks, out, "sigprop learning-rate sweep")
    for r in cl.itertuples():
        print(f"  {r.status:8}  {r.claim}: {r.evidence}")
    print(f"training {raw['train_s'].sum():.0f} s, validation {raw['eval_s'].sum():.0f} s")
    print(f"wrote {out / 'lrsweep.csv'}, optima.csv, claims.csv, report.md and {len(figs)} figures")
    return 0


def _parse_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers, got '{text}'") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{flag} takes finite numbers > 0, got '{text}'")
    return values


def _preset_with(preset, **changes):
    """The preset dataclass with every option the user gave (not None) in place of its value."""
    from dataclasses import replace
    return replace(preset, **{k: v for k, v in changes.items() if v is not None})


def _parse_names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated list of names (None stays None: the preset's)."""
    if text is None:
        return None
    names = tuple(n for n in text.split(",") if n)
    if not names:
        raise ValueError(f"an empty list: '{text}'")
    return names


def _bundle(out):
    """The campaign's small results (CSVs, figures, reports, no checkpoints) as one tarball."""
    import tarfile
    path = out / "campaign-bundle.tar.gz"
    keep = {".csv", ".png", ".svg", ".pdf", ".md", ".html", ".json"}
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(out.rglob("*")):
            rel = f.relative_to(out)
            if f.is_file() and f.suffix in keep and "runs" not in rel.parts[:-1] and f != path:
                tar.add(f, arcname=str(rel))
    return path


def _parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got '{text}'") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values


@contextlib.contextmanager
def _removed_if_empty(out):
    """On any failure inside, remove ``out`` if nothing was written there (no empty folder left)."""
    try:
        yield
    except BaseException:
        if not any(out.iterdir()):
            out.rmdir()
        raise


def _writable_dir(path: str | None):
    from analysis.folders import writable_dir
    return writable_dir(path)


def _parse_moe(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 2
    try:
        experts, top_k = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--moe takes E,k (experts, top-k), got '{text}'") from None
    if experts < 1:  # E = 0 would silently train the dense model
        raise ValueError(f"--moe E,k needs E >= 1 experts, got '{text}' (leave --moe out for a "
                         "dense FFN)")
    return experts, top_k


def _parse_params(items: list[str]) -> dict[str, float]:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ValueError(f"--param takes NAME=NUMBER, got '{item}'")
        if not math.isfinite(number):
            raise ValueError(f"--param {name} must be a finite number, got '{value}'")
        if name in params:
            raise ValueError(f"--param {name} is given twice ({params[name]:g} and {number:g})")
        params[name] = number
    return params


def _finite(text: str) -> float:
    """argparse type: a finite float (NaN and inf are refused, not silently propagated)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got '{text}'")
    return value


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``error: …`` (exit 2), like every other
    refusal of bad input; the usage is one ``--help`` away."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu", choices=["cpu", "gpu"],
                   help="cpu: width 256, depths 2…256, 3 seeds; gpu: width 1024, depths 2…1024 on "
                        "cuda (default: cpu)")
    p.add_argument("--schemes", help="comma-separated schemes (default: pre,post,span,deepnorm)")
    p.add_argument("--depths", help="comma-separated increasing depths (default: the preset's)")
    p.add_argument("--seeds", help="comma-separated init seeds (default: 0,1,2)")
    p.add_argument("--width", type=int, help="model width (default: the preset's)")
    p.add_argument("--heads", type=int, help="attention heads (default: the preset's)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--batch", type=int, help="sequences per batch (default: the preset's)")
    p.add_argument("--batches", type=int, help="batches per seed (default: 2)")
    p.add_argument("--corpus", help="text file or folder (default: the Python standard library)")
    p.add_argument("--device", help="cpu or cuda (default: the preset's)")
    p.add_argument("--out", help="output folder (default: runs/<timestamp>)")
    p.add_argument("--format", default="png", help="figure format: png, svg or pdf (default: png)")
    _add_compile_arg(p, "probed models run under torch.compile, the probe entered first "
                        "(default: off; a fresh compile per model)")


def _add_width_args(p: argparse.ArgumentParser, command: str, parametrizations: str) -> None:
    """What `coordcheck` and `lrsweep` share: schemes, parametrizations, optimizer, shape, seeds,
    corpus, device and output."""
    p.add_argument("--schemes", help="comma-separated schemes (default: the preset's)")
    p.add_argument("--parametrizations", help=f"comma-separated: standard, mup, mup-nomult; "
                                              f"{parametrizations}")
    p.add_argument("--optimizer", choices=["adam", "sgd"], help="default: adam")
    p.add_argument("--heads", type=int, help="attention heads (default: the preset's)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--batch", type=int, help="sequences per step (default: the preset's)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the preset's)")
    p.add_argument("--corpus", help="text file or folder (default: the Python standard library)")
    p.add_argument("--device", help="cpu or cuda (default: the preset's)")
    p.add_argument("--out", help=f"output folder (default: runs/{command})")
    p.add_argument("--format", default="png", help="figure format: png, svg or pdf (default: png)")


def _add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or progress lines; results and errors still print")


def _add_compile_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help=what)


def _add_measurement_args(p: argparse.ArgumentParser, command: str) -> None:
    """How `diagnose` and `atlas` measure a checkpoint: text, sample sizes, device, output."""
    from analysis.diagnose.diagnosis import SKIP_POSITIONS
    p.add_argument("--text", help="text file to run through the model (default: the corpus's "
                                  "validation split)")
    p.add_argument("--sequences", type=int, default=64,
                   help="at most this many sequences run forward (default: 64; see --tolerance)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="stop sampling once every block's statistics have a standard error within "
                        "this fraction of their value (default: 0.05; 0: run every sequence)")
    p.add_argument("--grad-sequences", type=int, default=16,
                   help="of those, how many also run backward for the gradient profile (default: 16)")
    p.add_argument("--seq-len", type=int, default=256,
                   help="tokens per sequence, cut to the model's maximum (default: 256)")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--skip-sequences", type=int, default=4,
                   help="sequences for the skip test, each block replaced by the identity in turn "
                        "(default: 4; 0: off)")
    p.add_argument("--skip-positions", type=int, default=SKIP_POSITIONS,
                   help=f"positions per sequence whose loss the skip test takes, a sample of its own per "
                        f"sequence (default: {SKIP_POSITIONS}; 0: every position)")
    p.add_argument("--init-sequences", type=int, default=8,
                   help="sequences run through the same architecture re-initialized, to show what "
                        "training changed and to compare the init theory (default: 8; 0: off)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations: float32, or bfloat16 for half the memory, its "
                        "rounding noted in the report (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--out", help=f"output folder (default: runs/{command}-<timestamp>)")
    p.add_argument("--format", default="png", help="figure format: png, svg or pdf (default: png)")


def _text_for(pairs: list[str] | None) -> dict[str, str]:
    """``--text-for PATH=FILE`` pairs as {path: file}; each file must exist."""
    out = {}
    for pair in pairs or []:
        path, sep, text = pair.rpartition("=")
        if not sep or not path or not text:
            raise ValueError(f"--text-for takes PATH=FILE, got {pair!r}")
        if not Path(text).is_file():
            raise ValueError(f"--text-for {pair}: {text} is not a file")
        out[path] = text
    return out


def _measurement_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of analysis.diagnose.diagnosis.diagnose that _add_measurement_args set."""
    return dict(text=args.text, sequences=args.sequences, tolerance=args.tolerance,
                grad_sequences=args.grad_sequences, seq_len=args.seq_len, batch=args.batch,
                skip_sequences=args.skip_sequences, skip_positions=args.skip_positions,
                init_sequences=args.init_sequences, dtype=args.dtype, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from analysis.training.train import TrainConfig
    parser = _Parser(
        prog="run_analysis.py",
        description="sigprop: signal propagation in deep Transformers, theory against measurement. "
                    "With no command (or only sweep options, e.g. --preset gpu) it runs the main "
                    "analysis, `sweep`, at CPU size into runs/<timestamp>/.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("schemes", help="list the registered normalization schemes")
    p.add_argument("--scheme", help="show only this scheme")
    p.set_defaults(func=_cmd_schemes)

    p = sub.add_parser("model", help="build the testbed for a scheme and run one forward/backward "
                                     "batch from the corpus")
    p.add_argument("--scheme", default="span", help="registered scheme (default: span)")
    p.add_argument("--depth", type=int, default=12, help="number of blocks L (default: 12)")
    p.add_argument("--width", type=int, default=256, help="model width d (default: 256)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    p.add_argument("--ffn", default="gelu", help="gelu, relu or swiglu (default: gelu)")
    p.add_argument("--norm", default="layernorm", help="layernorm or rmsnorm (default: layernorm)")
    p.add_argument("--moe", metavar="E,k", help="mixture of E experts, top-k routing (default: dense)")
    p.add_argument("--sigma", type=_finite, default=1.0, help="init: weights ~ N(0, σ²/fan_in) (default: 1)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override a scheme parameter, e.g. --param beta=0.1 (repeatable)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float64 (default: float32)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--batch", type=int, default=8, help="sequences in the batch (default: 8)")
    p.add_argument("--corpus", help="text file or folder (default: the Python standard library)")
    p.add_argument("--seed", type=int, default=0, help="init and batch seed (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.set_defaults(func=_cmd_model)

    p = sub.add_parser("sweep", help="init sweep: measure schemes × depths × seeds, compare with "
                                     "theory, write CSVs, figures and the report")
    _add_sweep_args(p)
    _add_quiet_arg(p)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("report", help="rebuild the report of a run folder from its CSVs")
    p.add_argument("run_dir", help="a folder written by the analysis or `sweep`")
    p.add_argument("--format", default="png", help="figure format: png, svg or pdf (default: png)")
    p.add_argument("--theory", action="store_true",
                   help="recompute both theories' predictions and the derived claims with this "
                        "code from the stored measurements (their inputs q0, rho0, rho_g are in "
                        "init_profiles.csv), then compare; init_profiles.csv is rewritten")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("train", help="train a grid of schemes × depths with probes; write CSVs, "
                                     "figures and train.md")
    p.add_argument("--schemes", help="comma-separated schemes (default: pre,post,span,deepnorm)")
    p.add_argument("--depths", help="comma-separated depths (default: 2,4 on cpu; 6,...,192 on cuda)")
    p.add_argument("--width", type=int, help="model width (default: 64 on cpu, 256 on cuda)")
    p.add_argument("--heads", type=int, help="attention heads (default: 4)")
    p.add_argument("--seq-len", type=int, help="context length (default: 64 on cpu, 256 on cuda)")
    p.add_argument("--batch", type=int, help="sequences per step (default: 8 on cpu, 32 on cuda)")
    p.add_argument("--tokens", type=int, help="token budget per run (default: 32768 on cpu, 2e7 on cuda)")
    p.add_argument("--lr", type=_finite, help="peak learning rate (default: 2e-3 on cpu, 1e-3 on cuda)")
    p.add_argument("--grad-clip", type=_finite,
                   help="clip the gradient norm to this value; 0 is off (default: off)")
    p.add_argument("--moe", metavar="E,k", help="MoE FFN: E experts, top-k (default: dense)")
    p.add_argument("--ffn", default="gelu", help="gelu, relu or swiglu (default: gelu)")
    p.add_argument("--norm", default="layernorm", help="layernorm or rmsnorm (default: layernorm)")
    p.add_argument("--corpus", help="text file or folder (default: the Python standard library)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--seeds", default="0",
                   help="comma-separated init and data seeds, a run each (default: 0)")
    p.add_argument("--tie-embeddings", action="store_true",
                   help="the LM head reuses the token embedding, as nanoGPT (default: separate)")
    p.add_argument("--dropout", type=_finite, default=0.0,
                   help="dropout on attention, sublayer outputs and the embedding (default: 0)")
    p.add_argument("--parametrization", default="standard", choices=["standard", "mup"],
                   help="standard, or mup: µP's width scaling of init, multipliers and per-layer "
                        "Adam learning rates (README, Beyond initialization) (default: standard)")
    p.add_argument("--base-width", type=int, default=64,
                   help="with --parametrization mup, the width at which it equals standard "
                        "(default: 64)")
    tc = TrainConfig()  # the defaults, stated once
    p.add_argument("--beta1", type=_finite, default=tc.beta1, help=f"Adam β1 (default: {tc.beta1})")
    p.add_argument("--beta2", type=_finite, default=tc.beta2, help=f"Adam β2 (default: {tc.beta2})")
    p.add_argument("--weight-decay", type=_finite, default=tc.weight_decay,
                   help=f"AdamW weight decay, on tensors of dim >= 2 only (default: {tc.weight_decay})")
    p.add_argument("--decay-embeddings", action=argparse.BooleanOptionalAction,
                   default=tc.decay_embeddings,
                   help="also decay the token and position embeddings; --no-decay-embeddings "
                        "decays the block matrices and an untied head only (default: decay them)")
    p.add_argument("--warmup", type=_finite, default=tc.warmup_frac,
                   help=f"linear warmup, as a fraction of the steps (default: {tc.warmup_frac})")
    p.add_argument("--min-lr-ratio", type=_finite, default=tc.min_lr_ratio,
                   help=f"the cosine decays to lr × this (default: {tc.min_lr_ratio})")
    p.add_argument("--stall-fraction", type=_finite, default=tc.stall_fraction,
                   help="a run is 'stalled' if its training loss stays above this × the corpus's "
                        f"unigram entropy after --stall-share of its steps (default: {tc.stall_fraction})")
    p.add_argument("--stall-share", type=_finite, default=tc.stall_share,
                   help=f"the share of the steps after which a stall is judged (default: {tc.stall_share})")
    p.add_argument("--log-every", type=int, default=tc.log_every,
                   help=f"a train_log.csv row (smoothed training loss) per this many steps "
                        f"(default: {tc.log_every})")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files in each run folder (needs the "
                        "'tensorboard' extra: pip install -e '.[tensorboard]')")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs trained at once in worker processes, sharing the device (default: 1)")
    p.add_argument("--ddp", action="store_true",
                   help="under torchrun: train each run on every rank (DistributedDataParallel); "
                        "without it, torchrun's ranks split the grid (README, Distributed)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: as --ddp, with each run's model sharded over the ranks "
                        "(torch's fully_shard), for models that do not fit one device")
    p.add_argument("--out", help="output folder; an existing grid there resumes "
                                 "(default: runs/<timestamp>)")
    p.add_argument("--format", default="png", help="figure format: png, svg or pdf (default: png)")
    _add_compile_arg(p, "train under torch.compile, block by block (default: on cuda only)")
    _add_quiet_arg(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("campaign", help="the GPU campaign: dense grid, probe overhead, throughput, "
                                        "MoE grid, init sweep; resumable, stops before --time-limit")
    p.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    p.add_argument("--out", help="campaign folder; a campaign there resumes (default: runs/campaign)")
    p.add_argument("--time-limit", type=_finite, default=540.0,
                   help="seconds this invocation may take; it stops cleanly before (default: 540)")
    p.add_argument("--stages", help="comma-separated subset of dense_grid, probe_overhead, "
                                    "throughput, moe_grid, init_sweep (default: all, in that order)")
    p.add_argument("--tiny", action="store_true",
                   help="toy sizes: the same code path as a CPU rehearsal, minutes")
    p.add_argument("--tokens", type=int, help="tokens per training run (default: 4e6; tiny: 1536)")
    p.add_argument("--parallel", type=int, default=1,
                   help="training runs side by side on the device (default: 1)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default: inductor; aot_eager traces without codegen)")
    p.add_argument("--corpus", help="text file or folder (default: the Python standard library)")
    p.add_argument("--format", default="png", help="figure format: png, svg or pdf (default: png)")
    _add_compile_arg(p, "train and benchmark under torch.compile (default: on)")
    _add_quiet_arg(p)
    p.set_defaults(func=_cmd_campaign)

    p = sub.add_parser("theory", help="derive every scheme's moment recurrences, closed forms, "
                                      "asymptotic orders and claims; write theory.json, claims.csv")
    p.add_argument("--scheme", help="only this scheme (default: every registered scheme)")
    p.add_argument("--latex", action="store_true", help="print recurrences and closed forms as LaTeX")
    p.add_argument("--out", help="output folder (default: runs/theory)")
    p.set_defaults(func=lambda a: __import__("analysis.init.derivations", fromlist=["run"]).run(a))

    p = sub.add_parser("bench", help="print speed figures and the component maps' accuracy "
                                     "(see README, Benchmarks)")
    p.add_argument("--theory", action="store_true", help="time deriving and evaluating the recurrences")
    p.add_argument("--probes", action="store_true", help="time a probed training step against an unprobed one")
    p.add_argument("--shape", choices=["small", "gpt2", "tiny"],
                   help="model shape for --probes and --train: small (d128 L4 T128), tiny (d32 L2 "
                        "T32, the campaign's rehearsal) or gpt2 "
                        "(d768 L12 T1024, for a GPU) (default: gpt2 on cuda, small on cpu)")
    p.add_argument("--train", action="store_true",
                   help="time training steps (tokens/s, MFU) and a small depth grid run in parallel")
    p.add_argument("--parallel", type=int, default=2,
                   help="runs at once in the --train grid comparison (default: 2)")
    p.add_argument("--diagnose", action="store_true",
                   help="time `diagnose` with its defaults on the all-MiniLM-L6-v2 and SmolLM2-135M "
                        "shapes and a model whose LM head costs more than its blocks, each stage beside "
                        "its floor, with its peak memory")
    p.add_argument("--diagnose-path", action="append", metavar="PATH",
                   help="with --diagnose: also a real checkpoint (e.g. a released GGUF; repeatable)")
    p.add_argument("--components", action="store_true",
                   help="relative error of every component moment map (linear, norms, MLPs, "
                        "attention, MoE) against Monte Carlo with the testbed's modules at width "
                        "1024: forward second moment, output rho, gradient power (CPU, < 1 min)")
    p.add_argument("--width", action="store_true",
                   help="time the default `coordcheck` (target ≤ 3 min) and `lrsweep` (≤ 10 min) "
                        "against their floors, the plain steps of the same models (CPU, ~13 min)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    _add_compile_arg(p, "--probes: also time compiled copies (default: on); --train: train "
                        "compiled (default: on cuda only)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("coordcheck", help="coordinate check (as microsoft/mup's): coordinate sizes "
                                          "over the first steps against width, per scheme and "
                                          "parametrization, with the one-step theory's slopes")
    p.add_argument("--preset", default="cpu", choices=["cpu", "gpu"],
                   help="cpu: pre,span × standard,mup, widths 64…1024, depth 4, 3 steps, 2 seeds "
                        "(about 1½ min on 2 cores); gpu: pre,post,span, widths 128…4096, depth 8, "
                        "5 steps, 3 seeds on cuda")
    _add_width_args(p, "coordcheck", "the width sweep's (default: standard,mup; mup-nomult is µP "
                                     "without the readout multiplier, deliberately broken)")
    p.add_argument("--lr", type=_finite, help="base learning rate (default: adam 1e-3, sgd 0.05); "
                                              "µP's multipliers apply on top")
    p.add_argument("--widths", help="comma-separated widths (default: the preset's)")
    p.add_argument("--base-width", type=int, help="the width at which µP equals standard "
                                                   "(default: the smallest width of the preset)")
    p.add_argument("--depth", type=int, help="blocks (default: the preset's)")
    p.add_argument("--steps", type=int, help="optimizer steps measured (default: the preset's)")
    _add_quiet_arg(p)
    p.set_defaults(func=_cmd_coordcheck)

    p = sub.add_parser("lrsweep", help="learning-rate sweeps: loss after N steps over an lr grid "
                                       "at several depths and widths per scheme, the optimal lr "
                                       "of each, and transfer claims; resumes in its --out")
    p.add_argument("--preset", default="cpu", choices=["cpu", "gpu"],
                   help="cpu: pre,span; depths 4…32 at width 64; widths 64…256 at depth 4 under "
                        "standard and mup; 7 lrs, 50 steps, 2 seeds (about 9 min on 2 cores); gpu: "
                        "pre,post,span, widths 128…1024, depths 6…96, 300 steps on cuda")
    _add_width_args(p, "lrsweep", "for the width sweep; the depth sweep uses the first "
                                  "(default: standard,mup)")
    p.add_argument("--lrs", help="comma-separated increasing learning rates, log-spaced "
                                 "(default: 5e-4 … 3.2e-2, factor 2)")
    p.add_argument("--widths", help="comma-separated widths; the first is the depth sweep's and "
                                    "µP's base width (default: 64,128,256)")
    p.add_argument("--depths", help="comma-separated depths; the first is the width sweep's "
                                    "(default: 4,8,16,32)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: the preset's)")
    _add_quiet_arg(p)
    p.set_defaults(func=_cmd_lrsweep)

    p = sub.add_parser("diagnose", help="collapse diagnosis of a checkpoint: sigprop run, local "
                                        "Hugging Face folder, or state_dict + --config")
    p.add_argument("path", help="checkpoint.pt / run folder, a Hugging Face model folder, or a "
                                "state_dict file (.safetensors, .pt, .bin) with --config")
    p.add_argument("--config", help="JSON config for a bare state_dict: a sigprop ModelConfig dict "
                                    "or a Hugging Face config.json")
    p.add_argument("--tokenizer", help="folder holding the tokenizer to use (default: the model "
                                       "folder's own; for a bare state_dict, the one beside the "
                                       "weights or the config; else bytes)")
    _add_measurement_args(p, "diagnose")
    p.add_argument("--fail-on", choices=("warnings", "collapsed", "unusable"),
                   help="exit with status 1 when the verdict is this bad or worse (for automation)")
    p.add_argument("--blocks", help="module path of the residual blocks' ModuleList, when they are "
                                    "not found (as named in model.named_modules())")
    _add_quiet_arg(p)
    p.set_defaults(func=_cmd_diagnose)

    p = sub.add_parser("sample", help="text generated from a checkpoint (as nanoGPT's sample.py): "
                                      "sigprop run, Hugging Face folder, state_dict + --config, GGUF")
    p.add_argument("path", help="checkpoint.pt / run folder, a Hugging Face model folder, a .gguf "
                                "file, or a state_dict file with --config")
    p.add_argument("--prompt", default="def ",
                   help="text to continue (default: 'def ', for the default Python-source corpus; "
                        "'' starts from a newline byte or the model's beginning-of-sequence token)")
    p.add_argument("--tokens", type=int, default=200, help="new tokens to generate (default: 200)")
    p.add_argument("--temperature", type=_finite, default=0.8,
                   help="divides the logits; 0: greedy, the most likely token (default: 0.8)")
    p.add_argument("--top-k", type=int, default=40,
                   help="draw only among the k most likely tokens (default: 40; 0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--config", help="JSON config for a bare state_dict: a sigprop ModelConfig dict "
                                    "or a Hugging Face config.json")
    p.add_argument("--tokenizer", help="folder holding the tokenizer to use (default: the model "
                                       "folder's own; else bytes)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("atlas", help="several checkpoints diagnosed alike, drawn against relative "
                                     "depth, with claims about trained models")
    p.add_argument("paths", nargs="+", help="checkpoints: sigprop runs, Hugging Face folders, GGUF files")
    _add_measurement_args(p, "atlas")
    p.add_argument("--text-for", action="append", metavar="PATH=FILE",
                   help="this checkpoint reads FILE instead of --text (prose for English models, code "
                        "for code models; repeatable)")
    _add_quiet_arg(p)
    p.set_defaults(func=_cmd_atlas)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for unusable input)."""
    import torch
    # Deep post-norm backward makes denormal gradients, which slow CPU matmuls ~5×; flushing them
    # to 0 changes no statistic we report. Set before torch starts its threads, which inherit it.
    torch.set_flush_denormal(True)
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["sweep", *argv]  # the main job: `run_analysis.py [sweep options]`
    args = parser.parse_args(argv)
    progress.configure(quiet=getattr(args, "quiet", False))
    try:
        if args.command != "diagnose" and getattr(args, "device", None):
            from analysis.device import resolve_device
            resolve_device(args.device)  # every command: a bad device in one line, before work
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder that cannot be read or written
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(_interrupted(args, argv, e), file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:
        out = getattr(args, "out", None)
        kept = f"; what finished is kept in {out}" if out else ""
        print(f"error: out of memory on {getattr(args, 'device', 'the device')} (the estimate "
              f"before the run was too low){kept}: lower --batch, --seq-len or the deepest "
              "depth", file=sys.stderr)
        return 2
    except (torch.distributed.DistError, RuntimeError) as e:  # a rank failed or stopped answering
        transport = any(w in str(e) for w in ("gloo", "NCCL", "Connection closed by peer"))
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and (isinstance(e, torch.distributed.DistError) or transport)):
            raise  # a bug, not a lost rank: its traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"error: a collective across torchrun's ranks failed ({first}); another rank "
              "failed or stopped answering: see its own error line", file=sys.stderr)
        return 1


RESUMABLE = ("sweep", "train", "campaign", "lrsweep")  # commands that keep what finished and resume


def _interrupted(args: argparse.Namespace, argv: list[str], e: KeyboardInterrupt) -> str:
    """The one line for Ctrl-C: what was kept (the message of analysis.budget.Interrupted, where
    the work said) and the exact command that resumes, naming the output folder."""
    detail = str(e)
    out = getattr(args, "out", None)
    if args.command not in RESUMABLE or not out:
        return "error: interrupted" + (f" ({detail})" if detail else "")
    has_out = any(a == "--out" or a.startswith("--out=") for a in argv)
    resume = shlex.join(["python", "run_analysis.py", *argv, *([] if has_out else ["--out", out])])
    kept = detail or "what finished"
    return f"error: interrupted; kept in {out}: {kept}; resume with: {resume}"


if __name__ == "__main__":
    sys.exit(main())
