"""Security tests for the read-only report server (sparsetrace.report.server)."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from sparsetrace.errors import SparsetraceError
from sparsetrace.report.server import make_server

SECRET = "TOP-SECRET-do-not-serve"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A served root with a secret sibling file, a symlink escaping the root and one staying inside."""
    base = tmp_path_factory.mktemp("srv")
    root = base / "site"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<!DOCTYPE html><title>home</title>", encoding="utf-8")
    (root / "sub" / "index.html").write_text("sub index", encoding="utf-8")
    (root / "app.js").write_text("var x = 1;", encoding="utf-8")
    (root / "nodir").mkdir()
    (root / ".hidden").write_text(SECRET, encoding="utf-8")
    (base / "secret.txt").write_text(SECRET, encoding="utf-8")
    outside_dir = base / "outside"
    outside_dir.mkdir()
    (outside_dir / "index.html").write_text(SECRET, encoding="utf-8")
    os.symlink(base / "secret.txt", root / "escape.txt")
    os.symlink(outside_dir, root / "escape_dir")
    os.symlink(root / "app.js", root / "inside_link.js")
    server = make_server(root, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, base
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def request(server, method: str, path: str, body: bytes | None = None):
    """Send a raw request target (http.client does not normalise it, unlike urllib)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def raw_request(server, request_line: bytes) -> bytes:
    """Send bytes that http.client would refuse to send (NUL, ...)."""
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        sock.sendall(request_line + b"\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def assert_refused(status: int, body: bytes) -> None:
    assert status in (400, 403, 404), status
    assert SECRET.encode() not in body
    assert b"secret" not in body.lower() and b"/tmp" not in body  # reveals nothing about the file system


def test_serves_index_and_files_with_security_headers(site):
    server, _ = site
    status, headers, body = request(server, "GET", "/")
    assert status == 200 and b"<title>home</title>" in body
    assert headers["X-Content-Type-Options"] == "nosniff"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "http" not in csp
    assert headers["Content-Type"].startswith("text/html")
    status, headers, body = request(server, "GET", "/app.js?v=1")
    assert status == 200 and body == b"var x = 1;"
    assert headers["Content-Type"].startswith("text/javascript")
    status, _, body = request(server, "GET", "/sub/")
    assert status == 200 and body == b"sub index"
    status, headers, _ = request(server, "GET", "/sub")
    assert status == 301 and headers["Location"] == "/sub/"
    status, _, body = request(server, "GET", "/inside_link.js")  # symlink staying inside the root is fine
    assert status == 200 and body == b"var x = 1;"


def test_head_has_no_body(site):
    server, _ = site
    status, headers, body = request(server, "HEAD", "/index.html")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_missing_file_404_and_no_directory_listing(site):
    server, _ = site
    assert request(server, "GET", "/nope.html")[0] == 404
    status, _, body = request(server, "GET", "/nodir/")
    assert status == 404 and b"<a" not in body


def test_traversal_plain_dotdot(site):
    server, _ = site
    for path in ("/../secret.txt", "/sub/../../secret.txt", "/./../secret.txt"):
        assert_refused(*request(server, "GET", path)[::2])


def test_traversal_percent_encoded_dots_and_slash(site):
    server, _ = site
    assert_refused(*request(server, "GET", "/%2e%2e%2fsecret.txt")[::2])
    assert_refused(*request(server, "GET", "/%2E%2E%2Fsecret.txt")[::2])


def test_traversal_percent_encoded_dots(site):
    server, _ = site
    assert_refused(*request(server, "GET", "/%2e%2e/secret.txt")[::2])
    assert_refused(*request(server, "GET", "/.%2e/secret.txt")[::2])


def test_traversal_encoded_slash(site):
    server, _ = site
    assert_refused(*request(server, "GET", "/..%2fsecret.txt")[::2])
    assert_refused(*request(server, "GET", "/sub/..%2f..%2fsecret.txt")[::2])


def test_traversal_double_encoding(site):
    server, _ = site
    assert_refused(*request(server, "GET", "/%252e%252e/secret.txt")[::2])
    assert_refused(*request(server, "GET", "/%252e%252e%252fsecret.txt")[::2])


def test_traversal_backslash(site):
    server, _ = site
    assert_refused(*request(server, "GET", "/..\\secret.txt")[::2])
    assert_refused(*request(server, "GET", "/%5c..%5csecret.txt")[::2])
    assert_refused(*request(server, "GET", "/sub\\index.html")[::2])


def test_traversal_nul_byte(site):
    server, _ = site
    assert_refused(*request(server, "GET", "/index.html%00.js")[::2])
    raw = raw_request(server, b"GET /index.html\x00../../secret.txt HTTP/1.1")
    status = int(raw.split(b" ", 2)[1])
    assert status in (400, 403, 404) and SECRET.encode() not in raw


def test_traversal_absolute_path(site):
    server, base = site
    secret = str(base / "secret.txt")
    for path in ("/" + secret, "//" + secret.lstrip("/"), "/%2F" + secret.lstrip("/"), "/C:/Windows/win.ini"):
        assert_refused(*request(server, "GET", path)[::2])
    assert_refused(*request(server, "GET", "http://127.0.0.1" + secret)[::2])  # absolute-form target


def test_symlink_out_of_root(site):
    server, _ = site
    assert_refused(*request(server, "GET", "/escape.txt")[::2])
    assert_refused(*request(server, "GET", "/escape_dir/")[::2])
    assert_refused(*request(server, "GET", "/escape_dir/index.html")[::2])


def test_dotfiles_not_served(site):
    server, _ = site
    assert_refused(*request(server, "GET", "/.hidden")[::2])


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_405(site, method):
    server, _ = site
    status, headers, _ = request(
        server, method, "/index.html", body=b"x" if method in ("POST", "PUT") else None
    )
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"


def test_non_loopback_host_refused(tmp_path):
    with pytest.raises(SparsetraceError, match="non-loopback"):
        make_server(tmp_path, "0.0.0.0", 0)
    with pytest.raises(SparsetraceError, match="allow_remote"):
        make_server(tmp_path, "8.8.8.8", 0)


def test_non_loopback_allowed_with_flag(tmp_path):
    server = make_server(tmp_path, "0.0.0.0", 0, allow_remote=True)
    server.server_close()


def test_localhost_and_default_bind(tmp_path):
    server = make_server(tmp_path, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    make_server(tmp_path, "localhost", 0).server_close()


def test_port_in_use(tmp_path):
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(
            SparsetraceError, match=f"port {port} on 127.0.0.1 is already in use; pass --port"
        ):
            make_server(tmp_path, "127.0.0.1", port)
    finally:
        busy.close()


def test_missing_root(tmp_path):
    with pytest.raises(SparsetraceError, match="not an existing directory"):
        make_server(tmp_path / "nope", "127.0.0.1", 0)


def test_serves_built_report(tmp_path):
    from sparsetrace.report.html import build_report

    fixture = Path(__file__).parent / "fixtures" / "report_run"
    out = tmp_path / "report"
    build_report([fixture], out)
    server = make_server(out, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        for path in (
            "/",
            "/assets/report.js",
            "/assets/report.css",
            "/data/report-data.js",
            "/data/r0/circuit-0.js",
        ):
            status, _, body = request(server, "GET", path)
            assert status == 200 and body, path
        assert request(server, "GET", "/data/.sparsetrace-report")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ------------------------------------------------------------------------------------------ load
def _built_report(tmp_path: Path) -> Path:
    from sparsetrace.report.html import build_report

    out = tmp_path / "report"
    build_report([Path(__file__).parent / "fixtures" / "report_run"], out)
    return out


def _start(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


def test_idle_connection_is_closed_and_does_not_block_others(tmp_path):
    out = _built_report(tmp_path)
    server = make_server(out, "127.0.0.1", 0, idle_timeout=1.0)
    thread = _start(server)
    idle = socket.create_connection(server.server_address[:2], timeout=10)
    try:
        t0 = time.monotonic()
        status, _, body = request(server, "GET", "/index.html")  # answered while the idle one waits
        assert status == 200 and body == (out / "index.html").read_bytes()
        assert time.monotonic() - t0 < 1.0
        assert idle.recv(1024) == b""  # the server closed the silent connection ...
        assert 0.8 < time.monotonic() - t0 < 5.0  # ... after about its idle timeout
    finally:
        idle.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    with pytest.raises(SparsetraceError, match="idle_timeout"):
        make_server(out, "127.0.0.1", 0, idle_timeout=0)


def test_load_concurrent_clients_with_idle_connections(tmp_path):
    """32 keep-alive clients x 50 GETs of report pages and data files, while 8 idle connections stay
    open. Every answer must be 200 with the file's exact bytes; latency is printed, not asserted."""
    n_clients, n_requests, n_idle = 32, 50, 8
    out = _built_report(tmp_path)
    files = sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    paths = ["/", *("/" + p.relative_to(out).as_posix() for p in files)]
    expected = {"/": (out / "index.html").read_bytes()}
    expected.update({"/" + p.relative_to(out).as_posix(): p.read_bytes() for p in files})
    assert any(p.startswith("/data/r0/") for p in paths) and "/assets/report.js" in paths
    server = make_server(out, "127.0.0.1", 0)  # default idle timeout: idle sockets stay open throughout
    thread = _start(server)
    host, port = server.server_address[:2]
    idle = [socket.create_connection((host, port), timeout=10) for _ in range(n_idle)]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(n_clients)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        start.wait()
        mine, bad = [], []
        try:
            for i in range(n_requests):
                path = paths[(k * 7 + i) % len(paths)]
                t0 = time.perf_counter()
                try:
                    conn.request("GET", path)
                    resp = conn.getresponse()
                    body = resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    bad.append(f"{path}: {type(exc).__name__}: {exc}")
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=30)
                    continue
                mine.append(time.perf_counter() - t0)
                if resp.status != 200 or body != expected[path]:
                    bad.append(f"{path}: status {resp.status}, {len(body)} bytes")
        finally:
            conn.close()
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    workers = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    t_all = time.perf_counter()
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
        wall = time.perf_counter() - t_all
        assert not any(w.is_alive() for w in workers), "a client hung"
        for s in idle:  # the idle connections were never answered nor dropped mid-test; still usable
            s.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(expected["/"])
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    lat = sorted(latencies)
    p50 = lat[len(lat) // 2] * 1000 if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")
    print(
        f"\nload: {n_clients} clients x {n_requests} requests ({len(paths)} distinct files) + {n_idle} idle "
        f"connections: {len(lat)} answered in {wall:.2f} s, p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
        f"errors {len(errors)}"
    )
    assert errors == [], errors[:5]
    assert len(lat) == n_clients * n_requests
