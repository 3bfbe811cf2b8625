"""Frequency order with a long memory (``wlfu``), and the default policy ``auto``: parc's order or
wlfu's, whichever of two shadow caches hits more on the same references.

No single order wins every workload: reuse by recency (new chat sessions, agent turns) wants parc,
reuse by popularity (documents, system prompts) wants counts that remember about twenty caches back
(docs/architecture.md 1.12).  ``auto`` keeps both policies' books on the real pool, runs each again
in a shadow pool that holds keys only (a :class:`~kvbm_fs.lifecycle.SlotPool` without bytes, of at
most ``shadow_slots`` slots, fed a hash-sampled share of the references when the tier is larger, as
miniature simulations do), and evicts by the order whose shadow hits more, once that is significant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError
from .keys import BlockKeys
from .policy import PARC, CountMinSketch, PrefixLRU, PrefixTree, _smallest, _take, block_keys

if TYPE_CHECKING:
    from .lifecycle import SlotPool

_SAMPLE_MIX = np.uint64(0xD6E8FEB86659FD93)


def _number(policy: str, name: str, v: object, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ConfigError(f"policy {policy!r}: {name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


class WindowLFU(PrefixLRU):
    """LFU over TinyLFU's counts: references in a count-min sketch ``width`` x the capacity wide, halved
    every ``window`` x capacity references; least counted first, then least recent, leaf-first.

    A resident block's count is read when it is used and halved with the sketch since (so a block
    popular long ago ages like one in the sketch).  Unlike ``lfu`` (GDSF aging) a newcomer starts
    from what the sketch remembers of it, so a document asked for again after ten caches of other
    traffic comes back ahead of blocks seen once.  ``rank`` (persistent tiers) is LRU's.
    """

    name = "wlfu"
    uses_parents = True

    def __init__(self, window: float = 20.0, width: float = 8.0, age: bool = True) -> None:
        super().__init__()
        self.age = bool(age)
        self.window = _number(self.name, "window", window, 1, 1e4)
        self.width = _number(self.name, "width", width, 1, 64)
        self.pool: SlotPool | None = None
        self.sketch = CountMinSketch(16, 16)
        self.count = np.zeros(0, np.uint8)
        self.epoch = np.zeros(0, np.int32)  # sketch halvings when the count was read

    def attach(self, pool: SlotPool) -> None:
        self.pool = pool

    def bind(self, num_slots: int) -> None:
        super().bind(num_slots)
        n = max(1, num_slots)
        self.sketch = CountMinSketch(int(self.width * n), int(self.window * n))
        self.count = np.zeros(num_slots, np.uint8)
        self.epoch = np.zeros(num_slots, np.int32)

    def _count(self, slots: np.ndarray) -> None:
        keys = block_keys(self.pool, slots)
        if keys.size:
            self.sketch.add(0, keys)
            self.count[slots] = np.minimum(self.sketch.estimate(0, keys), 255)
            self.epoch[slots] = self.sketch.resets

    def on_insert(self, slots: np.ndarray, parents: np.ndarray | None = None) -> None:
        self._count(slots)
        super().on_insert(slots, parents)

    def on_access(self, slots: np.ndarray) -> None:
        self._count(slots)
        super().on_access(slots)

    def victims(self, evictable: np.ndarray, n: int) -> np.ndarray:
        cand = np.flatnonzero(evictable)
        if n <= 0 or cand.size == 0:
            return cand[:0]
        aged = self.count[cand].astype(np.int64)
        if self.age:
            aged >>= np.minimum(self.sketch.resets - self.epoch[cand], 8)
        keys = (aged << 55) + self.stamp[cand]  # count first, then recency (stamps stay far below 2**55)
        return _take(self.tree, lambda m: cand[_smallest(keys, m)], cand.size, min(n, cand.size))


class _Shadow:
    """A policy replayed on keys alone: a bytes-free slot pool fed the sampled references."""

    def __init__(self, policy: PARC | WindowLFU, slots: int) -> None:
        from .lifecycle import SlotPool  # lifecycle imports the policy registry

        self.pool = SlotPool(slots, name="shadow", policy=policy)

    def refer(self, keys: BlockKeys) -> int:
        """One use of each key (chain order): hits are used, misses stored. Returns the hits."""
        pool = self.pool
        slots = pool.acquire(keys)
        hit = slots >= 0
        miss = np.flatnonzero(~hit)
        if miss.size:
            room = min(miss.size, pool.num_free + pool.num_evictable)
            new = pool.allocate(room) if room else None
            if new is not None:
                pool.complete(new)
                pool.release(pool.register(new, keys[miss[:room]]))
        pool.release(slots[hit])
        return int(np.count_nonzero(hit))


class Adaptive:
    """``auto``: evict by parc's order or wlfu's, whichever shadow has hit more, significantly.

    Each batch of references (a load's hits, a put's new blocks) goes to both shadows; ``d`` is
    wlfu's hits minus parc's.  The policy moves to the other order once the sum of ``d`` leads by
    ``z`` x ``sqrt(sum(d**2))``: a paired test that takes a batch, not a block, as the observation,
    since a chain's blocks hit or miss together.  The sums halve every ``memory`` x shadow capacity
    sampled references, so a long-running tier follows its workload.

    It starts in wlfu's order: a recency workload shows parc's lead within a few capacities of
    references (chats that wlfu keeps after they end), while counts need many capacities to pay
    off, so starting in parc's order kept short traces of document QA from ever reaching wlfu.
    """

    name = "auto"
    uses_parents = True

    def __init__(
        self,
        shadow_slots: int = 65536,
        z: float = 1.5,
        memory: float = 100.0,
        window: float = 20.0,
        width: float = 8.0,
        age: bool = True,
        start: str = "wlfu",
        boost_s: float = 0.0,
    ) -> None:
        self.shadow_slots = int(_number(self.name, "shadow_slots", shadow_slots, 64, 1 << 30))
        self.z = _number(self.name, "z", z, 0, 100)
        self.memory = _number(self.name, "memory", memory, 0, 1e9)
        self.wlfu: dict[str, Any] = {"window": window, "width": width, "age": age}
        self.orders: tuple[PARC, WindowLFU] = (PARC(boost_s=boost_s), WindowLFU(**self.wlfu))
        self.names = ("parc", "wlfu")
        if start not in self.names:
            raise ConfigError(f"policy 'auto': start must be one of {self.names}, got {start!r}")
        self.start = self.names.index(start)
        self.choice = self.start
        self.switches = 0
        self.pool: SlotPool | None = None
        self.shadows: list[_Shadow] = []
        self.sums = np.zeros(3)  # sum d, sum d**2, batches with d != 0 (d: wlfu's hits - parc's)
        self.sampled = 0  # references fed to the shadows
        self.since = 0  # ... since the sums last halved
        self.threshold = np.uint64(0)

    @property
    def tree(self) -> PrefixTree:
        """The prefix links (both orders keep the same)."""
        return self.orders[0].tree

    @property
    def order(self) -> str:
        """The order evicting now."""
        return self.names[self.choice]

    def attach(self, pool: SlotPool) -> None:
        self.pool = pool
        for o in self.orders:
            o.attach(pool)

    def bind(self, num_slots: int) -> None:
        for o in self.orders:
            o.bind(num_slots)
        rate = min(1.0, self.shadow_slots / max(num_slots, 1))
        size = max(16, round(num_slots * rate))
        self.threshold = np.uint64(min(int(rate * 2.0**64), 2**64 - 1))
        self.full_rate = rate >= 1.0
        self.shadows = [_Shadow(PARC(), size), _Shadow(WindowLFU(**self.wlfu), size)]
        self.shadow_size = size
        self.sums[:] = 0
        self.sampled = self.since = 0
        self.choice = self.start

    def _observe(self, slots: np.ndarray) -> None:
        pool = self.pool
        if pool is None or slots.size == 0 or not self.shadows:
            return
        if not self.full_rate:
            with np.errstate(over="ignore"):
                mixed = block_keys(pool, slots) * _SAMPLE_MIX
            slots = slots[(mixed ^ (mixed >> np.uint64(29))) < self.threshold]
            if slots.size == 0:
                return
        ns = pool.slot_ns[slots]
        one = bool(np.all(ns == ns[0]))
        for n, sel in [(ns[0], slots)] if one else [(n, slots[ns == n]) for n in np.unique(ns)]:
            keys = BlockKeys(int(n), pool.slot_hash[sel], pool.slot_parent[sel])
            d = self.shadows[1].refer(keys) - self.shadows[0].refer(keys)
            self.sums += (d, d * d, d != 0)
            self.sampled += sel.size
            self.since += sel.size
        self._decide()

    def _decide(self) -> None:
        s, q, _ = self.sums
        lead = s if self.choice == 0 else -s  # evidence for the order not in use
        if lead > self.z * np.sqrt(q):
            self.choice = 1 - self.choice
            self.switches += 1
        if self.memory and self.since >= self.memory * self.shadow_size:
            self.since = 0
            self.sums /= 2

    def on_insert(self, slots: np.ndarray, parents: np.ndarray | None = None) -> None:
        for o in self.orders:
            o.on_insert(slots, parents)
        self._observe(slots)

    def on_access(self, slots: np.ndarray) -> None:
        for o in self.orders:
            o.on_access(slots)
        self._observe(slots)

    def on_remove(self, slots: np.ndarray) -> None:
        for o in self.orders:
            o.on_remove(slots)

    def victims(self, evictable: np.ndarray, n: int) -> np.ndarray:
        return self.orders[self.choice].victims(evictable, n)

    def rank(self, last_access_us: int, hits: int) -> int:
        return self.orders[0].rank(last_access_us, hits)
