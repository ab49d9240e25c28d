"""The text a diagnosis runs on: read it, check the tokenizer keeps it, cut it into token windows."""

from __future__ import annotations

from pathlib import Path

import torch

from analysis.checkpoints import Loaded


def text_bytes(text: str | None, need: int) -> tuple[bytes, str]:
    """The first ``need`` bytes of ``--text`` (or the default corpus's validation split) and where from."""
    if text is None:
        from analysis.testbed.corpus import load_corpus
        corpus = load_corpus()
        data = corpus.split("val")
        return bytes(data[:need]), f"default corpus ({corpus.source}), validation split"
    p = Path(text)
    if not p.is_file():
        raise ValueError(f"--text {p} is not a file")
    try:
        with p.open("rb") as f:
            return f.read(need), str(p)
    except OSError as e:
        raise ValueError(f"--text {p} is not readable ({e.strerror})") from None


ROUND_TRIP_LOSS = 0.02  # share of characters a tokenizer may change before the text counts as foreign


def tokenizer_mismatch(loaded: Loaded, sample: str) -> str | None:
    """Why ``sample`` (Python source) is foreign to the tokenizer, or None: what the round trip loses."""
    if loaded.encode is None or loaded.decode is None:
        return None
    sample = sample[:4000]
    back = loaded.decode(loaded.encode(sample))
    import difflib
    changed = 1.0 - difflib.SequenceMatcher(None, sample, back, autojunk=False).ratio()
    lost = []
    if "\n" in sample and "\n" not in back:
        lost.append("line breaks")
    if sample != sample.lower() and back == back.lower():
        lost.append("upper case")
    if changed <= ROUND_TRIP_LOSS and not lost:
        return None
    return (f"the default text is Python source, and this tokenizer does not keep it: a round trip "
            f"changes {changed:.0%} of the characters{' (loses ' + ', '.join(lost) + ')' if lost else ''}; "
            "it was made for natural language, so the model sees text unlike what it was trained on: "
            "pass --text FILE with text of the model's own domain")


def token_windows(loaded: Loaded, raw: bytes, source: str, n: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """``n`` windows of ``seq_len + 1`` token ids, evenly spaced over the text ``raw`` (deterministic)."""
    per = seq_len + 1
    if loaded.encode is not None:
        ids = loaded.encode(raw.decode("utf-8", errors="replace"))
        how = f"{source}, tokenized by {loaded.tokenizer}"
    else:
        ids = [b % loaded.vocab_size for b in raw]  # bytes, folded into the vocabulary
        how = f"{source}, bytes (mod vocabulary {loaded.vocab_size})"
    ids = torch.tensor(ids, dtype=torch.long)
    if len(ids) < per:
        raise ValueError(f"the text gives {len(ids)} tokens, fewer than one window of --seq-len + 1 = {per}")
    if len(ids) < n * per:
        how += f"; only {len(ids)} tokens for {n} windows of {per}: windows overlap"
    starts = torch.linspace(0, len(ids) - per, n).round().long()
    windows = ids[starts[:, None] + torch.arange(per)]
    if loaded.prefix_ids:  # trained with BOS/[CLS] first: an attention sink that behaves otherwise without it
        k = len(loaded.prefix_ids)
        windows[:, :k] = torch.tensor(loaded.prefix_ids)
        how += f"; each window starts with the tokenizer's own prefix {loaded.prefix_ids} (BOS / [CLS]), as in training"
    check_token_range(loaded, windows, "the text")
    return windows, how


def check_token_range(loaded: Loaded, ids: torch.Tensor | list[int], what: str) -> None:
    """Refuse token ids outside the model's vocabulary (a tokenizer made for another model): an
    embedding has no row for them, and folding them onto another id would measure other text."""
    if not len(ids):
        return
    top = int(max(ids) if isinstance(ids, list) else ids.max())
    low = int(min(ids) if isinstance(ids, list) else ids.min())
    if 0 <= low and top < loaded.vocab_size:
        return
    size = f" of {loaded.tokenizer_size} tokens" if loaded.tokenizer_size else ""
    bad = top if top >= loaded.vocab_size else low
    raise ValueError(f"the tokenizer ({loaded.tokenizer}){size} turns {what} into token id {bad}, but the "
                     f"model's vocabulary has {loaded.vocab_size} tokens (ids 0 to "
                     f"{loaded.vocab_size - 1}): pass the model's own tokenizer with --tokenizer")
