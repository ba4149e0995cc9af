"""The local replacement model: a prompt-specific, exactly-matching, linearised stand-in for an LM.

Given a prompt and a set of dictionaries, :class:`ReplacementModel`

1. runs the real model once ("clean pass") and records, for every dictionary, its input and the true
   output it replaces (``mlp_in``/``mlp_out`` for transcoders, the residual for residual SAEs);
2. computes the feature activations (constants from now on) and the error term
   ``error = true output - reconstruction``, so the replacement is exact on this prompt;
3. replaces *every* MLP by a constant: ``decoder write + error`` for MLPs with a transcoder, the
   MLP's whole clean output (a pure error node) for the others (a skip transcoder keeps its linear
   ``W_skip @ x_in`` term live); residual SAEs replace the residual by ``decoder write + error``;
4. freezes attention patterns and normalisation scales (see :class:`FreezeMode`), so the map from
   the constants (embeddings, decoder writes, errors) to any feature pre-activation or logit is
   linear.

The constants enter the forward as "leaf" tensors (one per site, ``[batch, seq, d_model]``), which
is what attribution differentiates with respect to; the values a dictionary reads (its input at the
site) are returned as "reads".

Sites are keyed by where they write: ``"mlp_out.L"`` for layer L's MLP (with or without a
transcoder), ``"resid_pre.L"``/``"resid_post.L"`` for residual SAEs, and ``"emb"`` for the residual
stream entering layer 0 (token + position embeddings, as the model builds it).

Freezing works for any ``transformers`` architecture without per-model code: the forward runs under
a ``TorchFunctionMode`` that intercepts softmax, ``scaled_dot_product_attention``, ``rsqrt``,
``layer_norm`` and ``rms_norm``. In ``record`` mode it computes them normally but returns detached
results and stores them on a tape; in ``replay`` mode it returns the taped values (broadcast to the
current batch), so the forward is linear in the leaves *in value as well as in gradient* (this is what
finite-difference checks use). ``mode=None`` runs with live attention and norms ("unfrozen").
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..dictionary.model import SparseDictionary
from ..errors import ConfigError, DataError, DictionaryFileError, ModelError
from ..model.adapter import LanguageModel
from ..model.hookpoints import Hookpoint
from ..util.memory import release_free_memory
from .clt_sites import check_clt, clt_sites, split_replacements
from .freeze import FreezeMode

__all__ = ["FreezeMode", "ReplacementModel", "Site", "ForwardResult"]


class _SkipLogits(Exception):
    pass


@dataclass
class Site:
    """One place where the replacement model substitutes constants.

    ``key`` is the hookpoint written (``mlp_out.L``, ``resid_pre.L``, ``resid_post.L``). For an MLP
    without a transcoder ``dictionary`` is None and ``error`` is the MLP's whole clean output.
    """

    key: str
    kind: str  # "mlp" | "sae"
    layer: int
    hookpoint: Hookpoint
    order: tuple[int, int]
    dictionary: SparseDictionary | None
    x_in: Tensor  # [seq, d] the clean input the dictionary reads
    out: Tensor  # [seq, d] the true output at the site
    leaf: Tensor  # [seq, d] the constant that replaces it (out minus any live skip term)
    error: Tensor  # [seq, d] out - reconstruction
    pos: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # active feature positions
    feat: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # active feature indices
    act: Tensor = field(default_factory=lambda: torch.zeros(0))  # their activations
    W_enc: Tensor | None = None  # [n_features, d] in the model's dtype
    W_dec: Tensor | None = None
    W_skip: Tensor | None = None
    targets: tuple[str, ...] = ()  # a CLT layer: the MLP sites its features write to (W_dec [F, len, d])

    @property
    def n_active(self) -> int:
        return int(self.pos.numel())

    @property
    def target_keys(self) -> tuple[str, ...]:
        """The sites this site's features write to: itself, or for a CLT layer every later MLP."""
        return self.targets or (self.key,)

    def writes(self, feature: int, scale: float | Tensor = 1.0) -> list[tuple[str, Tensor]]:
        """(site key, ``scale * decoder row``) for every site that feature ``feature`` writes to."""
        assert self.W_dec is not None
        if self.W_dec.dim() == 2:
            return [(self.key, scale * self.W_dec[feature])]
        return [(k, scale * self.W_dec[feature, i]) for i, k in enumerate(self.target_keys)]

    def activation(self, position: int, feature: int) -> float:
        hit = ((self.pos == position) & (self.feat == feature)).nonzero()
        return float(self.act[hit[0, 0]]) if hit.numel() else 0.0


@dataclass
class ForwardResult:
    logits: Tensor | None  # [batch, seq, vocab] when asked for
    final: Tensor | None  # [batch, seq, d] the unembedding's input (after the final norm)
    reads: dict[str, Tensor]  # site key -> the dictionary's input [batch, seq, d]
    leaves: dict[str, Tensor]  # "emb" and site keys -> constants used [batch, seq, d]


_SITE_ORDER = {"resid_pre": 0, "mlp_out": 2, "resid_post": 4}


class ReplacementModel:
    """The local replacement model of ``lm`` on one prompt (``input_ids`` of shape [1, seq] or [seq]).

    ``dictionaries``: transcoders / skip transcoders (``mlp_in`` -> ``mlp_out``) and residual SAEs
    (``resid_pre``/``resid_post``), at most one per site; or, instead of transcoders, one cross-layer
    transcoder (a :class:`~sparsetrace.dictionary.clt.CrossLayerTranscoder` or ``CLTReplacement``; see
    :mod:`.clt_sites`); a ``PLTSet`` counts as its transcoders. After construction, ``exactness`` holds
    ``max |logits_replacement - logits_real|`` over all positions and the vocabulary; ``clean_logits`` and
    ``replacement_logits`` keep the last position's logits (``[1, vocab]``).
    """

    def __init__(self, lm: LanguageModel, input_ids: Tensor, dictionaries: Sequence):
        ids = torch.as_tensor(input_ids, device=lm.device).long()
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise DataError(f"expected token ids of shape [1, seq] with seq >= 1, got {list(ids.shape)}")
        if int(ids.max()) >= lm.vocab_size or int(ids.min()) < 0:
            raise DataError(f"token ids must lie in 0..{lm.vocab_size - 1}")
        self.lm = lm
        self.skip_qk = True  # replay runs skip separate q_proj/k_proj (their results are not used)
        self.input_ids = ids
        self.n_pos = ids.shape[1]
        self.dtype = lm.dtype
        dict_list, clt = split_replacements(dictionaries)
        dicts = self._check_dictionaries(dict_list)
        if clt is not None:
            check_clt(clt, lm.model_id, lm.d_model, lm.n_layers)
            both = [hp.layer for hp in dicts if hp.name == "mlp_out"]
            if both:
                raise ConfigError(f"a cross-layer transcoder replaces every MLP; transcoders for layers {both} "
                                  "were given too (pass one or the other)")
        self.clt = clt

        reads = {Hookpoint("resid_pre", 0)}
        for L in range(lm.n_layers):
            reads |= {Hookpoint("mlp_in", L), Hookpoint("mlp_out", L)}
        for hp in dicts:
            if hp.name != "mlp_out":
                reads.add(hp)
        clean = lm.run(ids, read=sorted(reads, key=lambda h: (h.layer, h.name)))
        if clean.logits is None:
            raise ModelError("the model returned no logits")
        self.clean_logits = clean.logits[0].detach()
        acts = {hp: t[0] for hp, t in clean.acts.items()}
        self.emb = acts[Hookpoint("resid_pre", 0)]

        self.sites: dict[str, Site] = {}
        if clt is not None:
            ins = [acts[Hookpoint("mlp_in", L)] for L in range(lm.n_layers)]
            outs = [acts[Hookpoint("mlp_out", L)] for L in range(lm.n_layers)]
            self.sites.update({s.key: s for s in clt_sites(clt, ins, outs, self.dtype, Site)})
        for L in range(lm.n_layers if clt is None else 0):
            hp = Hookpoint("mlp_out", L)
            self.sites[str(hp)] = self._make_site(hp, dicts.get(hp), acts[Hookpoint("mlp_in", L)], acts[hp])
        for hp, d in dicts.items():
            if hp.name != "mlp_out":
                self.sites[str(hp)] = self._make_site(hp, d, acts[hp], acts[hp])
        self.sites = dict(sorted(self.sites.items(), key=lambda kv: kv[1].order))

        # record the frozen constants on the replacement forward itself (same op sequence as later runs)
        self.tape: list | None = None
        rec = self.run(1, mode="record", logits=True)
        assert rec.logits is not None
        self.exactness = float((rec.logits[0].detach() - self.clean_logits).abs().max())
        # the last position's logits are all that attribution reads: [seq, vocab] of each is 200 MB at 1,024 tokens
        self.replacement_logits = rec.logits[0, -1:].detach().clone()
        self.clean_logits = self.clean_logits[-1:].clone()
        del rec, clean, acts
        release_free_memory()  # the clean and recording passes' temporaries

    # ------------------------------------------------------------------ setup
    def _check_dictionaries(self, dictionaries: list[SparseDictionary]) -> dict[Hookpoint, SparseDictionary]:
        lm = self.lm
        out: dict[Hookpoint, SparseDictionary] = {}
        for d in dictionaries:
            if not isinstance(d, SparseDictionary):
                raise ConfigError(f"expected SparseDictionary objects, got {type(d).__name__}")
            cfg = d.cfg
            if cfg.d_in != lm.d_model or cfg.d_out != lm.d_model:
                raise DictionaryFileError(
                    f"dictionary for layer {cfg.layer} has d_in={cfg.d_in}, d_out={cfg.d_out}; "
                    f"model '{lm.model_id}' has d_model={lm.d_model}"
                )
            if not 0 <= cfg.layer < lm.n_layers:
                raise DictionaryFileError(
                    f"dictionary layer {cfg.layer} is out of range for '{lm.model_id}' (0..{lm.n_layers - 1})"
                )
            if cfg.kind in ("transcoder", "skip_transcoder"):
                if (cfg.hookpoint_in, cfg.hookpoint_out) != ("mlp_in", "mlp_out"):
                    raise ConfigError(
                        f"transcoder for layer {cfg.layer} maps {cfg.hookpoint_in} -> {cfg.hookpoint_out}; "
                        "attribution supports transcoders mlp_in -> mlp_out"
                    )
                hp = Hookpoint("mlp_out", cfg.layer)
            else:
                if cfg.hookpoint_in != cfg.hookpoint_out or cfg.hookpoint_in not in ("resid_pre", "resid_post"):
                    raise ConfigError(
                        f"SAE for layer {cfg.layer} at {cfg.hookpoint_in}; attribution supports residual SAEs "
                        "at resid_pre or resid_post"
                    )
                hp = Hookpoint(cfg.hookpoint_in, cfg.layer)
            if hp in out:
                raise ConfigError(f"two dictionaries replace {hp}; pass at most one per site")
            out[hp] = d
        return out

    def _make_site(self, hp: Hookpoint, d: SparseDictionary | None, x_in: Tensor, out: Tensor) -> Site:
        dt = self.dtype
        kind = "mlp" if hp.name == "mlp_out" else "sae"
        order = (hp.layer, _SITE_ORDER[hp.name])
        if d is None:
            return Site(str(hp), kind, hp.layer, hp, order, None, x_in, out, out, out)
        p = next(d.parameters())
        was_training = d.training
        d.eval()  # BatchTopK uses its inference threshold
        try:
            with torch.no_grad():
                acts = d.features(x_in.to(device=p.device, dtype=p.dtype)).to(device=out.device, dtype=dt)
        finally:
            d.train(was_training)
        with torch.no_grad():
            W_enc = d.W_enc.detach().to(device=out.device, dtype=dt)
            W_dec = d.W_dec.detach().to(device=out.device, dtype=dt)
            b_dec = d.b_dec.detach().to(device=out.device, dtype=dt)
            W_skip = None if d.W_skip is None else d.W_skip.detach().to(device=out.device, dtype=dt)
            write = acts @ W_dec + b_dec
            skip = torch.zeros_like(out) if W_skip is None else x_in @ W_skip.t()
            error = out - write - skip
            leaf = out - skip
        nz = acts.nonzero()
        pos, feat = nz[:, 0], nz[:, 1]
        return Site(str(hp), kind, hp.layer, hp, order, d, x_in, out, leaf, error,
                    pos=pos, feat=feat, act=acts[pos, feat], W_enc=W_enc, W_dec=W_dec, W_skip=W_skip)

    @property
    def mlp_replacement(self) -> str:
        """``"clt"``, ``"plt"`` (a transcoder on every MLP) or ``"partial"`` (some MLPs are whole error nodes)."""
        if self.clt is not None:
            return "clt"
        return "plt" if all(s.dictionary is not None for s in self.sites.values() if s.kind == "mlp") else "partial"

    @property
    def dictionary_sites(self) -> list[Site]:
        return [s for s in self.sites.values() if s.dictionary is not None]

    # ------------------------------------------------------------------ forward
    def make_leaves(self, batch: int, *, requires_grad: bool = False, up_to: int | None = None) -> dict[str, Tensor]:
        """Fresh copies of the constants, ``[batch, seq, d]`` each (a leaf tensor when ``requires_grad``);
        ``up_to``: only the sites of layers <= up_to (for a forward that stops there)."""
        out = {"emb": self.emb}
        out.update({k: s.leaf for k, s in self.sites.items() if up_to is None or s.layer <= up_to})
        return {k: v[None].expand(batch, *v.shape).clone().requires_grad_(requires_grad) for k, v in out.items()}

    def run(self, batch: int = 1, *, mode: str | None = "replay", leaves: dict[str, Tensor] | None = None,
            requires_grad: bool = False, logits: bool = False, stop_after: int | None = None) -> ForwardResult:
        """One forward of the replacement model on ``batch`` copies of the prompt.

        mode: ``"replay"`` (frozen, linear in the leaves), ``"record"`` (frozen gradients, records the
        tape; used once by the constructor) or None (live attention and norms).
        ``leaves``: the constants to use (default: the clean ones). ``logits=False`` stops before the
        unembedding (``final`` is still returned). ``stop_after=L`` stops after decoder layer L
        (``final`` is then None): enough for reading dictionaries up to layer L.
        """
        if leaves is None:
            leaves = self.make_leaves(batch, requires_grad=requires_grad, up_to=stop_after)
        reads: dict[str, Tensor] = {}
        edits = self._edit_hooks(leaves, reads)
        freeze = self._freeze_mode(mode)
        need_grad = requires_grad or any(v.requires_grad for v in leaves.values())
        captured, out_logits = self._forward(batch, edits, freeze, logits=logits, stop_after=stop_after,
                                             skip_qk=mode == "replay" and self.skip_qk, need_grad=need_grad)
        if mode == "record":
            self.tape = freeze.tape  # type: ignore[union-attr]
        elif mode == "replay" and stop_after is None and freeze.pos != len(self.tape):  # type: ignore[union-attr,arg-type]
            raise ModelError("frozen replay used fewer constants than were recorded; the forward differs")
        if "final" not in captured and stop_after is None:
            raise ModelError("the unembedding was never called; cannot read the final residual stream")
        return ForwardResult(logits=out_logits, final=captured.get("final"), reads=reads, leaves=leaves)

    def _edit_hooks(self, leaves: dict[str, Tensor], reads: dict[str, Tensor]) -> dict:
        """Hookpoint -> edit that records what the site's dictionary reads (into ``reads``) and returns
        the site's constant from ``leaves`` (sites missing from ``leaves`` lie beyond ``stop_after``)."""
        sae_pre0 = self.sites.get("resid_pre.0")

        def mlp_edit(key: str):
            site = self.sites[key]

            def fn(x: Tensor) -> Tensor:
                reads[key] = x
                out = leaves[key] if key in leaves else x.new_zeros(x.shape)  # beyond stop_after
                if site.W_skip is not None:
                    return out + x @ site.W_skip.t()
                return out

            return fn

        def resid_edit(key: str):
            def fn(x: Tensor) -> Tensor:
                reads[key] = x
                return leaves[key] if key in leaves else x

            return fn

        def emb_edit(x: Tensor) -> Tensor:
            if sae_pre0 is not None:
                reads[sae_pre0.key] = leaves["emb"]
                return leaves[sae_pre0.key]
            return leaves["emb"]

        edits = {Hookpoint("resid_pre", 0): emb_edit}
        for key, site in self.sites.items():
            if site.kind == "mlp":
                edits[site.hookpoint] = mlp_edit(key)
            elif key != "resid_pre.0":
                edits[site.hookpoint] = resid_edit(key)
        return edits

    def _freeze_mode(self, mode: str | None) -> contextlib.AbstractContextManager:
        """The context that records (``"record"``) or replays (``"replay"``) the frozen constants, or
        none (``None``: live attention and norms)."""
        if mode == "record":
            return FreezeMode(None)
        if mode == "replay":
            if self.tape is None:
                raise ModelError("replacement model has no recorded tape")
            return FreezeMode(self.tape)
        if mode is None:
            return contextlib.nullcontext()
        raise ConfigError(f"mode={mode!r}; expected 'replay', 'record' or None")

    def _forward(self, batch: int, edits: dict, freeze: contextlib.AbstractContextManager, *, logits: bool,
                 stop_after: int | None, skip_qk: bool, need_grad: bool) -> tuple[dict[str, Tensor], Tensor | None]:
        """Run the model with ``edits`` under ``freeze``; returns ({"final": unembedding input} when
        reached, the logits when asked for). Hooks and query/key patches are removed afterwards."""
        lm = self.lm
        captured: dict[str, Tensor] = {}

        def capture(_mod, args):
            captured["final"] = args[0]
            if not logits:
                raise _SkipLogits

        def stop(_mod, _inp, _out):
            raise _SkipLogits

        ids = self.input_ids.expand(batch, -1).contiguous()
        handles = [lm.arch.unembed.register_forward_pre_hook(capture)]
        patched = self._skip_qk() if skip_qk else []
        out_logits = None
        grad_ctx = torch.enable_grad() if need_grad else torch.no_grad()
        try:
            with grad_ctx, lm.hooks(edit=edits, replace_mlp=True):
                if stop_after is not None:  # registered after the edits, so a resid_post edit still runs
                    handles.append(lm.arch.layer(stop_after).register_forward_hook(stop))
                with freeze:
                    try:
                        out_logits = lm.model(input_ids=ids, use_cache=False).logits
                    except _SkipLogits:
                        pass
        finally:
            for h in handles:
                h.remove()
            for m in patched:
                with contextlib.suppress(AttributeError):
                    del m.forward
        return captured, out_logits

    def _skip_qk(self) -> list[nn.Module]:
        """In replay mode the attention probabilities come from the tape, so separate query/key
        projections (``q_proj``/``k_proj`` Linear children of an attention module) need not run: they
        return zeros of the right shape (saves about half of the attention projections)."""
        patched = []
        for i in range(self.lm.n_layers):
            attn = self.lm.arch.attn(i)
            inner = getattr(attn, "attention", None)
            for m in (attn, inner):
                if not isinstance(m, nn.Module):
                    continue
                q, k = getattr(m, "q_proj", None), getattr(m, "k_proj", None)
                if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
                    for lin in (q, k):
                        lin.forward = (lambda n: (lambda x: x.new_zeros(*x.shape[:-1], n)))(lin.out_features)
                        patched.append(lin)
        return patched

    # ------------------------------------------------------------------ helpers
    def logit_direction(self, token_id: int) -> Tensor:
        """``W_U[t] - mean_v W_U[v]``: the direction read by ``logit_t - mean(logits)``."""
        W_U = self.lm.arch.unembed.weight.detach().to(self.dtype)
        return W_U[token_id] - W_U.mean(0)
