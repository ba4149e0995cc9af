"""Text corpora: the offline default corpus and ``load_texts(spec)`` for user-given text.

The default corpus (``sparsetrace run`` without ``--corpus``)
-------------------------------------------------------------
Real English prose that needs no Hugging Face hub and no ``shared/assets`` folder. It is taken from the
first source that works, in this order (``default_corpus_texts``):

1. ``austen``: **Jane Austen's six completed novels** (Sense and Sensibility, Pride and Prejudice, Mansfield
   Park, Emma, Northanger Abbey, Persuasion), about 4.3 MB of text (~730k words, roughly 1M tokens). They
   come from the Debian package ``r-cran-janeaustenr`` (version 1.0.0-1, a 1.6 MB ``.deb``; the CRAN
   package *janeaustenr* by Julia Silge). Licence: the package is MIT; the novels themselves (Project
   Gutenberg transcriptions, 1811-1818) are in the public domain. It is fetched with
   ``apt-get download`` (no root needed; if the package lists are missing and we are root,
   ``apt-get update`` is run once), unpacked with ``dpkg-deb`` (or Python's ``ar``/``tarfile``), and its R
   lazy-load database (``data/Rdata.rdb``/``.rdx``, zlib-compressed R serialisation) is decoded by the
   small reader in this module. No R installation is needed.
2. ``botchan``: **Botchan (Master Darling)** by Natsume Soseki, English translation by Yasotaro Morri
   (1919), a Project Gutenberg text (EBook #8868, public domain), 279 KB (~50k words). It ships as
   ``test/botchan.txt`` inside the source distribution of the PyPI package ``sentencepiece==0.2.3``
   (Apache-2.0, a 3.75 MB ``.tar.gz``), fetched with ``pip download --no-deps --no-binary :all:``; the
   Project Gutenberg header and licence footer are removed. This works on any machine that reaches PyPI.
3. ``tinystories``: the TinyStories validation subset in ``shared/assets`` (CDLA-Sharing-1.0), when present.
4. Text sampled from the model itself, through the ``model_sampler`` argument (see
   :func:`make_model_sampler`), as a last resort.

Extracted text is cached as JSONL (one ``{"text": ...}`` passage per line) under
``<cache root>/corpora/<name>/`` with a ``sha256.json`` manifest; the cache root is ``$SPARSETRACE_CACHE``
or ``~/.cache/sparsetrace``. A cache whose hashes do not match is rebuilt. Passages are groups of whole
paragraphs (separated by blank lines) of at most ~2,000 characters.

``load_texts(spec)``
--------------------
``spec`` is one of: a corpus name (``default``, ``austen``, ``botchan``, ``tinystories``, ``shakespeare``,
``wikitext2``; the last three read ``shared/assets``), a ``.txt`` file (documents separated by blank lines),
a ``.jsonl`` file (one object with a ``"text"`` field per line), a folder or a glob of such files, or
``hf:<dataset>[:split]`` for a Hugging Face dataset (needs the optional ``datasets`` package and network).
"""

from __future__ import annotations

import bz2
import glob as globlib
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from sparsetrace.errors import DataError

__all__ = [
    "CORPUS_NAMES",
    "default_corpus_texts",
    "load_austen",
    "load_botchan",
    "load_texts",
    "make_model_sampler",
    "read_text_file",
    "split_documents",
]

CORPUS_NAMES: dict[str, str] = {
    "default": "the offline default corpus (austen, else botchan, else tinystories)",
    "austen": "Jane Austen's six novels, Debian package r-cran-janeaustenr (public domain text, MIT package)",
    "botchan": "Natsume Soseki's Botchan (English, public domain), from the PyPI sdist sentencepiece==0.2.3",
    "tinystories": "TinyStories validation subset (shared/assets/corpus-tinystories-val-subset)",
    "shakespeare": "tiny-shakespeare (shared/assets/corpus-tinyshakespeare)",
    "wikitext2": "WikiText-2 valid+test, tokenised form with <unk> (shared/assets/corpus-wikitext2-tokenized)",
}

AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_BOOKS = [
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
]
BOTCHAN_SDIST = "sentencepiece==0.2.3"
BOTCHAN_MEMBER = "test/botchan.txt"
_MANIFEST = "sha256.json"
_PASSAGE_CHARS = 2000


def _log(msg: str) -> None:
    print(f"[sparsetrace] {msg}", file=sys.stderr, flush=True)


def _cache_root() -> Path:
    env = os.environ.get("SPARSETRACE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsetrace"


def _assets_dir() -> Path | None:
    from sparsetrace.model.zoo import find_assets_dir

    return find_assets_dir()


# --------------------------------------------------------------------------------------------- text utils


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file; non-UTF-8 bytes raise DataError naming the file and byte offset."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"corpus file '{path}' does not exist") from None
    except IsADirectoryError:
        raise DataError(f"corpus path '{path}' is a folder; expected a .txt or .jsonl file") from None
    except OSError as exc:
        raise DataError(f"cannot read corpus file '{path}': {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"corpus file '{path}' is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            "cannot be decoded; expected UTF-8 text"
        ) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


_BLANK = re.compile(r"\n[ \t\f\v]*\n+")


def split_documents(text: str) -> list[str]:
    """Split on blank lines; text without blank lines stays one document. Empty pieces are dropped."""
    return [d.strip() for d in _BLANK.split(text) if d.strip()]


def _group_paragraphs(paragraphs: Iterable[str], max_chars: int = _PASSAGE_CHARS) -> list[str]:
    """Group consecutive paragraphs into passages of at most ``max_chars`` (a longer paragraph stays whole)."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for p in paragraphs:
        if cur and size + len(p) + 2 > max_chars:
            out.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 2
    if cur:
        out.append("\n\n".join(cur))
    return out


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------- cache


def _read_cached(name: str) -> list[str] | None:
    folder = _cache_root() / "corpora" / name
    manifest = folder / _MANIFEST
    data_file = folder / "texts.jsonl"
    if not manifest.is_file() or not data_file.is_file():
        return None
    try:
        meta = json.loads(manifest.read_text())
        data = data_file.read_bytes()
        if meta["files"]["texts.jsonl"] != _sha256_bytes(data):
            return None
        texts = [json.loads(line)["text"] for line in data.decode("utf-8").splitlines() if line.strip()]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return texts or None


def _write_cache(name: str, texts: list[str], info: dict) -> None:
    final = _cache_root() / "corpora" / name
    final.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode("utf-8")
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=final.parent) as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        (out / "texts.jsonl").write_bytes(data)
        meta = dict(info)
        meta.update(
            {
                "files": {"texts.jsonl": _sha256_bytes(data)},
                "n_texts": len(texts),
                "n_chars": sum(len(t) for t in texts),
            }
        )
        (out / _MANIFEST).write_text(json.dumps(meta, indent=1, sort_keys=True))
        for p in out.iterdir():
            p.chmod(0o644)
        if final.exists():
            stale = final.with_name(f".stale-{os.getpid()}-{name}")
            try:
                os.replace(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
        try:
            os.replace(out, final)
        except OSError:
            if _read_cached(name) is None:  # somebody else wrote a valid one meanwhile, or fail loudly
                raise


def _cached_or_build(name: str, build: Callable[[Path], tuple[list[str], dict]]) -> list[str]:
    texts = _read_cached(name)
    if texts is not None:
        return texts
    with tempfile.TemporaryDirectory(prefix="sparsetrace-corpus-") as tmp:
        texts, info = build(Path(tmp))
    if not texts:
        raise DataError(f"corpus '{name}' contains no text")
    _write_cache(name, texts, info)
    return texts


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise DataError(f"command '{cmd[0]}' is not available") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"command '{' '.join(cmd)}' timed out after {timeout:.0f} s") from None


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [
        ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip() and "W:" not in ln[:3]
    ]
    return lines[-1].strip() if lines else f"exit status {proc.returncode}"


# --------------------------------------------------------------------------------------------- R reader


class _RReader:
    """Minimal reader for R's XDR serialisation format (versions 2 and 3), enough for data objects."""

    def __init__(self, data: bytes):
        self.d = data
        self.o = 0
        self.refs: list[object] = []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.d, self.o)
        self.o += 4
        return v

    def _len(self) -> int:
        n = self._int()
        if n == -1:
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def read(self) -> object:
        if self.d[:2] != b"X\n":
            raise ValueError("not an XDR R serialisation")
        self.o = 2
        version = self._int()
        self._int()
        self._int()
        if version == 3:
            n = self._int()
            self.o += n
        return self._item()

    def _item(self) -> object:
        flags = self._int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t in (254, 253, 252, 251, 250, 242, 241):  # NIL, envs, unbound, missing, base namespace
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            if idx == 0:
                idx = self._int()
            return self.refs[idx - 1]
        if t in (247, 249, 248):  # PERSISTSXP, NAMESPACESXP, PACKAGESXP: a STRSXP-like name list
            self._int()
            n = self._int()
            val = [self._item() for _ in range(n)]
            self.refs.append(val)
            return val
        if t == 1:  # SYMSXP
            val = self._item()
            self.refs.append(val)
            return val
        if t == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            s = self.d[self.o : self.o + n]
            self.o += n
            return s.decode("utf-8", errors="replace") if not (flags & (1 << 14)) else s.decode("latin-1")
        if t in (2, 3, 5, 6, 17, 239, 240):  # pairlists, closures, promises, language
            attrs = self._item() if has_attr else None
            tag = self._item() if has_tag else None
            car = self._item()
            cdr = self._item()
            node = {"tag": tag, "car": car, "cdr": cdr, "attr": attrs}
            return node
        if t == 4:  # ENVSXP
            self._int()
            env: dict = {}
            self.refs.append(env)
            self._item()
            env["frame"] = self._item()
            env["hashtab"] = self._item()
            env["attr"] = self._item()
            return env
        if t in (10, 13):  # LGLSXP, INTSXP
            n = self._len()
            val = list(struct.unpack_from(f">{n}i", self.d, self.o))
            self.o += 4 * n
        elif t == 14:  # REALSXP
            n = self._len()
            val = list(struct.unpack_from(f">{n}d", self.d, self.o))
            self.o += 8 * n
        elif t == 15:  # CPLXSXP
            n = self._len()
            self.o += 16 * n
            val = [None] * n
        elif t == 16:  # STRSXP
            n = self._len()
            val = [self._item() for _ in range(n)]
        elif t in (19, 20):  # VECSXP, EXPRSXP
            n = self._len()
            val = [self._item() for _ in range(n)]
        elif t == 24:  # RAWSXP
            n = self._len()
            val = self.d[self.o : self.o + n]
            self.o += n
        elif t == 238:  # ALTREP_SXP: info, state, attributes
            info = self._item()
            state = self._item()
            self._item()
            return self._altrep(info, state)
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        if has_attr:
            attrs = _pairlist_to_dict(self._item())
            names = attrs.get("names")
            if isinstance(val, list) and isinstance(names, list) and len(names) == len(val):
                return dict(zip(names, val, strict=True))
        return val

    @staticmethod
    def _altrep(info, state):
        cls = info.get("car") if isinstance(info, dict) else None
        if cls in ("wrap_string", "wrap_integer", "wrap_real", "wrap_logical") and isinstance(state, list):
            return state[0]
        if cls == "compact_intseq" and isinstance(state, list) and len(state) == 3:
            n, start, step = (int(x) for x in state)
            return list(range(start, start + n * step, step))
        if cls == "deferred_string" and isinstance(state, dict):
            return [str(x) for x in state.get("car") or []]
        raise ValueError(f"unsupported R ALTREP class {cls!r}")


def _pairlist_to_dict(node) -> dict:
    out: dict = {}
    while isinstance(node, dict) and "car" in node:
        if node.get("tag") is not None:
            out[node["tag"]] = node["car"]
        node = node.get("cdr")
    return out


def _read_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """Objects of an R lazy-load database (``.rdx`` index + ``.rdb`` data)."""
    index = _RReader(_decompress_rds(rdx)).read()
    if not isinstance(index, dict) or "variables" not in index:
        raise ValueError("unexpected .rdx index layout")
    out: dict[str, object] = {}
    for name, (offset, length) in index["variables"].items():
        out[name] = _RReader(_decompress_chunk(rdb[int(offset) : int(offset) + int(length)])).read()
    return out


def _decompress_rds(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        import gzip

        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def _decompress_chunk(chunk: bytes) -> bytes:
    (n,) = struct.unpack_from(">I", chunk, 0)
    body = chunk[4:]
    if body[:1] == b"Z":
        out = zlib.decompress(body[1:])
    elif body[:1] == b"2":
        out = bz2.decompress(body[1:])
    elif body[:1] == b"X":
        out = lzma.decompress(body[1:])
    elif body[:1] == b"0":
        out = body[1:]
    else:
        out = zlib.decompress(body)
    if len(out) != n:
        raise ValueError("R lazy-load chunk has the wrong length")
    return out


# --------------------------------------------------------------------------------------------- austen


def _extract_deb(deb: Path, dest: Path) -> None:
    if shutil.which("dpkg-deb"):
        proc = _run(["dpkg-deb", "-x", str(deb), str(dest)])
        if proc.returncode == 0:
            return
    data = deb.read_bytes()
    if data[:8] != b"!<arch>\n":
        raise DataError(f"'{deb.name}' is not a Debian package (ar archive)")
    off = 8
    while off + 60 <= len(data):
        header = data[off : off + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = data[off + 60 : off + 60 + size]
        off += 60 + size + (size & 1)
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            try:
                import zstandard
            except ImportError:
                raise DataError(
                    f"'{deb.name}' uses zstd; install dpkg-deb or the zstandard package"
                ) from None
            body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
        with tarfile.open(fileobj=io.BytesIO(body)) as tf:
            members = []
            for m in tf.getmembers():
                p = PurePosixPath(m.name)
                if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
                    continue
                members.append(m)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: also strips setuid bits and owners
                tf.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - older Pythons: the member checks above are the guard
                tf.extractall(dest, members=members)
        return
    raise DataError(f"'{deb.name}' has no data.tar member")


def _apt_download(package: str, dest: Path) -> Path:
    if not shutil.which("apt-get"):
        raise DataError(f"Debian package '{package}' needs apt-get, which this machine does not have")
    proc = _run(["apt-get", "download", package], cwd=dest)
    if proc.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        _log("apt package lists look stale; running 'apt-get update' once")
        _run(["apt-get", "update"], timeout=900)
        proc = _run(["apt-get", "download", package], cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise DataError(f"could not download Debian package '{package}': {_last_line(proc)}")
    return debs[0]


def _clean_austen(lines: list[str]) -> list[str]:
    paragraphs: list[str] = []
    cur: list[str] = []
    for line in [*lines, ""]:
        line = (line or "").strip()
        if line:
            cur.append(line)
            continue
        if cur:
            para = re.sub(r" {2,}", " ", " ".join(cur))
            cur = []
            if re.fullmatch(r"(CHAPTER|Chapter|VOLUME|Volume)\b[\w .,]*", para) or (
                para.isupper() and len(para) < 80
            ):
                continue  # headings and titles
            if re.fullmatch(r"(by Jane Austen|\(\d{4}\))", para):
                continue
            paragraphs.append(para)
    return paragraphs


def _build_austen(tmp: Path) -> tuple[list[str], dict]:
    _log(f"fetching the default corpus (first time only): Debian package {AUSTEN_DEB} (1.6 MB) ...")
    deb = _apt_download(AUSTEN_DEB, tmp)
    root = tmp / "x"
    root.mkdir()
    _extract_deb(deb, root)
    dbs = list(root.rglob("janeaustenr/data/Rdata.rdb"))
    if not dbs:
        raise DataError(f"Debian package '{deb.name}' has no janeaustenr/data/Rdata.rdb")
    try:
        objects = _read_lazyload_db(dbs[0].with_suffix(".rdx").read_bytes(), dbs[0].read_bytes())
    except (ValueError, KeyError, struct.error, zlib.error, OSError) as exc:
        raise DataError(f"could not decode the R data in '{deb.name}': {exc}") from None
    texts: list[str] = []
    books = []
    for key, title in AUSTEN_BOOKS:
        lines = objects.get(key)
        if not isinstance(lines, list):
            continue
        paragraphs = _clean_austen([x for x in lines if isinstance(x, str)])
        texts.extend(_group_paragraphs(paragraphs))
        books.append(title)
    info = {
        "name": "austen",
        "source": f"Debian package {deb.name} (CRAN janeaustenr by Julia Silge)",
        "deb_sha256": _sha256_bytes(deb.read_bytes()),
        "books": books,
        "license": "novels: public domain; janeaustenr package: MIT",
    }
    return texts, info


def load_austen() -> list[str]:
    """Jane Austen's six novels as passages (downloaded once from Debian, then cached)."""
    return _cached_or_build("austen", _build_austen)


# --------------------------------------------------------------------------------------------- botchan


def _clean_gutenberg(text: str) -> str:
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", text)
    if start:
        text = text[start.end() :]
    end = re.search(r"(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", text)
    if end:
        text = text[: end.start()]
    return text


def _build_botchan(tmp: Path) -> tuple[list[str], dict]:
    _log(f"fetching the default corpus (first time only): PyPI source package {BOTCHAN_SDIST} (3.7 MB) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", BOTCHAN_SDIST]
    proc = _run([*cmd, "-d", str(tmp)])
    sdists = sorted(tmp.glob("sentencepiece-*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        raise DataError(f"could not download PyPI package {BOTCHAN_SDIST}: {_last_line(proc)}")
    raw = None
    with tarfile.open(sdists[0]) as tf:
        for m in tf.getmembers():
            p = PurePosixPath(m.name)
            if p.is_absolute() or ".." in p.parts or not m.isfile():
                continue
            if len(p.parts) == 3 and "/".join(p.parts[1:]) == BOTCHAN_MEMBER:
                f = tf.extractfile(m)
                raw = f.read() if f else None
                break
    if raw is None:
        raise DataError(f"'{sdists[0].name}' has no {BOTCHAN_MEMBER}")
    text = raw.decode("utf-8", errors="replace").removeprefix("\ufeff").replace("\r\n", "\n")
    body = _clean_gutenberg(text)
    body = body[: body.index("--(THE END)--")] if "--(THE END)--" in body else body
    body = re.sub(r"\[[A-Z]\]", "", re.sub(r"^Produced by .*$", "", body, flags=re.M))
    # This copy has no blank lines; a paragraph ends at a line that is clearly shorter than the text width.
    paragraphs: list[str] = []
    cur: list[str] = []
    for line in body.split("\n"):
        s = line.strip()
        if not s:
            continue
        cur.append(s)
        if len(line.rstrip()) < 60 or s.endswith(('."', '!"', '?"')) and len(line) < 66:
            paragraphs.append(" ".join(cur))
            cur = []
    if cur:
        paragraphs.append(" ".join(cur))
    paragraphs = [
        re.sub(r" {2,}", " ", p)
        for p in paragraphs
        if not (p.isupper() and len(p) < 80) and not p.startswith("[Footnote")
    ]
    texts = _group_paragraphs(paragraphs)
    info = {
        "name": "botchan",
        "source": f"PyPI sdist {sdists[0].name}, member {BOTCHAN_MEMBER}",
        "sdist_sha256": _sha256_bytes(sdists[0].read_bytes()),
        "raw_sha256": _sha256_bytes(raw),
        "license": "text: public domain (Project Gutenberg EBook #8868); sentencepiece package: Apache-2.0",
    }
    return texts, info


def load_botchan() -> list[str]:
    """Botchan (English translation) as passages (downloaded once from PyPI, then cached)."""
    return _cached_or_build("botchan", _build_botchan)


# --------------------------------------------------------------------------------------------- assets


def _asset_file(*parts: str, corpus: str) -> Path:
    assets = _assets_dir()
    path = assets.joinpath(*parts) if assets else None
    if path is None or not path.is_file():
        raise DataError(
            f"corpus '{corpus}' needs the shared assets folder (shared/assets/{'/'.join(parts)}), which was not "
            "found; set SPARSETRACE_ASSETS or use the 'default' corpus"
        )
    return path


def _load_tinystories() -> list[str]:
    return split_documents(
        read_text_file(
            _asset_file("corpus-tinystories-val-subset", "tinystories_val.txt", corpus="tinystories")
        )
    )


def _load_shakespeare() -> list[str]:
    text = read_text_file(_asset_file("corpus-tinyshakespeare", "input.txt", corpus="shakespeare"))
    return _group_paragraphs(split_documents(text))


def _load_wikitext2() -> list[str]:
    docs: list[str] = []
    for split in ("valid.txt", "test.txt"):
        text = read_text_file(_asset_file("corpus-wikitext2-tokenized", split, corpus="wikitext2"))
        cur: list[str] = []
        for line in text.split("\n"):
            s = line.strip()
            if re.fullmatch(r"= [^=].* =", s) and cur:  # a new article
                docs.append("\n".join(cur))
                cur = []
            if s:
                cur.append(s)
        if cur:
            docs.append("\n".join(cur))
    return docs


# --------------------------------------------------------------------------------------------- default


def make_model_sampler(model, tokenizer, *, max_new_tokens: int = 200, batch_size: int = 8, seed: int = 0):
    """A ``model_sampler`` for :func:`default_corpus_texts`: samples text from ``model`` (temperature 1).

    The returned callable takes the number of characters still needed and returns a list of texts.
    """
    import torch

    state = {"seed": seed}

    def sample(n_chars_needed: int) -> list[str]:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise DataError("cannot sample a corpus from the model: its tokenizer has no BOS or EOS token")
        device = next(model.parameters()).device
        ids = torch.full((batch_size, 1), int(start), dtype=torch.long, device=device)
        gen = torch.Generator(device="cpu").manual_seed(state["seed"])
        state["seed"] += 1
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(start),
            )
        texts = [tokenizer.decode(row[1:], skip_special_tokens=True).strip() for row in out]
        return [t for t in texts if t]

    return sample


def _sampled_corpus(model_sampler, sampler_id: str, min_chars: int) -> list[str]:
    name = "model-samples-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", sampler_id)[:80]
    cached = _read_cached(name)
    if cached is not None and sum(len(t) for t in cached) >= min_chars:
        return cached
    _log(f"no text corpus is available offline; sampling ~{min_chars:,} characters from the model instead")
    texts: list[str] = []
    total = 0
    stalls = 0
    while total < min_chars and stalls < 5:
        new = [t for t in model_sampler(min_chars - total) if isinstance(t, str) and t.strip()]
        stalls = stalls + 1 if not new else 0
        texts.extend(new)
        total += sum(len(t) for t in new)
    if not texts:
        raise DataError("the model sampler produced no text for the default corpus")
    _write_cache(name, texts, {"name": name, "source": f"sampled from {sampler_id}", "license": "generated"})
    return texts


def default_corpus_texts(
    min_chars: int | None = None,
    *,
    model_sampler: Callable[[int], list[str]] | None = None,
    sampler_id: str = "model",
) -> list[str]:
    """The offline default corpus (see the module docstring), as a list of passages.

    With ``min_chars=None`` all text of the first available source is returned. With a number, sources are
    taken in order until at least ``min_chars`` characters are collected (and the list is cut there).
    ``model_sampler`` (e.g. from :func:`make_model_sampler`) is used only when no other source is
    available; its output is cached under ``corpora/model-samples-<sampler_id>``.
    """
    sources: list[tuple[str, Callable[[], list[str]]]] = [
        ("austen", load_austen),
        ("botchan", load_botchan),
        ("tinystories", _load_tinystories),
    ]
    texts: list[str] = []
    total = 0
    errors: list[str] = []
    for name, load in sources:
        try:
            got = load()
        except DataError as exc:
            errors.append(f"{name}: {exc}")
            continue
        for t in got:
            texts.append(t)
            total += len(t)
            if min_chars is not None and total >= min_chars:
                return texts
        if min_chars is None:
            return texts
    if texts:
        _log(f"the default corpus has only {total:,} characters (wanted {min_chars:,})")
        return texts
    if model_sampler is not None:
        return _sampled_corpus(model_sampler, sampler_id, min_chars or 200_000)
    raise DataError("no default corpus is available offline (" + "; ".join(errors) + ")")


# --------------------------------------------------------------------------------------------- load_texts


def _load_jsonl(path: Path) -> list[str]:
    text = read_text_file(path)
    out: list[str] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise DataError(
                f"corpus file '{path}' line {lineno} is not valid JSON; expected one object per line"
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"corpus file '{path}' line {lineno} has no string field \"text\"")
        if obj["text"].strip():
            out.append(obj["text"])
    return out


def _load_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(path)
    if suffix in (".txt", ".text", ".md"):
        return split_documents(read_text_file(path))
    raise DataError(f"corpus file '{path}' has an unsupported extension '{suffix}'; expected .txt or .jsonl")


def _load_hf(spec: str) -> list[str]:
    rest = spec[3:]
    name, _, split = rest.partition(":")
    if not name:
        raise DataError(f"corpus '{spec}' names no dataset; expected hf:<dataset>[:split]")
    try:
        import datasets  # noqa: F401
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"corpus '{spec}' needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = load_dataset(name, split=split or "train")
    except (
        Exception
    ) as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"corpus '{spec}' could not be loaded (the Hugging Face hub may be unreachable offline): {first}"
        ) from None
    columns = list(getattr(ds, "column_names", []) or [])
    column = "text" if "text" in columns else None
    if column is None:
        features = getattr(ds, "features", {}) or {}
        for c in columns:
            if getattr(features.get(c), "dtype", None) in ("string", "large_string"):
                column = c
                break
    if column is None:
        raise DataError(f"corpus '{spec}' has no text column (columns: {', '.join(columns) or 'none'})")
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


def load_texts(spec: str) -> list[str]:
    """Load a corpus as a list of documents; see the module docstring for the accepted ``spec`` forms."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(
            f"corpus {spec!r} is empty; expected a corpus name, a .txt/.jsonl file, a glob or hf:NAME"
        )
    spec = spec.strip()
    key = spec.lower()
    named: dict[str, Callable[[], list[str]]] = {
        "default": default_corpus_texts,
        "austen": load_austen,
        "botchan": load_botchan,
        "tinystories": _load_tinystories,
        "shakespeare": _load_shakespeare,
        "wikitext2": _load_wikitext2,
    }
    if key in named:
        texts = named[key]()
    elif key.startswith("hf:"):
        texts = _load_hf(spec)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".jsonl")
            )
            if not files:
                raise DataError(f"corpus folder '{spec}' has no .txt or .jsonl files")
            texts = [t for f in files for t in _load_file(f)]
        elif path.is_file():
            texts = _load_file(path)
        elif any(ch in spec for ch in "*?["):
            files = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True))
            files = [f for f in files if f.is_file()]
            if not files:
                raise DataError(f"corpus glob '{spec}' matched no files")
            texts = [t for f in files for t in _load_file(f)]
        elif "/" in spec or os.sep in spec or path.suffix.lower() in (".txt", ".jsonl", ".text", ".md"):
            raise DataError(f"corpus file '{spec}' does not exist")
        else:
            raise DataError(
                f"unknown corpus '{spec}': expected one of {', '.join(named)}, a .txt/.jsonl file, a folder, "
                "a glob, or hf:<dataset>[:split]"
            )
    if not texts or not any(t.strip() for t in texts):
        raise DataError(f"corpus '{spec}' contains no text; expected at least one non-empty document")
    return texts
