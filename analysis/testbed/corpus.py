"""Byte-level corpora (vocabulary 256) served as random windows from memory-mapped uint8 arrays.

The default corpus is the running Python's standard library source: every ``.py`` file under
``sysconfig.get_paths()['stdlib']`` (site-packages excluded), in sorted relative-path order,
split into train and validation by file with a hash of the relative path, so the split of a
file never depends on which other files exist. A folder is split the same way; a single file
is split by position (its last ``val_fraction`` goes to validation).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "val")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    """Train and validation byte arrays (memory-mapped), with where they came from."""

    train: np.ndarray
    val: np.ndarray
    source: str
    train_files: list[str]
    val_files: list[str]
    spec: tuple = (None, 0.1, None)  # load_corpus arguments that rebuild this corpus

    def __reduce__(self):
        # worker processes reload the memory map instead of receiving a copy of the bytes
        return load_corpus, self.spec

    def split(self, name: str) -> np.ndarray:
        """The byte array of split ``name`` ('train' or 'val')."""
        if name not in SPLITS:
            raise ValueError(f"unknown split '{name}' (known: {', '.join(SPLITS)})")
        return self.train if name == "train" else self.val

    def unigram_bits(self, split: str = "val") -> float:
        """Entropy of the split's byte frequencies, in bits per byte: the loss of a model that
        learned which bytes are common and nothing of context (a stalled run's plateau)."""
        counts = np.bincount(self.split(split), minlength=256).astype(float)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum())

    def batch(self, split: str, batch_size: int, seq_len: int,
              generator: torch.Generator | None = None, device: str | torch.device = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs [B, T] and next-byte targets [B, T], int64."""
        data = self.split(split)
        if len(data) < seq_len + 1:
            raise ValueError(f"the {split} split of {self.source} has {len(data)} bytes, "
                             f"fewer than a window of seq_len + 1 = {seq_len + 1}")
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)
        windows = data[starts.numpy()[:, None] + np.arange(seq_len + 1)]
        w = torch.from_numpy(windows.astype(np.int64))
        if torch.device(device).type == "cuda":  # page-locked: the copy runs without a host wait
            w = w.pin_memory()
            return w[:, :-1].to(device, non_blocking=True), w[:, 1:].to(device, non_blocking=True)
        return w[:, :-1].to(device), w[:, 1:].to(device)


def stdlib_root() -> Path:
    """The running Python's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path, pattern: str = "*") -> list[Path]:
    """Regular, non-hidden files under ``root`` matching ``pattern``, sorted by relative path."""
    found = [p for p in root.rglob(pattern)
             if p.is_file() and not any(part in _SKIP_DIRS or part.startswith(".")
                                        for part in p.relative_to(root).parts)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def is_validation(relpath: str, val_fraction: float) -> bool:
    """Deterministic file-level split: a stable hash of the relative path."""
    return zlib.crc32(relpath.encode()) % 10_000 < val_fraction * 10_000


def load_corpus(path: str | os.PathLike | None = None, val_fraction: float = 0.1,
                cache_dir: str | os.PathLike | None = None) -> Corpus:
    """The default corpus (``path=None``), a text file, or a folder of text files."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    spec = (None if path is None else str(Path(path).resolve()), val_fraction,
            None if cache_dir is None else str(cache_dir))
    if path is None:
        root = stdlib_root()
        corpus = _from_files(root, list_files(root, "*.py"), val_fraction, cache_dir,
                             f"Python {sysconfig.get_python_version()} standard library ({root})")
    else:
        corpus = _load_path(Path(path), val_fraction, cache_dir)
    corpus.spec = spec
    return corpus


def _load_path(p: Path, val_fraction: float, cache_dir: str | os.PathLike | None) -> Corpus:
    if not p.exists():
        raise ValueError(f"corpus path {p} does not exist")
    if p.is_file():
        return _from_single_file(p, val_fraction)
    files = [f for f in list_files(p) if _looks_like_text(f)]
    if sum(f.stat().st_size for f in files) == 0:
        raise ValueError(f"corpus folder {p} holds no non-empty text files")
    if len(files) == 1:
        return _from_single_file(files[0], val_fraction)
    return _from_files(p, files, val_fraction, cache_dir, str(p))


def _from_single_file(p: Path, val_fraction: float) -> Corpus:
    n = p.stat().st_size
    if n < 2:
        raise ValueError(f"corpus file {p} is empty" if n == 0 else f"corpus file {p} has 1 byte")
    n_train = max(1, min(n - 1, round(n * (1 - val_fraction))))
    data = np.memmap(p, dtype=np.uint8, mode="r")
    return Corpus(data[:n_train], data[n_train:], str(p), [p.name], [p.name])


def _looks_like_text(p: Path) -> bool:
    with open(p, "rb") as f:
        return b"\0" not in f.read(8192)


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("SIGPROP_CACHE", Path.home() / ".cache" / "sigprop"))


def _from_files(root: Path, files: list[Path], val_fraction: float,
                cache_dir: str | os.PathLike | None, source: str) -> Corpus:
    rel = [f.relative_to(root).as_posix() for f in files]
    val_mask = [is_validation(r, val_fraction) for r in rel]
    if not any(val_mask) or all(val_mask):  # tiny folders: force one file to the other side
        smallest = min(range(len(rel)), key=lambda i: zlib.crc32(rel[i].encode()))
        val_mask = [i == smallest for i in range(len(rel))]
    key = hashlib.sha256(json.dumps(
        [str(root), val_fraction] + [(r, f.stat().st_size, f.stat().st_mtime_ns)
                                     for r, f in zip(rel, files)]).encode()).hexdigest()[:16]
    folder = _cache_root(cache_dir) / f"corpus-{key}"
    arrays = {}
    for name, want_val in (("train", False), ("val", True)):
        target = folder / f"{name}.bin"
        if not target.exists():
            chosen = [f for f, v in zip(files, val_mask) if v == want_val]
            _write_atomic(target, chosen)
        arrays[name] = np.memmap(target, dtype=np.uint8, mode="r")
    return Corpus(arrays["train"], arrays["val"], source,
                  [r for r, v in zip(rel, val_mask) if not v], [r for r, v in zip(rel, val_mask) if v])


def _write_atomic(target: Path, files: list[Path]) -> None:
    """Concatenate ``files`` (newline-separated) into ``target`` via a temp file and rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for f in files:
                out.write(f.read_bytes())
                out.write(b"\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
