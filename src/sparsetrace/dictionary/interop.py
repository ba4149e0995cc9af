"""Reading and writing other toolkits' dictionary folders (SAELens, sparsify).

Formats handled (checked against sae-lens 6.54 and eai-sparsify 1.3 on fixtures they wrote, see
``tests/fixtures/peers``):

SAELens folder: ``cfg.json`` + ``sae_weights.safetensors``
    ``W_enc [d_in, d_sae]`` (transposed w.r.t. ours), ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``,
    ``b_dec [d_out]``, optional ``threshold`` (or older ``log_threshold``) for JumpReLU, ``W_skip
    [d_out, d_in]`` for skip transcoders, optional ``scaling_factor [d_sae]`` (older
    ``finetuning_scaling_factor``). Config: ``architecture`` (standard / topk / jumprelu /
    transcoder / skip_transcoder / jumprelu_transcoder / jumprelu_skip_transcoder),
    ``apply_b_dec_to_input`` (the encoder sees ``x - b_dec``), ``normalize_activations``, ``k`` and
    ``rescale_acts_by_decoder_norm`` (TopK), and ``metadata.model_name`` / ``metadata.hook_name`` /
    ``metadata.hook_name_out`` (TransformerLens hook names such as ``blocks.6.hook_resid_pre``).
    Configs written before SAELens 6 keep these fields at the top level.

sparsify folder: ``cfg.json`` + ``sae.safetensors``, the folder named after the hooked module
    (``layers.6``, ``layers.6.mlp``), the run folder above it holding the trainer's ``config.json``
    (with ``model``). ``encoder.weight [n, d_in]`` / ``encoder.bias [n]`` (an ``nn.Linear``),
    ``W_dec [n, d_in]``, ``b_dec [d_in]``, optional ``W_skip [d_in, d_in]`` applied to the raw input.
    A non-transcoding sparsify SAE encodes ``x - b_dec``; TopK keeps the k largest of
    ``relu(pre)``.

Everything is folded into our single form ``act(W_enc @ x + b_enc)`` exactly (in float64, then
stored as float32): subtracting ``b_dec`` before the encoder becomes ``b_enc - W_enc @ b_dec``;
SAELens' ``rescale_acts_by_decoder_norm`` moves the decoder norms into the encoder; a stored
activation-norm scaling factor or whitening is folded like SAELens' own ``fold_*`` methods. What
cannot be represented (per-input layer-norm, missing statistics, gated/groupmax activations) is
refused with a ``DictionaryFileError`` that says why.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import __version__
from ..errors import DictionaryFileError
from ..model.norms import model_type_from_name
from .hooknames import parse_hf_module, parse_tl_hook, tl_hook_name
from .io import from_tensors, verify_manifest, write_folder_atomically
from .model import DEFAULT_HOOKPOINTS, DictionaryConfig, SparseDictionary

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SCALER = "activation_scaler.json"
SAELENS_WHITENING = "activation_whitening.safetensors"
SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SPARSIFY_RUN_CONFIG = "config.json"
# the SAELens release whose cfg.json layout export_saelens writes (and that loads it, bench/peers)
SAELENS_FORMAT_VERSION = "6.54.12"

Loader = Callable[..., SparseDictionary]

# SAELens architecture -> (our kind, our activation)
_SAELENS_ARCH = {
    "standard": ("sae", "relu"),
    "topk": ("sae", "topk"),
    "jumprelu": ("sae", "jumprelu"),
    "transcoder": ("transcoder", "relu"),
    "skip_transcoder": ("skip_transcoder", "relu"),
    "jumprelu_transcoder": ("transcoder", "jumprelu"),
    "jumprelu_skip_transcoder": ("skip_transcoder", "jumprelu"),
}
_SAELENS_ARCH_INV = {v: k for k, v in _SAELENS_ARCH.items()}

# ------------------------------------------------------------------------------------------ detect
def detect(path: Path) -> Loader | None:
    """Return a loader ``(path, *, device="cpu") -> SparseDictionary`` for a SAELens or sparsify
    dictionary folder, or None when ``path`` is neither."""
    path = Path(path)
    if not path.is_dir() or not (path / SAELENS_CONFIG).is_file():
        return None
    if (path / SAELENS_WEIGHTS).is_file():
        return load_saelens
    if (path / SPARSIFY_WEIGHTS).is_file():
        return load_sparsify
    return None


# ----------------------------------------------------------------------------------------- helpers
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DictionaryFileError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DictionaryFileError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DictionaryFileError(f"{path} holds a JSON {type(data).__name__}; expected an object")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DictionaryFileError(f"{path} is corrupt or truncated ({e})") from None


def _need(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], source: Path) -> torch.Tensor:
    if name not in tensors:
        raise DictionaryFileError(
            f"{source}: tensor '{name}' is missing; expected shape {list(shape)} (has {sorted(tensors)})"
        )
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise DictionaryFileError(f"{source}: tensor '{name}' has shape {list(t.shape)}; expected {list(shape)}")
    if not t.is_floating_point():
        raise DictionaryFileError(f"{source}: tensor '{name}' has dtype {t.dtype}; expected a float tensor")
    return t.to(torch.float64)


def _int(cfg: dict, key: str, source: Path) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        # some writers store integral floats
        if isinstance(v, float) and v.is_integer() and v > 0:
            return int(v)
        raise DictionaryFileError(f"{source}: '{key}'={v!r} is invalid; expected a positive integer")
    return v


# ----------------------------------------------------------------------------------------- SAELens
def _saelens_arch(cfg: dict, path: Path) -> tuple[str, str, str]:
    """(SAELens architecture, our kind, our activation); pre-6 configs name only the activation."""
    arch = cfg.get("architecture")
    if arch is None:  # pre-6 config
        act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        if act == "topk":
            arch = "topk"
        elif act == "relu":
            arch = "standard"
        else:
            raise DictionaryFileError(
                f"{path / SAELENS_CONFIG}: activation_fn '{act}' has no sparsetrace equivalent; expected relu or topk"
            )
    if arch not in _SAELENS_ARCH:
        raise DictionaryFileError(
            f"{path / SAELENS_CONFIG}: SAELens architecture '{arch}' has no sparsetrace equivalent; expected one of "
            f"{', '.join(_SAELENS_ARCH)} (training checkpoints such as batchtopk: save with save_inference_model)"
        )
    return (arch, *_SAELENS_ARCH[arch])


def _saelens_k(cfg: dict, activation: str, path: Path) -> int | None:
    if activation != "topk":
        return None
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if k is None:
        raise DictionaryFileError(f"{path / SAELENS_CONFIG}: a TopK SAE needs 'k'")
    return int(k)


def _saelens_weights(tensors: dict, kind: str, activation: str, dims: tuple[int, int, int], src: Path) -> list:
    """[W (ours: [n, d_in]), b_enc, W_dec (scaling factor folded in), b_dec, W_skip, threshold]."""
    d_in, n, d_out = dims
    W = _need(tensors, "W_enc", (d_in, n), src).t()
    b_enc = _need(tensors, "b_enc", (n,), src)
    W_dec = _need(tensors, "W_dec", (n, d_out), src)
    b_dec = _need(tensors, "b_dec", (d_out,), src)
    W_skip = _need(tensors, "W_skip", (d_out, d_in), src) if kind == "skip_transcoder" else None
    threshold = None
    if activation == "jumprelu":
        if "threshold" in tensors:
            threshold = _need(tensors, "threshold", (n,), src)
        elif "log_threshold" in tensors:
            threshold = _need(tensors, "log_threshold", (n,), src).exp()
        else:
            _need(tensors, "threshold", (n,), src)
    if "scaling_factor" in tensors:  # finetuning scaling factor: decode uses (f * s) @ W_dec
        W_dec = W_dec * _need(tensors, "scaling_factor", (n,), src)[:, None]
    return [W, b_enc, W_dec, b_dec, W_skip, threshold]


def _saelens_fold(cfg: dict, path: Path, kind: str, arch: str, w: list) -> tuple[float, float]:
    """Fold b_dec subtraction, decoder-norm rescaling and activation normalisation into ``w`` (in
    place, the list of :func:`_saelens_weights`); returns (input_scale, output_scale)."""
    W, b_enc, W_dec, b_dec, _, threshold = w
    d_out, d_in = W_dec.shape[1], W.shape[1]
    # 1. the encoder sees x - b_dec
    # SAELens' default (and pre-6 configs') is True; its transcoders refuse True
    if cfg.get("apply_b_dec_to_input", kind == "sae"):
        if d_out != d_in:
            raise DictionaryFileError(f"{path}: apply_b_dec_to_input needs d_in == d_out, got {d_in} and {d_out}")
        b_enc = b_enc - W @ b_dec
    # 2. TopK on pre-activations scaled by decoder norms, decoding with unit-norm rows
    if cfg.get("rescale_acts_by_decoder_norm", False):
        s = W_dec.norm(dim=-1).clamp_min(1e-12)
        W, b_enc, W_dec = W * s[:, None], b_enc * s, W_dec / s[:, None]
        if threshold is not None:
            threshold = threshold * s
    # 3. activation normalisation
    input_scale = output_scale = 1.0
    norm = cfg.get("normalize_activations") or "none"
    if norm == "expected_average_only_in":
        c = _saelens_scaling_factor(path)
        # as SAELens' fold_activation_norm_scaling_factor (W_skip untouched, like there)
        W, W_dec, b_dec = W * c, W_dec / c, b_dec / c
        input_scale = output_scale = 1.0 / c
    elif norm == "covariance_whitening":
        if kind != "sae":
            raise DictionaryFileError(f"{path}: covariance_whitening is only supported for SAEs, not {arch}")
        mean, M, M_inv = _saelens_whitening(path, d_in)
        # encoder saw z = (x - mean) @ M; decoder output is mapped back with @ M_inv + mean
        W_new = (M @ W.t()).t()
        b_enc = b_enc - W_new @ mean
        W, W_dec, b_dec = W_new, W_dec @ M_inv, b_dec @ M_inv + mean
    elif norm in ("layer_norm", "constant_norm_rescale"):
        raise DictionaryFileError(
            f"{path / SAELENS_CONFIG}: normalize_activations='{norm}' rescales every input by its own norm at run "
            f"time, which a linear encoder cannot represent; expected 'none' or a folded normalisation"
        )
    elif norm != "none":
        raise DictionaryFileError(f"{path / SAELENS_CONFIG}: normalize_activations='{norm}' is unknown")
    w[:] = [W, b_enc, W_dec, b_dec, w[4], threshold]
    return input_scale, output_scale


def _saelens_hookpoints(field: Callable, kind: str) -> tuple[int, str, str]:
    """(layer, hookpoint in, hookpoint out) from the TransformerLens hook names."""
    layer, hp_in = parse_tl_hook(field("hook_name", field("hook_point")))
    layer_out, hp_out = parse_tl_hook(field("hook_name_out"))
    default_in, default_out = DEFAULT_HOOKPOINTS[kind]
    hp_in = hp_in or default_in
    if kind == "sae":
        hp_out = hp_in
    elif hp_out is None:
        hp_out = "mlp_out" if hp_in == "mlp_in" else default_out
    if layer is None:
        layer = layer_out if layer_out is not None else int(field("hook_layer", 0) or 0)
    return layer, hp_in, hp_out


def load_saelens(path: str | Path, *, device: str | torch.device = "cpu") -> SparseDictionary:
    """Load a SAELens dictionary folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    path = Path(path)
    verify_manifest(path)
    cfg = _read_json(path / SAELENS_CONFIG)
    tensors = _read_tensors(path / SAELENS_WEIGHTS)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}

    def field(key: str, default=None):  # SAELens >= 6 keeps run info in metadata, older at top level
        return meta.get(key, cfg.get(key, default))

    arch, kind, activation = _saelens_arch(cfg, path)
    d_in = _int(cfg, "d_in", path / SAELENS_CONFIG)
    n = _int(cfg, "d_sae", path / SAELENS_CONFIG)
    d_out = _int(cfg, "d_out", path / SAELENS_CONFIG) if kind != "sae" else d_in
    k = _saelens_k(cfg, activation, path)
    w = _saelens_weights(tensors, kind, activation, (d_in, n, d_out), path / SAELENS_WEIGHTS)
    input_scale, output_scale = _saelens_fold(cfg, path, kind, arch, w)
    layer, hp_in, hp_out = _saelens_hookpoints(field, kind)
    ours = DictionaryConfig(
        kind=kind, d_in=d_in, d_out=d_out, n_features=n, activation=activation, k=k, layer=layer,
        hookpoint_in=hp_in, hookpoint_out=hp_out, model_id=str(field("model_name", "") or ""),
        input_scale=input_scale, output_scale=output_scale,
    )
    return _build(ours, *w, source=path).to(device)


def _saelens_scaling_factor(path: Path) -> float:
    scaler = path / SAELENS_SCALER
    c = _read_json(scaler).get("scaling_factor") if scaler.is_file() else None
    if not isinstance(c, (int, float)) or isinstance(c, bool) or not c > 0:
        raise DictionaryFileError(
            f"{path}: normalize_activations='expected_average_only_in' needs the activation-norm scaling factor "
            f"estimated during training, which is not stored here (no 'scaling_factor' in {SAELENS_SCALER}); "
            f"fold it with SAELens' fold_activation_norm_scaling_factor and save again"
        )
    return float(c)


def _saelens_whitening(path: Path, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    f = path / SAELENS_WHITENING
    if not f.is_file():
        raise DictionaryFileError(
            f"{path}: normalize_activations='covariance_whitening' needs the whitening statistics estimated "
            f"during training, which are not stored here (no {SAELENS_WHITENING}); fold them with SAELens' "
            f"fold_activation_whitening and save again"
        )
    t = _read_tensors(f)
    return (_need(t, "mean", (d,), f), _need(t, "matrix", (d, d), f), _need(t, "inverse_matrix", (d, d), f))


def _build(cfg, W, b_enc, W_dec, b_dec, W_skip, threshold, *, source: Path) -> SparseDictionary:
    try:
        cfg.validate()
    except Exception as e:  # ConfigError: name the file
        raise DictionaryFileError(f"{source}: {e}") from None
    tensors = {"W_enc": W, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if W_skip is not None:
        tensors["W_skip"] = W_skip
    if threshold is not None:
        if (threshold <= 0).any():
            # SAELens' JumpReLU is relu(pre) * (pre > t); for t <= 0 that is relu (a tiny positive t)
            threshold = threshold.clamp_min(1e-12)
        tensors["threshold"] = threshold
    return from_tensors(cfg, {k: v.to(torch.float32) for k, v in tensors.items()}, source=str(source))


def export_saelens(d: SparseDictionary, folder: str | Path, *, hook_name: str | None = None) -> Path:
    """Write ``d`` as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) loadable with
    ``sae_lens.SAE.load_from_disk``. ``hook_name`` overrides the TransformerLens hook name derived
    from the dictionary's hookpoint (``resid_pre`` at layer 6 -> ``blocks.6.hook_resid_pre``)."""
    c = d.cfg
    act = c.activation
    threshold = None
    if act == "jumprelu":
        threshold = d.threshold.detach()
    elif act == "batchtopk":
        t = float(d.batch_threshold)
        if t < 0:
            raise DictionaryFileError(f"cannot export: batch_threshold {t} < 0 has no SAELens JumpReLU equivalent")
        threshold, act = torch.full((c.n_features,), t), "jumprelu"
    arch = _SAELENS_ARCH_INV.get((c.kind, act))
    if arch is None:
        raise DictionaryFileError(
            f"cannot export a {c.activation} {c.kind} to SAELens: it has no such architecture "
            f"(it has {', '.join(_SAELENS_ARCH)})"
        )
    meta = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        "model_name": c.model_id or None,
        "hook_name": hook_name or tl_hook_name(c.hookpoint_in, c.layer),
        "hook_head_index": None,
        "exported_by": f"sparsetrace {__version__}",
    }
    cfg = {
        "d_in": c.d_in,
        "d_sae": c.n_features,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        "architecture": arch,
    }
    if c.kind != "sae":
        cfg["d_out"] = c.d_out
        meta["hook_name_out"] = tl_hook_name(c.hookpoint_out, c.layer)
    if act == "topk":
        cfg["k"] = int(c.k)
        cfg["rescale_acts_by_decoder_norm"] = False
    tensors = {
        "W_enc": d.W_enc.detach().t().contiguous().float(),
        "b_enc": d.b_enc.detach().float(),
        "W_dec": d.W_dec.detach().float(),
        "b_dec": d.b_dec.detach().float(),
    }
    if d.W_skip is not None:
        tensors["W_skip"] = d.W_skip.detach().float()
    if threshold is not None:
        tensors["threshold"] = threshold.float()
    folder = Path(folder)
    write_folder_atomically(folder, {SAELENS_WEIGHTS: tensors, SAELENS_CONFIG: json.dumps(cfg, indent=2)})
    return folder


# ---------------------------------------------------------------------------------------- sparsify
def _sparsify_names(path: Path) -> tuple[str, Path]:
    """(hookpoint, run folder) for a sparsify dictionary folder; ``<run>/<hookpoint>[/seedN]``."""
    if re.fullmatch(r"seed\d+", path.name):
        return path.parent.name, path.parent.parent
    return path.name, path.parent


def _sparsify_model_id(run: Path) -> str:
    """The model name in the sparsify run's config (``run/config.json``), or ""."""
    run_cfg = run / SPARSIFY_RUN_CONFIG
    if run_cfg.is_file():
        try:
            rc = json.loads(run_cfg.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError):
            rc = None
        if isinstance(rc, dict) and isinstance(rc.get("model"), str) and "sae" in rc:
            return rc["model"]
    return ""


def load_sparsify(path: str | Path, *, device: str | torch.device = "cpu") -> SparseDictionary:
    """Load a sparsify dictionary folder (``cfg.json`` + ``sae.safetensors``)."""
    path = Path(path).resolve()
    verify_manifest(path)
    cfg = _read_json(path / SPARSIFY_CONFIG)
    src = path / SPARSIFY_WEIGHTS
    tensors = _read_tensors(src)
    act = cfg.get("activation", "topk")
    if act != "topk":
        raise DictionaryFileError(
            f"{path / SPARSIFY_CONFIG}: sparsify activation '{act}' has no sparsetrace equivalent; expected topk"
        )
    d_in = _int(cfg, "d_in", path / SPARSIFY_CONFIG)
    n = cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32))
    k = _int(cfg, "k", path / SPARSIFY_CONFIG)
    W = _need(tensors, "encoder.weight", (n, d_in), src)
    b_enc = _need(tensors, "encoder.bias", (n,), src)
    if "W_dec" not in tensors:
        raise DictionaryFileError(f"{src}: tensor 'W_dec' is missing (saved without a decoder?)")
    W_dec = _need(tensors, "W_dec", (n, d_in), src)
    b_dec = _need(tensors, "b_dec", (d_in,), src)
    transcode = bool(cfg.get("transcode", False))
    skip = bool(cfg.get("skip_connection", False)) or "W_skip" in tensors
    W_skip = _need(tensors, "W_skip", (d_in, d_in), src) if skip else None
    if not transcode:
        b_enc = b_enc - W @ b_dec  # sparsify encodes x - b_dec when autoencoding
    hookpoint, run = _sparsify_names(path)
    model_id = _sparsify_model_id(run)
    layer, hp_in, hp_out = parse_hf_module(hookpoint, model_type_from_name(model_id))
    if not transcode:
        hp_in = hp_out
    kind = "skip_transcoder" if skip else ("transcoder" if transcode else "sae")
    ours = DictionaryConfig(
        kind=kind, d_in=d_in, d_out=d_in, n_features=n, activation="topk", k=k, layer=layer or 0,
        hookpoint_in=hp_in, hookpoint_out=hp_out, model_id=model_id,
    )
    return _build(ours, W, b_enc, W_dec, b_dec, W_skip, None, source=path).to(device)


def export_sparsify(d: SparseDictionary, folder: str | Path) -> Path:
    """Write ``d`` as a sparsify folder (``cfg.json`` + ``sae.safetensors``) loadable with
    ``sparsify.SparseCoder.load_from_disk``. sparsify has only TopK coders with d_out == d_in; name
    the folder after the hooked module (e.g. ``layers.6``) as sparsify does."""
    c = d.cfg
    if c.activation != "topk":
        raise DictionaryFileError(f"cannot export a {c.activation} dictionary to sparsify: it has only TopK coders")
    if c.d_in != c.d_out:
        raise DictionaryFileError(f"cannot export to sparsify: it needs d_in == d_out, got {c.d_in} and {c.d_out}")
    transcode = c.kind != "sae"
    W = d.W_enc.detach().double()
    b_dec = d.b_dec.detach().double()
    b_enc = d.b_enc.detach().double()
    if not transcode:
        b_enc = b_enc + W @ b_dec  # sparsify will encode x - b_dec
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, c.n_features // c.d_in),
        "normalize_decoder": not transcode,
        "num_latents": c.n_features,
        "k": int(c.k),
        "multi_topk": False,
        "skip_connection": c.kind == "skip_transcoder",
        "transcode": transcode,
        "d_in": c.d_in,
    }
    tensors = {
        "encoder.weight": W.float().contiguous(),
        "encoder.bias": b_enc.float(),
        "W_dec": d.W_dec.detach().float(),
        "b_dec": b_dec.float(),
    }
    if d.W_skip is not None:
        tensors["W_skip"] = d.W_skip.detach().float()
    folder = Path(folder)
    write_folder_atomically(folder, {SPARSIFY_WEIGHTS: tensors, SPARSIFY_CONFIG: json.dumps(cfg)})
    return folder
