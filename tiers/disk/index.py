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
           b"retain/<id>" | b"retained" -> share (f64) of a retained namespace | its blocks (u64)

Retained blocks (a prepopulation's) carry :data:`PRIORITY` in their rank, so they sort after every
ordinary block and eviction reaches them only past their share (docs/operations.md).

LMDB has no page checksums and trusts its file: a truncated or damaged ``data.mdb`` can
crash the process (SIGBUS, heap corruption) before any error is raised. So an index is
checked before LMDB opens it (:func:`read_meta`: the meta pages and the file size, and the
seal written at clean close, :func:`seal`), every LMDB or decoding error on a read is a miss,
and on a write an :class:`~kvbm_fs.errors.IndexCorruptError`. A damaged index is marked
(``index/damaged``) and rebuilt from the segments (tiers/disk/rebuild.py). docs/architecture.md 1.6.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import lmdb
import numpy as np

from kvbm_fs.errors import IndexCorruptError
from kvbm_fs.tier import retain_budget, retention_victims
from kvbm_fs.tiers.disk.seal import SEAL, IndexLock, fsync_dir, mark_damaged, seal

KEY = struct.Struct(">QQ")
SLOT = struct.Struct(">Q")
VAL = struct.Struct("<QQQQQII")  # slot, parent, csum lo, csum hi, rank, payload_len, hits
OWNER = struct.Struct("<QQ")
U64 = struct.Struct("<Q")
F64 = struct.Struct("<d")
T = TypeVar("T")
PRIORITY = 1 << 63  # rank bit of retained blocks (policies rank below 2**63)
RETAINED = b"retained"


def retain_key(ns: int) -> bytes:
    return b"retain/%016x" % ns


class _Short(Exception):
    """Aborts an eviction transaction that found fewer victims than asked for."""


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


_KEYS = np.dtype([("ns", ">u8"), ("h", ">u8")])  # the layout of KEY (">QQ")


def _pack_keys(ns: int, hashes: np.ndarray) -> list[bytes]:
    """All keys of a batch packed by numpy in one pass (30% faster lookups at 10M entries)."""
    a = np.empty(hashes.size, _KEYS)
    a["ns"] = ns
    a["h"] = hashes
    return np.frombuffer(a.tobytes(), f"V{KEY.size}").tolist()  # void items keep trailing NUL bytes


def process_identity(pid: int | None = None) -> tuple[int, int]:
    """(pid, start time in clock ticks): a pid alone can be reused after its process dies."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return pid, int(fields[19])
    except (OSError, IndexError, ValueError):
        return pid, 0


class _Envs:
    """One LMDB environment per index directory per process, shared by every DiskIndex on it:
    LMDB forbids opening one environment twice in a process (its locks are per process),
    and two tiers, or a tier and ``kvbm_fs.check``, may well open one directory in one process.

    Each process holds ``index/users.lock`` shared while it has the environment open; the last
    one out (its exclusive try succeeds) seals the index, and the first one in removes the seal."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[int, int], list[Any]] = {}  # (st_dev, st_ino) -> [env, refs, users fd, damaged]

    def is_open(self, path: str) -> bool:
        """Open, and not found damaged, in this process (then it was checked when it was opened)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        with self._lock:
            ent = self._open.get((st.st_dev, st.st_ino))
            return ent is not None and not ent[3]

    def acquire(self, path: str, map_size: int) -> Any:
        os.makedirs(path, exist_ok=True)
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)  # not the path: a directory removed and recreated is a new one
        with self._lock:
            ent = self._open.get(key)
            if ent is not None and ent[3]:  # LMDB allows one environment per file and process
                raise IndexCorruptError(errno.EUCLEAN, f"disk tier index {path} was found damaged in this process")
            if ent is None:
                users = os.open(os.path.join(path, "users.lock"), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(users, fcntl.LOCK_SH)  # waits for a last closer still sealing
                    if os.path.exists(os.path.join(path, SEAL)):  # opened for writing: no longer sealed
                        os.unlink(os.path.join(path, SEAL))
                        fsync_dir(path)
                    env = lmdb.open(
                        path, map_size=map_size, max_dbs=8, subdir=True, sync=True, metasync=False,
                        readahead=False, max_readers=1024, lock=True,
                    )  # fmt: skip
                except BaseException:
                    os.close(users)
                    raise
                ent = self._open[key] = [env, 0, users, False]
            ent[1] += 1
            return ent[0]

    def damaged(self, env: Any) -> None:
        with self._lock:
            for ent in self._open.values():
                if ent[0] is env:
                    ent[3] = True

    def release(self, env: Any, path: str) -> None:
        with self._lock:
            for key, ent in self._open.items():
                if ent[0] is env:
                    ent[1] -= 1
                    if ent[1] == 0:
                        del self._open[key]
                        _close_env(ent, path, key)
                    return


def _close_env(ent: list[Any], path: str, key: tuple[int, int]) -> None:
    """Close an environment; if no other process has the index open and it is not damaged, seal it."""
    env, _, users, damaged = ent
    try:
        if not damaged:
            env.sync(True)
        env.close()
        if damaged or not _try_flock(users, fcntl.LOCK_EX):
            return
        gate = IndexLock(os.path.dirname(path))
        try:
            st = os.stat(path)
            if gate.acquire(wait=0) and (st.st_dev, st.st_ino) == key:  # not while a rebuild replaces it
                seal(path)
        finally:
            gate.close()
    except (lmdb.Error, OSError):
        pass  # no seal: the next open checks only the size and the meta pages
    finally:
        os.close(users)


def _try_flock(fd: int, op: int) -> bool:
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


_envs = _Envs()
DBS = (b"blocks", b"slots", b"order", b"free", b"pending", b"meta")
# LMDB errors that mean the file is not a consistent B-tree, and what decoding a damaged value raises.
CORRUPT = (
    lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PageFullError, lmdb.InvalidError, lmdb.BadTxnError,
    lmdb.IncompatibleError, lmdb.BadValsizeError, lmdb.VersionMismatchError, lmdb.BadDbiError, struct.error,
)  # fmt: skip


def _reraise(e: Exception, path: str) -> NoReturn:
    """Raise an LMDB error carrying a system errno (no space, file too large, permission, I/O) as the
    ``OSError`` it is, and LMDB's own negative codes (readers full, ...) as an IndexCorruptError (EIO)."""
    code = getattr(e, "code", 0)
    if not isinstance(code, int) or code <= 0:
        raise IndexCorruptError(errno.EIO, f"disk tier index {path}: LMDB: {e}") from e
    raise OSError(code, f"disk tier index {path}: {os.strerror(code)}") from e


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
    def __init__(self, path: str, map_size: int = 64 << 30, *, gated: bool = True) -> None:
        # A large map costs nothing (the file is sparse) and makes resizes, which are unsafe while
        # other threads hold transactions, rare: 64 GiB holds ~400M entries at ~136 B each.
        # ``gated``: writes take root/.index.lock shared (a rebuild's own new index is not gated).
        self.path = path
        self.owner = process_identity()
        self.broken: str | None = None  # why this index can no longer be used (damaged, or replaced)
        self._closed = True
        self.lock = IndexLock(os.path.dirname(os.path.abspath(path))) if gated else None
        try:
            self.env = _envs.acquire(path, map_size)
        except lmdb.Error as e:
            self._drop_lock()
            _reraise(e, path)
        except BaseException:
            self._drop_lock()
            raise
        self._closed = False
        st = os.stat(path)
        self._ino = (st.st_dev, st.st_ino)
        try:
            self.env.reader_check()  # clear reader slots left by killed processes
            self.blocks, self.slots, self.order, self.free, self.pending, self.meta = self.write(
                lambda txn: [self.env.open_db(name, txn=txn) for name in DBS]
            )
        except BaseException:
            self.close()
            raise

    def _drop_lock(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    # ---- damage --------------------------------------------------------------------------
    def _damage(self, e: BaseException) -> IndexCorruptError:
        """Stop using this index: it raised a corruption error. Marked for a rebuild at the next open."""
        why = f"{type(e).__name__}: {e}"
        if self.broken is None:
            self.broken = why
            _envs.damaged(self.env)
            if not self._replaced():
                mark_damaged(self.path, why)
        return IndexCorruptError(errno.EUCLEAN, f"disk tier index {self.path} is damaged ({why})")

    def _replaced(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._ino

    def _gate(self) -> None:
        """Before a write: refuse while a rebuild holds the index lock, or once the index was replaced."""
        if self.broken is not None:
            raise IndexCorruptError(errno.EUCLEAN, f"disk tier index {self.path}: {self.broken}")
        if self.lock is None:
            return
        if not self.lock.acquire(wait=0):
            raise IndexCorruptError(errno.EAGAIN, f"disk tier index {self.path} is being rebuilt")
        if self._replaced():
            self.lock.release()
            self.broken = "replaced by a rebuild"
            raise IndexCorruptError(errno.ESTALE, f"disk tier index {self.path} was {self.broken}")

    # ---- transactions --------------------------------------------------------------------
    def write(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(txn)`` in one write transaction, growing the map when it is full.

        A full or failing disk under the index (ENOSPC, EFBIG, EIO ...) raises ``OSError``
        with that errno, so callers can refuse the operation instead of crashing on an LMDB type;
        a damaged index raises IndexCorruptError (an OSError too) and is not used again."""
        self._gate()
        try:
            while True:
                try:
                    with self._begin(write=True) as txn:
                        return fn(txn)
                except lmdb.MapFullError:
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)
                except CORRUPT as e:
                    raise self._damage(e) from None
                except lmdb.Error as e:
                    _reraise(e, self.path)
        finally:
            if self.lock is not None:
                self.lock.release()

    def read(self) -> Any:
        return self._begin(write=False)

    def _begin(self, write: bool) -> Any:
        """Begin a transaction; if another process grew the map, adopt its size first (else LMDB
        refuses every transaction in this process with MDB_MAP_RESIZED)."""
        try:
            return self.env.begin(write=write, buffers=False)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.env.begin(write=write, buffers=False)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _envs.release(self.env, self.path)
        self._drop_lock()

    # ---- lookups (an index error is a miss) ----------------------------------------------
    def _guard(self, e: Exception) -> None:
        if isinstance(e, CORRUPT):
            self._damage(e)

    def records(self, ns: int, hashes: np.ndarray) -> list[Record | None]:
        if self.broken is None:
            keys = _pack_keys(ns, hashes)
            try:
                with self.read() as txn:
                    get, db = txn.get, self.blocks
                    return [None if (v := get(k, db=db)) is None else Record.unpack(v) for k in keys]
            except (lmdb.Error, struct.error) as e:
                self._guard(e)
        return [None] * len(hashes)

    def contains(self, ns: int, hashes: np.ndarray) -> np.ndarray:
        if self.broken is None:
            keys = _pack_keys(ns, hashes)
            try:
                with self.read() as txn:
                    return np.fromiter(map(txn.cursor(self.blocks).set_key, keys), bool, len(keys))
            except (lmdb.Error, struct.error) as e:
                self._guard(e)
        return np.zeros(len(hashes), bool)

    def count(self) -> int:
        if self.broken is None:
            try:
                with self.read() as txn:
                    return int(txn.stat(self.blocks)["entries"])
            except (lmdb.Error, struct.error) as e:
                self._guard(e)
        return 0

    def hwm(self, txn: Any) -> int:
        v = txn.get(b"hwm", db=self.meta)
        return U64.unpack(v)[0] if v else 0

    def iter_keys(self) -> Iterator[tuple[int, int, int]]:
        if self.broken is not None:
            return
        try:
            with self.read() as txn:
                for k, v in txn.cursor(self.blocks):
                    ns, h = KEY.unpack(k)
                    yield ns, h, Record.unpack(v).parent
        except (lmdb.Error, struct.error) as e:
            self._guard(e)

    def namespace_docs(self) -> list[bytes]:
        """The namespace descriptions bound in this index (``meta`` ``ns/<id>``: canonical JSON)."""
        out: list[bytes] = []
        if self.broken is None:
            try:
                with self.read() as txn:
                    cur = txn.cursor(self.meta)
                    if cur.set_range(b"ns/"):
                        for k, v in cur:
                            if not k.startswith(b"ns/"):
                                break
                            out.append(bytes(v))
            except (lmdb.Error, struct.error) as e:
                self._guard(e)
        return out

    # ---- allocation ----------------------------------------------------------------------
    def allocate(
        self, txn: Any, n: int, num_slots: int, protect: set[int], evict: bool = True
    ) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Up to ``n`` slots for writing: free list, then never-used slots, then slots of writers that
        died mid-put, then the coldest unprotected blocks (evicted in this transaction).
        Returns (slots, evicted keys)."""
        got = self._take_free(txn, n)
        hwm = self.hwm(txn)
        fresh = min(n - len(got), num_slots - hwm)
        if fresh > 0:
            got.extend(range(hwm, hwm + fresh))
            txn.put(b"hwm", U64.pack(hwm + fresh), db=self.meta)
        if len(got) < n and self.reclaim_pending(txn):  # a writer died mid-put: its slots come first
            got.extend(self._take_free(txn, n - len(got)))
        evicted = self._evict(txn, n - len(got), protect, got, num_slots) if len(got) < n and evict else []
        mine = OWNER.pack(*self.owner)
        for s in got:  # a slot handed out twice would overwrite a block: the index is damaged
            k = SLOT.pack(s)
            if (
                s >= num_slots
                or txn.get(k, db=self.slots) is not None
                or not txn.put(k, mine, db=self.pending, overwrite=False)
            ):
                raise struct.error(f"slot {s} is free in the index but used, pending or out of range")
        return got, evicted

    def _take_free(self, txn: Any, n: int) -> list[int]:
        out: list[int] = []
        cur = txn.cursor(self.free)
        ok = cur.first()
        while ok and len(out) < n:
            out.append(SLOT.unpack(cur.key())[0])
            ok = cur.delete() and bool(cur.key())  # deleting the last item leaves the cursor unpositioned
        return out

    def _evict(
        self, txn: Any, n: int, protect: set[int], into: list[int], num_slots: int
    ) -> list[tuple[int, int, int]]:
        """Evict up to ``n`` unprotected blocks by the retention rule (:meth:`_victims`)."""
        held = self.retained(txn)
        evicted: list[tuple[int, int, int]] = []
        dropped = 0
        for r, slot in self._victims(txn, n, protect, num_slots, held):
            txn.delete(KEY.pack(r, slot), db=self.order)
            evicted.append(self._drop_slot(txn, slot))
            into.append(slot)
            dropped += r >= PRIORITY
        if dropped:
            txn.put(RETAINED, U64.pack(max(held - dropped, 0)), db=self.meta)
        return evicted

    def _victims(self, txn: Any, n: int, protect: set[int], num_slots: int, held: int) -> list[tuple[int, int]]:
        """The next ``n`` unprotected (rank, slot) the retention rule (:func:`retention_victims`) takes,
        in its order: retained blocks (``held`` of them) rank after all others and come first only past
        their share. Reads only the part of the order it may take: the first ``n`` ordinary blocks and,
        past the share, the first retained ones. Eviction and demotion (:meth:`coldest`) share it."""
        budget = self.budget(txn, num_slots) if held else 0
        cur = txn.cursor(self.order)
        window = self._window(cur, cur.first(), n, protect, PRIORITY if held else None)
        if held > budget:
            window += self._window(cur, cur.set_range(KEY.pack(PRIORITY, 0)), min(n, held - budget), protect)
        if not window:
            return []
        rank = np.array([r for r, _ in window], np.uint64)
        kept = rank >= np.uint64(PRIORITY) if held else np.zeros(rank.size, bool)
        return [window[i] for i in retention_victims(rank, kept, n, budget, held=held).tolist()]

    @staticmethod
    def _window(cur: Any, ok: bool, n: int, protect: set[int], stop: int | None = None) -> list[tuple[int, int]]:
        """The next ``n`` unprotected (rank, slot) entries of the order from the cursor on, below ``stop``."""
        out: list[tuple[int, int]] = []
        while ok and len(out) < n:
            rank, slot = KEY.unpack(cur.key())
            if stop is not None and rank >= stop:
                break
            if slot not in protect:
                out.append((rank, slot))
            ok = cur.next()
        return out

    # ---- retained namespaces -------------------------------------------------------------
    def retained(self, txn: Any) -> int:
        v = txn.get(RETAINED, db=self.meta)
        return U64.unpack(v)[0] if v else 0

    def marks(self, txn: Any) -> dict[int, float]:
        """{namespace id: share} of the retained namespaces."""
        out: dict[int, float] = {}
        cur = txn.cursor(self.meta)
        if cur.set_range(b"retain/"):
            for k, v in cur:
                if not k.startswith(b"retain/"):
                    break
                out[int(k[7:], 16)] = F64.unpack(v)[0]
        return out

    def budget(self, txn: Any, num_slots: int) -> int:
        """How many retained blocks eviction skips: the largest share among the marks."""
        return retain_budget(self.marks(txn).values(), num_slots)

    def set_mark(self, txn: Any, ns: int, share: float | None) -> None:
        """Mark ``ns`` retained with ``share`` (None: unmark); :meth:`rerank` moves its blocks
        (:meth:`DiskTier.retain` splits millions of them over several transactions)."""
        if share is None:
            txn.delete(retain_key(ns), db=self.meta)
        else:
            txn.put(retain_key(ns), F64.pack(share), db=self.meta)

    def namespace_hashes(self, txn: Any, ns: int) -> np.ndarray:
        """Every block hash ``ns`` holds (8 bytes a block: millions fit)."""
        out: list[int] = []
        cur = txn.cursor(self.blocks)
        prefix = KEY.pack(ns, 0)[:8]
        if cur.set_range(prefix):
            for k in cur.iternext(keys=True, values=False):
                if k[:8] != prefix:
                    break
                out.append(KEY.unpack(k)[1])
        return np.array(out, np.uint64)

    def rerank(self, txn: Any, ns: int, hashes: np.ndarray, retained: bool) -> int:
        """Give the held blocks ``hashes`` of ``ns`` the retained rank bit (or take it away); how many changed."""
        want = PRIORITY if retained else 0
        todo: list[tuple[bytes, Record]] = []
        for k in _pack_keys(ns, hashes):
            v = txn.get(k, db=self.blocks)
            rec = Record.unpack(v) if v is not None else None
            if rec is not None and rec.rank & PRIORITY != want:
                todo.append((k, rec))
        for k, rec in todo:
            txn.delete(KEY.pack(rec.rank, rec.slot), db=self.order)
            rec.rank = (rec.rank & ~PRIORITY) | want
            txn.put(KEY.pack(rec.rank, rec.slot), b"", db=self.order)
            txn.put(k, rec.pack(), db=self.blocks)
        held = self.retained(txn) + (len(todo) if want else -len(todo))
        txn.put(RETAINED, U64.pack(max(held, 0)), db=self.meta)
        return len(todo)

    def _drop_slot(self, txn: Any, slot: int) -> tuple[int, int, int]:
        """Remove the entry in ``slot`` from blocks/slots (the caller handles order and free)."""
        kb = txn.pop(SLOT.pack(slot), db=self.slots)
        raw = txn.pop(kb, db=self.blocks) if kb is not None else None
        if raw is None:  # the eviction order names a slot the other tables do not know: damage
            raise struct.error(f"slot {slot} is ordered but has no entry")
        ns, h = KEY.unpack(kb)
        return ns, h, Record.unpack(raw).parent

    def coldest(self, n: int, protect: set[int], num_slots: int) -> list[tuple[int, int, int]]:
        """The next ``n`` blocks (ns, hash, parent) eviction would take (:meth:`_victims`: retained ones
        only past their share, oldest first), without touching them: what the daemon demotes."""
        out: list[tuple[int, int, int]] = []
        if self.broken is not None:
            return out
        try:
            with self.read() as txn:
                for _, slot in self._victims(txn, n, protect, num_slots, self.retained(txn)):
                    kb = txn.get(SLOT.pack(slot), db=self.slots)
                    raw = txn.get(kb, db=self.blocks) if kb else None
                    if kb is not None and raw is not None:
                        ns, h = KEY.unpack(kb)
                        out.append((ns, h, Record.unpack(raw).parent))
        except (lmdb.Error, struct.error) as e:
            self._guard(e)
        return out

    def evict(self, n: int, protect: set[int], num_slots: int = 0) -> list[tuple[int, int, int]]:
        """Evict exactly ``n`` blocks (or none) and free their slots."""

        def fn(txn: Any) -> list[tuple[int, int, int]]:
            if txn.stat(self.order)["entries"] - len(protect) < n:
                return []
            slots: list[int] = []
            gone = self._evict(txn, n, protect, slots, num_slots)
            if len(gone) < n:  # retained blocks within their share: abort, evicting none
                raise _Short
            for s in slots:
                txn.put(SLOT.pack(s), b"", db=self.free)
            return gone

        try:
            return self.write(fn)
        except _Short:
            return []

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

    def remove(self, txn: Any, ns: int, h: int, only_slot: int | None = None, hold: bool = False) -> Record | None:
        """Delete one entry (if it still lives in ``only_slot`` when given) and free its slot, or with
        ``hold`` keep the slot pending for this process (freed by ``commit(txn, 0, [], slots)``)."""
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
        if rec.rank >= PRIORITY:
            txn.put(RETAINED, U64.pack(max(self.retained(txn) - 1, 0)), db=self.meta)
        if hold:
            txn.put(SLOT.pack(rec.slot), OWNER.pack(*self.owner), db=self.pending)
        else:
            txn.put(SLOT.pack(rec.slot), b"", db=self.free)
        return rec

    def touch(self, txn: Any, hits: dict[int, tuple[int, int]], rank_of: Callable[[int, int], int]) -> None:
        """Apply buffered accesses {slot: (count, last access us)} to records and the eviction order,
        re-ranked by the policy's ``rank_of(last_access_us, hits)``."""
        for slot, (count, last) in hits.items():
            kb = txn.get(SLOT.pack(slot), db=self.slots)
            raw = txn.get(kb, db=self.blocks) if kb else None
            if raw is None:
                continue
            rec = Record.unpack(raw)
            if rec.slot != slot:
                continue
            txn.delete(KEY.pack(rec.rank, slot), db=self.order)
            rec.hits = min(rec.hits + count, 0xFFFFFFFF)
            rec.rank = rank_of(last, rec.hits) | (rec.rank & PRIORITY)
            txn.put(KEY.pack(rec.rank, slot), b"", db=self.order)
            txn.put(kb, rec.pack(), db=self.blocks)

    def reclaim_pending(self, txn: Any) -> int:
        """Free slots reserved by writers that died before committing (one liveness probe per writer)."""
        alive = {OWNER.pack(*self.owner): True}
        dead = []
        for k, v in txn.cursor(self.pending):
            if v not in alive:
                alive[v] = owner_alive(OWNER.unpack(v))
            if not alive[v]:
                dead.append(k)
        for k in dead:
            txn.delete(k, db=self.pending)
            txn.put(k, b"", db=self.free)
        return len(dead)


class NullIndex(DiskIndex):
    """Stands in for an index that is being rebuilt or reopened: every lookup is a miss and every
    write is refused (IndexCorruptError), so a tier serves misses instead of blocking or failing."""

    def __init__(self, why: str) -> None:  # no environment, no lock
        self.why = why
        self.broken = why  # what a tier heals: it reopens the index in the background
        self.lock = None

    def records(self, ns: int, hashes: np.ndarray) -> list[Record | None]:
        return [None] * len(hashes)

    def contains(self, ns: int, hashes: np.ndarray) -> np.ndarray:
        return np.zeros(len(hashes), bool)

    def count(self) -> int:
        return 0

    def iter_keys(self) -> Iterator[tuple[int, int, int]]:
        return iter(())

    def coldest(self, n: int, protect: set[int], num_slots: int) -> list[tuple[int, int, int]]:
        return []

    def evict(self, n: int, protect: set[int], num_slots: int = 0) -> list[tuple[int, int, int]]:
        return []

    def reclaim_pending(self, txn: Any) -> int:
        return 0

    def write(self, fn: Callable[[Any], T]) -> T:
        raise IndexCorruptError(errno.EAGAIN, f"disk tier index unavailable: {self.why}")

    def read(self) -> Any:
        raise IndexCorruptError(errno.EAGAIN, f"disk tier index unavailable: {self.why}")

    def close(self) -> None:
        pass
