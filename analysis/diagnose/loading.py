"""Loading a checkpoint someone else built, without ever running code from it.

Three kinds of input (nothing is downloaded):

- sigprop's own run: a folder holding ``checkpoint.pt``, or that file (keys model, model_config, …);
- a local Hugging Face model folder: ``config.json`` with ``model.safetensors`` or
  ``pytorch_model.bin`` (sharded too), loaded through transformers with ``local_files_only=True``
  and ``trust_remote_code=False``; a config that asks for custom code (``auto_map``) is refused;
- a bare state_dict (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) with ``config=`` pointing at a
  JSON file: a sigprop ``ModelConfig`` dict (has ``scheme``) or a Hugging Face config.json (has
  ``model_type``).
- a ``.gguf`` file (llama.cpp / ollama), read by transformers' GGUF loader and dequantized to
  float32; its architecture, config and tokenizer come from the file's metadata (extra ``gguf``).

Safety: safetensors files are read with safetensors (no code); torch files only with
``torch.load(weights_only=True)``, which refuses any pickle that would import or call something
outside torch's allow-list; such a file is refused with the global it asked for. A GGUF file is
tensors and typed metadata, no code; its header is checked (magic, sizes, tensor types) before
transformers reads it. Every failure is a ``ValueError`` with a one-line reason.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from analysis.device import available_memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")
MEMORY_FRACTION = 0.8  # refuse weights larger than this share of the available memory


@dataclass
class Loaded:
    """A model ready to diagnose, and what is known about it."""

    model: nn.Module
    kind: str  # 'sigprop', 'hf', 'state_dict', 'gguf'
    description: str
    vocab_size: int
    max_len: int | None
    loss_kind: str  # 'lm', 'masked-lm', 'surrogate'
    encode: Callable[[str], list[int]] | None = None  # the folder's tokenizer; None: bytes
    tokenizer: str = "bytes"
    decode: Callable[[list[int]], str] | None = None
    scheme: str | None = None  # sigprop scheme (exact theory) or None
    theory_shape: dict[str, Any] = field(default_factory=dict)  # width, heads, ffn, norm, …
    mask_token_id: int | None = None
    notes: list[str] = field(default_factory=list)
    nbytes: int = 0
    encoder: bool = False  # bidirectional attention (BERT-like), not a causal decoder
    rebuild: Callable[[], nn.Module] | None = None  # the same architecture, freshly initialized


# --- guards -----------------------------------------------------------------------------------

def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first message line (its type's name if it has none), cut to ``limit`` characters."""
    return (str(e).splitlines() or [type(e).__name__])[0][:limit]


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def check_fits(nbytes: int, what: str) -> None:
    """Refuse weights that would not fit in memory, with both sizes."""
    avail = available_memory()
    if nbytes > MEMORY_FRACTION * avail:
        raise ValueError(f"{what} holds {_gb(nbytes)} of weights but only {_gb(avail)} of memory is "
                         f"available (limit {MEMORY_FRACTION:.0%} of it, leaving room for activations); "
                         "run on a machine with more memory")


def _refuse_pickle(path: Path, e: Exception) -> ValueError:
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global: ([\w.]+)", text)
    what = f"it asks to import '{m.group(1)}'" if m else "it needs objects outside torch's allow-list"
    return ValueError(f"{path} refused: loading this pickle would run code ({what}); "
                      "sigprop loads torch files only with torch.load(weights_only=True) and never "
                      "executes code from a checkpoint. Re-save the weights as safetensors or as a "
                      "plain state_dict of tensors")


def torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a one-line ValueError."""
    check_fits(path.stat().st_size, str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) or "GLOBAL" in str(e):
            raise _refuse_pickle(path, e) from None
        raise ValueError(f"{path} is not a readable torch file (corrupt pickle: {str(e).splitlines()[0]})") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError, TypeError,
            AttributeError, IndexError, KeyError, UnicodeDecodeError) as e:
        first = first_line(e)
        raise ValueError(f"{path} is not a readable torch file ({type(e).__name__}: {first})") from None


def safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a state_dict (no code can run: the format is tensors and a JSON header)."""
    check_fits(path.stat().st_size, str(path))
    try:
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    except ImportError:
        raise ValueError("reading .safetensors needs the safetensors package (pip install -e .[hf])") from None
    except Exception as e:  # SafetensorError and friends: corrupt header or truncated data
        first = first_line(e)
        raise ValueError(f"{path} is not a readable safetensors file ({first})") from None


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state_dict (a mapping of names to tensors), found "
                         f"{type(obj).__name__}")
    return obj


# --- the three kinds --------------------------------------------------------------------------

def load(path: str | os.PathLike, config: str | os.PathLike | None = None,
         tokenizer: str | os.PathLike | None = None) -> Loaded:
    """Load ``path`` (see the module docstring); raises ValueError with a reason on any bad input.

    ``tokenizer``: a folder (or tokenizer.json) to tokenize the text with; by default the model
    folder's own, or for a bare state_dict the tokenizer beside the weights or the config.
    """
    p = Path(path)
    if tokenizer is not None and not Path(tokenizer).exists():
        raise ValueError(f"--tokenizer {tokenizer} does not exist")
    if not p.exists():
        raise ValueError(f"checkpoint path {p} does not exist")
    if not os.access(p, os.R_OK):
        raise ValueError(f"checkpoint path {p} is not readable (permission denied)")
    if p.is_dir():
        if (p / "config.json").is_file():
            return load_hf_folder(p, tokenizer)
        if (p / "checkpoint.pt").is_file():
            return load_sigprop(p / "checkpoint.pt")
        below = sorted(p.rglob("checkpoint.pt"))[:3]
        hint = f"; checkpoints below it: {', '.join(str(b.parent) for b in below)}" if below else ""
        raise ValueError(f"folder {p} holds neither config.json (a Hugging Face model folder) nor "
                         f"checkpoint.pt (a sigprop run){hint}")
    if p.stat().st_size == 0:
        raise ValueError(f"{p} is empty")
    from analysis.diagnose.gguf import is_gguf, load_gguf  # imported here: gguf.py builds on this module
    if p.suffix.lower() == ".gguf" or is_gguf(p):
        return load_gguf(p, tokenizer)
    if p.suffix == ".safetensors":
        sd, obj = safetensors_load(p), None
    elif p.suffix in TORCH_SUFFIXES or config is None:
        obj = torch_load(p)
        if isinstance(obj, dict) and "model_config" in obj and config is None:
            return _sigprop_from(obj, p)
        sd = _state_dict_of(obj, p)
    else:
        raise ValueError(f"unknown checkpoint file type '{p.suffix}' (known: .safetensors, "
                         f"{', '.join(TORCH_SUFFIXES)}, .gguf)")
    if config is None:
        raise ValueError(f"{p} is a bare state_dict ({len(sd)} tensors) with no architecture: pass "
                         "--config CONFIG.json (a sigprop ModelConfig dict or a Hugging Face config.json)")
    return load_state_dict_with_config(sd, Path(config), p, tokenizer)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} holds {type(data).__name__}, not a JSON object")
    return data


def load_sigprop(path: Path) -> Loaded:
    """sigprop's own ``checkpoint.pt`` (train.py's format)."""
    obj = torch_load(path)
    if not (isinstance(obj, dict) and "model_config" in obj and "model" in obj):
        raise ValueError(f"{path} is not a sigprop checkpoint (no 'model' and 'model_config' keys)")
    return _sigprop_from(obj, path)


def _sigprop_model(mc_dict: dict[str, Any], sd: dict[str, torch.Tensor], source: Path) -> Loaded:
    from analysis.testbed.model import ModelConfig, build_model
    try:
        mc = ModelConfig(**mc_dict)
    except TypeError as e:
        raise ValueError(f"{source}: model_config is not a sigprop ModelConfig ({e})") from None
    model = build_model(mc)
    _load_into(model, sd, source, strict=True)
    return Loaded(model=model, kind="sigprop", rebuild=lambda: build_model(mc, seed=0),
                  description=f"sigprop testbed: scheme {mc.scheme}, depth {mc.depth}, width {mc.width}, "
                              f"heads {mc.heads}, ffn {mc.ffn}, norm {mc.norm}",
                  vocab_size=mc.vocab, max_len=mc.max_seq_len, loss_kind="lm", scheme=mc.scheme,
                  theory_shape=dict(width=mc.width, heads=mc.heads, ffn=mc.ffn, norm=mc.norm,
                                    sigma=mc.sigma, embed_std=mc.embed_std, experts=mc.experts,
                                    top_k=mc.top_k, scheme_params=dict(mc.scheme_params),
                                    **({"attention": mc.attention} if hasattr(mc, "attention") else {}),
                                    **({"parametrization": mc.parametrization}
                                       if mc.parametrization != "standard" else {})),
                  nbytes=sum(t.numel() * t.element_size() for t in sd.values()))


def _sigprop_from(obj: dict[str, Any], path: Path) -> Loaded:
    if not isinstance(obj.get("model_config"), dict):
        raise ValueError(f"{path}: model_config is not a dict")
    return _sigprop_model(obj["model_config"], _state_dict_of(obj["model"], path), path)


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: Path, strict: bool) -> list[str]:
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).splitlines()
        raise ValueError(f"{source}: weights do not fit the architecture ({' '.join(first[1:3]).strip()[:300]})") from None
    notes = []
    if missing:
        if strict or len(missing) > len(sd) // 2:
            raise ValueError(f"{source}: {len(missing)} weights missing for this architecture "
                             f"(first: {missing[0]}); is the config the right one?")
        notes.append(f"{len(missing)} weights missing from the file (left at init): {', '.join(missing[:3])}")
    if unexpected:
        if strict:
            raise ValueError(f"{source}: {len(unexpected)} unexpected weights (first: {unexpected[0]})")
        notes.append(f"{len(unexpected)} weights in the file unused: {', '.join(unexpected[:3])}")
    return notes


# --- Hugging Face -----------------------------------------------------------------------------

def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("Hugging Face checkpoints need transformers (pip install -e .[hf])") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _hf_config(data: dict[str, Any], source: Path):
    t = _transformers()
    if "auto_map" in data:
        raise ValueError(f"{source} asks for custom model code (auto_map: "
                         f"{', '.join(data['auto_map'])}); sigprop never runs code from a checkpoint "
                         "(trust_remote_code stays off)")
    model_type = data.get("model_type")
    from transformers import CONFIG_MAPPING
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{source}: unsupported architecture model_type={model_type!r}: tried "
                         "transformers' built-in families (this transformers has "
                         f"{len(CONFIG_MAPPING)}, e.g. bert, roberta, gpt2, gpt_neox, llama, mistral, "
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


def _hf_head_class(config) -> tuple[Any, str]:
    """(auto class, loss kind): causal LM, masked LM, or the bare model with a surrogate loss."""
    t = _transformers()
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
            tok = _transformers().AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                                trust_remote_code=False)
            return tok, folder
        except Exception as e:  # a broken tokenizer is not fatal: fall back to bytes
            if explicit:
                raise ValueError(f"--tokenizer {folder} did not load ({str(e)[:160]})") from None
            notes.append(f"the tokenizer in {folder} did not load ({str(e)[:120]}); using bytes")
        explicit = False
    return None, None


def _finish_hf(model: nn.Module, config, cls, loss_kind: str, description: str, nbytes: int,
               tokenizer_dirs: list[Path | None], explicit_tokenizer: bool, notes: list[str],
               built_tokenizer: tuple[Any, Path | str] | None = None) -> Loaded:
    """``built_tokenizer``: (tokenizer, where from) already built (a GGUF file's own); else the first
    loadable one in ``tokenizer_dirs``."""
    model.eval()  # no dropout: the diagnosis should be deterministic
    encode = decode = None
    tok_name, mask_id = "bytes", getattr(config, "mask_token_id", None)
    tok, where = built_tokenizer or _tokenizer(tokenizer_dirs, explicit_tokenizer, notes)
    if tok is not None:
        encode = lambda s, tok=tok: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        decode = lambda ids, tok=tok: tok.decode(ids)  # noqa: E731
        tok_name = f"{type(tok).__name__} from {where}"
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
                  nbytes=nbytes, encoder=encoder, rebuild=rebuild)


def load_hf_folder(folder: Path, tokenizer: str | os.PathLike | None = None) -> Loaded:
    """A local Hugging Face model folder, through transformers, offline, no remote code."""
    data = _read_json(folder / "config.json")
    config = _hf_config(data, folder / "config.json")
    weights = [folder / f for f in HF_WEIGHTS if (folder / f).is_file()]
    if not weights:
        raise ValueError(f"{folder} has config.json but no weights (looked for {', '.join(HF_WEIGHTS)})")
    shards = list(folder.glob("*.safetensors")) + list(folder.glob("pytorch_model*.bin"))
    nbytes = sum(f.stat().st_size for f in shards)
    check_fits(nbytes, str(folder))
    use_st = any(f.name.startswith("model.safetensors") for f in weights)
    cls, loss_kind = _hf_head_class(config)
    try:
        model = cls.from_pretrained(str(folder), config=config, local_files_only=True,
                                    trust_remote_code=False, use_safetensors=use_st,
                                    weights_only=True)
    except Exception as e:
        text = str(e)
        if "Weights only load failed" in text or "GLOBAL" in text:
            raise _refuse_pickle(folder, e) from None
        raise ValueError(f"{folder}: transformers could not load the weights ({type(e).__name__}: "
                         f"{first_line(e, 300)})") from None
    model.float()
    desc = (f"Hugging Face {type(model).__name__} ({config.model_type}), "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"weights from {'safetensors' if use_st else 'torch .bin (weights_only)'}")
    return _finish_hf(model, config, cls, loss_kind, desc, nbytes,
                      [Path(tokenizer) if tokenizer else folder], tokenizer is not None, [])


def load_state_dict_with_config(sd: dict[str, torch.Tensor], config_path: Path, source: Path,
                                tokenizer: str | os.PathLike | None = None) -> Loaded:
    """A bare state_dict and a JSON config (sigprop ModelConfig dict, or a Hugging Face config.json)."""
    data = _read_json(config_path)
    if "scheme" in data and "model_type" not in data:
        loaded = _sigprop_model(data, sd, source)
        loaded.kind = "state_dict"
        return loaded
    if "model_type" not in data:
        raise ValueError(f"config {config_path} is neither a sigprop ModelConfig (no 'scheme') nor a "
                         "Hugging Face config (no 'model_type')")
    config = _hf_config(data, config_path)
    cls, loss_kind = _hf_head_class(config)
    try:
        model = cls.from_config(config, trust_remote_code=False)
    except Exception as e:
        raise ValueError(f"{config_path}: could not build {config.model_type} ({str(e)[:200]})") from None
    # HF state_dicts may be saved from the bare model or with its head: try both prefixes
    base = getattr(model, "base_model_prefix", "")
    if base and not any(k.startswith(base + ".") for k in sd) and any(
            k.startswith(base + ".") for k in model.state_dict()):
        sd = {(k if k.startswith(("lm_head", "cls.", "embed_out")) else f"{base}.{k}"): v for k, v in sd.items()}
    notes = _load_into(model, sd, source, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.float()
    desc = (f"{type(model).__name__} ({config.model_type}) built from {config_path.name}, weights "
            f"from {source.name}")
    dirs = [Path(tokenizer)] if tokenizer else [source.parent, config_path.parent]
    return _finish_hf(model, config, cls, loss_kind, desc,
                      sum(t.numel() * t.element_size() for t in sd.values()), dirs,
                      tokenizer is not None, notes)
