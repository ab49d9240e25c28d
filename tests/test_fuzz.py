"""The command line's contract, held by a fuzzer (hypothesis): every command, given a tiny valid
command line with one option or path replaced by a generated value, either accepts it or ends
with exit status 2 and one `error:` line, within seconds: never a traceback, never a hang, never
a folder another command owns.

"Accepts" is observed where the work would begin: a command that writes a folder claims it
(analysis.infra.folders.claim) after validating everything and before any model is built. The
fast run stops each command there (the claim itself runs, so a folder owned by another command
is still refused); commands that write no folder run whole at their tiny size. `-m slow` runs
thousands of examples, and also lets the accepted ones run, under a time limit.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from analysis.cli import COMMANDS, build_parser, main
from analysis.cli.options import OPTIONS, finite
from analysis.infra import folders

TINY_MODEL = ["--width", "16", "--heads", "2", "--seq-len", "16"]
# A tiny, valid command line per command; {run} is a trained sigprop run, {sweep} a sweep folder,
# {out} a fresh output folder.
BASE = {
    "schemes": ["schemes"],
    "model": ["model", "--depth", "2", "--width", "16", "--heads", "2"],
    "sweep": ["sweep", "--schemes", "pre", "--depths", "2", "--seeds", "0", *TINY_MODEL,
              "--batch", "2", "--batches", "1", "--quiet", "--out", "{out}"],
    "report": ["report", "{sweep}"],
    "train": ["train", "--schemes", "pre", "--depths", "2", *TINY_MODEL, "--tokens", "1024",
              "--quiet", "--out", "{out}"],
    "campaign": ["campaign", "--tiny", "--device", "cpu", "--quiet", "--out", "{out}"],
    "theory": ["theory", "--scheme", "pre", "--out", "{out}"],
    "coordcheck": ["coordcheck", "--schemes", "pre", "--widths", "16,32", "--quiet", "--out",
                   "{out}"],
    "lrsweep": ["lrsweep", "--schemes", "pre", "--quiet", "--out", "{out}"],
    "diagnose": ["diagnose", "{run}", "--sequences", "2", "--grad-sequences", "1", "--out", "{out}"],
    "sample": ["sample", "{run}", "--tokens", "4"],
    "atlas": ["atlas", "{run}", "--sequences", "2", "--out", "{out}"],
    "fidelity": ["fidelity", "--schemes", "pre", "--depth", "2", "--width", "16", "--heads", "2",
                 "--seeds", "2", "--out", "{out}"],
    "onestep": ["onestep", "--schemes", "pre", "--width", "32", "--base-width", "16", "--depth",
                "2", "--heads", "2", "--seeds", "0", "--depths", "2,4", "--out", "{out}"],
    "calibrate": ["calibrate", "{run}", "--out", "{out}"],
    "spread": ["spread", "--schemes", "pre", "--depths", "2", "--seeds", "0,1,2", "--widths", "16",
               "--seq-len", "16", "--quiet", "--out", "{out}"],
    "readings": ["readings", "--preset", "tiny", "--stages", "verdicts", "--quiet", "--out",
                 "{out}"],
}
# bench has no tiny size: its options are fuzzed for parsing only (see test_bench_options_parse)
SKIPPED = {"bench": "times real work at fixed sizes; its options are parsed below, not run"}

# Values a user could type, good and bad, by what the option takes.
TEXT = st.sampled_from(["", ",", ",,", "a", "a,b", "-1", "-1,2", "0", "1e400", "nan", "inf",
                        "-inf", "1,1", "2,1", "x\x00y", "é", " ", "1e15", "999999999999999",
                        "-2,1", "0.5", "1.5", "cuda", "none", "../", "=1", "beta=nan"])
INTS = st.one_of(st.integers(-3, 3).map(str), st.sampled_from(["10000000000000", "2.5", "", "x",
                                                                "-0", "1e3"]))
FLOATS = st.one_of(st.sampled_from(["nan", "inf", "-inf", "-1", "-0.5", "0", "1", "2", "1e308",
                                    "1e-320", "x", ""]),
                   st.floats(-4, 4, allow_nan=False, allow_subnormal=False).map(repr))
LISTS = st.one_of(TEXT, st.lists(st.integers(-2, 70), min_size=0, max_size=4)
                  .map(lambda xs: ",".join(map(str, xs))))
PATHS = st.sampled_from(["missing", "empty", "random_bytes", "other_commands_folder", "sweep",
                         "run", "text", "folder_of_files"])


def value_strategy(option) -> st.SearchStrategy[str]:
    """Generated text for one declared option, by its type."""
    kind = option.kwargs.get("type")
    if option.kwargs.get("choices"):
        return st.one_of(st.sampled_from(list(option.kwargs["choices"])), TEXT)
    if kind is int:
        return INTS
    if kind in (finite, float):
        return FLOATS
    if option.convert is not None:
        return LISTS
    return TEXT


class Claimed(Exception):
    """The command validated its input and claimed its folder: the work would begin now."""


class Hung(BaseException):
    pass


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The files fuzzed paths point at: a trained run, a sweep folder, broken files."""
    root = tmp_path_factory.mktemp("fuzz")
    run_grid = root / "grid"
    assert main([*[a.replace("{out}", str(run_grid)) for a in BASE["train"]]]) == 0
    sweep = root / "sweep"
    assert main([a.replace("{out}", str(sweep)) for a in BASE["sweep"]]) == 0
    (root / "empty").write_bytes(b"")
    (root / "random_bytes").write_bytes(bytes(range(256)) * 8)
    (root / "text").write_text("def f(x):\n    return x\n" * 50)
    other = root / "other_commands_folder"
    other.mkdir()
    (other / folders.STAMP).write_text(json.dumps({"command": "atlas", "settings": {}}))
    mine = root / "folder_of_files"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    return {"root": root, "run": str(next((run_grid / "runs").iterdir())), "sweep": str(sweep),
            "grid": str(run_grid),
            "missing": str(root / "missing"),
            **{k: str(root / k) for k in ("empty", "random_bytes", "text",
                                          "other_commands_folder", "folder_of_files")}}


def run_contract(argv: list[str], cwd: Path, *, stop_at_claim: bool,
                 limit_s: int) -> tuple[int | str, str]:
    """Run ``argv`` in this process, in ``cwd``; (exit status or "accepted", stderr). Fails the
    test on a traceback or after ``limit_s`` seconds."""
    real_claim = folders.claim

    def claim_then_stop(*a, **k):
        real_claim(*a, **k)
        raise Claimed

    def hung(*_):
        raise Hung

    err = io.StringIO()
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(limit_s)
    here = os.getcwd()
    os.chdir(cwd)  # a generated --out (or a default one) lands in the case's own folder
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if stop_at_claim:
                folders.claim = claim_then_stop
            try:
                status: int | str = main(argv)
            except SystemExit as e:  # argparse's errors
                status = e.code
            except Claimed:
                status = "accepted"
            except Hung:
                pytest.fail(f"no answer within {limit_s} s: {argv}")
            except Exception:
                pytest.fail(f"traceback for {argv}:\n{traceback.format_exc()}")
    finally:
        os.chdir(here)
        folders.claim = real_claim
        folders.release_all()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return status, err.getvalue()


def check_contract(argv: list[str], status, stderr: str, out: Path | None,
                   others: dict[Path, str]) -> None:
    """The README's contract for one finished command line."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, (argv, stderr)
    if status == 2:
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], (argv, lines)
        assert len(errors[0]) < 1000, (argv, errors[0])
    else:
        assert status in (0, 1, "accepted"), (argv, status, lines)
    for folder, owner in others.items():  # a folder another command owns keeps its owner
        stamp = json.loads((folder / folders.STAMP).read_text())
        assert stamp["command"] == owner, (argv, stamp)
    if status in (0, "accepted") and out is not None and (out / folders.STAMP).exists():
        assert json.loads((out / folders.STAMP).read_text())["command"] == argv[0]


def mutations(command: str) -> st.SearchStrategy[tuple[str, str]]:
    """(option string, generated value), or ("PATH", kind) for the positional path."""
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    by_flag = {o.flags[0]: o for o in OPTIONS.values()}
    choices = []
    for action in sub._actions:
        if not action.option_strings:
            if action.dest in ("path", "paths", "run_dir"):
                choices.append(st.tuples(st.just("PATH"), PATHS))
            continue
        flag = action.option_strings[0]
        if flag in ("-h", "--help", "--device"):  # --device: there is no GPU to fuzz it with
            continue
        if flag == "--out":  # also folders that are not this command's to write
            choices.append(st.tuples(st.just(flag), st.one_of(TEXT, st.sampled_from(
                ["@other_commands_folder", "@folder_of_files", "@sweep", "@grid"]))))
            continue
        if action.nargs == 0:  # a switch: given or not
            choices.append(st.tuples(st.just(flag), st.just("")))
        elif flag in by_flag:
            choices.append(st.tuples(st.just(flag), value_strategy(by_flag[flag])))
        else:
            choices.append(st.tuples(st.just(flag), TEXT))
    return st.one_of(choices)


def command_line(command: str, files: dict, out: Path, mutation: tuple[str, str]) -> list[str]:
    """BASE[command] filled in, with ``mutation`` applied (a value given last wins)."""
    argv = [a.format(run=files["run"], sweep=files["sweep"], out=out) for a in BASE[command]]
    flag, value = mutation
    value = files[value[1:]] if value.startswith("@") else value
    if flag == "PATH":
        positional = 1  # every command's path is its first argument
        argv[positional] = files[value]
    elif value == "" and flag.startswith("--") and sub_is_switch(command, flag):
        argv.append(flag)
    else:
        argv.append(f"{flag}={value}")  # `=`: a value that starts with '-' stays a value
    return argv


def sub_is_switch(command: str, flag: str) -> bool:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return any(flag in a.option_strings and a.nargs == 0 for a in sub._actions)


FUZZED = sorted(BASE)
OWNED = {"other_commands_folder": "atlas", "sweep": "sweep", "grid": "train"}  # fixture → owner


def test_every_command_is_fuzzed_or_named():
    assert set(FUZZED) | set(SKIPPED) == set(COMMANDS)


def fuzz(command: str, files: dict, data, tmp: Path, *, stop_at_claim: bool, limit_s: int):
    case = tmp / f"case{len(list(tmp.iterdir()))}"
    case.mkdir()
    mutation = data.draw(mutations(command), label="mutation")
    target = mutation[1] if mutation[0] == "--out" else None
    out = case / "out"
    argv = command_line(command, files, out, mutation)
    others = {Path(files[k]): cmd for k, cmd in OWNED.items()}
    status, stderr = run_contract(argv, case, stop_at_claim=stop_at_claim, limit_s=limit_s)
    check_contract(argv, status, stderr, out if target is None else None, others)


@pytest.mark.parametrize("command", FUZZED)
@settings(max_examples=6, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_contract(command, files, data, tmp_path):
    fuzz(command, files, data, tmp_path, stop_at_claim=True, limit_s=60)


@pytest.mark.slow
@pytest.mark.parametrize("command", FUZZED)
@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_contract_many(command, files, data, tmp_path):
    fuzz(command, files, data, tmp_path, stop_at_claim=True, limit_s=60)


@pytest.mark.slow
@pytest.mark.parametrize("command", FUZZED)
@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_contract_run_through(command, files, data, tmp_path):
    """Accepted command lines run whole: they end within the limit, with status 0, 1 or 2."""
    fuzz(command, files, data, tmp_path, stop_at_claim=False, limit_s=300)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(flag=st.sampled_from(["--theory", "--probes", "--train", "--diagnose", "--components",
                             "--width-transfer", "--shape", "--parallel", "--diagnose-path",
                             "--compile"]), value=TEXT)
def test_bench_options_parse(flag, value):
    """bench's options: a bad value is refused by the parser in one line (nothing is run)."""
    parser = build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parser.parse_args(["bench", f"{flag}={value}"])
            code = 0
        except SystemExit as e:
            code = e.code
    assert code in (0, 2)
    if code == 2:
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines


# --- the Python API: config values ---------------------------------------------------------------

NUMBERS = st.one_of(st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),
                    st.sampled_from([0, -1, 2.5, 10**15]))


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_api_configs_raise_value_error_or_hold(data):
    """Config dataclasses given any numbers either validate or raise ValueError: nothing else."""
    import dataclasses

    from analysis.testbed.model import ModelConfig
    from analysis.training.train import TrainConfig
    kind = data.draw(st.sampled_from(["model", "train"]))
    cls = ModelConfig if kind == "model" else TrainConfig
    numeric = [f.name for f in dataclasses.fields(cls) if f.type in ("int", "float")
               or f.type in (int, float)]
    field = data.draw(st.sampled_from(numeric))
    value = data.draw(NUMBERS)
    try:
        cfg = cls(**{field: value})
        if kind == "train":
            cfg.validate(64)
    except ValueError:
        return
    assert getattr(cfg, field) == value or value != value  # kept as given (NaN is never equal)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(depth=st.one_of(st.integers(-2, 6), st.sampled_from([2.5, 0.0, float("nan")])),
       q0=st.one_of(st.none(), st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1.0])),
       rho0=st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.0, float("nan")]))
def test_api_predict_profile_raises_value_error_or_predicts(depth, q0, rho0):
    import numpy as np

    from theory.solve import predict_profile
    try:
        p = predict_profile("pre", depth=depth, seq_len=8, q0=q0, rho0=rho0)
    except ValueError:
        return
    assert isinstance(depth, int) and depth >= 1 and len(p["q"]) == depth + 1
    assert np.isfinite(p["q"]).all()
