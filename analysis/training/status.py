"""How a training run ends, and the rules that decide it:

- ``ok``: it trained every step;
- ``diverged``: a non-finite loss, or a spike: a loss above ``spike_factor`` × the larger of
  ln(vocab) (the loss of a uniform guess) and the run's own first loss, or, after ``spike_after``
  steps, above ``spike_factor`` × its running mean. A first loss above ``spike_factor`` ×
  ln(vocab) is a bad initialization, not a divergence: the run goes on, judged against that
  start, and says so (``initial_loss_note``, logged and in the run record);
- ``stalled``: it trained every step, but after ``stall_share`` of them its training loss (mean
  over ``log_every`` steps) never fell below ``stall_fraction`` × the corpus's unigram entropy,
  the loss of a model that learned which bytes are common and nothing of context;
- ``cut``: stopped at a time limit or by Ctrl-C, checkpointed; called again, it resumes.
"""

from __future__ import annotations

import math


def divergence_reason(step: int, value: float, loss_ema: float | None, vocab: int,
                      spike_factor: float, spike_after: int, initial: float | None = None) -> str:
    """Why the loss ``value`` at ``step`` ends the run as diverged ('' if it does not);
    ``loss_ema`` is the running mean of the losses before it (None before the first);
    ``initial`` the run's first loss (None: ``value`` is it). The first loss itself ends a run
    only if it is not finite: a high one is an initialization to report (initial_loss_note)."""
    if not math.isfinite(value):
        return f"loss {value} at step {step}"
    uniform = math.log(vocab)
    start = value if initial is None or not math.isfinite(initial) else initial
    if value > spike_factor * max(uniform, start):
        if start <= uniform:
            return (f"loss {value:.3f} at step {step} is above {spike_factor} × ln(vocab) = "
                    f"{spike_factor * uniform:.3f}, the loss of a uniform guess")
        return (f"loss {value:.3f} at step {step} is above {spike_factor} × the run's first "
                f"loss {start:.3f} = {spike_factor * start:.3f}")
    if loss_ema is not None and step >= spike_after and value > spike_factor * loss_ema:
        return (f"loss {value:.3f} at step {step} is above {spike_factor} × its running "
                f"mean {loss_ema:.3f}")
    return ""


def initial_loss_note(value: float, vocab: int, spike_factor: float) -> str:
    """What is wrong with a run's first loss ``value`` ('' if nothing): above ``spike_factor`` ×
    ln(vocab) the model starts far worse than a uniform guess, a fault of its initialization
    (logit scale), not of the training."""
    uniform = math.log(vocab)
    if not value > spike_factor * uniform:  # NaN (no loss) says nothing
        return ""
    return (f"initial loss {value:.3f} nats is above {spike_factor} × ln(vocab) = "
            f"{spike_factor * uniform:.3f} (a uniform guess scores {uniform:.3f}): the "
            "initialization's logits are far too large; divergence is judged against this start")


def next_loss_ema(loss_ema: float | None, value: float) -> float:
    """The running mean of the training loss after ``value``."""
    return value if loss_ema is None else 0.9 * loss_ema + 0.1 * value


def stall_reason(train_loss: list[tuple[int, float]], steps: int, tc, plateau: float) -> str:
    """Why a finished run stalled ('' if it did not): after ``tc.stall_share`` of its steps, its
    training loss averaged over ``tc.log_every`` steps never fell below ``tc.stall_fraction`` ×
    ``plateau`` (the corpus's unigram entropy, nats). ``tc``: the run's TrainConfig."""
    after = [v for s, v in train_loss if s >= tc.stall_share * steps]
    k = tc.log_every
    means = [math.fsum(after[i:i + k]) / len(after[i:i + k]) for i in range(0, len(after), k)]
    threshold = tc.stall_fraction * plateau
    if not means or min(means) <= threshold:
        return ""
    return (f"training loss stayed above {tc.stall_fraction:g} × the unigram entropy "
            f"{plateau:.3f} = {threshold:.3f} nats after {tc.stall_share:.0%} of the steps "
            f"(lowest {min(means):.3f})")


def final_status(diverged: bool, stalled: str) -> str:
    """The status of a run that trained to its end or diverged: diverged, stalled or ok."""
    return "diverged" if diverged else "stalled" if stalled else "ok"


def train_loss_ends(train_loss: list[tuple[int, float]]) -> tuple[float, float]:
    """The first training loss and the mean of the last 10 (nats); NaN without any."""
    values = [v for _, v in train_loss]
    if not values:
        return math.nan, math.nan
    return values[0], math.fsum(values[-10:]) / len(values[-10:])
