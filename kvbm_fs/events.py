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
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

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


@dataclass(frozen=True, slots=True)
class StoreOp:
    """What one ``Store.get`` (LOADED) or ``Store.put`` (SAVED) did, per tier index of ``tiers``."""

    tiers: tuple[str, ...]
    where: np.ndarray  # int8 per key: the tier read from (get) / that took it (put); -1: none
    done: np.ndarray  # bool per key: delivered (get) / stored somewhere (put)
    seconds: tuple[float, ...]  # time spent in each tier's get/put; -1.0: that tier was not called
    asked: tuple[int, ...] = ()  # blocks asked of each tier
    done_by: tuple[int, ...] = ()  # blocks each tier delivered (get) / took (put)


@dataclass(frozen=True, slots=True)
class Move:
    """A daemon move: ``action`` is demote, promote or prefetch; ``src`` the tier the bytes came from."""

    action: str
    src: str
    nbytes: int  # bytes moved (blocks x block size)


@dataclass(frozen=True, slots=True)
class BlockEvent:
    kind: EventKind
    tier: str
    keys: BlockKeys
    detail: str = ""
    data: Any = None  # kind-specific payload (see EventKind); None for most tier events


Subscriber = Callable[[BlockEvent], None]


class EventBus:
    __slots__ = ("_lock", "_subs")

    def __init__(self) -> None:
        self._subs: tuple[Subscriber, ...] = ()
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return bool(self._subs)

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        with self._lock:
            self._subs = (*self._subs, fn)

        def unsubscribe() -> None:
            with self._lock:
                self._subs = tuple(s for s in self._subs if s is not fn)

        return unsubscribe

    def publish(self, kind: EventKind, tier: str, keys: BlockKeys, detail: str = "", data: Any = None) -> None:
        subs = self._subs
        if not subs or len(keys) == 0:
            return
        ev = BlockEvent(kind, tier, keys, detail, data)
        for fn in subs:
            try:
                fn(ev)
            except Exception:  # a broken subscriber must not break storage
                log.exception("event subscriber %r failed on %s", fn, kind.value)
