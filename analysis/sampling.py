"""Sampling text from a loaded checkpoint, as nanoGPT's sample.py does.

Any causal language model that ``analysis.checkpoints.load`` reads (a sigprop run, a local
Hugging Face folder, a state_dict with --config, a GGUF file) continues a prompt one token at a
time: temperature-scaled logits, an optional top-k filter, then ``torch.multinomial`` with a
seeded generator (temperature 0: argmax). Sigprop testbeds are byte-level (vocabulary 256);
Hugging Face models use their own tokenizer.
"""

from __future__ import annotations

import math
import os

import torch

from analysis.checkpoints import Loaded, load

NEWLINE = 10  # a byte model's start token for an empty prompt (nanoGPT's default start, "\n")
BYTES = 256


def _check_settings(tokens: int, temperature: float, top_k: int | None) -> None:
    """Refuse settings that cannot sample, each with a one-line reason."""
    if tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: no filter), got {top_k}")


def _check_causal(loaded: Loaded, path: str) -> None:
    """Refuse a model that does not predict the next token from the ones before it."""
    what = None
    if loaded.loss_kind == "masked-lm":
        what = "a masked LM (it fills in masked tokens from both sides)"
    elif loaded.loss_kind == "surrogate":
        what = "a bare model with no language-model head (it outputs hidden states, not logits)"
    elif loaded.encoder or loaded.theory_shape.get("attention", "causal") != "causal":
        what = "an encoder (its attention sees the tokens after each position)"
    if what:
        raise ValueError(f"sample needs a causal language model; {path} is {what}")


def _logits(loaded: Loaded, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Next-token logits [vocab] after the sequence ``x`` [1, T] (float32)."""
    if loaded.scheme is not None:  # a sigprop testbed: (logits, loss)
        out = model(x)[0]
    else:
        out = model(input_ids=x).logits
    return out[0, -1].float()


def generate(loaded: Loaded, ids: list[int], tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, device: str | torch.device = "cpu",
             source: str = "the model") -> list[int]:
    """``tokens`` new token ids continuing ``ids`` (not included), sampled from ``loaded.model``.

    No KV cache: every step runs the whole context (the last ``loaded.max_len`` tokens) forward
    again, which is simple and exactly the model's own forward. The draw runs on the CPU with
    ``torch.Generator().manual_seed(seed)``, so a seed gives the same text on any device (up to
    the device's rounding of the logits). Logits holding NaN or +infinity (broken weights, an
    overflow) are refused, naming ``source`` and the step, rather than drawn from.
    """
    _check_settings(tokens, temperature, top_k)
    if not ids:
        raise ValueError("generate needs at least one token of context")
    from analysis.infra.device import resolve_device
    dev = resolve_device(str(device))
    model = loaded.model.to(dev)
    model.eval()  # no dropout: the same seed must give the same text
    gen = torch.Generator().manual_seed(seed)
    context = torch.tensor([ids], dtype=torch.long, device=dev)
    new: list[int] = []
    try:
        with torch.no_grad():
            for step in range(tokens):
                # nanoGPT's crop: the model has positions for max_len tokens only
                x = context if loaded.max_len is None else context[:, -loaded.max_len:]
                logits = _logits(loaded, model, x).cpu()
                _check_finite(logits, step, tokens, model, source)
                nxt = _draw(logits, temperature, top_k, gen)
                new.append(nxt)
                context = torch.cat([context, torch.tensor([[nxt]], device=dev)], 1)
    except (RuntimeError, IndexError, TypeError, AttributeError) as e:  # e.g. an id past the embedding
        first = (str(e).splitlines() or [""])[0][:300]
        raise ValueError(f"the model did not run on the prompt ({type(e).__name__}: {first})") from None
    return new


def _check_finite(logits: torch.Tensor, step: int, tokens: int, model: torch.nn.Module,
                  source: str) -> None:
    """Refuse next-token logits holding NaN or +infinity, or no finite value (-infinity may mask
    a token): a draw from them would be noise (argmax of NaN is token 0)."""
    if not (logits.isnan().any() or logits.isposinf().any() or not logits.isfinite().any()):
        return
    from analysis.checkpoints.guards import non_finite
    weights = non_finite(dict(model.named_parameters()))
    cause = f"; {weights}" if weights else "; its weights are finite, so the forward pass overflows"
    raise ValueError(f"{source}: the model's next-token logits hold NaN or infinity, first at "
                     f"step {step + 1} of {tokens}{cause}: nothing can be sampled from them; use a "
                     "checkpoint whose weights are finite (a run that did not diverge)")


def _draw(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> int:
    """One token id from next-token ``logits`` [vocab]: argmax at temperature 0, else a draw."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:  # keep the k largest; min(): a k above the vocabulary means no filter
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


def prompt_ids(loaded: Loaded, prompt: str, path: str) -> list[int]:
    """The prompt as token ids (bytes or the tokenizer's), or the start token for an empty one."""
    if loaded.decode is None and loaded.vocab_size > BYTES:
        raise ValueError(f"{path} has a vocabulary of {loaded.vocab_size} tokens but no tokenizer to "
                         "turn them into text: pass --tokenizer FOLDER")
    if loaded.encode is None:
        ids = list(prompt.encode("utf-8"))
        if not ids:
            ids = [NEWLINE]  # nanoGPT starts from "\n"
        if max(ids) >= loaded.vocab_size:
            raise ValueError(f"the prompt has byte {max(ids)}, outside {path}'s byte vocabulary of "
                             f"{loaded.vocab_size}")
        return ids
    ids = list(loaded.encode(prompt))
    if ids:
        from analysis.diagnose.text import check_token_range
        try:  # a tokenizer made for another model
            check_token_range(loaded, ids, "the prompt")
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return ids
    bos = getattr(getattr(loaded.model, "config", None), "bos_token_id", None)
    if isinstance(bos, int) and 0 <= bos < loaded.vocab_size:
        return [bos]  # an empty prompt: start from the beginning-of-sequence token
    raise ValueError(f"the prompt {prompt!r} gives no tokens and {path} has no beginning-of-sequence "
                     "token to start from: pass a non-empty --prompt")


def _decode(loaded: Loaded, ids: list[int]) -> str:
    if loaded.decode is None:
        return bytes(ids).decode("utf-8", errors="replace")
    return loaded.decode(ids)


def _check_time(loaded: Loaded, tokens: int, device: str) -> None:
    """Refuse a continuation estimated (one forward pass of every weight a token, at least) to
    take longer than the limit every command keeps (analysis.testbed.memory.TIME_LIMIT)."""
    from analysis.testbed.memory import BLOCK_SECONDS, THROUGHPUT, TIME_LIMIT, duration
    params = sum(p.numel() for p in loaded.model.parameters())
    rate = THROUGHPUT.get(torch.device(device).type, THROUGHPUT["cpu"])
    seconds = tokens * (2 * params / rate + BLOCK_SECONDS)
    if seconds > TIME_LIMIT:
        raise ValueError(f"--tokens {tokens:,} would take at least {duration(seconds)} on {device} "
                         f"(one forward pass of {params:,} weights a token), over the limit of "
                         f"{duration(TIME_LIMIT)}: lower --tokens")


def sample_text(path: str | os.PathLike, prompt: str = "def ", tokens: int = 200,
                temperature: float = 0.8, top_k: int | None = 40, seed: int = 0,
                device: str = "cpu", config: str | os.PathLike | None = None,
                tokenizer: str | os.PathLike | None = None) -> str:
    """Load ``path`` and return ``prompt`` followed by ``tokens`` sampled tokens, decoded."""
    _check_settings(tokens, temperature, top_k)  # before loading: bad settings fail fast
    loaded = load(path, config, tokenizer)
    _check_causal(loaded, str(path))
    _check_time(loaded, tokens, device)
    ids = prompt_ids(loaded, prompt, str(path))
    new = generate(loaded, ids, tokens, temperature=temperature, top_k=top_k, seed=seed, device=device,
                   source=str(path))
    # Decode prompt and continuation together (a tokenizer may join them, e.g. a leading space),
    # then show the user's own prompt in front: a tokenizer need not give it back exactly, and
    # the start token of an empty prompt is not part of the text.
    head, full = _decode(loaded, ids), _decode(loaded, ids + new)
    return prompt + (full[len(head):] if full.startswith(head) else _decode(loaded, new))
