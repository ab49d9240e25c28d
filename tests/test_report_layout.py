"""The reports as a person reads them: the verdict summary and the figures before any table,
status cells coloured by class, long evidence collapsible in HTML (whole in Markdown), and the
main analysis listing only the claims of the schemes it ran, with the command for the rest."""

import re
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from analysis.init.pipeline import AnalysisConfig, compare_tables, other_schemes_command
from figures import analysis_report
from figures.diagnose import atlas_blocks
from figures.report import LONG, claims_summary, to_html, to_markdown
from figures.train import training_blocks
from theory.schemes import SCHEMES

ROOT = Path(__file__).resolve().parents[1]
LONG_EVIDENCE = "measured q_L = 0.00441 + 1.355·L over L = 2…4; " * 5


def _claims() -> pd.DataFrame:
    return pd.DataFrame([
        ("a_claim", "pre", "short statement", "theory, symbolic", "holds", "closed form q_L = 1 + L"),
        ("b_claim", "pre", "another", "measured at init", "fails", LONG_EVIDENCE),
        ("a_claim", "pre", "short statement", "measured at init", "fails", "R² = 0.95"),
        ("c_claim", "post", "third", "measured at init", "untested", "post not measured"),
    ], columns=["claim", "scheme", "statement", "method", "status", "evidence"])


def _order(page: str, *needles: str) -> list[int]:
    return [page.index(n) for n in needles]


def test_summary_and_figure_come_before_the_first_table_and_cells_carry_their_class():
    claims = _claims()
    numbers = pd.DataFrame({"metric": ["q", "g"], "error": [0.01, 0.2]})
    blocks = [("h1", "report"), claims_summary(claims, ["one more line with `a command --flag`"]),
              ("img", "figures/x.png"), ("table", claims), ("table", numbers)]
    page = to_html(blocks, "t")
    summary, img, table = _order(page, 'class="summary', "<img", "<table")
    assert summary < img < table
    head = page[summary:img]
    assert re.search(r'class="holds">1 hold<', head) and re.search(r'class="fails">2 fail<', head)
    assert re.search(r'class="untested">1 untested<', head)
    # the failed claims named, a name shared by two rows told apart by its method
    assert "<code>b_claim</code>" in head and "<code>a_claim (measured)</code>" in head
    assert "<code>a command --flag</code>" in head
    # status cells classed; text left (no class), numbers right (class num)
    assert page.count('<td class="holds">holds</td>') == 1
    assert page.count('<td class="fails">fails</td>') == 2
    assert page.count('<td class="untested">untested</td>') == 1
    assert "<td>short statement</td>" in page and '<td class="num">0.01</td>' in page
    assert '<th class="num">error</th>' in page and "<th>metric</th>" in page
    assert "text-align:left" in page and "http" not in page.split("<body>")[0]  # no network
    # long evidence collapsible, short evidence plain; Markdown keeps the whole text
    assert len(LONG_EVIDENCE) > LONG
    details = re.findall(r"<details><summary>(.*?)</summary>(.*?)</details>", page)
    assert len(details) == 1 and details[0][1] == LONG_EVIDENCE.replace("<", "&lt;")
    assert len(details[0][0]) < LONG
    assert "<td>R² = 0.95</td>" in page
    md = to_markdown(blocks)
    assert LONG_EVIDENCE.strip() in md and "<details>" not in md
    assert md.index("1 hold · 2 fail · 1 untested") < md.index("![x]") < md.index("| claim |")


def test_atlas_report_leads_with_the_verdict_then_the_figure():
    released = ROOT / "results" / "released"
    claims = pd.read_csv(released / "claims.csv")
    checkpoints = pd.read_csv(released / "atlas_checkpoints.csv")
    table = pd.DataFrame({"checkpoint": checkpoints["checkpoint"], "depth": checkpoints["depth"]})
    blocks = atlas_blocks(checkpoints, claims, "figures/atlas.png", table)
    page = to_html(blocks, "atlas")
    summary, img, table_at = _order(page, 'class="summary', "<img", "<table")
    assert summary < img < table_at
    fails = int((claims["status"] == "fails").sum())
    assert f'class="fails">{fails} fail<' in page[summary:img]
    unwell = checkpoints[~checkpoints["verdict"].str.startswith("HEALTHY")]
    assert all(name in page[summary:img] for name in unwell["checkpoint"])  # named up front
    assert page.count('<td class="fails">COLLAPSED') == len(unwell)  # the verdict column coloured


def test_training_section_leads_with_its_verdict_then_the_figures(tmp_path):
    runs = pd.DataFrame({"scheme": ["pre", "post"], "depth": [2, 2], "moe": ["dense", "dense"],
                         "seed": [0, 0], "status": ["ok", "diverged"], "divergence_step": [None, 12]})
    claims = _claims()[["claim", "status", "evidence", "method"]]
    blocks = training_blocks(runs, [tmp_path / "figures" / "train_loss.png"], tmp_path, claims)
    page = to_html(blocks, "train")
    summary, img, table = _order(page, 'class="summary', "<img", "<table")
    assert summary < img < table
    assert "Diverged: post L=2 (dense) at step 12" in page[summary:img]
    assert '<td class="fails">diverged</td>' in page


def test_other_schemes_command_repeats_the_grid():
    rest, cmd = other_schemes_command({"schemes": ["pre", "post"], "depths": [2, 3, 4],
                                       "seeds": [0, 1, 2], "width": 32, "device": "cpu"})
    assert rest == [s for s in SCHEMES if s not in ("pre", "post")]
    assert cmd == (f"python run_analysis.py sweep --schemes {','.join(rest)} --depths 2,3,4 "
                   "--width 32")
    assert other_schemes_command({"schemes": list(SCHEMES)}) == ([], None)
    default = AnalysisConfig()
    rest, cmd = other_schemes_command({"schemes": default.schemes, "depths": default.depths})
    assert cmd == f"python run_analysis.py sweep --schemes {','.join(rest)}"


def _profiles(schemes=("pre",), depths=(2, 4, 8), seeds=(0, 1, 2)) -> pd.DataFrame:
    """Init profiles whose measured second moment grows linearly and matches its theory."""
    rows = []
    for scheme in schemes:
        for depth in depths:
            for seed in seeds:
                for i in range(depth):
                    m, point = 1.0 + 0.5 * (i + 1), f"blocks.{i}.resid_post"
                    rows.append((scheme, depth, seed, i, point, "second_moment", m + 0.001 * seed, 0.0, m))
    return pd.DataFrame(rows, columns=["scheme", "depth", "seed", "layer", "point", "metric",
                                       "measured", "spread", "theory"])


def test_a_subset_of_schemes_lists_only_its_claims_and_names_the_command_for_the_rest(tmp_path):
    theory_claims = [dict(claim="pre_forward_linear", scheme="pre", statement="q_L linear",
                          method="symbolic", status="holds", evidence="closed form"),
                     dict(claim="post_gradient_exponential", scheme="post", statement="exp",
                          method="numeric", status="holds", evidence="iterated")]
    tables = compare_tables(_profiles(), theory_claims, schemes=["pre"])
    claims = tables["claims"]
    assert set(claims["scheme"]) == {"pre"}
    assert claims.set_index("method").loc["measured at init across depths"].shape[0] >= 3
    # status semantics unchanged: a run scheme without enough measurement stays untested
    assert "untested" in set(claims["status"])
    everything = compare_tables(_profiles(), theory_claims)["claims"]  # no selection: every row
    from analysis.init.measured_claims import registry
    assert set(everything["scheme"]) == {scheme for _, scheme, *_ in registry()}
    assert (everything[everything["scheme"] == "b2t"]["status"] == "untested").all()

    config = asdict(AnalysisConfig(schemes=["pre"], depths=[2, 4, 8], seeds=[0, 1, 2], width=32))
    figure = tmp_path / "figures" / "variance_vs_depth.png"
    blocks = analysis_report.report_blocks(tables, config, [figure], tmp_path,
                                           not_run=other_schemes_command(config))
    md, page = to_markdown(blocks), to_html(blocks, "report")
    rest = ",".join(s for s in SCHEMES if s != "pre")
    command = f"python run_analysis.py sweep --schemes {rest} --depths 2,4,8 --width 32"
    assert f"`{command}`" in md and f"<code>{command}</code>" in page
    assert "claims.csv holds the same rows" in md
    for other in SCHEMES:
        if other != "pre":  # no claim row of a scheme the grid did not run
            assert f"| {other} |" not in md and f"<td>{other}</td>" not in page
    summary, img, table = _order(page, 'class="summary', "<img", "<table")
    assert summary < img < table
    counts = claims["status"].value_counts()
    assert (f"{counts.get('holds', 0)} hold · {counts.get('fails', 0)} fail · "
            f"{counts.get('untested', 0)} untested") in md


def test_a_figure_without_labelled_artists_gets_no_legend_and_no_warning(recwarn):
    from figures.style import legend, new_figure
    fig, (empty, drawn) = new_figure(2)
    legend(empty, fontsize=6)
    drawn.plot([1, 2], [1, 2], label="pre")
    legend(drawn, fontsize=6)
    assert empty.get_legend() is None and drawn.get_legend() is not None
    assert not [w for w in recwarn if "legend" in str(w.message).lower()]
