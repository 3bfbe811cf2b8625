"""The disk tier's LMDB index: which key lives in which slot, which slots are free, pending or cold.

LMDB gives one writer at a time across processes (robust mutexes survive a killed
holder) and lock-free readers, so several processes can share one tier directory.
All state changes happen in short write transactions; the data a committed entry
points to was written before the entry was committed, and a slot goes back to the
free list only in the transaction that removes its entry.

Databases:
  blocks   (ns, hash) BE            -> slot, parent, payload xxh3-128 (lo, hi), rank, payload_len, hits
  slots    slot BE                  -> (ns, hash) BE            reverse map, for eviction and check
  order    (rank, slot) BE          -> ''                       eviction order (lowest rank first)
  free     slot BE                  -> ''                       freed slots below the high-water mark
  pending  slot BE                  -> owner (pid, start time)  slots being written, not yet visible
  meta     b"hwm" | b"ns/<id>"      -> u64 | namespace JSON
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import lmdb
import numpy as np

KEY = struct.Struct(">QQ")
SLOT = struct.Struct(">Q")
VAL = struct.Struct("<QQQQQII")  # slot, parent, csum lo, csum hi, rank, payload_len, hits
OWNER = struct.Struct("<QQ")
U64 = struct.Struct("<Q")
T = TypeVar("T")


@dataclass(slots=True)
class Record:
    slot: int
    parent: int
    checksum: int
    rank: int
    payload_len: int
    hits: int

    @classmethod
    def unpack(cls, b: bytes) -> Record:
        slot, parent, lo, hi, rank, plen, hits = VAL.unpack(b)
        return cls(slot, parent, lo | (hi << 64), rank, plen, hits)

    def pack(self) -> bytes:
        c = self.checksum
        return VAL.pack(self.slot, self.parent, c & 0xFFFFFFFFFFFFFFFF, c >> 64, self.rank, self.payload_len, self.hits)


def process_identity(pid: int | None = None) -> tuple[int, int]:
    """(pid, start time in clock ticks): a pid alone can be reused after its process dies."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return pid, int(fields[19])
    except (OSError, IndexError, ValueError):
        return pid, 0


def owner_alive(owner: tuple[int, int]) -> bool:
    pid, start = owner
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return process_identity(pid)[1] == start


class DiskIndex:
    def __init__(self, path: str, map_size: int = 1 << 30) -> None:
        self.env = lmdb.open(
            path, map_size=map_size, max_dbs=8, subdir=True, sync=True, metasync=False,
            readahead=False, max_readers=1024, lock=True,
        )  # fmt: skip
        self.env.reader_check()  # clear reader slots left by killed processes
        with self.env.begin(write=True) as txn:
            mk = lambda name: self.env.open_db(name, txn=txn)  # noqa: E731
            self.blocks, self.slots, self.order = mk(b"blocks"), mk(b"slots"), mk(b"order")
            self.free, self.pending, self.meta = mk(b"free"), mk(b"pending"), mk(b"meta")
        self.owner = process_identity()

    # ---- transactions --------------------------------------------------------------------
    def write(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(txn)`` in one write transaction, growing the map when it is full."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def read(self) -> Any:
        return self.env.begin(buffers=False)

    def close(self) -> None:
        self.env.close()

    # ---- lookups -------------------------------------------------------------------------
    def records(self, ns: int, hashes: np.ndarray) -> list[Record | None]:
        keys = [KEY.pack(ns, h) for h in hashes.tolist()]
        with self.read() as txn:
            found = dict(txn.cursor(self.blocks).getmulti(keys))
        return [Record.unpack(found[k]) if k in found else None for k in keys]

    def contains(self, ns: int, hashes: np.ndarray) -> np.ndarray:
        keys = [KEY.pack(ns, h) for h in hashes.tolist()]
        with self.read() as txn:
            found = {k for k, _ in txn.cursor(self.blocks).getmulti(keys)}
        return np.fromiter((k in found for k in keys), bool, len(keys))

    def count(self) -> int:
        with self.read() as txn:
            return int(txn.stat(self.blocks)["entries"])

    def hwm(self, txn: Any) -> int:
        v = txn.get(b"hwm", db=self.meta)
        return U64.unpack(v)[0] if v else 0

    def iter_keys(self) -> Iterator[tuple[int, int, int]]:
        with self.read() as txn:
            for k, v in txn.cursor(self.blocks):
                ns, h = KEY.unpack(k)
                yield ns, h, Record.unpack(v).parent

    # ---- allocation ----------------------------------------------------------------------
    def allocate(
        self, txn: Any, n: int, num_slots: int, protect: set[int]
    ) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Up to ``n`` slots for writing: free list, then never-used slots, then the coldest
        unprotected blocks (evicted in this transaction). Returns (slots, evicted keys)."""
        got = self._take_free(txn, n)
        hwm = self.hwm(txn)
        fresh = min(n - len(got), num_slots - hwm)
        if fresh > 0:
            got.extend(range(hwm, hwm + fresh))
            txn.put(b"hwm", U64.pack(hwm + fresh), db=self.meta)
        evicted = self._evict(txn, n - len(got), protect, got) if len(got) < n else []
        mine = OWNER.pack(*self.owner)
        for s in got:
            txn.put(SLOT.pack(s), mine, db=self.pending)
        return got, evicted

    def _take_free(self, txn: Any, n: int) -> list[int]:
        out: list[int] = []
        cur = txn.cursor(self.free)
        ok = cur.first()
        while ok and len(out) < n:
            out.append(SLOT.unpack(cur.key())[0])
            ok = cur.delete() and bool(cur.key())  # deleting the last item leaves the cursor unpositioned
        return out

    def _evict(self, txn: Any, n: int, protect: set[int], into: list[int]) -> list[tuple[int, int, int]]:
        evicted: list[tuple[int, int, int]] = []
        cur = txn.cursor(self.order)
        ok = cur.first()
        while ok and len(evicted) < n:
            _, slot = KEY.unpack(cur.key())
            if slot in protect:
                ok = cur.next()
                continue
            ok = cur.delete() and bool(cur.key())
            evicted.append(self._drop_slot(txn, slot))
            into.append(slot)
        return evicted

    def _drop_slot(self, txn: Any, slot: int) -> tuple[int, int, int]:
        """Remove the entry in ``slot`` from blocks/slots (the caller handles order and free)."""
        kb = txn.pop(SLOT.pack(slot), db=self.slots)
        ns, h = KEY.unpack(kb)
        rec = Record.unpack(txn.pop(kb, db=self.blocks))
        return ns, h, rec.parent

    def evict(self, n: int, protect: set[int]) -> list[tuple[int, int, int]]:
        """Evict exactly ``n`` blocks (or none) and free their slots."""

        def fn(txn: Any) -> list[tuple[int, int, int]]:
            if txn.stat(self.order)["entries"] - len(protect) < n:
                return []
            slots: list[int] = []
            gone = self._evict(txn, n, protect, slots)  # the count check above guarantees n victims
            assert len(gone) == n
            for s in slots:
                txn.put(SLOT.pack(s), b"", db=self.free)
            return gone

        return self.write(fn)

    # ---- commit / removal ----------------------------------------------------------------
    def commit(self, txn: Any, ns: int, entries: list[tuple[int, int, int, Record]], failed: list[int]) -> list[bool]:
        """Publish written slots (hash, slot, parent, record); a key another writer committed first
        keeps its copy and our slot is freed. Failed slots go back to the free list."""
        out = []
        for h, slot, _parent, rec in entries:
            k = KEY.pack(ns, h)
            txn.delete(SLOT.pack(slot), db=self.pending)
            if txn.get(k, db=self.blocks) is not None:
                txn.put(SLOT.pack(slot), b"", db=self.free)
                out.append(False)
                continue
            txn.put(k, rec.pack(), db=self.blocks)
            txn.put(SLOT.pack(slot), k, db=self.slots)
            txn.put(KEY.pack(rec.rank, slot), b"", db=self.order)
            out.append(True)
        for slot in failed:
            txn.delete(SLOT.pack(slot), db=self.pending)
            txn.put(SLOT.pack(slot), b"", db=self.free)
        return out

    def remove(self, txn: Any, ns: int, h: int, only_slot: int | None = None) -> Record | None:
        """Delete one entry (if it still lives in ``only_slot`` when given) and free its slot."""
        k = KEY.pack(ns, h)
        raw = txn.get(k, db=self.blocks)
        if raw is None:
            return None
        rec = Record.unpack(raw)
        if only_slot is not None and rec.slot != only_slot:
            return None
        txn.delete(k, db=self.blocks)
        txn.delete(SLOT.pack(rec.slot), db=self.slots)
        txn.delete(KEY.pack(rec.rank, rec.slot), db=self.order)
        txn.put(SLOT.pack(rec.slot), b"", db=self.free)
        return rec

    def touch(self, txn: Any, hits: dict[int, tuple[int, int]]) -> None:
        """Apply buffered accesses {slot: (count, rank)} to records and the eviction order."""
        for slot, (count, rank) in hits.items():
            kb = txn.get(SLOT.pack(slot), db=self.slots)
            raw = txn.get(kb, db=self.blocks) if kb else None
            if raw is None:
                continue
            rec = Record.unpack(raw)
            if rec.slot != slot:
                continue
            txn.delete(KEY.pack(rec.rank, slot), db=self.order)
            rec.rank, rec.hits = max(rec.rank, rank), min(rec.hits + count, 0xFFFFFFFF)
            txn.put(KEY.pack(rec.rank, slot), b"", db=self.order)
            txn.put(kb, rec.pack(), db=self.blocks)

    def reclaim_pending(self, txn: Any) -> int:
        """Free slots reserved by writers that died before committing."""
        dead = [k for k, v in txn.cursor(self.pending) if not owner_alive(OWNER.unpack(v))]
        for k in dead:
            txn.delete(k, db=self.pending)
            txn.put(k, b"", db=self.free)
        return len(dead)
