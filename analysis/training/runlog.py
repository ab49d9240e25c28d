"""What a training run reports as it goes: ``train_log.csv``, TensorBoard events, the live bar.

``train_log.csv`` has one row per ``log_every`` optimizer steps (``split`` train: the mean of
those steps' losses, a box smoother without an EMA's lag) and one per validation point (``split``
val), each with ``step`` (optimizer steps done), ``tokens``, ``wall_s`` (seconds since the run
began, summed over resumes) and ``lr``. Rows are appended as the run goes, so a running run can be
read, each whole or not at all (analysis.infra.files.Appender); a resumed run first cuts a row torn
by a kill and drops the rows past its checkpoint, which it then writes again.
TensorBoard event files (optional, ``pip install -e .[tensorboard]``) get the same scalars.
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

from analysis.infra import files, progress

COLUMNS = ["split", "step", "tokens", "wall_s", "lr", "loss"]


def rate_text(tokens_per_s: float) -> str:
    """'12,345 tokens/s', or '— tokens/s' before any step was timed."""
    return f"{tokens_per_s:,.0f} tokens/s" if math.isfinite(tokens_per_s) else "— tokens/s"


def _lines(rows: list[dict], header: bool = False) -> str:
    """``rows`` as lines of train_log.csv (its header first if ``header``)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def summary_writer_class():
    """torch.utils.tensorboard's SummaryWriter; ValueError saying how to install it if missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        raise ValueError("--tensorboard needs the tensorboard package: pip install -e "
                         "'.[tensorboard]'") from None
    return SummaryWriter


class RunLog:
    """The per-run log: rows of ``train_log.csv``, TensorBoard scalars and the live bar."""

    def __init__(self, run_dir: Path, steps: int, done: int, tokens_per_step: int, log_every: int,
                 tensorboard: bool = False, position: int | None = None,
                 window: list[float] | None = None):
        """``done`` steps are behind (a resumed run), ``window`` the losses of those since the
        last full ``log_every`` steps: the row they belong to is written as if never cut."""
        self.path = run_dir / "train_log.csv"
        self.tokens_per_step, self.log_every = tokens_per_step, log_every
        self.window: list[float] = list(window or [])  # train losses since the last train row
        self.spent = 0.0  # seconds spent logging during training (what the bench reports per step)
        self.setup = 0.0  # seconds opening and closing the file, events and bar, once per run
        t = time.perf_counter()
        kept = []
        files.repair_tail(self.path)  # a row torn by a kill or a full disk: cut, written again
        if self.path.exists():  # a resumed run: keep the rows up to its checkpoint, but a
            with self.path.open(newline="") as f:  # cut's partial window, which ``window`` carries on
                for r in csv.DictReader(f):
                    try:
                        step = int(r["step"])
                    except (TypeError, ValueError):  # a row cut short by a kill mid-write
                        continue
                    if None in r.values() or None in r:  # too few or too many fields
                        continue
                    if step <= done and (r["split"] == "val" or step % log_every == 0):
                        kept.append(r)
        files.write_text(self.path, _lines(kept, header=True))  # whole: a kill keeps the old file
        self.file = files.Appender(self.path)  # then each row lands whole or not at all
        # a resumed run drops the events past its checkpoint, as it drops the rows
        self.writer = (summary_writer_class()(str(run_dir / "tensorboard"),
                                              purge_step=done + 1 if done else None)
                       if tensorboard else None)
        self.bar = progress.bar(steps, run_dir.name, initial=done, leave=position is None,
                                position=position)
        self.setup += time.perf_counter() - t

    def train(self, step: int, loss: float, lr: float, wall_s: float) -> None:
        """Step ``step`` (0-based) had training loss ``loss``; a row every ``log_every`` steps."""
        self.window.append(loss)
        if (step + 1) % self.log_every == 0:
            self._flush_window(step + 1, lr, wall_s)

    def _flush_window(self, done: int, lr: float, wall_s: float) -> None:
        if self.window:
            self._row("train", done, wall_s, lr, math.fsum(self.window) / len(self.window))
            self.window.clear()

    def val(self, done: int, loss: float, lr: float, wall_s: float) -> None:
        """A validation loss after ``done`` optimizer steps."""
        self._row("val", done, wall_s, lr, loss)

    def _row(self, split: str, done: int, wall_s: float, lr: float, loss: float) -> None:
        t = time.perf_counter()
        tokens = done * self.tokens_per_step
        self.file.write(_lines([{"split": split, "step": done, "tokens": tokens,
                                 "wall_s": round(wall_s, 3), "lr": lr, "loss": loss}]))
        if self.writer is not None:
            self.writer.add_scalar(f"loss/{split}", loss, done)
            if split == "train":
                self.writer.add_scalar("lr", lr, done)
        self.spent += time.perf_counter() - t

    def sync(self, done: int, loss: float, lr: float, tokens_per_s: float) -> None:
        """The live bar at a host sync: steps done, the last loss, the lr and tokens/s."""
        t = time.perf_counter()
        self.bar.update(done - self.bar.n)
        if not self.bar.disable:
            self.bar.set_postfix_str(f"loss {loss:.3f}  lr {lr:.2e}  {rate_text(tokens_per_s)}",
                                     refresh=False)
        if self.writer is not None and math.isfinite(tokens_per_s):
            self.writer.add_scalar("tokens_per_s", tokens_per_s, done)
        self.spent += time.perf_counter() - t

    def close(self, done: int, lr: float, wall_s: float) -> None:
        """Write the last partial window, close the file, the events and the bar."""
        t = time.perf_counter()
        self._flush_window(done, lr, wall_s)
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        self.bar.close()
        self.setup += time.perf_counter() - t


class NullRunLog(RunLog):
    """A run log that writes nothing and draws nothing: ranks other than 0, and the bench's floor."""

    def __init__(self, *args, **kwargs):
        self.spent = self.setup = 0.0

    def train(self, *args) -> None:
        """Nothing: a null log keeps no rows."""

    val = sync = close = train
