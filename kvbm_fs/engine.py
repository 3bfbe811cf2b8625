"""The connector kit: store plumbing every engine connector needs, so connectors never walk ``store.tiers``.

Containment across tiers, write-through to the persistent tiers, deleting a namespace, and a
per-process registry that shares one store per engine and closes it at exit (engines rarely say
they are done, and closing is what persists host-tier blocks). See docs/architecture.md.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable, Collection, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from .keys import BlockKeys, Namespace
from .store import Store
from .tier import Medium, Tier

log = logging.getLogger("kvbm_fs")
T = TypeVar("T")


def present(store: Store, keys: BlockKeys, *, skip: Collection[Medium] = ()) -> np.ndarray:
    """Mask of ``keys`` held by some tier whose medium is not in ``skip``. Each tier is asked only
    about keys the faster tiers lack, and the walk stops once every key is found."""
    have = np.zeros(len(keys), bool)
    todo = np.arange(len(keys))
    for tier in store.tiers:
        if not todo.size:
            break
        if tier.medium in skip:
            continue
        hit = np.asarray(tier.contains(keys if todo.size == len(keys) else keys[todo]), bool)
        have[todo[hit]] = True
        todo = todo[~hit]
    return have


def write_targets(store: Store, write_through: bool) -> list[Tier]:
    """Where a save goes: the first tier, plus every later persistent tier when writing through."""
    first, *rest = store.tiers
    return [first, *(t for t in rest if t.persistent)] if write_through else [first]


def write_through(store: Store, keys: BlockKeys, rows: Any) -> int:
    """Put ``keys`` into every persistent tier after the first, without spilling; return the blocks
    dropped (a dead or full tier's put returns False for them rather than raising)."""
    dropped = 0
    for tier in write_targets(store, True)[1:]:
        kept = np.asarray(store.put(keys, rows, tier=tier.name, spill=False), bool)
        dropped += int((~kept).sum())
    return dropped


def delete_namespace(store: Store, ns: Namespace) -> int:
    """Delete every block of ``ns`` from every tier (other namespaces stay); return how many blocks
    went (``Store.delete`` takes a block out of every tier that holds it)."""
    n = 0
    for tier in store.tiers:
        for batch in list(tier.iter_keys()):
            if batch.ns == ns.id:
                n += int(np.asarray(store.delete(batch)).sum())
    return n


@dataclass
class Lease(Generic[T]):
    """One registry entry: the shared value and how many users hold it."""

    key: Hashable
    value: T
    refs: int = 0
    closed: bool = False  # by close_all: a later release closes nothing


class Registry(Generic[T]):
    """Values (stores, or engine state holding one) shared by key within one process. The last
    ``release`` closes a value; whatever is still held closes at interpreter exit, in a clean
    shutdown, because engines rarely tell a connector they are done."""

    def __init__(self, close: Callable[[T], None], what: str = "kvbm_fs") -> None:
        self._close, self._what = close, what
        self._held: dict[Hashable, Lease[T]] = {}
        self.lock = threading.RLock()  # callers may hold it to pick a key and acquire as one step
        atexit.register(self.close_all)

    def __contains__(self, key: Hashable) -> bool:
        with self.lock:
            return key in self._held

    def __len__(self) -> int:
        with self.lock:
            return len(self._held)

    def __iter__(self) -> Iterator[T]:
        with self.lock:
            return iter([lease.value for lease in self._held.values()])

    def acquire(self, key: Hashable, make: Callable[[], T], current: Callable[[T], bool] | None = None) -> Lease[T]:
        """The lease for ``key``, made with ``make()`` when there is none (or when ``current`` says the
        held value belongs to a stale key: an ``id()`` reused after its object died)."""
        with self.lock:
            lease = self._held.get(key)
            if lease is None or (current is not None and not current(lease.value)):
                lease = self._held[key] = Lease(key, make())
            lease.refs += 1
            return lease

    def release(self, lease: Lease[T]) -> None:
        """Drop one reference; the last one closes the value."""
        with self.lock:
            lease.refs -= 1
            if lease.refs > 0 or lease.closed:
                return
            lease.closed = True
            if self._held.get(lease.key) is lease:
                del self._held[lease.key]
        self._close(lease.value)

    def close_all(self) -> None:
        """Close every value still held (registered with atexit; safe to call twice)."""
        with self.lock:
            held = list(self._held.values())
            self._held.clear()
            for lease in held:
                lease.closed = True
        for lease in held:
            try:
                self._close(lease.value)
            except Exception:
                log.exception("%s: closing a store at exit failed", self._what)


def close_store(store: Store | None) -> None:
    """Close a store if there is one (closing persists host-tier blocks into the persistent tiers)."""
    if store is not None:
        store.close()


__all__ = ["Lease", "Registry", "close_store", "delete_namespace", "present", "write_targets", "write_through"]
