"""Which tier holds a block, learnt from block events instead of asking the tiers.

A reader that cannot open a tier itself (a vLLM scheduler in its own process, beside workers whose
host and GPU tiers live in their processes) keeps this directory from the tiers' STORED / PROMOTED /
DEMOTED (in) and REMOVED / EVICTED (out) events, shipped to it or followed on a Store's EventBus.
One KeyIndex per tier: a lookup is a few numpy passes per tier, never a Python object per block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .events import BlockEvent, EventKind
from .index import KeyIndex
from .keys import BlockKeys

if TYPE_CHECKING:
    from .store import Store

ADDED = frozenset({EventKind.STORED, EventKind.PROMOTED, EventKind.DEMOTED})
DROPPED = frozenset({EventKind.REMOVED, EventKind.EVICTED})
KINDS = ADDED | DROPPED
# fastest first: a block held by several tiers is answered with the one a load would read
MEDIUM_RANK = {"gpu": 0, "host": 1, "peer": 2, "disk": 3, "remote": 4}


class BlockDirectory:
    """(tier, namespace, hash) -> present, fed by block events; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._index: dict[str, KeyIndex] = {}
        self._medium: dict[str, str] = {}
        self._order: tuple[str, ...] = ()

    @property
    def tiers(self) -> tuple[str, ...]:
        """Tier names, fastest medium first (ties in the order first heard of); ``where`` indexes this.
        It changes only when an event names a tier not heard of before."""
        return self._order

    def medium(self, tier: str) -> str | None:
        """The medium an event gave for ``tier`` (``"host"``, ...); None for a tier never heard of."""
        return self._medium.get(tier)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(ix) for ix in self._index.values())

    def count(self, tier: str) -> int:
        """Blocks the directory knows ``tier`` holds (every namespace)."""
        with self._lock:
            ix = self._index.get(tier)
            return len(ix) if ix is not None else 0

    # ---- feeding -----------------------------------------------------------------------------------
    def record(self, kind: EventKind | str, tier: str, keys: BlockKeys, medium: str = "") -> None:
        """Apply one event: ``keys`` went into ``tier`` (STORED, PROMOTED, DEMOTED) or left it (REMOVED,
        EVICTED); other kinds are ignored. ``medium`` (``Medium`` value) places a new tier in the order."""
        kind = EventKind(kind)
        if kind not in KINDS:
            return
        h = keys.hashes
        with self._lock:
            ix = self._index.get(tier)
            if ix is None:
                ix = self._add_tier(tier, str(medium))
            elif medium and not self._medium[tier]:
                self._medium[tier] = str(medium)
                self._sort()
            if not h.size:
                return
            vals, where = ix.find(keys.ns, h)
            if kind in DROPPED:
                ix.remove_at(where)
                return
            new = np.unique(h[vals < 0])  # KeyIndex.insert takes keys absent and distinct
            if new.size:
                ix.insert(keys.ns, new, np.zeros(new.size, np.int64))

    def on_event(self, ev: BlockEvent, medium: str = "") -> None:
        """``record`` for a BlockEvent (an EventBus subscriber, given the tier's medium)."""
        self.record(ev.kind, ev.tier, ev.keys, medium)

    def follow(self, store: Store) -> Callable[[], None]:
        """Keep this directory from ``store``'s events from now on; returns the unsubscribe function.
        (Blocks the store already holds are not listed: follow a store before it fills.)"""

        def on_event(ev: BlockEvent) -> None:
            try:
                medium = str(store.tier(ev.tier).medium.value)
            except KeyError:
                medium = ""
            self.record(ev.kind, ev.tier, ev.keys, medium)

        return store.events.subscribe(on_event, KINDS)

    def clear(self, tier: str | None = None, ns: int | None = None) -> None:
        """Forget what is known of ``tier`` (default: every tier), of namespace ``ns`` only if given
        (a worker that restarted, a namespace deleted)."""
        with self._lock:
            for name in [tier] if tier is not None else list(self._index):
                ix = self._index.get(name)
                if ix is None:
                    continue
                if ns is None:
                    self._index[name] = KeyIndex()
                    continue
                kept = KeyIndex(len(ix))
                nss, hs, vs = ix.items()
                for n in np.unique(nss).tolist():
                    if n != ns:
                        m = nss == n
                        kept.insert(int(n), hs[m], vs[m])
                self._index[name] = kept

    # ---- lookups -----------------------------------------------------------------------------------
    def where(self, keys: BlockKeys) -> np.ndarray:
        """Per key, the index into ``tiers`` of the fastest tier holding it; -1 where none does. Each
        tier is asked only about the keys the faster ones lack."""
        with self._lock:
            return self._where(keys)

    def contains(self, keys: BlockKeys) -> np.ndarray:
        """Mask of ``keys`` some tier holds."""
        return self.where(keys) >= 0

    def names(self, keys: BlockKeys) -> np.ndarray:
        """Per key, the name of the fastest tier holding it (``""`` where none does), as an object array."""
        with self._lock:
            idx, names = self._where(keys), np.array([*self._order, ""], dtype=object)
        return names[idx]  # -1 picks the trailing ""

    def _where(self, keys: BlockKeys) -> np.ndarray:
        out = np.full(len(keys), -1, np.int16)
        todo = np.arange(len(keys))
        for i, name in enumerate(self._order):
            if not todo.size:
                break
            vals, _ = self._index[name].find(keys.ns, keys.hashes[todo])
            hit = vals >= 0
            out[todo[hit]] = i
            todo = todo[~hit]
        return out

    def _add_tier(self, tier: str, medium: str) -> KeyIndex:
        ix = self._index[tier] = KeyIndex()
        self._medium[tier] = medium
        self._sort()
        return ix

    def _sort(self) -> None:
        order = sorted(self._index, key=lambda t: MEDIUM_RANK.get(self._medium[t], len(MEDIUM_RANK)))
        self._order = tuple(order)


__all__ = ["ADDED", "DROPPED", "KINDS", "MEDIUM_RANK", "BlockDirectory"]
