"""Placement policies: eviction (which resident block leaves) and admission (whether a new one enters).

Both are small plain objects, kept apart from storage and chosen by name (:func:`make_policy`):

* an **eviction policy** sees only slot ids (numpy arrays) and a mask of the slots it may evict;
  the pool decides what is evictable (registered, unpinned) and applies the result, all of it
  or none (:meth:`SlotPool.evict`).  Persistent tiers, which keep their blocks sorted on disk,
  ask it only for :meth:`EvictionPolicy.rank`.
* an **admission policy** sees the keys offered to a tier and answers which of them are worth
  storing at all; a refused block is not stored there (the store spills it to the next tier).

A policy spec is ``"EVICTION[+ADMISSION]"``, each part ``name`` or ``name:option=value,...``,
for example ``"lru"``, ``"auto"``, ``"lru+tinylfu"`` or ``"prefix-lru+count2:min_count=3"``.

Eviction policies
    ``lru``         least recently used (the baseline).
    ``prefix-lru``  LRU that never evicts a block before its cached descendants: a block is worth
                    at least as much as the blocks that hang from it, so leaves go first and shared
                    system-prompt blocks stay as long as anything below them does.
    ``parc``        prefix-aware adaptive replacement.  ARC's two lists (blocks seen once, blocks
                    seen again) with a self-tuning split and ghost lists of recently evicted keys,
                    plus the leaf-first rule of ``prefix-lru``.  See :class:`PARC`.
    ``lfu``         LFU with dynamic aging (GDSF-style: priority = clock + frequency, the clock
                    rising to each evicted block's priority), leaf-first.  See :class:`LFUAging`.
    ``wlfu``        LFU over TinyLFU's windowed counts (a count-min sketch halved every 20
                    capacities of references), leaf-first.  See :class:`kvbm_fs.adaptive.WindowLFU`.
    ``auto``        the default: ``parc``'s order or ``wlfu``'s, whichever of two key-only shadow
                    pools hits more on the same references.  See :class:`kvbm_fs.adaptive.Adaptive`.

Admission policies
    ``tinylfu``     TinyLFU: a count-min sketch of recent accesses (halved every ``sample`` x
                    capacity accesses); a new block enters only if it is more frequent than the
                    block it would evict.
    ``count2``      Dynamo KVBM's filter: a block enters once it has been seen ``min_count`` (2)
                    times within the sketch's decaying window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .errors import ConfigError
from .ghost import GhostLists

if TYPE_CHECKING:
    from .keys import BlockKeys
    from .lifecycle import SlotPool

DEFAULT_POLICY = "auto"


# ---- protocols ----------------------------------------------------------------------------------
class EvictionPolicy(Protocol):
    name: str

    def bind(self, num_slots: int) -> None: ...
    def on_insert(self, slots: np.ndarray, parents: np.ndarray | None = None) -> None:
        """Blocks newly registered in ``slots`` (chain order). ``parents[i]`` is the slot of block i's
        parent in the same pool, or -1 (given only to policies with ``uses_parents = True``)."""
        ...

    def on_access(self, slots: np.ndarray) -> None: ...
    def on_remove(self, slots: np.ndarray) -> None: ...
    def victims(self, evictable: np.ndarray, n: int) -> np.ndarray:
        """Up to ``n`` slot ids among ``evictable`` (a bool mask over all slots), best victims first.
        Must not change any state: the pool may ask without evicting (``coldest``)."""
        ...

    def rank(self, last_access_us: int, hits: int) -> int:
        """Eviction order for persistent tiers, which keep blocks sorted by it: lowest goes first.
        Must be a non-negative integer below 2**63."""
        ...


@runtime_checkable
class AdmissionPolicy(Protocol):
    name: str
    needs_victims: bool  # admit() wants the keys the admitted blocks would displace

    def bind(self, capacity_blocks: int) -> None: ...
    def record(self, keys: BlockKeys) -> None:
        """One access to each key (a load, or an offer to store it)."""
        ...

    def admit(self, keys: BlockKeys, free: int, victims: list[BlockKeys]) -> np.ndarray:
        """Mask of ``keys`` (new to the tier, chain order) worth storing. The first ``free`` take free
        slots; the rest would displace ``victims`` (coldest first), when ``needs_victims``."""
        ...


# ---- prefix tree over slots ---------------------------------------------------------------------
class PrefixTree:
    """Parent links between the slots of one pool, so that a policy can keep prefixes whole.

    ``parent[s]`` is the slot of the block that ``s``'s block hangs from (-1: none in this
    pool) and ``nchild[s]`` how many registered blocks hang from ``s``.  A block registered
    before its parent stays a root here (it is rare: chains are stored parent first).
    """

    def __init__(self) -> None:
        self.parent = np.zeros(0, np.int64)
        self.nchild = np.zeros(0, np.int32)

    def bind(self, num_slots: int) -> None:
        self.parent = np.full(num_slots, -1, np.int64)
        self.nchild = np.zeros(num_slots, np.int32)

    def link(self, slots: np.ndarray, parents: np.ndarray | None) -> None:
        if parents is None:
            self.parent[slots] = -1
            return
        p = np.where(parents == slots, -1, parents)
        self.parent[slots] = p
        has = p[p >= 0]
        if has.size:
            np.add.at(self.nchild, has, 1)

    def unlink(self, slots: np.ndarray) -> None:
        p = self.parent[slots]
        has = p[p >= 0]
        if has.size:
            np.subtract.at(self.nchild, has, 1)
        self.parent[slots] = -1
        orphaning = slots[self.nchild[slots] > 0]
        if orphaning.size:  # their children stay, now as roots (their slots will be reused)
            kids = np.flatnonzero(np.isin(self.parent, orphaning))
            self.parent[kids] = -1
        self.nchild[slots] = 0

    def leaf_first(self, order: np.ndarray, n: int, complete: bool) -> tuple[list[int], list[int]]:
        """Take ``n`` slots from ``order`` (best victims first) without taking a block while a block
        below it stays: a block with children is deferred until its last child is taken (then it
        follows at once, as if it ranked with its best descendant). Returns (taken, deferred).
        ``complete``: ``order`` holds every candidate, so a short result is final."""
        parent, nchild = self.parent, self.nchild
        if n <= 0:
            return [], []
        head = order[:n]
        if not bool(np.any(nchild[head])):  # common case: all leaves
            return head.tolist(), []
        taken: list[int] = []
        left: dict[int, int] = {}
        deferred: dict[int, None] = {}
        for s in order.tolist():
            if left.get(s, int(nchild[s])) > 0:
                deferred[s] = None
                continue
            taken.append(s)
            while len(taken) < n:
                p = int(parent[s])
                if p < 0:
                    break
                left[p] = left.get(p, int(nchild[p])) - 1
                if left[p] > 0 or p not in deferred:
                    break
                del deferred[p]
                taken.append(p)
                s = p
            if len(taken) >= n:
                break
        return taken[:n], list(deferred) if complete else []


def _take(tree: PrefixTree, order_fn: Callable[[int], np.ndarray], total: int, n: int) -> np.ndarray:
    """Leaf-first selection over a victim order computed lazily for the first ``m`` candidates:
    widen ``m`` until ``n`` are taken or every candidate was seen; last resort, deferred blocks
    whose children are pinned (so that a pool with room to give always gives it)."""
    m = min(total, max(2 * n, n + 64))
    while True:
        order = order_fn(m)
        complete = m >= total
        taken, deferred = tree.leaf_first(order, n, complete)
        if len(taken) >= n or complete:
            if len(taken) < n:
                taken += deferred[: n - len(taken)]
            return np.asarray(taken, np.int64)
        m = min(total, 4 * m)


def block_keys(pool: SlotPool | None, slots: np.ndarray) -> np.ndarray:
    """One 64-bit key per block of ``pool`` (namespace mixed into the hash), for policies that
    remember blocks after they leave; a collision (2**-64 a pair) only misreports one block's past."""
    if pool is None:
        return np.zeros(0, np.uint64)
    with np.errstate(over="ignore"):
        return pool.slot_hash[slots] ^ (pool.slot_ns[slots] * np.uint64(0x9E3779B97F4A7C15))


def _smallest(keys: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` smallest ``keys``, sorted (stable)."""
    if m < keys.size:
        idx = np.argpartition(keys, m - 1)[:m]
        return idx[np.argsort(keys[idx], kind="stable")]
    return np.argsort(keys, kind="stable")


# ---- eviction policies --------------------------------------------------------------------------
class LRU:
    """Least recently used; within one batch, later blocks of a chain count as older.

    Chain order is parent-first, so stamping it in reverse makes the leaves of a
    prefix go before the shared blocks they hang from.
    """

    name = "lru"
    uses_parents = False

    def __init__(self) -> None:
        self.stamp = np.zeros(0, np.int64)
        self.tick = 1

    def bind(self, num_slots: int) -> None:
        self.stamp = np.zeros(num_slots, np.int64)

    def _touch(self, slots: np.ndarray) -> None:
        n = slots.size
        self.stamp[slots[::-1]] = np.arange(self.tick, self.tick + n)
        self.tick += n

    def on_insert(self, slots: np.ndarray, parents: np.ndarray | None = None) -> None:
        self._touch(slots)

    def on_access(self, slots: np.ndarray) -> None:
        self._touch(slots)

    def on_remove(self, slots: np.ndarray) -> None:
        self.stamp[slots] = 0

    def rank(self, last_access_us: int, hits: int) -> int:
        return last_access_us

    def victims(self, evictable: np.ndarray, n: int) -> np.ndarray:
        cand = np.flatnonzero(evictable)
        if n <= 0 or cand.size == 0:
            return cand[:0]
        return cand[_smallest(self.stamp[cand], min(n, cand.size))]


class PrefixLRU(LRU):
    """LRU over whole prefixes: a block is never evicted while a block below it stays.

    Recency decides among leaves; a block with cached children is deferred until the last of
    them goes and then follows at once, which is LRU with each block ranked by the most
    recent use of anything in its subtree.  So a shared system prompt lives as long as any
    conversation hanging from it, and a chain is trimmed from its end, keeping what is left
    matchable.  (The store puts a request's new blocks after it loads the matched prefix, so
    plain LRU sees the prefix as *older* than its new suffix and would evict it first.)
    """

    name = "prefix-lru"
    uses_parents = True

    def __init__(self) -> None:
        super().__init__()
        self.tree = PrefixTree()

    def bind(self, num_slots: int) -> None:
        super().bind(num_slots)
        self.tree.bind(num_slots)

    def on_insert(self, slots: np.ndarray, parents: np.ndarray | None = None) -> None:
        self.tree.link(slots, parents)
        self._touch(slots)

    def on_remove(self, slots: np.ndarray) -> None:
        self.tree.unlink(slots)
        super().on_remove(slots)

    def victims(self, evictable: np.ndarray, n: int) -> np.ndarray:
        cand = np.flatnonzero(evictable)
        if n <= 0 or cand.size == 0:
            return cand[:0]
        keys = self.stamp[cand]
        return _take(self.tree, lambda m: cand[_smallest(keys, m)], cand.size, min(n, cand.size))


class PARC(PrefixLRU):
    """Prefix-aware adaptive replacement: ARC's recency/frequency balance with whole-prefix eviction.

    Mechanism (Megiddo & Modha's ARC, over slots):

    * resident blocks are in ``T1`` (seen once since they entered) or ``T2`` (seen again);
      a hit moves a block to ``T2``.  Each list is in LRU order.
    * keys evicted recently are remembered, without data, in ghost lists ``B1`` (evicted
      from ``T1``) and ``B2`` (from ``T2``), together at most ``ghost`` times as many as the
      tier has slots (default 2; ARC's is 1).  KV reuse distances run past the capacity: with
      one cache's worth of history a chat session's next turn often came back after its keys
      were forgotten, and parc trailed LRU on multi-turn chat (``bench_policies.json``).  They
      live in numpy arrays (:class:`~kvbm_fs.ghost.GhostLists`), not a Python object per key.
    * a target size ``p`` for ``T1`` tunes itself: a block that comes back while in ``B1``
      means recency was short-changed (``p`` grows), but only if fewer than ``c - p`` blocks
      left T1 after it (ARC's ``|T1| + |B1| <= c``, which longer ghosts would break); one that
      comes back from ``B2`` means frequency was (``p`` shrinks).  Either way it re-enters in ``T2``.
    * ``T2`` holds at most ``c - p`` blocks: its least recent ones are demoted to ``T1`` with their
      recency (LIRS's demotion of LIR blocks) and go to ``B2`` if evicted from there.
    * victims come from ``T1`` (new and demoted blocks) before ``T2``, each LRU first; and, as in
      :class:`PrefixLRU`, a block is never taken before its cached descendants.  The ghosts forget
      their oldest entry first, whichever list it is in.

    Why it fits a KV cache: one-off prompts (a scan of new documents) pass through ``T1``
    without displacing the reused working set in ``T2``, while a workload of short-lived
    conversations shifts the space to recency on its own; no constant depends on the
    workload (the ghost length and the adaptation step are relative to capacity).  The
    demotion and the depth rule made multi-turn chat 4% better on average over
    five seeds of the generator, at no cost elsewhere (docs/architecture.md 1.12).
    The whole-prefix rule keeps what remains cached matchable, because a hit is a prefix.

    ``rank`` (disk and remote tiers, which only know last access and hit count) is the last
    access, as LRU, unless ``boost_s`` is set: then blocks hit at least once rank ``boost_s``
    seconds later, so a block seen twice outlives a block seen once by that long (the disk
    analogue of ``T2`` over ``T1``).  It is off by default because the right length is a
    property of the deployment's request rate, which the policy cannot see.
    """

    name = "parc"
    uses_parents = True

    def __init__(self, boost_s: float = 0.0, ghost: float = 2.0) -> None:
        super().__init__()
        if not (isinstance(boost_s, (int, float)) and 0 <= boost_s < 1e9):
            raise ConfigError(f"policy 'parc': boost_s must be a number of seconds >= 0, got {boost_s!r}")
        if not (isinstance(ghost, (int, float)) and 0 < ghost <= 64):
            raise ConfigError(f"policy 'parc': ghost must be a multiple of the capacity in (0, 64], got {ghost!r}")
        self.boost_us = int(boost_s * 1e6)
        self.ghost = float(ghost)
        self.pool: SlotPool | None = None
        self.in_t2 = np.zeros(0, bool)
        self.was_t2 = np.zeros(0, bool)  # in T2 at some point since it entered: B2 when evicted
        self.n_t2 = 0
        self.p = 0.0
        self.c = 0
        self.evicted = [0, 0]  # keys sent to B1 / B2 so far: a ghost's depth is how many followed it
        self.ghosts = GhostLists()  # B1 (list 0) and B2 (list 1) of keys (_keys)

    @property
    def b1(self) -> list[int]:
        """Ghost list B1 (evicted from T1): its keys, oldest first (a copy)."""
        return self.ghosts.keys_of(0)

    @property
    def b2(self) -> list[int]:
        """Ghost list B2 (evicted from T2), as :attr:`b1`."""
        return self.ghosts.keys_of(1)

    def attach(self, pool: SlotPool) -> None:
        """The pool this policy serves: its ``slot_ns``/``slot_hash`` name the blocks for the ghost lists."""
        self.pool = pool

    def bind(self, num_slots: int) -> None:
        super().bind(num_slots)
        self.in_t2 = np.zeros(num_slots, bool)
        self.was_t2 = np.zeros(num_slots, bool)
        self.n_t2 = 0
        self.c = num_slots
        self.p = 0.0
        self.evicted = [0, 0]
        self.ghosts.resize(int(self.ghost * num_slots))

    def _keys(self, slots: np.ndarray) -> np.ndarray:
        return block_keys(self.pool, slots)

    def on_insert(self, slots: np.ndarray, parents: np.ndarray | None = None) -> None:
        self.tree.link(slots, parents)
        t2 = np.zeros(slots.size, bool)
        keys = self._keys(slots)
        if keys.size and len(self.ghosts):
            lst, pos = self.ghosts.find(keys)
            hit = np.flatnonzero(lst >= 0)
            if hit.size:
                self._adapt(lst[hit], self.ghosts.seq[pos[hit]])
                self.ghosts.pop(pos[hit])
                t2[hit] = True
        self.in_t2[slots] = t2
        self.was_t2[slots] = t2
        self.n_t2 += int(np.count_nonzero(t2))
        self._touch(slots)
        self._demote()

    def _adapt(self, lst: np.ndarray, seq: np.ndarray) -> None:
        """ARC's adaptation, one returning key at a time. A key found in B1 grows ``p`` only if fewer
        than ``c - p`` blocks left T1 after it: with ghosts longer than ARC's one cache, a deeper
        return is one no T1 of any allowed size would have kept, so it says nothing about ``p``."""
        n1, n2 = self.ghosts.n
        up, down = max(n2 / max(n1, 1), 1.0), max(n1 / max(n2, 1), 1.0)
        depth = (np.asarray(self.evicted, np.int64)[lst] - seq.astype(np.int64)) % (1 << 32)  # seq wraps
        for li, d in zip(lst.tolist(), depth.tolist()):
            if li == 0:  # came back soon after leaving T1: give recency more room
                if d <= self.c - self.p:
                    self.p = min(float(self.c), self.p + up)
            else:  # came back after leaving T2: give frequency more room
                self.p = max(0.0, self.p - down)

    def _demote(self) -> None:
        """Keep T2 within ``c - p``: its least recent blocks move to T1 with their recency (LIRS's
        demotion of LIR blocks), to be evicted in recency order with T1's and to B2 if they are."""
        excess = self.n_t2 - max(1, self.c - int(self.p))
        if excess > 0:
            t2 = np.flatnonzero(self.in_t2)
            self.in_t2[t2[_smallest(self.stamp[t2], excess)]] = False
            self.n_t2 -= excess

    def on_access(self, slots: np.ndarray) -> None:
        self.n_t2 += int(np.count_nonzero(~self.in_t2[slots]))
        self.in_t2[slots] = True
        self.was_t2[slots] = True
        self._touch(slots)
        self._demote()

    def on_remove(self, slots: np.ndarray) -> None:
        keys = self._keys(slots)
        if keys.size:
            lst = self.was_t2[slots].astype(np.int8)
            seq = np.zeros(slots.size, np.int64)
            for i in (0, 1):
                mine = lst == i
                k = int(np.count_nonzero(mine))
                seq[mine] = (self.evicted[i] + np.arange(k)) % (1 << 32)
                self.evicted[i] += k
            self.ghosts.push(keys, lst, seq)
            self.ghosts.trim(int(self.ghost * self.c))  # `ghost` caches' worth of the latest keys
        self.n_t2 -= int(np.count_nonzero(self.in_t2[slots]))
        self.in_t2[slots] = False
        self.was_t2[slots] = False
        super().on_remove(slots)

    def rank(self, last_access_us: int, hits: int) -> int:
        return last_access_us + (self.boost_us if hits > 0 else 0)

    def victims(self, evictable: np.ndarray, n: int) -> np.ndarray:
        cand = np.flatnonzero(evictable)
        if n <= 0 or cand.size == 0:
            return cand[:0]
        n = min(n, cand.size)
        t2 = self.in_t2[cand]
        stamp = self.stamp[cand]
        i1, i2 = np.flatnonzero(~t2), np.flatnonzero(t2)

        def order(m: int) -> np.ndarray:  # T1 (with T2's demoted blocks), then T2; each by recency
            o1 = i1[_smallest(stamp[i1], min(m, i1.size))]
            o2 = i2[_smallest(stamp[i2], min(m, i2.size))]
            return cand[np.concatenate((o1, o2))][:m]

        return _take(self.tree, order, cand.size, n)


class LFUAging(PrefixLRU):
    """LFU with dynamic aging (GDSF with unit size and cost), with whole-prefix eviction.

    Each resident block has a priority ``clock + frequency`` (frequency counts its accesses since
    it entered); the lowest goes first, ties least recently used first, and never before its cached
    descendants (as :class:`PrefixLRU`).  The clock rises to each evicted block's priority, so a
    block must keep being used to stay ahead of newcomers: old counts age out without any window
    or halving constant.  Per slot: a frequency, a priority and the LRU stamp (arrays, no objects).

    ``rank`` (disk and remote tiers) is the last access plus ``boost_s`` seconds per hit (off by
    default, as ``parc``'s: the right length depends on the request rate).
    """

    name = "lfu"
    uses_parents = True

    def __init__(self, boost_s: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(boost_s, (int, float)) and 0 <= boost_s < 1e9):
            raise ConfigError(f"policy 'lfu': boost_s must be a number of seconds >= 0, got {boost_s!r}")
        self.boost_us = int(boost_s * 1e6)
        self.freq = np.zeros(0, np.int64)
        self.prio = np.zeros(0, np.int64)
        self.clock = 0

    def bind(self, num_slots: int) -> None:
        super().bind(num_slots)
        self.freq = np.zeros(num_slots, np.int64)
        self.prio = np.zeros(num_slots, np.int64)
        self.clock = 0

    def on_insert(self, slots: np.ndarray, parents: np.ndarray | None = None) -> None:
        super().on_insert(slots, parents)
        self.freq[slots] = 1
        self.prio[slots] = self.clock + 1

    def on_access(self, slots: np.ndarray) -> None:
        super().on_access(slots)
        np.add.at(self.freq, slots, 1)
        self.prio[slots] = self.clock + self.freq[slots]

    def on_remove(self, slots: np.ndarray) -> None:
        if slots.size:
            self.clock = max(self.clock, int(self.prio[slots].max()))
        self.freq[slots] = 0
        self.prio[slots] = 0
        super().on_remove(slots)

    def rank(self, last_access_us: int, hits: int) -> int:
        return last_access_us + self.boost_us * min(hits, 1000)

    def victims(self, evictable: np.ndarray, n: int) -> np.ndarray:
        cand = np.flatnonzero(evictable)
        if n <= 0 or cand.size == 0:
            return cand[:0]
        keys = self.prio[cand] + self.stamp[cand] / float(self.tick + 1)  # priority, then recency
        return _take(self.tree, lambda m: cand[_smallest(keys, m)], cand.size, min(n, cand.size))


# ---- admission policies -------------------------------------------------------------------------
class CountMinSketch:
    """Approximate access counts of 64-bit keys: ``depth`` rows of saturating uint8 counters.

    Every ``sample`` increments all counters are halved (TinyLFU's reset), so counts describe
    the recent past: a block popular an hour ago does not stay "frequent" forever.
    """

    _SEEDS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93], np.uint64)

    def __init__(self, width: int, sample: int, depth: int = 4) -> None:
        self.width = 1 << max(4, int(width - 1).bit_length())
        self.depth = depth
        self.shift = np.uint64(64 - (self.width.bit_length() - 1))
        self.table = np.zeros((depth, self.width), np.uint8)
        self.sample = max(1, int(sample))
        self.added = 0
        self.resets = 0

    def _rows(self, ns: int, hashes: np.ndarray) -> np.ndarray:
        x = hashes ^ np.uint64((ns * 0xFF51AFD7ED558CCD) & 0xFFFFFFFFFFFFFFFF)
        with np.errstate(over="ignore"):
            h = (x[None, :] * self._SEEDS[: self.depth, None]) >> self.shift
        return h.astype(np.int64)

    def add(self, ns: int, hashes: np.ndarray) -> None:
        if hashes.size == 0:
            return
        cols = self._rows(ns, hashes)
        for r in range(self.depth):  # (not a bincount: that allocates the whole width per call)
            idx, counts = np.unique(cols[r], return_counts=True)
            self.table[r, idx] = np.minimum(self.table[r, idx].astype(np.int64) + counts, 255)
        self.added += int(hashes.size)
        if self.added >= self.sample:
            self.table >>= 1
            self.added //= 2
            self.resets += 1

    def estimate(self, ns: int, hashes: np.ndarray) -> np.ndarray:
        if hashes.size == 0:
            return np.zeros(0, np.int64)
        cols = self._rows(ns, hashes)
        return self.table[np.arange(self.depth)[:, None], cols].min(axis=0).astype(np.int64)


def _check_positive(policy: str, **opts: float) -> None:
    for k, v in opts.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"admission policy {policy!r}: {k} must be a number > 0, got {v!r}")


def _prefix_closed(mask: np.ndarray) -> np.ndarray:
    """A chain is only useful up to its first gap: refuse everything after the first refusal."""
    return np.logical_and.accumulate(mask) if mask.size else mask


class _SketchAdmission:
    """Access counts in a count-min sketch as wide as the tier (in blocks), halving every ``sample`` x
    capacity accesses: what both frequency filters decide from."""

    name = "sketch"

    def __init__(self, sample: float = 10) -> None:
        _check_positive(self.name, sample=sample)
        self.sample = float(sample)
        self.sketch = CountMinSketch(16, 16)

    def bind(self, capacity_blocks: int) -> None:
        cap = max(1, capacity_blocks)
        self.sketch = CountMinSketch(cap, int(self.sample * cap))

    def record(self, keys: BlockKeys) -> None:
        self.sketch.add(keys.ns, keys.hashes)


class TinyLFU(_SketchAdmission):
    """TinyLFU admission (Einziger et al.): admit a new block only if it has been accessed more
    often, recently, than the block it would displace. Counts live in a count-min sketch as wide
    as the tier (in blocks) and halve every ``sample`` x capacity accesses."""

    name = "tinylfu"
    needs_victims = True

    def admit(self, keys: BlockKeys, free: int, victims: list[BlockKeys]) -> np.ndarray:
        n = len(keys)
        ok = np.ones(n, bool)
        if n <= free:
            return ok
        cand = self.sketch.estimate(keys.ns, keys.hashes[free:])
        vic = np.concatenate([self.sketch.estimate(v.ns, v.hashes) for v in victims] or [np.zeros(0, np.int64)])
        m = min(cand.size, vic.size)
        ok[free : free + m] = cand[:m] > vic[:m]
        ok[free + m :] = False  # nothing to displace: the tier is full of blocks it cannot evict
        return _prefix_closed(ok)


class CountN(_SketchAdmission):
    """Dynamo KVBM's frequency filter: a block is admitted once it has been seen ``min_count`` times
    (this offer included) within a decaying window (counts halve every ``sample`` x capacity accesses)."""

    name = "count2"
    needs_victims = False

    def __init__(self, min_count: int = 2, sample: float = 10) -> None:
        super().__init__(sample)
        if isinstance(min_count, bool) or not isinstance(min_count, int) or not 1 <= min_count <= 255:
            raise ConfigError(
                f"admission policy {self.name!r}: min_count must be an integer in [1, 255], got {min_count!r}"
            )
        self.min_count = min_count

    def admit(self, keys: BlockKeys, free: int, victims: list[BlockKeys]) -> np.ndarray:
        return _prefix_closed(self.sketch.estimate(keys.ns, keys.hashes) >= self.min_count)


# ---- registry -----------------------------------------------------------------------------------
def _adaptive(name: str) -> Callable[..., EvictionPolicy]:
    def make(**opts: Any) -> EvictionPolicy:
        from . import adaptive  # it builds on the classes above

        policy: EvictionPolicy = {"wlfu": adaptive.WindowLFU, "auto": adaptive.Adaptive}[name](**opts)
        return policy

    return make


POLICIES: dict[str, Callable[..., EvictionPolicy]] = {
    "lru": LRU,
    "prefix-lru": PrefixLRU,
    "parc": PARC,
    "lfu": LFUAging,
    "wlfu": _adaptive("wlfu"),
    "auto": _adaptive("auto"),
}
ADMISSIONS: dict[str, Callable[..., AdmissionPolicy]] = {"tinylfu": TinyLFU, "count2": CountN}
SHIPPED = (
    "lru",
    "prefix-lru",
    "lru+tinylfu",
    "lru+count2",
    "lfu",
    "parc",
    "wlfu",
    "auto",
)  # what replay compares by default


def _value(s: str) -> Any:
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    return s


def parse_part(part: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:key=value,key=value"`` -> (name, options)."""
    name, _, rest = part.strip().partition(":")
    opts: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise ConfigError(f"policy {name!r}: option {item!r} must look like key=value")
        opts[k.strip()] = _value(v.strip())
    return name.strip().lower(), opts


def _build(kind: str, table: dict[str, Callable[..., Any]], part: str, **kwargs: Any) -> Any:
    name, opts = parse_part(part)
    try:
        factory = table[name]
    except KeyError:
        raise ConfigError(f"unknown {kind} policy {name!r}; known: {sorted(table)}") from None
    try:
        return factory(**{**opts, **kwargs})
    except TypeError as e:
        raise ConfigError(f"bad options for {kind} policy {name!r}: {e}") from None


def make_policy(spec: str | EvictionPolicy | None, **kwargs: Any) -> EvictionPolicy:
    """An eviction policy from a spec ``"EVICTION[+ADMISSION]"``; None is plain ``lru`` (what a bare
    pool has always used), ``"default"`` names our default (``parc``). An admission part is attached
    as the policy's ``admission`` attribute (see :func:`admission_of`)."""
    if spec is None:
        return LRU()
    if not isinstance(spec, str):
        return spec
    ev, plus, adm = spec.partition("+")
    if plus and not adm.strip():
        raise ConfigError(f"policy spec {spec!r}: nothing after '+' (expected an admission policy)")
    ev = ev.strip()
    if ev.lower() in ("", "default"):
        ev = DEFAULT_POLICY
    policy: Any = _build("eviction", POLICIES, ev, **kwargs)
    policy.spec = spec
    policy.admission = make_admission(adm) if plus else None
    out: EvictionPolicy = policy
    return out


def make_admission(spec: str | AdmissionPolicy | None) -> AdmissionPolicy | None:
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all", "none")):
        return None
    if not isinstance(spec, str):
        return spec
    adm: AdmissionPolicy = _build("admission", ADMISSIONS, spec)
    return adm


def admission_of(policy: EvictionPolicy) -> AdmissionPolicy | None:
    return getattr(policy, "admission", None)
