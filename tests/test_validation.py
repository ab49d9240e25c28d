"""Every option and config field is checked before work starts (issue 33, second round): lists
(not empty, nothing twice, increasing where declared), negative values reaching the option's own
check, config ranges in one place (CLI and API alike), formats, compile backends and devices up
front, and work estimated beyond days refused with its estimate."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.cli import build_parser, main
from analysis.cli import options
from analysis.infra.checks import check_int, check_list, check_number

ROOT = Path(__file__).resolve().parents[1]


def refused(argv: list[str], capsys) -> str:
    """The one error line of a command that must be refused (exit 2, no traceback)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert "Traceback" not in err, (argv, err)
    return lines[0]


# --- lists: one mechanism for every list option --------------------------------------------

LIST_CASES = [
    (["lrsweep", "--lrs", ""], ["--lrs is empty"]),
    (["lrsweep", "--lrs", ","], ["--lrs is empty"]),
    (["coordcheck", "--widths", "32,32,64,128"], ["--widths must be distinct", "32 twice"]),
    (["coordcheck", "--widths", "128,64"], ["--widths must be increasing", "'128,64'"]),
    (["coordcheck", "--parametrizations", "mup,mup"], ["--parametrizations must be distinct"]),
    (["coordcheck", "--seeds", "0,1,0"], ["--seeds must be distinct", "0 twice"]),
    (["lrsweep", "--lrs", "1e-3,1e-3,2e-3"], ["--lrs must be distinct", "0.001 twice"]),
    (["lrsweep", "--lrs", "4e-3,2e-3,1e-3"], ["--lrs must be increasing"]),
    (["lrsweep", "--depths", "8,4"], ["--depths must be increasing"]),
    (["sweep", "--schemes", "pre,post,pre"], ["--schemes must be distinct", "pre twice"]),
    (["sweep", "--depths", "8,4"], ["--depths must be increasing, got '8,4'"]),
    (["train", "--depths", "2,2"], ["--depths must be distinct"]),
    (["train", "--schemes", ""], ["--schemes is empty"]),
    (["onestep", "--optimizers", "adam,adam"], ["--optimizers must be distinct"]),
    (["onestep", "--depth-schemes", ""], ["--depth-schemes is empty"]),
    (["fidelity", "--corpora", "text,text"], ["--corpora must be distinct"]),
    (["fidelity", "--corpora", ""], ["--corpora is empty"]),
    (["campaign", "--device", "cpu", "--stages", "throughput,throughput"],
     ["--stages must be distinct"]),
]


@pytest.mark.parametrize("argv, words", LIST_CASES)
def test_list_options_refused_in_one_line(argv, words, capsys, tmp_path):
    line = refused([*argv, "--out", str(tmp_path / "o")], capsys)
    for w in words:
        assert w in line, (argv, w, line)
    assert not (tmp_path / "o").exists()  # before any folder is made


def test_every_list_option_refuses_empty_and_twice():
    lists = {name: o for name, o in options.OPTIONS.items()
             if o.convert is not None and name not in ("moe", "param", "text_for")}
    assert {"depths", "widths", "seeds", "lrs", "schemes", "parametrizations", "stages",
            "corpora", "optimizers", "depth_schemes"} <= set(lists)
    for name, o in lists.items():
        flag = o.flags[0]
        with pytest.raises(ValueError, match=f"^{flag} is empty$"):
            o.convert("", flag)
        with pytest.raises(ValueError, match=f"^{flag} must be distinct: it lists 1 twice"):
            o.convert("1,2,1", flag)
    for name in ("depths", "widths", "lrs"):  # their help says "increasing"
        o = options.OPTIONS[name]
        assert "increasing" in o.help
        with pytest.raises(ValueError, match=f"{o.flags[0]} must be increasing, got '2,1'"):
            o.convert("2,1", o.flags[0])


def test_check_list_int_number_messages():
    check_list([1, 2, 4], "depths", increasing=True)
    with pytest.raises(ValueError, match="^depths is empty$"):
        check_list([], "depths")
    with pytest.raises(ValueError, match=r"^seeds must be distinct: it lists 0 twice \('0,1,0'\)$"):
        check_list([0, 1, 0], "seeds")
    with pytest.raises(ValueError, match="^widths must be increasing, got '64,32'$"):
        check_list([64, 32], "widths", increasing=True)
    for bad in (2.5, True, "3"):
        with pytest.raises(ValueError, match="must be an integer"):
            check_int(bad, "depth")
    with pytest.raises(ValueError, match=r"warmup_frac must be a finite number in \[0, 1\), got 1"):
        check_number(1, "warmup_frac", 0, 1, hi_open=True)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got nan"):
        check_number(math.nan, "lr", 0, lo_open=True)


# --- negative values reach the option's own check ------------------------------------------

NEGATIVE_CASES = [
    (["model", "--moe", "-2,1"], ["--moe E,k needs E >= 1"]),
    (["lrsweep", "--lrs", "-1e-3,2e-3"], ["--lrs takes finite numbers > 0", "-1e-3,2e-3"]),
    (["model", "--sigma", "-1e-3"], ["sigma", "> 0"]),
    (["model", "--sigma", "-inf"], ["--sigma", "finite"]),
    (["coordcheck", "--lr", "-.5"], ["lr must be a finite number > 0"]),
]


@pytest.mark.parametrize("argv, words", NEGATIVE_CASES)
def test_negative_values_are_values_not_flags(argv, words, capsys, tmp_path):
    line = refused(argv, capsys)
    assert "expected one argument" not in line
    for w in words:
        assert w in line, (argv, w, line)


def test_no_option_looks_like_a_negative_number():
    parser = build_parser()  # asserts it for every command
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._actions[-1])))
    for name, p in sub.choices.items():
        assert not any(p._negative_number_matcher.match(s) for s in p._option_string_actions), name
    assert parser.parse_args(["model", "--sigma", "-1e-3"]).sigma == -1e-3


def test_cli_subprocess_negative_list_one_line():
    r = subprocess.run([sys.executable, str(ROOT / "run_analysis.py"), "lrsweep", "--lrs",
                        "-1e-3,2e-3,4e-3"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --lrs takes finite numbers > 0, got '-1e-3,2e-3,4e-3'"]


# --- config fields: one place each, CLI and API alike ---------------------------------------

TRAIN_CASES = [
    (["--warmup", "2"], "warmup_frac must be a finite number in [0, 1), got 2.0"),
    (["--warmup", "-0.5"], "warmup_frac must be a finite number in [0, 1), got -0.5"),
    (["--min-lr-ratio", "-1"], "min_lr_ratio must be a finite number in [0, 1], got -1.0"),
    (["--min-lr-ratio", "1.5"], "min_lr_ratio must be a finite number in [0, 1], got 1.5"),
    (["--tokens", "0"], "tokens must be >= 1, got 0"),
    (["--batch", "0"], "batch_size must be >= 1, got 0"),
    (["--beta2", "1"], "beta2 must be a finite number in [0, 1), got 1.0"),
    (["--stall-share", "1"], "stall_share must be a finite number in [0, 1), got 1.0"),
    (["--log-every", "0"], "log_every must be >= 1, got 0"),
]


@pytest.mark.parametrize("argv, message", TRAIN_CASES)
def test_train_config_ranges_cli(argv, message, capsys, tmp_path):
    line = refused(["train", *argv, "--out", str(tmp_path / "o")], capsys)
    assert line == f"error: {message}"
    assert not (tmp_path / "o").exists()


def test_train_config_ranges_api():
    from analysis.training.train import TrainConfig
    for kwargs, message in [
            (dict(warmup_frac=2.0), r"warmup_frac must be a finite number in \[0, 1\)"),
            (dict(min_lr_ratio=-1.0), r"min_lr_ratio must be a finite number in \[0, 1\]"),
            (dict(tokens=2.5), "tokens must be an integer"),
            (dict(spike_after=-1), "spike_after must be >= 0"),
            (dict(profile_fractions=(0.0, 1.5)), "profile_fractions must be a finite number"),
            (dict(tensorboard="yes"), "tensorboard must be True or False"),
            (dict(compile=True, compile_backend="nonsense"), "unknown torch.compile backend")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kwargs).validate(16)
    TrainConfig(warmup_frac=0.0, min_lr_ratio=1.0).validate(16)  # the ends that are allowed


def test_preset_and_analysis_configs_api():
    from analysis.init.pipeline import AnalysisConfig
    from analysis.training.campaign import CampaignConfig
    from analysis.width.coordcheck import CoordCheckConfig
    from analysis.width.lrsweep import LRSweepConfig
    cases = [
        (LRSweepConfig(lrs=()), "^lrs is empty$"),  # was "lr must be ... > 0, got 0.0"
        (LRSweepConfig(lrs=(1e-3, 2e-3, -4e-3)), "lrs must be increasing"),
        (LRSweepConfig(warmup_frac=1.0), r"warmup_frac must be a finite number in \[0, 1\)"),
        (LRSweepConfig(widths=(128, 64)), "widths must be increasing"),
        (LRSweepConfig(eval_batches=0), "eval_batches must be >= 1"),
        (CoordCheckConfig(widths=(32, 32, 64, 128)), "widths must be distinct: it lists 32 twice"),
        (CoordCheckConfig(schemes=("pre", "pre")), "schemes must be distinct"),
        (CoordCheckConfig(depth=0), "depth must be >= 1"),
        (AnalysisConfig(depths=[4, 2]), "depths must be increasing, got '4,2'"),
        (AnalysisConfig(depths=[0, 2]), "each of depths must be >= 1"),
        (AnalysisConfig(batches=1.5), "batches must be an integer"),
        (CampaignConfig(device="cpu", compile_backend="nonsense"), "unknown torch.compile backend"),
        (CampaignConfig(device="cpu", stages=()), "^stages is empty$"),
        (CampaignConfig(device="cpu", parallel=0), "parallel must be >= 1"),
    ]
    for cfg, message in cases:
        with pytest.raises(ValueError, match=message):
            cfg.validate()


def test_theory_api_refuses_bad_depth_q0_rho0():
    from theory.solve import predict_profile
    for kwargs, message in [
            (dict(depth=2.5), "depth must be an integer, got 2.5"),
            (dict(depth=True), "depth must be an integer"),
            (dict(depth=0), "depth must be >= 1"),
            (dict(depth=2, seq_len=8.0), "seq_len must be an integer"),
            (dict(depth=2, q0=math.nan), "q0 .* must be a finite number > 0, got nan"),
            (dict(depth=2, q0=math.inf), "q0 .* must be a finite number > 0, got inf"),
            (dict(depth=2, q0=0.0), "q0 .* must be a finite number > 0, got 0.0"),
            (dict(depth=2, rho0=math.nan), "rho0 must be a number"),
            (dict(depth=2, rho0=1.5), r"rho0 must lie in \["),
            (dict(depth=2, rho_g=math.inf), r"rho_g must lie in \[")]:
        with pytest.raises(ValueError, match=message):
            predict_profile("pre", seq_len=kwargs.pop("seq_len", 16), **kwargs)
    p = predict_profile("pre", depth=2, seq_len=16, rho_g=math.nan)  # no gradient measured
    assert len(p["q"]) == 3


# --- checked up front, not after the work ---------------------------------------------------

def test_train_format_refused_before_training(capsys, tmp_path):
    line = refused(["train", "--format", "bogus", "--out", str(tmp_path / "o")], capsys)
    assert line.startswith("error: unknown figure format 'bogus'")
    assert not (tmp_path / "o").exists()


def test_compile_backend_refused_as_the_command_line_is_read(capsys, tmp_path):
    line = refused(["campaign", "--device", "cpu", "--compile-backend", "nonsense",
                    "--out", str(tmp_path / "o")], capsys)
    assert "--compile-backend" in line and "unknown torch.compile backend 'nonsense'" in line
    assert "inductor" in line  # the known ones are named
    assert not (tmp_path / "o").exists()
    assert build_parser().parse_args(["campaign", "--compile-backend", "aot_eager"]
                                     ).compile_backend == "aot_eager"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["coordcheck", "lrsweep", "sweep"])
def test_gpu_preset_without_cuda_one_line(command, capsys, tmp_path):
    line = refused([command, "--preset", "gpu", "--out", str(tmp_path / "o")], capsys)
    assert "CUDA is not available" in line and "--device cpu" in line


def test_diagnose_empty_blocks_one_line(capsys, tmp_path):
    line = refused(["diagnose", str(tmp_path), "--blocks", "", "--out", str(tmp_path / "o")],
                   capsys)
    assert line.startswith("error: --blocks is empty")


# --- unbounded work: estimated, refused beyond the limit -----------------------------------

def test_train_beyond_days_refused_with_its_estimate(capsys, tmp_path):
    line = refused(["train", "--tokens", "1000000000000000", "--out", str(tmp_path / "o")],
                   capsys)
    assert "would take at least" in line and "years" in line and "FLOPs" in line
    assert "limit of 7 days" in line and "--tokens" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, lower", [
    (["coordcheck", "--steps", "1000000000000"], "--steps"),
    (["lrsweep", "--steps", "1000000000000"], "--steps"),
    (["sweep", "--batches", "1000000000000"], "--batches"),
])
def test_other_commands_beyond_days_refused(argv, lower, capsys, tmp_path):
    line = refused([*argv, "--out", str(tmp_path / "o")], capsys)
    assert "would take at least" in line and "limit of 7 days" in line and lower in line
    assert not (tmp_path / "o").exists()


def test_work_estimate_api():
    from analysis.testbed.memory import TIME_LIMIT, check_time, work_estimate
    from analysis.testbed.model import ModelConfig
    cfg = ModelConfig(depth=4, width=64, heads=4, max_seq_len=64)
    seconds, flops = work_estimate(cfg, 32_768, 8)
    assert 0 < seconds < 60 and flops > 6 * 1e5 * 32_768  # the CPU preset of train: seconds
    assert check_time([cfg], 32_768, 8) == seconds
    with pytest.raises(ValueError, match="over the limit of 7 days"):
        check_time([cfg], 10 ** 15, 8)
    deep = ModelConfig(depth=100_000, width=4, heads=1, max_seq_len=4)
    assert work_estimate(deep, 4, 1)[0] < TIME_LIMIT  # milliseconds to estimate at any depth


@pytest.mark.parametrize("command", [["train"], ["campaign", "--device", "cpu", "--tiny"]])
def test_bad_corpus_refused_before_any_folder(command, capsys, tmp_path):
    line = refused([*command, "--corpus", str(tmp_path / "missing"), "--out",
                    str(tmp_path / "o")], capsys)
    assert "does not exist" in line
    assert not (tmp_path / "o").exists()
