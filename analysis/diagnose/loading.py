"""Loading a checkpoint someone else built, without ever running code from it.

The kinds of input (nothing is downloaded):

- sigprop's own run: a folder holding ``checkpoint.pt``, or that file (keys model, model_config, …);
- a local Hugging Face model folder: ``config.json`` with ``model.safetensors`` or
  ``pytorch_model.bin`` (sharded too), loaded through transformers with ``local_files_only=True``
  and ``trust_remote_code=False``; a config that asks for custom code (``auto_map``) is refused;
- a bare state_dict (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) with ``config=`` pointing at a
  JSON file: a sigprop ``ModelConfig`` dict (has ``scheme``) or a Hugging Face config.json (has
  ``model_type``).
- a ``.gguf`` file (llama.cpp / ollama), read by transformers' GGUF loader and dequantized to
  float32; its architecture, config and tokenizer come from the file's metadata (extra ``gguf``).
- a Hugging Face model id (``org/name``) already in the local hub cache: its snapshot folder;
- a folder holding one model of the kinds above (a folder holding two is refused: name one file).

Safety: safetensors files are read with safetensors (no code); torch files only with
``torch.load(weights_only=True)``, which refuses any pickle that would import or call something
outside torch's allow-list; such a file is refused with the global it asked for. A GGUF file is
tensors and typed metadata, no code; its header is checked (magic, sizes, tensor types) before
transformers reads it. Every failure is a ``ValueError`` with a one-line reason.
"""

from __future__ import annotations

import contextvars
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
# The weights' type while a load() runs: every loader reads it, so it is stated once, in load()
LOAD_DTYPE: contextvars.ContextVar[torch.dtype] = contextvars.ContextVar("load_dtype", default=torch.float32)


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
    prefix_ids: list[int] = field(default_factory=list)  # what the tokenizer puts first (BOS, [CLS])


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


# --- where the model is -----------------------------------------------------------------------

# a Hugging Face repo id: org/name, word characters, '-' and '.', no '--' or '..' (huggingface_hub's rule)
HUB_ID = re.compile(r"\w(?:[\w.-]{0,94}\w)?/\w(?:[\w.-]{0,94}\w)?", re.ASCII)
# a sharded Hugging Face checkpoint's parts (one model with its index, never several)
HF_SHARD = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")
MAX_LISTED = 6  # models named in the refusal of a folder holding several (a GGUF repo holds dozens)


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


@dataclass
class _Found:
    """One model a folder holds: the file that names it alone, and what it is."""

    path: Path
    what: str


def folder_models(folder: Path) -> list[_Found]:
    """Every model ``folder`` holds at its top level; a sharded checkpoint or a split GGUF is one."""
    files = {f.name: f for f in sorted(folder.iterdir()) if f.is_file()}
    found = []
    hf = [n for n in HF_WEIGHTS if n in files] if "config.json" in files else []
    if hf:
        found.append(_Found(files["config.json"], f"a Hugging Face model with {hf[0]}"))
    if "checkpoint.pt" in files:
        found.append(_Found(files["checkpoint.pt"], "a sigprop run"))
    found += _gguf_models(files)
    # shards are one model's parts, never models of their own; without config.json they name no
    # architecture, while a single model.safetensors is still a state_dict to pass with --config
    parts = _index_names(files) | {n for n in files if HF_SHARD.fullmatch(n)}
    parts |= set(HF_WEIGHTS) if hf else set()
    found += [_Found(files[name], "a bare state_dict: add --config") for name in files
              if name.endswith(".safetensors") and name not in parts
              and not _mistral_copy(name, files, bool(hf))]
    return found


def _gguf_models(files: dict[str, Path]) -> list[_Found]:
    """The GGUF files among ``files``; the parts of one split GGUF count as one (its first part)."""
    from analysis.diagnose.gguf import split_part  # imported here: gguf.py builds on this module
    found, splits = [], {}
    for name, path in files.items():
        if not name.lower().endswith(".gguf"):
            continue
        part = split_part(name)
        if part is None:
            found.append(_Found(path, "GGUF"))
        else:
            prefix = name[:-len("-00001-of-00001.gguf")]
            splits.setdefault((prefix, part[1]), []).append(path)
    found += [_Found(min(paths), f"part 1 of a GGUF split in {count} parts")
              for (_, count), paths in splits.items()]
    return found


def _index_names(files: dict[str, Path]) -> set[str]:
    """The shard files every ``*.index.json`` among ``files`` lists (an unreadable index lists none)."""
    names: set[str] = set()
    for name, path in files.items():
        if name.endswith(".index.json"):
            try:
                names |= {str(v) for v in json.loads(path.read_text()).get("weight_map", {}).values()}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
                pass  # transformers reports a broken index when it loads the folder
    return names


def _mistral_copy(name: str, files: dict[str, Path], hf: bool) -> bool:
    """Mistral's repos ship their own format's copy of the same weights (params.json +
    consolidated.safetensors) beside the Hugging Face files: not a second model."""
    return hf and name.startswith("consolidated") and "params.json" in files


def _load_folder(folder: Path, config: str | os.PathLike | None,
                 tokenizer: str | os.PathLike | None) -> Loaded:
    """The one model ``folder`` holds; a folder holding none or several is refused."""
    found = folder_models(folder)
    if len(found) > 1:
        listed = "; ".join(f"{f.path.name} ({f.what})" for f in found[:MAX_LISTED])
        more = f"; and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""
        raise ValueError(f"folder {folder} holds {len(found)} models: {listed}{more}; pass one of these "
                         f"files instead of the folder, e.g. {found[0].path}")
    if found and found[0].path.name == "checkpoint.pt":
        return load_sigprop(found[0].path)
    if found:
        return _load_file(found[0].path, config, tokenizer)
    if (folder / "config.json").is_file():
        return load_hf_folder(folder, tokenizer)  # refused there: config.json without weights
    below = sorted(folder.rglob("checkpoint.pt"))[:3]
    hint = f"; checkpoints below it: {', '.join(str(b.parent) for b in below)}" if below else ""
    raise ValueError(f"folder {folder} holds neither config.json (a Hugging Face model folder) nor "
                     f"checkpoint.pt (a sigprop run) nor a .gguf or .safetensors file{hint}")


# --- the kinds --------------------------------------------------------------------------------

def load(path: str | os.PathLike, config: str | os.PathLike | None = None,
         tokenizer: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> Loaded:
    """Load ``path`` (see the module docstring); raises ValueError with a reason on any bad input.

    ``tokenizer``: a folder (or tokenizer.json) to tokenize the text with; by default the model
    folder's own, or for a bare state_dict the tokenizer beside the weights or the config.
    ``dtype``: the weights' type once loaded (float32; bfloat16 halves them, GGUF dequantized
    straight into it).
    """
    if tokenizer is not None and not Path(tokenizer).exists():
        raise ValueError(f"--tokenizer {tokenizer} does not exist")
    p, hub_id = locate(path)
    if not os.access(p, os.R_OK):
        raise ValueError(f"checkpoint path {p} is not readable (permission denied)")
    token = LOAD_DTYPE.set(dtype)
    try:
        loaded = _load_folder(p, config, tokenizer) if p.is_dir() else _load_file(p, config, tokenizer)
    finally:
        LOAD_DTYPE.reset(token)
    loaded.model.to(dtype)
    if hub_id:
        loaded.notes.insert(0, f"{hub_id} read from the local Hugging Face cache: {p}")
    return loaded


def locate(path: str | os.PathLike) -> tuple[Path, str | None]:
    """(the local path, the Hugging Face id it was resolved from or None); ValueError if neither."""
    p = Path(path)
    if p.exists():
        return p, None
    if looks_like_hub_id(os.fspath(path)):  # only where no such local path exists: a path wins
        return resolve_hub_id(os.fspath(path)), os.fspath(path)
    raise ValueError(f"checkpoint path {p} does not exist")


def _load_file(p: Path, config: str | os.PathLike | None,
               tokenizer: str | os.PathLike | None) -> Loaded:
    """One checkpoint file; a folder's ``config.json`` names that folder's Hugging Face model."""
    if p.stat().st_size == 0:
        raise ValueError(f"{p} is empty")
    if p.name == "config.json":
        return load_hf_folder(p.parent, tokenizer)
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
                  nbytes=nbytes, encoder=encoder, rebuild=rebuild, prefix_ids=prefix)


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
    model, missing = _from_pretrained(cls, folder, config, use_st)
    notes = []
    head = _untrained_head(model, missing)
    if head and loss_kind != "surrogate":  # e.g. a sentence-embedding export of a masked LM
        notes.append(f"the checkpoint holds no weights for the {type(model).__name__} head ({head[0]}, "
                     f"{len(head)} tensor(s)): a loss through a randomly initialized head would mean "
                     "nothing, so the bare model runs with the surrogate loss")
        cls, loss_kind = _transformers().AutoModel, "surrogate"
        model, _ = _from_pretrained(cls, folder, config, use_st)
    model.to(LOAD_DTYPE.get())
    desc = (f"Hugging Face {type(model).__name__} ({config.model_type}), "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"weights from {'safetensors' if use_st else 'torch .bin (weights_only)'}")
    return _finish_hf(model, config, cls, loss_kind, desc, nbytes,
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
            raise _refuse_pickle(folder, e) from None
        raise ValueError(f"{folder}: transformers could not load the weights ({type(e).__name__}: "
                         f"{first_line(e, 300)})") from None
    return model, list(info.get("missing_keys", []))


def _untrained_head(model: nn.Module, missing: list[str]) -> list[str]:
    """The missing weights that belong to the head (outside the base model), not to the blocks."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or getattr(model, prefix, None) is None:
        return []
    return [k for k in missing if not k.startswith(prefix + ".")]


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
    model.to(LOAD_DTYPE.get())
    desc = (f"{type(model).__name__} ({config.model_type}) built from {config_path.name}, weights "
            f"from {source.name}")
    dirs = [Path(tokenizer)] if tokenizer else [source.parent, config_path.parent]
    return _finish_hf(model, config, cls, loss_kind, desc,
                      sum(t.numel() * t.element_size() for t in sd.values()), dirs,
                      tokenizer is not None, notes)
