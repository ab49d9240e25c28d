"""Running the model under the probes: finding its blocks, the forward and backward passes over the
windows, and when sampling has converged."""

from __future__ import annotations

import pandas as pd
import torch

from analysis.infra import progress
from analysis.checkpoints import Loaded
from analysis.diagnose.contribution import ContributionMeter
from analysis.diagnose.outliers import PeakMeter
from analysis.diagnose.passes import Passes
from probes import Probe, confirm_placement, locate

SPREAD_METRICS = ("second_moment", "token_cosine", "effective_rank")
METRICS = ("second_moment", "median_token_second_moment", "first_token_second_moment", "variance", "max_abs",
           "massive_ratio", "token_cosine", "dong_residual", "effective_rank", "effective_rank_normalized",
           "layer_cosine", "angular_distance", "grad_second_moment", "grad_token_cosine")


def grad_on_stream(block: torch.nn.Module):
    """A pre-hook making block 0's input require grad, so frozen models still give stream gradients."""
    def hook(module, args, kwargs):
        if not torch.is_grad_enabled():
            return None
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            x = args[0] if args[0].requires_grad else args[0].detach().requires_grad_()
            return (x, *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            h = kwargs["hidden_states"]
            kwargs = dict(kwargs, hidden_states=h if h.requires_grad else h.detach().requires_grad_())
            return args, kwargs
        return None
    return block.register_forward_pre_hook(hook, with_kwargs=True)


def non_finite_weights(model: torch.nn.Module) -> list[tuple[str, int]]:
    """(name, count) of every parameter or buffer holding NaN or ±inf."""
    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append((name, n))
    return bad


def find_layout(loaded: Loaded, model, windows: torch.Tensor, blocks: str | None, device: torch.device):
    """The blocks and their placement, checked with one forward pass."""
    try:
        layout = locate(model, blocks=blocks)
    except ValueError as e:
        raise ValueError(f"{e} (command line: --blocks PATH)") from None
    check = windows[:2, :-1].to(device)
    try:
        return confirm_placement(model, layout, check) if loaded.scheme else \
            confirm_placement(model, layout, input_ids=check)
    except ValueError as e:
        raise ValueError(f"the blocks found do not look like residual blocks: {e}. Families tried: "
                         "sigprop testbed, BERT/RoBERTa/ELECTRA, DistilBERT, GPT-2, GPT-NeoX, "
                         "LLaMA/Mistral/Qwen2, then the longest uniform ModuleList; point at the "
                         "blocks with --blocks PATH (a ModuleList as named in model.named_modules())") from None


# Sampling stops early once every point's statistics are this precise: standard error over
# batches at most TOLERANCE of the value, or, for the bounded ones near 0 (cosine, angle / π),
# at most TOLERANCE / 5 absolute. Per-batch values vary with the text windows, so the error falls
# slowly: on all-MiniLM-L6-v2 and English text it is 2–4 % after 24 sequences and still 2–3 %
# after 64; the thresholds the findings use are far coarser than 5 %.
CONVERGED_METRICS = ("second_moment", "token_cosine", "effective_rank", "angular_distance")
# The backward passes stop the same way, on the gradient's second moment and token cosine at every
# point: the --grad-sequences are a ceiling, as --sequences is for the forward ones.
GRAD_CONVERGED_METRICS = ("grad_second_moment", "grad_token_cosine")
BOUNDED = ("token_cosine", "angular_distance", "grad_token_cosine")
TOLERANCE, MIN_BATCHES = 0.05, 3
# The skip test's loss is taken on this many positions per sequence (a sample of its own per
# sequence; the sample's spread is inside the standard error over sequences): the LM head, which
# may cost more than all the blocks, runs on a quarter of a 256-token window.
SKIP_POSITIONS = 64


def converged(frame: pd.DataFrame, tolerance: float, metrics: tuple[str, ...] = CONVERGED_METRICS) -> bool:
    """Whether every converge-checked statistic's standard error is within ``tolerance`` (see above)."""
    f = frame[frame["metric"].isin(metrics)]
    if not len(f) or f["count"].min() < MIN_BATCHES:
        return False
    ok = (f["spread"] <= tolerance * f["mean"].abs()) | (
        f["metric"].isin(BOUNDED) & (f["spread"] <= tolerance / 5))
    return bool(ok.all())


def measure(passes: Passes, layout, branches: list[list[str]], windows: torch.Tensor,
            grad_n: int, batch: int, device: torch.device, tolerance: float = 0.0, grad_batch: int | None = None
            ) -> tuple[pd.DataFrame, pd.DataFrame, list[float], int]:
    """(probe frame, contribution frame, losses, windows used): the first ``grad_n`` windows forward
    and backward, then forward only until every statistic has converged (``tolerance`` > 0) or the
    windows run out."""
    model = passes.model
    for p in model.parameters():
        p.requires_grad_(False)  # gradients with respect to the stream only
    gen = torch.Generator().manual_seed(0)
    losses: list[float] = []
    metrics = [m for m in METRICS if grad_n or not m.startswith("grad_")]
    handle = grad_on_stream(model.get_submodule(layout.blocks[0]))
    used, grad_used, grad_done = 0, 0, False
    try:
        # the rank metrics' eigensolves on forward-only passes alone, where there will be some
        with Probe(model, metrics=metrics, layout=layout, sampled_without_grad_only=len(windows) > grad_n) as probe, \
                ContributionMeter(model, layout, branches) as meter, PeakMeter(model, layout) as peaks:
            bar = progress.bar(len(windows), "probing", unit="seq", leave=False)
            for s in range(0, len(windows), batch):
                w = windows[s:s + batch].to(device)
                step = grad_batch or len(w)  # micro-batches: the activations autograd keeps stay bounded
                for m in range(0, len(w), step):
                    part = w[m:m + step]
                    if s + m < grad_n and not grad_done:
                        losses.append(passes.loss_backward(part, gen))
                        grad_used += len(part)
                        grad_done = tolerance > 0 and converged(probe.frame(), tolerance, GRAD_CONVERGED_METRICS)
                    else:
                        with torch.no_grad():
                            passes.stream(part)
                used = s + len(w)
                bar.update(len(w))
                if tolerance > 0 and used >= grad_n and used < len(windows) and converged(probe.frame(), tolerance):
                    break
            bar.close()
        per_block, peak = meter.frame(), peaks.frame()
        if len(peak):
            per_block = per_block.merge(peak, on="layer", how="left")
        return probe.frame(), per_block, losses, used, grad_used
    finally:
        handle.remove()
