"""Block lifecycle over a pool of fixed-size slots (KVBM v1 semantics), as pure bookkeeping.

States per slot live in numpy arrays; a batch of blocks moves with a few array
operations.  ``Reset -> Partial -> Complete -> Registered`` (or ``Reset ->
Complete`` for a full block); a Registered block whose pins drop to zero stays
matchable ("inactive") until eviction resets it.  Refcounts (pins) protect blocks
in use, and illegal transitions raise :class:`IllegalTransitionError` before any
state changes, so a rejected call never half-applies.
"""

from __future__ import annotations

import threading
from enum import IntEnum

import numpy as np

from .errors import IllegalTransitionError, PinnedError
from .events import EventBus, EventKind
from .index import KeyIndex
from .keys import BlockKey, BlockKeys
from .policy import EvictionPolicy, make_policy


class BlockState(IntEnum):
    RESET = 0
    PARTIAL = 1
    COMPLETE = 2
    REGISTERED = 3


_R, _P, _C, _G = (np.uint8(s) for s in BlockState)


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"block count must be a non-negative int, got {n!r}")


class SlotPool:
    """Which slot holds which key, in which state, pinned how often. Moves no bytes."""

    def __init__(
        self,
        num_slots: int,
        block_size: int | None = None,
        *,
        name: str = "pool",
        events: EventBus | None = None,
        policy: EvictionPolicy | str | None = None,
    ) -> None:
        self.num_slots = num_slots
        self.block_size = block_size
        self.name = name
        self.events = events or EventBus()
        self.policy = make_policy(policy)
        self.policy.bind(num_slots)
        attach = getattr(self.policy, "attach", None)
        if attach is not None:  # policies that name blocks (ghost lists) read slot_ns/slot_hash
            attach(self)
        self._with_parents = bool(getattr(self.policy, "uses_parents", False))
        self.lock = threading.RLock()
        self.state = np.zeros(num_slots, np.uint8)
        self.refs = np.zeros(num_slots, np.int32)
        self.tokens = np.zeros(num_slots, np.int32)
        self.slot_ns = np.zeros(num_slots, np.uint64)
        self.slot_hash = np.zeros(num_slots, np.uint64)
        self.slot_parent = np.zeros(num_slots, np.uint64)
        self.index = KeyIndex(num_slots)
        self._free = np.arange(num_slots - 1, -1, -1, dtype=np.int64)  # stack; slot 0 on top
        self._nfree = num_slots
        self.evictions = 0

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self._nfree

    @property
    def num_evictable(self) -> int:
        with self.lock:
            return int(np.count_nonzero((self.state == _G) & (self.refs == 0)))

    @property
    def num_registered(self) -> int:
        return len(self.index)

    def lookup(self, keys: BlockKeys) -> np.ndarray:
        """Slot of each key, -1 where absent. No pins taken."""
        with self.lock:
            return self.index.find(keys.ns, keys.hashes)[0]

    def prefix_len(self, keys: BlockKeys) -> int:
        slots = self.lookup(keys)
        miss = np.flatnonzero(slots < 0)
        return int(miss[0]) if miss.size else len(keys)

    def keys_of(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.slot_ns[slots], self.slot_hash[slots]

    def registered_keys(self) -> list[BlockKeys]:
        with self.lock:
            ns, hs, slots = self.index.items()
            parents = self.slot_parent[slots]
        return [BlockKeys(int(n), hs[ns == n], parents[ns == n]) for n in np.unique(ns).tolist()]

    # ---- allocation ----------------------------------------------------------------------
    def allocate(self, n: int, evict: bool = True) -> np.ndarray | None:
        """``n`` owned Reset slots (refcount 1), evicting inactive blocks if needed; None if impossible."""
        _check_count(n)
        with self.lock:
            short = n - self._nfree
            if short > 0 and (not evict or self.evict(short) < short):
                return None
            top = self._nfree
            slots = self._free[top - n : top][::-1].copy()
            self._nfree = top - n
            self.refs[slots] = 1
            return slots

    def _push_free(self, slots: np.ndarray) -> None:
        self.state[slots] = _R
        self.tokens[slots] = 0
        self.refs[slots] = 0
        top = self._nfree
        self._free[top : top + slots.size] = slots[::-1]
        self._nfree = top + slots.size

    # ---- transitions ---------------------------------------------------------------------
    def _require(self, slots: np.ndarray, ok: np.ndarray, what: str) -> None:
        if not bool(np.all(ok)):
            bad = slots[~ok][:4].tolist()
            got = [BlockState(int(s)).name for s in self.state[slots[~ok][:4]]]
            raise IllegalTransitionError(f"{self.name}: cannot {what} slots {bad} in states {got}")

    def fill(self, slots: np.ndarray, num_tokens: np.ndarray | int) -> None:
        """Reset/Partial -> Partial with ``num_tokens`` tokens written (``init_sequence``/``add tokens``)."""
        with self.lock:
            st = self.state[slots]
            ntok = np.broadcast_to(np.asarray(num_tokens, np.int32), slots.shape)
            cap_ok = True if self.block_size is None else (ntok <= self.block_size)
            self._require(slots, ((st == _R) | (st == _P)) & (self.refs[slots] > 0) & cap_ok & (ntok > 0), "fill")
            self.state[slots] = _P
            self.tokens[slots] = ntok

    def commit(self, slots: np.ndarray) -> None:
        """Partial -> Complete once the block is full."""
        with self.lock:
            full = True if self.block_size is None else (self.tokens[slots] == self.block_size)
            self._require(slots, (self.state[slots] == _P) & full, "commit (block not full)")
            self.state[slots] = _C

    def complete(self, slots: np.ndarray) -> None:
        """Reset -> Complete directly, for a block written whole."""
        with self.lock:
            self._require(slots, (self.state[slots] == _R) & (self.refs[slots] > 0), "complete")
            self.state[slots] = _C
            if self.block_size is not None:
                self.tokens[slots] = self.block_size

    def register(self, slots: np.ndarray, keys: BlockKeys) -> np.ndarray:
        """Complete -> Registered. A key already registered keeps its existing slot (returned, with a
        pin for the caller) and the new slot goes back to Reset: a pool never holds a key twice."""
        if slots.size != len(keys):
            raise ValueError("register: one key per slot")
        with self.lock:
            self._require(slots, self.state[slots] == _C, "register")
            existing = self.index.find(keys.ns, keys.hashes)[0]
            _, first = np.unique(keys.hashes, return_index=True)
            is_first = np.zeros(slots.size, bool)
            is_first[first] = True
            new = (existing < 0) & is_first
            out = slots.copy()
            if new.any():
                ns_slots = slots[new]
                self.index.insert(keys.ns, keys.hashes[new], ns_slots)
                self.state[ns_slots] = _G
                self.slot_ns[ns_slots] = keys.ns
                self.slot_hash[ns_slots] = keys.hashes[new]
                self.slot_parent[ns_slots] = keys.parents[new]
                if self._with_parents:  # prefix-aware policies get each block's parent slot (-1: absent)
                    self.policy.on_insert(ns_slots, self.index.find(keys.ns, keys.parents[new])[0])
                else:
                    self.policy.on_insert(ns_slots)
            dup = ~new
            if dup.any():
                again = self.index.find(keys.ns, keys.hashes[dup])[0]
                self._push_free(slots[dup])
                out[dup] = again
                np.add.at(self.refs, again, 1)
        if new.any():
            self.events.publish(EventKind.STORED, self.name, keys[new])
        return out

    def acquire(self, keys: BlockKeys) -> np.ndarray:
        """Pin every present key (match); -1 where absent."""
        with self.lock:
            slots = self.index.find(keys.ns, keys.hashes)[0]
            hit = slots[slots >= 0]
            if hit.size:
                np.add.at(self.refs, hit, 1)
                self.policy.on_access(hit)
            return slots

    def release(self, slots: np.ndarray) -> None:
        """Drop one pin per slot. Unregistered slots at zero pins go back to Reset; registered ones
        stay matchable (inactive) until evicted."""
        slots = slots[slots >= 0]
        if slots.size == 0:
            return
        with self.lock:
            uniq, counts = np.unique(slots, return_counts=True)  # (a bincount would touch every slot)
            held = self.refs[uniq] >= counts
            if not bool(np.all(held)):
                raise IllegalTransitionError(f"{self.name}: release of unpinned slots {uniq[~held][:4].tolist()}")
            self.refs[uniq] -= counts.astype(np.int32)
            dead = uniq[(self.refs[uniq] == 0) & (self.state[uniq] != _G)]
            if dead.size:
                self._push_free(dead)

    def coldest(self, n: int) -> list[BlockKeys]:
        """The ``n`` blocks the policy would evict next (unpinned, registered), without evicting them."""
        with self.lock:
            evictable = (self.state == _G) & (self.refs == 0)
            victims = self.policy.victims(evictable, n)
            return self._keys_at(victims)

    def _keys_at(self, slots: np.ndarray) -> list[BlockKeys]:
        out = []
        for ns in dict.fromkeys(self.slot_ns[slots].tolist()):
            sel = slots[self.slot_ns[slots] == ns]
            out.append(BlockKeys(int(ns), self.slot_hash[sel].copy(), self.slot_parent[sel].copy()))
        return out

    # ---- removal -------------------------------------------------------------------------
    def evict(self, n: int) -> int:
        """Evict exactly ``n`` inactive blocks chosen by the policy, or none at all; returns the count."""
        _check_count(n)
        with self.lock:
            evictable = (self.state == _G) & (self.refs == 0)
            if int(np.count_nonzero(evictable)) < n:
                return 0
            victims = self.policy.victims(evictable, n)
            if victims.size < n or not bool(np.all(evictable[victims])):
                return 0
            gone = self._unregister(victims)
            self.evictions += n
        self._publish_removed(EventKind.EVICTED, gone)
        return n

    def remove(self, keys: BlockKeys) -> np.ndarray:
        """Delete present keys; raises PinnedError (changing nothing) if any is pinned."""
        with self.lock:
            slots = self.index.find(keys.ns, keys.hashes)[0]
            found = slots >= 0
            s = np.unique(slots[found])
            if bool(np.any(self.refs[s] > 0)):
                pinned = s[self.refs[s] > 0][:4]
                raise PinnedError(
                    f"{self.name}: cannot delete pinned blocks {[str(BlockKey(keys.ns, int(h))) for h in self.slot_hash[pinned]]}"
                )
            gone = self._unregister(s)
        self._publish_removed(EventKind.REMOVED, gone)
        return found

    def _unregister(self, slots: np.ndarray) -> list[BlockKeys]:
        gone = self._keys_at(slots)
        for ks in gone:
            self.index.remove_at(self.index.find(ks.ns, ks.hashes)[1])
        self.policy.on_remove(slots)
        self._push_free(slots)
        return gone

    def _publish_removed(self, kind: EventKind, gone: list[BlockKeys]) -> None:
        for ks in gone:
            self.events.publish(kind, self.name, ks)
