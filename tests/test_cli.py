"""The command line is declared once: one declaration per option string (analysis/cli/options.py),
options mapped onto the config dataclasses in one place, every command's --help as Markdown."""

import argparse
import ast
from collections import Counter
from pathlib import Path

import pytest

from analysis.cli import COMMANDS, build_parser, options
from analysis.cli.help import _subparsers, markdown

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "run_analysis.py", *sorted((ROOT / "analysis" / "cli").glob("*.py")),
           *[ROOT / p for p in ("analysis/init/fidelity.py", "analysis/width/onestep.py",
                                "analysis/diagnose/calibration.py")]]


def _calls(name: str):
    """(file, call) for every call of a function or method ``name`` in the command-line sources."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                if (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)) == name:
                    yield path, node


def test_every_option_string_is_declared_once():
    # argparse is called in one place only, options.add, with the declaration's flags
    sites = [(p.name, c.lineno) for p, c in _calls("add_argument")]
    assert len(sites) == 1 and sites[0][0] == "options.py", sites
    assert not list(_calls("ArgumentParser")), "a command line of its own, outside analysis.cli"
    # each option string is in exactly one _declare call (literal flags, counted in the source) …
    flags = Counter(a.value for _, c in _calls("_declare") for a in c.args
                    if isinstance(a, ast.Constant) and isinstance(a.value, str))
    twice = {f for f, n in flags.items() if n > 1}
    assert twice == set(options.TWO_MEANINGS) == set(), twice
    # … and every option of every command comes from a declaration, whole (flags, type, action)
    declared: dict[str, list] = {}
    for o in options.OPTIONS.values():
        declared.setdefault(o.flags[0], []).append(o)
    parser = build_parser("sigprop")
    commands = _subparsers(parser)
    assert list(commands) == list(COMMANDS)
    used = Counter()
    for name, p in commands.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            first = action.option_strings[0] if action.option_strings else action.dest
            assert first in declared, (name, first)
            used[first] += 1
            # the declaration whole: its flags (BooleanOptionalAction adds --no-…), type, nargs
            assert any(action.option_strings[:len(o.flags)] == list(o.flags) or not
                       action.option_strings and o.flags == (action.dest,) for o in declared[first])
            assert any(action.type is o.kwargs.get("type")
                       and action.nargs == o.kwargs.get("nargs", action.nargs)
                       for o in declared[first]), (name, first)
    assert used["--device"] >= 8 and used["--out"] >= 6 and used["--format"] >= 6
    unused = set(declared) - set(used)
    assert not unused, unused


def test_options_map_onto_the_config_dataclasses():
    from analysis.testbed.model import ModelConfig
    from analysis.training.train import TrainConfig
    from analysis.width.coordcheck import PRESETS
    tc = options.configure(TrainConfig(), {"warmup": 0.2, "batch": 3, "lr": None, "width": 64,
                                           "tokens": 100}, seed=5)
    assert (tc.warmup_frac, tc.batch_size, tc.lr, tc.tokens, tc.seed) == (0.2, 3, TrainConfig().lr,
                                                                           100, 5)
    mc = options.configure(ModelConfig(), {"seq_len": 32, "moe": "4,2", "param": ["alpha=0.5"],
                                           "scheme": "span", "batch": 9})
    assert (mc.max_seq_len, mc.experts, mc.top_k, mc.scheme_params) == (32, 4, 2, {"alpha": 0.5})
    cc = options.configure(PRESETS["cpu"], {"widths": "64,128", "seeds": "3", "seq_len": 16})
    assert (cc.widths, cc.seeds, cc.seq_len) == ((64, 128), (3,), 16)
    with pytest.raises(ValueError, match="--depths takes comma-separated integers"):
        options.value({"depths": "2,x"}, "depths")
    # the defaults `train` shows and uses are the dataclasses'
    train = _subparsers(build_parser("sigprop"))["train"]
    defaults = {a.dest: a.default for a in train._actions}
    for dest, field in (("beta1", "beta1"), ("warmup", "warmup_frac"), ("log_every", "log_every"),
                        ("decay_embeddings", "decay_embeddings")):
        assert defaults[dest] == getattr(TrainConfig(), field)
    assert defaults["dropout"] == ModelConfig().dropout
    assert f"(default: {TrainConfig().beta2})" in " ".join(train.format_help().split())


def test_every_command_help_renders_as_markdown():
    text = markdown()
    for name in COMMANDS:
        assert f"## `sigprop {name}`" in text
    assert "```text\nusage: sigprop train" in text and "--stall-fraction" in text
    assert "{default}" not in text and "None)" not in text  # every default stated


def test_module_command_lines_are_the_subcommands(capsys):
    from analysis.diagnose import calibration
    from analysis.init import fidelity
    from analysis.width import onestep
    assert fidelity.main(["--seeds", "1"]) == 2
    assert onestep.main(["--optimizers", "lion"]) == 2
    with pytest.raises(SystemExit) as e:  # --out is required
        calibration.main(["x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err


def test_console_script_is_declared():
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["sigprop"] == "analysis.cli:main"
    assert len((ROOT / "run_analysis.py").read_text().splitlines()) <= 100
