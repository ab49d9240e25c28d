"""Result files written whole or not at all.

Every writer here writes a temp file in the target's own folder (``.NAME.PID.XXXX.tmp``), flushes
it to disk and renames it over the target (``os.replace``, atomic on one file system): a reader,
a kill -9 or a full disk never leaves half a file in place of a good one. The temp is removed on
any failure, Ctrl-C included; one left by a killed process (its PID gone) is removed the next time
the same file is written. An OSError names the file it was writing.

Logs appended as a run goes (``train_log.csv``, a sweep's rows) use ``Appender``/``append_csv``:
a write that fails is rolled back to the last whole line, and ``repair_tail`` drops a line torn by
a kill before a resumed run reads or appends.
"""

from __future__ import annotations

import errno
import glob
import os
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
UMASK = os.umask(0o022)  # read once (it can only be read by setting it), then put back
os.umask(UMASK)


def _chain(e: BaseException | None):
    """``e``, then what caused it or was being handled when it was raised, and so on."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def no_space(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a full disk or an exhausted quota."""
    return any(isinstance(c, OSError) and c.errno in NO_SPACE for c in _chain(e))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale(path: Path) -> None:
    """Remove temps of ``path`` left by processes that no longer run (killed mid-write)."""
    with suppress(OSError):
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            pid = tmp.name[len(path.name) + 2:].split(".")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)


def _sync(fd: int) -> None:
    """The file's data on disk before it is renamed into place (a crash then leaves the old file
    or the new one, never an empty one); file systems that cannot sync (EINVAL) are let be."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def _named(e: OSError, path: Path) -> OSError:
    if not e.filename:
        e.filename = str(path)
    return e


def atomic(path: str | os.PathLike, write: Callable[[IO], Any], binary: bool = False) -> Path:
    """Call ``write(f)`` on a temp file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                                   suffix=".tmp")
    except OSError as e:  # named by the file it was for, not the temp's name
        e.filename = str(path)
        raise
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8",
                                                          newline="")) as f:
            write(f)
            f.flush()
            _sync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp's 0600 → what open() would have made
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _named(e, path)
        if no_space(e):  # torch's serializer: its RuntimeError over the ENOSPC of our file
            code = next(c.errno for c in _chain(e) if getattr(c, "errno", None) in NO_SPACE)
            raise OSError(code, os.strerror(code), str(path)) from e
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``path`` holds ``text`` (UTF-8), whole."""
    return atomic(path, lambda f: f.write(text))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``path`` holds ``data``, whole."""
    return atomic(path, lambda f: f.write(data), binary=True)


def write_json(path: str | os.PathLike, obj: Any, **kwargs) -> Path:
    """``path`` holds ``json.dumps(obj, **kwargs)``, whole (serialized before anything is
    written, so an unserializable object leaves the old file as it was)."""
    import json
    return write_text(path, json.dumps(obj, **kwargs))


def write_csv(frame, path: str | os.PathLike, **kwargs) -> Path:
    """``frame.to_csv(path, **kwargs)`` (a pandas DataFrame), whole."""
    return atomic(path, lambda f: frame.to_csv(f, **kwargs))


def save_figure(fig, path: str | os.PathLike, **kwargs) -> Path:
    """``fig.savefig(path, **kwargs)`` (matplotlib), whole; the format from the suffix unless
    ``format`` is given."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or None)
    return atomic(path, lambda f: fig.savefig(f, **kwargs), binary=True)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, whole. Written through a Python file, so a full disk is an
    OSError (ENOSPC) naming ``path``, not torch's bare serialization RuntimeError."""
    import torch
    return atomic(path, lambda f: torch.save(obj, f), binary=True)


def repair_tail(path: str | os.PathLike) -> bool:
    """Cut a last line that a kill or a full disk left without its newline; whether it did."""
    path = Path(path)
    try:
        with path.open("rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if not size:
                return False
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return False
            keep = 0
            step = 1 << 16
            end = size
            while end > 0:  # the last newline, read backwards in chunks
                start = max(0, end - step)
                f.seek(start)
                chunk = f.read(end - start)
                i = chunk.rfind(b"\n")
                if i >= 0:
                    keep = start + i + 1
                    break
                end = start
            f.truncate(keep)
            return True
    except FileNotFoundError:
        return False
    except OSError as e:
        raise _named(e, path)


class Appender:
    """A text file appended line by line: each ``write`` lands whole or, if it fails (a full
    disk), is rolled back, so the file always ends with a whole line. A line torn by a kill is
    cut when the file is opened again."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        repair_tail(self.path)
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise _named(e, self.path)

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        size = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except BaseException as e:
            with suppress(OSError):
                os.ftruncate(self.fd, size)
            if isinstance(e, OSError):
                raise _named(e, self.path)
            raise

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append_csv(frame, path: str | os.PathLike, **kwargs) -> Path:
    """Append ``frame``'s rows to the CSV ``path`` (its header first when the file is new or
    empty), all of them or none; a line torn by an earlier kill is cut first."""
    path = Path(path)
    repair_tail(path)
    if not path.exists() or not path.stat().st_size:  # new: written whole, never empty
        return write_csv(frame, path, **kwargs)
    with Appender(path) as f:
        f.write(frame.to_csv(None, header=False, **kwargs))
    return path


def kept_summary(folder: str | os.PathLike) -> str:
    """What a folder holds, in a few words, for the line that names what a failure kept."""
    folder = Path(folder)
    try:
        files = [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")]
    except OSError:
        return "nothing readable"
    parts = []
    runs = folder / "runs"
    if runs.is_dir():  # a training grid: its runs, finished or resumable
        with suppress(OSError):
            folders = [r for r in runs.iterdir() if r.is_dir()]
            done = [r for r in folders if _status(r / "result.json") not in (None, "cut")]
            ckpts = sum((r / "checkpoint.pt").exists() for r in folders if r not in done)
            parts.append(f"{len(done)} finished run{'s' * (len(done) != 1)}")
            if len(folders) > len(done):
                parts.append(f"{len(folders) - len(done)} unfinished ({ckpts} with a checkpoint "
                             "to resume from)")
    names = sorted(f.name for f in files if f.name != "sigprop.json")
    if names:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        parts.append(shown)
    return (", ".join(parts) or "nothing yet") + f" in {folder}, every file written whole"


def _status(record: Path) -> str | None:
    """A run record's status ('ok' for records older than statuses); None if none is readable."""
    import json
    try:
        return json.loads(record.read_text()).get("status") or "ok"
    except (OSError, ValueError, AttributeError):
        return None
