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
    out = options.writable_dir(args.out or "runs/campaign")
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
                grid_report(out / name, runs, profiles, args.format, unigram)
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
              + f"; about {sum(m for _, m in todo):.1f} minutes. Run the same command again.")
    else:
        print("campaign complete")
    return 0


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
    if (init / "targets.csv").exists():
        tables["init_targets"] = pd.read_csv(init / "targets.csv")
    return write(out, state, tables)


def bundle(out):
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
