"""Weight-only (prompt-independent) attribution: virtual weights between dictionary features,
de-embeddings and logit effects. Nothing here runs the model on a prompt.

A source feature i writes ``W_dec_src[i]`` into the residual stream; a target feature f reads
``W_enc_tgt[f] . x_in``. The *virtual weight* i -> f is the effect of one unit of i on f's
pre-activation along a path of the residual stream:

- direct: ``W_enc_tgt[f] . N(W_dec_src[i])``;
- through the OV circuit of attention head h at layer l (the head attending fully to the source's
  position): ``W_enc_tgt[f] . N_tgt(W_O^h W_V^h N_attn(W_dec_src[i]))``.

``N`` is the linear part of the normalisation in front of the reader: ``x -> s * gamma * centre(x)``
(``centre`` only for LayerNorm; ``gamma`` is the norm's weight, ``1 + weight`` for Gemma). Residual
SAEs read the raw residual, so for them ``N`` is the identity; transcoders read after the MLP's norm,
and attention after its input norm. The per-token scale ``s = 1 / rms(x)`` (or ``1 / std(x)``) depends
on the input; it is ignored (``s = 1``) unless ``norm_scale`` gives a value, e.g. the average scale
from :func:`estimate_norm_scales`, so weights are exact up to that one scalar per norm.

Grouped-query attention is handled by pairing each query head with its key/value head.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..dictionary.model import SparseDictionary
from ..errors import ConfigError, ModelError
from ..model.adapter import LanguageModel
from ..model.norms import norm_info

__all__ = [
    "estimate_norm_scales",
    "deembedding_matrix",
    "feature_input_tokens",
    "feature_logit_effects",
    "find_upstream_features",
    "head_ov",
    "logit_effect_matrix",
    "norm_linear",
    "ov_readers",
    "ov_virtual_weights",
    "path_exists",
    "reader_vectors",
    "virtual_weights",
]

# ============================================================================================ norms
def _norm_module(lm: LanguageModel, layer: int | None, which: str) -> nn.Module | None:
    return norm_info(lm, layer, which).module


def norm_linear(lm: LanguageModel, layer: int | None, which: str) -> tuple[Tensor, bool]:
    """(gamma [d], centred) of the norm in front of layer ``layer``'s MLP (``which="mlp"``), its
    attention (``"attn"``) or the unembedding (``"final"``, layer ignored); from the one table in
    :mod:`sparsetrace.model.norms` (gamma is ``1 + weight`` for Gemma)."""
    info = norm_info(lm, layer, which)
    return info.gamma, info.centred


def _norm_T(u: Tensor, gamma: Tensor, centred: bool, scale: float) -> Tensor:
    """``N^T u`` for ``N = scale * diag(gamma) * C`` (C = centring, or identity): ``scale * C(gamma * u)``."""
    v = u * gamma.to(device=u.device, dtype=u.dtype)
    if centred:
        v = v - v.mean(-1, keepdim=True)
    return v * scale


@torch.no_grad()
def estimate_norm_scales(lm: LanguageModel, input_ids: Iterable[Tensor], layers: Iterable[int] | None = None,
                         which: str = "mlp", *, skip_first: bool = True) -> dict[int, float]:
    """Average per-token scale ``1 / sqrt(mean(x^2) + eps)`` (RMSNorm) or ``1 / sqrt(var(x) + eps)``
    (LayerNorm) of the norm in front of each layer's MLP (or attention), over the given prompts
    (``skip_first`` leaves out position 0, usually BOS with an outsized residual)."""
    layers = list(range(lm.n_layers) if layers is None else layers)
    sums = {L: 0.0 for L in layers}
    counts = {L: 0 for L in layers}
    handles = []
    for L in layers:
        m = _norm_module(lm, L, which)
        _, centred = norm_linear(lm, L, which)
        eps = float(getattr(m, "eps", getattr(m, "variance_epsilon", 1e-5)) or 1e-5)

        def hook(_m, args, L=L, centred=centred, eps=eps):
            x = args[0].double()
            if skip_first:
                x = x[:, 1:]
            var = x.var(-1, unbiased=False) if centred else x.pow(2).mean(-1)
            s = torch.rsqrt(var + eps)
            sums[L] += float(s.sum())
            counts[L] += s.numel()

        handles.append(m.register_forward_pre_hook(hook))
    try:
        for ids in input_ids:
            lm.run(ids if ids.dim() == 2 else ids[None], stop_after=max(layers))
    finally:
        for h in handles:
            h.remove()
    return {L: sums[L] / max(counts[L], 1) for L in layers}


# ============================================================================================ order
def _times(d: SparseDictionary, parallel: bool) -> tuple[float, float]:
    """(read time, write time) of a dictionary along the forward pass (for validity checks)."""
    L, cfg = d.cfg.layer, d.cfg
    if cfg.kind == "sae":
        if cfg.hookpoint_in == "resid_pre":
            return L + 0.0, L + 0.05
        if cfg.hookpoint_in == "resid_post":
            return L + 0.9, L + 0.95
        raise ConfigError(f"weight-only attribution supports residual SAEs; got an SAE at {cfg.hookpoint_in}")
    return (L + 0.1, L + 0.75) if parallel else (L + 0.5, L + 0.75)


def path_exists(src: SparseDictionary, tgt: SparseDictionary, parallel: bool, via_attn: int | None = None) -> bool:
    """Whether ``src`` writes before ``tgt`` reads (directly, or with attention layer ``via_attn`` in
    between: the source writes before that attention reads, which writes before the target reads).
    ``parallel``: the model's attention and MLP read the same residual (GPT-NeoX, GPT-J)."""
    _, w = _times(src, parallel)
    r, _ = _times(tgt, parallel)
    if via_attn is None:
        return w < r
    attn_read, attn_write = via_attn + 0.1, via_attn + (0.75 if parallel else 0.25)
    return w < attn_read and attn_write < r


def _check_order(src: SparseDictionary, tgt: SparseDictionary, parallel: bool, via_attn: int | None = None) -> None:
    if via_attn is None:
        if not path_exists(src, tgt, parallel):
            raise ConfigError(f"source dictionary (layer {src.cfg.layer}, {src.cfg.kind}) writes after target "
                              f"(layer {tgt.cfg.layer}, {tgt.cfg.kind}) reads; no direct path")
        return
    if not path_exists(src, tgt, parallel, via_attn):
        raise ConfigError(f"attention layer {via_attn} does not lie between the source (layer {src.cfg.layer}) "
                          f"and the target (layer {tgt.cfg.layer})")


def reader_vectors(lm: LanguageModel | None, tgt: SparseDictionary, features: Tensor, scale: float | None = None) -> Tensor:
    """``N_tgt^T W_enc_tgt[features]`` ([k, d]): what the target features read from the residual stream
    (through the norm in front of a transcoder, with its weight and centring; ``scale``: its average
    scale, default 1). Dot it with a residual direction to get a virtual weight."""
    u = tgt.W_enc.detach()[features].float()
    if tgt.cfg.kind == "sae":
        return u
    if lm is None:
        return u * (1.0 if scale is None else scale)
    gamma, centred = norm_linear(lm, tgt.cfg.layer, "mlp")
    return _norm_T(u, gamma, centred, 1.0 if scale is None else scale)


def _as_index(features) -> tuple[Tensor, bool]:
    if isinstance(features, int):
        return torch.tensor([features]), True
    return torch.as_tensor(features, dtype=torch.long).reshape(-1), False


# ============================================================================================ direct
@torch.no_grad()
def find_upstream_features(target_feat_idx: int, sae: SparseDictionary, transcoder: SparseDictionary) -> Tensor:
    """Scores of every transcoder feature for driving residual-SAE feature ``target_feat_idx``:
    ``transcoder.W_dec @ sae.W_enc[target]`` ([n_transcoder_features]; sort or ``topk`` them)."""
    if not 0 <= target_feat_idx < sae.n_features:
        raise ConfigError(f"target feature {target_feat_idx} is out of range 0..{sae.n_features - 1}")
    _check_order(transcoder, sae, False)
    return transcoder.W_dec.detach().float() @ sae.W_enc.detach()[target_feat_idx].float()


@torch.no_grad()
def virtual_weights(src: SparseDictionary, tgt: SparseDictionary, tgt_features, *, lm: LanguageModel | None = None,
                    norm_scale: float | None = None) -> Tensor:
    """Direct virtual weights from every source feature to the given target feature(s):
    ``[n_src]`` for an int, ``[k, n_src]`` for a list. Transcoder targets read after the MLP norm:
    pass ``lm`` to apply its weight (and centring), ``norm_scale`` for its average scale (else 1)."""
    idx, single = _as_index(tgt_features)
    _check_order(src, tgt, bool(lm and lm.arch.parallel_residual))
    out = reader_vectors(lm, tgt, idx, norm_scale) @ src.W_dec.detach().float().t()
    return out[0] if single else out


# ============================================================================================ attention
def head_ov(lm: LanguageModel, layer: int) -> tuple[Tensor, Tensor]:
    """Per-head value and output weights ``W_V [H, d_head, d]`` (each query head's key/value head,
    so GQA groups repeat) and ``W_O [H, d, d_head]``; ``OV_h = W_O[h] @ W_V[h]``."""
    attn = lm.arch.attn(layer)
    inner = getattr(attn, "attention", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "v_proj"):
        attn = inner  # GPT-Neo wraps its attention
    cfg = lm.model.config
    H = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or cfg.num_heads)
    d = lm.d_model
    if hasattr(attn, "v_proj"):
        wv = attn.v_proj.weight.detach().float()
        o_mod = next((getattr(attn, n) for n in ("o_proj", "out_proj", "dense") if hasattr(attn, n)), None)
        if o_mod is None:
            raise ModelError(f"attention of layer {layer} has v_proj but no o_proj/out_proj/dense")
        wo = o_mod.weight.detach().float()  # [d, H * dh]
        dh = wo.shape[1] // H
        n_kv = wv.shape[0] // dh
        V = wv.reshape(n_kv, dh, d)
        V = V.repeat_interleave(H // n_kv, dim=0)
    elif hasattr(attn, "c_attn"):  # GPT-2: Conv1D, weight [in, out]
        w = attn.c_attn.weight.detach().float()
        dh = d // H
        V = w[:, 2 * d:3 * d].t().reshape(H, dh, d)
        wo = attn.c_proj.weight.detach().float().t()  # [d_out, d_in]
    elif hasattr(attn, "query_key_value"):  # GPT-NeoX: per head [q, k, v] blocks
        w = attn.query_key_value.weight.detach().float()
        dh = d // H
        V = w.reshape(H, 3, dh, d)[:, 2]
        wo = attn.dense.weight.detach().float()
    else:
        raise ModelError(f"cannot find value/output projections in {type(attn).__name__} (layer {layer})")
    W_O = wo.reshape(d, H, dh).permute(1, 0, 2)
    return V.contiguous(), W_O.contiguous()


@torch.no_grad()
def ov_virtual_weights(lm: LanguageModel, attn_layer: int, src: SparseDictionary, tgt: SparseDictionary,
                       tgt_feature: int, *, attn_scale: float | None = None, tgt_scale: float | None = None) -> Tensor:
    """Virtual weights from every source feature to ``tgt_feature`` through each attention head's OV
    circuit at ``attn_layer`` ([n_heads, n_src]); ``attn_scale``/``tgt_scale``: average norm scales of
    the attention input norm and the target's norm (default 1, i.e. ignored)."""
    _check_order(src, tgt, lm.arch.parallel_residual, via_attn=attn_layer)
    u = reader_vectors(lm, tgt, torch.tensor([tgt_feature]), tgt_scale)[0]  # [d]
    return ov_readers(lm, attn_layer, u, attn_scale) @ src.W_dec.detach().float().t()


@torch.no_grad()
def ov_readers(lm: LanguageModel, attn_layer: int, u: Tensor, attn_scale: float | None = None) -> Tensor:
    """``N_attn^T W_V^h^T W_O^h^T u`` for each head h of ``attn_layer`` ([n_heads, d]): what a residual
    reader ``u`` (e.g. from :func:`reader_vectors`) reads, through each head's OV circuit, from the
    residual stream at the attended position."""
    W_V, W_O = head_ov(lm, attn_layer)
    uh = torch.einsum("hdk,d->hk", W_O, u.float().to(W_O.device))  # W_O^T u per head: [H, dh]
    uh = torch.einsum("hkd,hk->hd", W_V, uh)  # W_V^T (.): [H, d]
    gamma, centred = norm_linear(lm, attn_layer, "attn")
    return _norm_T(uh, gamma, centred, 1.0 if attn_scale is None else attn_scale)


# ============================================================================================ tokens
def _top(lm: LanguageModel, scores: Tensor, k: int, largest: bool = True) -> list[tuple[str, float]]:
    v, i = scores.topk(min(k, scores.numel()), largest=largest)
    return list(zip(lm.to_str_tokens(i.tolist()), v.tolist(), strict=True))


@torch.no_grad()
def feature_input_tokens(lm: LanguageModel, dictionary: SparseDictionary, feature: int, k: int = 10,
                         *, return_scores: bool = False):
    """De-embedding: which input tokens drive ``feature`` directly, ``W_E[v] . N^T W_enc[f]`` with the
    norm's weight (and centring) but not its scale. Returns the top ``k`` ``[(token, score)]`` (and the
    full ``[vocab]`` scores with ``return_scores``)."""
    u = reader_vectors(lm, dictionary, torch.tensor([feature]), 1.0)[0]
    W_E = lm.arch.embed.weight.detach().float()
    scores = W_E @ u.to(W_E.device)
    top = _top(lm, scores, k)
    return (top, scores) if return_scores else top


@torch.no_grad()
def feature_logit_effects(lm: LanguageModel, dictionary: SparseDictionary, feature: int, k: int = 10,
                          *, return_scores: bool = False):
    """Direct logit effects of ``feature``: ``W_U @ (gamma_final * centre(W_dec[f]))`` (final norm's
    weight, not its scale). Returns ``{"top": [(token, effect)] promoted, "bottom": [...] suppressed}``."""
    scores = logit_effect_matrix(lm, dictionary.W_dec.detach()[feature][None])[0]
    out = {"top": _top(lm, scores, k), "bottom": _top(lm, scores, k, largest=False)}
    if return_scores:
        out["scores"] = scores
    return out


@torch.no_grad()
def logit_effect_matrix(lm: LanguageModel, rows: Tensor) -> Tensor:
    """Direct logit effects ``[n, vocab]`` of residual-stream directions ``rows`` ``[n, d]`` (e.g. decoder
    rows): through the final norm's weight (and centring), not its scale, and the unembedding."""
    gamma, centred = norm_linear(lm, None, "final")
    W_U = lm.arch.unembed.weight.detach().float()
    v = rows.detach().float().to(W_U.device)
    if centred:
        v = v - v.mean(-1, keepdim=True)
    return (v * gamma.to(v.device)) @ W_U.t()


@torch.no_grad()
def deembedding_matrix(lm: LanguageModel, dictionary: SparseDictionary, features, *,
                       per_token_scale: bool = True) -> Tensor:
    """De-embedding of several features ``[k, vocab]``: ``W_E[v] . N^T W_enc[f]`` as in
    :func:`feature_input_tokens`; with ``per_token_scale`` each token's embedding is also divided by its
    own RMS (after centring for LayerNorm), as the norm in front of a transcoder would (residual SAEs
    read the raw stream: no scaling)."""
    idx, _ = _as_index(features)
    W_E = lm.arch.embed.weight.detach().float()
    u = dictionary.W_enc.detach()[idx].float().to(W_E.device)
    if dictionary.cfg.kind == "sae":
        return u @ W_E.t()
    info = norm_info(lm, dictionary.cfg.layer, "mlp")
    u = _norm_T(u, info.gamma.to(u.device), info.centred, 1.0)
    scores = u @ W_E.t()
    if per_token_scale and info.module is not None:
        E = W_E - W_E.mean(-1, keepdim=True) if info.centred else W_E
        scores = scores * torch.rsqrt(E.pow(2).mean(-1) + info.eps)
    return scores
