"""Load llama2.c checkpoints (legacy ``.bin`` format) as transformers ``LlamaForCausalLM`` models.

llama2.c (Karpathy) stores a Llama model as a 28-byte header of seven little-endian int32 values::

    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len

followed by float32 weights in this order: token embedding, attention RMSNorm weights, wq, wk, wv, wo,
FFN RMSNorm weights, w1 (gate), w2 (down), w3 (up), final RMSNorm weight, the precomputed RoPE tables
``freq_cis_real`` / ``freq_cis_imag`` (ignored here), and, only when ``vocab_size`` is negative, a separate
classifier matrix. A positive ``vocab_size`` means the classifier is tied to the embedding.

llama2.c rotates *interleaved* pairs ``(x[2i], x[2i+1])`` of every head with RoPE, while transformers'
Llama rotates the two *halves* of every head. The rows of ``wq`` and ``wk`` are therefore permuted per head
(even rows first, then odd rows), which makes the two formulations compute identical attention scores.

The tokenizer file (``tok512.bin`` etc.) holds an int32 ``max_token_length`` and then, for each token, a
float32 merge score, an int32 byte length and the token's UTF-8 bytes. :class:`Llama2cTokenizer` reproduces
llama2.c's ``encode``: a dummy-prefix space, one token per UTF-8 character (byte-fallback tokens
``<0xXX>`` at id ``3 + byte`` when a character is not in the vocabulary), then repeatedly merging the
adjacent pair with the highest score whose concatenation is in the vocabulary.
"""

from __future__ import annotations

import heapq
import struct
from pathlib import Path

import torch
from transformers import PreTrainedTokenizer

from sparsetrace.errors import ModelError

__all__ = ["Llama2cTokenizer", "load_llama2c", "read_llama2c_checkpoint", "read_llama2c_vocab"]

_HEADER = struct.Struct("<7i")
_BYTE_TOKEN_OFFSET = 3


# --------------------------------------------------------------------------------------------- tokenizer


def read_llama2c_vocab(path: str | Path) -> tuple[list[str], list[float]]:
    """Read a llama2.c tokenizer ``.bin`` file into (pieces, scores)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read llama2.c tokenizer file '{path}': {exc.strerror or exc}") from None
    if len(data) < 4:
        raise ModelError(f"llama2.c tokenizer file '{path}' is truncated; expected an int32 header")
    off = 4
    pieces: list[str] = []
    scores: list[float] = []
    while off < len(data):
        if off + 8 > len(data):
            raise ModelError(f"llama2.c tokenizer file '{path}' is truncated at byte {off}")
        score, length = struct.unpack_from("<fi", data, off)
        off += 8
        if length < 0 or off + length > len(data):
            raise ModelError(
                f"llama2.c tokenizer file '{path}' has a bad token length {length} at byte {off - 4}"
            )
        raw = data[off : off + length]
        off += length
        try:
            piece = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = raw.decode("latin-1")
        pieces.append(piece)
        scores.append(float(score))
    if len(pieces) < _BYTE_TOKEN_OFFSET:
        raise ModelError(
            f"llama2.c tokenizer file '{path}' has only {len(pieces)} tokens; expected at least 3"
        )
    return pieces, scores


class Llama2cTokenizer(PreTrainedTokenizer):
    """llama2.c's BPE-with-scores tokenizer (sentencepiece-derived, byte fallback) as a HF tokenizer.

    ids 0, 1, 2 are ``<unk>``, ``<s>`` (BOS) and ``</s>`` (EOS); ``add_special_tokens=True`` (the default)
    prepends BOS as llama2.c does. ``decode`` drops the dummy-prefix space that follows BOS (as llama2.c
    does; without BOS the leading space is kept, so single tokens decode to e.g. ``" Lily"``) and turns
    ``<0xXX>`` byte tokens back into bytes. ``convert_ids_to_tokens`` returns the raw pieces (with spaces).
    """

    model_input_names = ["input_ids", "attention_mask"]
    vocab_files_names: dict[str, str] = {}

    def __init__(self, vocab_file: str | None = None, pieces=None, scores=None, **kwargs):
        if pieces is None:
            if vocab_file is None:
                raise ModelError(
                    "Llama2cTokenizer needs vocab_file (a llama2.c tok*.bin) or pieces and scores"
                )
            pieces, scores = read_llama2c_vocab(vocab_file)
        pieces = list(pieces)
        # llama2.c stores BOS/EOS as "\n<s>\n" / "\n</s>\n"; use the conventional names.
        pieces[0], pieces[1], pieces[2] = "<unk>", "<s>", "</s>"
        self._pieces = pieces
        self._scores = [float(s) for s in scores]
        self._lookup: dict[str, int] = {}
        for i, p in enumerate(pieces):
            self._lookup.setdefault(p, i)
        self._has_space = " " in self._lookup
        # Merges never cross a space when no piece has a space after its first character; text can then be
        # encoded word by word (with a cache) and the result is identical to whole-text merging.
        self._word_split = all(" " not in p[1:] for p in pieces[_BYTE_TOKEN_OFFSET + 256 :])
        self._cache: dict[str, list[int]] = {}
        kwargs.setdefault("bos_token", "<s>")
        kwargs.setdefault("eos_token", "</s>")
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("pad_token", "<unk>")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("special_tokens_pattern", "bos")
        kwargs.setdefault("model_max_length", 512)
        super().__init__(**kwargs)

    # ---- vocabulary
    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._lookup)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        return self._lookup.get(token, 0)

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < len(self._pieces):
            return self._pieces[index]
        return "<unk>"

    # ---- encoding
    def _chars_to_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for ch in text:
            i = self._lookup.get(ch)
            if i is not None and i >= _BYTE_TOKEN_OFFSET:
                ids.append(i)
            else:
                ids.extend(b + _BYTE_TOKEN_OFFSET for b in ch.encode("utf-8"))
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        """Greedy highest-score merging (leftmost pair on ties), as llama2.c, using a heap."""
        n = len(ids)
        if n < 2:
            return ids
        pieces, scores, lookup = self._pieces, self._scores, self._lookup
        tok = list(ids)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        alive = [True] * n
        heap: list[tuple[float, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j < 0:
                return
            m = lookup.get(pieces[tok[i]] + pieces[tok[j]])
            if m is not None:
                heapq.heappush(heap, (-scores[m], i, tok[i], tok[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, ti, tj = heapq.heappop(heap)
            j = nxt[i] if alive[i] else -1
            if j < 0 or tok[i] != ti or tok[j] != tj:
                continue  # stale entry
            tok[i] = lookup[pieces[ti] + pieces[tj]]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prev[nxt[j]] = i
            if prev[i] >= 0:
                push(prev[i])
            push(i)
        return [tok[k] for k in range(n) if alive[k]]

    def _encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        # llama2.c's dummy prefix: the token for " " goes first, then the characters; merging " " + text
        # character by character is the same thing.
        full = " " + text if self._has_space else text
        if not self._word_split:
            return self._merge(self._chars_to_ids(full))
        out: list[int] = []
        start = 0
        for k in range(1, len(full) + 1):
            if k == len(full) or full[k] == " ":
                word = full[start:k]
                cached = self._cache.get(word)
                if cached is None:
                    cached = self._merge(self._chars_to_ids(word))
                    if len(self._cache) < 200_000:
                        self._cache[word] = cached
                out.extend(cached)
                start = k
        return out

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._pieces[i] for i in self._encode_text(text)]

    # ---- decoding
    def _ids_to_text(self, ids: list[int], skip_special_tokens: bool) -> str:
        buf = bytearray()
        prev: int | None = None
        special = {self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id}
        for tid in ids:
            if tid in special and tid < _BYTE_TOKEN_OFFSET:
                if not skip_special_tokens:
                    buf.extend(self._convert_id_to_token(tid).encode("utf-8"))
                prev = tid
                continue
            piece = self._convert_id_to_token(tid)
            if prev == self.bos_token_id and piece.startswith(" "):
                piece = piece[1:]
            if _BYTE_TOKEN_OFFSET <= tid < _BYTE_TOKEN_OFFSET + 256:
                buf.append(tid - _BYTE_TOKEN_OFFSET)
            else:
                buf.extend(piece.encode("utf-8"))
            prev = tid
        return buf.decode("utf-8", errors="replace")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._ids_to_text([self._lookup.get(t, 0) for t in tokens], skip_special_tokens=False)

    def _decode(
        self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs
    ):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self._ids_to_text([int(t) for t in token_ids], skip_special_tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()


# --------------------------------------------------------------------------------------------- weights


def read_llama2c_checkpoint(path: str | Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Read a legacy llama2.c ``.bin`` into (header dict, tensors in llama2.c layout)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read llama2.c checkpoint '{path}': {exc.strerror or exc}") from None
    if len(data) < _HEADER.size:
        raise ModelError(f"llama2.c checkpoint '{path}' is {len(data)} bytes; expected a 28-byte header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = _HEADER.unpack_from(data, 0)
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads or n_heads % n_kv:
        raise ModelError(
            f"'{path}' does not look like a llama2.c checkpoint: header (dim={dim}, hidden_dim={hidden}, "
            f"n_layers={n_layers}, n_heads={n_heads}, n_kv_heads={n_kv}, vocab={vocab}, seq_len={seq_len})"
        )
    head = dim // n_heads
    kv_dim = head * n_kv
    shapes = [
        ("tok_embeddings", (vocab, dim)),
        ("attention_norm", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("ffn_norm", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("norm", (dim,)),
        ("freq_cis_real", (seq_len, head // 2)),
        ("freq_cis_imag", (seq_len, head // 2)),
    ]
    if not shared:
        shapes.append(("output", (vocab, dim)))
    n_floats = sum(int(torch.Size(s).numel()) for _, s in shapes)
    expected = _HEADER.size + 4 * n_floats
    if len(data) < expected:
        raise ModelError(f"llama2.c checkpoint '{path}' is {len(data)} bytes; its header implies {expected}")
    flat = torch.frombuffer(bytearray(data[_HEADER.size : expected]), dtype=torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    off = 0
    for name, shape in shapes:
        n = int(torch.Size(shape).numel())
        tensors[name] = flat[off : off + n].view(shape).clone()
        off += n
    header = {
        "dim": dim,
        "hidden_dim": hidden,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "vocab_size": vocab,
        "seq_len": seq_len,
        "shared_classifier": int(shared),
    }
    return header, tensors


def _interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q/k projection rows from llama2.c's interleaved RoPE pairs to HF's rotate-half layout."""
    out_dim, in_dim = w.shape
    head = out_dim // n_heads
    return w.view(n_heads, head // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def load_llama2c(checkpoint: str | Path, tokenizer_file: str | Path | None = None, *, dtype=torch.float32):
    """Load a llama2.c checkpoint as ``(LlamaForCausalLM, Llama2cTokenizer)``.

    ``tokenizer_file`` defaults to a ``tok*.bin`` next to the checkpoint (``tokenizer.bin`` included).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    checkpoint = Path(checkpoint)
    header, t = read_llama2c_checkpoint(checkpoint)
    if tokenizer_file is None:
        candidates = sorted(checkpoint.parent.glob("tok*.bin"))
        if not candidates:
            raise ModelError(f"no llama2.c tokenizer (tok*.bin) next to checkpoint '{checkpoint}'")
        tokenizer_file = candidates[0]
    tok = Llama2cTokenizer(vocab_file=str(tokenizer_file), model_max_length=header["seq_len"])
    if tok.vocab_size != header["vocab_size"]:
        raise ModelError(
            f"tokenizer '{tokenizer_file}' has {tok.vocab_size} tokens but checkpoint '{checkpoint}' "
            f"expects {header['vocab_size']}"
        )
    n_layers, n_heads, n_kv = header["n_layers"], header["n_heads"], header["n_kv_heads"]
    config = LlamaConfig(
        vocab_size=header["vocab_size"],
        hidden_size=header["dim"],
        intermediate_size=header["hidden_dim"],
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=header["seq_len"],
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=bool(header["shared_classifier"]),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": t["tok_embeddings"],
        "model.norm.weight": t["norm"],
    }
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t["attention_norm"][i]
        sd[p + "post_attention_layernorm.weight"] = t["ffn_norm"][i]
        sd[p + "self_attn.q_proj.weight"] = _interleaved_to_halves(t["wq"][i], n_heads)
        sd[p + "self_attn.k_proj.weight"] = _interleaved_to_halves(t["wk"][i], n_kv)
        sd[p + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = t["w1"][i]
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "mlp.up_proj.weight"] = t["w3"][i]
    sd["lm_head.weight"] = t["output"] if "output" in t else t["tok_embeddings"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild the rotary embedding for real.
    rotary_cls = type(model.model.rotary_emb)
    model.model.rotary_emb = rotary_cls(config=config)
    model.to(dtype=dtype)
    model.eval()
    return model, tok
