"""the GPU campaign: dense grid, probe overhead, throughput, MoE grid, init sweep; resumable, stops before --time-limit"""

from __future__ import annotations

import argparse

from analysis.cli import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    from analysis.training.campaign import CampaignConfig
    cfg = CampaignConfig()
    options.add(p, "device", config=cfg)
    options.add(p, "out", help="campaign folder; a campaign there resumes (default: runs/campaign)")
    options.add(p, "time_limit", default=540.0, shown="540")
    options.add(p, "stages", "tiny")
    options.add(p, "tokens", help="tokens per training run (default: 4e6; tiny: 1536)")
    options.add(p, "parallel", config=cfg,
                help="training runs side by side on the device (default: {default})")
    options.add(p, "compile_backend", config=cfg)
    options.add(p, "corpus")
    options.add(p, "format", default="png")
    options.add(p, "compile", help="train and benchmark under torch.compile (default: on)")
    options.add(p, "quiet")


def run(args: argparse.Namespace) -> int:
    from analysis.cli.sweep import write_report
    from analysis.cli.train import grid_report
    from analysis.testbed.corpus import load_corpus
    from analysis.training.campaign import CampaignConfig, remaining, run_campaign
    from analysis.training.grid import collect
    cfg = options.configure(CampaignConfig(), args)
    cfg.validate()
    options.check_format(args.format)
    if cfg.corpus:  # a bad corpus is refused before any folder is made (the default is fine)
        load_corpus(cfg.corpus)
    out = options.claim(args, cfg, grows=("stages",), default="runs/campaign")
    print(f"sigprop campaign → {out} ({'tiny, ' if cfg.tiny else ''}{cfg.device}, time limit "
          f"{args.time_limit:g} s)")
    state = run_campaign(cfg, out, time_limit=args.time_limit)
    unigram = None
    for folder in [out / "dense", out / "moe", *sorted((out / "readings").glob("*"))]:
        if (folder / "train_runs.csv").exists():
            runs, profiles = collect(folder)
            if len(runs):
                unigram = unigram or load_corpus(cfg.corpus).unigram_bits()
                grid_report(folder, runs, profiles, args.format, unigram)
    init = out / "init"
    if (init / "init_profiles.csv").exists() and (init / "theory.json").exists():
        from analysis.init.pipeline import load_tables
        tables, _, theory = load_tables(init)
        write_report(tables, theory, init, args.format)
    report = write_campaign_report(out, state)
    bundle_path = bundle(out)
    todo = remaining(state, cfg)
    print(f"wrote {report} and {bundle_path} ({bundle_path.stat().st_size / 1e6:.2f} MB)")
    if todo:
        print("remaining: " + ", ".join(f"{s} (~{m:.1f} min)" for s, m in todo)
              + f"; about {sum(m for _, m in todo):.1f} minutes. Resume with: "
              + resume_command(args, cfg, out))
    else:
        print("campaign complete")
    return 0


def resume_command(args: argparse.Namespace, cfg, out) -> str:
    """The command that resumes this campaign in ``out``: its settings (the folder refuses
    others) and this invocation's time limit and figure format."""
    import shlex

    from analysis.cli import program
    from analysis.training.campaign import STAGES, CampaignConfig
    default = CampaignConfig()
    cmd = ["sigprop"] if program() == "sigprop" else ["python", "run_analysis.py"]
    cmd += ["campaign", "--out", str(out)]
    if cfg.device != default.device:
        cmd += ["--device", cfg.device]
    if cfg.tiny:
        cmd.append("--tiny")
    if cfg.compile != default.compile:
        cmd.append("--compile" if cfg.compile else "--no-compile")
    if cfg.compile_backend != default.compile_backend:
        cmd += ["--compile-backend", cfg.compile_backend]
    if cfg.parallel != default.parallel:
        cmd += ["--parallel", str(cfg.parallel)]
    if cfg.tokens is not None:
        cmd += ["--tokens", str(cfg.tokens)]
    if cfg.corpus is not None:
        cmd += ["--corpus", str(cfg.corpus)]
    if tuple(cfg.stages) != STAGES:
        cmd += ["--stages", ",".join(cfg.stages)]
    if args.time_limit != 540.0:
        cmd += ["--time-limit", f"{args.time_limit:g}"]
    if args.format != "png":
        cmd += ["--format", args.format]
    return shlex.join(cmd)


def write_campaign_report(out, state):
    """The campaign's report from the tables its stages wrote; its path."""
    import pandas as pd

    from figures.campaign import write_campaign_report as write
    init = out / "init"
    tables = {n: pd.read_csv(out / f"{n}.csv") for n in ("probe_overhead", "throughput")
              if (out / f"{n}.csv").exists()}
    run_columns = ["scheme", "depth", "moe", "status", "tokens", "final_val_bpb", "divergence_step",
                   "tokens_per_s", "mfu"]
    for name in ("dense", "moe"):
        if (out / name / "train_runs.csv").exists():
            tables[name] = pd.read_csv(out / name / "train_runs.csv")[run_columns]
    readings = [pd.read_csv(f)[run_columns] for f in sorted((out / "readings").glob("*/train_runs.csv"))]
    if readings:
        tables["readings"] = pd.concat(readings, ignore_index=True)
    if (init / "targets.csv").exists():
        tables["init_targets"] = pd.read_csv(init / "targets.csv")
    return write(out, state, tables)


def bundle(out):
    """The campaign's small results (CSVs, figures, reports, no checkpoints) as one tarball."""
    import io
    import tarfile

    from analysis.infra.files import write_bytes
    path, whole = out / "campaign-bundle.tar.gz", io.BytesIO()  # small: built in memory
    keep = {".csv", ".png", ".svg", ".pdf", ".md", ".html", ".json", ".txt"}  # .txt: a failed stage's traceback
    with tarfile.open(fileobj=whole, mode="w:gz") as tar:
        for f in sorted(out.rglob("*")):
            rel = f.relative_to(out)
            if f.is_file() and f.suffix in keep and "runs" not in rel.parts[:-1] and f != path:
                tar.add(f, arcname=str(rel))
    write_bytes(path, whole.getvalue())
    return path
