"""Write a cross-layer transcoder in circuit-tracer's own CLT layout (checked against circuit-tracer 0.5.0).

Layout (``model_kind: cross_layer_transcoder``: what ``circuit_tracer.transcoder.cross_layer_transcoder.load_clt``,
``circuit_tracer.utils.caching.load_transcoders_from_cache`` and a Hugging Face repo read through
``ReplacementModel.from_pretrained(model, "user/repo")`` expect)::

    DIR/config.yaml              model_kind: cross_layer_transcoder, feature_input_hook: mlp.hook_in,
                                 feature_output_hook: mlp.hook_out, model_name, scan (+ a sparsetrace block)
    DIR/W_enc_{i}.safetensors    i = 0 .. n_layers-1: W_enc_{i} [F, d_model], b_enc_{i} [F],
                                 b_dec_{i} [d_model] (the output bias of MLP i), threshold_{i} [F] (JumpReLU only)
    DIR/W_dec_{i}.safetensors    W_dec_{i} [F, n_layers - i, d_model]: layer i's features writing to
                                 MLP outputs i, i+1, ..., n_layers-1 (the same order as our ``W_dec[i]``)
    DIR/manifest.json            sha256 of every file (ours; circuit-tracer ignores it)

circuit-tracer infers the layer count from the number of ``W_enc_*`` files and the activation from the
presence of ``threshold_0`` (``pre * (pre > threshold)``, as ours); its encoder reads ``mlp.hook_in``
(our ``mlp_in``) and the decoders write ``mlp.hook_out`` (our ``mlp_out``). Our saved CLTs already act
on raw activations (training scales folded in at save time), so tensors are written as they are, float32.

circuit-tracer's CLT knows ReLU and JumpReLU only. A TopK CLT is refused: keeping the k largest
pre-activations per token is a rank rule, and any per-feature threshold changes which features fire on
some token, so the export would no longer be the CLT that was trained and evaluated (train with
``--activation jumprelu`` or ``relu`` to export).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .. import __version__
from ..errors import DictionaryFileError
from .clt import CrossLayerTranscoder
from .export_circuit_tracer import (
    CONFIG_YAML,
    FEATURE_INPUT_HOOK,
    FEATURE_OUTPUT_HOOK,
    HUB_NAMES,
    write_config_yaml,
)

ENCODER_FILE = "W_enc_{i}.safetensors"
DECODER_FILE = "W_dec_{i}.safetensors"


def encoder_keys(i: int, jumprelu: bool) -> list[str]:
    """circuit-tracer's tensor names in ``W_enc_{i}.safetensors``."""
    return [f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"] + ([f"threshold_{i}"] if jumprelu else [])


def check_clt(clt: CrossLayerTranscoder) -> None:
    """Refuse what circuit-tracer's ``load_clt`` cannot represent."""
    c = clt.cfg
    if c.activation == "topk":
        raise DictionaryFileError(
            f"cannot export a TopK CLT (k={c.k}) to circuit-tracer: its load_clt knows ReLU and JumpReLU only, "
            "and keeping the k largest features per token has no exact per-feature threshold; train the CLT "
            "with --activation jumprelu or relu to export it")
    if c.activation not in ("relu", "jumprelu"):
        raise DictionaryFileError(f"cannot export a CLT with activation '{c.activation}'; expected relu or jumprelu")
    if (c.hookpoint_in, c.hookpoint_out) != ("mlp_in", "mlp_out"):
        raise DictionaryFileError(
            f"cannot export a CLT {c.hookpoint_in} -> {c.hookpoint_out} to circuit-tracer: its replacement model "
            "reads the MLP input and writes the MLP output (mlp_in -> mlp_out)")


def clt_config(clt: CrossLayerTranscoder, scan: str | None = None) -> dict:
    c = clt.cfg
    return {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": FEATURE_INPUT_HOOK,
        "feature_output_hook": FEATURE_OUTPUT_HOOK,
        "model_name": HUB_NAMES.get(c.model_id, c.model_id),
        "scan": scan or f"sparsetrace/{c.model_id or 'model'}/clt",
        "sparsetrace": {
            "exported_by": f"sparsetrace {__version__}",
            "model_id": c.model_id,
            "n_layers": c.n_layers,
            "d_model": c.d_model,
            "d_transcoder": c.n_features,
            "activation": c.activation,
            "normalisation": "folded",
        },
    }


def clt_layer_tensors(clt: CrossLayerTranscoder, i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder file tensors, decoder file tensors) of layer ``i``, float32 and contiguous."""

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32).contiguous().clone()

    enc = {f"W_enc_{i}": f32(clt.W_enc[i]), f"b_enc_{i}": f32(clt.b_enc[i]), f"b_dec_{i}": f32(clt.b_dec[i])}
    thr = clt.threshold(i)
    if thr is not None:
        enc[f"threshold_{i}"] = f32(thr)
    return enc, {f"W_dec_{i}": f32(clt.W_dec[i])}


def clt_files(clt: CrossLayerTranscoder, scan: str | None = None) -> Iterator[tuple[str, object]]:
    """Yield ``(file name, content)``: ``config.yaml`` first, then each layer's encoder and decoder files
    (one layer in memory at a time)."""
    check_clt(clt)
    yield CONFIG_YAML, write_config_yaml(clt_config(clt, scan))
    for i in range(clt.n_layers):
        enc, dec = clt_layer_tensors(clt, i)
        yield ENCODER_FILE.format(i=i), enc
        yield DECODER_FILE.format(i=i), dec
