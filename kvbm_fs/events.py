"""Block events, batched: one event per (kind, tier, batch of keys), never one per block.

The store's :class:`EventBus` is the one stream everything observing a store subscribes to: the
placement daemon, the Prometheus metrics, the KV-event publisher.  Tiers publish what they do to
their blocks (stored, evicted, removed, refused, failed), the store publishes each ``match``,
``get`` and ``put`` as a whole (``MATCHED``, ``LOADED``, ``SAVED``, with a :class:`StoreOp` or the
``Match`` as ``data``), and the daemon publishes its moves (``PROMOTED``, ``DEMOTED``, with a
:class:`Move`).  Publishing is a single attribute check when nobody subscribes, so tiers may call
:meth:`EventBus.publish` on every hot-path operation.  docs/architecture.md lists every kind.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np

from .keys import BlockKeys

log = logging.getLogger(__name__)

VERIFY = "verify"  # ``data`` of a LOAD_FAILED whose bytes were read but failed verification


class EventKind(StrEnum):
    # what a tier did to its blocks (``tier``: that tier)
    STORED = "stored"
    REMOVED = "removed"
    EVICTED = "evicted"
    LOAD_FAILED = "load_failed"  # data=VERIFY: read but corrupt; else an I/O failure or a stale match
    STORE_FAILED = "store_failed"
    REFUSED = "refused"  # the tier's admission filter declined these new blocks
    # the daemon's (or Store.copy's) moves (``tier``: the destination; data: a Move)
    PROMOTED = "promoted"
    DEMOTED = "demoted"
    # store-level operations (``tier`` is ""): MATCHED data is the Match; LOADED (get) and SAVED (put) a StoreOp
    MATCHED = "matched"
    LOADED = "loaded"
    SAVED = "saved"
    # ``Store.note_tokens`` (``tier`` ""): data is the int token array [len(keys) * block_size] of keys' blocks
    TOKENS = "tokens"


class StoreOp(NamedTuple):
    """What one ``Store.get`` (LOADED) or ``Store.put`` (SAVED) did, per tier index of ``tiers``.

    A NamedTuple (immutable, built in ~0.4 us; a frozen dataclass takes ~0.8 us), as :class:`BlockEvent`:
    both are built on every store call that has a subscriber."""

    tiers: tuple[str, ...]
    where: np.ndarray  # int8 per key: the tier read from (get) / that took it (put); -1: none
    done: np.ndarray  # bool per key: delivered (get) / stored somewhere (put)
    seconds: Sequence[float]  # time spent in each tier's get/put; -1.0: that tier was not called
    asked: Sequence[int] = ()  # blocks asked of each tier
    done_by: Sequence[int] = ()  # blocks each tier delivered (get) / took (put)


@dataclass(frozen=True, slots=True)
class Move:
    """A daemon move: ``action`` is demote, promote or prefetch; ``src`` the tier the bytes came from."""

    action: str
    src: str
    nbytes: int  # bytes moved (blocks x block size)


class BlockEvent(NamedTuple):
    kind: EventKind
    tier: str
    keys: BlockKeys
    detail: str = ""
    data: Any = None  # kind-specific payload (see EventKind); None for most tier events


Subscriber = Callable[[BlockEvent], None]
_tuple_new = tuple.__new__


class EventBus:
    """Subscribers get every event, or only the kinds they name (then the bus builds no event for a kind
    nobody wants, and calls each subscriber only with what it counts)."""

    __slots__ = ("_all", "_by_kind", "_lock", "active")

    def __init__(self) -> None:
        self._all: list[tuple[Subscriber, frozenset[EventKind] | None]] = []
        self._by_kind: dict[EventKind, tuple[Subscriber, ...]] = {}  # only kinds someone wants
        self._lock = threading.Lock()
        self.active = False  # anyone subscribed (a plain attribute: read on every store call; read-only)

    def subscribe(self, fn: Subscriber, kinds: Iterable[EventKind] | None = None) -> Callable[[], None]:
        """Add a subscriber, of every kind or of ``kinds``; returns a function that removes it."""
        entry = (fn, None if kinds is None else frozenset(kinds))
        with self._lock:
            self._all.append(entry)
            self._index()

        def unsubscribe() -> None:
            with self._lock:
                self._all = [e for e in self._all if e is not entry]
                self._index()

        return unsubscribe

    def _index(self) -> None:
        by_kind = {k: tuple(fn for fn, ks in self._all if ks is None or k in ks) for k in EventKind}
        self._by_kind = {k: fns for k, fns in by_kind.items() if fns}
        self.active = bool(self._all)

    def publish(self, kind: EventKind, tier: str, keys: BlockKeys, detail: str = "", data: Any = None) -> None:
        subs = self._by_kind.get(kind)
        if not subs or not keys.hashes.size:  # (not len(keys): a Python call, on every hot-path publish)
            return
        ev = _tuple_new(BlockEvent, (kind, tier, keys, detail, data))  # BlockEvent(...) without its Python __new__
        for fn in subs:
            try:
                fn(ev)
            except Exception:  # a broken subscriber must not break storage
                log.exception("event subscriber %r failed on %s", fn, kind.value)
