"""The fault proxy relays requests and responses byte for byte, and never forwards a torn request.

The proxy sits under every remote-tier fault test and the remote benchmark, so a relay that
dropped or reordered bytes would make those results meaningless.  The upstream here is a raw
socket server that hashes exactly the bytes it receives.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from kvbm_fs.testing.proxy import FaultProxy


class Upstream:
    """Reads one request per connection (head, then everything until the client half-closes or the
    announced body is in), answers with the SHA-256 of the body bytes, or with ``reply`` if set."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.reply = reply
        self.requests: list[tuple[bytes, bytes]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head, body = _read_all(conn)
                self.requests.append((head, body))
                out = self.reply if self.reply is not None else hashlib.sha256(body).hexdigest().encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(out) + out)

    def close(self) -> None:
        self.sock.close()


def _read_all(conn: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    low = head.lower()
    if b"content-length:" in low:
        need = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < need:
            body += conn.recv(1 << 20)
    elif b"transfer-encoding: chunked" in low:  # until the last chunk
        while not body.endswith(b"0\r\n\r\n"):
            body += conn.recv(1 << 20)
    return head, body


def _exchange(port: int, parts: list[bytes], pause: float = 0.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for p in parts:
            s.sendall(p)
            if pause:
                time.sleep(pause)
        s.shutdown(socket.SHUT_WR)  # done sending: a torn request stays torn
        out = b""
        while chunk := s.recv(1 << 20):
            out += chunk
    return out


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.close()


@pytest.fixture
def proxy(upstream: Upstream) -> Iterator[FaultProxy]:
    p = FaultProxy(upstream.port)
    yield p
    p.close()


def test_a_content_length_body_arrives_whole(upstream: Upstream, proxy: FaultProxy) -> None:
    body = os.urandom(3 << 20)
    head = b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    out = _exchange(proxy.port, [head + body[:1000], body[1000:]])
    assert out.endswith(hashlib.sha256(body).hexdigest().encode())
    assert upstream.requests[0][1] == body


def test_a_chunked_body_split_inside_its_terminator_arrives_whole(upstream: Upstream, proxy: FaultProxy) -> None:
    payload = os.urandom(100_000)
    chunked = b"%x\r\n" % len(payload) + payload + b"\r\n0\r\n\r\n"
    head = b"PUT /b/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    # the last-chunk marker "0\r\n\r\n" is cut in two sends, with a pause between them
    out = _exchange(proxy.port, [head + chunked[:-3], chunked[-3:]], pause=0.05)
    assert out.endswith(hashlib.sha256(chunked).hexdigest().encode())


def test_an_expect_100_continue_client_gets_its_go_ahead(upstream: Upstream, proxy: FaultProxy) -> None:
    body = b"x" * 5000
    head = b"PUT /b/k HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(head)
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.endswith(hashlib.sha256(body).hexdigest().encode())
    assert b"expect" not in upstream.requests[0][0].lower()  # the proxy answered it; upstream never waits


def test_a_large_response_arrives_whole() -> None:
    reply = os.urandom(5 << 20)
    up = Upstream(reply)
    p = FaultProxy(up.port)
    try:
        out = _exchange(p.port, [b"GET /b/k HTTP/1.1\r\nHost: x\r\n\r\n"])
        assert out.partition(b"\r\n\r\n")[2] == reply
    finally:
        p.close()
        up.close()


def test_a_torn_request_is_never_forwarded(upstream: Upstream, proxy: FaultProxy) -> None:
    head = b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    assert _exchange(proxy.port, [head + b"only a part"]) == b""
    assert _exchange(proxy.port, [head + b"x" * 100_000]) != b""  # the proxy still serves
    assert len(upstream.requests) == 1 and len(upstream.requests[0][1]) == 100_000
