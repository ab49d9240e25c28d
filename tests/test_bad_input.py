"""Bad input: a one-line error naming the problem; ValueError in Python, exit 2 on the CLI."""

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


@pytest.mark.parametrize("kwargs,_,message", CASES)
def test_api_raises_value_error(kwargs, _, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelConfig(**{"scheme": "span", **kwargs})


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "run_analysis.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("_,argv,message", CASES)
def test_cli_one_line_exit_2(_, argv, message):
    r = run_cli("model", *argv)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {message}" or r.stderr.strip().startswith(f"error: {message}")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_corpus_errors_cli_and_api(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    for path, message in [(tmp_path / "missing", "does not exist"), (empty, "is empty")]:
        with pytest.raises(ValueError, match=message):
            load_corpus(path)
        r = run_cli("model", "--corpus", str(path))
        assert r.returncode == 2 and message in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_schemes_command_lists_every_scheme():
    r = run_cli("schemes")
    assert r.returncode == 0
    for name in ["post", "pre", "span", "deepnorm", "b2t", "peri", "mixln", "lns"]:
        assert f"\n{name}\n" in f"\n{r.stdout}"
    assert "alpha = " in r.stdout and "beta = " in r.stdout and "rho = 1/4" in r.stdout
    assert run_cli("schemes", "--scheme", "nope").returncode == 2


def test_model_command_runs_on_a_small_corpus(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    r = run_cli("model", "--scheme", "post", "--depth", "3", "--width", "32", "--corpus", str(text),
                "--seq-len", "32", "--batch", "2")
    assert r.returncode == 0, r.stderr
    assert "grad norm" in r.stdout and "(finite)" in r.stdout and "bits/byte" in r.stdout
