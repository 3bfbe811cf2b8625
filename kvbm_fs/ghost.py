"""Ghost lists for ``parc``: keys of recently evicted blocks, without data, in numpy arrays.

ARC's B1 and B2 are two lists of 64-bit keys that answer "was this key evicted lately, from which
list, and how many evictions ago?" and drop their oldest entries (whichever list) when the history
is full.  As ``OrderedDict`` s they cost about 122 bytes per key (an int object, a dict entry and a
linked-list node); here a key costs a slot in one append-only buffer (key, list id, table slot and
a 32-bit sequence number: 17 bytes, the buffer 1.5 times the history) and one or two int32 in an
open-addressing table (linear probing, at most half full): about 31 bytes per remembered key,
with no Python object per key.  Lookups and appends are batched numpy passes; the buffer is
compacted (and the table rebuilt) when it fills, which is O(history) once every history's worth
of appends.
"""

from __future__ import annotations

import numpy as np

_EMPTY, _TOMB = -1, -2
_MIX = np.uint64(0x9E3779B97F4A7C15)


class GhostLists:
    """Two FIFO lists (0 and 1) of distinct uint64 keys, sharing one hash index."""

    def __init__(self, capacity: int = 0) -> None:
        self.resize(capacity)

    def resize(self, capacity: int) -> None:
        """Empty lists that will hold up to ``capacity`` keys in all (the caller trims to it)."""
        self.capacity = max(0, int(capacity))
        size = self.capacity + self.capacity // 2 + 64  # compaction every capacity/2 appends or more
        self.keys = np.zeros(size, np.uint64)
        self.lst = np.full(size, -1, np.int8)  # list id, -1: dead entry
        self.tslot = np.zeros(size, np.int32)  # where the entry sits in the table
        self.seq = np.zeros(size, np.uint32)  # the caller's number for the entry (parc: its eviction count)
        self.end = 0  # next append position
        self.start = 0  # no live entry before it
        self.n = [0, 0]
        tsize = 1 << max(7, int(3 * self.capacity + 127).bit_length())
        self.table = np.full(tsize, _EMPTY, np.int32)  # buffer position, or _EMPTY / _TOMB
        self.mask = np.uint64(tsize - 1)
        self.used = 0  # live + tombstones in the table

    def __len__(self) -> int:
        return self.n[0] + self.n[1]

    def keys_of(self, i: int) -> list[int]:
        """List ``i``, oldest first (inspection and tests: O(history))."""
        return self.keys[: self.end][self.lst[: self.end] == i].tolist()

    def _home(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((keys * _MIX) >> np.uint64(20) & self.mask).astype(np.int64)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each key: its list (-1 if absent) and its buffer position."""
        keys = np.asarray(keys, np.uint64)
        lst = np.full(keys.size, -1, np.int8)
        pos = np.full(keys.size, -1, np.int64)
        idx = self._home(keys)
        todo = np.arange(keys.size)
        mask = int(self.mask)
        while todo.size:
            e = self.table[idx[todo]]
            live = e >= 0
            hit = live.copy()
            hit[live] = self.keys[e[live]] == keys[todo[live]]
            found = todo[hit]
            pos[found] = e[hit]
            lst[found] = self.lst[e[hit]]
            more = e != _EMPTY
            more &= ~hit
            todo = todo[more]
            idx[todo] = (idx[todo] + 1) & mask
        return lst, pos

    def _index(self, positions: np.ndarray) -> None:
        """Put buffer entries ``positions`` (keys not in the table) into the table."""
        idx = self._home(self.keys[positions])
        todo = np.arange(positions.size)
        mask = int(self.mask)
        while todo.size:
            free = self.table[idx[todo]] < 0
            cand = todo[free]
            # one winner per table slot in this round; the rest probe on
            _, first = np.unique(idx[cand], return_index=True)
            win = cand[first]
            was_empty = self.table[idx[win]] == _EMPTY
            self.table[idx[win]] = positions[win]
            self.tslot[positions[win]] = idx[win]
            self.used += int(np.count_nonzero(was_empty))
            left = np.ones(todo.size, bool)
            left[np.searchsorted(todo, win)] = False
            todo = todo[left]
            idx[todo] = (idx[todo] + 1) & mask

    def _kill(self, positions: np.ndarray) -> None:
        positions = positions[self.lst[positions] >= 0]
        if positions.size == 0:
            return
        for i in (0, 1):
            self.n[i] -= int(np.count_nonzero(self.lst[positions] == i))
        self.lst[positions] = -1
        self.table[self.tslot[positions]] = _TOMB

    def pop(self, positions: np.ndarray) -> None:
        """Remove the entries at ``positions`` (from :meth:`find`)."""
        self._kill(np.asarray(positions, np.int64))

    def push(self, keys: np.ndarray, lst: np.ndarray, seq: np.ndarray | None = None) -> None:
        """Append keys (distinct) as the newest of their lists, replacing any entry they already have;
        ``seq``: a number kept with each entry (:attr:`seq` at the position :meth:`find` gives)."""
        keys = np.asarray(keys, np.uint64)
        if keys.size == 0:
            return
        old_l, old_p = self.find(keys)
        self._kill(old_p[old_l >= 0])
        if self.end + keys.size > self.keys.size:
            self._compact(keys.size)
        pos = np.arange(self.end, self.end + keys.size)
        self.end += keys.size
        self.keys[pos] = keys
        self.lst[pos] = lst
        self.seq[pos] = 0 if seq is None else seq
        for i in (0, 1):
            self.n[i] += int(np.count_nonzero(lst == i))
        if 2 * (self.used + keys.size) > self.table.size:
            self._rebuild()
        self._index(pos)

    def trim(self, limit: int) -> None:
        """While more than ``limit`` keys are remembered, drop the oldest, whichever list it is in: one
        history of evictions, as LIRS keeps (ARC's rule, B1 first while it is the longer, forgot B2
        returns that a longer history than ARC's one cache is there to catch)."""
        k = len(self) - limit
        s = self.start
        while k > 0 and len(self) > 0 and s < self.end:
            w = min(self.end - s, max(2 * k, 256))
            take = (s + np.flatnonzero(self.lst[s : s + w] >= 0))[:k]
            self._kill(take)
            k -= take.size
            s = int(take[-1]) + 1 if take.size and k == 0 else s + w
        self.start = s

    def _compact(self, room: int) -> None:
        live = np.flatnonzero(self.lst[: self.end] >= 0)
        size = self.keys.size
        if live.size + room > size:  # the caller pushed more than the history holds at once
            size = live.size + room + self.capacity + 64
        keys, lst, seq = self.keys[live], self.lst[live], self.seq[live]
        if size != self.keys.size:
            self.keys = np.zeros(size, np.uint64)
            self.lst = np.full(size, -1, np.int8)
            self.tslot = np.zeros(size, np.int32)
            self.seq = np.zeros(size, np.uint32)
        else:
            self.lst[:] = -1
        self.keys[: live.size], self.lst[: live.size], self.seq[: live.size] = keys, lst, seq
        self.end = live.size
        self.start = 0
        self._rebuild()

    def _rebuild(self) -> None:
        live = np.flatnonzero(self.lst[: self.end] >= 0)
        tsize = self.table.size
        while 3 * live.size + 128 > tsize:
            tsize *= 2
        self.table = np.full(tsize, _EMPTY, np.int32)
        self.mask = np.uint64(tsize - 1)
        self.used = 0
        self._index(live)
