"""Loading a GGUF file (llama.cpp / ollama) without running code from it: header checks, then
transformers' GGUF loader, dequantized to float32.

The header is read first by a small parser of its own (version, counts, tensor shapes, types,
offsets), so that a missing extra, an architecture transformers cannot build, a quantization type
it cannot dequantize, one part of a split GGUF, a truncated file or weights too large for memory
(their float32 size, not the file's) are each refused with one line before transformers reads
anything.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import struct
import time
from pathlib import Path
from typing import Any

from analysis.checkpoints.guards import LOAD_DTYPE, check_fits, first_line
from analysis.checkpoints.hf import finish_hf, hf_head_class, import_transformers
from analysis.checkpoints.loaded import Loaded

GGUF_EXTRA = "pip install -e .[gguf]"
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                 11: "<q", 12: "<d"}  # metadata value types; 8 is a string, 9 an array
# llama.cpp's architecture names that transformers' loader renames before checking its list
_GGUF_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                      "minimax-m2": "minimax_m2", "t5encoder": "t5"}
# llama.cpp's split GGUF: PREFIX-00001-of-00003.gguf, … (llama-gguf-split, convert_hf_to_gguf --split-max-*)
SPLIT_NAME = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.gguf", re.IGNORECASE)


def split_part(name: str) -> tuple[int, int] | None:
    """(part, parts), counted from 1, when ``name`` is a split GGUF's file name with more than one part."""
    m = SPLIT_NAME.fullmatch(name)
    return (int(m.group(2)), int(m.group(3))) if m and int(m.group(3)) > 1 else None


def _refuse_split(path: Path, part: int, parts: int, how: str) -> ValueError:
    """The one-line refusal of a split GGUF's part: transformers reads whole files only."""
    m = SPLIT_NAME.fullmatch(path.name)
    first = path.with_name(f"{m.group(1)}-00001-of-{m.group(3)}.gguf") if m else "FIRST-PART.gguf"
    return ValueError(f"{path} is part {part} of {parts} of a split GGUF model (llama.cpp's gguf-split "
                      f"format, as {how}); transformers' GGUF loader reads single-file GGUFs only: "
                      f"merge the parts first (llama-gguf-split --merge {first} merged.gguf) and pass "
                      "merged.gguf")


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _gguf_modules():
    """(gguf, transformers) or the one-line ValueError naming the extra."""
    import importlib.util
    try:
        import gguf
    except ImportError:
        raise ValueError(f"reading a .gguf file needs the gguf package ({GGUF_EXTRA})") from None
    if importlib.util.find_spec("accelerate") is None:  # transformers refuses gguf_file= without it
        raise ValueError(f"reading a .gguf file needs accelerate ({GGUF_EXTRA})")
    try:
        t = import_transformers()
    except ValueError:
        raise ValueError(f"reading a .gguf file needs transformers ({GGUF_EXTRA})") from None
    return gguf, t


class _Corrupt(Exception):
    pass


def gguf_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    """A GGUF file's metadata (scalars and strings; arrays as their length), its tensor table
    ``[(name, shape in torch order, ggml type id, offset)]`` and where the tensor data starts.
    Reads only the header (memory-mapped); raises ``_Corrupt`` on anything malformed."""
    import mmap
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        size = len(mm)

        def unpack(fmt: str, pos: int) -> tuple[Any, ...]:
            if pos + struct.calcsize(fmt) > size:
                raise _Corrupt(f"truncated: the header is cut off at byte {size}")
            return struct.unpack_from(fmt, mm, pos)

        def string(pos: int) -> tuple[str, int]:
            (n,) = unpack("<Q", pos)
            if pos + 8 + n > size:
                raise _Corrupt(f"a string of {n} bytes at byte {pos} runs past the end ({size} bytes)")
            try:
                return mm[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n
            except UnicodeDecodeError:
                raise _Corrupt(f"a string at byte {pos} is not UTF-8") from None

        def value(vtype: int, pos: int) -> tuple[Any, int]:
            if vtype in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[vtype]
                return unpack(fmt, pos)[0], pos + struct.calcsize(fmt)
            if vtype == 8:
                return string(pos)
            if vtype != 9:
                raise _Corrupt(f"unknown metadata value type {vtype} at byte {pos}")
            etype, count = unpack("<IQ", pos)
            pos += 12
            if etype in _GGUF_SCALARS:
                pos += count * struct.calcsize(_GGUF_SCALARS[etype])
                if pos > size:
                    raise _Corrupt(f"an array of {count} values runs past the end ({size} bytes)")
                return count, pos
            if etype != 8 or count * 8 > size - pos:
                raise _Corrupt(f"an array of {count} values of type {etype} cannot be read")
            for _ in range(count):  # strings: walk their lengths
                (n,) = unpack("<Q", pos)
                pos += 8 + n
            if pos > size:
                raise _Corrupt(f"an array of {count} strings runs past the end ({size} bytes)")
            return count, pos

        if size < 24 or mm[:4] != b"GGUF":
            raise _Corrupt("it does not start with the GGUF magic bytes")
        version, n_tensors, n_kv = unpack("<IQQ", 4)
        if version not in (2, 3):
            raise _Corrupt(f"GGUF version {version} (readable: 2 and 3)")
        if n_tensors > size // 24 or n_kv > size // 12:
            raise _Corrupt(f"truncated or corrupt: its header claims {n_tensors} tensors and {n_kv} "
                           f"metadata keys, more than {size} bytes can hold")
        meta: dict[str, Any] = {}
        pos = 24
        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = unpack("<I", pos)
            meta[key], pos = value(vtype, pos + 4)
        tensors = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (ndim,) = unpack("<I", pos)
            if not 1 <= ndim <= 8:
                raise _Corrupt(f"tensor {name} has {ndim} dimensions")
            dims = unpack(f"<{ndim}Q", pos + 4)
            qtype, offset = unpack("<IQ", pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 12
            tensors.append((name, tuple(reversed(dims)), qtype, offset))  # ggml: fastest dim first
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or align < 1:
            raise _Corrupt(f"general.alignment is {align!r}")
        return meta, tensors, (pos + align - 1) // align * align


def _gguf_architectures() -> list[str]:
    """The architectures this transformers' GGUF loader can build."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
        names |= set(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:  # transformers >= 5: a second loader for some architectures
        from transformers.integrations.gguf import GGUF_ARCHS
        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names - {"general", "tokenizer"})


def _gguf_dequantizable(gguf, qtype: int, arch: str) -> bool:
    """Whether the loader that will read ``arch`` can turn ggml type ``qtype`` into floats."""
    try:  # transformers >= 5 reads some architectures with its own dequantizer
        from transformers.integrations.gguf import is_gguf_arch_supported
        from transformers.integrations.gguf.dequant import GGML_NAME
        if is_gguf_arch_supported(arch):
            return qtype in (0, 1, 30) or qtype in GGML_NAME  # F32, F16, BF16 or a block type
    except ImportError:
        pass
    import numpy as np
    try:
        gguf.dequantize(np.zeros(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)][1], np.uint8),
                        gguf.GGMLQuantizationType(qtype))
        return True
    except Exception:  # NotImplementedError: gguf-py has no dequantizer for it
        return False


def _check_length(path: Path, gguf, tensors: list[tuple[str, tuple[int, ...], int, int]],
                  data_start: int) -> None:
    """Refuse a file shorter than its header says (a download cut short), with both sizes."""
    ends = []
    for name, shape, qtype, offset in tensors:
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        ends.append((data_start + offset + math.prod(shape) // block * nbytes, name))
    if not ends:
        return
    promised, last = max(ends)
    held = path.stat().st_size
    if promised > held:
        raise ValueError(f"{path} is not a readable GGUF file (truncated: its header promises "
                         f"{promised} bytes, up to the end of tensor {last}, but the file holds {held}, "
                         f"{promised - held} short; was the download cut off?)")


def gguf_quantization(tensors: list[tuple[str, tuple[int, ...], str]]) -> str:
    """Which types the weights were stored in: 'Q4_1 (all 2-D weights), F32 (all 1-D: norms)'.
    ``tensors``: (name, shape, type name), largest share first."""
    by_type: dict[str, list[tuple[str, int]]] = {}
    size: dict[str, int] = {}
    for name, shape, tname in tensors:
        by_type.setdefault(tname, []).append((name, len(shape)))
        size[tname] = size.get(tname, 0) + math.prod(shape)
    n2 = sum(len(shape) >= 2 for _, shape, _ in tensors)
    n1 = len(tensors) - n2
    parts = []
    for tname in sorted(by_type, key=lambda t: -size[t]):
        two = [n for n, nd in by_type[tname] if nd >= 2]
        one = [n for n, nd in by_type[tname] if nd < 2]
        what = []
        if len(two) + len(one) == len(tensors):
            what.append("all tensors")
        elif two:
            what.append("all 2-D weights" if len(two) == n2 else two[0] if len(two) == 1
                        else f"{len(two)} 2-D weights")
        if one and len(two) + len(one) < len(tensors):
            kind = ": norms" if all("norm" in n for n in one) else ""
            what.append(f"all 1-D{kind}" if len(one) == n1 else one[0] if len(one) == 1
                        else f"{len(one)} 1-D{kind}")
        parts.append(f"{tname} ({'; '.join(what)})")
    return ", ".join(parts)


def load_gguf(path: Path, tokenizer: str | os.PathLike | None = None) -> Loaded:
    """A GGUF file through transformers' GGUF loader, dequantized to float32, offline, no code run.

    The header is read first: architecture, tensor types and sizes are checked, and the memory guard
    uses the dequantized float32 size. The tokenizer is the file's own (built by transformers from
    its ``tokenizer.ggml.*`` metadata) unless ``tokenizer`` names one; bytes if neither loads."""
    part = split_part(path.name)  # before anything is read: a byte-split part may have no header
    if part:
        raise _refuse_split(path, *part, "its file name says")
    gguf, t = _gguf_modules()
    try:
        meta, tensors, data_start = gguf_header(path)
    except (_Corrupt, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from None
    parts, no, total = meta.get("split.count"), meta.get("split.no"), meta.get("split.tensors.count")
    if isinstance(parts, int) and parts > 1:  # the metadata speaks where the file was renamed
        holds = f"; it holds {len(tensors)} of {total} tensors" if isinstance(total, int) else ""
        raise _refuse_split(path, (no if isinstance(no, int) else 0) + 1, parts,
                            f"its split.* metadata says{holds}")
    arch = meta.get("general.architecture")
    supported = _gguf_architectures()
    if not isinstance(arch, str) or _GGUF_ARCH_ALIASES.get(arch, arch) not in supported:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported by transformers' GGUF "
                         f"loader (transformers {t.__version__} reads: {', '.join(supported)})")
    names: dict[int, str] = {}
    for name, _, qtype, _ in tensors:
        if qtype not in names:
            try:
                names[qtype] = gguf.GGMLQuantizationType(qtype).name
            except ValueError:
                raise ValueError(f"{path}: tensor {name} has ggml type id {qtype}, unknown to gguf "
                                 f"{_version('gguf')}; cannot dequantize it") from None
    bad = sorted({names[q] for q in names if not _gguf_dequantizable(gguf, q, arch)})
    if bad:
        first = next(n for n, _, q, _ in tensors if names[q] in bad)
        raise ValueError(f"{path}: quantization type {', '.join(bad)} (e.g. {first}) cannot be "
                         f"dequantized by gguf {_version('gguf')} / transformers {t.__version__}")
    _check_length(path, gguf, tensors, data_start)
    dtype = LOAD_DTYPE.get()
    nbytes = dtype.itemsize * sum(math.prod(shape) for _, shape, _, _ in tensors)  # dequantized
    check_fits(nbytes, f"{path} (dequantized to {str(dtype).replace('torch.', '')})")
    quant = gguf_quantization([(n, s, names[q]) for n, s, q, _ in tensors])
    folder, fname = str(path.parent), path.name
    with _one_reader(gguf):
        return _load_gguf_once(path, tokenizer, t, folder, fname, arch, names, nbytes, quant)


def _load_gguf_once(path: Path, tokenizer, t, folder: str, fname: str, arch: str, names: dict[int, str],
                    nbytes: int, quant: str) -> Loaded:
    """Config, weights and tokenizer through transformers (its GGUF reader shared by ``_one_reader``)."""
    try:
        config = t.AutoConfig.from_pretrained(folder, gguf_file=fname, local_files_only=True,
                                              trust_remote_code=False)
    except Exception as e:
        first = first_line(e)
        raise ValueError(f"{path}: transformers could not read the GGUF metadata of architecture "
                         f"{arch!r} ({type(e).__name__}: {first})") from None
    cls, loss_kind = hf_head_class(config)
    if loss_kind != "lm":
        raise ValueError(f"{path}: GGUF architecture {arch!r} ({config.model_type}) has no causal "
                         "language-model class in transformers; diagnose reads decoder-only language "
                         "models from GGUF")
    kwargs: dict[str, Any] = dict(gguf_file=fname, config=config, dtype=LOAD_DTYPE.get(),
                                  local_files_only=True, trust_remote_code=False)
    if hasattr(t, "GgufConfig"):  # transformers >= 5 could keep the blocks packed: unpack them
        kwargs["quantization_config"] = t.GgufConfig(dequantize=True)
    t0 = time.perf_counter()
    try:
        with _quiet_gguf_progress():
            model = cls.from_pretrained(folder, **kwargs)
    except Exception as e:
        first = first_line(e, 300)
        raise ValueError(f"{path}: transformers could not load the GGUF weights ({type(e).__name__}: "
                         f"{first})") from None
    seconds = time.perf_counter() - t0
    model.to(LOAD_DTYPE.get())
    to = str(LOAD_DTYPE.get()).replace("torch.", "")
    how = f"dequantized to {to}" if set(names.values()) != {"F32"} else f"read as {to}"
    notes = [f"weights {how} from GGUF {quant} by transformers' GGUF loader (dequantized in "
             f"{seconds:.1f} s); what is measured is the dequantized model, quantization error included"]
    built = None
    if tokenizer is None:
        try:
            tok = t.AutoTokenizer.from_pretrained(folder, gguf_file=fname, local_files_only=True,
                                                  trust_remote_code=False)
            built = (tok, path)
        except Exception as e:  # no or an unconvertible tokenizer in the metadata: bytes
            first = first_line(e, 120)
            notes.append(f"the GGUF file's tokenizer did not load ({first}); using bytes")
            built = (None, None)
    desc = (f"GGUF {arch} ({fname}) as Hugging Face {type(model).__name__}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"{how} from {quant}")
    loaded = finish_hf(model, config, cls, loss_kind, desc, nbytes,
                        [Path(tokenizer)] if tokenizer else [], tokenizer is not None, notes, built)
    loaded.kind = "gguf"
    return loaded


@contextlib.contextmanager
def _one_reader(gguf):
    """One parse of the file for transformers' three reads of it (config, weights, tokenizer), and
    one tensor-name map per architecture and depth.

    Each ``gguf.GGUFReader`` walks every metadata value in Python: with a 151k-token vocabulary
    and its merges that is ~12 s on 2 cores, three times over. transformers also builds gguf's
    tensor-name map (11 ms) once per module of the model, ~400 times for SmolLM2 (4.5 s). Both are
    pure functions of their arguments; transformers imports them by name at each call, so the
    package attributes are swapped for memos while loading.
    """
    saved = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}

    def memo(fn):
        cache = {}

        def call(*args, **kwargs):
            key = (tuple(os.fspath(a) if isinstance(a, os.PathLike) else a for a in args),
                   tuple(sorted(kwargs.items())))
            if key not in cache:
                cache[key] = fn(*args, **kwargs)
            return cache[key]
        return call
    for name, fn in saved.items():
        setattr(gguf, name, memo(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(gguf, name, fn)


@contextlib.contextmanager
def _quiet_gguf_progress():
    """transformers' GGUF reader draws its own tqdm bar, past disable_progress_bar(): silence it."""
    try:
        from transformers import modeling_gguf_pytorch_utils as mod
    except ImportError:
        yield
        return
    bar = getattr(mod, "tqdm", None)
    if bar is not None:
        mod.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        if bar is not None:
            mod.tqdm = bar


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"
