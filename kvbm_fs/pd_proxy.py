"""``kvbm-fs pd-proxy``: prefill->decode disaggregation in front of two OpenAI-compatible vLLM servers.

Each completion goes first to a prefill engine (``kv_role="kv_producer"``) with ``max_tokens=1``,
which computes the prompt and stores its blocks through kvbm_fs, then unchanged to a decode engine
(``kv_role="kv_consumer"``), which loads them and generates; its answer (streamed or not) is the
client's.  A prefill that fails only costs the decode engine a full prefill, so the proxy carries on.
Stdlib only: the proxy needs neither vLLM nor an HTTP library.  Story and numbers: docs/vllm.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import signal
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("kvbm_fs.pd_proxy")

ROUTES = ("/v1/completions", "/v1/chat/completions")
# what a one-token prefill must not carry: streaming, and limits that contradict max_tokens=1
PREFILL_DROP = ("stream", "stream_options", "min_tokens", "max_completion_tokens")


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill engine's request: the same prompt and sampling, one token, one choice, no stream."""
    out = {k: v for k, v in body.items() if k not in PREFILL_DROP}
    out.update(max_tokens=1, n=1)
    return out


class PDProxy(ThreadingHTTPServer):
    """Round-robins prefill and decode servers; ``stats`` counts requests and failed prefills."""

    daemon_threads = True

    def __init__(self, prefill: list[str], decode: list[str], host: str = "127.0.0.1", port: int = 0,
                 timeout: float = 600.0) -> None:  # fmt: skip
        if not prefill or not decode:
            raise ValueError("pd-proxy needs at least one prefill and one decode server")
        super().__init__((host, port), _Handler)
        self.prefill, self.decode = [u.rstrip("/") for u in prefill], [u.rstrip("/") for u in decode]
        self._next_p, self._next_d = itertools.cycle(self.prefill), itertools.cycle(self.decode)
        self.timeout_s = timeout
        self.stats = {"requests": 0, "prefill_failed": 0, "decode_failed": 0}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def pick(self) -> tuple[str, str]:
        with self._lock:
            self.stats["requests"] += 1
            return next(self._next_p), next(self._next_d)

    def count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1


class _Handler(BaseHTTPRequestHandler):
    server: PDProxy
    protocol_version = "HTTP/1.0"  # one response per connection: a stream simply ends with it
    disable_nagle_algorithm = True  # else each streamed token waits for the client's delayed ACK (~40 ms)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        srv = self.server
        if self.path == "/pd/stats":
            with srv._lock:
                self._reply(200, dict(srv.stats))
            return
        if self.path == "/health":  # healthy when every engine behind it is
            bad = [u for u in (*srv.prefill, *srv.decode) if not _ok(u + "/health")]
            self._reply(503 if bad else 200, {"unhealthy": bad})
            return
        self._relay(urllib.request.Request(srv.decode[0] + self.path))  # /v1/models and the like

    def do_POST(self) -> None:
        srv = self.server
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path not in ROUTES:
            self._reply(404, {"error": f"pd-proxy serves {', '.join(ROUTES)}"})
            return
        try:
            body = json.loads(raw)
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            self._reply(400, {"error": "the body must be a JSON object"})
            return
        prefill, decode = srv.pick()
        try:  # the decode engine recomputes what a failed prefill did not store: log, count, go on
            with _post(prefill + self.path, prefill_body(body), srv.timeout_s) as r:
                r.read()
        except (OSError, urllib.error.HTTPError) as e:
            srv.count("prefill_failed")
            log.warning("pd-proxy: prefill at %s failed (%s); the decode engine computes the prompt", prefill, e)
        self._relay(_request(decode + self.path, raw))

    def _relay(self, req: urllib.request.Request) -> None:
        """The decode engine's answer, status and body, passed on as it arrives (SSE streams too)."""
        try:
            resp = urllib.request.urlopen(req, timeout=self.server.timeout_s)
        except urllib.error.HTTPError as e:
            resp = e  # vLLM's own error (400 for a bad request) goes back as it is
        except OSError as e:
            self.server.count("decode_failed")
            self._reply(502, {"error": f"decode engine unreachable: {e}"})
            return
        with resp:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.headers.get("Content-Type", "application/json"))
            self.end_headers()
            while chunk := resp.read1(65536):
                self.wfile.write(chunk)
                self.wfile.flush()


def _request(url: str, data: bytes) -> urllib.request.Request:
    return urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")


def _post(url: str, body: dict[str, Any], timeout: float) -> Any:
    return urllib.request.urlopen(_request(url, json.dumps(body).encode()), timeout=timeout)


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvbm-fs pd-proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--prefill", action="append", required=True, help="prefill server URL (repeat for several)")
    p.add_argument("--decode", action="append", required=True, help="decode server URL (repeat for several)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one, printed)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for an engine (default 600)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    srv = PDProxy(args.prefill, args.decode, args.host, args.port, args.timeout)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: threading.Thread(target=srv.shutdown).start())
    print(json.dumps({"url": srv.url, "prefill": srv.prefill, "decode": srv.decode}), flush=True)
    srv.serve_forever()
    srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
