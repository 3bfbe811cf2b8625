"""G3: a persistent, bounded, crash-safe local disk tier.

Layout of a tier directory::

    kvbm_fs.json        format version and geometry (slot size, slots per segment, slots)
    index/              LMDB: key -> slot + checksum + parent + access stats (tiers/disk/index.py)
    seg/0000/000000.seg preallocated segment files of fixed-size slots, 256 per folder

A slot is one 4 KiB header page (the 128-byte block header of kvbm_fs.codec, rest
zero) followed by the payload padded to 4 KiB, so header and payload can each be
read with O_DIRECT straight into their destinations.  A put reserves slots
(``pending``), writes header and payload, and only then commits the index entry; a
reader verifies header, key echo and payload checksum before a block counts as
found.  A crash leaves at most some pending slots, which the next open reclaims.
Capacity is a hard number of slots; when it is full, the coldest blocks by the
eviction policy's rank are evicted in the same transaction that hands out their slots
(retained blocks last, within their share: :meth:`DiskTier.retain`).
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import lmdb
import numpy as np

from kvbm_fs import codec
from kvbm_fs.errors import ConfigError, FormatVersionError, IndexCorruptError, KvbmError, PinnedError, TierClosedError
from kvbm_fs.events import VERIFY, EventBus, EventKind
from kvbm_fs.keys import BlockKeys, Namespace
from kvbm_fs.policy import EvictionPolicy, make_policy
from kvbm_fs.tier import DEFAULT_RETAIN_SHARE, Admission, Medium, Tier, check_share
from kvbm_fs.tiers.disk import check as disk_check
from kvbm_fs.tiers.disk.blockio import ALIGN, BlockIO, IoOp, aligned_buffer, is_aligned, make_io, probe_direct_io
from kvbm_fs.tiers.disk.device import DevicePath, dest_rows
from kvbm_fs.tiers.disk.files import FORMAT, HEADER_PAGE, SEGMENT_TARGET, Segments, open_dir, round_up
from kvbm_fs.tiers.disk.index import DiskIndex, NullIndex, Record
from kvbm_fs.tiers.disk.rebuild import (
    INDEX_WAIT_S,
    backfill_namespaces,
    open_index,
    read_namespaces,
    read_retains,
    write_namespace,
    write_retain,
)
from kvbm_fs.units import parse_size

__all__ = ["FORMAT", "HEADER_PAGE", "ALIGN", "DEFAULT_RETAIN_SHARE", "DiskTier", "check_share", "round_up"]
RETAIN_BATCH = 1 << 13  # blocks (re-)marked per LMDB write transaction (~0.2 s): a writer waits at most one batch


class DiskTier(Tier):
    medium = Medium.DISK
    persistent = True
    shareable = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        block_nbytes: int,
        capacity: int | str = "10GiB",
        *,
        name: str = "disk",
        block_size: int | None = None,
        events: EventBus | None = None,
        policy: EvictionPolicy | str | None = None,
        durable: bool = False,
        direct: bool | None = None,
        io: str = "auto",
        segment_bytes: int | str = SEGMENT_TARGET,
        gds: str = "auto",
        gds_write: bool = False,
        index_wait: float = INDEX_WAIT_S,
    ) -> None:
        self.name = name
        self.index_wait = float(index_wait)  # seconds to wait for another process's index rebuild
        self.root = os.path.abspath(os.fspath(path))
        self.block_nbytes = int(block_nbytes)
        self.block_size = block_size
        self.events = events or EventBus()
        self.policy = make_policy(policy)
        self.durable = durable
        self.slot_bytes = HEADER_PAGE + round_up(self.block_nbytes, ALIGN)
        cap = parse_size(capacity, "disk capacity")
        if cap < self.slot_bytes:
            from kvbm_fs.errors import CapacityError

            raise CapacityError(f"disk capacity {cap} B is smaller than one {self.slot_bytes} B slot")
        meta = open_dir(self.root, self.block_nbytes, self.slot_bytes, cap // self.slot_bytes,
                        parse_size(segment_bytes, "segment_bytes"))  # fmt: skip
        self.segment_slots, self.num_slots = int(meta["segment_slots"]), int(meta["num_slots"])
        self._lock = threading.Lock()  # guards the dicts below, and swaps of self.index
        self._closed = False
        self._healing = False  # a thread is reopening (rebuilding) the index; self.index serves misses
        self._retired: list[DiskIndex] = []  # damaged or replaced indexes, closed with the tier
        self.index: DiskIndex = self._open_index()
        self.admission = Admission(self.policy, self.num_slots)
        self.direct = probe_direct_io(self.root) if direct is None else direct
        self.io: BlockIO = make_io(io)
        self.segs = Segments(self.root, self.slot_bytes, self.segment_slots, self.num_slots, self.direct)
        self._claim = threading.Lock()  # lookup+pin vs. allocation (eviction) within this process
        self._pins: dict[int, int] = {}  # slot -> pins held by this process (pin() and reads in flight)
        self._key_pins: dict[tuple[int, int], list[int]] = {}  # (ns, hash) -> slots pin() took for it
        self._touched: dict[int, tuple[int, int]] = {}
        self._orphans: list[int] = []  # slots still pending after a commit that the index refused
        self.counters = dict(load_failures=0, corrupt_removed=0, write_failures=0, evictions=0)
        self.device = DevicePath(self, gds, gds_write)

    def _open_index(self) -> DiskIndex:
        """The LMDB index, checked and rebuilt from the segments if damaged (tiers/disk/rebuild.py).
        One that cannot be opened is a ConfigError (unwritable) or an IndexCorruptError (a rebuild
        failed), naming its path. While another process rebuilds it: a NullIndex, healed later."""
        path = os.path.join(self.root, "index")
        try:
            index = open_index(self.root, self.index_wait)
        except IndexCorruptError:
            raise
        except OSError as e:
            raise ConfigError(f"disk tier index {path} is not usable: {e.strerror or e}") from None
        except lmdb.Error as e:
            raise FormatVersionError(f"disk tier index {path} cannot be read: {e}") from None
        if not isinstance(index, NullIndex):  # a NullIndex is broken: the first operation heals it
            backfill_namespaces(self.root, index)
            _restore_marks(self.root, index)
        return index

    def _heal(self, why: str) -> None:
        """Serve misses while a thread reopens the index (rebuilding it if it is damaged)."""
        with self._lock:
            if self._healing or self._closed:
                return
            self._healing = True
            if not isinstance(self.index, NullIndex):
                self._retired.append(self.index)
            self.index = NullIndex(why)
        threading.Thread(target=self._reopen, name=f"kvbm-{self.name}-reindex", daemon=True).start()

    def _reopen(self) -> None:
        delay = 0.5
        while not self._closed:
            try:
                ix = open_index(self.root, wait=delay)
            except (OSError, lmdb.Error):  # e.g. a rebuild that failed: try again later
                ix = NullIndex("reopen failed")
                time.sleep(delay)
            if not isinstance(ix, NullIndex):
                _restore_marks(self.root, ix)
                with self._lock:
                    if not self._closed:
                        self.index, self._healing = ix, False
                        return
                ix.close()
                return
            delay = min(delay * 2, 30.0)

    # ---- namespaces ----------------------------------------------------------------------
    def bind_namespace(self, ns: Namespace) -> None:
        super().bind_namespace(ns)
        write_namespace(self.root, ns)  # the description a rebuild restores, and operators list
        key = b"ns/%016x" % ns.id
        doc = ns.canonical_bytes()

        def fn(txn: Any) -> None:
            if txn.get(key, db=self.index.meta) is None:
                txn.put(key, doc, db=self.index.meta)

        try:
            self.index.write(fn)
        except IndexCorruptError:  # being rebuilt: the rebuild restores it from namespaces/
            pass

    def namespaces(self) -> dict[int, Namespace]:
        """The namespaces described next to the data (``namespaces/<id>.json``, and the index's
        entries from before those files existed); what operators list."""
        out = read_namespaces(self.root)
        for doc in self.index.namespace_docs():
            try:
                ns = Namespace.from_dict(json.loads(doc))
            except (ValueError, TypeError, KvbmError):
                continue
            out.setdefault(ns.id, ns)
        return out

    def retain(self, ns: int, share: float | None = DEFAULT_RETAIN_SHARE, hashes: np.ndarray | None = None) -> int:
        """Retain the blocks ``hashes`` of namespace ``ns`` (default: all it holds now; blocks stored
        later are ordinary): eviction and demotion skip them while retained blocks hold at most
        ``share`` of the slots (past it the oldest go first). ``None`` unmarks all of ``ns``. Marks
        persist (the index; the share also in ``namespaces/<id>.retain``). Returns blocks re-ranked."""
        self._live()
        if share is not None:
            share = check_share(share)
        write_retain(self.root, ns, share)
        ix = self.index
        ix.write(lambda txn: ix.set_mark(txn, ns, share))  # the share first: it bounds what follows
        if share is None or hashes is None:
            with ix.read() as txn:
                hashes = ix.namespace_hashes(txn, ns)
        hs = np.unique(np.asarray(hashes, np.uint64))
        keep, n = share is not None, 0
        for a in range(0, hs.size, RETAIN_BATCH):  # bounded transactions, however many blocks
            part = hs[a : a + RETAIN_BATCH]
            n += ix.write(partial(ix.rerank, ns=ns, hashes=part, retained=keep))
        return n

    def retained(self) -> dict[str, Any]:
        """The retain marks ({namespace id: share}), how many blocks they hold and may hold (none
        while the index is unreadable)."""
        self._live()
        try:
            with self.index.read() as txn:
                marks = self.index.marks(txn)
                return {"marks": marks, "blocks": self.index.retained(txn),
                        "budget": self.index.budget(txn, self.num_slots)}  # fmt: skip
        except (OSError, lmdb.Error, struct.error):
            return {"marks": {}, "blocks": 0, "budget": 0}

    def _segment_path(self, seg: int) -> str:
        return self.segs.path(seg)

    def _locate(self, slot: int) -> tuple[int, int]:
        return self.segs.locate(slot)

    # ---- pins ----------------------------------------------------------------------------
    def _pin_slots(self, slots: list[int]) -> None:
        with self._lock:
            for s in slots:
                self._pins[s] = self._pins.get(s, 0) + 1

    def _unpin_slots(self, slots: list[int]) -> None:
        with self._lock:
            for s in slots:
                c = self._pins[s] - 1
                if c:
                    self._pins[s] = c
                else:
                    del self._pins[s]

    def _protected(self) -> set[int]:
        with self._lock:
            return set(self._pins)

    # ---- Tier primitives -----------------------------------------------------------------
    def contains(self, keys: BlockKeys) -> np.ndarray:
        self._live()
        return self.index.contains(keys.ns, keys.hashes)

    def put(self, keys: BlockKeys, data: Any) -> np.ndarray:
        self._live()
        self._check_rows(keys, data, "put")
        self.admission.seen(keys)
        recs, held = self._records_pinned(keys)  # making room must not evict what this put counts as stored
        present = np.array([r is not None for r in recs], bool)
        todo = np.flatnonzero(~present)
        _, first = np.unique(keys.hashes[todo], return_index=True)
        todo = todo[np.sort(first)]
        try:
            if self.admission.filter is not None:
                todo = self.admission.trim(self, keys, todo, self.num_slots - len(self))
            if todo.size == 0:
                return present
            dsums = self.device.sums(data, todo) if self.device.applies(data) else None
            with self.device.staged(data, len(keys)) as rows:
                src = data if dsums is not None and self.device.gds_write else None
                stored = self._write_blocks(keys, rows, todo, dsums, src)
        finally:
            self._unpin_slots(held)
        out = present.copy()
        out[todo[stored]] = True
        dup = np.flatnonzero(~present)  # duplicates within the batch follow their first copy
        out[dup] = self.index.contains(keys.ns, keys.hashes[dup]) if dup.size else out[dup]
        return out

    def _records_pinned(self, keys: BlockKeys) -> tuple[list[Record | None], list[int]]:
        """Look keys up and pin their slots atomically with respect to this process's evictions."""
        with self._claim:
            recs = self.index.records(keys.ns, keys.hashes)
            slots = [r.slot for r in recs if r is not None]
            self._pin_slots(slots)
        return recs, slots

    def _write_blocks(
        self,
        keys: BlockKeys,
        rows: np.ndarray,
        todo: np.ndarray,
        dsums: list[int] | None = None,
        device_src: Any = None,
    ) -> np.ndarray:
        slots = self._reserve(todo.size)
        n = len(slots)
        ok = np.zeros(todo.size, bool)
        if n == 0:
            return ok
        idx = todo[:n]  # chain order: the prefix gets the slots
        results, csums = self._write_slots(keys, rows, idx, slots, dsums, device_src)
        now = _now_us()
        entries = [
            (int(keys.hashes[i]), s, int(keys.parents[i]),
             Record(s, int(keys.parents[i]), csums[j], self.policy.rank(now - j, 0), self.block_nbytes, 0))
            for j, (i, s) in enumerate(zip(idx.tolist(), slots)) if results[j]
        ]  # fmt: skip
        failed = [s for j, s in enumerate(slots) if not results[j]]
        try:
            committed = self.index.write(lambda txn: self.index.commit(txn, keys.ns, entries, failed))
        except OSError:  # written but never published: a refused put; the next reserve frees the slots
            with self._lock:
                self._orphans.extend(slots)
            self.counters["write_failures"] += n
            return ok
        ok[:n] = results
        self.counters["write_failures"] += len(failed)
        new = [(e[0], e[2]) for e, c in zip(entries, committed) if c]
        if new:  # with their parents: routers learn chains from these events (kv_events.py)
            self.events.publish(EventKind.STORED, self.name, _keys_of([(keys.ns, h, p) for h, p in new]))
        return ok

    def _reserve(self, n: int) -> list[int]:
        """Reserve up to ``n`` slots (evicting if full) in one transaction that also applies buffered
        access stats and frees slots of earlier refused commits. An index that cannot be written
        (disk full, file size limit) reserves nothing, so the put is refused rather than raising."""
        touched = self._take_touched()
        with self._lock:
            orphans, self._orphans = self._orphans, []

        def fn(txn: Any) -> tuple[list[int], list[tuple[int, int, int]]]:
            self.index.touch(txn, touched, self.policy.rank)
            self.index.commit(txn, 0, [], orphans)
            return self.index.allocate(txn, n, self.num_slots, self._protected(), self.evict_on_put)

        try:
            with self._claim:
                slots, evicted = self.index.write(fn)
        except OSError:
            with self._lock:
                self._orphans.extend(orphans)
            self.counters["write_failures"] += n
            return []
        self._publish_evicted(evicted)
        return slots

    def _write_slots(
        self,
        keys: BlockKeys,
        rows: np.ndarray,
        idx: np.ndarray,
        slots: list[int],
        dsums: list[int] | None = None,
        device_src: Any = None,
    ) -> tuple[list[bool], list[int]]:
        """Write headers and payloads of ``keys[idx]`` into ``slots``.  With ``device_src`` (a GPU
        tensor, ``gds_write``) the payloads go from it by GDS and only the headers from ``rows``."""
        hdr = np.frombuffer(aligned_buffer(len(slots) * HEADER_PAGE), np.uint8).reshape(len(slots), HEADER_PAGE)
        csums: list[int] = []
        ops: list[IoOp | None] = []
        tokens = self.block_size or 0
        for j, (i, s) in enumerate(zip(idx.tolist(), slots)):
            payload = rows[i]
            head = codec.encode_header(keys[i], int(keys.parents[i]), tokens, payload, dsums[j] if dsums else None)
            hdr[j, : codec.HEADER_SIZE] = np.frombuffer(head, np.uint8)
            csums.append(codec.decode_header(head).checksum)
            ops.append(self._op(s, hdr[j], payload if device_src is None else payload[:0], create=True))
        results = self.io.write([op for op in ops if op is not None])
        it = iter(results)
        ok = [op is not None and next(it) == op.nbytes for op in ops]
        if device_src is not None:
            moved = self.device.write_payloads(device_src, idx, slots, rows)
            ok = [a and b for a, b in zip(ok, moved)]
        if self.durable:
            self.segs.sync([s for s, good in zip(slots, ok) if good])
        return ok, csums

    def _op(self, slot: int, hdr: np.ndarray | None, payload: np.ndarray, create: bool = False) -> IoOp | None:
        """The I/O for a slot: header page then payload, or the payload alone (``hdr`` None)."""
        seg, off = self._locate(slot)
        try:
            dfd, bfd = self.segs.fd(seg, create=create)
        except OSError:
            return None
        p = memoryview(payload.data)
        fd = dfd if dfd >= 0 and is_aligned(p) else bfd
        if hdr is None:
            return IoOp(fd, off + HEADER_PAGE, [p])
        return IoOp(fd, off, [memoryview(hdr.data), p])

    def moves_device_rows(self, rows: Any) -> bool:
        return self.device.applies(rows)

    def register_device_memory(self, tensor: Any) -> bool:
        """Register a long-lived GPU tensor (an engine's KV cache) for GDS loads into it, until
        :meth:`unregister_device_memory` or close.  False where GDS is not in use."""
        return self.device.register(tensor)

    def unregister_device_memory(self, tensor: Any) -> None:
        self.device.unregister(tensor)

    def get(self, keys: BlockKeys, out: Any) -> np.ndarray:
        self._live()
        self._check_rows(keys, out, "get")
        self.admission.seen(keys)
        recs, slots = self._records_pinned(keys)
        found = np.array([r is not None for r in recs], bool)
        idx = np.flatnonzero(found)
        try:
            if idx.size == 0:
                return found
            hits: list[Record] = [recs[i] for i in idx.tolist()]  # type: ignore[misc]
            if self.device.loads(out):
                good = self.device.read(keys, hits, idx, out)
            else:
                dst, copy_back = dest_rows(out, len(keys))
                good = self._read_slots(keys, hits, idx, dst)
                if copy_back is not None:
                    copy_back(idx[good])
        finally:
            self._unpin_slots(slots)
        found[idx[~good]] = False
        self._record_access([s for s, g in zip(slots, good.tolist()) if g])
        return found

    def _read_slots(
        self, keys: BlockKeys, recs: list[Record], idx: np.ndarray, dst: np.ndarray, dense: bool = False
    ) -> np.ndarray:
        """Read and verify ``recs`` (for ``keys[idx]``) into ``dst[idx]``, or into ``dst[:len(recs)]``
        if ``dense``; returns which verified."""
        hdr = np.frombuffer(aligned_buffer(len(recs) * HEADER_PAGE), np.uint8).reshape(len(recs), HEADER_PAGE)
        row = list(range(len(recs))) if dense else idx.tolist()
        ops = [self._op(r.slot, hdr[j], dst[row[j]]) for j, r in enumerate(recs)]
        results = iter(self.io.read([op for op in ops if op is not None]))
        good = np.zeros(len(recs), bool)
        bad: list[tuple[int, int, str]] = []
        for j, (op, r, i) in enumerate(zip(ops, recs, idx.tolist())):
            n = next(results) if op is not None else -errno.ENOENT
            why = disk_check.verify(self, keys[i], r, hdr[j], dst[row[j]], n, op)
            if why is None:
                good[j] = True
            else:
                bad.append((int(keys.hashes[i]), r.slot, why))
        if bad:
            self._drop_bad(keys.ns, bad)
        return good

    def _drop_bad(self, ns: int, bad: list[tuple[int, int, str]]) -> None:
        """A block that fails verification is reported and removed. One whose entry no longer lives in
        that slot was evicted and its slot reused (by another process) while we read: a plain miss."""

        def fn(txn: Any) -> list[tuple[int, int, str]]:
            return [b for b in bad if self.index.remove(txn, ns, b[0], only_slot=b[1]) is not None]

        try:
            failed = removed = self.index.write(fn)
        except OSError:  # the index cannot be written (disk full): the entry stays, a miss on every read
            failed, removed = bad, []
        if not failed:
            return
        self.counters["load_failures"] += len(failed)
        self.counters["corrupt_removed"] += len(removed)
        hs = BlockKeys(ns, np.array([b[0] for b in failed], np.uint64))
        self.events.publish(EventKind.LOAD_FAILED, self.name, hs, failed[0][2], VERIFY)

    def delete(self, keys: BlockKeys) -> np.ndarray:
        """Remove blocks for good: their slots stay reserved (pending) until their header pages are
        zeroed, so a rebuild of the index from the segments cannot bring them back (tiers/disk/rebuild.py)."""
        self._live()
        hs = keys.hashes.tolist()
        with self._claim:
            recs = self.index.records(keys.ns, keys.hashes)
            pinned = self._protected()
            if any(r is not None and r.slot in pinned for r in recs):
                raise PinnedError(f"{self.name}: cannot delete pinned blocks")
            gone = self.index.write(lambda txn: [self.index.remove(txn, keys.ns, h, hold=True) for h in hs])
        slots = [r.slot for r in gone if r is not None]
        if slots:
            self._zero_headers(slots)
            with self._lock:  # freed with the next write transaction (a put's reserve, or flush)
                self._orphans.extend(slots)
        self.events.publish(EventKind.REMOVED, self.name, keys[np.flatnonzero([r is not None for r in gone])])
        return np.array([r is not None for r in recs], bool)

    def _zero_headers(self, slots: list[int]) -> None:
        """Zero the header pages of slots this process holds pending. A failure (or a crash before it)
        leaves a block a rebuild may restore: intact, and verified on every read like any block."""
        zero = bytes(HEADER_PAGE)
        for s in slots:  # buffered (page-cache copies, no pool): O_DIRECT here split ext4 extents
            seg, off = self.segs.locate(s)
            try:
                os.pwrite(self.segs.fd(seg)[1], zero, off)
            except OSError:  # the segment is gone or unwritable
                pass
        if self.durable:
            try:
                self.segs.sync(slots)
            except OSError:
                pass

    def pin(self, keys: BlockKeys) -> np.ndarray:
        self._live()
        recs, _ = self._records_pinned(keys)
        with self._lock:
            for h, r in zip(keys.hashes.tolist(), recs):
                if r is not None:
                    self._key_pins.setdefault((keys.ns, h), []).append(r.slot)
        return np.array([r is not None for r in recs], bool)

    def unpin(self, keys: BlockKeys) -> None:
        """Release the slots ``pin`` took, found by key: another process may have evicted the block and
        written it to another slot since, and a get in flight may hold the block's current slot."""
        present = self.index.contains(keys.ns, keys.hashes)
        slots: list[int] = []
        with self._lock:
            held = [self._key_pins.get((keys.ns, h)) for h in keys.hashes.tolist()]
            if any(p and not h for p, h in zip(present.tolist(), held)):
                from kvbm_fs.errors import IllegalTransitionError

                raise IllegalTransitionError(f"{self.name}: unpin of blocks that are not pinned")
            for h, stack in zip(keys.hashes.tolist(), held):
                if stack:
                    slots.append(stack.pop())
                    if not stack:
                        del self._key_pins[(keys.ns, h)]
        self._unpin_slots(slots)

    def pinned(self, keys: BlockKeys) -> np.ndarray:
        pins = self._protected()
        return np.array([r is not None and r.slot in pins for r in self.index.records(keys.ns, keys.hashes)], bool)

    def coldest(self, n: int) -> list[BlockKeys]:
        self._live()
        self.flush()  # rank by what readers saw, not by what they saw before the last write
        found = self.index.coldest(n, self._protected(), self.num_slots)
        by_ns: dict[int, list[tuple[int, int, int]]] = {}
        for g in found:
            by_ns.setdefault(g[0], []).append(g)
        return [_keys_of(b) for b in by_ns.values()]

    def evict(self, n: int) -> int:
        """Evict exactly ``n`` blocks (coldest first), or none."""
        try:
            with self._claim:
                gone = self.index.evict(n, self._protected(), self.num_slots)
        except IndexCorruptError:
            return 0
        self._publish_evicted(gone)
        return len(gone)

    def iter_keys(self) -> Iterator[BlockKeys]:
        self._live()
        batch: list[tuple[int, int, int]] = []
        for ns, h, parent in self.index.iter_keys():
            if batch and (batch[0][0] != ns or len(batch) >= 65536):
                yield _keys_of(batch)
                batch = []
            batch.append((ns, h, parent))
        if batch:
            yield _keys_of(batch)

    # ---- offline verification and raw reads (tiers/disk/check.py) -------------------------
    def check(
        self, fix: bool = False, deep: bool = False, batch: int = 256, progress: disk_check.Progress | None = None
    ) -> dict[str, Any]:
        """Verify the index against the segments: every entry's slot must hold a header echoing its key
        and checksum (``deep``: and a payload matching its xxh3-128 and dsum128). Also finds slots
        reserved by dead writers. ``fix`` removes bad entries and frees leaked slots. ``progress(done,
        total)`` is called after each batch of entries. Returns a report."""
        self._live()
        self.flush()
        return disk_check.check(self, fix, deep, batch, progress)

    def read_canonical(self, keys: BlockKeys, block_size: int | None = None) -> list[Any]:
        """Each block's canonical bytes (docs/spec.md 7: header + payload) as stored, verified (spec 7.3,
        with ``block_size`` tokens when given, and the index's checksum); per key the bytes, a
        FileNotFoundError, a CorruptBlockError or an OSError. Nothing is changed or removed."""
        self._live()
        return disk_check.read_canonical(self, keys, block_size)

    # ---- accounting ----------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def used_bytes(self) -> int:
        return len(self) * self.slot_bytes

    def __len__(self) -> int:
        self._live()
        return self.index.count()

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s.update(path=self.root, data_path=self.io.name, direct_io=self.direct, durable=self.durable, policy=self.policy.name,
                 slot_bytes=self.slot_bytes, slots=self.num_slots, **self.counters, **self.device.stats())  # fmt: skip
        return s

    # ---- access statistics -------------------------------------------------------------
    def _record_access(self, slots: list[int]) -> None:
        now = _now_us()
        with self._lock:
            for j, s in enumerate(slots):
                c, _ = self._touched.get(s, (0, 0))
                self._touched[s] = (c + 1, now - j)
            flush = len(self._touched) >= 4096
        if flush:
            self.flush()

    def _take_touched(self) -> dict[int, tuple[int, int]]:
        with self._lock:
            t, self._touched = self._touched, {}
        return t

    def flush(self) -> None:
        """Write buffered access statistics to the index and free slots held by deletes (both done
        lazily with the next write). Statistics only steer eviction order, so on a full disk they are
        dropped rather than failing a read; held slots stay held (freed by the next reserve)."""
        touched = self._take_touched()
        with self._lock:
            orphans, self._orphans = self._orphans, []
        if touched or orphans:

            def fn(txn: Any) -> None:
                self.index.touch(txn, touched, self.policy.rank)
                self.index.commit(txn, 0, [], orphans)

            try:
                self.index.write(fn)
            except OSError:
                with self._lock:
                    self._orphans.extend(orphans)

    def _publish_evicted(self, gone: list[tuple[int, int, int]]) -> None:
        if not gone:
            return
        self.counters["evictions"] += len(gone)
        by_ns: dict[int, list[tuple[int, int, int]]] = {}
        for g in gone:
            by_ns.setdefault(g[0], []).append(g)
        for batch in by_ns.values():
            self.events.publish(EventKind.EVICTED, self.name, _keys_of(batch))

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        with self._lock:
            self._closed = True
        self.segs.close()
        self.io.close()
        self.device.close()
        self.index.close()
        for ix in self._retired:
            ix.close()

    def _live(self) -> None:
        if self._closed:
            raise TierClosedError(f"tier {self.name!r} is closed")
        if self.index.broken is not None:  # damaged, or replaced by another process's rebuild
            self._heal(self.index.broken)

    @classmethod
    def from_options(cls, location: str, options: dict[str, Any], **common: Any) -> DiskTier:
        if not location:
            raise ConfigError("a disk tier URL needs a path: file:///var/cache/kvbm?capacity=100GiB")
        for flag in ("durable", "direct", "gds_write"):
            if flag in options:
                options[flag] = _bool(options[flag])
        if "index_wait" in options:
            options["index_wait"] = float(options["index_wait"])
        return cls(location, capacity=options.pop("capacity", "10GiB"), **common, **options)


def _restore_marks(root: str, index: DiskIndex) -> None:
    """Restore retain shares kept beside the data that the index lacks (it was rebuilt: its blocks'
    ranks, retained ones too, are lost; a rerun of ``prepopulate --retain`` marks them again)."""
    want = read_retains(root)
    if not want:
        return
    try:
        with index.read() as txn:
            have = index.marks(txn)
        for ns, share in want.items():
            if have.get(ns) != share:
                index.write(partial(index.set_mark, ns=ns, share=share))
    except (OSError, lmdb.Error):
        pass  # applied at the next open


def _keys_of(batch: list[tuple[int, int, int]]) -> BlockKeys:
    return BlockKeys(
        batch[0][0], np.array([b[1] for b in batch], np.uint64), np.array([b[2] for b in batch], np.uint64)
    )


def _now_us() -> int:
    return time.time_ns() // 1000


def _bool(v: Any) -> bool:
    from kvbm_fs.tiers.host import _bool as b

    return b(v)
