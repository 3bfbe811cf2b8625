"""Many peers as one tier: :class:`PeerPool` places each key on one member by rendezvous hashing."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import xxhash

from kvbm_fs.errors import (
    ConfigError,
    PinnedError,
)
from kvbm_fs.events import EventBus
from kvbm_fs.keys import BlockKeys, Namespace
from kvbm_fs.tier import Medium, Tier
from kvbm_fs.tiers.peer.client import PeerTier
from kvbm_fs.tiers.peer.wire import (
    PeerUnavailableError,
    _parse_address,
)


class PeerPool(Tier):
    """Several peers as one tier (``peer://h1:7000,h2:7000,...``): a pool of machines' DRAM.

    Each block lives on the peer that rendezvous hashing picks for its key, so the pool holds the
    sum of the peers' capacities, a chain's blocks spread over all of them (a batch moves from every
    peer at once, one thread each), and adding or removing a peer moves only that peer's share of
    keys.  A dead peer's share is misses and dropped puts while the rest serve on; its breaker probes
    it back.  Every operation is the members' own, so verification and leases are unchanged."""

    medium = Medium.PEER
    persistent = False
    shareable = True

    def __init__(self, addresses: list[str], block_nbytes: int, *, name: str = "peer", **opts: Any) -> None:
        addrs = [_parse_address(a) for a in addresses]
        if len(set(addrs)) != len(addrs) or not addrs:
            raise ConfigError(f"peer pool: addresses must be distinct HOST:PORTs, got {addresses!r}")
        self.name, self.block_nbytes, self.block_size = name, int(block_nbytes), opts.get("block_size")
        self.events = opts.pop("events", None) or EventBus()
        self.members: list[PeerTier] = []
        try:
            for a in addresses:
                self.members.append(PeerTier(a, block_nbytes, name=name, events=self.events, lazy=True, **opts))
        except BaseException:
            self.close()
            raise
        if not any(m._sock is not None for m in self.members):
            self.close()
            raise PeerUnavailableError(f"peer pool {name!r}: none of {len(addrs)} peers can be reached")
        self._seeds = np.array([xxhash.xxh64_intdigest(f"{h}:{p}".encode()) for h, p in addrs], np.uint64)
        self._threads = ThreadPoolExecutor(len(self.members), thread_name_prefix=f"kvbm-{name}")

    def shard(self, keys: BlockKeys) -> np.ndarray:
        """The member each key lives on: the highest mix(hash ^ member seed) (rendezvous hashing)."""
        return rendezvous(keys.hashes, self._seeds)

    def _each(
        self, keys: BlockKeys, fn: Callable[[PeerTier, BlockKeys, np.ndarray], Any]
    ) -> list[tuple[np.ndarray, Any]]:
        owner = self.shard(keys) if len(keys) else np.zeros(0, np.int64)
        parts = [(m, np.flatnonzero(owner == i)) for i, m in enumerate(self.members)]
        parts = [(m, idx) for m, idx in parts if idx.size]
        if len(parts) == 1:
            m, idx = parts[0]
            return [(idx, fn(m, keys[idx], idx))]
        futs = [(idx, self._threads.submit(fn, m, keys[idx], idx)) for m, idx in parts]
        return [(idx, f.result()) for idx, f in futs]

    def _mask(self, keys: BlockKeys, fn: Callable[[PeerTier, BlockKeys, np.ndarray], np.ndarray]) -> np.ndarray:
        out = np.zeros(len(keys), bool)
        for idx, res in self._each(keys, fn):
            out[idx] = res
        return out

    def get(self, keys: BlockKeys, out: Any) -> np.ndarray:
        self._check_rows(keys, out, "get")
        return self._mask(keys, lambda m, k, idx: m.get_rows(k, out, idx))

    def put(self, keys: BlockKeys, data: Any) -> np.ndarray:
        self._check_rows(keys, data, "put")
        return self._mask(keys, lambda m, k, idx: m.put_rows(k, data, idx))

    def contains(self, keys: BlockKeys) -> np.ndarray:
        return self._mask(keys, lambda m, k, idx: m.contains(k))

    def pinned(self, keys: BlockKeys) -> np.ndarray:
        return self._mask(keys, lambda m, k, idx: m.pinned(k))

    def pin(self, keys: BlockKeys) -> np.ndarray:
        return self._mask(keys, lambda m, k, idx: m.pin(k))

    def unpin(self, keys: BlockKeys) -> None:
        self._each(keys, lambda m, k, idx: m.unpin(k))

    def delete(self, keys: BlockKeys) -> np.ndarray:
        if self.pinned(keys).any():  # refuse before any member deletes anything
            raise PinnedError(f"{self.name}: delete of pinned blocks")
        return self._mask(keys, lambda m, k, idx: m.delete(k))

    def prefix_len(self, keys: BlockKeys) -> int:
        miss = np.flatnonzero(~self.contains(keys))
        return int(miss[0]) if miss.size else len(keys)

    def iter_keys(self) -> Iterator[BlockKeys]:
        return itertools.chain.from_iterable(m.iter_keys() for m in self.members)

    def bind_namespace(self, ns: Namespace) -> None:
        super().bind_namespace(ns)
        for m in self.members:
            m.bind_namespace(ns)

    @property
    def capacity_bytes(self) -> int:
        return sum(m.capacity_bytes for m in self.members)

    @property
    def used_bytes(self) -> int:
        return sum(m.used_bytes for m in self.members)

    def __len__(self) -> int:
        return sum(len(m) for m in self.members)

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s["members"] = [m.stats() for m in self.members]
        return s

    def close(self) -> None:
        for m in self.members:
            m.close()
        if hasattr(self, "_threads"):
            self._threads.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"PeerPool({[m.url for m in self.members]!r}, name={self.name!r})"


def rendezvous(hashes: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Index of the seed with the highest mix(mix(hash) ^ seed) per hash (highest random weight)."""
    return np.argmax(_mix64(_mix64(hashes)[:, None] ^ seeds[None, :]), axis=1)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
