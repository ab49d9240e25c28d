"""Hugging Face models: a local model folder, or a model id already in the local hub cache.

Loaded through transformers with ``local_files_only=True`` and ``trust_remote_code=False``; a
config that asks for custom code (``auto_map``) is refused. The helpers that turn a config into a
model and a tokenizer (``hf_config``, ``hf_head_class``, ``finish_hf``) serve the GGUF and
state_dict loaders too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.checkpoints.guards import (LOAD_DTYPE, check_fits, first_line, read_json,
                                         refuse_unpicklable)
from analysis.checkpoints.loaded import Loaded

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")

# --- hub ids --------------------------------------------------------------------------------

# a Hugging Face repo id: org/name, word characters, '-' and '.', no '--' or '..' (huggingface_hub's rule)
HUB_ID = re.compile(r"\w(?:[\w.-]{0,94}\w)?/\w(?:[\w.-]{0,94}\w)?", re.ASCII)


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hugging Face model id (``org/name``)."""
    return bool(HUB_ID.fullmatch(text)) and "--" not in text and ".." not in text


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment now.

    huggingface_hub reads these variables once, when it is imported; reading them here keeps a
    later change (a test's, or a caller's) in force."""
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(os.path.expanduser(os.path.expandvars(env[var])))
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expanduser(os.path.expandvars(home))) / "hub"


def resolve_hub_id(repo_id: str) -> Path:
    """The snapshot folder of Hugging Face model ``repo_id`` in the local cache; never downloads."""
    cache = hub_cache()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"checkpoint path {repo_id} does not exist, and reading it as a Hugging Face "
                         "model id needs huggingface_hub (pip install -e .[hf])") from None
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: not (completely) in the cache
        where = (f"{repo} has no snapshot of its main revision" if repo.is_dir()
                 else f"{cache} has no {repo.name}")
        raise ValueError(f"checkpoint path {repo_id} does not exist, and as a Hugging Face model id "
                         f"it is not in the local cache: {where} (HF_HUB_CACHE, else HF_HOME/hub); "
                         "nothing is downloaded: fetch it "
                         f"once (hf download {repo_id}) or pass a local folder") from None


# --- Hugging Face -----------------------------------------------------------------------------

def import_transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("Hugging Face checkpoints need transformers (pip install -e .[hf])") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def hf_config(data: dict[str, Any], source: Path):
    t = import_transformers()
    if "auto_map" in data:
        raise ValueError(f"{source} asks for custom model code (auto_map: "
                         f"{', '.join(data['auto_map'])}); sigprop never runs code from a checkpoint "
                         "(trust_remote_code stays off)")
    model_type = data.get("model_type")
    from transformers import CONFIG_MAPPING
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{source}: unsupported architecture model_type={model_type!r}: tried "
                         "transformers' built-in families (this transformers has "
                         f"{len(list(CONFIG_MAPPING.keys()))}, e.g. bert, roberta, gpt2, gpt_neox, llama, mistral, "
                         "qwen2) and sigprop's own format; a model outside these cannot be built "
                         "without running its code")
    data = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version")}
    try:
        config = t.AutoConfig.for_model(model_type, **data)
    except Exception as e:
        raise ValueError(f"{source}: config for {model_type} is invalid ({str(e)[:200]})") from None
    vocab = getattr(config, "vocab_size", None) if "vocab_size" in config.to_dict() else None
    if not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"{source}: model_type={model_type!r} is not a text model (its config has no "
                         "vocab_size: it takes images, audio or another modality, not token ids); "
                         "diagnose runs text through a language model's blocks")
    return config


def hf_head_class(config) -> tuple[Any, str]:
    """(auto class, loss kind): causal LM, masked LM, or the bare model with a surrogate loss."""
    t = import_transformers()
    from transformers.models.auto import modeling_auto as ma
    archs = list(getattr(config, "architectures", None) or [])
    mt = config.model_type
    causal = mt in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked = mt in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if any(a.endswith("ForMaskedLM") for a in archs) and masked:
        return t.AutoModelForMaskedLM, "masked-lm"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) and causal:
        return t.AutoModelForCausalLM, "lm"
    if archs and not any(a.endswith(("ForMaskedLM", "ForCausalLM", "LMHeadModel", "ForPreTraining"))
                         for a in archs):
        return t.AutoModel, "surrogate"
    if causal and not getattr(config, "is_encoder_decoder", False) and mt not in ("bert", "roberta"):
        return t.AutoModelForCausalLM, "lm"
    if masked:
        return t.AutoModelForMaskedLM, "masked-lm"
    return t.AutoModel, "surrogate"


def _hf_shape(config) -> dict[str, Any]:
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    act = str(getattr(config, "hidden_act", getattr(config, "activation_function", "gelu")))
    rms = config.model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo2")
    gated = rms or "silu" in act or "swiglu" in act
    return dict(width=width, heads=heads, ffn="swiglu" if gated else ("relu" if act == "relu" else "gelu"),
                norm="rmsnorm" if rms else "layernorm")


def _max_len(config) -> int | None:
    for name in ("n_positions", "max_position_embeddings"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
# Encoder families (bidirectional attention); a config with is_decoder=True is causal whatever its family.
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "camembert",
                 "mpnet", "deberta", "deberta-v2", "ernie", "nomic_bert", "modernbert")


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def _tokenizer(candidates: list[Path | None], explicit: bool, notes: list[str]):
    """The first loadable tokenizer among ``candidates`` (folders), or None: the text is then bytes."""
    for folder in candidates:
        if folder is None:
            continue
        folder = folder.parent if folder.is_file() else folder
        if not _has_tokenizer(folder):
            if explicit:
                raise ValueError(f"--tokenizer {folder} holds no tokenizer (looked for "
                                 f"{', '.join(TOKENIZER_FILES)})")
            continue
        try:
            tok = import_transformers().AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                                trust_remote_code=False)
            return tok, folder
        except Exception as e:  # a broken tokenizer is not fatal: fall back to bytes
            if explicit:
                raise ValueError(f"--tokenizer {folder} did not load ({str(e)[:160]})") from None
            notes.append(f"the tokenizer in {folder} did not load ({str(e)[:120]}); using bytes")
        explicit = False
    return None, None


def finish_hf(model: nn.Module, config, cls, loss_kind: str, description: str, nbytes: int,
               tokenizer_dirs: list[Path | None], explicit_tokenizer: bool, notes: list[str],
               built_tokenizer: tuple[Any, Path | str] | None = None) -> Loaded:
    """``built_tokenizer``: (tokenizer, where from) already built (a GGUF file's own); else the first
    loadable one in ``tokenizer_dirs``."""
    model.eval()  # no dropout: the diagnosis should be deterministic
    encode = decode = None
    prefix: list[int] = []
    tok_name, mask_id = "bytes", getattr(config, "mask_token_id", None)
    tok, where = built_tokenizer or _tokenizer(tokenizer_dirs, explicit_tokenizer, notes)
    if tok is not None:
        encode = lambda s, tok=tok: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        decode = lambda ids, tok=tok: tok.decode(ids)  # noqa: E731
        tok_name = f"{type(tok).__name__} from {where}"
        prefix = _special_prefix(tok)
        mask_id = tok.mask_token_id if tok.mask_token_id is not None else mask_id
    encoder = config.model_type in ENCODER_TYPES and not getattr(config, "is_decoder", False)

    def rebuild() -> nn.Module:  # the family's own initializer (e.g. N(0, initializer_range²))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            fresh = cls.from_config(config, trust_remote_code=False)
        return fresh.float().eval()

    shape = _hf_shape(config)
    if encoder:
        shape["attention"] = "bidirectional"
    return Loaded(model=model, kind="hf", description=description, vocab_size=int(config.vocab_size),
                  max_len=_max_len(config), loss_kind=loss_kind, encode=encode, tokenizer=tok_name,
                  decode=decode, theory_shape=shape, mask_token_id=mask_id, notes=notes,
                  nbytes=nbytes, encoder=encoder, rebuild=rebuild, prefix_ids=prefix,
                  tokenizer_size=_size(tok))


def _size(tok) -> int | None:
    """A tokenizer's number of tokens, added ones included (None: it cannot say)."""
    try:
        return int(len(tok)) if tok is not None else None
    except Exception:  # noqa: BLE001 (a tokenizer without a length)
        return None


def attach_tokenizer(loaded: Loaded, folder: str | os.PathLike) -> None:
    """Tokenize with the tokenizer in ``folder``, an explicit --tokenizer, where the model came
    without one (a sigprop testbed reads bytes): its ids are then checked against the model's
    vocabulary where they are used."""
    tok, where = _tokenizer([Path(folder)], True, loaded.notes)
    loaded.encode = lambda s, tok=tok: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    loaded.decode = lambda ids, tok=tok: tok.decode(ids)  # noqa: E731
    loaded.tokenizer = f"{type(tok).__name__} from {where}"
    loaded.tokenizer_size = _size(tok)


def _special_prefix(tok) -> list[int]:
    """The ids the tokenizer puts before any text (BOS, [CLS]): the model was trained with them first."""
    try:
        plain = tok("hello", add_special_tokens=False)["input_ids"]
        full = tok("hello", add_special_tokens=True)["input_ids"]
    except Exception:  # a tokenizer that cannot say: no prefix
        return []
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return [int(i) for i in full[:k]]
    return []


def load_hf_folder(folder: Path, tokenizer: str | os.PathLike | None = None) -> Loaded:
    """A local Hugging Face model folder, through transformers, offline, no remote code."""
    data = read_json(folder / "config.json")
    config = hf_config(data, folder / "config.json")
    weights = [folder / f for f in HF_WEIGHTS if (folder / f).is_file()]
    if not weights:
        raise ValueError(f"{folder} has config.json but no weights (looked for {', '.join(HF_WEIGHTS)})")
    shards = list(folder.glob("*.safetensors")) + list(folder.glob("pytorch_model*.bin"))
    nbytes = sum(f.stat().st_size for f in shards)
    check_fits(nbytes, str(folder))
    use_st = any(f.name.startswith("model.safetensors") for f in weights)
    cls, loss_kind = hf_head_class(config)
    model, missing = _from_pretrained(cls, folder, config, use_st)
    notes = []
    head = _untrained_head(model, missing)
    if head and loss_kind != "surrogate":  # e.g. a sentence-embedding export of a masked LM
        notes.append(f"the checkpoint holds no weights for the {type(model).__name__} head ({head[0]}, "
                     f"{len(head)} tensor(s)): a loss through a randomly initialized head would mean "
                     "nothing, so the bare model runs with the surrogate loss")
        cls, loss_kind = import_transformers().AutoModel, "surrogate"
        model, _ = _from_pretrained(cls, folder, config, use_st)
    model.to(LOAD_DTYPE.get())
    desc = (f"Hugging Face {type(model).__name__} ({config.model_type}), "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"weights from {'safetensors' if use_st else 'torch .bin (weights_only)'}")
    return finish_hf(model, config, cls, loss_kind, desc, nbytes,
                      [Path(tokenizer) if tokenizer else folder], tokenizer is not None, notes)


def _from_pretrained(cls, folder: Path, config, use_st: bool) -> tuple[nn.Module, list[str]]:
    """(model, the names of its weights the folder did not hold), offline, no remote code."""
    try:
        model, info = cls.from_pretrained(str(folder), config=config, local_files_only=True,
                                          trust_remote_code=False, use_safetensors=use_st,
                                          weights_only=True, dtype=LOAD_DTYPE.get(), output_loading_info=True)
    except Exception as e:
        text = str(e)
        if "Weights only load failed" in text or "GLOBAL" in text:
            bins = sorted(folder.glob("pytorch_model*.bin"))
            raise refuse_unpicklable(bins[0] if len(bins) == 1 else folder, e, files=bins) from None
        raise ValueError(f"{folder}: transformers could not load the weights ({type(e).__name__}: "
                         f"{first_line(e, 300)})") from None
    return model, list(info.get("missing_keys", []))


def _untrained_head(model: nn.Module, missing: list[str]) -> list[str]:
    """The missing weights that belong to the head (outside the base model), not to the blocks."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or getattr(model, prefix, None) is None:
        return []
    return [k for k in missing if not k.startswith(prefix + ".")]
