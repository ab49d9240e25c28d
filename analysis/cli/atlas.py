"""several checkpoints diagnosed alike, drawn against relative depth, with claims about trained models"""

from __future__ import annotations

import argparse

from analysis.infra import progress
from analysis.cli import options
from analysis.infra.files import write_csv


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add(p, "paths")
    options.measurement(p, "atlas")
    options.add(p, "text_for", "quiet")


def run(args: argparse.Namespace) -> int:
    import time

    from analysis.diagnose.atlas import atlas_claims, collect, summary
    from figures.diagnose import atlas_blocks, atlas_figure
    from figures.report import write_report
    from theory.claim_table import tally
    options.check_format(args.format)
    out = options.claim(args, default=f"runs/atlas-{time.strftime('%Y%m%d-%H%M%S')}")
    layers, checkpoints = collect(args.paths, log=progress.say_err,
                                  texts=options.value(args, "text_for") or {},
                                  **options.measurement_settings(args))
    claims, table = atlas_claims(layers), summary(layers)
    write_csv(layers, out / "atlas_layers.csv", index=False, float_format="%.6g")
    write_csv(checkpoints, out / "atlas_checkpoints.csv", index=False)
    write_csv(claims, out / "claims.csv", index=False)
    fig = atlas_figure(layers, out / "figures" / "atlas", args.format)
    files = write_report(atlas_blocks(checkpoints, claims, str(fig.relative_to(out)), table), out,
                         "sigprop atlas")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(tally(claims).line())
    print(f"wrote {out}/atlas_layers.csv, atlas_checkpoints.csv, claims.csv, {fig}, "
          + ", ".join(str(f) for f in files))
    return 0
