"""Corpora: deterministic file-level split, windows within bounds, memory-mapped arrays."""

import numpy as np
import pytest
import torch

from analysis.testbed.corpus import is_validation, load_corpus


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "texts"
    for i in range(40):
        sub = root / f"d{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}.txt").write_text(f"file {i}\n" * (10 + i))
    (root / ".hidden").write_text("never read")
    (root / "blob.bin").write_bytes(b"\0\1\2" * 100)
    return root


def test_folder_split_is_deterministic_and_disjoint(folder, tmp_path):
    a = load_corpus(folder, cache_dir=tmp_path / "c1")
    b = load_corpus(folder, cache_dir=tmp_path / "c2")
    assert a.train_files == b.train_files and a.val_files == b.val_files
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert not set(a.train_files) & set(a.val_files)
    assert len(a.train_files) + len(a.val_files) == 40  # hidden and binary files skipped
    assert a.val_files and a.train_files
    assert isinstance(a.train, np.memmap) and a.train.dtype == np.uint8
    # the split of a file depends only on its own path
    assert all(is_validation(f, 0.1) for f in a.val_files)


def test_default_corpus_is_the_stdlib(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGPROP_CACHE", str(tmp_path))
    c = load_corpus()
    assert "standard library" in c.source
    assert not set(c.train_files) & set(c.val_files)
    assert all(f.endswith(".py") for f in c.train_files + c.val_files)
    assert not any("site-packages" in f for f in c.train_files)
    n = len(c.train_files) + len(c.val_files)
    assert 0.05 < len(c.val_files) / n < 0.15
    assert len(c.train) > 1_000_000 and len(c.val) > 100_000
    again = load_corpus()  # served from the cache, same split
    assert again.val_files == c.val_files and len(again.train) == len(c.train)


def test_windows_within_bounds_and_shifted(tmp_path):
    data = bytes(i % 251 for i in range(1000))
    path = tmp_path / "one.txt"
    path.write_bytes(data)
    c = load_corpus(path, val_fraction=0.2)
    assert len(c.train) == 800 and len(c.val) == 200
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = c.batch("train", 16, 64, generator=g)
        assert x.shape == y.shape == (16, 64) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal((x[:, 1:] - x[:, :-1]) % 251, torch.ones(16, 63, dtype=torch.int64))
    # a window as long as the split allows: the only valid start is 0
    x, y = c.batch("val", 8, 199, generator=g)
    assert torch.equal(x, torch.tensor(list(data[800:999])).expand(8, -1))
    with pytest.raises(ValueError, match="fewer than a window"):
        c.batch("val", 1, 200)


def test_bad_corpus_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="no non-empty text files"):
        load_corpus(tmp_path / "emptydir")
    small = tmp_path / "small.txt"
    small.write_text("hello world, a small corpus\n" * 5)
    c = load_corpus(small)
    with pytest.raises(ValueError, match="unknown split"):
        c.batch("test", 1, 2)

