"""Every command-line option, declared once, and how options become config dataclasses.

``OPTIONS`` holds one declaration per option string: its flags, argparse type or action, a help
template and, where the option sets a config field, how its text becomes the field's value. A
command adds options by name (``add``); it may state its own default, help, choices or
requiredness, never its own flag, type or action. ``configure`` turns parsed options into a
config dataclass (ModelConfig, TrainConfig, AnalysisConfig, the width presets, CampaignConfig)
with ``dataclasses.replace``: an option sets the field of its own name, or the one ``FIELDS``
names, and an option left out (None) keeps the dataclass's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from analysis.infra.checks import check_compile_backend, check_list

# --- values: text → value; a ValueError names the option (one line, exit 2) ---------------------


def finite(text: str) -> float:
    """argparse type: a finite float (NaN and inf are refused, not silently propagated)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got '{text}'")
    return value


def _numbers(text: str, flag: str, cast: Callable[[str], float], what: str) -> list:
    try:
        values = [cast(v) for v in text.split(",") if v]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated {what}, got '{text}'") from None
    check_list(values, flag, text=text)  # not empty, nothing twice
    return values


def preset_config(presets: Mapping[str, Any], args: argparse.Namespace):
    """The preset ``--preset`` names with the user's options applied, validated, and the figure
    format checked: before any model is built or folder made."""
    check_format(args.format)
    cfg = configure(presets[args.preset], args)
    cfg.validate()  # the preset's device too (--preset gpu where CUDA is not: one line)
    return cfg


def ints(text: str, flag: str) -> list[int]:
    return _numbers(text, flag, int, "integers")


def floats(text: str, flag: str) -> list[float]:
    values = _numbers(text, flag, float, "numbers")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{flag} takes finite numbers > 0, got '{text}'")
    return values


def names(text: str, flag: str) -> tuple[str, ...]:
    """A comma-separated list of names."""
    values = tuple(n for n in text.split(",") if n)
    check_list(values, flag, text=text)  # not empty, nothing twice
    return values


def increasing(convert: Callable[[str, str], list]) -> Callable[[str, str], list]:
    """The list ``convert`` reads, refused unless increasing (sizes, depths, learning rates)."""
    def read(text: str, flag: str) -> list:
        values = convert(text, flag)
        check_list(values, flag, increasing=True, text=text)
        return values
    return read


def compile_backend(text: str) -> str:
    """argparse type: a torch.compile backend torch knows (refused as the command line is read)."""
    try:
        check_compile_backend(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def moe(text: str, flag: str) -> tuple[int, int]:
    """``E,k`` as (experts, top_k)."""
    try:
        experts, top_k = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--moe takes E,k (experts, top-k), got '{text}'") from None
    if experts < 1:  # E = 0 would silently train the dense model
        raise ValueError(f"--moe E,k needs E >= 1 experts, got '{text}' (leave --moe out for a "
                         "dense FFN)")
    return experts, top_k


def params(items: list[str], flag: str) -> dict[str, float]:
    """``NAME=NUMBER`` items as {name: number}."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ValueError(f"--param takes NAME=NUMBER, got '{item}'")
        if not math.isfinite(number):
            raise ValueError(f"--param {name} must be a finite number, got '{value}'")
        if name in out:
            raise ValueError(f"--param {name} is given twice ({out[name]:g} and {number:g})")
        out[name] = number
    return out


def text_for(pairs: list[str], flag: str) -> dict[str, str]:
    """``PATH=FILE`` pairs as {path: file}; each file must exist."""
    out = {}
    for pair in pairs or []:
        path, sep, text = pair.rpartition("=")
        if not sep or not path or not text:
            raise ValueError(f"--text-for takes PATH=FILE, got {pair!r}")
        if not Path(text).is_file():
            raise ValueError(f"--text-for {pair}: {text} is not a file")
        out[path] = text
    return out


# --- the declarations ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    help: str  # "{default}" in it: the default as shown (the command's, or "the preset's")
    kwargs: dict  # type, action, nargs, metavar: the same in every command
    convert: Callable[[Any, str], Any] | None = None  # text → a config field's value
    fields: Mapping[str, str | tuple[str, ...]] = dataclasses.field(default_factory=dict)
    config: bool = True  # False: never a config field, whatever its name

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.flags[0].lstrip("-").replace("-", "_")

    def field(self, config: object) -> str | tuple[str, ...]:
        """The field of ``config`` this option sets (its own name unless FIELDS says)."""
        return self.fields.get(type(config).__name__, self.fields.get("*", self.dest))


OPTIONS: dict[str, Option] = {}


def _declare(*flags: str, help: str, convert=None, fields=None, config=True, key=None,
             **kwargs) -> None:
    option = Option(flags, help, kwargs, convert, fields or {}, config)
    key = key or option.dest
    assert key not in OPTIONS, key
    OPTIONS[key] = option


# An option string used with two meanings, each declared here once: (option, the OPTIONS keys).
# None: `bench --width-transfer` (the width and depth transfer benchmark) was `bench --width`, a
# switch where every other --width is a size.
TWO_MEANINGS: dict[str, tuple[str, ...]] = {}


_TEXT = "text file or folder (default: the Python standard library)"
# positionals
_declare("path", help="checkpoint.pt / run folder, a Hugging Face model folder, a .gguf file, or a "
                      "state_dict file (.safetensors, .pt, .bin) with --config")
_declare("paths", nargs="+", help="checkpoints: sigprop runs, Hugging Face folders, GGUF files")
_declare("run_dir", help="a folder written by the analysis or `sweep`")
# where and how: device, output, figures, progress
_declare("--device", help="torch device: cpu, cuda, cuda:N (default: {default})")
_declare("--out", help="output folder (default: {default})", config=False)
_declare("--format", help="figure format: png, svg or pdf (default: {default})")
_declare("--quiet", action="store_true",
         help="no progress bars or progress lines; results and errors still print")
_declare("--compile", action=argparse.BooleanOptionalAction,
         help="run under torch.compile (default: {default})")
_declare("--compile-backend", type=compile_backend,
         help="torch.compile backend (default: {default}; aot_eager traces without codegen)")
_declare("--parallel", type=int, help="runs at once (default: {default})")
_declare("--preset", choices=["cpu", "gpu"], help="the preset's sizes (default: {default})")
# data
_declare("--corpus", help=_TEXT)
_declare("--corpora", convert=names, config=False,
         help="comma-separated: text (the default corpus), random (i.i.d. bytes) (default: "
              "{default})")
_declare("--text", help="text file to run through the model (default: the corpus's validation "
                        "split)")
_declare("--text-for", action="append", metavar="PATH=FILE", convert=text_for, config=False,
         help="this checkpoint reads FILE instead of --text (prose for English models, code for "
              "code models; repeatable)")
# model shape (ModelConfig and the sweeps' presets)
_declare("--scheme", help="registered scheme (default: {default})")
_declare("--schemes", convert=names, help="comma-separated schemes (default: {default})")
_declare("--depth", type=int, help="number of blocks L (default: {default})")
_declare("--depths", convert=increasing(ints),
         help="comma-separated increasing depths (default: {default})")
_declare("--width", type=int, help="model width d (default: {default})")
_declare("--widths", convert=increasing(ints),
         help="comma-separated increasing widths (default: {default})")
_declare("--base-width", type=int,
         help="with µP, the width at which it equals standard (default: {default})")
_declare("--heads", type=int, help="attention heads (default: {default})")
_declare("--seq-len", type=int, fields={"ModelConfig": "max_seq_len"},
         help="tokens per sequence (default: {default})")
_declare("--ffn", help="gelu, relu or swiglu (default: {default})")
_declare("--norm", help="layernorm or rmsnorm (default: {default})")
_declare("--moe", metavar="E,k", convert=moe, fields={"ModelConfig": ("experts", "top_k")},
         help="mixture of E experts, top-k routing (default: dense)")
_declare("--sigma", type=finite, help="init: weights ~ N(0, σ²/fan_in) (default: {default})")
_declare("--param", action="append", metavar="NAME=VALUE", convert=params,
         fields={"ModelConfig": "scheme_params"},
         help="override a scheme parameter, e.g. --param beta=0.1 (repeatable)")
_declare("--dtype", help="number format of weights and activations (default: {default})")
_declare("--tie-embeddings", action="store_true",
         help="the LM head reuses the token embedding, as nanoGPT (default: separate)")
_declare("--dropout", type=finite,
         help="dropout on attention, sublayer outputs and the embedding (default: {default})")
_declare("--parametrization",
         help="standard, or mup: µP's width scaling of init, multipliers and per-layer Adam "
              "learning rates (README, Beyond initialization) (default: {default})")
_declare("--parametrizations", convert=names,
         help="comma-separated: standard, mup, mup-nomult (default: {default})")
# measurement (sweeps, diagnose, atlas, calibrate)
_declare("--seed", type=int, help="init and batch seed (default: {default})")
_declare("--seeds", convert=ints, help="comma-separated seeds, a run each (default: {default})")
_declare("--batch", type=int, fields={"*": "batch_size"},
         help="sequences per batch (default: {default})")
_declare("--batches", type=int, help="batches per seed (default: {default})")
_declare("--sequences", type=int, help="at most this many sequences run forward (default: "
                                       "{default}; see --tolerance)")
_declare("--tolerance", type=float,
         help="stop sampling once every block's statistics have a standard error within this "
              "fraction of their value (default: {default}; 0: run every sequence)")
_declare("--grad-sequences", type=int, help="of those, how many also run backward for the "
                                            "gradient profile (default: {default})")
_declare("--skip-sequences", type=int,
         help="sequences for the skip test, each block replaced by the identity in turn "
              "(default: {default}; 0: off)")
_declare("--skip-positions", type=int,
         help="positions per sequence whose loss the skip test takes, a sample of its own per "
              "sequence (default: {default}; 0: every position)")
_declare("--init-sequences", type=int,
         help="sequences run through the same architecture re-initialized, to show what "
              "training changed and to compare the init theory (default: {default}; 0: off)")
# training (TrainConfig) and the width commands
_declare("--tokens", type=int, help="token budget per training run (default: {default})")
_declare("--lr", type=finite, help="peak learning rate (default: {default})")
_declare("--lrs", convert=increasing(floats),
         help="comma-separated increasing learning rates, log-spaced (default: {default})")
_declare("--steps", type=int, help="optimizer steps (default: {default})")
_declare("--optimizer", choices=["adam", "sgd"], help="default: {default}")
_declare("--optimizers", convert=names, config=False,
         help="comma-separated: adam, sgd (default: {default})")
_declare("--grad-clip", type=finite,
         help="clip the gradient norm to this value; 0 is off (default: off)")
_declare("--beta1", type=finite, help="Adam β1 (default: {default})")
_declare("--beta2", type=finite, help="Adam β2 (default: {default})")
_declare("--weight-decay", type=finite,
         help="AdamW weight decay, on tensors of dim >= 2 only (default: {default})")
_declare("--decay-embeddings", action=argparse.BooleanOptionalAction,
         help="also decay the token and position embeddings; --no-decay-embeddings decays the "
              "block matrices and an untied head only (default: decay them)")
_declare("--warmup", type=finite, fields={"*": "warmup_frac"},
         help="linear warmup, as a fraction of the steps (default: {default})")
_declare("--min-lr-ratio", type=finite, help="the cosine decays to lr × this (default: {default})")
_declare("--stall-fraction", type=finite,
         help="a run is 'stalled' if its training loss stays above this × the corpus's unigram "
              "entropy after --stall-share of its steps (default: {default})")
_declare("--stall-share", type=finite,
         help="the share of the steps after which a stall is judged (default: {default})")
_declare("--log-every", type=int, help="a train_log.csv row (smoothed training loss) per this "
                                       "many steps (default: {default})")
_declare("--tensorboard", action="store_true",
         help="also write TensorBoard event files in each run folder (needs the 'tensorboard' "
              "extra: pip install -e '.[tensorboard]')")
_declare("--ddp", action="store_true",
         help="under torchrun: train each run on every rank (DistributedDataParallel); without "
              "it, torchrun's ranks split the grid (README, Distributed)")
_declare("--fsdp", action="store_true",
         help="under torchrun: as --ddp, with each run's model sharded over the ranks (torch's "
              "fully_shard), for models that do not fit one device")
# campaign
_declare("--time-limit", type=finite,
         help="seconds this invocation may take; it stops cleanly before (default: {default})")
_declare("--stages", convert=names,
         help="comma-separated subset of dense_grid, probe_overhead, throughput, moe_grid, "
              "init_sweep (default: all, in that order)")
_declare("--results", config=False,
         help="folder for the study's verdicts, tables and figures (default: {default})")
_declare("--tiny", action="store_true",
         help="toy sizes: the same code path as a CPU rehearsal, minutes")
# checkpoints (diagnose, sample)
_declare("--config", help="JSON config for a bare state_dict: a sigprop ModelConfig dict or a "
                          "Hugging Face config.json", config=False)
_declare("--tokenizer", help="folder holding the tokenizer to use (default: the model folder's "
                             "own; for a bare state_dict, the one beside the weights or the "
                             "config; else bytes)")
_declare("--fail-on", choices=("warnings", "collapsed", "unusable"),
         help="exit with status 1 when the verdict is this bad or worse (for automation)")
_declare("--blocks", help="module path of the residual blocks' ModuleList, when they are not "
                          "found (as named in model.named_modules())")
_declare("--prompt", help="text to continue (default: {default!r}, for the default Python-source "
                          "corpus; '' starts from a newline byte or the model's "
                          "beginning-of-sequence token)")
_declare("--temperature", type=finite,
         help="divides the logits; 0: greedy, the most likely token (default: {default})")
_declare("--top-k", type=int,
         help="draw only among the k most likely tokens (default: {default}; 0: off)")
# theory, report, bench, fidelity, onestep
_declare("--theory", action="store_true", help="recompute the theory")
_declare("--latex", action="store_true", help="print recurrences and closed forms as LaTeX")
_declare("--grid", metavar="RUN_DIR",
         help="instead: from a sweep folder's init_profiles.csv, nothing measured, write "
              "gradient_spread.csv (g_0/g_L per seed and its spread in log10), and g_l/g_L's median "
              "across seeds against theory, with the noise floors and a χ² test over depths "
              "(typical_targets.csv, typical_by_depth.csv, and its growth order: typical_orders.csv)")
_declare("--spread-only", action="store_true",
         help="with --grid: write gradient_spread.csv alone, without the typical value (whose "
              "spread theory takes minutes per grid point at L ≥ 512)")
_declare("--redraw-embedding", action="store_true",
         help="the seed study runs each sequence alone with a token embedding table drawn afresh "
              "(the control for the table drawn once per model); the audit is unchanged")
_declare("--depth-schemes", convert=names, config=False,
         help="the depth study's schemes (default: {default})")
_declare("--depth-width", type=int, help="the depth study's width (default: {default})")
_declare("--shape", choices=["small", "gpt2", "tiny"],
         help="model shape for --probes and --train: small (d128 L4 T128), tiny (d32 L2 T32, the "
              "campaign's rehearsal) or gpt2 (d768 L12 T1024, for a GPU) (default: gpt2 on "
              "cuda, small on cpu)")
# bench: which benchmarks run (none given: every one); each flag is a benchmark's name
_declare("--probes", action="store_true",
         help="time a probed training step against an unprobed one")
_declare("--train", action="store_true",
         help="time training steps (tokens/s, MFU) and a small depth grid run in parallel")
_declare("--diagnose", action="store_true",
         help="time `diagnose` with its defaults on the all-MiniLM-L6-v2 and SmolLM2-135M shapes "
              "and a model whose LM head costs more than its blocks, each stage beside its "
              "floor, with its peak memory")
_declare("--components", action="store_true",
         help="relative error of every component moment map (linear, norms, MLPs, attention, "
              "MoE) against Monte Carlo with the testbed's modules at width 1024: forward second "
              "moment, output rho, gradient power (CPU, < 1 min)")
_declare("--width-transfer", key="bench_width", action="store_true", dest="width", config=False,
         help="time the default `coordcheck` (target ≤ 3 min) and `lrsweep` (≤ 10 min) against "
              "their floors, the plain steps of the same models (CPU, ~13 min)")
_declare("--diagnose-path", action="append", metavar="PATH",
         help="with --diagnose: also a real checkpoint (e.g. a released GGUF; repeatable)")


_OWN = ("default", "help", "choices", "required", "metavar")  # what a command may state itself


def add(parser: argparse.ArgumentParser, *names: str, config: object | None = None,
        shown: str | None = None, **own: Any) -> None:
    """Add the declared options ``names`` (their dest names) to ``parser``.

    ``config``: a config dataclass whose values are the defaults (and shown as such); ``shown``:
    the default as the help states it where it is not a value (e.g. "the preset's"); ``own``:
    what this command states itself (``_OWN``), for every name given."""
    assert set(own) <= set(_OWN), set(own) - set(_OWN)
    for name in names:
        option = OPTIONS[name]
        kwargs = {**option.kwargs, **own}
        if config is not None and "default" not in own:
            field = option.field(config)
            kwargs["default"] = getattr(config, field) if isinstance(field, str) else None
        default = kwargs.get("default")
        text = shown if shown is not None else default
        kwargs["help"] = kwargs.get("help", option.help).format(default=text)
        parser.add_argument(*option.flags, **kwargs)


def value(values: argparse.Namespace | Mapping, name: str) -> Any:
    """The option ``name`` of ``values`` as a config takes it (converted; None if not given)."""
    raw = values.get(name) if isinstance(values, Mapping) else getattr(values, name, None)
    option = OPTIONS[name]
    if raw is None or option.convert is None:
        return raw
    return option.convert(raw, option.flags[0])


def configure(config, values: argparse.Namespace | Mapping, **given: Any):
    """``config`` (a dataclass) with every option in ``values`` that sets one of its fields, and
    ``given`` fields, in place of its values; an option left out (None) keeps the config's.
    Lists become the field's own sequence type (list or tuple)."""
    own = {f.name for f in dataclasses.fields(config)}
    items = values if isinstance(values, Mapping) else vars(values)
    changes: dict[str, Any] = {}
    for name in items:
        option = OPTIONS.get(name)
        if option is None or not option.config:
            continue
        field = option.field(config)
        targets = field if isinstance(field, tuple) else (field,)
        if not set(targets) <= own:
            continue
        v = value(items, name)
        if v is None:
            continue
        parts = v if isinstance(field, tuple) else (v,)
        for target, part in zip(targets, parts):
            current = getattr(config, target)
            if isinstance(current, (list, tuple)) and isinstance(part, (list, tuple)):
                part = type(current)(part)
            changes[target] = part
    return dataclasses.replace(config, **{**changes, **given})


# --- what several commands do with their output ----------------------------------------------


def check_format(fmt: str) -> None:
    from figures.style import FORMATS
    if fmt not in FORMATS:
        raise ValueError(f"unknown figure format '{fmt}' (known: {', '.join(FORMATS)})")


# Settings that change how a command runs or shows its results, never what they are: a folder
# made with one value is the same command's folder with another (a sweep resumed on a GPU).
HOW_NOT_WHAT = frozenset({"out", "quiet", "device", "format", "parallel", "time_limit", "compile",
                          "compile_backend", "compile_scope", "tensorboard", "log_every",
                          "fail_on", "ddp", "fsdp", "latex", "autocast", "check_every",
                          "timing_warmup", "command", "func"})


def settings(args: argparse.Namespace, *configs: object, grows: tuple[str, ...] = ()) -> dict:
    """What an output folder's stamp records of a command: every field of ``configs`` (the
    resolved values, so a default and the same value given are one setting) and every option
    that sets none of their fields, less ``HOW_NOT_WHAT`` and ``grows`` (the lists a resumable
    command's folder may grow by, e.g. a grid's depths and seeds)."""
    out: dict[str, Any] = {}
    for config in configs:
        out.update(dataclasses.asdict(config))
    for name in vars(args):
        option = OPTIONS.get(name)
        sets_field = option is not None and option.config and any(
            set(f if isinstance(f, tuple) else (f,)) <= {x.name for x in dataclasses.fields(c)}
            for c in configs for f in (option.field(c),))
        if not sets_field:
            out[name] = value(args, name) if option is not None else getattr(args, name)
    return {k: v for k, v in out.items() if k not in HOW_NOT_WHAT and k not in grows}


def claim(args: argparse.Namespace, *configs: object, grows: tuple[str, ...] = (),
          default: str | None = None):
    """``args.out`` (or ``default``) as this command's output folder: made, locked and stamped
    (analysis.infra.folders.claim); ``args.out`` is set to it, for what an interruption names."""
    from analysis.infra.folders import claim as claim_folder
    out = claim_folder(args.out or default, args.command, settings(args, *configs, grows=grows))
    args.out = str(out)
    return out


# --- the shared groups -----------------------------------------------------------------------


def output(p: argparse.ArgumentParser, out: str, *, quiet: bool = True, **own) -> None:
    """Output folder (``out``: its default as shown), figure format, and --quiet."""
    add(p, "out", shown=out, **own)
    add(p, "format", default="png")
    if quiet:
        add(p, "quiet")


def measurement(p: argparse.ArgumentParser, command: str) -> None:
    """How `diagnose` and `atlas` measure a checkpoint: text, sample sizes, device, output."""
    from analysis.diagnose.measure import SKIP_POSITIONS
    add(p, "text")
    add(p, "sequences", default=64)
    add(p, "tolerance", default=0.05)
    add(p, "grad_sequences", default=16)
    add(p, "seq_len", default=256, help="tokens per sequence, cut to the model's maximum "
                                        "(default: 256)")
    add(p, "batch", default=8, help="sequences per forward pass (default: 8)")
    add(p, "skip_sequences", default=4)
    add(p, "skip_positions", default=SKIP_POSITIONS)
    add(p, "init_sequences", default=8)
    add(p, "dtype", default="float32", choices=["float32", "bfloat16"],
        help="weights and activations: float32, or bfloat16 for half the memory, its rounding "
             "noted in the report (default: float32)")
    add(p, "device", default="cpu")
    output(p, f"runs/{command}-<timestamp>", quiet=False)


MEASUREMENT = ("text", "sequences", "tolerance", "grad_sequences", "seq_len", "batch",
               "skip_sequences", "skip_positions", "init_sequences", "dtype", "device")


def measurement_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of analysis.diagnose.diagnosis.diagnose that ``measurement`` set."""
    return {name: getattr(args, name) for name in MEASUREMENT}
