"""A small reader for R's XDR serialisation (versions 2 and 3) and R lazy-load databases (.rdx + .rdb).

Enough for data objects (character, numeric and list vectors, their names, ALTREP wrappers); used to read
the novels out of the Debian package ``r-cran-janeaustenr`` without an R installation.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib

__all__ = ["RReader", "read_lazyload_db"]


class RReader:
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


def read_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """Objects of an R lazy-load database (``.rdx`` index + ``.rdb`` data)."""
    index = RReader(_decompress_rds(rdx)).read()
    if not isinstance(index, dict) or "variables" not in index:
        raise ValueError("unexpected .rdx index layout")
    out: dict[str, object] = {}
    for name, (offset, length) in index["variables"].items():
        out[name] = RReader(_decompress_chunk(rdb[int(offset) : int(offset) + int(length)])).read()
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
