"""Fault tests: every result file is written whole or not at all, whatever stops the writer.

A ``kill -9`` at any moment (mid-write included), a read-only folder and a full disk: afterwards
every file in the output folder is complete (each CSV parses and ends with a whole line, each
JSON parses, each PNG opens, each checkpoint loads with ``weights_only=True``), the error is one
line, and the same command resumes and finishes. The read-only folder and the full disk are real
mounts (a read-only bind, a small tmpfs): as root, chmod stops no write; without root they skip.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis.infra import files

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--schemes", "pre", "--depths", "2", "--width", "16", "--heads", "2",
         "--seq-len", "16", "--tokens", "4000", "--quiet"]
QUICK = [a if a != "4000" else "2048" for a in TRAIN]  # 16 steps: the default run's kill test
SWEEP = ["sweep", "--schemes", "pre", "--depths", "2,4", "--seeds", "0", "--width", "16",
         "--heads", "2", "--seq-len", "16", "--batch", "2", "--batches", "1", "--quiet"]


# --- helpers ------------------------------------------------------------------------------------


def command(argv: list[str], out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "run_analysis.py"), *argv, "--out", str(out)]


def run(argv: list[str], out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(argv, out), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def temps(out: Path) -> list[Path]:
    """The temp files of writes in progress (or of writers killed mid-write)."""
    return [p for p in out.rglob(".*.tmp")] if out.exists() else []


def kill_when(argv: list[str], out: Path, when, timeout: float = 300) -> bool:
    """Start the command; SIGKILL it as soon as ``when(out)`` holds (polled every few ms).
    Whether it was killed (False: it ended first, and must have ended well)."""
    p = subprocess.Popen(command(argv, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + timeout
    try:
        while p.poll() is None:
            if when(out) or time.monotonic() > end:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
                return True
            time.sleep(0.003)
        err = p.stderr.read()
        assert p.returncode == 0, err
        return False
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()


# Run the command in a process that SIGKILLs itself in the middle of the ``nth`` write of the file
# named ``name``: a whole-file write (analysis.infra.files.atomic) with its temp half written, just
# before it would be renamed into place; an appended row (files.Appender) with half of it written.
# A kill that lands at that moment by chance is rare (small writes take microseconds): this makes
# it certain, with a real SIGKILL, so no handler, no finally and no atexit runs.
KILLER = r"""
import os, signal, sys
name, nth, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.argv = sys.argv[4:]
seen = {"whole": 0, "append": 0}
fsync, write = os.fsync, os.write

def base(fd):
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return ""

def cut_fsync(fd):
    b = base(fd)
    if kind != "append" and b.startswith("." + name + ".") and b.endswith(".tmp"):
        seen["whole"] += 1
        if seen["whole"] == nth:
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return fsync(fd)

def cut_write(fd, data):
    if kind != "whole" and base(fd) == name:
        seen["append"] += 1
        if seen["append"] == nth:
            write(fd, bytes(data)[:max(1, len(data) // 2)])
            os.kill(os.getpid(), signal.SIGKILL)
    return write(fd, data)

os.fsync, os.write = cut_fsync, cut_write
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def kill_in_write(argv: list[str], out: Path, name: str, nth: int = 1, kind: str = "any") -> bool:
    """Run the command, killed in the middle of the ``nth`` write of ``name`` (see KILLER;
    ``kind``: whole, append or any); whether it was (False: it ended first, and ended well)."""
    r = subprocess.run([sys.executable, "-c", KILLER, name, str(nth), kind,
                        *command(argv, out)[1:]],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    if r.returncode == -signal.SIGKILL:
        return True
    assert r.returncode == 0, r.stderr
    return False


# Logs appended row by row as a run goes: a kill in the middle of a row's write may leave it torn
# (the rows before it whole); the run that resumes cuts it. Every other file is written whole.
APPENDED = {"train_log.csv", "init_profiles.csv", "lrsweep.csv"}


def assert_whole(out: Path, torn_rows: bool = True) -> int:
    """Every file in ``out`` complete and readable (temps and the lock aside); how many. With
    ``torn_rows``, an appended log (APPENDED) may end in a row a kill cut short."""
    from PIL import Image
    checked = 0
    for f in sorted(out.rglob("*")):
        if not f.is_file() or f.name.startswith("."):
            continue  # temps of writes a kill cut (never in place of a file), the lock file
        data = f.read_bytes()
        assert data, f"{f} is empty"
        if f.suffix == ".csv":
            if not (torn_rows and f.name in APPENDED):
                assert data.endswith(b"\n"), f"{f} ends in a torn line: {data[-80:]!r}"
            pd.read_csv(f)
        elif f.suffix == ".json":
            json.loads(data)
        elif f.suffix == ".png":
            with Image.open(f) as im:
                im.load()
        elif f.suffix == ".pt":
            torch.load(f, weights_only=True)
        elif f.suffix == ".html":
            assert data.rstrip().endswith(b"</html>"), f"{f} is cut short"
        elif f.suffix == ".md":
            data.decode("utf-8")
        checked += 1
    return checked


def assert_finished_train(out: Path) -> None:
    """A finished `train` grid: its run ended (a tiny model may stall: an outcome too) and
    whole, its log one row per (split, step)."""
    assert_whole(out, torn_rows=False)
    assert not temps(out), f"temps left: {temps(out)}"
    [record] = out.glob("runs/*/result.json")
    r = json.loads(record.read_text())
    assert r["status"] != "cut" and r["steps"] == r["planned_steps"], r["status"]
    log = pd.read_csv(record.parent / "train_log.csv")
    assert not log.duplicated(["split", "step"]).any(), log
    for _, rows in log.groupby("split"):
        assert rows["step"].is_monotonic_increasing, log
    assert log["loss"].notna().all(), log
    for name in ("train_runs.csv", "train_profiles.csv", "claims.csv", "train.md"):
        assert (out / name).exists(), name


def error_line(stderr: str) -> str:
    """The one line a failure prints (progress lines "[…]" aside); no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@contextlib.contextmanager
def mounted(target: Path, *how: str):
    """``mount *how target`` for the block; skipped where this process may not mount."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", *how, str(target)], capture_output=True, text=True,
                           check=False)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if r.returncode:
        pytest.skip(f"cannot mount here (needs root): {r.stderr.strip() or r.returncode}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


@contextlib.contextmanager
def tmpfs(target: Path, size: str):
    """A ``size`` tmpfs at ``target``: a disk that fills up."""
    with mounted(target, "-t", "tmpfs", "-o", f"size={size}", "tmpfs"):
        yield target


@contextlib.contextmanager
def read_only(target: Path):
    """``target`` bound read-only onto itself (as root, chmod 555 stops no write)."""
    with mounted(target, "--bind", str(target)):
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True,
                           text=True, check=False)
        if r.returncode:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        yield target


# --- the writers themselves ---------------------------------------------------------------------


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = files.write_text(tmp_path / "a.json", '{"good": 1}')
    for stop in (RuntimeError("boom"), KeyboardInterrupt()):
        def write(f, stop=stop):
            f.write('{"half')
            raise stop
        with pytest.raises(type(stop)):
            files.atomic(path, write)
        assert json.loads(path.read_text()) == {"good": 1}
        assert not temps(tmp_path)
    files.write_json(path, {"new": [1, 2]}, indent=1)
    files.write_csv(pd.DataFrame({"x": [1, 2]}), tmp_path / "t.csv", index=False)
    assert json.loads(path.read_text()) == {"new": [1, 2]}
    assert list(pd.read_csv(tmp_path / "t.csv")["x"]) == [1, 2]
    mode = path.stat().st_mode & 0o777
    assert mode == 0o666 & ~files.UMASK, oct(mode)  # as open() makes it, not mkstemp's 0600


def test_a_temp_left_by_a_killed_writer_goes_at_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".r.csv.{dead.pid}.abc123.tmp"
    live = tmp_path / f".r.csv.{os.getppid()}.def456.tmp"  # a writer still at work: kept
    stale.write_text("half")
    live.write_text("half")
    files.write_text(tmp_path / "r.csv", "x\n1\n")
    assert not stale.exists() and live.exists()


def test_a_torn_last_line_is_cut_and_appends_start_on_a_line_of_their_own(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n1,2\n3,")  # a kill in the middle of a row
    files.append_csv(pd.DataFrame({"a": [5], "b": [6]}), path, index=False)
    assert path.read_text() == "a,b\n1,2\n5,6\n"
    assert not files.repair_tail(path)
    path.write_text("a,")  # not even the header whole: nothing kept, the next write starts anew
    assert files.repair_tail(path) and path.read_text() == ""
    files.append_csv(pd.DataFrame({"a": [7], "b": [8]}), path, index=False)
    assert path.read_text() == "a,b\n7,8\n"


def test_train_log_torn_by_a_kill_is_repaired_on_resume(tmp_path):
    from analysis.training.runlog import RunLog
    log = RunLog(tmp_path, steps=40, done=0, tokens_per_step=16, log_every=10)
    for step in range(20):
        log.train(step, 5.0 - step / 10, 1e-3, float(step))
    log.val(20, 4.5, 1e-3, 20.0)
    log.file.close()  # the run is killed: no close(), and the next row torn mid-write
    with (tmp_path / "train_log.csv").open("a") as f:
        f.write("train,30,480,30.0,0.001")  # step parses, the loss is missing
    log = RunLog(tmp_path, steps=40, done=20, tokens_per_step=16, log_every=10)
    log.train(20, 3.0, 1e-3, 21.0)
    log.close(21, 1e-3, 21.0)
    text = (tmp_path / "train_log.csv").read_bytes()
    assert text.endswith(b"\n") and b"train,30," not in text
    rows = pd.read_csv(tmp_path / "train_log.csv")
    assert list(zip(rows["split"], rows["step"])) == [("train", 10), ("train", 20), ("val", 20),
                                                      ("train", 21)]
    assert rows["loss"].notna().all()


def test_full_disk_keeps_the_old_file_and_names_the_one_it_was_writing(tmp_path):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        good = disk / "checkpoint.pt"
        files.save_torch({"w": torch.ones(4)}, good)
        with pytest.raises(OSError) as e:
            files.save_torch({"w": torch.ones(100_000)}, good)  # 400 kB: does not fit
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(good)
        assert torch.load(good, weights_only=True)["w"].tolist() == [1.0] * 4
        log = disk / "log.csv"
        files.write_text(log, "a\n1\n")
        appender = files.Appender(log)
        with pytest.raises(OSError) as e:
            appender.write("2\n" * 100_000)  # rolled back: the file still ends whole
        appender.close()
        assert e.value.errno == errno.ENOSPC and log.read_text() == "a\n1\n"
        assert not temps(disk)


# --- whole commands -----------------------------------------------------------------------------


def test_train_killed_mid_checkpoint_leaves_whole_files_and_resumes(tmp_path):
    out = tmp_path / "grid"
    assert kill_in_write(QUICK, out, "checkpoint.pt", 2)  # the first checkpoint kept
    assert temps(out)  # the half-written temp of the second, beside the whole first
    assert assert_whole(out) >= 3  # settings, log, the first checkpoint at least
    r = run(QUICK, out)
    assert r.returncode == 0, r.stderr
    assert_finished_train(out)


def test_read_only_folder_is_one_line(tmp_path, cli_error):
    ro = tmp_path / "ro"
    (ro / "there").mkdir(parents=True)
    with read_only(ro):  # in this process, which is quicker (the slow tests run processes)
        for argv, out in ((TRAIN, ro / "there"), (TRAIN, ro / "new" / "grid"),
                          (SWEEP, ro / "there")):
            line = cli_error([*argv, "--out", str(out)])
            assert "read-only" in line.lower() and str(ro) in line, line


def test_full_disk_in_train_is_one_line_naming_the_folder(tmp_path, cli_error):
    with tmpfs(tmp_path / "disk", "200k") as disk:  # the first checkpoint does not fit
        out = disk / "grid"
        line = cli_error([*QUICK, "--out", str(out)])  # in this process: quicker
        assert line.startswith(f"error: no space left on device writing {out}"), line
        assert "kept: " in line and "free space and rerun" in line, line
        assert "resume: " + " ".join(["python", "run_analysis.py", *QUICK]) in line, line
        assert_whole(out, torn_rows=False)
        assert not temps(out)


# --- slow: more kill points, the sweep, a full disk at other moments ----------------------------


@pytest.mark.slow
def test_train_killed_at_every_kind_of_write_resumes(tmp_path):
    out = tmp_path / "grid"
    # one process after another, each killed mid-write of a file (the nth time it writes it)
    # in the order a run gets there (31 steps; checkpoints at 8, 16, 23, 31; rows: val at 4 and
    # 8, train at 10, …), each process resuming what the one before left
    points = [("settings.json", 1, "any"), ("train_log.csv", 1, "whole"),
              ("profiles.csv", 1, "any"), ("checkpoint.pt", 1, "any"),
              ("train_log.csv", 3, "append"), ("checkpoint.pt", 2, "any"),
              ("result.json", 1, "any"), ("train_runs.csv", 1, "any"),
              ("train_profiles.csv", 1, "any"), ("loss.png", 1, "any"),
              ("train_loss_curves.png", 1, "any"), ("claims.csv", 1, "any"),
              ("train.md", 1, "any")]
    missed = []
    for name, nth, kind in points:
        if not kill_in_write(TRAIN, out, name, nth, kind):
            missed.append((name, nth, kind))
        assert_whole(out)
    assert not missed, missed  # each write was reached, and cut
    r = run(TRAIN, out)
    assert r.returncode == 0, r.stderr
    assert_finished_train(out)


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [3.0, 6.0, 9.0])
def test_train_killed_at_a_moment_resumes(tmp_path, seconds):
    out = tmp_path / "grid"
    start = time.monotonic()
    kill_when(TRAIN, out, lambda out: time.monotonic() - start > seconds)
    assert_whole(out)
    r = run(TRAIN, out)
    assert r.returncode == 0, r.stderr
    assert_finished_train(out)


@pytest.mark.slow
def test_sweep_killed_mid_write_leaves_whole_files_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    points = [("config.json", 1, "any"), ("theory.json", 1, "any"),
              ("init_profiles.csv", 1, "whole"), ("init_profiles.csv", 1, "append"),
              ("claims.csv", 1, "any"), ("variance_vs_depth.png", 1, "any"),
              ("report.html", 1, "any")]
    missed = []
    for name, nth, kind in points:
        if not kill_in_write(SWEEP, out, name, nth, kind):
            missed.append((name, nth, kind))
        assert_whole(out)
    assert not missed, missed  # each write was reached, and cut
    r = run(SWEEP, out)
    assert r.returncode == 0, r.stderr
    assert_whole(out, torn_rows=False)
    assert not temps(out), temps(out)
    profiles = pd.read_csv(out / "init_profiles.csv")
    assert sorted(profiles["depth"].unique()) == [2, 4]
    assert not profiles.duplicated(["scheme", "depth", "seed", "point", "metric"]).any()
    assert (out / "report.html").read_text().rstrip().endswith("</html>")


@pytest.mark.slow
@pytest.mark.parametrize("size", ["16k", "200k", "400k"])  # a log row, a checkpoint, a figure
def test_full_disk_at_other_writes_then_free_space_resumes(tmp_path, size):
    with tmpfs(tmp_path / "disk", size) as disk:
        out = disk / "grid"
        r = run(TRAIN, out)
        if r.returncode == 0:
            pytest.skip(f"the grid fit in {size}")
        line = error_line(r.stderr)
        assert line.startswith("error: no space left on device writing "), line
        assert str(out) in line
        assert_whole(out, torn_rows=False)  # a row that did not fit is taken back whole
        assert not temps(out)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        r = run(TRAIN, out)  # space freed: the same command goes on
        assert r.returncode == 0, r.stderr
        assert_finished_train(out)


@pytest.mark.slow
def test_full_disk_in_sweep_is_one_line_and_resumes(tmp_path):
    with tmpfs(tmp_path / "disk", "40k") as disk:
        out = disk / "sweep"
        r = run(SWEEP, out)
        assert r.returncode != 0
        line = error_line(r.stderr)
        assert line.startswith("error: no space left on device writing "), line
        assert "resume: python run_analysis.py sweep" in line, line
        assert_whole(out, torn_rows=False)
        assert not temps(out)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        r = run(SWEEP, out)
        assert r.returncode == 0, r.stderr
        assert_whole(out, torn_rows=False)
        assert not temps(out)
