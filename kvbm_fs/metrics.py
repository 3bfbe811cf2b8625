"""Prometheus metrics of a store (``kvbm_fs_*``), fed from its event stream; gauges read at scrape time.

Counters and the latency histogram are updated by one subscriber to the store's :class:`EventBus`
(a few label-bound increments per batch, never per block); tier sizes and breaker states are read
by a collector only when ``/metrics`` is scraped.  Each store has its own ``CollectorRegistry``, so
several stores in one process do not collide.  With ``PROMETHEUS_MULTIPROC_DIR`` set (prometheus-client's
multiprocess mode, as vLLM uses) the counters are per process and summed by whichever process serves the
port; docs/architecture.md ("Metrics") has the full list and the multiprocess story.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .events import VERIFY, BlockEvent, EventBus, EventKind, Move, StoreOp
from .tier import Tier

log = logging.getLogger(__name__)

# batch latencies: tens of microseconds (a host hit) to seconds (a remote batch)
LATENCY_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)  # fmt: skip
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}


def multiprocess_mode() -> bool:
    """prometheus-client keeps values in PROMETHEUS_MULTIPROC_DIR (decided when it was imported)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")) and values.ValueClass is not values.MutexValue


class _Families:
    """The counters and histogram, created in one registry (or none: multiprocess mode)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        def c(name: str, doc: str, labels: tuple[str, ...] = ("tier",)) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.hits = c("kvbm_fs_hits", "blocks found (lookup: by match; get: delivered)", ("tier", "op"))
        self.misses = c("kvbm_fs_misses", "blocks not found (lookup) / not delivered (get)", ("tier", "op"))
        self.read_bytes = c("kvbm_fs_read_bytes", "bytes read from the tier (gets and daemon moves)")
        self.written_bytes = c("kvbm_fs_written_bytes", "bytes of new blocks stored in the tier")
        self.evicted = c("kvbm_fs_evicted_blocks", "blocks the tier evicted to make room")
        self.refused = c("kvbm_fs_admission_refused_blocks", "new blocks the admission filter declined")
        self.verify_failed = c("kvbm_fs_verify_failed_blocks", "blocks read that failed verification (a miss)")
        self.store_failed = c("kvbm_fs_store_failed_blocks", "blocks a put failed to write (dropped)")
        self.daemon_blocks = c("kvbm_fs_daemon_blocks", "blocks moved by the daemon", ("action",))
        self.daemon_bytes = c("kvbm_fs_daemon_bytes", "bytes moved by the daemon", ("action",))
        self.seconds = Histogram(
            "kvbm_fs_op_seconds", "time of one tier get/put batch in the store", ("tier", "op"),
            registry=registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip


_SHARED: _Families | None = None  # multiprocess mode: one set per process (the value files are keyed by name)
_SHARED_LOCK = threading.Lock()


def _shared() -> _Families:
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = _Families(None)
        return _SHARED


class _Bound:
    """One tier's label-bound children, so an event costs no label lookups."""

    def __init__(self, f: _Families, tier: str, nbytes: int) -> None:
        self.nbytes = nbytes
        self.lookup_hit, self.lookup_miss = f.hits.labels(tier, "lookup"), f.misses.labels(tier, "lookup")
        self.get_hit, self.get_miss = f.hits.labels(tier, "get"), f.misses.labels(tier, "get")
        self.read, self.written = f.read_bytes.labels(tier), f.written_bytes.labels(tier)
        self.evicted, self.refused = f.evicted.labels(tier), f.refused.labels(tier)
        self.verify_failed, self.store_failed = f.verify_failed.labels(tier), f.store_failed.labels(tier)
        self.get_s, self.put_s = f.seconds.labels(tier, "get"), f.seconds.labels(tier, "put")


def tier_usage(t: Tier) -> tuple[int, int, int] | None:
    """(blocks, used bytes, capacity bytes), or None when the tier cannot say cheaply (or is down)."""
    try:
        u = t.usage()
        return None if u is None else (u[0], u[1], t.capacity_bytes)
    except Exception:  # a peer that is down, a closed tier: no sample rather than a failed scrape
        return None


def breaker_state(t: Tier) -> int | None:
    """0 closed, 1 half-open, 2 open (a peer pool: its worst member); None: the tier has no breaker."""
    members = getattr(t, "members", None)
    breakers = [m.breaker for m in members] if members else [getattr(t, "breaker", None)]
    states = [BREAKER_STATES.get(b.state, 2) for b in breakers if b is not None]
    return max(states) if states else None


class TierGauges(Collector):
    """Tier sizes and breaker states, read when scraped (nothing is updated per operation)."""

    def __init__(self, tiers: Sequence[Tier]) -> None:
        self.tiers = list(tiers)

    def describe(self) -> list[Metric]:
        return []  # registering must not call collect (a peer tier's size is an RPC)

    def collect(self) -> Iterator[Metric]:
        blocks = GaugeMetricFamily("kvbm_fs_tier_blocks", "blocks held by the tier", labels=["tier"])
        used = GaugeMetricFamily("kvbm_fs_tier_used_bytes", "bytes held by the tier", labels=["tier"])
        cap = GaugeMetricFamily("kvbm_fs_tier_capacity_bytes", "capacity of the tier", labels=["tier"])
        brk = GaugeMetricFamily("kvbm_fs_breaker_state", "0 closed, 1 half-open, 2 open", labels=["tier"])
        for t in self.tiers:
            u = tier_usage(t)
            if u is not None:
                blocks.add_metric([t.name], u[0])
                used.add_metric([t.name], u[1])
                cap.add_metric([t.name], u[2])
            b = breaker_state(t)
            if b is not None:
                brk.add_metric([t.name], b)
        yield from (blocks, used, cap, brk)


class StoreMetrics:
    """The ``kvbm_fs_*`` metrics of one store (or of bare tiers, as ``peer-serve`` has), from ``events``."""

    def __init__(self, tiers: Sequence[Tier], events: EventBus, refresh: float = 2.0) -> None:
        self.tiers = list(tiers)
        self.multiprocess = multiprocess_mode()
        self.registry = CollectorRegistry()  # what serve() exposes
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)
            self.families = _shared()
        else:
            self.families = _Families(self.registry)
            self.registry.register(TierGauges(self.tiers))
        self._bound = {t.name: _Bound(self.families, t.name, t.block_nbytes) for t in self.tiers}
        self._nbytes = {t.name: t.block_nbytes for t in self.tiers}
        self._handlers: dict[EventKind, Callable[[BlockEvent], None]] = {
            EventKind.STORED: self._stored, EventKind.EVICTED: self._evicted, EventKind.REFUSED: self._refused,
            EventKind.LOAD_FAILED: self._load_failed, EventKind.STORE_FAILED: self._store_failed,
            EventKind.PROMOTED: self._moved, EventKind.DEMOTED: self._moved,
            EventKind.MATCHED: self._matched, EventKind.LOADED: self._loaded, EventKind.SAVED: self._saved,
        }  # fmt: skip
        self.port: int | None = None
        self._server: Any = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        if self.multiprocess:  # gauges cannot be read from another process at scrape time: each refreshes its own
            self._refresh()
            self._refresher = threading.Thread(target=self._refresh_loop, args=(refresh,), daemon=True)
            self._refresher.start()
        self._unsubscribe = events.subscribe(self.on_event)

    # ---- events ---------------------------------------------------------------------------
    def on_event(self, ev: BlockEvent) -> None:
        fn = self._handlers.get(ev.kind)
        if fn is not None:
            fn(ev)

    def _tier(self, name: str) -> _Bound:
        b = self._bound.get(name)
        if b is None:  # a tier this store does not list (a served peer's, say): bound on first sight
            b = self._bound[name] = _Bound(self.families, name, self._nbytes.get(name, 0))
        return b

    def _stored(self, ev: BlockEvent) -> None:
        b = self._tier(ev.tier)
        b.written.inc(len(ev.keys) * b.nbytes)

    def _evicted(self, ev: BlockEvent) -> None:
        self._tier(ev.tier).evicted.inc(len(ev.keys))

    def _refused(self, ev: BlockEvent) -> None:
        self._tier(ev.tier).refused.inc(len(ev.keys))

    def _load_failed(self, ev: BlockEvent) -> None:
        if ev.data == VERIFY:
            self._tier(ev.tier).verify_failed.inc(len(ev.keys))

    def _store_failed(self, ev: BlockEvent) -> None:
        self._tier(ev.tier).store_failed.inc(len(ev.keys))

    def _moved(self, ev: BlockEvent) -> None:
        m = ev.data
        if not isinstance(m, Move):  # a publisher that gave no Move: count the blocks by the kind
            m = Move("promote" if ev.kind is EventKind.PROMOTED else "demote", "", 0)
        f = self.families
        f.daemon_blocks.labels(m.action).inc(len(ev.keys))
        if m.nbytes:
            f.daemon_bytes.labels(m.action).inc(m.nbytes)
            if m.src:
                self._tier(m.src).read.inc(m.nbytes)

    def _matched(self, ev: BlockEvent) -> None:
        for t, (asked, found) in zip(self.tiers, ev.data.lookups):
            b = self._bound[t.name]
            if found:
                b.lookup_hit.inc(found)
            if asked > found:
                b.lookup_miss.inc(asked - found)

    def _loaded(self, ev: BlockEvent) -> None:
        op: StoreOp = ev.data
        for i, s in enumerate(op.seconds):
            if s < 0:
                continue
            b = self._tier(op.tiers[i])
            hit, miss = op.done_by[i], op.asked[i] - op.done_by[i]
            if hit:
                b.get_hit.inc(hit)
                b.read.inc(hit * b.nbytes)
            if miss:
                b.get_miss.inc(miss)
            b.get_s.observe(s)

    def _saved(self, ev: BlockEvent) -> None:
        op: StoreOp = ev.data
        for i, s in enumerate(op.seconds):
            if s >= 0:
                self._tier(op.tiers[i]).put_s.observe(s)

    # ---- multiprocess gauges --------------------------------------------------------------
    def _refresh(self) -> None:
        g = _mp_gauges()
        for t in self.tiers:
            u = tier_usage(t)
            if u is not None:
                g[0].labels(t.name).set(u[0])
                g[1].labels(t.name).set(u[1])
                g[2].labels(t.name).set(u[2])
            b = breaker_state(t)
            if b is not None:
                g[3].labels(t.name).set(b)

    def _refresh_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            self._refresh()

    # ---- exposition -----------------------------------------------------------------------
    def serve(self, port: int, host: str = "127.0.0.1") -> int | None:
        """Serve ``/metrics`` on ``host:port`` (0: any free port); returns the port, or None when another
        process (a sibling TP worker) already serves it: then this process's figures reach that port only
        in multiprocess mode, which this logs."""
        from prometheus_client import start_http_server

        try:
            self._server, _ = start_http_server(port, host, self.registry)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            how = "they are summed there" if self.multiprocess else "set PROMETHEUS_MULTIPROC_DIR to sum them there"
            log.info("kvbm_fs metrics: %s:%d is served by another process; this one's figures: %s", host, port, how)
            return None
        self.port = int(self._server.server_port)
        return self.port

    def text(self) -> str:
        """The exposition text, as a scrape would return it."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def close(self) -> None:
        self._unsubscribe()
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._refresher is not None:
            self._refresher.join(5)


_MP_GAUGES: tuple[Gauge, Gauge, Gauge, Gauge] | None = None


def _mp_gauges() -> tuple[Gauge, Gauge, Gauge, Gauge]:
    """Multiprocess mode: the tier gauges as per-process files ("liveall": each live process, by pid)."""
    global _MP_GAUGES
    with _SHARED_LOCK:
        if _MP_GAUGES is None:

            def g(name: str, doc: str) -> Gauge:
                return Gauge(name, doc, ["tier"], registry=None, multiprocess_mode="liveall")

            _MP_GAUGES = (
                g("kvbm_fs_tier_blocks", "blocks held by the tier"),
                g("kvbm_fs_tier_used_bytes", "bytes held by the tier"),
                g("kvbm_fs_tier_capacity_bytes", "capacity of the tier"),
                g("kvbm_fs_breaker_state", "0 closed, 1 half-open, 2 open"),
            )
        return _MP_GAUGES
