"""Loading a checkpoint someone else built, without ever running code from it.

``load(path)`` finds the kind (``loader``) and hands it to its module: ``sigprop`` (sigprop's own
runs), ``hf`` (Hugging Face folders and hub ids), ``gguf``, ``state_dict`` (a bare state_dict with
a config); ``guards`` holds the checks they share, ``loaded`` what they return.

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

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from analysis.checkpoints.loaded import Loaded  # noqa: E402
from analysis.checkpoints.loader import folder_models, load, locate  # noqa: E402

__all__ = ["Loaded", "folder_models", "load", "locate"]
