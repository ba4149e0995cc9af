"""Running only the last decoder layers of a model, from a residual stream computed elsewhere.

>>> with start_at(lm, 12, resid):            # resid: [batch, seq, d_model] entering layer 12
...     logits = lm.model(input_ids=ids, use_cache=False).logits

Inside the block, decoder layers ``< layer`` do no work (they pass their input through) and layer
``layer`` receives ``resid`` instead of what the embeddings would give. Read/edit hooks of
:meth:`LanguageModel.hooks` on layers ``>= layer`` work as usual, so a splice at layer ``l`` that starts
from the clean residual entering ``l`` costs ``L - l`` layers instead of ``L``. Embedding lookup, position
ids and the attention mask are still computed by the model itself from ``input_ids`` (cheap), so the
attention of the layers that do run sees the same positions as in a full forward pass.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor

from .hookpoints import Hookpoint

#: per model: None when a decoder layer returns a tensor, else the length of the tuple it returns
_LAYER_OUTPUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layer_output_form(lm) -> int | None:
    """How the model's decoder layers return their output (probed once per model with a 2-token input)."""
    if lm.model in _LAYER_OUTPUT:
        return _LAYER_OUTPUT[lm.model][0]
    seen: list = []

    def hook(_m, _i, out):
        seen.append(len(out) if isinstance(out, tuple) else None)

    h = lm.arch.layer(0).register_forward_hook(hook)
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=lm.device), use_cache=False)
    finally:
        h.remove()
    _LAYER_OUTPUT[lm.model] = (seen[0],)
    return seen[0]


def _passthrough(form: int | None):
    def forward(hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        return hidden_states if form is None else (hidden_states, *([None] * (form - 1)))

    return forward


@contextlib.contextmanager
def start_at(lm, layer: int, resid: Tensor) -> Iterator[None]:
    """Forward passes inside the block start at decoder layer ``layer`` with residual ``resid``."""
    if not (0 <= layer < lm.n_layers):
        raise ValueError(f"start layer {layer} out of range 0..{lm.n_layers - 1}")
    form = _layer_output_form(lm)
    patched = []
    try:
        for i in range(layer):
            mod = lm.arch.layer(i)
            mod.forward = _passthrough(form)  # type: ignore[method-assign]
            patched.append(mod)
        with lm.hooks(edit={Hookpoint("resid_pre", layer): lambda _x: resid}):
            yield
    finally:
        for mod in patched:
            with contextlib.suppress(AttributeError):
                del mod.forward
