"""Output folders: made, proved writable, owned and locked before any work goes into them.

Every command that writes a folder claims it first (``claim``). The claim

- stamps the folder with ``sigprop.json``: the command, its settings and the stamp's version;
- refuses a folder stamped by another command, or by the same command with other settings
  (naming the first difference), and a folder of files no sigprop command wrote;
- locks the folder for this process (``.sigprop.lock``, an advisory ``flock`` with the pid and
  host in it): a second writer is refused in one line. The operating system drops the lock when
  its process ends, however it ends, so a lock left by a killed process is never in the way.

``annotate`` is the claim of a command that adds to another's folder (``report`` rebuilds a
sweep's report): it locks, and checks the owner instead of stamping.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from analysis.infra.files import write_json
from analysis.infra.records import read_record

STAMP = "sigprop.json"
LOCK = ".sigprop.lock"
STAMP_VERSION = 1

# Folders written before stamps existed: the first file (a glob) of this table a folder holds names
# the command that wrote it (a sweep folder also holds theory.json, so sweep comes before theory).
SIGNATURES: tuple[tuple[str, str], ...] = (
    ("campaign.json", "campaign"), ("init_profiles.csv", "sweep"), ("train_runs.csv", "train"),
    ("runs/*/settings.json", "train"),
    ("lrsweep.csv", "lrsweep"), ("coordcheck.csv", "coordcheck"), ("diagnosis.json", "diagnose"),
    ("atlas_layers.csv", "atlas"), ("seed_study.csv", "fidelity"),
    ("gradient_spread.csv", "fidelity"), ("linearity.csv", "onestep"), ("blocks.csv", "calibrate"),
    ("theory.json", "theory"))

_held: dict[Path, int] = {}  # folder → the open lock file's descriptor, for this process's life
_made: set[Path] = set()  # folders this process's claims created


def writable_dir(path: str | os.PathLike | None) -> Path:
    """``path`` (default: runs/<timestamp>) created and checked writable; ValueError naming it."""
    out = Path(path) if path else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").touch()
        (out / ".write_test").unlink()
    except OSError as e:
        raise ValueError(f"output folder {out} is not writable ({e.strerror})") from None
    return out


def claim(path: str | os.PathLike | None, command: str, settings: Mapping[str, Any]) -> Path:
    """The output folder of ``command``: writable, locked by this process and stamped with its
    settings; ValueError naming the owner or the first setting that differs."""
    new = path is None or not Path(path).exists()
    out = writable_dir(path)
    lock(out, command)
    if new:
        _made.add(out.resolve())
    try:
        stamp = read_record(out / STAMP)
        if stamp is None:
            check_unstamped(out, (command,), command)
        else:
            check_stamp(out, stamp, command, settings)
        write_stamp(out, command, settings)
    except BaseException:
        release(out)
        raise
    return out


def annotate(path: str | os.PathLike, owners: Iterable[str], command: str) -> Path:
    """A folder written by one of ``owners`` that ``command`` adds to: checked and locked, its
    stamp left as it is; ValueError naming its owner where that is another command."""
    out = Path(path)
    if not out.is_dir():
        raise ValueError(f"{out} is not a folder")
    out = writable_dir(out)
    lock(out, command)
    try:
        stamp = read_record(out / STAMP)
        owner = owner_of_unstamped(out) if stamp is None else stamp.get("command")
        if owner is not None and owner not in owners:  # no owner: the command says what lacks
            raise ValueError(f"{out} holds the output of `{owner}`; `{command}` works on the "
                             f"folders of `{'`, `'.join(owners)}`")
    except BaseException:
        release(out)
        raise
    return out


def owner_of_unstamped(out: Path) -> str | None:
    """The command whose files an unstamped folder holds (None: none of sigprop's)."""
    return next((cmd for pattern, cmd in SIGNATURES if any(out.glob(pattern))), None)


def check_unstamped(out: Path, owners: tuple[str, ...], command: str) -> None:
    """Refuse an unstamped folder that holds another command's files, or files of no command."""
    files = sorted(f.name for f in out.iterdir() if not f.name.startswith("."))
    if not files:
        return
    owner = owner_of_unstamped(out)
    if owner in owners:
        return  # written before stamps by the command that owns it: stamped from now on
    if owner is not None:
        raise ValueError(f"{out} holds the output of `{owner}`, not of `{command}`: choose another "
                         "--out folder")
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    raise ValueError(f"{out} is not empty and holds no sigprop output ({shown}): choose an empty "
                     "or new --out folder")


def check_stamp(out: Path, stamp: dict, command: str, settings: Mapping[str, Any]) -> None:
    """Refuse a stamp of another command, or of other settings (a setting one side lacks, e.g.
    one added in a newer version, is not compared)."""
    if stamp.get("command") != command:
        raise ValueError(f"{out} holds the output of `{stamp.get('command')}`, not of `{command}`: "
                         "choose another --out folder")
    old, new = stamp.get("settings") or {}, normalized(settings)
    for key in sorted(set(old) & set(new)):
        if old[key] != new[key]:
            raise ValueError(f"{out} holds `{command}` with {key} = {shown_value(old[key])}, not "
                             f"{shown_value(new[key])}: choose another --out folder or the same "
                             "settings")


def write_stamp(out: Path, command: str, settings: Mapping[str, Any]) -> None:
    """``sigprop.json``, written whole."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        sigprop_version = version("sigprop")
    except PackageNotFoundError:
        sigprop_version = None
    record = {"command": command, "settings": normalized(settings),
              "sigprop_version": sigprop_version, "stamp_version": STAMP_VERSION}
    write_json(out / STAMP, record, indent=1)


def normalized(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as their JSON reads back (tuples become lists, paths strings)."""
    return json.loads(json.dumps(dict(settings), default=str))


def shown_value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# --- the lock ---------------------------------------------------------------------------------


def lock(out: Path, command: str) -> None:
    """Lock ``out`` for this process; ValueError naming the process that holds it."""
    key = out.resolve()
    if key in _held:
        return  # this process holds it already
    path = out / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            raise ValueError(f"{out} is being written by another sigprop process "
                             f"({describe(holder)}): wait for it to end, or choose another --out "
                             "folder") from None
        except OSError as e:  # a file system without locks: go on unlocked, rather than refuse
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
                return
            raise
        # The holder before us may have removed the file as it released: lock what is there now.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(me).encode())
    _held[key] = fd


def describe(holder: str) -> str:
    """What a lock file says of its process, as a phrase."""
    try:
        h = json.loads(holder)
        return f"`{h['command']}`, pid {h['pid']} on {h['host']}, since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that is starting"


def held() -> frozenset[Path]:
    """The folders this process holds locked now."""
    return frozenset(_held)


def release(out: Path) -> None:
    """Remove and unlock ``out``'s lock (if this process holds it)."""
    fd = _held.pop(out.resolve(), None)
    if fd is None:
        return
    try:
        (out / LOCK).unlink(missing_ok=True)
    except OSError:
        pass  # a folder gone read-only or removed: the lock goes with the descriptor anyway
    os.close(fd)


def release_all(failed: bool = False) -> None:
    """Release every folder this process locked (the command line does, as a command ends);
    ``failed``: also remove each folder a claim created that holds nothing but its stamp, so a
    command that fails leaves no empty folder behind."""
    for folder in list(_held):
        release(folder)
        if failed and folder in _made and all(f.name.startswith(".") or f.name == STAMP
                                              for f in folder.iterdir()):
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
    _made.clear()
