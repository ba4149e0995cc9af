"""Random-weight tiny models for tests, with the byte-level BPE tokenizer shipped in the package.

``tiny-gpt2``, ``tiny-neox``, ``tiny-llama`` and ``tiny-gptneo`` are 4-layer models with d_model 64,
seeded so that every load gives the same weights. Their tokenizer is ``model/data/tiny_bpe.json``: a
byte-level BPE (vocabulary of ~1.7k) trained by ``scripts/make_tiny_tokenizer.py`` on text the repo holds.
Digits are one per token, and every word the task suites use (IOI names, places and objects, agreement
nouns and verbs, the facts' subjects and answers) is a single token with its leading space, so all task
suites run on the tiny models on any machine, with nothing fetched.

:class:`ByteTokenizer` (UTF-8 bytes) is kept for tests that want one token per byte.
"""

from __future__ import annotations

from importlib import resources

import torch
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

from sparsetrace.errors import ModelError

__all__ = ["TINY_MODELS", "ByteTokenizer", "tiny_model", "tiny_tokenizer"]

TINY_MODELS: dict[str, str] = {
    "tiny-gpt2": "random-weight GPT2LMHeadModel, 4 layers, d_model 64 (tests)",
    "tiny-neox": "random-weight GPTNeoXForCausalLM, 4 layers, d_model 64 (tests)",
    "tiny-llama": "random-weight LlamaForCausalLM, 4 layers, d_model 64 (tests)",
    "tiny-gptneo": "random-weight GPTNeoForCausalLM, 4 layers, d_model 64 (tests)",
}
SPECIAL = "<|endoftext|>"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The shipped byte-level BPE; ``<|endoftext|>`` (id 0) is BOS, EOS, UNK and padding."""
    path = resources.files("sparsetrace.model") / "data" / "tiny_bpe.json"
    try:
        with resources.as_file(path) as file:
            tok = PreTrainedTokenizerFast(
                tokenizer_file=str(file),
                bos_token=SPECIAL,
                eos_token=SPECIAL,
                unk_token=SPECIAL,
                pad_token=SPECIAL,
                clean_up_tokenization_spaces=False,
                model_max_length=1024,
            )
    except (FileNotFoundError, OSError) as exc:  # pragma: no cover - packaging error
        raise ModelError(f"the tiny models' tokenizer is missing from the installed package: {exc}") from None
    return tok


class ByteTokenizer(PreTrainedTokenizer):
    """UTF-8 byte tokenizer: ids 0-255 are bytes, 256 is ``<|endoftext|>`` (BOS/EOS/pad).

    Printable ASCII bytes are shown as themselves, other bytes as ``<0xXX>``.
    """

    model_input_names = ["input_ids", "attention_mask"]
    vocab_files_names: dict[str, str] = {}

    def __init__(self, **kwargs):
        self._tokens = [chr(b) if 32 <= b < 127 else f"<0x{b:02X}>" for b in range(256)]
        self._ids = {t: i for i, t in enumerate(self._tokens)}
        for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
            kwargs.setdefault(k, SPECIAL)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("model_max_length", 1024)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._ids)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._tokens[b] for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        return self._ids.get(token, self.unk_token_id)

    def _convert_id_to_token(self, index: int) -> str:
        return self._tokens[index] if 0 <= index < 256 else SPECIAL

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        buf = bytearray()
        for t in tokens:
            i = self._ids.get(t)
            if i is None:
                buf.extend(t.encode("utf-8"))
            else:
                buf.append(i)
        return buf.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()


def _config(name: str, vocab: int, special: dict):
    from transformers import GPT2Config, GPTNeoConfig, GPTNeoXConfig, LlamaConfig

    n_layers, d, heads, ctx = 4, 64, 4, 256
    if name == "tiny-gpt2":
        return GPT2Config(
            vocab_size=vocab, n_positions=ctx, n_embd=d, n_layer=n_layers, n_head=heads, **special
        )
    if name == "tiny-neox":
        return GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=d,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            intermediate_size=4 * d,
            max_position_embeddings=ctx,
            rotary_pct=0.25,
            tie_word_embeddings=False,
            **special,
        )
    if name == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=172,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=ctx,
            tie_word_embeddings=True,
            **special,
        )
    if name == "tiny-gptneo":
        return GPTNeoConfig(
            vocab_size=vocab,
            hidden_size=d,
            num_layers=n_layers,
            num_heads=heads,
            attention_types=[[["global", "local"], n_layers // 2]],
            window_size=ctx,
            max_position_embeddings=ctx,
            intermediate_size=4 * d,
            **special,
        )
    raise ModelError(f"unknown tiny model '{name}'; expected one of {', '.join(TINY_MODELS)}")


def tiny_model(name: str, tok=None):
    """``(model, tokenizer)`` for a tiny model; the vocabulary follows the tokenizer (default: shipped BPE)."""
    from transformers import GPT2LMHeadModel, GPTNeoForCausalLM, GPTNeoXForCausalLM, LlamaForCausalLM

    classes = {
        "tiny-gpt2": GPT2LMHeadModel,
        "tiny-neox": GPTNeoXForCausalLM,
        "tiny-llama": LlamaForCausalLM,
        "tiny-gptneo": GPTNeoForCausalLM,
    }
    tok = tok if tok is not None else tiny_tokenizer()
    special = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    config = _config(name, len(tok), special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = classes[name](config)
    return model, tok
