"""Prometheus metrics of a store (``kvbm_fs_*``), fed from its event stream; gauges read at scrape time.

Counters and the latency histogram are counted from the store's :class:`EventBus` (per batch, never
per block): in one process as plain ints in a :class:`LocalSink`, exported by it as a collector when
``/metrics`` is scraped; tier sizes and breaker states are read by a collector at scrape time too.  Each store has its own ``CollectorRegistry``, so
several stores in one process do not collide.  With ``PROMETHEUS_MULTIPROC_DIR`` set (prometheus-client's
multiprocess mode, as vLLM uses) the counters are per process and summed by whichever process serves the
port; docs/architecture.md ("Metrics") has the full list and the multiprocess story.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from typing import Any

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .events import VERIFY, BlockEvent, EventBus, EventKind, Move, StoreOp
from .tier import Tier

log = logging.getLogger(__name__)

# batch latencies: tens of microseconds (a host hit) to seconds (a remote batch)
LATENCY_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)  # fmt: skip
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}


def multiprocess_mode() -> bool:
    """prometheus-client keeps values in PROMETHEUS_MULTIPROC_DIR (decided when it was imported)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")) and values.ValueClass is not values.MutexValue


# Counter cells of one tier, by index: the single-process sink keeps plain ints in this order, and
# multiprocess mode the label-bound prometheus-client children of the same series.
HIT_LOOKUP, MISS_LOOKUP, HIT_GET, MISS_GET, READ, WRITTEN, EVICTED, REFUSED, VERIFY_FAILED, STORE_FAILED = range(10)
# (name, help, extra label names, ((cell, extra label values), ...)): every per-tier counter family
TIER_COUNTERS: tuple[tuple[str, str, tuple[str, ...], tuple[tuple[int, tuple[str, ...]], ...]], ...] = (
    ("kvbm_fs_hits", "blocks found (lookup: by match; get: delivered)", ("op",),
     ((HIT_LOOKUP, ("lookup",)), (HIT_GET, ("get",)))),
    ("kvbm_fs_misses", "blocks not found (lookup) / not delivered (get)", ("op",),
     ((MISS_LOOKUP, ("lookup",)), (MISS_GET, ("get",)))),
    ("kvbm_fs_read_bytes", "bytes read from the tier (gets and daemon moves)", (), ((READ, ()),)),
    ("kvbm_fs_written_bytes", "bytes of new blocks stored in the tier", (), ((WRITTEN, ()),)),
    ("kvbm_fs_evicted_blocks", "blocks the tier evicted to make room", (), ((EVICTED, ()),)),
    ("kvbm_fs_admission_refused_blocks", "new blocks the admission filter declined", (), ((REFUSED, ()),)),
    ("kvbm_fs_verify_failed_blocks", "blocks read that failed verification (a miss)", (), ((VERIFY_FAILED, ()),)),
    ("kvbm_fs_store_failed_blocks", "blocks a put failed to write (dropped)", (), ((STORE_FAILED, ()),)),
)  # fmt: skip
DAEMON_COUNTERS = (("kvbm_fs_daemon_blocks", "blocks moved by the daemon"),
                   ("kvbm_fs_daemon_bytes", "bytes moved by the daemon"))  # fmt: skip
SECONDS = ("kvbm_fs_op_seconds", "time of one tier get/put batch in the store")
_LE = (*(floatToGoString(b) for b in LATENCY_BUCKETS), "+Inf")
# tier events counted as blocks in one cell (True: times the tier's block size)
FOLD_AT = 64  # single-process mode: matches (gets, puts) logged before the publishing thread folds them
_TIER_CELL = {EventKind.STORED: (WRITTEN, True), EventKind.EVICTED: (EVICTED, False),
              EventKind.REFUSED: (REFUSED, False), EventKind.STORE_FAILED: (STORE_FAILED, False)}  # fmt: skip


class _Sink:
    """What each event adds, shared by both sinks; they differ in where the counts live."""

    def subscribe(self, events: EventBus) -> Callable[[], None]:
        """Subscribe each counting method to its kinds only (the bus then calls it directly: no dispatch
        here, and no event is built for a kind nobody counts); returns the unsubscribe-all."""
        subs = [
            (self.loaded, [EventKind.LOADED]), (self.matched, [EventKind.MATCHED]), (self.saved, [EventKind.SAVED]),
            (self._load_failed, [EventKind.LOAD_FAILED]), (self._moved, [EventKind.PROMOTED, EventKind.DEMOTED]),
            (self._tier_event, list(_TIER_CELL)),
        ]  # fmt: skip
        undo = [events.subscribe(fn, kinds) for fn, kinds in subs]

        def unsubscribe() -> None:
            for u in undo:
                u()

        return unsubscribe

    def _tier_event(self, ev: BlockEvent) -> None:
        cell, per_byte = _TIER_CELL[ev.kind]
        self.add(ev.tier, cell, len(ev.keys), per_byte)

    def _load_failed(self, ev: BlockEvent) -> None:
        if ev.data == VERIFY:
            self.add(ev.tier, VERIFY_FAILED, len(ev.keys))

    def _moved(self, ev: BlockEvent) -> None:
        m = ev.data
        if not isinstance(m, Move):  # a publisher that gave no Move: count the blocks by the kind
            m = Move("promote" if ev.kind is EventKind.PROMOTED else "demote", "", 0)
        self.moved(m.action, len(ev.keys), m.nbytes, m.src)

    def add(self, tier: str, cell: int, n: int, nbytes: bool = False) -> None:
        """``n`` blocks to one cell (``nbytes``: ``n`` x the tier's block size)."""
        raise NotImplementedError

    def matched(self, ev: BlockEvent) -> None:
        """``ev.data`` is the ``Match``: its ``lookups`` are (asked, found) per store tier."""
        raise NotImplementedError

    def loaded(self, ev: BlockEvent) -> None:
        """``ev.data`` is the get's :class:`StoreOp`."""
        raise NotImplementedError

    def saved(self, ev: BlockEvent) -> None:
        """``ev.data`` is the put's :class:`StoreOp`."""
        raise NotImplementedError

    def moved(self, action: str, blocks: int, nbytes: int, src: str) -> None:
        raise NotImplementedError


class _LocalTier:
    """One tier's counts.  What every match and get adds is kept in attributes (cheaper than list cells),
    as found/asked pairs: misses and bytes read are derived at scrape time; the rest is in ``c``."""

    __slots__ = ("asked", "c", "created", "found", "get_asked", "get_h", "get_hit", "get_sum", "nbytes",
                 "put_h", "put_sum")  # fmt: skip

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.created = time.time()
        self.c = [0] * 10  # counter cells (HIT_LOOKUP, ...) of the rarer events; READ: daemon moves only
        self.asked = self.found = self.get_asked = self.get_hit = 0  # lookups (match), gets
        self.get_h = [0] * len(_LE)  # per-bucket counts (not cumulative), the last one +Inf
        self.put_h = [0] * len(_LE)
        self.get_sum = self.put_sum = 0.0

    def cells(self) -> list[int]:
        """Every counter cell, as exported."""
        c = list(self.c)
        c[HIT_LOOKUP], c[MISS_LOOKUP] = self.found, self.asked - self.found
        c[HIT_GET], c[MISS_GET] = self.get_hit, self.get_asked - self.get_hit
        c[READ] += self.get_hit * self.nbytes
        return c


class LocalSink(_Sink, Collector):
    """Single-process counts: plain ints per tier, exported as metric families when scraped.

    A match, get or put appends its few numbers to a list (one atomic ``list.append``, no lock); every
    :data:`FOLD_AT` entries, and before every scrape, the lists are folded into the counts under the
    lock.  Counting each event at once cost ~3% of a 64 x 8 KiB get: Python that runs right after a
    batch copy finds every object it touches evicted from the cache, and the fold touches the sink's
    objects once per batch instead (docs/architecture.md, "Metrics": the measured cost).  The rarer
    tier and daemon events are counted at once, under the lock."""

    def __init__(self, tiers: Sequence[tuple[str, int]]) -> None:
        self._lock = threading.Lock()
        self._nbytes = dict(tiers)
        self._tiers = {name: _LocalTier(nb) for name, nb in tiers}
        self._names = tuple(name for name, _ in tiers)
        self._order = [self._tiers[name] for name in self._names]  # as Match.lookups and StoreOp.tiers list them
        self._daemon: dict[str, list[float]] = {}  # action -> [blocks, bytes, created]
        # not yet folded: Match.lookups of matches, StoreOps of gets and puts (at most FOLD_AT each)
        self._lookups: list[Sequence[tuple[int, int]]] = []
        self._gets: list[StoreOp] = []
        self._puts: list[StoreOp] = []

    def matched(self, ev: BlockEvent) -> None:
        log = self._lookups
        log.append(ev.data.lookups)
        if len(log) >= FOLD_AT:
            self.fold()

    def loaded(self, ev: BlockEvent) -> None:
        log = self._gets
        log.append(ev.data)
        if len(log) >= FOLD_AT:
            self.fold()

    def saved(self, ev: BlockEvent) -> None:
        log = self._puts
        log.append(ev.data)
        if len(log) >= FOLD_AT:
            self.fold()

    def fold(self) -> None:
        with self._lock:
            self._fold()

    def _fold(self) -> None:
        """Count what the lists hold (lock held).  Other threads may append meanwhile: an entry past
        ``k`` stays for the next fold, and ``del`` keeps it (list slicing and ``del`` are atomic)."""
        k = len(self._lookups)
        if k:
            batch = self._lookups[:k]
            del self._lookups[:k]
            order = self._order
            for lookups in batch:
                for t, (asked, found) in zip(order, lookups):
                    t.asked += asked
                    t.found += found
        k = len(self._gets)
        if k:
            gets = self._gets[:k]
            del self._gets[:k]
            for op in gets:
                order = self._order if op.tiers == self._names else [self._tier(n) for n in op.tiers]
                for t, s, asked, hit in zip(order, op.seconds, op.asked, op.done_by):
                    if s >= 0:
                        t.get_asked += asked
                        t.get_hit += hit
                        t.get_h[bisect_left(LATENCY_BUCKETS, s)] += 1  # the first bucket with s <= le
                        t.get_sum += s
        k = len(self._puts)
        if k:
            puts = self._puts[:k]
            del self._puts[:k]
            for op in puts:
                order = self._order if op.tiers == self._names else [self._tier(n) for n in op.tiers]
                for t, s in zip(order, op.seconds):
                    if s >= 0:
                        t.put_h[bisect_left(LATENCY_BUCKETS, s)] += 1
                        t.put_sum += s

    def _tier(self, name: str) -> _LocalTier:
        """Call with the lock held."""
        t = self._tiers.get(name)
        if t is None:  # a tier this store does not list (a served peer's, say): counted from first sight
            t = self._tiers[name] = _LocalTier(self._nbytes.get(name, 0))
        return t

    def add(self, tier: str, cell: int, n: int, nbytes: bool = False) -> None:
        with self._lock:
            t = self._tier(tier)
            t.c[cell] += n * t.nbytes if nbytes else n

    def moved(self, action: str, blocks: int, nbytes: int, src: str) -> None:
        with self._lock:
            d = self._daemon.get(action)
            if d is None:
                d = self._daemon[action] = [0, 0, time.time()]
            d[0] += blocks
            d[1] += nbytes
            if src and nbytes:
                self._tier(src).c[READ] += nbytes

    def describe(self) -> Iterator[Metric]:
        counters, seconds, blocks, nbytes = self._families()  # the names, so a registry refuses duplicates
        yield from (*counters, seconds, blocks, nbytes)

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # what is not folded yet, then a consistent snapshot; families are built outside the lock
            self._fold()
            tiers = [(name, t.created, t.cells(), (list(t.get_h), t.get_sum), (list(t.put_h), t.put_sum))
                     for name, t in self._tiers.items()]  # fmt: skip
            daemon = [(a, d[0], d[1], d[2]) for a, d in self._daemon.items()]
        created = getattr(prometheus_client.metrics, "_use_created", True)  # PROMETHEUS_DISABLE_CREATED_SERIES
        counters, seconds, blocks, nbytes = self._families()
        for fam, (_, _, _, cells) in zip(counters, TIER_COUNTERS):
            for name, t0, c, _, _ in tiers:
                for cell, extra in cells:
                    fam.add_metric([name, *extra], c[cell], created=t0 if created else None)
        for name, t0, _, get_h, put_h in tiers:
            for op, (h, total) in (("get", get_h), ("put", put_h)):
                seconds.add_metric([name, op], list(zip(_LE, accumulate(h))), total)
                if created:
                    seconds.add_sample(SECONDS[0] + "_created", {"tier": name, "op": op}, t0)
        for action, nb, by, t0 in daemon:
            blocks.add_metric([action], nb, created=t0 if created else None)
            nbytes.add_metric([action], by, created=t0 if created else None)
        yield from (*counters, seconds, blocks, nbytes)

    @staticmethod
    def _families() -> tuple[
        list[CounterMetricFamily], HistogramMetricFamily, CounterMetricFamily, CounterMetricFamily
    ]:
        counters = [CounterMetricFamily(n, doc, labels=["tier", *extra]) for n, doc, extra, _ in TIER_COUNTERS]
        seconds = HistogramMetricFamily(*SECONDS, labels=["tier", "op"])
        blocks, nbytes = (CounterMetricFamily(n, doc, labels=["action"]) for n, doc in DAEMON_COUNTERS)
        return counters, seconds, blocks, nbytes


class _Families:
    """Multiprocess mode: prometheus-client's counters and histogram (their values live in the mmap files
    of PROMETHEUS_MULTIPROC_DIR), one set per process, registered nowhere (MultiProcessCollector reads them)."""

    def __init__(self) -> None:
        self.counters = [Counter(n, doc, ("tier", *extra), registry=None) for n, doc, extra, _ in TIER_COUNTERS]
        self.daemon = [Counter(n, doc, ("action",), registry=None) for n, doc in DAEMON_COUNTERS]
        self.seconds = Histogram(*SECONDS, ("tier", "op"), registry=None, buckets=LATENCY_BUCKETS)


_SHARED: _Families | None = None  # multiprocess mode: one set per process (the value files are keyed by name)
_SHARED_LOCK = threading.Lock()


def _shared() -> _Families:
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = _Families()
        return _SHARED


class _ProcTier:
    """One tier's label-bound children, so an event costs no label lookups."""

    def __init__(self, f: _Families, tier: str, nbytes: int) -> None:
        self.nbytes = nbytes
        self.c: list[Any] = [None] * 10
        for fam, (_, _, _, cells) in zip(f.counters, TIER_COUNTERS):
            for cell, extra in cells:
                self.c[cell] = fam.labels(tier, *extra)
        self.get_s, self.put_s = f.seconds.labels(tier, "get"), f.seconds.labels(tier, "put")


class ProcSink(_Sink):
    """Multiprocess mode: each event counted at once on prometheus-client's values (another process
    reads their files at scrape time), through label-bound children."""

    def __init__(self, tiers: Sequence[tuple[str, int]]) -> None:
        self.f = _shared()
        self._nbytes = dict(tiers)
        self._tiers = {name: _ProcTier(self.f, name, nb) for name, nb in tiers}
        self._order = [self._tiers[name] for name, _ in tiers]
        self._lock = threading.Lock()

    def _tier(self, name: str) -> _ProcTier:
        t = self._tiers.get(name)
        if t is None:
            with self._lock:
                t = self._tiers.get(name) or _ProcTier(self.f, name, self._nbytes.get(name, 0))
                self._tiers[name] = t
        return t

    def add(self, tier: str, cell: int, n: int, nbytes: bool = False) -> None:
        t = self._tier(tier)
        t.c[cell].inc(n * t.nbytes if nbytes else n)

    def matched(self, ev: BlockEvent) -> None:
        for t, (asked, found) in zip(self._order, ev.data.lookups):
            if found:
                t.c[HIT_LOOKUP].inc(found)
            if asked > found:
                t.c[MISS_LOOKUP].inc(asked - found)

    def loaded(self, ev: BlockEvent) -> None:
        op: StoreOp = ev.data
        for i, s in enumerate(op.seconds):
            if s >= 0:
                t, hit, miss = self._tier(op.tiers[i]), op.done_by[i], op.asked[i] - op.done_by[i]
                if hit:
                    t.c[HIT_GET].inc(hit)
                    t.c[READ].inc(hit * t.nbytes)
                if miss:
                    t.c[MISS_GET].inc(miss)
                t.get_s.observe(s)

    def saved(self, ev: BlockEvent) -> None:
        op: StoreOp = ev.data
        for i, s in enumerate(op.seconds):
            if s >= 0:
                self._tier(op.tiers[i]).put_s.observe(s)

    def moved(self, action: str, blocks: int, nbytes: int, src: str) -> None:
        self.f.daemon[0].labels(action).inc(blocks)
        if nbytes:
            self.f.daemon[1].labels(action).inc(nbytes)
            if src:
                self._tier(src).c[READ].inc(nbytes)


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
        nbytes = [(t.name, t.block_nbytes) for t in self.tiers]
        self.sink: LocalSink | ProcSink
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)
            self.sink = ProcSink(nbytes)
        else:
            self.sink = LocalSink(nbytes)
            self.registry.register(self.sink)
            self.registry.register(TierGauges(self.tiers))
        self.port: int | None = None
        self._server: Any = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        if self.multiprocess:  # gauges cannot be read from another process at scrape time: each refreshes its own
            self._refresh()
            self._refresher = threading.Thread(target=self._refresh_loop, args=(refresh,), daemon=True)
            self._refresher.start()
        self._unsubscribe = self.sink.subscribe(events)

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
