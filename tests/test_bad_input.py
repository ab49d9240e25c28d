"""Bad input: a one-line error naming the problem; ValueError in Python, exit 2 on the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    (dict(scheme="nope"), ["--scheme", "nope"], "unknown scheme 'nope'"),
    (dict(depth=0), ["--depth", "0"], "depth must be >= 1, got 0"),
    (dict(width=100, heads=3), ["--width", "100", "--heads", "3"], "width 100 is not divisible by heads 3"),
    (dict(experts=2, top_k=3), ["--moe", "2,3"], "top-k 3 must be between 1 and the number of experts 2"),
    (dict(ffn="tanh"), ["--ffn", "tanh"], "unknown ffn kind 'tanh'"),
    (dict(scheme_params={"gamma": 1.0}), ["--param", "gamma=1"], "scheme 'span' has no parameter gamma"),
]


def test_api_refuses_non_finite_scheme_parameters_and_init_scales():
    for v in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="parameter alpha must be finite"):
            ModelConfig(scheme="span", scheme_params={"alpha": v})
        with pytest.raises(ValueError, match="sigma and embed_std must be finite and > 0"):
            ModelConfig(scheme="span", sigma=v)


@pytest.mark.parametrize("kwargs,_,message", CASES)
def test_api_raises_value_error(kwargs, _, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelConfig(**{"scheme": "span", **kwargs})


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "run_analysis.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("_,argv,message", CASES)
def test_cli_one_line_exit_2(_, argv, message, cli_error):
    assert cli_error(["model", *argv]).startswith(f"error: {message}")


def test_a_fresh_process_prints_the_error_line_alone():
    # in its own process: nothing that imports print (a warning, a banner) reaches stderr
    _, argv, message = CASES[0]
    r = run_cli("model", *argv)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}")


def test_corpus_errors_cli_and_api(tmp_path, cli_error):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    for path, message in [(tmp_path / "missing", "does not exist"), (empty, "is empty")]:
        with pytest.raises(ValueError, match=message):
            load_corpus(path)
        assert message in cli_error(["model", "--corpus", str(path)])


def test_schemes_command_lists_every_scheme(capsys, cli_error):
    from run_analysis import main
    assert main(["schemes"]) == 0
    out = capsys.readouterr().out
    for name in ["post", "pre", "span", "deepnorm", "b2t", "peri", "mixln", "lns"]:
        assert f"\n{name}\n" in f"\n{out}"
    assert "alpha = " in out and "beta = " in out and "rho = 1/4" in out
    assert "unknown scheme 'nope'" in cli_error(["schemes", "--scheme", "nope"])


def test_model_command_runs_on_a_small_corpus(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    r = run_cli("model", "--scheme", "post", "--depth", "3", "--width", "32", "--corpus", str(text),
                "--seq-len", "32", "--batch", "2")
    assert r.returncode == 0, r.stderr
    assert "grad norm" in r.stdout and "(finite)" in r.stdout and "bits/byte" in r.stdout


# --- whole classes of bad input (issue 17): one line `error: …`, exit 2, never a traceback ------
# Every case runs through run_analysis.main in one child process (torch is imported once), so the
# table stays fast; the Ctrl-C test below runs the real script.

HARNESS = r"""
import contextlib, io, json, sys, time, traceback
sys.path.insert(0, sys.argv[1])
import run_analysis
results = []
for argv in json.loads(sys.stdin.read()):
    err = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = run_analysis.main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            code = "raised"
            err.write(traceback.format_exc())
    results.append([code, err.getvalue(), time.time() - t0])
print(json.dumps(results))
"""


def run_many(argvs, cwd):
    r = subprocess.run([sys.executable, "-c", HARNESS, str(ROOT)], input=json.dumps(argvs),
                       capture_output=True, text=True, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_sweep_folder(folder: Path, seeds=(0, 1), depths=(2, 4), cut_last=False):
    """A small fake sweep folder: config.json, theory.json and init_profiles.csv."""
    import pandas as pd
    from analysis.init.pipeline import AnalysisConfig
    from dataclasses import asdict
    folder.mkdir(parents=True, exist_ok=True)
    cfg = AnalysisConfig(schemes=["pre"], depths=list(depths), seeds=list(seeds), width=32, heads=2)
    (folder / "config.json").write_text(json.dumps(asdict(cfg)))
    (folder / "theory.json").write_text(json.dumps({"claims": [], "schemes": []}))
    rows = []
    for d in depths:
        for seed in seeds:
            for layer in range(-1, d):
                point = "embed" if layer < 0 else f"blocks.{layer}.resid_post"
                rows.append(dict(scheme="pre", depth=d, seed=seed, layer=layer, point=point,
                                 metric="second_moment", measured=1.0 + layer, spread=0.01,
                                 theory=1.0 + layer, theory_averaged=1.0 + layer))
    text = pd.DataFrame(rows).to_csv(index=False)
    (folder / "init_profiles.csv").write_text(text[:-9] if cut_last else text)
    return cfg


def test_bad_input_classes_one_line_exit_2(tmp_path):
    sweep = tmp_path / "sweep"
    make_sweep_folder(sweep)
    atlas = tmp_path / "atlas"  # an atlas folder: its claims.csv is the atlas's own
    atlas.mkdir()
    (atlas / "atlas_layers.csv").write_text("checkpoint,layer\n")
    renamed = tmp_path / "renamed"
    make_sweep_folder(renamed)
    csv = renamed / "init_profiles.csv"
    csv.write_text(csv.read_text().replace("measured", "value", 1))
    empty = tmp_path / "empty"
    make_sweep_folder(empty)
    (empty / "init_profiles.csv").write_text("")
    header = tmp_path / "header"
    make_sweep_folder(header)
    (header / "init_profiles.csv").write_text((header / "init_profiles.csv").read_text().split("\n")[0] + "\n")
    broken = tmp_path / "broken"
    make_sweep_folder(broken)
    (broken / "config.json").write_text('{"schemes": ["pre"],')
    readonly = tmp_path / "a-file"  # a folder below a file cannot be made, even by root
    readonly.write_text("")
    grid = tmp_path / "grid"
    (grid / "runs" / "pre-L2-d32-dense-s0").mkdir(parents=True)
    (grid / "runs" / "pre-L2-d32-dense-s0" / "settings.json").write_text("{not json")
    small = ["--width", "32", "--heads", "2", "--seq-len", "16", "--batch", "2"]
    train = ["train", "--schemes", "pre", "--depths", "2", *small, "--tokens", "256"]
    sweep_args = ["sweep", "--schemes", "pre", "--depths", "2", "--seeds", "0", "--width", "32",
                  "--heads", "2", "--batches", "1", "--batch", "2", "--seq-len", "16"]
    cases = [  # argv, words the one line must hold
        # tracebacks before validation
        (["model", "--heads", "0"], ["heads must be >= 1"]),
        (sweep_args + ["--heads", "0", "--out", str(tmp_path / "o1")], ["heads must be >= 1"]),
        (train + ["--heads", "0", "--out", str(tmp_path / "o2")], ["heads must be >= 1"]),
        (["model", "--param", "alpha=nan"], ["alpha", "finite"]),
        (["model", "--param", "alpha=inf"], ["alpha", "finite"]),
        (["model", "--sigma", "nan"], ["--sigma", "finite"]),
        (train + ["--lr", "inf", "--out", str(tmp_path / "o3")], ["--lr", "finite"]),
        (["bench", "--probes", "--device", "nonsense"], ["unknown device 'nonsense'"]),
        (["model", "--depth", "x"], ["--depth", "invalid int"]),
        (["report", str(renamed)], ["init_profiles.csv", "lacks", "measured"]),
        (["theory", "--scheme", "pre", "--out", str(readonly / "sub")], ["not writable"]),
        # unbounded work refused up front
        (["model", "--depth", "100000"], ["depth 100000", "needs", "GB", "free"]),
        (["model", "--seq-len", "100000"], ["100000", "needs", "GB", "free"]),
        (sweep_args[:4] + ["100000"] + sweep_args[5:] + ["--out", str(tmp_path / "o4")],
         ["depth 100000", "needs", "free"]),
        (sweep_args + ["--seq-len", "100000", "--out", str(tmp_path / "o5")], ["needs", "free"]),
        (sweep_args[:4] + ["256"] + sweep_args[5:] + ["--seq-len", "2048", "--out", str(tmp_path / "o6")],
         ["position-resolved theory", "limit"]),
        (train[:4] + ["100000"] + small + ["--tokens", "256", "--out", str(tmp_path / "o7")],
         ["depth 100000", "needs", "free"]),
        (train + ["--seq-len", "100000", "--tokens", "100000000", "--out", str(tmp_path / "o8")],
         ["needs", "free"]),
        # silent wrong results
        (sweep_args[:2] + ["pre,pre"] + sweep_args[3:] + ["--out", str(tmp_path / "o9")],
         ["schemes must be distinct", "pre"]),
        (sweep_args[:6] + ["0,0"] + sweep_args[7:] + ["--out", str(tmp_path / "o10")],
         ["seeds must be distinct"]),
        (sweep_args[:4] + ["2,2"] + sweep_args[5:] + ["--out", str(tmp_path / "o11")],
         ["--depths must be distinct", "2 twice"]),
        (train + ["--seeds", "0,0", "--out", str(tmp_path / "o12")], ["seeds must be distinct"]),
        (train[:4] + ["2,2"] + train[5:] + ["--out", str(tmp_path / "o13")], ["depths must be distinct"]),
        (["model", "--moe", "0,1"], ["--moe", "E >= 1"]),
        (train + ["--grad-clip", "-1", "--out", str(tmp_path / "o14")], ["grad_clip", ">= 0"]),
        (["bench", "--parallel", "0"], ["--parallel", ">= 1"]),
        (["theory", "--scheme", "pre", "--out", str(sweep)], ["output of `sweep`", "not of `theory`"]),
        (["theory", "--scheme", "pre", "--out", str(atlas)], ["output of `atlas`", "not of `theory`"]),
        # unclear messages
        (["report", str(broken)], ["config.json", "not valid JSON"]),
        (train + ["--out", str(grid)], ["settings.json", "not valid JSON"]),
        (["report", str(empty)], ["init_profiles.csv", "empty"]),
        (["report", str(header)], ["init_profiles.csv", "has no rows"]),
    ]
    results = run_many([argv for argv, _ in cases], tmp_path)
    for (argv, words), (code, err, seconds) in zip(cases, results):
        assert seconds < 10, (argv, seconds)  # refused up front (each took < 3.5 s here)
        line = err.strip()
        assert code == 2, (argv, code, err)
        assert "Traceback" not in err and len(line.splitlines()) == 1, (argv, err)
        assert line.startswith("error: "), (argv, err)
        for w in words:
            assert w in line, (argv, w, line)
    assert not (tmp_path / "o14").exists()  # refused before any folder is made
    assert not (sweep / "claims.csv").exists()  # the sweep's files are untouched


def test_api_raises_value_error_for_each_class(tmp_path):
    from analysis.infra.folders import claim
    from analysis.init.pipeline import AnalysisConfig, load_tables
    from analysis.infra.records import read_record
    from analysis.testbed.memory import check_fits
    from analysis.training.grid import train_grid
    from analysis.training.train import TrainConfig
    with pytest.raises(ValueError, match="heads must be >= 1"):
        ModelConfig(heads=0)
    with pytest.raises(ValueError, match="schemes must be distinct"):
        AnalysisConfig(schemes=["pre", "pre"]).validate()
    with pytest.raises(ValueError, match="seeds must be distinct"):
        AnalysisConfig(seeds=[0, 0]).validate()
    with pytest.raises(ValueError, match="depths must be distinct"):
        train_grid(["pre"], [2, 2], ModelConfig(width=32, heads=2), TrainConfig(), None, tmp_path)
    with pytest.raises(ValueError, match="grad_clip must be >= 0"):
        TrainConfig(grad_clip=-1.0).validate(16)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        TrainConfig(lr=float("nan")).validate(16)
    TrainConfig(grad_clip=0.0).validate(16)  # 0: no clipping
    with pytest.raises(ValueError, match="needs .* free"):
        check_fits(ModelConfig(depth=100_000), 4, 64, 10e9, "cpu")
    bad = tmp_path / "x.json"
    for text, message in [("", "it is empty"), ("[1]", "not a JSON object"), ("{", "not valid JSON")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_record(bad)
    make_sweep_folder(tmp_path / "sweep")
    with pytest.raises(ValueError, match="output of `sweep`, not of `theory`"):
        claim(tmp_path / "sweep", "theory", {})
    make_sweep_folder(tmp_path / "empty")
    (tmp_path / "empty" / "init_profiles.csv").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_tables(tmp_path / "empty")


def test_quick_memory_estimate_matches_the_exact_one():
    from analysis.testbed.memory import estimate, quick_estimate
    for scheme in ("pre", "mixln", "lns"):
        cfg = ModelConfig(scheme=scheme, depth=40, width=32, heads=2, max_seq_len=16)
        assert quick_estimate(cfg, 2, 16, True).total == pytest.approx(
            estimate(cfg, 2, 16, True).total, rel=0.02)


def test_report_warns_about_missing_and_cut_grid_points(tmp_path):
    from analysis.init.pipeline import load_tables
    from analysis.init.sweep import complete_points, read_profiles
    make_sweep_folder(tmp_path / "cut", cut_last=True)  # cut mid-write: last line partial
    frame, problems = complete_points(read_profiles(tmp_path / "cut" / "init_profiles.csv"), [0, 1])
    assert problems == ["pre L=4: seed 1 part-written"]
    assert set(frame["depth"]) == {2}
    make_sweep_folder(tmp_path / "missing", seeds=(0, 1))
    cfg_path = tmp_path / "missing" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(seeds=[0, 1, 2], depths=[2, 4, 8])  # the sweep planned more than it wrote
    cfg_path.write_text(json.dumps(cfg))
    warnings = []
    try:
        load_tables(tmp_path / "missing", warn=warnings.append)
    except (KeyError, IndexError, ValueError):
        pass  # the fake tables are too thin for every statistic; the warning comes first
    assert len(warnings) == 1
    for words in ("pre L=2: seed 2 missing", "pre L=4: seed 2 missing", "pre L=8: not measured",
                  "left out"):
        assert words in warnings[0]


@pytest.mark.slow
def test_ctrl_c_in_train_keeps_a_checkpoint_and_names_the_resume_command(tmp_path):
    import signal
    import time
    out = tmp_path / "grid"
    argv = [sys.executable, "-u", str(ROOT / "run_analysis.py"), "train", "--schemes", "pre",
            "--depths", "2", "--width", "32", "--heads", "2", "--seq-len", "16", "--batch", "2",
            "--tokens", "40000", "--out", str(out)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    for line in p.stdout:  # the first evaluation line: training is under way
        if "val" in line and "step" in line or time.time() > deadline:
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    line = err.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in err, err
    assert line.startswith("error: interrupted; kept in") and "checkpoint is kept" in line, line
    assert "resume with: python run_analysis.py train" in line and str(out) in line
    assert (out / "runs" / "pre-L2-d32-dense-s0" / "checkpoint.pt").exists()
