"""Write per-layer transcoders in circuit-tracer's own on-disk layout (checked against circuit-tracer 0.5.0).

Layout (a "transcoder_set", what ``circuit_tracer.utils.caching.load_transcoders_from_cache`` and a
Hugging Face repo read through ``ReplacementModel.from_pretrained(model, "user/repo")`` expect)::

    DIR/config.yaml              model_kind: transcoder_set, feature_input_hook: mlp.hook_in,
                                 feature_output_hook: mlp.hook_out, model_name, scan (+ a sparsetrace block)
    DIR/layer_{i}.safetensors    i = 0 .. n_layers-1, one per model layer, read by ``load_relu_transcoder``:
        W_enc [n, d_model]   b_enc [n]   W_dec [n, d_model]   b_dec [d_model]
        activation_function.threshold [n]   (JumpReLU only; absent = ReLU)
        W_skip [d_model, d_model]           (skip transcoders only)
    DIR/manifest.json            sha256 of every file (ours; circuit-tracer ignores it)

circuit-tracer computes ``act(x @ W_enc.T + b_enc) @ W_dec + b_dec (+ x @ W_skip.T)`` on the raw input of the
MLP (``mlp.hook_in``, TransformerLens's input to the MLP after its norm, our ``mlp_in``) and replaces the
MLP output (``mlp.hook_out``, our ``mlp_out``). Our saved dictionaries already act on raw activations
(training's input/output scales are folded into ``W_enc``/``W_dec``/``b_dec``/``W_skip`` before saving,
``normalisation: folded``), so the tensors are written as they are, in float32.

Constraints of circuit-tracer's ``TranscoderSet``, and how the export meets them:

- every model layer needs a transcoder (its activation caching encodes at each layer): a layer the run
  has no transcoder for gets an all-zero one (no feature can fire, ``b_dec = 0``), so in circuit-tracer,
  as in sparsetrace, that layer's whole MLP output is an error node. These files are full size.
- one width for all layers: a narrower transcoder is padded with zero features at the end (feature ids
  unchanged; the padding never fires).
- one activation per layer file: ReLU and JumpReLU are written as such; a BatchTopK dictionary is written
  as the JumpReLU it is at inference (``pre * (pre > batch_threshold)``, the same threshold for every
  feature; exact). TopK has no threshold form and is refused (it is a per-token rank rule; any
  per-feature threshold changes which features fire).
- skip transcoders: if any layer has ``W_skip``, every layer file gets one (zeros where none).

Cross-layer transcoders use circuit-tracer's other layout (``model_kind: cross_layer_transcoder``,
``W_enc_{i}``/``W_dec_{i}`` files): :mod:`.export_clt`, which shares :func:`write_config_yaml` and the hooks.
"""

from __future__ import annotations

import torch

from .. import __version__
from ..errors import DictionaryFileError
from .model import SparseDictionary

CONFIG_YAML = "config.yaml"
FEATURE_INPUT_HOOK = "mlp.hook_in"  # TransformerLens MLP input (after the norm) = our mlp_in
FEATURE_OUTPUT_HOOK = "mlp.hook_out"  # TransformerLens MLP output = our mlp_out
PLT_FILE = "layer_{layer}.safetensors"
# hub names of the short model names whose weights we know (for config.yaml's model_name)
HUB_NAMES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _threshold(d: SparseDictionary) -> torch.Tensor | None:
    """The per-feature JumpReLU threshold circuit-tracer should use, None for ReLU; refuses TopK."""
    c = d.cfg
    if c.activation == "relu":
        return None
    if c.activation == "jumprelu":
        return d.threshold.detach().float()
    if c.activation == "batchtopk":
        t = float(d.batch_threshold)
        if t < 0:
            raise DictionaryFileError(
                f"cannot export layer {c.layer} to circuit-tracer: its batch_threshold {t} < 0 has no JumpReLU "
                "equivalent (a JumpReLU threshold must be >= 0 to keep negative pre-activations off)")
        return torch.full((c.n_features,), t)
    raise DictionaryFileError(
        f"cannot export layer {c.layer} ({c.activation}, k={c.k}) to circuit-tracer: it loads ReLU and JumpReLU "
        "transcoders only, and a TopK rule (keep the k largest per token) has no exact per-feature threshold; "
        "train with --activation relu, jumprelu or batchtopk to export")


def check_dictionaries(dicts: list[SparseDictionary], n_layers: int | None, d_model: int | None) -> None:
    """Refuse what circuit-tracer cannot load (``None``: skip the checks against the model)."""
    if not dicts:
        raise DictionaryFileError("no dictionaries to export to circuit-tracer")
    seen: dict[int, SparseDictionary] = {}
    for d in dicts:
        c = d.cfg
        if c.kind == "sae" or (c.hookpoint_in, c.hookpoint_out) != ("mlp_in", "mlp_out"):
            raise DictionaryFileError(
                f"cannot export the {c.kind} at layer {c.layer} ({c.hookpoint_in} -> {c.hookpoint_out}) to "
                "circuit-tracer: its replacement model takes transcoders mlp_in -> mlp_out only")
        if d_model is not None and (c.d_in != d_model or c.d_out != d_model):
            raise DictionaryFileError(
                f"layer {c.layer}: d_in={c.d_in}, d_out={c.d_out}; circuit-tracer needs both equal to the "
                f"model's d_model={d_model}")
        if n_layers is not None and not 0 <= c.layer < n_layers:
            raise DictionaryFileError(f"layer {c.layer} is out of range for a model of {n_layers} layers")
        if c.layer in seen:
            raise DictionaryFileError(
                f"two transcoders for layer {c.layer}; circuit-tracer takes one per layer (export them separately)")
        seen[c.layer] = d
        _threshold(d)  # refuse early, before anything is written


def layer_tensors(d: SparseDictionary | None, n: int, d_model: int, skip: bool) -> dict[str, torch.Tensor]:
    """circuit-tracer's tensors for one layer: ``d`` padded to ``n`` features, or all zeros for ``None``."""
    t = {
        "W_enc": torch.zeros(n, d_model),
        "b_enc": torch.zeros(n),
        "W_dec": torch.zeros(n, d_model),
        "b_dec": torch.zeros(d_model),
    }
    if skip:
        t["W_skip"] = torch.zeros(d_model, d_model)
    if d is None:
        return t
    m = d.cfg.n_features
    t["W_enc"][:m] = d.W_enc.detach().float()
    t["b_enc"][:m] = d.b_enc.detach().float()
    t["W_dec"][:m] = d.W_dec.detach().float()
    t["b_dec"] = d.b_dec.detach().float().clone()
    if skip and d.W_skip is not None:
        t["W_skip"] = d.W_skip.detach().float().clone()
    thr = _threshold(d)
    if thr is not None:
        full = torch.zeros(n)
        full[:m] = thr
        t["activation_function.threshold"] = full
    return t


def _yaml_scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    return "'" + s.replace("'", "''") + "'"  # YAML single-quoted: only ' needs escaping


def write_config_yaml(cfg: dict) -> str:
    """A YAML mapping of scalars, lists of scalars and one level of nested mappings (all config.yaml needs)."""
    lines = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines.append(f"{k}:")
            for k2, v2 in v.items():
                if isinstance(v2, (list, tuple)):
                    lines.append(f"  {k2}: [{', '.join(_yaml_scalar(x) for x in v2)}]")
                else:
                    lines.append(f"  {k2}: {_yaml_scalar(v2)}")
        elif isinstance(v, (list, tuple)):
            lines.append(f"{k}: [{', '.join(_yaml_scalar(x) for x in v)}]")
        else:
            lines.append(f"{k}: {_yaml_scalar(v)}")
    return "\n".join(lines) + "\n"


def circuit_tracer_files(dicts: list[SparseDictionary], *, n_layers: int, d_model: int,
                         scan: str | None = None):
    """Yield ``(file name, content)`` of the circuit-tracer transcoder set: ``config.yaml`` first, then one
    tensor dict per layer (generated one at a time, so memory stays at one layer's worth)."""
    check_dictionaries(dicts, n_layers, d_model)
    by_layer = {d.cfg.layer: d for d in dicts}
    n = max(d.cfg.n_features for d in dicts)
    skip = any(d.W_skip is not None for d in dicts)
    model_id = next((d.cfg.model_id for d in dicts if d.cfg.model_id), "")
    trained = sorted(by_layer)
    cfg = {
        "model_kind": "transcoder_set",
        "feature_input_hook": FEATURE_INPUT_HOOK,
        "feature_output_hook": FEATURE_OUTPUT_HOOK,
        "model_name": HUB_NAMES.get(model_id, model_id),
        "scan": scan or f"sparsetrace/{model_id or 'model'}/transcoders",
        "sparsetrace": {
            "exported_by": f"sparsetrace {__version__}",
            "model_id": model_id,
            "n_layers": n_layers,
            "d_model": d_model,
            "d_transcoder": n,
            "trained_layers": trained,
            "zero_layers": [i for i in range(n_layers) if i not in by_layer],
            "activations": [by_layer[i].cfg.activation for i in trained],
            "n_features": [by_layer[i].cfg.n_features for i in trained],
            "skip_connection": skip,
            "normalisation": "folded",
        },
    }
    yield CONFIG_YAML, write_config_yaml(cfg)
    for layer in range(n_layers):
        yield PLT_FILE.format(layer=layer), layer_tensors(by_layer.get(layer), n, d_model, skip)
