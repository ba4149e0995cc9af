"""A frozen causal LM with named hookpoints that can be read and replaced.

>>> lm = LanguageModel.load("smollm2-135m")
>>> out = lm.run(ids, read=[Hookpoint("mlp_in", 3), Hookpoint("mlp_out", 3)], stop_after=3)
>>> out.acts[Hookpoint("mlp_in", 3)].shape   # [batch, seq, d_model]

Replacement ("splicing") is done with ``edit``: a callable per hookpoint that receives the activation
and returns the tensor to use instead. ``mlp_out`` edits with ``replace_mlp=True`` swap the MLP's
forward for the edit (the real MLP is not computed), which is what a transcoder substitution wants.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import DataError, HookpointError
from .hookpoints import HOOKPOINTS, Architecture, Hookpoint, discover

Edit = Callable[[Tensor], Tensor]


class _StopForward(Exception):
    pass


@dataclass
class RunOutput:
    logits: Tensor | None
    acts: dict[Hookpoint, Tensor] = field(default_factory=dict)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x, new):
    if isinstance(x, tuple):
        return (new, *x[1:])
    return new


Saver = Callable[[Hookpoint, Tensor], None]


def _stop_hook(_mod, _inp, _out):
    raise _StopForward


def _output_hook(hp: Hookpoint, fn: Edit | None, save: Saver | None):
    """A forward hook on a module's output: edit it with ``fn``, then ``save`` it."""

    def hook(_mod, _inp, out):
        x = _first(out)
        if fn is not None:
            x = fn(x)
            out = _replace_first(out, x)
        if save is not None:
            save(hp, x)
        return out if fn is not None else None

    return hook


def _input_hook(hp: Hookpoint, fn: Edit | None, save: Saver | None):
    """A forward pre-hook (with kwargs) on a module's first input: edit it with ``fn``, then ``save`` it."""

    def hook(_mod, args, kwargs):
        if args:
            x = args[0]
        else:
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            x = kwargs[key]
        if fn is not None:
            x = fn(x)
        if save is not None:
            save(hp, x)
        if fn is None:
            return None
        if args:
            return (x, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs[key] = x
        return args, kwargs

    return hook


class LanguageModel:
    """Wraps a ``transformers`` causal LM; all parameters are frozen."""

    def __init__(self, model: nn.Module, tokenizer, model_id: str):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.arch: Architecture = discover(model)
        cfg = model.config
        self.d_model: int = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
        self.n_layers: int = self.arch.n_layers
        self.max_length: int = int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        )
        self.vocab_size: int = int(cfg.vocab_size)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls, name_or_path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> LanguageModel:
        from .zoo import load_hf_model

        model, tok, model_id = load_hf_model(name_or_path, dtype=dtype, device=device)
        return cls(model, tok, model_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str, *, prepend_bos: bool = True) -> Tensor:
        """Token ids [1, seq] for one prompt, with clear errors for empty / too long text."""
        if not text or not text.strip():
            raise DataError("prompt is empty; expected at least one token of text")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if prepend_bos and bos is not None:
            ids = [bos, *ids]
        if len(ids) > self.max_length:
            raise DataError(
                f"prompt is {len(ids)} tokens long; this model's context is {self.max_length} tokens"
            )
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def single_token_id(self, token: str) -> int:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise DataError(
                f"target {token!r} is {len(ids)} tokens {pieces} for this tokenizer; expected a single token"
            )
        return int(ids[0])

    def to_str_tokens(self, ids: Tensor | list[int]) -> list[str]:
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        return [self.tokenizer.decode([i]) for i in ids]

    # ------------------------------------------------------------------ hooks
    def check(self, hp: Hookpoint) -> None:
        self.arch.check(hp.name, hp.layer)

    @contextlib.contextmanager
    def hooks(
        self,
        read: Iterable[Hookpoint] = (),
        edit: dict[Hookpoint, Edit] | None = None,
        *,
        replace_mlp: bool = False,
        stop_after: int | None = None,
        store: dict[Hookpoint, Tensor] | None = None,
        detach: bool = True,
    ) -> Iterator[dict[Hookpoint, Tensor]]:
        """Install read/edit hooks for the duration of the block.

        ``read`` hookpoints are stored (after any edit of the same hookpoint) in the yielded dict.
        ``stop_after`` raises an internal signal after that decoder layer, so harvesting does no work
        past the deepest layer it needs; ``run`` catches it.
        """
        edit = dict(edit or {})
        read = list(read)
        for hp in [*read, *edit]:
            self.check(hp)
        if stop_after is not None and not (0 <= stop_after < self.n_layers):
            raise HookpointError(f"stop_after={stop_after} out of range 0..{self.n_layers - 1}")
        acts: dict[Hookpoint, Tensor] = store if store is not None else {}
        handles: list = []
        patched: list[nn.Module] = []

        def save(hp: Hookpoint, x: Tensor) -> None:
            acts[hp] = x.detach() if detach else x

        try:
            wanted = set(read)
            for hp in sorted(set(read) | set(edit), key=lambda h: (h.layer, HOOKPOINTS.index(h.name))):
                self._install(hp, edit.get(hp), save if hp in wanted else None, replace_mlp, handles, patched)
            if stop_after is not None:
                handles.append(self.arch.layer(stop_after).register_forward_hook(_stop_hook))
            yield acts
        finally:
            for h in handles:
                h.remove()
            for m in patched:
                with contextlib.suppress(AttributeError):
                    del m.forward

    def _install(
        self,
        hp: Hookpoint,
        fn: Edit | None,
        save: Saver | None,
        replace_mlp: bool,
        handles: list,
        patched: list,
    ) -> None:
        """Register the hook(s) that read and/or edit one hookpoint."""
        layer = self.arch.layer(hp.layer)
        if hp.name == "resid_pre":
            handles.append(layer.register_forward_pre_hook(_input_hook(hp, fn, save), with_kwargs=True))
        elif hp.name == "resid_post":
            handles.append(layer.register_forward_hook(_output_hook(hp, fn, save)))
        elif hp.name == "attn_out":
            handles.append(self.arch.attn(hp.layer).register_forward_hook(_output_hook(hp, fn, save)))
        elif hp.name == "mlp_in":
            mlp = self.arch.mlp(hp.layer)
            handles.append(mlp.register_forward_pre_hook(_input_hook(hp, fn, save), with_kwargs=True))
        elif hp.name == "mlp_out":
            mlp = self.arch.mlp(hp.layer)
            if fn is not None and replace_mlp:
                # the edit receives the MLP *input* and its result is the MLP output
                mlp.forward = (lambda f: lambda x, *a, **k: f(x))(fn)  # type: ignore[method-assign]
                patched.append(mlp)
                if save is not None:
                    handles.append(mlp.register_forward_hook(_output_hook(hp, None, save)))
            else:
                handles.append(mlp.register_forward_hook(_output_hook(hp, fn, save)))

    def run(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        read: Iterable[Hookpoint] = (),
        edit: dict[Hookpoint, Edit] | None = None,
        replace_mlp: bool = False,
        stop_after: int | None = None,
        grad: bool = False,
    ) -> RunOutput:
        """One forward pass with hooks. Returns logits (None if stopped early) and read activations."""
        read = list(read)
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with (
            ctx,
            self.hooks(read, edit, replace_mlp=replace_mlp, stop_after=stop_after, detach=not grad) as acts,
        ):
            try:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                logits = out.logits
            except _StopForward:
                logits = None
        return RunOutput(logits=logits, acts=dict(acts))

    def deepest_layer(self, hookpoints: Iterable[Hookpoint]) -> int:
        return max(h.layer for h in hookpoints)
