"""Block events, batched: one event per (kind, tier, batch of keys), never one per block.

Publishing is a single attribute check when nobody subscribes, so tiers may call
:meth:`EventBus.publish` on every hot-path operation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from .keys import BlockKeys

log = logging.getLogger(__name__)


class EventKind(StrEnum):
    STORED = "stored"
    REMOVED = "removed"
    EVICTED = "evicted"
    PROMOTED = "promoted"
    DEMOTED = "demoted"
    LOAD_FAILED = "load_failed"
    STORE_FAILED = "store_failed"


@dataclass(frozen=True, slots=True)
class BlockEvent:
    kind: EventKind
    tier: str
    keys: BlockKeys
    detail: str = ""


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

    def publish(self, kind: EventKind, tier: str, keys: BlockKeys, detail: str = "") -> None:
        subs = self._subs
        if not subs or len(keys) == 0:
            return
        ev = BlockEvent(kind, tier, keys, detail)
        for fn in subs:
            try:
                fn(ev)
            except Exception:  # a broken subscriber must not break storage
                log.exception("event subscriber %r failed on %s", fn, kind.value)
