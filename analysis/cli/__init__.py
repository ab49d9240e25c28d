"""sigprop's command line: one module per command, each with ``add_arguments(parser)`` and
``run(args) -> int``; the options they share are declared once in analysis.cli.options.

``main`` is what `sigprop` and `python run_analysis.py` run: bad input is one ``error: …`` line
and exit status 2, Ctrl-C one line naming what was kept and the command that resumes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import sys

from analysis.infra import progress

# command → module of analysis/cli/, in the order --help lists them
COMMANDS = {"schemes": "schemes", "model": "model", "sweep": "sweep", "report": "report",
            "train": "train", "campaign": "campaign", "theory": "theory", "bench": "bench",
            "coordcheck": "coordcheck", "lrsweep": "lrsweep", "diagnose": "diagnose",
            "sample": "sample", "atlas": "atlas", "fidelity": "fidelity", "onestep": "onestep",
            "calibrate": "calibrate", "readings": "readings", "spread": "spread"}
RESUMABLE = ("sweep", "train", "campaign", "lrsweep", "readings", "spread")  # commands that keep what finished and resume
DESCRIPTION = ("sigprop: signal propagation in deep Transformers, theory against measurement. "
               "With no command (or only sweep options, e.g. --preset gpu) it runs the main "
               "analysis, `sweep`, at CPU size into runs/<timestamp>/.")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``error: …`` (exit 2), like every other
    refusal of bad input; the usage is one ``--help`` away.

    A value that starts with a minus and a digit, a point or inf/nan (``--lrs -1e-3,2e-3``,
    ``--moe -2,1``, ``--sigma -inf``) is a value, not an option (argparse's own matcher takes only
    ``-1`` and ``-1.5``), so the option's own check names what is wrong with it; no option
    string looks like a negative number (build_parser asserts it)."""

    NEGATIVE = re.compile(r"^-(\.?\d|inf|nan)", re.IGNORECASE)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = self.NEGATIVE

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def command_module(name: str):
    return importlib.import_module(f"analysis.cli.{COMMANDS[name]}")


def program() -> str:
    """How the user called us: `sigprop` (the console script) or `run_analysis.py`."""
    return "sigprop" if os.path.basename(sys.argv[0] or "") == "sigprop" else "run_analysis.py"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = Parser(prog=prog or program(), description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = command_module(name)
        first = module.__doc__.strip().split("\n\n")[0].replace("\n", " ")
        p = sub.add_parser(name, help=first, description=first)
        module.add_arguments(p)
        assert not p._has_negative_number_optionals, name  # "-1" must stay a value
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for unusable input)."""
    import torch
    # Deep post-norm backward makes denormal gradients, which slow CPU matmuls ~5×; flushing them
    # to 0 changes no statistic we report. Set before torch starts its threads, which inherit it.
    torch.set_flush_denormal(True)
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["sweep", *argv]  # the main job: `run_analysis.py [sweep options]`
    args = parser.parse_args(argv)
    progress.configure(quiet=getattr(args, "quiet", False))
    status = 2  # until the command returns its own
    try:
        if args.command != "diagnose" and getattr(args, "device", None):
            from analysis.infra.device import resolve_device
            resolve_device(args.device)  # every command: a bad device in one line, before work
        status = args.func(args)
        return status
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder that cannot be read or written
        if no_space(e):  # a full disk or quota: what was kept, and how to go on
            print(no_space_line(args, argv, e, parser.prog), file=sys.stderr)
            return 2
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(interrupted(args, argv, e, parser.prog), file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:
        out = getattr(args, "out", None)
        kept = f"; what finished is kept in {out}" if out else ""
        print(f"error: out of memory on {getattr(args, 'device', 'the device')} (the estimate "
              f"before the run was too low){kept}: lower --batch, --seq-len or the deepest "
              "depth", file=sys.stderr)
        return 2
    except (torch.distributed.DistError, RuntimeError) as e:  # a rank failed or stopped answering
        if no_space(e, getattr(args, "out", None)):  # torch's serializer on a full disk
            print(no_space_line(args, argv, e, parser.prog), file=sys.stderr)
            return 2
        transport = any(w in str(e) for w in ("gloo", "NCCL", "Connection closed by peer"))
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and (isinstance(e, torch.distributed.DistError) or transport)):
            raise  # a bug, not a lost rank: its traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"error: a collective across torchrun's ranks failed ({first}); another rank "
              "failed or stopped answering: see its own error line", file=sys.stderr)
        return 1
    finally:
        from analysis.infra.folders import release_all
        # the output folders' locks (the OS drops them at exit too, however it ends), and a
        # folder made for a command that failed before writing anything
        release_all(failed=status != 0)


def interrupted(args: argparse.Namespace, argv: list[str], e: KeyboardInterrupt,
                prog: str = "run_analysis.py") -> str:
    """The one line for Ctrl-C: what was kept (the message of analysis.infra.budget.Interrupted, where
    the work said) and the exact command that resumes, naming the output folder."""
    detail = str(e)
    out = getattr(args, "out", None)
    if args.command not in RESUMABLE or not out:
        return "error: interrupted" + (f" ({detail})" if detail else "")
    kept = detail or "what finished"
    resume = resume_command(argv, out, prog)
    return f"error: interrupted; kept in {out}: {kept}; resume with: {resume}"


def resume_command(argv: list[str], out: str, prog: str = "run_analysis.py") -> str:
    """The command line that resumes ``argv``: the same, naming its output folder ``out``."""
    has_out = any(a == "--out" or a.startswith("--out=") for a in argv)
    caller = ["sigprop"] if prog == "sigprop" else ["python", "run_analysis.py"]
    return shlex.join([*caller, *argv, *([] if has_out else ["--out", out])])


def no_space(e: BaseException, out: str | None = None) -> bool:
    """Whether ``e`` is a full disk (or quota): an OSError ENOSPC/EDQUOT, also as the cause or
    context of another error, or torch's serialization RuntimeError (it carries no errno) while
    the output folder ``out`` has (almost) no space left."""
    from analysis.infra.files import no_space as oserror_no_space
    if oserror_no_space(e):
        return True
    text = f"{e} {e.__context__ or ''}"
    if out and isinstance(e, RuntimeError) and any(
            w in text for w in ("PytorchStreamWriter", "inline_container", "iostream error",
                                "file write failed")):
        import shutil
        try:
            return shutil.disk_usage(out).free < 1 << 20
        except OSError:
            return False
    return False


def no_space_line(args: argparse.Namespace, argv: list[str], e: BaseException,
                  prog: str = "run_analysis.py") -> str:
    """The one line for a full disk: the folder it was writing, what is kept there (every file
    written whole or not at all, analysis.infra.files) and the command that goes on."""
    from pathlib import Path

    from analysis.infra.files import kept_summary
    out = getattr(args, "out", None)
    name = getattr(e, "filename", None)
    folder = Path(name) if name else Path(out) if out else Path.cwd()
    if name and not folder.is_dir():
        folder = folder.parent
    kept = kept_summary(out or folder)
    line = f"error: no space left on device writing {folder}; kept: {kept}; free space and rerun"
    if args.command not in RESUMABLE or not out:
        return f"{line} the same command"
    return f"{line} the same command to resume: {resume_command(argv, out, prog)}"


def run_subcommand(argv: list[str]) -> int:
    """Run a command from inside another (a study's stages run `lrsweep`, `train`): the folders it
    locks are released as it ends, the caller's stay locked; its errors reach the caller's main."""
    from analysis.infra import folders
    before = folders.held()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    finally:
        for folder in folders.held() - before:
            folders.release(folder)


def module_main(command: str, argv: list[str] | None = None) -> int:
    """``python -m analysis.…`` for a module whose command line is the subcommand ``command``."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])
