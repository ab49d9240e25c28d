"""Every command README.md and docs/*.md show runs, shrunk to a tiny size.

The commands are read from the docs themselves: each line of a fenced code block and each inline
`code span` that starts with ``python run_analysis.py``, ``sigprop``, ``python -m analysis.…`` or
``torchrun … run_analysis.py`` (after ``$ ``, ``VAR=value`` and ``/usr/bin/time -v``; ``\\``
continuations joined, ``&&`` and ``;`` split), and each code span that starts with a subcommand
name and an option (``train --corpus input.txt …``, ``bench --theory``). Each is, by the rules
below, one of:

- **run**: rewritten to a tiny size by one table of shrink rules (``TINY``: the same subcommand
  and options, small values, a few size options added where the command leaves them at their
  defaults; ``--device cuda`` → cpu; every ``--out`` a fresh folder under tmp_path), the
  checkpoints and files it names replaced by tiny ones the test builds (``STAND_INS``), and run
  in-process through ``analysis.cli.main`` (or the module's ``main`` for ``python -m``); it must
  exit 0, and no training run it makes may diverge at step 0. By default one command per
  subcommand runs (the first in the docs, or ``PREFERRED``), each list of schemes cut to its
  first; the rest, and the subcommands in ``SLOW_ONLY``, run under ``-m slow`` as documented.
- **reference**: a synopsis (``[--opt]``, ``…``, ``a|b``, ``{…}``) or a code span that names
  options without values (``theory --out``): every option it names must be an option of that
  subcommand, and ``SUBCOMMAND --help`` exits 0.
- **skip**: listed in ``SKIP`` with its reason (its options are still checked as a reference).

test_every_documented_command_is_accounted_for asserts that every extracted command falls in
exactly one class, that no SKIP or PREFERRED entry is stale, and that no placeholder (an
upper-case word such as PATH) is left unreplaced in a command that runs.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from analysis.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# --- the rules

# Commands that cannot run here, with why (whitespace-normalized text as the docs show it).
SKIP = {
    "python run_analysis.py bench":
        "every benchmark part at its fixed benchmark size (minutes on 2 cores); each part is run "
        "on its own from the docs: bench --theory, --components, --width-transfer, --diagnose",
    "python run_analysis.py bench --width-transfer":
        "times coordcheck and lrsweep at their CPU presets (about 10 minutes on 2 cores); bench "
        "has no size options. coordcheck and lrsweep themselves run from the docs",
    "python run_analysis.py bench --diagnose --diagnose-path SmolLM2-135M-Instruct.Q4_1.gguf":
        "besides the path, diagnoses three models it builds at full size (the SmolLM2-135M shape, "
        "a 256 000-word head: minutes); bench has no size options. diagnose itself runs on "
        "a tiny GGUF from the docs",
    "python run_analysis.py campaign --device cuda --out runs/campaign":
        "the GPU campaign (a CUDA device, about 18 minutes on an H200); its CPU rehearsal `campaign --device cpu --tiny "
        "…` from the same docs runs",
    "PYTHONUNBUFFERED=1 python3 run_analysis.py campaign --device cuda --parallel 4 --out runs/campaign "
    "--time-limit 530":
        "the GPU campaign (a CUDA device, about 18 minutes on an H200), as above",
    "torchrun --nproc_per_node=8 run_analysis.py train --device cuda --depths 6,12,24,48,96,192 "
    "--out runs/grid": "8 ranks on CUDA devices under torchrun",
    "torchrun --nproc_per_node=8 run_analysis.py train --device cuda --ddp --depths 48,96,192 "
    "--out runs/deep": "8 ranks on CUDA devices under torchrun",
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 "
    "--rdzv_id=grid1 run_analysis.py train --device cuda --out runs/grid":
        "two nodes of 8 CUDA devices under torchrun",
    "torchrun --nproc_per_node=2 run_analysis.py train --schemes pre --depths 1,2 --tokens 8192 "
    "--ddp": "2 processes under torchrun (gloo); tests/test_distributed.py runs this very command",
}

# Per subcommand: option → tiny value. An option the command gives is shrunk to it; one it leaves
# at its default is added (where the subcommand has it), so every run is tiny.
TINY = {
    "sweep": {"--depths": "2", "--width": "32", "--heads": "4", "--seeds": "0", "--batch": "2",
              "--batches": "1", "--seq-len": "16"},
    "train": {"--depths": "2", "--width": "32", "--heads": "2", "--seq-len": "32", "--batch": "4",
              "--tokens": "512", "--seeds": "0", "--parallel": "1"},
    "coordcheck": {"--widths": "32,64", "--depth": "2", "--steps": "2", "--seeds": "0",
                   "--batch": "2", "--seq-len": "16", "--heads": "4", "--base-width": "32"},
    "lrsweep": {"--widths": "32", "--depths": "2", "--lrs": "1e-3,4e-3,1.6e-2", "--steps": "4",
                "--seeds": "0", "--batch": "2", "--seq-len": "16", "--heads": "4"},
    "fidelity": {"--depth": "2", "--seeds": "2", "--width": "32", "--heads": "4", "--seq-len": "16"},
    "onestep": {"--width": "32", "--base-width": "16", "--depth": "2", "--seeds": "0",
                "--depths": "2,4", "--depth-width": "32", "--seq-len": "16", "--heads": "4"},
    "diagnose": {"--sequences": "4", "--grad-sequences": "2", "--seq-len": "32", "--batch": "2",
                 "--skip-sequences": "2", "--skip-positions": "8", "--init-sequences": "2"},
    "atlas": {"--sequences": "4", "--grad-sequences": "2", "--seq-len": "32", "--batch": "2",
              "--skip-sequences": "2", "--skip-positions": "8", "--init-sequences": "2"},
    "calibrate": {"--sequences": "4", "--seq-len": "32", "--skip-sequences": "2"},
    "sample": {"--tokens": "8"},
    "campaign": {"--parallel": "1"},
    "readings": {"--preset": "tiny"},
    "spread": {"--depths": "2", "--widths": "16", "--seeds": "0,1,2", "--seq-len": "16"},
}
EVERYWHERE = {"--device": {"cuda": "cpu"}}  # values swapped in any command
# In the default run only, lists of schemes keep their first (or pre where the command leaves
# the list at its default): a scheme's theory takes seconds to derive whatever the sizes; under
# -m slow every run keeps the documented list.
FIRST_SCHEME = ("--schemes", "--depth-schemes")

# What the docs name that is not here (released checkpoints, the outputs of long recipes, the
# reader's own files), and the tiny stand-in the test builds for it.
STAND_INS = {
    "PATH": "run",  # any checkpoint: a tiny trained sigprop run
    "FOLDER": "hf",  # a Hugging Face folder (the 1.5B memory check)
    "FILE.gguf": "gguf",
    "$M": "hf",  # all-MiniLM-L6-v2, a BERT encoder folder
    "$G": "gguf",  # SmolLM2-135M-Instruct.Q4_1.gguf
    "SmolLM2-135M-Instruct.Q4_1.gguf": "gguf",
    "$TEXT": "text",
    "input.txt": "text",  # nanoGPT's Tiny Shakespeare
    "$R/*-dense-s0": "run",  # the CPU training grid's dense runs
    "$R/*moe4k2-s0": "moe_run",  # and its MoE runs
    "runs/nanogpt-shape/runs/span-L16-d128-dense-s0": "run",  # a run of the nanoGPT-shape recipe
    "runs/init-w256-all": "sweep",  # the width-256 init grid
    "runs/init-w256-all16": "sweep",  # its 16-seed grid to L = 256
    "runs/init-w256-deep16": "sweep",  # and pre and peri at L = 512, 1024
}

# The command run by default for a subcommand, where it is not the first the docs show.
PREFERRED = {
    "train": "train --corpus input.txt",  # nanoGPT's shakespeare_char recipe, tied embeddings
    "diagnose": "python run_analysis.py diagnose PATH",
}
SLOW_ONLY = {  # subcommands none of whose documented commands fits the default budget
    "campaign": "about a minute even at --tiny (it compiles, with aot_eager)",
    "readings": "about a minute even at --preset tiny (every stage trains; tests/test_readings.py "
                "runs it under -m slow too)",
    "bench": "fixed benchmark sizes: --theory's position-resolved profile at L = 256, T = 128 "
             "alone takes 13 s on 2 busy cores, --components 12 s",
}

MODULES = {"analysis.init.fidelity": "fidelity", "analysis.width.onestep": "onestep",
           "analysis.diagnose.calibration": "calibrate"}
PREFIX = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:/usr/bin/time -v\s+)?(?:python3?\s+run_analysis\.py\b"
                    r"|sigprop(?=\s|$)|python3?\s+-m\s+analysis\.\S+|torchrun\b.*?\brun_analysis\.py\b)")
NAMES = "|".join(COMMANDS)
BARE = re.compile(rf"^({NAMES})\s+-")
SYNOPSIS = re.compile(r"[\[\]…{}|]|\.\.\.")
PLACEHOLDER = re.compile(r"(?<![\w/.-])(?:[A-Z][A-Z_]*(?:\.\w+)?|\$\w+)(?![\w/])")


# --- extraction

@dataclass
class Doc:
    text: str  # whitespace-normalized, as the docs show it
    where: list[str] = field(default_factory=list)  # file:line of each place it is shown
    bare: bool = False  # a code span starting with the subcommand (no `python run_analysis.py`)


def _pieces(text: str) -> list[tuple[int, str, str]]:
    """(line, "fence" or "span", text) of each fenced line and each inline code span."""
    out, fenced = [], False
    for n, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            out.append((n, "fence", line))
    prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.DOTALL)
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        out.append((prose.count("\n", 0, m.start()) + 1, "span", m.group(1)))
    return out


def extract() -> list[Doc]:
    """Every command the docs show, once each, in the order of first appearance."""
    found: dict[str, Doc] = {}
    for path in DOCS:
        joined, buf, start = [], "", 0
        for n, kind, s in _pieces(path.read_text()):
            if kind == "span":
                joined.append((n, kind, s))
                continue
            buf, start = (f"{buf} {s.strip()}", start) if buf else (s.strip(), n)
            if buf.endswith("\\"):
                buf = buf[:-1].rstrip()
                continue
            joined.append((start, kind, buf))
            buf = ""
        for n, kind, s in joined:
            s = re.sub(r"^\$\s+", "", " ".join(s.split()))
            for part in re.split(r"\s*(?:&&|;)\s+", s):
                part = re.sub(r"\s+#.*$", "", part).strip()
                bare = kind == "span" and bool(BARE.match(part))
                if PREFIX.match(part) or bare:
                    doc = found.setdefault(part, Doc(part, bare=bare))
                    doc.where.append(f"{path.relative_to(ROOT)}:{n}")
    return list(found.values())


def split_command(text: str) -> tuple[str | None, str, list[str]]:
    """(module for `python -m`, subcommand, argv after it) of a documented command."""
    words = shlex.split(text.replace("\\|", "|"))
    while words and (re.match(r"^[A-Z_]+=", words[0]) or words[0] in ("/usr/bin/time", "-v")):
        words = words[1:]
    module = None
    if words[0] in ("python", "python3") and words[1] == "-m":
        module, words = words[2], words[3:]
        return module, MODULES.get(module, "?"), words
    if words[0] == "torchrun":
        words = words[words.index("run_analysis.py"):]
    if words[0] in ("python", "python3"):
        words = words[1:]
    words = words[1:] if words[0] in ("run_analysis.py", "sigprop") else words
    if not words or words[0].startswith(("-", "[")):
        return None, "sweep", words  # no command: the main analysis, `sweep`
    return None, words[0], words[1:]


_PARSER = build_parser("run_analysis.py")
_SUBPARSERS = next(a for a in _PARSER._actions if a.dest == "command").choices


def options_of(sub: str) -> dict:
    return _SUBPARSERS[sub]._option_string_actions


def named_options(argv: list[str]) -> list[str]:
    return [w.split("=")[0] for w in " ".join(argv).replace("[", " ").replace("]", " ").split()
            if w.startswith("--")]


def kind_of(doc: Doc) -> str:
    """run, reference or skip (rules in the module's docstring)."""
    if doc.text in SKIP:
        return "skip"
    if SYNOPSIS.search(doc.text):
        return "reference"
    _, sub, argv = split_command(doc.text)
    if doc.bare:  # a code span: a recipe if it parses and gives an option a value, else a mention
        opts = options_of(sub)
        valued = any(opts[w].nargs != 0 and i + 1 < len(argv) and not argv[i + 1].startswith("-")
                     for i, w in enumerate(argv) if w in opts)
        return "run" if valued and parses([sub, *argv]) else "reference"
    return "run"


def parses(argv: list[str]) -> bool:
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            _PARSER.parse_args(argv)
        return True
    except SystemExit:
        return False


COMMANDS_SHOWN = extract()
RUN = [d for d in COMMANDS_SHOWN if kind_of(d) == "run"]


def _default_runs() -> set[str]:
    """One command per subcommand: PREFERRED's, else the first shown."""
    chosen: dict[str, str] = {}
    for d in RUN:
        sub = split_command(d.text)[1]
        want = PREFERRED.get(sub)
        if sub in SLOW_ONLY:
            continue
        if want is not None and d.text.startswith(want):
            chosen[sub] = d.text
        elif want is None:
            chosen.setdefault(sub, d.text)
    return set(chosen.values())


DEFAULT_RUNS = _default_runs()


# --- the stand-ins

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y = [1, 2]\n")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Builders of the tiny files and checkpoints STAND_INS names (each built once, on demand)."""
    root = tmp_path_factory.mktemp("stand_ins")
    built: dict[str, Path] = {}

    def text() -> Path:
        path = root / "input.txt"
        path.write_text(TEXT * 200)
        return path

    def run(experts: int = 0) -> Path:
        from analysis.testbed.corpus import load_corpus
        from analysis.testbed.model import ModelConfig
        from analysis.training.train import TrainConfig, train_run
        mc = ModelConfig(scheme="pre", depth=2, width=32, heads=4, max_seq_len=64,
                         experts=experts, top_k=2 if experts else 0)
        tc = TrainConfig(tokens=64 * 4 * 6, batch_size=4, lr=3e-3, evals=1, eval_batches=1)
        folder = root / ("moe-run" if experts else "run")
        train_run(mc, tc, load_corpus(get("text")), folder, log=lambda s: None)
        return folder

    def hf() -> Path:
        import transformers
        torch.manual_seed(0)
        folder = root / "hf-bert"
        transformers.BertModel(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=120, max_position_embeddings=64)).save_pretrained(folder)
        return folder

    def gguf() -> Path:
        from test_diagnose_gguf import _reference, _write  # their tiny llama.cpp file
        return _write(root / "tiny-llama.gguf", _reference())

    def sweep() -> Path:
        folder = root / "sweep"
        assert main(["sweep", "--schemes", "pre", "--quiet", "--out", str(folder),
                     *[x for k, v in TINY["sweep"].items() for x in (k, v)]]) == 0
        return folder

    builders = {"text": text, "run": run, "moe_run": lambda: run(experts=4), "hf": hf,
                "gguf": gguf, "sweep": sweep}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = builders[kind]()
        return built[kind]
    return get


def tiny_argv(doc: Doc, get, tmp_path: Path, few_schemes: bool) -> tuple[str | None, list[str]]:
    """(module or None, argv) of ``doc`` at a tiny size, every path a stand-in or under tmp_path;
    ``few_schemes``: each scheme list cut to its first (FIRST_SCHEME)."""
    module, sub, argv = split_command(doc.text)
    argv = list(argv)
    for i, w in enumerate(argv):
        if w in STAND_INS:
            path = get(STAND_INS[w])
            if STAND_INS[w] == "sweep":  # report writes into it: a copy of its own
                path = Path(shutil.copytree(path, tmp_path / f"grid{i}"))
            argv[i] = str(path)
        if i and argv[i - 1] in EVERYWHERE:
            argv[i] = EVERYWHERE[argv[i - 1]].get(w, w)
    opts = options_of(sub)
    for option, value in TINY.get(sub, {}).items():
        if option in argv:
            argv[argv.index(option) + 1] = value
        elif option in opts:
            argv += [option, value]
    for option in FIRST_SCHEME if few_schemes else ():
        if option in argv:
            i = argv.index(option) + 1
            argv[i] = argv[i].split(",")[0]
        elif option in opts:
            argv += [option, "pre"]
    if "--out" in opts:
        out = str(tmp_path / "out")
        if "--out" in argv:
            argv[argv.index("--out") + 1] = out
        else:
            argv += ["--out", out]
    if "--quiet" in opts and "--quiet" not in argv:
        argv.append("--quiet")
    implicit = module is None and not re.search(rf"(?:^|\s)({NAMES})(?:\s|$)", doc.text)
    return module, argv if module or implicit else [sub, *argv]  # no command: main's own default


def run_cli(module: str | None, argv: list[str]) -> int:
    entry = importlib.import_module(module).main if module else main
    try:
        return entry(argv)
    except SystemExit as e:  # argparse: --help exits 0, a bad option 2
        return int(e.code or 0)


# --- the tests

def test_every_documented_command_is_accounted_for():
    texts = {d.text for d in COMMANDS_SHOWN}
    assert len(COMMANDS_SHOWN) > 40, "the extraction found too few commands"
    assert not set(SKIP) - texts, f"SKIP entries no longer in the docs: {set(SKIP) - texts}"
    for sub, want in PREFERRED.items():
        assert any(d.text.startswith(want) for d in RUN), f"PREFERRED {sub}: {want!r} not shown"
    kinds = {d.text: kind_of(d) for d in COMMANDS_SHOWN}
    assert set(kinds.values()) <= {"run", "reference", "skip"}
    for d in COMMANDS_SHOWN:
        module, sub, argv = split_command(d.text)
        assert sub in COMMANDS, f"{d.where}: {d.text!r} names no subcommand ({sub})"
        if module is not None:
            assert importlib.import_module(module).main, module
        if kinds[d.text] == "run":
            left = [w for i, w in enumerate(argv) if PLACEHOLDER.fullmatch(w)
                    and w not in STAND_INS and not (i and argv[i - 1] == "--out")]
            assert not left, f"{d.where}: {d.text!r} has placeholders no stand-in replaces: {left}"
    ran = {split_command(t)[1] for t in DEFAULT_RUNS}
    shown = {split_command(d.text)[1] for d in RUN}
    assert shown - ran <= set(SLOW_ONLY), shown - ran  # every subcommand that runs, by default


REFERENCES = [d for d in COMMANDS_SHOWN if kind_of(d) in ("reference", "skip")]


@pytest.mark.parametrize("doc", REFERENCES, ids=[d.text[:60] for d in REFERENCES])
def test_documented_synopses_name_real_options(doc, capsys):
    _, sub, argv = split_command(doc.text)
    opts = options_of(sub)
    unknown = [o for o in named_options(argv) if o not in opts]
    assert not unknown, f"{doc.where}: {sub} has no option {', '.join(unknown)}"
    assert run_cli(None, [sub, "--help"]) == 0
    assert f"usage: run_analysis.py {sub}" in capsys.readouterr().out


def test_help_runs_for_the_program_and_every_subcommand(capsys):
    assert run_cli(None, ["--help"]) == 0
    for sub in COMMANDS:
        assert run_cli(None, [sub, "--help"]) == 0, sub
    for module in MODULES:
        assert run_cli(module, ["--help"]) == 0, module
    capsys.readouterr()


def _marks(doc: Doc):
    return [] if doc.text in DEFAULT_RUNS else [pytest.mark.slow]


@pytest.mark.parametrize("doc", [pytest.param(d, marks=_marks(d), id=d.text[:70]) for d in RUN])
def test_documented_command_runs(doc, stand_ins, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # whatever a command writes beside --out lands here
    module, argv = tiny_argv(doc, stand_ins, tmp_path, few_schemes=doc.text in DEFAULT_RUNS)
    t0 = time.perf_counter()
    rc = run_cli(module, argv)
    err = capsys.readouterr().err
    assert rc == 0, (f"{doc.where}: {doc.text}\nran as: {module or 'run_analysis.py'} "
                     f"{shlex.join(argv)}\nexit {rc}\n{err[-3000:]}")
    for record in sorted((tmp_path / "out").glob("runs/*/result.json")):  # a training recipe
        r = json.loads(record.read_text())
        assert not (r["diverged"] and r["divergence_step"] == 0), (doc.where, r["divergence_reason"])
    print(f"{time.perf_counter() - t0:.1f} s: {shlex.join(argv)}")
