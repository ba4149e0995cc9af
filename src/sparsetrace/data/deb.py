"""Debian packages: ``apt-get download`` (version-pinned where possible) and unpacking a ``.deb``.

Unpacking uses ``dpkg-deb`` when present, else a pure-Python reader of the ``ar`` archive and its
``data.tar.*`` member (absolute, ``..`` and link members are skipped).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from ..errors import DataError
from ..util.cache import log
from .fetch import last_line, run

__all__ = ["apt_download", "deb_version", "extract_deb"]


def extract_deb(deb: Path, dest: Path) -> None:
    if shutil.which("dpkg-deb"):
        proc = run(["dpkg-deb", "-x", str(deb), str(dest)])
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


_UPDATED = {"done": False}


def _download(spec: str, dest: Path):
    proc = run(["apt-get", "download", spec], cwd=dest)
    if proc.returncode != 0 and not _UPDATED["done"] and hasattr(os, "geteuid") and os.geteuid() == 0:
        _UPDATED["done"] = True
        log("apt package lists look stale; running 'apt-get update' once")
        run(["apt-get", "update"], timeout=900)
        proc = run(["apt-get", "download", spec], cwd=dest)
    return proc


def deb_version(deb: Path) -> str:
    """The version in a .deb's file name (``NAME_VERSION_ARCH.deb``, with ``%3a`` for ':')."""
    parts = deb.name.split("_")
    return parts[1].replace("%3a", ":") if len(parts) >= 3 else "unknown"


def apt_download(package: str, dest: Path, version: str | None = None) -> Path:
    """``apt-get download PACKAGE=VERSION`` into ``dest`` (no root needed).

    When the pinned ``version`` is not in this machine's package lists (another Debian release), the
    version the lists offer is fetched instead, with a line saying so; the caller records
    :func:`deb_version` of what was fetched. DataError when apt-get is missing or the download fails.
    """
    if not shutil.which("apt-get"):
        raise DataError(f"Debian package '{package}' needs apt-get, which this machine does not have")
    proc = _download(f"{package}={version}" if version else package, dest)
    if proc.returncode != 0 and version:
        log(f"Debian package {package}={version} is not available here; fetching the version apt offers")
        proc = _download(package, dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise DataError(f"could not download Debian package '{package}': {last_line(proc)}")
    return debs[0]
