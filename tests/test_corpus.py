"""Corpus loading: files, globs, errors, the R data reader and the default-corpus fallbacks."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import struct  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

from sparsetrace.data import corpus  # noqa: E402
from sparsetrace.data.corpus import default_corpus_texts, load_texts, split_documents  # noqa: E402
from sparsetrace.errors import DataError  # noqa: E402
from sparsetrace.model.zoo import find_assets_dir  # noqa: E402

ASSETS = find_assets_dir()


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path / "cache"))


def test_txt_documents_split_on_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(
        "\ufeffFirst doc line one.\nline two.\n\n  \nSecond doc.\r\n\r\nThird doc.\n", encoding="utf-8"
    )
    assert load_texts(str(f)) == ["First doc line one.\nline two.", "Second doc.", "Third doc."]


def test_txt_without_blank_lines_is_one_document(tmp_path):
    f = tmp_path / "big.txt"
    text = "\n".join(f"line {i} of a long document" for i in range(2000))
    f.write_text(text, encoding="utf-8")
    assert load_texts(str(f)) == [text]


def test_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"text": "héllo"}) + "\n\n" + json.dumps({"text": "world", "id": 3}) + "\n",
        encoding="utf-8",
    )
    assert load_texts(str(f)) == ["héllo", "world"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        load_texts(str(bad))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match='"text"'):
        load_texts(str(nofield))


def test_glob_and_folder(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "1.txt").write_text("one\n\ntwo", encoding="utf-8")
    (tmp_path / "c" / "2.jsonl").write_text('{"text": "three"}\n', encoding="utf-8")
    (tmp_path / "c" / "skip.csv").write_text("x,y", encoding="utf-8")
    assert load_texts(str(tmp_path / "c" / "*.txt")) == ["one", "two"]
    assert load_texts(str(tmp_path / "c" / "*.*[lt]")) == ["one", "two", "three"]
    assert load_texts(str(tmp_path / "c")) == ["one", "two", "three"]
    with pytest.raises(DataError, match="matched no files"):
        load_texts(str(tmp_path / "c" / "*.nothing"))


def test_empty_corpus(tmp_path):
    for name, content in [("empty.txt", ""), ("blank.txt", "\n \n\t\n"), ("empty.jsonl", '{"text": "  "}\n')]:
        f = tmp_path / name
        f.write_text(content, encoding="utf-8")
        with pytest.raises(DataError, match="contains no text") as exc:
            load_texts(str(f))
        assert name in str(exc.value)


def test_non_utf8_names_file_and_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"caf" + b"\xe9 au lait\n")
    with pytest.raises(DataError) as exc:
        load_texts(str(f))
    msg = str(exc.value)
    assert "latin1.txt" in msg and "offset 3" in msg and "UTF-8" in msg
    j = tmp_path / "bad.jsonl"
    j.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match="offset 25"):
        load_texts(str(j))


def test_missing_and_unknown_specs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="unknown corpus 'nonsense'"):
        load_texts("nonsense")
    with pytest.raises(DataError, match="unsupported extension"):
        (tmp_path / "x.csv").write_text("a", encoding="utf-8")
        load_texts(str(tmp_path / "x.csv"))
    with pytest.raises(DataError):
        load_texts("   ")


def test_hf_spec_offline_is_a_data_error():
    with pytest.raises(DataError, match="hf:"):
        load_texts("hf:no-such-user/no-such-dataset-xyz:train")


def test_split_and_group():
    assert split_documents("a\n\n\nb\n \nc") == ["a", "b", "c"]
    groups = corpus._group_paragraphs(["x" * 900, "y" * 900, "z" * 900, "w" * 5000], max_chars=2000)
    assert groups == ["x" * 900 + "\n\n" + "y" * 900, "z" * 900, "w" * 5000]


# --------------------------------------------------------------------------------------------- R data


def _xdr_int(v):
    return struct.pack(">i", v)


def _charsxp(s):
    b = s.encode("utf-8")
    return _xdr_int(9 | (1 << 15)) + _xdr_int(len(b)) + b  # CHARSXP, UTF8 flag


def _named_strsxp(values, names):
    out = _xdr_int(16 | (1 << 9)) + _xdr_int(len(values)) + b"".join(_charsxp(v) for v in values)
    # attributes: pairlist (names = STRSXP)
    out += _xdr_int(2 | (1 << 10)) + _xdr_int(1) + _charsxp("names")
    out += _xdr_int(16) + _xdr_int(len(names)) + b"".join(_charsxp(n) for n in names)
    out += _xdr_int(254)
    return out


def _serialized(body, version=3):
    head = b"X\n" + _xdr_int(version) + _xdr_int(0x040201) + _xdr_int(0x030500)
    if version == 3:
        head += _xdr_int(5) + b"UTF-8"
    return head + body


def test_r_reader_lazyload_db():
    value = _serialized(
        _xdr_int(16) + _xdr_int(3) + _charsxp("It is a truth") + _xdr_int(9) + _xdr_int(-1) + _charsxp("")
    )
    chunk = struct.pack(">I", len(value)) + zlib.compress(value)
    # index: list(variables = list(emma = c(0, len)))  as VECSXP with names
    offsets = _xdr_int(13) + _xdr_int(2) + _xdr_int(0) + _xdr_int(len(chunk))
    variables = _xdr_int(19 | (1 << 9)) + _xdr_int(1) + offsets
    variables += _xdr_int(2 | (1 << 10)) + _xdr_int(1) + _charsxp("names") + _xdr_int(16) + _xdr_int(1)
    variables += _charsxp("emma") + _xdr_int(254)
    index = _xdr_int(19 | (1 << 9)) + _xdr_int(1) + variables
    index += _xdr_int(2 | (1 << 10)) + _xdr_int(1) + _charsxp("names") + _xdr_int(16) + _xdr_int(1)
    index += _charsxp("variables") + _xdr_int(254)
    import gzip

    objects = corpus._read_lazyload_db(gzip.compress(_serialized(index, version=2)), chunk)
    assert objects == {"emma": ["It is a truth", None, ""]}
    named = corpus._RReader(_serialized(_named_strsxp(["x", "y"], ["a", "b"]))).read()
    assert named == {"a": "x", "b": "y"}


def test_austen_cleaning():
    lines = [
        "SENSE AND SENSIBILITY",
        "",
        "by Jane Austen",
        "",
        "(1811)",
        "",
        "CHAPTER 1",
        "",
        "The family of",
        "Dashwood  had long.",
        "",
    ]
    assert corpus._clean_austen(lines) == ["The family of Dashwood had long."]


# --------------------------------------------------------------------------------------------- default corpus


def _no_source(*_a, **_k):
    raise DataError("unavailable in this test")


def test_default_corpus_falls_back_to_model_sampler(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "load_austen", _no_source)
    monkeypatch.setattr(corpus, "load_botchan", _no_source)
    monkeypatch.setenv("SPARSETRACE_ASSETS", str(tmp_path / "no-assets"))
    calls = []

    def sampler(n_needed):
        calls.append(n_needed)
        return ["Once upon a time there was a sample." * 3] * 4

    texts = default_corpus_texts(min_chars=1000, model_sampler=sampler, sampler_id="tiny/model")
    assert sum(map(len, texts)) >= 1000 and calls
    # cached: a second call does not sample again
    calls.clear()
    assert default_corpus_texts(min_chars=1000, model_sampler=sampler, sampler_id="tiny/model") == texts
    assert not calls
    with pytest.raises(DataError, match="no default corpus"):
        default_corpus_texts(min_chars=1000)


def test_model_sampler_with_tiny_model():
    from sparsetrace.model.zoo import load_hf_model

    model, tok, _ = load_hf_model("tiny-llama")
    sample = corpus.make_model_sampler(model, tok, max_new_tokens=8, batch_size=2)
    texts = sample(100)
    assert 1 <= len(texts) <= 2 and all(isinstance(t, str) for t in texts)


@pytest.mark.skipif(ASSETS is None, reason="needs shared/assets (absent on a fresh machine)")
def test_default_corpus_uses_assets_when_registry_sources_fail(monkeypatch):
    monkeypatch.setattr(corpus, "load_austen", _no_source)
    monkeypatch.setattr(corpus, "load_botchan", _no_source)
    texts = default_corpus_texts(min_chars=50_000)
    assert texts[0].startswith("Spot. Spot saw the shiny car")
    assert 50_000 <= sum(map(len, texts)) < 60_000


@pytest.mark.skipif(ASSETS is None, reason="needs shared/assets (absent on a fresh machine)")
def test_asset_corpora():
    stories = load_texts("tinystories")
    assert stories[0].startswith("Spot.") and len(stories) > 1000
    assert any("ROMEO" in t for t in load_texts("shakespeare"))
    wiki = load_texts("wikitext2")
    assert wiki[0].startswith("= Homarus gammarus =") and len(wiki) > 50


def test_asset_corpus_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSETRACE_ASSETS", str(tmp_path / "none"))
    with pytest.raises(DataError, match="assets"):
        load_texts("shakespeare")


_REAL_CACHE = os.path.expanduser(os.environ.get("SPARSETRACE_CACHE_REAL", "~/.cache/sparsetrace"))


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(_REAL_CACHE, "corpora", "austen", "sha256.json")),
    reason="the austen corpus is not cached yet (first use downloads the Debian package r-cran-janeaustenr)",
)
def test_cached_austen_corpus(monkeypatch):
    monkeypatch.setenv("SPARSETRACE_CACHE", _REAL_CACHE)
    texts = load_texts("default")
    assert texts[0].startswith("The family of Dashwood had long been settled in Sussex.")
    assert sum(map(len, texts)) > 3_500_000
    assert default_corpus_texts(min_chars=10_000)[0] == texts[0]
