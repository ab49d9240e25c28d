"""Across processes with torch.distributed (gloo, CPU, 2 ranks): DDP and FSDP runs equal the
single-process run, probes sum over ranks, torchrun splits a grid and resumes it, bad input."""

import functools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from analysis.infra import progress
from analysis.infra.budget import Cut
from analysis.infra.distributed import check_same, join, leave
from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import ModelConfig, build_model
from analysis.training.grid import probe_profiler
from analysis.training.train import TrainConfig, train_run
from probes import Probe

ROOT = Path(__file__).resolve().parents[1]
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(**kw):
    return ModelConfig(scheme="pre", depth=2, width=32, heads=4, max_seq_len=32, **kw)


def fast(**kw):  # 12 steps of 4 × 32 tokens
    return TrainConfig(**{"tokens": 32 * 4 * 12, "batch_size": 4, "lr": 1e-2, "evals": 2,
                          "eval_batches": 2, "log_every": 4, "checkpoints": 2, **kw})


def _exits_cleanly(worker):
    """An mp.spawn target that ends its process with os._exit(0) once its work returned: gloo's
    threads can abort the interpreter's own teardown after destroy_process_group ("terminate
    called without an active exception", SIGABRT, seen once in a full CI run), a torch shutdown
    race rather than a failure of the work. An exception still fails the spawn as before."""
    @functools.wraps(worker)
    def run(rank, *args):
        worker(rank, *args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return run


def _as_rank(rank: int, size: int, port: int, timeout: float = 60) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      SIGPROP_DIST_TIMEOUT=str(timeout))
    torch.set_num_threads(1)
    progress.configure(quiet=True)


@_exits_cleanly
def _train_worker(rank, size, port, corpus_path, run_dir, fsdp, compiled, lr=1e-2):
    _as_rank(rank, size, port)
    world = join("cpu", "--ddp")
    tc = fast(compile=True, compile_backend="eager", lr=lr) if compiled else fast(lr=lr)
    try:
        train_run(tiny(), tc, load_corpus(corpus_path), run_dir, world=world, fsdp=fsdp,
                  profiler=probe_profiler(Path(run_dir), world=world))
    finally:
        leave()


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def single(corpus_path, tmp_path_factory):
    """The single-process run every distributed one is compared with."""
    progress.configure(quiet=True)
    run_dir = tmp_path_factory.mktemp("single")
    result = train_run(tiny(), fast(), load_corpus(corpus_path), run_dir)
    progress.configure()
    return result, run_dir


def _weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("fsdp,compiled", [(False, False), (True, False), (False, True)],
                         ids=["ddp", "fsdp", "ddp-compiled"])
def test_two_ranks_train_as_one_process_on_the_same_global_batch(fsdp, compiled, corpus_path,
                                                                  single, tmp_path):
    one, one_dir = single
    mp.spawn(_train_worker, args=(2, free_port(), str(corpus_path), str(tmp_path), fsdp, compiled),
             nprocs=2)
    two = json.loads((tmp_path / "result.json").read_text())
    assert [s for s, _ in two["train_loss"]] == [s for s, _ in one["train_loss"]]
    assert [v for _, v in two["train_loss"]] == pytest.approx([v for _, v in one["train_loss"]],
                                                              rel=1e-5)
    assert [v for _, v in two["val_loss"]] == pytest.approx([v for _, v in one["val_loss"]],
                                                            rel=1e-5)
    a, b = _weights(one_dir), _weights(tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert two["environment"]["world_size"] == 2 and two["status"] == one["status"]
    # rank 0 alone wrote the log and the profiles, once
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert list(log["step"]) == list(pd.read_csv(one_dir / "train_log.csv")["step"])
    profiles = pd.read_csv(tmp_path / "profiles.csv")  # probes ran (compiled blocks too)
    assert set(profiles["tag"]) == {"init", "step6", "end"} and (profiles["count"] == 4).all()
    assert two["compiled"] == compiled


def test_a_divergence_stops_every_rank_and_is_recorded_once(corpus_path, tmp_path):
    progress.configure(quiet=True)
    one = train_run(tiny(), fast(lr=50.0), load_corpus(corpus_path), tmp_path / "one")
    progress.configure()
    mp.spawn(_train_worker, args=(2, free_port(), str(corpus_path), str(tmp_path / "two"), False,
                                  False, 50.0), nprocs=2)  # both ranks return: none hangs
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert one["status"] == two["status"] == "diverged"
    assert two["divergence_step"] == one["divergence_step"]
    assert len(two["train_loss"]) == len(one["train_loss"])


@_exits_cleanly
def _probe_worker(rank, size, port, out):
    _as_rank(rank, size, port)
    join("cpu", "--ddp")
    try:
        frame = _probe_shards([rank])
        if rank == 0:
            frame.to_csv(out, index=False)
    finally:
        leave()


def _probe_shards(shards: list[int]) -> pd.DataFrame:
    """A probe's frame over the given shards (2 rows each) of two fixed batches of 4."""
    model = build_model(tiny(), seed=3)
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 256, (4, 33), generator=gen) for _ in range(2)]
    with Probe(model, metrics=["second_moment", "grad_second_moment", "token_cosine"]) as p:
        for w in batches:
            for r in shards:
                part = w[2 * r:2 * r + 2]
                _, loss = model(part[:, :-1], part[:, 1:])
                loss.backward()
    return p.frame()


def test_probe_frames_sum_over_ranks(tmp_path):
    out = tmp_path / "frame.csv"
    mp.spawn(_probe_worker, args=(2, free_port(), str(out)), nprocs=2)
    two = pd.read_csv(out)
    one = _probe_shards([0, 1])  # one process, the same shards one after another
    assert list(two["count"]) == list(one["count"]) and (one["count"] == 4).all()
    for column in ("mean", "spread"):
        assert two[column].to_numpy() == pytest.approx(one[column].to_numpy(), rel=1e-5)


@_exits_cleanly
def _resume_worker(rank, size, port, corpus_path, run_dir):
    _as_rank(rank, size, port)
    world = join("cpu", "--ddp")
    try:
        train_run(tiny(), fast(), load_corpus(corpus_path), run_dir, world=world)
    finally:
        leave()


def test_a_run_cut_alone_resumes_on_two_ranks(corpus_path, single, tmp_path, monkeypatch):
    import analysis.training.train as train_mod
    one, _ = single
    progress.configure(quiet=True)
    # one process trains until step 6 (a checkpoint), then its deadline passes
    monkeypatch.setattr(train_mod, "past", lambda deadline: deadline is not None and
                        (tmp_path / "checkpoint.pt").exists())
    with pytest.raises(Cut):
        train_run(tiny(), fast(), load_corpus(corpus_path), tmp_path, deadline=math.inf)
    monkeypatch.undo()
    progress.configure()
    mp.spawn(_resume_worker, args=(2, free_port(), str(corpus_path), str(tmp_path)), nprocs=2)
    two = json.loads((tmp_path / "result.json").read_text())
    assert two["status"] != "cut" and two["steps"] == 12
    assert [v for _, v in two["train_loss"]] == pytest.approx([v for _, v in one["train_loss"]],
                                                              rel=1e-5)


@_exits_cleanly
def _check_worker(rank, size, port, out):
    _as_rank(rank, size, port)
    world = join("cpu", "--ddp")
    try:
        check_same({"lr": 0.001 * (rank + 1), "depths": "2,4"}, world)
    except ValueError as e:
        Path(out, f"rank{rank}.txt").write_text(str(e))
    finally:
        leave()


def test_ranks_started_with_other_settings_are_refused(tmp_path):
    mp.spawn(_check_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "rank 1 was started with other settings than rank 0 (lr differ)" in message


@_exits_cleanly
def _failing_worker(rank, size, port, out):
    _as_rank(rank, size, port, timeout=5)
    import analysis.infra.distributed as d
    join("cpu", "--ddp")
    if rank == 1:
        time.sleep(9)  # a rank stuck elsewhere, never joining the collective the other waits in
        return
    t = time.perf_counter()
    try:
        d.barrier(d.World(0, 2, 0))
    except (torch.distributed.DistError, RuntimeError):
        Path(out).write_text(f"{time.perf_counter() - t:.1f}")


def test_a_failed_rank_ends_the_others_wait_at_the_timeout(tmp_path):
    out = tmp_path / "waited.txt"
    mp.spawn(_failing_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    assert out.exists() and float(out.read_text()) < 8  # an error at the timeout, before the rank returns


def torchrun(*args, nproc=2):
    """The torchrun command line for run_analysis.py with ``args``."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", str(ROOT / "run_analysis.py"), *args]


GRID = ["train", "--schemes", "pre,post", "--depths", "1,2", "--tokens", "16384", "--width", "32",
        "--seq-len", "32", "--batch", "4"]


def test_torchrun_splits_a_grid_and_a_killed_grid_resumes(corpus_path, tmp_path):
    out = tmp_path / "grid"
    argv = torchrun(*GRID, "--corpus", str(corpus_path), "--out", str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    deadline = time.time() + 180
    while not list(out.glob("runs/*/result.json")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)  # a killed job: both ranks die mid-grid
    p.communicate(timeout=60)
    kept = {f.parent.name: f.read_bytes() for f in out.glob("runs/*/result.json")
            if json.loads(f.read_text())["status"] != "cut"}
    assert kept, "no run finished before the kill"
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = pd.read_csv(out / "train_runs.csv")
    assert sorted(runs["run"]) == sorted(f"{s}-L{d}-d32-dense-s0" for s in ("pre", "post")
                                         for d in (1, 2))
    assert set(runs["status"]) <= {"ok", "stalled"}
    for name, record in kept.items():  # finished runs were not trained again
        assert (out / "runs" / name / "result.json").read_bytes() == record
        assert f"{name}: finished earlier, kept" in done.stdout
    trained = [line for line in done.stdout.splitlines() if ": training " in line]
    assert len(trained) == 4 - len(kept)  # each unfinished run once, by one rank
    assert any(line.startswith("[rank 1]") for line in trained) or len(trained) < 2


def test_torchrun_bad_input_is_one_line(corpus_path, tmp_path):
    alone = subprocess.run([sys.executable, str(ROOT / "run_analysis.py"), "train", "--ddp",
                            "--out", str(tmp_path / "a")], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert alone.returncode == 2 and "--ddp needs torchrun's environment" in alone.stderr
    assert len(alone.stderr.strip().splitlines()) == 1
    too_many = subprocess.run(
        torchrun("train", "--schemes", "pre", "--depths", "1", "--tokens", "4096",
                 "--corpus", str(corpus_path), "--out", str(tmp_path / "b"), nproc=2),
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert too_many.returncode != 0
    assert "error: 2 ranks for a grid of 1 run: a rank would have nothing to train" in too_many.stderr
    assert "Traceback" not in too_many.stderr.split("error: 2 ranks")[0][-300:]
