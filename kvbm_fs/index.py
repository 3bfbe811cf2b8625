"""A vectorised open-addressing hash table from (namespace id, sequence hash) to a slot.

Lookups of a whole prefix (thousands of keys) run as a few numpy passes, one per
probe step, instead of one dict lookup per block.  Both key halves are stored and
compared in full, so two keys never alias.
"""

from __future__ import annotations

import numpy as np

EMPTY = -1
TOMB = -2
_C1 = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1
_C2 = np.uint64(0xBF58476D1CE4E5B9)


class KeyIndex:
    def __init__(self, expected: int = 1024) -> None:
        self._alloc(max(16, 1 << int(2 * max(1, expected) - 1).bit_length()))

    def _alloc(self, cap: int) -> None:
        self.cap = cap
        self.mask = cap - 1
        self.shift = np.uint64(64 - (cap.bit_length() - 1))
        self.k_ns = np.zeros(cap, np.uint64)
        self.k_hash = np.zeros(cap, np.uint64)
        self.val = np.full(cap, EMPTY, np.int64)
        self.live = 0
        self.used = 0  # live + tombstones

    def __len__(self) -> int:
        return self.live

    def _home(self, ns: int, hashes: np.ndarray) -> np.ndarray:
        x = hashes ^ np.uint64((ns * _C1) & _M64)
        x ^= x >> np.uint64(31)
        x *= _C2
        return (x >> self.shift).astype(np.int64)

    def find(self, ns: int, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, table positions); -1 for keys not present."""
        n = hashes.size
        vals = np.full(n, EMPTY, np.int64)
        where = np.full(n, -1, np.int64)
        if n == 0 or self.live == 0:
            return vals, where
        pos = self._home(ns, hashes)
        todo = np.arange(n)
        nsu = np.uint64(ns)
        while todo.size:
            p = pos[todo]
            v = self.val[p]
            hit = (v >= 0) & (self.k_hash[p] == hashes[todo]) & (self.k_ns[p] == nsu)
            vals[todo[hit]] = v[hit]
            where[todo[hit]] = p[hit]
            keep = ~hit & (v != EMPTY)
            todo = todo[keep]
            pos[todo] = (p[keep] + 1) & self.mask
        return vals, where

    def insert(self, ns: int, hashes: np.ndarray, values: np.ndarray) -> None:
        """Insert keys known to be absent and distinct."""
        if (self.used + hashes.size) * 2 > self.cap:
            self._grow(self.live + hashes.size)
        pos = self._home(ns, hashes)
        todo = np.arange(hashes.size)
        nsu = np.uint64(ns)
        while todo.size:
            p = pos[todo]
            free = self.val[p] < 0
            # among keys aiming at the same free position, the first wins this round
            cand = todo[free]
            _, first = np.unique(p[free], return_index=True)
            win = cand[first]
            wp = pos[win]
            self.used += int(np.count_nonzero(self.val[wp] == EMPTY))
            self.k_ns[wp] = nsu
            self.k_hash[wp] = hashes[win]
            self.val[wp] = values[win]
            self.live += win.size
            lost = np.ones(todo.size, bool)
            lost[np.searchsorted(todo, win)] = False
            todo = todo[lost]
            pos[todo] = (pos[todo] + 1) & self.mask

    def remove_at(self, where: np.ndarray) -> None:
        where = np.unique(where[where >= 0])
        where = where[self.val[where] >= 0]
        self.val[where] = TOMB
        self.live -= where.size

    def items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m = self.val >= 0
        return self.k_ns[m], self.k_hash[m], self.val[m]

    def _grow(self, need: int) -> None:
        """Rehash into a table at most 1/3 full; also drops tombstones."""
        ns, hs, vs = self.items()
        cap = 16
        while need * 3 > cap:
            cap *= 2
        self._alloc(cap)
        for n in np.unique(ns).tolist():
            m = ns == n
            self.insert(int(n), hs[m], vs[m])
