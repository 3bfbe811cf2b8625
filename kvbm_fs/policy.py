"""Eviction policies: small plain objects over slot numbers, kept apart from storage.

A policy sees only slot ids (numpy arrays) and a mask of slots it may evict; the
pool decides what is evictable (registered, unpinned) and applies the result.
Policies are chosen by name (:func:`make_policy`); the daemon issue adds more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from .errors import ConfigError


class EvictionPolicy(Protocol):
    name: str

    def bind(self, num_slots: int) -> None: ...
    def on_insert(self, slots: np.ndarray) -> None: ...
    def on_access(self, slots: np.ndarray) -> None: ...
    def on_remove(self, slots: np.ndarray) -> None: ...
    def victims(self, evictable: np.ndarray, n: int) -> np.ndarray:
        """Up to ``n`` slot ids among ``evictable`` (a bool mask over all slots), best victims first."""
        ...

    def rank(self, last_access_us: int, hits: int) -> int:
        """Eviction order for persistent tiers, which keep blocks sorted by it: lowest goes first."""
        ...


class LRU:
    """Least recently used; within one batch, later blocks of a chain count as older.

    Chain order is parent-first, so stamping it in reverse makes the leaves of a
    prefix go before the shared blocks they hang from.
    """

    name = "lru"

    def __init__(self) -> None:
        self.stamp = np.zeros(0, np.int64)
        self.tick = 1

    def bind(self, num_slots: int) -> None:
        self.stamp = np.zeros(num_slots, np.int64)

    def _touch(self, slots: np.ndarray) -> None:
        n = slots.size
        self.stamp[slots[::-1]] = np.arange(self.tick, self.tick + n)
        self.tick += n

    on_insert = _touch
    on_access = _touch

    def on_remove(self, slots: np.ndarray) -> None:
        self.stamp[slots] = 0

    def rank(self, last_access_us: int, hits: int) -> int:
        return last_access_us

    def victims(self, evictable: np.ndarray, n: int) -> np.ndarray:
        cand = np.flatnonzero(evictable)
        if n <= 0 or cand.size == 0:
            return cand[:0]
        if n < cand.size:
            cand = cand[np.argpartition(self.stamp[cand], n - 1)[:n]]
        return cand[np.argsort(self.stamp[cand], kind="stable")]


POLICIES: dict[str, Callable[..., EvictionPolicy]] = {"lru": LRU}


def make_policy(spec: str | EvictionPolicy | None, **kwargs: Any) -> EvictionPolicy:
    if spec is None:
        return LRU()
    if not isinstance(spec, str):
        return spec
    try:
        factory = POLICIES[spec]
    except KeyError:
        raise ConfigError(f"unknown eviction policy {spec!r}; known: {sorted(POLICIES)}") from None
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad options for policy {spec!r}: {e}") from None
