"""A small, read-only static file server for built reports.

* GET and HEAD only (every other method answers 405);
* binds 127.0.0.1 by default and refuses a non-loopback address unless ``allow_remote=True``;
* serves only regular files whose real path (symlinks resolved) lies inside the real root;
  traversal attempts (``..``, percent-encoded or double-encoded dots and slashes, backslashes, NUL
  bytes, absolute paths) answer 403 and missing files 404, with a fixed body that reveals nothing;
* no directory listings: a directory serves its ``index.html`` or 404;
* security headers on every response (nosniff, CSP, no referrer, no framing);
* one thread per connection (``ThreadingHTTPServer``), and every connection has an idle timeout
  (:data:`IDLE_TIMEOUT` seconds without a byte from the client closes it), so a slow or idle client
  never blocks the others nor holds a thread forever.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from sparsetrace.errors import SparsetraceError

__all__ = ["make_server", "serve", "ReportServer"]

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "font-src 'self'; connect-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".jsonl": "application/jsonl",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".woff2": "font/woff2",
}
ALLOWED_METHODS = ("GET", "HEAD")
#: seconds a connection may stay silent (before or between requests) before the server closes it
IDLE_TIMEOUT = 10.0
_CHUNK = 1 << 16
_DRIVE = re.compile(r"^[A-Za-z]:")


class _Refused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(h, None)
    except OSError:
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


class ReportRequestHandler(BaseHTTPRequestHandler):
    """Serves files below ``server.root``; see the module docstring for the rules."""

    server_version = "sparsetrace"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every keep-alive response
    disable_nagle_algorithm = True
    server: ReportServer

    def setup(self) -> None:
        # StreamRequestHandler.setup applies self.timeout to the connection's socket: a client that
        # sends nothing for that long gets its connection closed (handle_one_request catches the timeout)
        self.timeout = self.server.idle_timeout
        super().setup()

    # ----------------------------------------------------------------- methods
    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def __getattr__(self, name: str):
        # http.server looks up do_<METHOD>; answer 405 for every method other than GET/HEAD
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self) -> None:
        self._plain(
            405,
            "405 Method Not Allowed\n",
            body=self.command != "HEAD",
            extra={"Allow": ", ".join(ALLOWED_METHODS)},
        )

    # ----------------------------------------------------------------- responses
    def end_headers(self) -> None:
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        super().end_headers()

    def _plain(
        self, status: int, text: str, *, body: bool = True, extra: dict[str, str] | None = None
    ) -> None:
        data = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # used by http.server itself for malformed requests: keep the body fixed and uninformative
        self.close_connection = True
        try:
            head = getattr(self, "command", None) == "HEAD"
            self._plain(code, f"{code}\n", body=not head and code >= 200 and code not in (204, 304))
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    # ----------------------------------------------------------------- path handling
    def _resolve(self, raw: str) -> str:
        """Map a raw request target to a real file path inside the root, or raise _Refused."""
        path = raw.split("#", 1)[0].split("?", 1)[0]
        low = path.lower()
        if not path.startswith("/") or path.startswith("//"):
            raise _Refused(403)  # absolute-form / scheme-relative targets
        if "\\" in path or "%5c" in low or "\x00" in path or "%00" in low:
            raise _Refused(403)
        decoded = unquote(path, errors="strict")
        if "%" in decoded:  # double encoding (%252e...) or a stray percent
            raise _Refused(403)
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded) or "\\" in decoded:
            raise _Refused(403)
        rel = decoded[1:]
        if rel.startswith("/") or _DRIVE.match(rel) or os.path.isabs(rel):
            raise _Refused(403)  # /%2Fetc/passwd, /C:/...
        parts = [p for p in rel.split("/") if p != ""]
        for p in parts:
            if p in (".", "..") or p.startswith("."):
                raise _Refused(403 if p in (".", "..") else 404)  # traversal; dotfiles are never served
        root = self.server.real_root
        candidate = os.path.join(root, *parts) if parts else root
        real = os.path.realpath(candidate)
        if not _inside(real, root):
            raise _Refused(404)  # e.g. a symlink pointing outside the root
        if os.path.isdir(real):
            if parts and not decoded.endswith("/"):
                raise _Redirect(path + "/")
            index = os.path.realpath(os.path.join(real, "index.html"))
            if not _inside(index, root) or not os.path.isfile(index):
                raise _Refused(404)
            return index
        if not os.path.isfile(real):
            raise _Refused(404)
        return real

    def _serve(self, *, body: bool) -> None:
        try:
            real = self._resolve(self.path)
        except _Redirect as r:
            self._plain(301, "301\n", body=body, extra={"Location": r.location})
            return
        except _Refused as r:
            self._plain(r.status, f"{r.status}\n", body=body)
            return
        except (UnicodeDecodeError, ValueError):
            self._plain(400, "400\n", body=body)
            return
        try:
            fh = open(real, "rb")
        except OSError:
            self._plain(404, "404\n", body=body)
            return
        with fh:
            size = os.fstat(fh.fileno()).st_size
            ctype = CONTENT_TYPES.get(os.path.splitext(real)[1].lower(), "application/octet-stream")
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if not body:
                return
            while True:
                chunk = fh.read(_CHUNK)
                if not chunk:
                    break
                self.wfile.write(chunk)


class _Redirect(Exception):
    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


class ReportServer(ThreadingHTTPServer):
    """ThreadingHTTPServer serving one root folder read-only."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog: many clients connecting at once are queued, not dropped

    def __init__(
        self, address: tuple, root: str, *, verbose: bool = False, idle_timeout: float = IDLE_TIMEOUT
    ) -> None:
        self.real_root = root
        self.verbose = verbose
        self.idle_timeout = idle_timeout
        super().__init__(address, ReportRequestHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"


class _ReportServer6(ReportServer):
    address_family = socket.AF_INET6


def make_server(
    root: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    allow_remote: bool = False,
    verbose: bool = False,
    idle_timeout: float = IDLE_TIMEOUT,
) -> ReportServer:
    """Create (bind, but do not start) a read-only server for ``root``. ``port=0`` picks a free port;
    ``idle_timeout``: seconds a connection may stay silent before it is closed.

    Raises SparsetraceError for a missing root, a non-loopback ``host`` without ``allow_remote``, or a
    port that is already in use.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise SparsetraceError(f"cannot serve {str(root)!r}: not an existing directory")
    real_root = os.path.realpath(root_path)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise SparsetraceError(f"port must be an integer between 0 and 65535, got {port!r}")
    if not allow_remote and not _is_loopback(host):
        raise SparsetraceError(
            f"refusing to serve on non-loopback address {host!r}: the report would be reachable from "
            "other machines; use 127.0.0.1, or pass allow_remote=True (--allow-remote) if you mean it"
        )
    if not isinstance(idle_timeout, (int, float)) or not 0 < idle_timeout < float("inf"):
        raise SparsetraceError(f"idle_timeout must be a positive number of seconds, got {idle_timeout!r}")
    cls = _ReportServer6 if ":" in host.strip("[]") else ReportServer
    try:
        return cls((host.strip("[]"), port), real_root, verbose=verbose, idle_timeout=float(idle_timeout))
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
            raise SparsetraceError(
                f"port {port} on {host} is already in use; pass --port to choose another"
            ) from None
        if exc.errno == errno.EACCES:
            raise SparsetraceError(
                f"not allowed to bind port {port} on {host}; pass --port to choose another (>1024)"
            ) from None
        raise SparsetraceError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(root: Path, host: str = "127.0.0.1", port: int = 8000, *, allow_remote: bool = False) -> None:
    """Serve ``root`` until interrupted (Ctrl-C)."""
    server = make_server(root, host, port, allow_remote=allow_remote, verbose=True)
    print(f"serving {server.real_root} at {server.url} (read-only; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
