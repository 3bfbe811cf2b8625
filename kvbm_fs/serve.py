"""``kvbm-fs serve``: the node sidecar. One process, one config: the node's tiers with the placement
daemon over them, the host tier served to the node's engines as ``peer://``, ``/metrics`` and
``/healthz`` on one HTTP port, and the KV-event publisher. Engines come and go; the blocks they put
into the sidecar stay, and at SIGTERM it persists them into its first persistent tier.

Also the start-up the standalone commands share: a stop event set by SIGINT/SIGTERM, the ready line.
See docs/deploy.md and docs/architecture.md (the sidecar).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .config import StoreConfig
    from .store import Store
    from .tier import SlotTier
    from .tiers.peer import PeerServer

log = logging.getLogger(__name__)
COMMANDS = ("serve", "health")
PEER_PORT, METRICS_PORT = 7000, 9400
HEALTH_PATH = "/healthz"  # on the metrics port; Kubernetes probes call it (deploy/)


# ---- shared by the standalone commands (serve, daemon, peer-serve) -------------------------------
def stop_event() -> threading.Event:
    """An event that SIGINT and SIGTERM set: the process then stops cleanly and exits 0."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    return done


def say(doc: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed: how a supervisor (or a test) learns ports and readiness."""
    print(json.dumps(doc, default=str), flush=True)


# ---- the sidecar ------------------------------------------------------------------------------
def _node_server(store: Store, tier: SlotTier, host: str, port: int) -> PeerServer:
    from .keys import Namespace
    from .tiers.peer import PeerServer

    class NodePeerServer(PeerServer):
        """Adds each engine's namespace to the sidecar's store when the engine binds it, so that the
        daemon, persist-at-exit and KV events handle the engine's blocks as the store's own."""

        def _op_bind(self, doc: dict[str, Any], blob: bytearray, s: Any) -> tuple[dict[str, Any], bytes]:
            reply = super()._op_bind(doc, blob, s)
            store.add_namespace(Namespace.from_dict(doc["namespace"]))
            return reply

    return NodePeerServer(tier, host, port)


class Sidecar:
    """The node's store plus its peer server and HTTP endpoint; :meth:`close` persists and stops."""

    def __init__(self, cfg: StoreConfig, peer_host: str = "127.0.0.1", peer_port: int = PEER_PORT,
                 peer_tier: str | None = None) -> None:  # fmt: skip
        from .mount import build_store
        from .tier import Medium, SlotTier

        http_port, self.http_host = cfg.metrics_port, cfg.metrics_host
        cfg.metrics_port = None  # the sidecar serves /metrics itself, beside /healthz
        if not cfg.daemon:
            cfg.daemon = True
        self.store = store = build_store(cfg)
        self.peer: PeerServer | None = None
        self._http: WSGIServer | None = None
        self.stopping = False
        self.persisted: int | None = None  # set by close()
        try:
            self._known_namespaces()
            t = store.tier(peer_tier) if peer_tier else next((x for x in store.tiers if x.medium is Medium.HOST), None)
            if not isinstance(t, SlotTier) or t.medium is not Medium.HOST:
                raise ConfigError(f"serve: {peer_tier or 'the config'!r} has no host tier to serve to engines")
            self.peer = _node_server(store, t, peer_host, peer_port)
            self.metrics = store.enable_metrics()
            self.http_port = self._serve_http(METRICS_PORT if http_port is None else http_port)
        except BaseException:
            self.close()
            raise

    def _known_namespaces(self) -> None:
        """Namespaces a persistent tier already describes (engines served before a restart)."""
        from .errors import LayoutMismatchError

        for t in self.store.tiers:
            listed = getattr(t, "namespaces", None)
            for ns in listed().values() if callable(listed) else ():
                try:
                    self.store.add_namespace(ns)
                except LayoutMismatchError:
                    log.warning("serve: %s holds namespace %s of another block size; not served", t.name, ns.short_id)

    def _serve_http(self, port: int) -> int:
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from prometheus_client import make_wsgi_app
        from prometheus_client.exposition import ThreadingWSGIServer

        metrics_app = make_wsgi_app(self.metrics.registry)

        def app(environ: dict[str, Any], start: Any) -> Any:
            if environ.get("PATH_INFO") == HEALTH_PATH:
                ok, doc = self.health()
                start("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")])
                return [json.dumps(doc).encode()]
            return metrics_app(environ, start)

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no log lines
                pass

        self._http = make_server(self.http_host, port, app, ThreadingWSGIServer, handler_class=Quiet)
        threading.Thread(target=self._http.serve_forever, daemon=True, name="kvbm-serve-http").start()
        return int(self._http.server_port)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy: the peer server answers a real hello + stats over its port (with the token) and the
        daemon thread runs. Breakers are reported, not judged: a dead S3 must not restart the node."""
        from .metrics import breaker_state

        doc: dict[str, Any] = {"stopping": self.stopping}
        try:
            doc["peer"] = {"ok": True, **self._peer_probe()}
        except (OSError, ValueError, KeyError) as e:
            doc["peer"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        d = self.store.daemon
        doc["daemon"] = {"ok": d is not None and d.running}
        doc["breakers"] = {t.name: b for t in self.store.tiers if (b := breaker_state(t)) is not None}
        doc["ok"] = ok = doc["peer"]["ok"] and doc["daemon"]["ok"] and not self.stopping
        return ok, doc

    def _peer_probe(self, timeout: float = 2.0) -> dict[str, Any]:
        from .tiers.peer.wire import PROTOCOL, TOKEN_ENV, _recv, _send

        assert self.peer is not None
        host = "127.0.0.1" if self.peer.host in ("0.0.0.0", "", "::") else self.peer.host
        with socket.create_connection((host, self.peer.port), timeout) as conn:
            _send(conn, {"op": "hello", "protocol": PROTOCOL, "token": os.environ.get(TOKEN_ENV)})
            reply, _ = _recv(conn)
            if "error" in reply:
                raise ValueError(reply.get("msg", reply["error"]))
            _send(conn, {"op": "stats"})
            stats, _ = _recv(conn)
        return {"url": self.peer.url, **stats}

    def ready(self) -> dict[str, Any]:
        """The ready line: where everything listens."""
        doc: dict[str, Any] = {"ready": True, "peer": self.peer.url if self.peer else None}
        doc["metrics_port"] = self.http_port
        doc["health"] = f"http://{self.http_host}:{self.http_port}{HEALTH_PATH}"
        doc["tiers"] = [t.name for t in self.store.tiers]
        if "kvbm_fs.kv_events" in sys.modules:
            from .kv_events import publisher_of

            pub = publisher_of(self.store)
            if pub is not None:
                doc["events_endpoint"], doc["replay_endpoint"] = pub.endpoint, pub.replay_endpoint
        return doc

    def close(self) -> int:
        """Stop taking writes, stop the daemon, persist the host tier's blocks, close. Returns blocks persisted."""
        if self.persisted is not None:
            return self.persisted
        self.stopping = True
        if self.peer is not None:
            self.peer.close()  # engines see misses and refused puts from here on, never half a block
        try:
            self.store.stop_daemon()
            self.persisted = self.store.persist()  # a failure propagates (exit 1), after the rest closes
        finally:
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
            self.store.close(persist=False)
        return self.persisted


# ---- the commands -----------------------------------------------------------------------------
def add_parsers(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="the node sidecar: tiers + placement daemon, the host tier served as peer://, /metrics, /healthz, KV events",
    )
    s.add_argument("--tiers", nargs="+", help="tier URLs, fastest first (else the config / KVBM_FS_TIERS)")
    s.add_argument("--config", help="TOML/YAML/JSON config (tiers, layout, [daemon], [events], metrics_port)")
    s.add_argument(
        "--peer-host", default="127.0.0.1", help="address engines reach the host tier on (default 127.0.0.1)"
    )
    s.add_argument("--peer-port", type=int, default=PEER_PORT, help=f"peer control port (default {PEER_PORT}; 0: any)")
    s.add_argument("--peer-tier", help="name of the host tier to serve (default: the first host tier)")
    s.add_argument("--metrics-host", help="address /metrics and /healthz listen on (default: config, else 127.0.0.1)")
    s.add_argument(
        "--metrics-port", type=int, help=f"port of /metrics and /healthz (default: config, else {METRICS_PORT})"
    )
    s.add_argument("--events", help="publish KV events: an endpoint (tcp://*:5557) or a JSON [events] table")
    h = sub.add_parser("health", help="ask a kvbm-fs serve sidecar's /healthz; exit 0 when healthy (for probes)")
    h.add_argument("--url", help="default: http://127.0.0.1:$KVBM_FS_METRICS_PORT/healthz (port 9400)")
    h.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")


def run(args: argparse.Namespace) -> int:
    return _health(args.url, args.timeout) if args.cmd == "health" else _serve(args)


def _serve(args: argparse.Namespace) -> int:
    from .config import events_text, resolve

    events = None if args.events is None else events_text(args.events, "--events")
    cfg = resolve(config=args.config, tiers=args.tiers, metrics_port=args.metrics_port, events=events)
    if args.metrics_host is not None:
        cfg.metrics_host = args.metrics_host
    done = stop_event()  # before the tiers open: a SIGTERM during start-up still ends in close()
    try:
        node = Sidecar(cfg, args.peer_host, args.peer_port, args.peer_tier)
    except OSError as e:  # a port in use, an unwritable disk: one line, not a traceback
        raise ConfigError(f"serve: {e}") from None
    say(node.ready())
    done.wait()
    persisted = node.close()
    say({"stopped": True, "persisted_blocks": persisted})
    return 0


def _health(url: str | None, timeout: float) -> int:
    import urllib.error
    import urllib.request

    url = url or f"http://127.0.0.1:{os.environ.get('KVBM_FS_METRICS_PORT') or METRICS_PORT}{HEALTH_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body, code = r.read().decode(), r.status
    except urllib.error.HTTPError as e:
        body, code = e.read().decode(), e.code
    except OSError as e:
        print(json.dumps({"ok": False, "error": f"{url}: {e}"}))
        return 1
    print(body)
    return 0 if code == 200 else 1
