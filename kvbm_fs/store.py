"""The tiered store: one namespace-checked front over an ordered list of tiers (fastest first).

The store does bookkeeping and validation only; tiers store and fetch, and bytes move between
them (or from caller rows into them) through :mod:`kvbm_fs.transfer`.  ``match`` tells how many
leading blocks are loadable and which tier holds each run; ``get`` onboards them into caller
buffers, tier by tier, and any block that a tier fails to deliver (evicted meanwhile, failed
verification) is a miss.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .cost import CostModel
from .errors import ConfigError, LayoutMismatchError, PinnedError, TierClosedError
from .events import EventBus, EventKind, Move, StoreOp
from .keys import BlockKeys, Namespace
from .tier import Medium, SlotTier, Tier
from .transfer import put_rows, transfer

if TYPE_CHECKING:
    from .daemon import DaemonConfig, PlacementDaemon
    from .metrics import StoreMetrics
    from .placement import FirstSight

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    """The loadable prefix of a request: ``length`` leading blocks, stored as runs across tiers."""

    keys: BlockKeys
    length: int
    runs: tuple[tuple[str, int, int], ...]  # (tier name, start, stop), covering [0, length)
    block_size: int = 0
    where: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8), repr=False)
    worth: int = -1  # leading blocks worth loading rather than recomputing (-1: no cost model, = length)
    lookups: tuple[tuple[int, int], ...] = field(default=(), repr=False)  # per tier: (asked, found), for metrics

    def __post_init__(self) -> None:
        if self.worth < 0:
            object.__setattr__(self, "worth", self.length)

    @property
    def num_tokens(self) -> int:
        return self.length * self.block_size

    @property
    def tokens_worth_loading(self) -> int:
        return self.worth * self.block_size

    @property
    def matched(self) -> BlockKeys:
        return self.keys[: self.length]

    def by_tier(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, a, b in self.runs:
            out[name] = out.get(name, 0) + b - a
        return out


class Store:
    def __init__(
        self,
        tiers: Sequence[Tier],
        namespace: Namespace | None = None,
        events: EventBus | None = None,
        cost: CostModel | None = None,
    ) -> None:
        if not tiers:
            raise ConfigError("a store needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ConfigError(f"tier names must be unique, got {names}; name them with ?name=...")
        self.tiers: list[Tier] = list(tiers)
        self._names = tuple(names)
        self.events = events or EventBus()
        self.namespaces: dict[int, Namespace] = {}
        self.default_namespace = namespace
        self._lock = threading.Lock()
        self._closed = False
        self.cost = cost or CostModel()
        self.daemon: PlacementDaemon | None = None
        self.placement: FirstSight | None = None  # where puts naming no tier land (set by the daemon)
        self.metrics: StoreMetrics | None = None
        self._fg = 0  # foreground operations in flight (the daemon yields to them)
        self.exported: list[Any] = []  # PeerServers serving this store's tiers to peers
        self.on_close: list[Callable[[], None]] = []  # run by close() after persist, before the tiers close
        self.counters = {"put_blocks": 0, "match_calls": 0, "matched_blocks": 0, "get_blocks": 0, "get_misses": 0}
        if namespace is not None:
            self.add_namespace(namespace)

    # ---- namespaces and keys -------------------------------------------------------------
    def add_namespace(self, ns: Namespace) -> Namespace:
        with self._lock:
            if ns.id in self.namespaces:
                return self.namespaces[ns.id]
            for t in self.tiers:
                t.bind_namespace(ns)
            self.namespaces[ns.id] = ns
            return ns

    def namespace_of(self, keys: BlockKeys) -> Namespace:
        try:
            return self.namespaces[keys.ns]
        except KeyError:
            raise ConfigError(
                f"namespace {keys.ns:016x} is not known to this store; add_namespace() it first"
            ) from None

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no tier named {name!r}; tiers: {[t.name for t in self.tiers]}")

    def keys(self, tokens: Any, *, cache_salt: str | None = None, lora_name: str | None = None) -> BlockKeys:
        if self.default_namespace is None:
            raise ConfigError("this store has no default namespace; use Namespace.keys_for_tokens()")
        return self.default_namespace.keys_for_tokens(tokens, cache_salt, lora_name)

    # ---- data path -----------------------------------------------------------------------
    def _rows(self, keys: BlockKeys, data: Any, what: str) -> Any:
        ns = self.namespace_of(keys)
        rows = ns.layout.check_blocks(data)
        if rows.shape[0] != len(keys):
            raise LayoutMismatchError(f"{what}: {len(keys)} keys but {rows.shape[0]} blocks of data")
        return rows

    def put(self, keys: BlockKeys, data: Any, tier: str | None = None, spill: bool = True) -> np.ndarray:
        """Offload: store KV-shaped ``[n, *block_shape]`` (or raw uint8 rows) into ``tier`` (default: the
        first). Blocks that tier refuses (full of pinned blocks, or a batch larger than the tier) go to
        the next tier down when ``spill`` (``transfer.put_rows``). Returns the mask of keys now stored somewhere."""
        self._live()
        rows = self._rows(keys, data, "put")
        start = self.tiers.index(self.tier(tier)) if tier else self.placement.start(keys) if self.placement else 0
        with self._foreground():
            placed = put_rows(keys, rows, self.tiers, start, spill)
        self._count(put_blocks=int(placed.ok.sum()))
        if self.events.active:
            op = StoreOp(self._names, placed.where, placed.ok, placed.seconds, placed.asked, placed.took)
            self.events.publish(EventKind.SAVED, "", keys, data=op)
        return placed.ok

    def match(self, keys: BlockKeys) -> Match:
        """Longest run of leading blocks present in some tier, with the fastest tier for each block."""
        self._live()
        ns = self.namespace_of(keys)
        where = np.full(len(keys), -1, np.int8)
        todo = np.arange(len(keys))
        lookups = []
        for i, t in enumerate(self.tiers):
            if todo.size == 0:
                break
            hit = t.contains(keys[todo])
            lookups.append((todo.size, int(np.count_nonzero(hit))))
            where[todo[hit]] = i
            todo = todo[~hit]
        miss = np.flatnonzero(where < 0)
        length = int(miss[0]) if miss.size else len(keys)
        self._count(match_calls=1, matched_blocks=length)
        worth = self.cost.worth(where[:length], self.tiers, ns.block_nbytes, ns.layout.block_size)
        m = Match(keys, length, self._runs(where[:length]), ns.layout.block_size, where, worth, tuple(lookups))
        self.events.publish(EventKind.MATCHED, "", keys, data=m)
        return m

    def _runs(self, where: np.ndarray) -> tuple[tuple[str, int, int], ...]:
        if where.size == 0:
            return ()
        brk = np.flatnonzero(np.diff(where)) + 1
        starts = np.concatenate(([0], brk)).tolist()
        stops = np.concatenate((brk, [where.size])).tolist()
        return tuple((self.tiers[int(where[a])].name, a, b) for a, b in zip(starts, stops))

    def get(self, keys: BlockKeys, out: Any, match: Match | None = None) -> np.ndarray:
        """Onboard: fill ``out`` (KV-shaped or uint8 rows, contiguous) with the blocks found; mask of rows filled."""
        self._live()
        rows = self._out_rows(keys, out)
        n = len(keys)
        reuse = match is not None and n <= len(match.keys) and match.keys[:n] == keys
        where = match.where[:n] if reuse and match is not None else self.match(keys).where
        got = np.zeros(n, bool)
        secs, asked, got_n = [-1.0] * len(self.tiers), [0] * len(self.tiers), [0] * len(self.tiers)
        for i, t in enumerate(self.tiers):
            idx = np.flatnonzero(where == i)
            if idx.size == 0:
                continue
            t0 = time.perf_counter()
            with self._foreground():
                for a, b in _spans(idx):
                    got[a:b] = t.get(keys[a:b], rows[a:b])
            secs[i] = time.perf_counter() - t0
            asked[i], got_n[i] = idx.size, int(np.count_nonzero(got[idx]))
            self.cost.observe(t, got_n[i] * t.block_nbytes, secs[i])
            failed = idx[~got[idx]]
            if failed.size:  # matched a moment ago, but the tier could not deliver: the engine recomputes
                self.events.publish(EventKind.LOAD_FAILED, t.name, keys[failed])
        self._count(get_blocks=int(got.sum()), get_misses=int((where >= 0).sum() - got.sum()))
        if self.events.active:
            op = StoreOp(self._names, where, got, secs, asked, got_n)
            self.events.publish(EventKind.LOADED, "", keys, data=op)
        return got

    @contextmanager
    def _foreground(self) -> Iterator[None]:
        with self._lock:
            self._fg += 1
        try:
            yield
        finally:
            with self._lock:
                self._fg -= 1

    @property
    def foreground_busy(self) -> bool:
        """Engine loads or stores are running: background migration waits."""
        return self._fg > 0

    def note_tokens(self, keys: BlockKeys, tokens: Any) -> None:
        """Say which token ids ``keys``' blocks hold: the first ``len(keys) * block_size`` of ``tokens``
        (e.g. the prompt a connector is about to save). Published as a ``TOKENS`` event, so that KV
        events for routers carry ``token_ids``; call it before the put. One attribute check when nobody
        subscribes (then nothing is checked either)."""
        if not self.events.active or len(keys) == 0:
            return
        need = len(keys) * self.namespace_of(keys).layout.block_size
        arr = np.asarray(tokens).reshape(-1)
        if arr.size < need or arr.dtype.kind not in "iu":
            raise LayoutMismatchError(
                f"note_tokens: {len(keys)} blocks need {need} integer token ids, got {arr.size} of {arr.dtype}"
            )
        self.events.publish(EventKind.TOKENS, "", keys, data=arr[:need].copy())

    # ---- daemon ----------------------------------------------------------------------------
    def start_daemon(self, config: DaemonConfig | dict[str, Any] | None = None) -> PlacementDaemon:
        """Run the placement daemon in a background thread (watermarks, promotion, prefetch)."""
        from .daemon import DaemonConfig, PlacementDaemon

        if self.daemon is None:
            cfg = DaemonConfig.from_dict(config) if isinstance(config, dict) else config
            self.daemon = PlacementDaemon(self, cfg)
        return self.daemon.start()

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()

    # ---- metrics ---------------------------------------------------------------------------
    def enable_metrics(self, port: int | None = None, host: str = "127.0.0.1") -> StoreMetrics:
        """Count this store's operations as Prometheus metrics (``kvbm_fs_*``), from its event stream;
        with ``port`` (0: any free one), also serve them at ``http://host:port/metrics``."""
        from .metrics import StoreMetrics

        if self.metrics is None:
            self.metrics = StoreMetrics(self.tiers, self.events)
        if port is not None and self.metrics.port is None:
            self.metrics.serve(port, host)
        return self.metrics

    def _out_rows(self, keys: BlockKeys, out: Any) -> Any:
        contiguous = out.is_contiguous() if hasattr(out, "is_contiguous") else out.flags.c_contiguous
        if not contiguous:
            raise LayoutMismatchError("get: the destination buffer must be contiguous (it is written in place)")
        return self._rows(keys, out, "get")

    def copy(self, keys: BlockKeys, src: str, dst: str) -> np.ndarray:
        """Copy blocks between two tiers (promotion/demotion primitive); the source keeps its copy."""
        self._live()
        self.namespace_of(keys)
        s, d = self.tier(src), self.tier(dst)
        had = d.contains(keys)
        ok = transfer(keys, s, d, have=had)
        up = self.tiers.index(d) < self.tiers.index(s)
        new = ok & ~had
        if new.any():
            move = Move("promote" if up else "demote", src, int(new.sum()) * s.block_nbytes)
            self.events.publish(EventKind.PROMOTED if up else EventKind.DEMOTED, dst, keys[new], data=move)
        return ok

    def pin(self, keys: BlockKeys) -> Pins:
        """Pin keys in every tier that holds them now, until ``unpin`` (or the ``with`` block ends)."""
        self._live()
        return Pins(keys, [(t, t.pin(keys)) for t in self.tiers])

    def unpin(self, pins: Pins) -> None:
        pins.release()

    def delete(self, keys: BlockKeys) -> np.ndarray:
        """Delete from every tier; mask of keys that were present anywhere. Pinned anywhere: PinnedError, nothing deleted."""
        self._live()
        for t in self.tiers:
            if t.pinned(keys).any():
                raise PinnedError(f"cannot delete: some of these blocks are pinned in tier {t.name!r}")
        out = np.zeros(len(keys), bool)
        for t in self.tiers:
            out |= t.delete(keys)
        return out

    def _count(self, **delta: int) -> None:
        with self._lock:
            for k, v in delta.items():
                self.counters[k] += v

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counters = dict(self.counters)
        return {
            "namespaces": [ns.short_id for ns in self.namespaces.values()],
            "tiers": [t.stats() for t in self.tiers],
            "daemon": self.daemon.stats() if self.daemon is not None else None,
            **counters,
        }

    def persist(self) -> int:
        """Copy every block held only in this process's volatile tiers into the first persistent tier,
        hottest tiers first, so a restart finds the working set (a peer's blocks are not this
        process's: they outlive it, and other instances' blocks must not be copied here). Returns the
        number of blocks written."""
        self._live()
        target = next((t for t in self.tiers if t.persistent), None)
        if target is None:
            return 0
        written = 0
        for t in self.tiers:
            if t.shareable:  # persistent, or a peer's: the blocks live on without this process
                continue
            for batch in t.iter_keys():
                if batch.ns not in self.namespaces:
                    continue
                for i in range(0, len(batch), 256):
                    sub = batch[i : i + 256]
                    todo = np.flatnonzero(~target.contains(sub))
                    if todo.size:
                        written += int(transfer(sub[todo], t, target, have=np.zeros(todo.size, bool)).sum())
        return written

    def export_peer(self, tier: str | None = None, host: str = "127.0.0.1", port: int = 0) -> Any:
        """Serve a host tier (``tier``, or the first host tier) to other processes, which mount it as
        the ``peer://HOST:PORT`` in the returned server's ``url``.  Closed with the store."""
        from .tiers.peer import PeerServer

        self._live()
        t = self.tier(tier) if tier else next((x for x in self.tiers if x.medium is Medium.HOST), None)
        if not isinstance(t, SlotTier) or t.medium is not Medium.HOST:
            raise ConfigError(f"export_peer: {tier or 'this store'!r} has no host tier to serve")
        server = PeerServer(t, host, port)
        self.exported.append(server)
        return server

    def close(self, persist: bool = True) -> None:
        """Close every tier; with ``persist`` (default), first save volatile blocks to the persistent tier."""
        if self._closed:
            return
        for server in self.exported:
            server.close()
        self.stop_daemon()
        if persist:
            self.persist()
        self._closed = True
        for hook in self.on_close:  # e.g. the KV-event publisher: it announces what persist wrote, then closes
            try:
                hook()
            except Exception:  # a failing observer must not keep the tiers (and their data) from closing
                log.exception("kvbm_fs: a close hook of this store failed")
        if self.metrics is not None:
            self.metrics.close()
        for t in self.tiers:
            t.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live(self) -> None:
        if self._closed:
            raise TierClosedError("store is closed")


class Pins:
    """Pins taken by :meth:`Store.pin`; each tier is unpinned exactly where it was pinned."""

    def __init__(self, keys: BlockKeys, held: list[tuple[Tier, np.ndarray]]) -> None:
        self.keys = keys
        self._held = held
        self.mask = np.zeros(len(keys), bool)
        for _, m in held:
            self.mask |= m

    def release(self) -> None:
        held, self._held = self._held, []
        for t, m in held:
            if m.any():
                t.unpin(self.keys[np.flatnonzero(m)])

    def __enter__(self) -> Pins:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _spans(idx: np.ndarray) -> Iterable[tuple[int, int]]:
    brk = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], brk))
    stops = np.concatenate((brk, [idx.size]))
    return zip(idx[starts].tolist(), (idx[stops - 1] + 1).tolist())
