"""Load a dictionary folder of any supported format: choose the format, then hand it to its reader.

=================  ==================================================  =========================
format             what identifies it                                  reader
=================  ==================================================  =========================
sparsetrace        ``config.json`` + ``weights.safetensors``           :func:`.io.load_native`
SAELens            ``cfg.json`` + ``sae_weights.safetensors``          :func:`.interop.load_saelens`
sparsify           ``cfg.json`` + ``sae.safetensors``                  :func:`.interop.load_sparsify`
circuit-tracer     a graph JSON (``nodes`` + ``links``)                refused: it is a graph
=================  ==================================================  =========================

This module imports both :mod:`.io` (our format) and :mod:`.interop` (other tools'), which do not
import each other's loaders. Pickle files (``.pt``, ``.bin``, ...) are refused before anything is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import DictionaryFileError
from . import interop
from .io import CONFIG, PICKLE_SUFFIXES, WEIGHTS, load_native
from .model import SparseDictionary

__all__ = ["detect_format", "load_dictionary"]


def _is_graph_json(path: Path) -> bool:
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(data, dict) and "nodes" in data and "links" in data


def detect_format(path: str | Path) -> str | None:
    """``"sparsetrace"``, ``"saelens"``, ``"sparsify"``, ``"circuit-tracer"`` (a graph JSON) or None."""
    path = Path(path)
    if _is_graph_json(path):
        return "circuit-tracer"
    if not path.is_dir():
        return None
    if (path / WEIGHTS).exists():
        return "sparsetrace"
    loader = interop.detect(path)
    if loader is interop.load_saelens:
        return "saelens"
    if loader is interop.load_sparsify:
        return "sparsify"
    return None


def load_dictionary(path: str | Path, *, device: str | torch.device = "cpu") -> SparseDictionary:
    """Load a dictionary folder: ours, or a SAELens / sparsify folder converted to ours."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise DictionaryFileError(
            f"refusing to load {path}: pickle-based files can execute code; expected a folder with "
            f"{CONFIG} + {WEIGHTS} (safetensors)"
        )
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not path.exists():
        raise DictionaryFileError(f"dictionary '{path}' does not exist")
    fmt = detect_format(path)
    if fmt == "circuit-tracer":
        raise DictionaryFileError(
            f"'{path}' is an attribution graph (circuit-tracer / Neuronpedia JSON), not a dictionary; "
            f"expected a folder with {CONFIG} + {WEIGHTS}"
        )
    if not path.is_dir():
        raise DictionaryFileError(
            f"'{path}' is not a dictionary folder; expected a folder with {CONFIG} + {WEIGHTS}"
        )
    if fmt == "sparsetrace":
        return load_native(path, device=device)
    if fmt == "saelens":
        return interop.load_saelens(path, device=device)
    if fmt == "sparsify":
        return interop.load_sparsify(path, device=device)
    raise DictionaryFileError(
        f"'{path}' has no {WEIGHTS}; expected a sparsetrace, SAELens or sparsify dictionary folder"
    )
