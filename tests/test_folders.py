"""Output folders are owned and locked: one mechanism (analysis.infra.folders), every command."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.cli import main
from analysis.infra import folders

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["train", "--schemes", "pre", "--depths", "2", "--width", "16", "--heads", "2",
              "--seq-len", "16", "--tokens", "1024", "--quiet"]


def stamp(folder: Path, command: str, **settings) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / folders.STAMP).write_text(json.dumps({"command": command, "settings": settings}))
    return folder


def refused(capsys, argv: list[str], *words: str) -> str:
    """Run ``argv``; assert one `error:` line holding ``words``, exit 2; the line."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # progress lines may come before it
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    err = errors[0]
    for w in words:
        assert w in err, (w, err)
    return err


# Every command that writes a folder, with the smallest arguments that pass its own validation:
# each must refuse a folder another command owns before it does any work.
WRITERS = {
    "sweep": ["sweep", "--schemes", "pre", "--depths", "2", "--seeds", "0", "--width", "16",
              "--heads", "2", "--seq-len", "8", "--batch", "2", "--batches", "1", "--quiet"],
    "train": TINY_TRAIN,
    "theory": ["theory", "--scheme", "pre"],
    "coordcheck": ["coordcheck", "--schemes", "pre", "--widths", "16,32", "--quiet"],
    "lrsweep": ["lrsweep", "--schemes", "pre", "--quiet"],
    "campaign": ["campaign", "--tiny", "--device", "cpu", "--quiet"],
    "diagnose": ["diagnose", "no-such-model"],
    "atlas": ["atlas", "no-such-model"],
    "fidelity": ["fidelity", "--schemes", "pre"],
    "onestep": ["onestep"],
    "calibrate": ["calibrate", "no-such-model"],
}


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_every_writer_refuses_another_commands_folder(command, tmp_path, capsys):
    owner = "atlas" if command == "train" else "train"
    folder = stamp(tmp_path / "taken", owner, width=16)
    (folder / "claims.csv").write_text("claim,status\nkept,holds\n")
    refused(capsys, [*WRITERS[command], "--out", str(folder)], f"output of `{owner}`",
            f"not of `{command}`")
    assert (folder / "claims.csv").read_text() == "claim,status\nkept,holds\n"  # nothing lost
    assert json.loads((folder / folders.STAMP).read_text())["command"] == owner


def test_unstamped_folders_another_commands_files_or_foreign_files(tmp_path, capsys):
    legacy = tmp_path / "legacy"  # a training grid written before stamps
    legacy.mkdir()
    (legacy / "train_runs.csv").write_text("run\n")
    refused(capsys, [*WRITERS["theory"], "--out", str(legacy)], "output of `train`")
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("notes.txt", "a.csv", "b.csv", "c.csv"):
        (mine / name).write_text("x")
    refused(capsys, [*WRITERS["theory"], "--out", str(mine)], "holds no sigprop output",
            "a.csv, b.csv, c.csv and 1 more")
    assert sorted(p.name for p in mine.iterdir()) == ["a.csv", "b.csv", "c.csv", "notes.txt"]


def test_same_command_other_settings_refused_the_grid_may_grow(tmp_path, capsys):
    out = tmp_path / "grid"
    assert main([*TINY_TRAIN, "--out", str(out)]) == 0
    capsys.readouterr()
    record = json.loads((out / folders.STAMP).read_text())
    assert record["command"] == "train" and record["settings"]["width"] == 16
    assert "depths" not in record["settings"] and "device" not in record["settings"]
    refused(capsys, [*TINY_TRAIN, "--width", "32", "--out", str(out)], "width = 16, not 32")
    refused(capsys, [*TINY_TRAIN, "--lr", "0.01", "--out", str(out)], "lr = 0.002, not 0.01")
    assert main([*TINY_TRAIN, "--seeds", "1", "--out", str(out)]) == 0  # a grid grows by seeds
    capsys.readouterr()
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["pre-L2-d16-dense-s0",
                                                                "pre-L2-d16-dense-s1"]


def test_settings_compare_resolved_values_not_spellings():
    from analysis.cli import build_parser
    from analysis.cli.options import settings
    from analysis.testbed.model import ModelConfig
    parser = build_parser()
    width = ModelConfig().width
    given = parser.parse_args(["model", "--width", str(width)])
    left_out = parser.parse_args(["model"])
    a = settings(given, ModelConfig(width=width))
    b = settings(left_out, ModelConfig())
    assert a == b and a["width"] == width
    assert settings(given, ModelConfig(width=width), grows=("width",)).keys() == a.keys() - {"width"}


def _holder(folder: Path) -> subprocess.Popen:
    """A process that claims ``folder`` for `train` and sleeps."""
    code = (f"from analysis.infra.folders import claim; claim({str(folder)!r}, 'train', {{}}); "
            "import time; time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    for _ in range(200):
        if (folder / folders.LOCK).exists() and (folder / folders.LOCK).read_text():
            return p
        time.sleep(0.05)
    p.kill()
    raise AssertionError("the holder never locked")


def test_a_second_writer_is_refused_and_a_killed_writers_lock_is_not_in_the_way(tmp_path, capsys):
    out = tmp_path / "grid"
    holder = _holder(out)
    try:
        refused(capsys, [*TINY_TRAIN, "--out", str(out)], "being written by another sigprop process",
                f"pid {holder.pid}", "`train`")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (out / folders.LOCK).exists()  # kill -9 left the file; the OS dropped its lock
    assert main([*TINY_TRAIN, "--out", str(out)]) == 0
    assert not (out / folders.LOCK).exists()  # released as the command ended


def test_two_writers_started_together_one_refused_the_folder_whole(tmp_path):
    out = tmp_path / "grid"
    cmd = [sys.executable, str(ROOT / "run_analysis.py"), *TINY_TRAIN, "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    if codes == [0, 0]:  # the first ended before the second began: a resume, nothing retrained
        assert all("Traceback" not in err for _, err in results)
    else:
        assert codes == [0, 2], results
        err = next(err for rc, err in results if rc == 2).strip()
        assert "being written by another sigprop process" in err and len(err.splitlines()) == 1
    assert [p.name for p in (out / "runs").iterdir()] == ["pre-L2-d16-dense-s0"]
    assert (out / "train_runs.csv").read_text().count("\n") == 2  # header and one run


def test_report_adds_to_a_sweep_folder_only(tmp_path, capsys):
    grid = stamp(tmp_path / "grid", "train")
    refused(capsys, ["report", str(grid)], "output of `train`", "`report` works on the folders "
                                                                 "of `sweep`")


def test_a_failed_diagnosis_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "d"
    refused(capsys, ["diagnose", str(tmp_path / "missing.gguf"), "--out", str(out)])
    assert not out.exists()
