"""A fault-injecting TCP proxy for HTTP on loopback, between a client (s3fs, boto3) and a server (moto).

It adds latency to every request (real S3 takes tens of ms to the first byte) and,
on demand, injects faults into the next requests: connection resets, stalls, and
5xx responses (``503 SlowDown`` is S3's throttling answer).  Each connection
carries one request: the proxy asks the upstream for ``Connection: close``.

It also counts what it sees (``requests``, ``methods``, ``max_in_flight``), so tests
can show that a batch went out concurrently, or that an open breaker sent nothing; and what
became of its stalls (``stalled``, ``stalls_waited_out``), so a test can show that a client's
timeout ended a call while the proxy still held its request, without reading a clock.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter, deque

from ..net import Listener

FAULTS = ("reset", "stall", "503", "500")
# Damage rather than failure: "flip" forwards the request with one body bit flipped (a bad NIC, a
# broken middlebox), to show what catches an upload damaged in flight.
DAMAGES = ("flip",)
_CHUNK = 1 << 20
_BODY_503 = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>'
_BODY_500 = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>'


class FaultProxy:
    def __init__(self, upstream_port: int, latency: float = 0.0, stall_seconds: float = 30.0) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.latency = latency
        self.stall_seconds = stall_seconds
        self.requests = 0
        self.methods: Counter[str] = Counter()  # requests by HTTP method (HEAD, GET, PUT, ...)
        self.in_flight = 0
        self.max_in_flight = 0  # most requests held at once (read, not yet answered)
        self.stalled = 0  # requests held in a stall now
        self.stalls_waited_out = 0  # stalls held their whole stall_seconds (not ended by close())
        self.injected: dict[str, int] = dict.fromkeys(FAULTS + DAMAGES, 0)
        self._plan: deque[tuple[str, str | None]] = deque()  # (fault, only for this HTTP method or any)
        self._always: str | None = None
        self._lock = threading.Lock()
        self._listener = Listener("127.0.0.1", 0, self._handle, name="fault-proxy", backlog=256)
        self._stop = self._listener.stopped  # stalls end when the proxy closes
        self.port = self._listener.port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- control ---------------------------------------------------------------------------
    def inject(self, fault: str, count: int = 1, method: str | None = None) -> None:
        """Apply ``fault`` to the next ``count`` requests (only those of HTTP ``method``, if given:
        a tier's put HEADs before it PUTs, and a test may want the PUTs to fail)."""
        self._check(fault)
        with self._lock:
            self._plan.extend([(fault, method.upper() if method else None)] * count)

    def fail_always(self, fault: str | None) -> None:
        """Apply ``fault`` to every request until called with None (a dead or throttling endpoint)."""
        if fault is not None:
            self._check(fault)
        with self._lock:
            self._always = fault
            self._plan.clear()

    def reset_counts(self) -> None:
        """Zero the request counters (not the fault plan), to count what one operation sends."""
        with self._lock:
            self.requests, self.max_in_flight = 0, self.in_flight
            self.methods.clear()

    def count(self, method: str, at_least: int, within: float = 30.0) -> int:
        """``methods[method]`` once it reaches ``at_least``, or after ``within`` seconds (a hang guard).
        A request is counted when its handler thread reads it, which on a loaded machine can come after
        a client's short timeout already gave up on it: a test counting what a call sent waits here."""
        end = time.monotonic() + within
        while True:
            with self._lock:
                n = self.methods[method]
            if n >= at_least or time.monotonic() >= end:
                return n
            time.sleep(0.005)

    def _check(self, fault: str) -> None:
        if fault not in FAULTS + DAMAGES:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS + DAMAGES}")

    def _next_fault(self, head: bytes) -> str | None:
        """Count the request (held until :meth:`_done`) and pick its fault, if any."""
        method = head.split(b" ", 1)[0].decode("ascii", "replace")
        with self._lock:
            self.requests += 1
            self.methods[method] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fault = self._always
            for i, (f, only) in enumerate(self._plan):
                if only in (None, method):
                    fault = f
                    del self._plan[i]
                    break
            if fault:
                self.injected[fault] += 1
            if fault == "stall":  # counted with ``injected``, so a test reads the two in step
                self.stalled += 1
            return fault

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def close(self) -> None:
        """Stop listening: from now on the port refuses connections (a dead endpoint)."""
        self._listener.close()

    # ---- data path -------------------------------------------------------------------------

    def _handle(self, client: socket.socket) -> None:
        try:
            head, body = _read_request(client)
            if head is None:
                return
            fault = self._next_fault(head)
            try:
                self._answer(client, head, body, fault)
            finally:
                self._done()
        except OSError:
            pass
        finally:
            client.close()

    def _answer(self, client: socket.socket, head: bytes, body: memoryview, fault: str | None) -> None:
        if fault == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if fault == "stall":
            self._stall()
            return
        if fault in ("503", "500"):
            client.sendall(_error(int(fault)))
            return
        if fault == "flip" and len(body):
            damaged = bytearray(body)
            damaged[len(damaged) // 2] ^= 0x01
            body = memoryview(damaged)
        if self.latency:
            time.sleep(self.latency)
        self._forward(client, head, body)

    def _stall(self) -> None:
        """Hold the request unanswered (counted in ``stalled`` when picked).  A stall that runs its full
        length is counted before the connection closes, so a client that waited it out finds it counted
        when its call returns."""
        try:
            if not self._stop.wait(self.stall_seconds):
                with self._lock:
                    self.stalls_waited_out += 1
        finally:
            with self._lock:
                self.stalled -= 1

    def _forward(self, client: socket.socket, head: bytes, body: memoryview) -> None:
        """Relay without copying: the proxy stands in for the network, so it should cost the
        machine (which it shares with client and server) as little CPU as it can."""
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        with socket.create_connection(self.upstream, timeout=60) as up:
            up.sendall(head)
            up.sendall(body)
            while n := up.recv_into(buf):
                client.sendall(view[:n])


def _read_request(sock: socket.socket) -> tuple[bytes | None, memoryview]:
    """The request head and its body (by Content-Length or chunked encoding).

    A client that goes away before its whole body arrived gets (None, empty): forwarding the torn
    request would have the server wait for bytes that never come (or store a partial upload).
    A Content-Length body is received straight into one buffer of its size."""
    none = memoryview(b"")
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None, none
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:]) if k}
    if fields.get(b"expect", b"").lower() == b"100-continue":  # the client waits for this before the body
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        lines = [ln for ln in lines if not ln.lower().startswith(b"expect:")]
    # one request per upstream connection: ask for the close that ends the relay (moto closes anyway;
    # SeaweedFS, like S3, would keep the connection open and the relay would never finish)
    lines = [ln for ln in lines if not ln.lower().startswith(b"connection:")] + [b"Connection: close"]
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        parts, tail = [rest], rest[-5:]
        while tail != b"0\r\n\r\n":
            chunk = sock.recv(_CHUNK)
            if not chunk:
                return None, none
            parts.append(chunk)
            tail = (tail + chunk)[-5:]
        return head, memoryview(b"".join(parts))
    need = int(fields.get(b"content-length", b"0"))
    body = bytearray(max(need, len(rest)))
    body[: len(rest)] = rest
    view, got = memoryview(body), len(rest)
    while got < need:
        n = sock.recv_into(view[got:need])
        if not n:
            return None, none
        got += n
    return head, view


def _error(code: int) -> bytes:
    body = _BODY_503 if code == 503 else _BODY_500
    reason = "Slow Down" if code == 503 else "Internal Server Error"
    return (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n\r\n"
    ).encode() + body
