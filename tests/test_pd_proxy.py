"""``kvbm-fs pd-proxy`` against stand-in engines on 127.0.0.1 (the real engines: tests/test_vllm_pd.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kvbm_fs.pd_proxy import PDProxy, prefill_body


class Engine(ThreadingHTTPServer):
    """Records every request body; answers completions with its name, as SSE when asked to stream."""

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _EngineHandler)
        self.name, self.bodies = name, []  # type: ignore[var-annotated]
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _EngineHandler(BaseHTTPRequestHandler):
    server: Engine

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._send(200, b'{"ok": true}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        if body.get("max_tokens", 0) < 0:
            self._send(400, b'{"error": "max_tokens"}')
        elif body.get("stream"):
            self._send(200, b"".join(b"data: %d\n\n" % i for i in range(3)) + b"data: [DONE]\n\n", "text/event-stream")
        else:
            self._send(200, json.dumps({"engine": self.server.name}).encode())

    def _send(self, status: int, data: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _serve(srv: ThreadingHTTPServer) -> None:
    threading.Thread(target=srv.serve_forever, daemon=True).start()


@pytest.fixture
def pd() -> Iterator[tuple[PDProxy, Engine, Engine]]:
    p, d = Engine("prefill"), Engine("decode")
    proxy = PDProxy([p.url], [d.url])
    for s in (p, d, proxy):
        _serve(s)
    yield proxy, p, d
    for s in (proxy, p, d):
        s.shutdown()
        s.server_close()


def post(url: str, body: Any, path: str = "/v1/completions") -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_prefill_gets_one_token_then_decode_gets_the_request_as_sent(pd: tuple[PDProxy, Engine, Engine]) -> None:
    proxy, p, d = pd
    body = {"prompt": [5, 6, 7], "max_tokens": 16, "min_tokens": 4, "n": 2, "temperature": 0.0, "cache_salt": "t"}
    status, out = post(proxy.url, body)
    assert status == 200 and json.loads(out) == {"engine": "decode"}
    assert p.bodies == [{"prompt": [5, 6, 7], "max_tokens": 1, "n": 1, "temperature": 0.0, "cache_salt": "t"}]
    assert d.bodies == [body]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9, "stream": True}
    assert prefill_body(chat) == {"messages": chat["messages"], "max_tokens": 1, "n": 1}


def test_a_stream_from_decode_reaches_the_client_whole(pd: tuple[PDProxy, Engine, Engine]) -> None:
    proxy, p, d = pd
    status, out = post(proxy.url, {"prompt": [1], "max_tokens": 3, "stream": True})
    assert status == 200 and out == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert "stream" not in p.bodies[0] and d.bodies[0]["stream"] is True


def test_a_dead_prefill_engine_costs_only_a_full_prefill_on_decode(pd: tuple[PDProxy, Engine, Engine]) -> None:
    proxy, p, _d = pd
    p.shutdown()
    p.server_close()  # nothing listens there now
    status, out = post(proxy.url, {"prompt": [1, 2], "max_tokens": 4})
    assert status == 200 and json.loads(out) == {"engine": "decode"}
    assert get(proxy.url + "/pd/stats")[1] == {"requests": 1, "prefill_failed": 1, "decode_failed": 0}
    status, health = get(proxy.url + "/health")
    assert status == 503 and health == {"unhealthy": [p.url]}


def test_errors_are_answered_not_raised(pd: tuple[PDProxy, Engine, Engine]) -> None:
    proxy, _p, d = pd
    assert get(proxy.url + "/health") == (200, {"unhealthy": []})
    assert post(proxy.url, {"prompt": [1]}, path="/v1/embeddings")[0] == 404
    assert post(proxy.url, b"[not json")[0] == 400
    assert post(proxy.url, [1, 2])[0] == 400
    status, out = post(proxy.url, {"prompt": [1], "max_tokens": -1})  # the engine's own 400 comes back
    assert status == 400 and json.loads(out) == {"error": "max_tokens"}
    assert get(proxy.url + "/v1/models") == (200, {"ok": True})  # other GETs go to a decode engine
    with pytest.raises(ValueError, match="at least one prefill"):
        PDProxy([], [d.url])


def test_cli_serves_until_sigterm_and_exits_0() -> None:
    d = Engine("decode")
    _serve(d)
    cmd = [sys.executable, "-m", "kvbm_fs", "pd-proxy", "--port", "0", "--prefill", d.url, "--decode", d.url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["prefill"] == [d.url] and info["decode"] == [d.url]
        assert post(info["url"], {"prompt": [1], "max_tokens": 2})[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        d.shutdown()
        d.server_close()
