"""KV events for routers: a store's block events, published in vLLM's KV-event wire format.

Frames are ZMQ multipart ``(topic, 8-byte big-endian sequence number, msgpack payload)`` of a
:class:`KVEventBatch`, exactly as vLLM's ``ZmqEventPublisher`` sends them, so any consumer of vLLM's
events (Dynamo's router, llm-d's KV-cache indexer, SGLang's router) reads kvbm_fs's too.  The store's
hot path only enqueues (a bounded queue; dropped and counted when full); a thread encodes and sends.
docs/architecture.md ("KV events for routers") has the mapping and what each router can do with it.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError

try:
    import msgspec
    import zmq
except ImportError as e:  # pragma: no cover - the events extra is missing
    raise ConfigError(f"KV events need pyzmq and msgspec: pip install 'kvbm-fs[events]' ({e})") from None
from .tier import Medium

if TYPE_CHECKING:
    from .events import BlockEvent
    from .keys import BlockKeys
    from .store import Store

log = logging.getLogger(__name__)

# ---- the wire format: mirrors vllm/distributed/kv_events.py of vLLM 0.32.0 field for field ----------
VLLM_FORMAT_VERSION = "0.32.0"
ExternalBlockHash = bytes | int  # vllm.v1.core.kv_cache_utils.ExternalBlockHash


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base class of the tagged event union (the tag is the class name, in field ``type``)."""


MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_STORAGE = "STORAGE"
LOCAL = "LOCAL"
REMOTE = "REMOTE"


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


Event = BlockStored | BlockRemoved | AllBlocksCleared
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # vLLM's end-of-replay marker

# kvbm_fs tier medium -> (vLLM medium, locality relative to the publishing process)
MEDIA: dict[str, tuple[str, str]] = {
    Medium.GPU.value: (MEDIUM_GPU, LOCAL),
    Medium.HOST.value: (MEDIUM_CPU, LOCAL),
    Medium.DISK.value: (MEDIUM_STORAGE, LOCAL),
    Medium.REMOTE.value: (MEDIUM_STORAGE, REMOTE),
    Medium.PEER.value: (MEDIUM_STORAGE, REMOTE),
}
_STORED = {"stored"}
_REMOVED = {"removed", "evicted"}
_CLEARED = {"cleared"}
# promoted/demoted are not announced again: the destination tier's own ``stored`` event names the
# arrival (every tier publishes it on put), and the source's ``removed``/``evicted`` the departure.
KINDS = frozenset(_STORED | _REMOVED | _CLEARED)


FLUSH = "flush"  # a queue marker (str): flush() waits until the thread has passed it
Item = tuple[int, float, "BlockEvent | str | Tokens | None"]


@dataclass(frozen=True)
class Tokens:
    """Token ids of a batch of blocks, noted ahead of their put (:meth:`KVEventPublisher.note_tokens`)."""

    hashes: np.ndarray
    rows: np.ndarray  # [n, block_size]


def decoder() -> msgspec.msgpack.Decoder[KVEventBatch]:
    return msgspec.msgpack.Decoder(KVEventBatch)


# ---- configuration ----------------------------------------------------------------------------------
@dataclass
class EventsConfig:
    """The ``events`` argument of :func:`kvbm_fs.mount` / the ``[events]`` config table."""

    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    topic: str = "kvbm_fs"  # frames go to f"{topic}.{namespace id}"; subscribe to a prefix of it
    bind: bool | None = None  # None: vLLM's rule (bind wildcard/ipc/inproc endpoints, connect to others)
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000
    max_queue_size: int = 100_000  # event batches waiting for the publisher thread
    data_parallel_rank: int | None = 0
    offset_by_rank: bool = True  # tcp port += the namespace's rank, so TP workers do not collide
    # at close: True, AllBlocksCleared (this instance serves nothing); "volatile", BlockRemoved for the
    # blocks of this process's own GPU/CPU tiers only (its STORAGE blocks stay announced); False, nothing
    clear_on_close: bool | str = True
    linger_ms: int = 1000
    batch_ms: float = 2.0  # after the first event, wait this long for more: one batch, one wake-up
    token_blocks: int = 65_536  # blocks whose noted token ids are remembered (note_tokens)

    @classmethod
    def from_any(cls, v: Any) -> EventsConfig:
        if isinstance(v, EventsConfig):
            return v
        if isinstance(v, str):
            v = {"endpoint": v}
        if not isinstance(v, Mapping):
            raise ConfigError(f"events must be an endpoint string or a table of options, got {type(v).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = set(v) - set(known)
        if unknown:
            raise ConfigError(f"unknown [events] option(s) {sorted(unknown)}; known: {sorted(known)}")
        cfg = cls(**dict(v))
        for name in ("endpoint", "topic"):
            if not isinstance(getattr(cfg, name), str):
                raise ConfigError(f"[events] {name} must be a string, got {getattr(cfg, name)!r}")
        if cfg.clear_on_close not in (True, False, "volatile"):
            raise ConfigError(f'[events] clear_on_close must be true, false or "volatile", got {cfg.clear_on_close!r}')
        if cfg.replay_endpoint is not None and not isinstance(cfg.replay_endpoint, str):
            raise ConfigError(f"[events] replay_endpoint must be a string, got {cfg.replay_endpoint!r}")
        for name in ("buffer_steps", "hwm", "max_queue_size", "linger_ms", "token_blocks"):
            n = getattr(cfg, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < (0 if name == "linger_ms" else 1):
                raise ConfigError(f"[events] {name} must be a positive integer, got {n!r}")
        return cfg


def offset_endpoint(endpoint: str, rank: int) -> str:
    """vLLM's ``offset_endpoint_port``: tcp port + rank (port 0 stays 0), inproc gets a suffix."""
    if not rank:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{rank}"
    if endpoint.startswith("tcp://") and ":" in endpoint[6:]:
        base, port = endpoint.rsplit(":", 1)
        return endpoint if int(port) == 0 else f"{base}:{int(port) + rank}"
    return endpoint


# ---- the publisher ----------------------------------------------------------------------------------
class KVEventPublisher:
    """Subscribes to ``store.events`` and publishes vLLM-format KV events (see module docstring).

    ``start=False`` leaves the thread unstarted (events queue up, and overflow is counted) until
    :meth:`start`.
    """

    def __init__(self, store: Store, config: EventsConfig | Mapping[str, Any] | str, *, start: bool = True) -> None:
        self.config = cfg = EventsConfig.from_any(config)
        self.store = store
        ns = store.default_namespace
        rank = ns.rank if (ns is not None and cfg.offset_by_rank) else 0
        # (arrival index, time, event; None: AllBlocksCleared here)
        self._q: queue.Queue[Item] = queue.Queue(cfg.max_queue_size)
        self._arrivals = itertools.count()
        self._buffer: deque[tuple[int, bytes, bytes]] = deque(maxlen=cfg.buffer_steps)
        self._seq = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Condition(self._lock)
        self.counters = {"batches": 0, "events": 0, "dropped_events": 0, "replays": 0, "subscriptions": 0}
        # The queue overflowed at this arrival: what came before it is void, and AllBlocksCleared stands
        # in its place (a lost BlockRemoved would otherwise leave routers a block that is gone).
        self._lost_upto = -1
        self._cleared_upto = -1
        self._done_upto = -1  # every arrival up to here is published (or void)
        self._tokens: dict[int, np.ndarray] = {}  # block hash -> its token ids (the thread's; oldest first)
        self._stop = threading.Event()
        self._closed = False
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.XPUB)  # a PUB that also sees subscriptions (wait_subscribed)
        self._replay: zmq.Socket[bytes] | None = None
        try:
            self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)
            self._pub.set_hwm(cfg.hwm)
            self.endpoint = self._open(self._pub, offset_endpoint(cfg.endpoint, rank), cfg.bind)
            if cfg.replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self.replay_endpoint: str | None = self._open(
                    self._replay, offset_endpoint(cfg.replay_endpoint, rank), True
                )
            else:
                self.replay_endpoint = None
        except BaseException:
            self._close_sockets(0)
            raise
        self._thread = threading.Thread(target=self._run, name="kvbm-fs-kv-events", daemon=True)
        self._unsubscribe = store.events.subscribe(self._on_event)
        atexit.register(self.close)
        if start:
            self.start()

    @staticmethod
    def _open(sock: zmq.Socket[bytes], endpoint: str, bind: bool | None) -> str:
        if bind is None:
            bind = "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))
        try:
            if not bind:
                sock.connect(endpoint)
                return endpoint
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            raise ConfigError(f"events: cannot {'bind' if bind else 'connect'} {endpoint}: {e}") from None
        return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))  # the real port when asked for :0

    def start(self) -> KVEventPublisher:
        if not self._thread.is_alive() and not self._closed:
            self._thread.start()
        return self

    # ---- the store's side: never blocks ---------------------------------------------------------------
    def _on_event(self, ev: BlockEvent) -> None:
        if self._stop.is_set():
            return
        if ev.kind.value in KINDS:
            self._enqueue(ev)
        elif ev.kind.value == "tokens":  # Store.note_tokens
            self._note(ev.keys, ev.data)

    def _enqueue(self, ev: BlockEvent | Tokens | None) -> None:
        i = next(self._arrivals)
        try:
            self._q.put_nowait((i, time.time(), ev))
        except queue.Full:
            with self._lock:
                self.counters["dropped_events"] += 1
                self._lost_upto = max(self._lost_upto, i)

    def note_tokens(self, keys: BlockKeys, tokens: Any) -> None:
        """Remember the token ids of ``keys``' blocks (``len(keys) * block_size`` of them, e.g. the prompt
        a connector is about to save), so that BlockStored events for them carry ``token_ids``, which
        routers that hash tokens themselves need. Call it before the put; it only enqueues."""
        if not self._stop.is_set():
            self._note(keys, tokens)

    def _note(self, keys: BlockKeys, tokens: Any) -> None:
        ns = self.store.namespaces.get(keys.ns)
        if ns is None:
            return
        bs = ns.layout.block_size
        arr = np.asarray(tokens).reshape(-1)
        n = min(len(keys), arr.size // bs)
        if n:
            self._enqueue(Tokens(keys.hashes[:n], arr[: n * bs].reshape(n, bs)))

    def clear(self) -> None:
        """Announce AllBlocksCleared (e.g. after a reset), in order: routers forget this instance's blocks."""
        self._enqueue(None)

    def wait_subscribed(self, n: int = 1, timeout: float = 10.0) -> bool:
        """Block until ``n`` subscriptions reached the PUB socket (ZMQ drops frames sent before)."""
        with self._subscribed:
            return self._subscribed.wait_for(lambda: self.counters["subscriptions"] >= n, timeout)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event that arrived before this call is published (or counted as dropped)."""
        target = next(self._arrivals)
        try:
            self._q.put((target, time.time(), FLUSH), timeout=timeout)  # a marker: never dropped
        except queue.Full:
            return False
        with self._subscribed:
            return self._subscribed.wait_for(lambda: self._done_upto >= target, timeout)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"endpoint": self.endpoint, "replay_endpoint": self.replay_endpoint, **self.counters}

    # ---- the thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        enc = msgspec.msgpack.Encoder()
        try:
            while not self._stop.is_set():
                self._serve_sockets()
                try:
                    first = self._q.get(timeout=0.05)
                except queue.Empty:
                    if self._lost_upto > self._cleared_upto:  # the overflow's clear is due even when idle
                        self._send(enc, [])
                    continue
                if self.config.batch_ms > 0 and first[2] is not FLUSH:
                    self._stop.wait(self.config.batch_ms / 1000)
                self._send(enc, self._drain(first))
            deadline = time.monotonic() + 1.0  # closing: flush what is queued, within a bound
            while time.monotonic() < deadline:
                try:
                    self._send(enc, self._drain(self._q.get_nowait()))
                except queue.Empty:
                    break
            self._send(enc, [(next(self._arrivals), time.time(), None)] if self.config.clear_on_close is True else [])
            self._serve_sockets()
        except Exception:
            log.exception("KV event publisher failed; no more events from this store")
        finally:
            self._close_sockets(self.config.linger_ms)

    def _drain(self, first: Item, most: int = 1024) -> list[Item]:
        items = [first]
        while len(items) < most:
            try:
                items.append(self._q.get_nowait())
            except queue.Empty:
                break
        return items

    def _send(self, enc: msgspec.msgpack.Encoder, items: list[Item]) -> None:
        with self._lock:
            lost = self._lost_upto
        if lost > self._cleared_upto:  # overflow: everything up to the lost event is void
            self._cleared_upto = lost
            items = [(lost, time.time(), None), *items]
        batches: list[tuple[int, float, list[Event]]] = []
        for i, ts, ev in items:
            if isinstance(ev, Tokens):
                self._remember(ev)
                continue
            if i < self._cleared_upto or isinstance(ev, str):
                continue
            if ev is None:  # AllBlocksCleared, in every namespace's topic
                batches += [(ns, ts, [AllBlocksCleared()]) for ns in sorted(self.store.namespaces)]
                continue
            out = self._convert(ev)
            if not out:
                continue
            if batches and batches[-1][0] == ev.keys.ns:
                batches[-1][2].extend(out)
            else:
                batches.append((ev.keys.ns, ts, out))
        for ns, ts, evs in batches:
            topic = f"{self.config.topic}.{ns:016x}" if self.config.topic else f"{ns:016x}"
            payload = enc.encode(KVEventBatch(ts=ts, events=evs, data_parallel_rank=self.config.data_parallel_rank))
            tb = topic.encode()
            seq = self._seq
            self._seq += 1
            self._pub.send_multipart((tb, seq.to_bytes(8, "big"), payload))
            self._buffer.append((seq, tb, payload))
            with self._lock:
                self.counters["batches"] += 1
                self.counters["events"] += len(evs)
        with self._subscribed:
            self._done_upto = max(self._done_upto, lost, *(it[0] for it in items))
            self._subscribed.notify_all()

    def _convert(self, ev: BlockEvent) -> list[Event]:
        kind = ev.kind.value
        if kind in _CLEARED:  # a tier's own "cleared" event, should one exist
            return [AllBlocksCleared()]
        medium, locality = MEDIA.get(self._medium_of(ev.tier), (MEDIUM_STORAGE, REMOTE))
        owner = f"kvbm_fs:{ev.tier}"
        hashes = ev.keys.hashes
        if kind in _REMOVED:
            return [BlockRemoved(block_hashes=hashes.tolist(), medium=medium, locality=locality, ownership=owner)]
        ns = self.store.namespaces.get(ev.keys.ns)
        block_size = ns.layout.block_size if ns is not None else 0
        tokens = _tokens_of(ev, len(hashes), block_size) or self._recall(hashes)
        parents = ev.keys.parents
        # one BlockStored per chain run: a block continues the run when its parent is the previous block
        brk = np.flatnonzero(parents[1:] != hashes[:-1]) + 1
        bounds = [0, *brk.tolist(), len(hashes)]
        hs, ps = hashes.tolist(), parents.tolist()
        out: list[Event] = []
        for a, b in itertools.pairwise(bounds):
            out.append(
                BlockStored(
                    block_hashes=hs[a:b],
                    parent_block_hash=ps[a] or None,  # 0: a root block, or a parent this tier does not know
                    token_ids=tokens[a * block_size : b * block_size] if tokens else [],
                    block_size=block_size,
                    lora_id=None,
                    medium=medium,
                    lora_name=None,
                    locality=locality,
                    ownership=owner,
                )
            )
        return out

    def _remember(self, t: Tokens) -> None:
        for h, row in zip(t.hashes.tolist(), t.rows):
            self._tokens.pop(h, None)
            self._tokens[h] = row
        while len(self._tokens) > self.config.token_blocks:
            del self._tokens[next(iter(self._tokens))]

    def _recall(self, hashes: np.ndarray) -> list[int]:
        """The noted tokens of all these blocks, in order; [] unless every one is known."""
        if not self._tokens:
            return []
        rows = [self._tokens.get(h) for h in hashes.tolist()]
        if any(r is None for r in rows):
            return []
        return np.concatenate(rows).tolist()  # type: ignore[arg-type]

    def _medium_of(self, tier: str) -> str:
        for t in self.store.tiers:
            if t.name == tier:
                return str(t.medium.value)
        return Medium.REMOTE.value

    def _serve_sockets(self) -> None:
        while self._pub.poll(0):
            msg = self._pub.recv()
            if msg[:1] == b"\x01":
                with self._subscribed:
                    self.counters["subscriptions"] += 1
                    self._subscribed.notify_all()
        while self._replay is not None and self._replay.poll(0):
            frames = self._replay.recv_multipart()
            if len(frames) != 3:
                log.warning("ignoring a malformed replay request (%d frames)", len(frames))
                continue
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, topic, payload in list(self._buffer):
                if seq >= first:
                    self._replay.send_multipart((client, b"", topic, seq.to_bytes(8, "big"), payload))
            self._replay.send_multipart((client, b"", b"", END_SEQ, b""))
            with self._lock:
                self.counters["replays"] += 1

    def _close_sockets(self, linger_ms: int) -> None:
        for s in (self._pub, self._replay):
            if s is not None:
                s.close(linger=linger_ms)
        self._ctx.term()

    def close(self) -> None:
        """Stop listening to the store, flush queued events (and AllBlocksCleared), close the sockets."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._unsubscribe()
        atexit.unregister(self.close)
        if self.config.clear_on_close == "volatile":
            self._forget_volatile()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0 + self.config.linger_ms / 1000)
        elif self._thread.ident is None:  # never started: the sockets are ours to close
            self._close_sockets(0)

    def _forget_volatile(self) -> None:
        """BlockRemoved for every block in this process's own tiers (GPU/CPU): they die with it."""
        from .events import BlockEvent, EventKind

        for t in self.store.tiers:
            if t.shareable:
                continue
            try:
                for batch in t.iter_keys():
                    if batch.ns in self.store.namespaces:
                        self._enqueue(BlockEvent(EventKind.REMOVED, t.name, batch))
            except Exception:  # a closed or broken tier: routers must not keep its blocks
                log.exception("events: cannot list tier %s at close; announcing AllBlocksCleared", t.name)
                self._enqueue(None)


def _tokens_of(ev: BlockEvent, n: int, block_size: int) -> list[int]:
    """The event's token ids (set by whoever knows them, e.g. a connector's save), if they fit its blocks."""
    toks = getattr(ev, "token_ids", None)
    if toks is None:
        toks = getattr(getattr(ev, "data", None), "token_ids", None)
    if toks is None or not block_size:
        return []
    arr = np.asarray(toks).reshape(-1)
    return arr.tolist() if arr.size == n * block_size else []


# ---- consumers --------------------------------------------------------------------------------------
def replay(ctx: zmq.Context[Any], endpoint: str, start_seq: int, timeout_ms: int = 5000) -> list[tuple[int, bytes]]:
    """Ask a publisher's replay socket for every buffered batch from ``start_seq``: [(seq, payload)]."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart((b"", start_seq.to_bytes(8, "big")))
        out: list[tuple[int, bytes]] = []
        while sock.poll(timeout_ms):
            _, _topic, seq, payload = sock.recv_multipart()
            if seq == END_SEQ:
                return out
            out.append((int.from_bytes(seq, "big"), payload))
        raise TimeoutError(f"no end-of-replay marker from {endpoint} within {timeout_ms} ms")
    finally:
        sock.close()


def publisher_of(store: Store) -> KVEventPublisher | None:
    """The publisher :func:`attach` (or ``mount(events=...)``) gave ``store``, if any."""
    owners = (getattr(hook, "__self__", None) for hook in store.on_close)
    return next((p for p in owners if isinstance(p, KVEventPublisher)), None)


def attach(store: Store, config: EventsConfig | Mapping[str, Any] | str) -> KVEventPublisher:
    """Publish ``store``'s events; the publisher closes with the store: after ``persist`` (whose blocks
    it announces), before the tiers close."""
    pub = KVEventPublisher(store, config)
    store.on_close.append(pub.close)
    return pub
