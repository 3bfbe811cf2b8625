"""The disk tier index's file, checked before LMDB maps it, and the lock a rebuild takes.

LMDB trusts ``data.mdb``: pages past the end of a truncated file are a SIGBUS, and a damaged
page can corrupt the heap before LMDB notices anything. So before a process opens an index it
reads both meta pages itself (:func:`read_meta`) and, after a clean close, compares the file with
the seal the last process wrote (:func:`seal`, :func:`check_seal`). docs/spec.md 7.6.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import threading
import time
from dataclasses import dataclass

import xxhash

from kvbm_fs.errors import IndexCorruptError

DATA = "data.mdb"
SEAL = "data.mdb.seal"  # written at clean close by the last process, removed by the next opener
DAMAGED = "damaged"  # marker: a process saw LMDB fail on this index; the next open rebuilds it
SEAL_FORMAT = "kvbm_fs.index-seal.v1"
SEAL_HASH_MAX = 1 << 30  # bigger index files are sealed by size and txnid only (docs/spec.md 7.6)
P_META, MDB_MAGIC, MDB_VERSION, P_INVALID = 0x08, 0xBEEFC0DE, 1, (1 << 64) - 1
_PAGE = struct.Struct("<QHH")  # MDB_page header: pgno, pad, flags (16 bytes with lower/upper)
_MAGIC = struct.Struct("<II")  # MDB_meta at +16: magic, version (then address, mapsize)
_DB = struct.Struct("<IHHQQQQQ")  # MDB_db: pad (page size in the free DB), flags, depth, pages x3, entries, root
_TAIL = struct.Struct("<QQ")  # MDB_meta at +136: last page number, txnid


@dataclass(frozen=True, slots=True)
class Meta:
    """The meta page LMDB will use (the newer of the two)."""

    psize: int
    last_pg: int
    txnid: int


def read_meta(path: str) -> Meta:
    """Parse and cross-check both meta pages of ``path`` (a data.mdb) without mapping it: magic,
    version, page numbers and flags, page size, txnid parity, roots and page counts within the
    last page, and the file at least as long as the newer meta's last page. IndexCorruptError if not."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(2 << 16)

    def bad(why: str) -> IndexCorruptError:
        return IndexCorruptError(errno.EUCLEAN, f"disk tier index {path}: {why}")

    if len(head) < 2 * 512:
        raise bad(f"file has {size} bytes, less than two meta pages")
    psize = _DB.unpack_from(head, 40)[0]
    if psize < 512 or psize > 1 << 16 or psize & (psize - 1) or len(head) < 2 * psize:
        raise bad(f"page size {psize} in meta page 0 is not a power of two in 512..65536 within the file")
    metas = []
    for i in (0, 1):
        o = i * psize
        pgno, _, flags = _PAGE.unpack_from(head, o)
        magic, version = _MAGIC.unpack_from(head, o + 16)
        dbs = [_DB.unpack_from(head, o + 40 + 48 * j) for j in (0, 1)]
        last, txnid = _TAIL.unpack_from(head, o + 136)
        if pgno != i or not flags & P_META or magic != MDB_MAGIC or version != MDB_VERSION:
            raise bad(f"meta page {i} is not an LMDB meta page (pgno {pgno}, flags {flags:#x}, magic {magic:#x})")
        if dbs[0][0] != psize:
            raise bad(f"meta pages disagree on the page size ({psize}, {dbs[0][0]})")
        if txnid and txnid & 1 != i:
            raise bad(f"meta page {i} holds txnid {txnid} (LMDB alternates even/odd)")
        if last < 1:
            raise bad(f"meta page {i} has last page {last}")
        for _, _, depth, branch, leaf, overflow, entries, root in dbs:
            if root == P_INVALID:
                if entries or depth:
                    raise bad(f"meta page {i}: an empty tree with {entries} entries")
            elif not (2 <= root <= last) or not (1 <= depth <= 64) or branch + leaf + overflow > last + 1:
                raise bad(f"meta page {i}: a tree rooted at page {root}, depth {depth}, outside {last + 1} pages")
        metas.append(Meta(psize, last, txnid))
    m = max(metas, key=lambda m: m.txnid)
    if size < (m.last_pg + 1) * psize:
        raise bad(f"file has {size} bytes; its meta page says {(m.last_pg + 1) * psize} ({m.last_pg + 1} pages)")
    return m


def hash_file(path: str, limit: int = SEAL_HASH_MAX) -> str | None:
    """xxh3-128 of a file read in 8 MiB pieces (never mapped: a file cut short under us must not
    SIGBUS), or None when it is bigger than ``limit``."""
    if os.path.getsize(path) > limit:
        return None
    h = xxhash.xxh3_128()
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def seal(path: str) -> None:
    """Write the seal of the closed index in directory ``path``: its size, txnid and xxh3-128."""
    data = os.path.join(path, DATA)
    m = read_meta(data)
    doc = dict(format=SEAL_FORMAT, size=os.path.getsize(data), txnid=m.txnid, xxh3_128=hash_file(data))
    tmp = os.path.join(path, f"{SEAL}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, SEAL))
    fsync_dir(path)


def check_seal(path: str, meta: Meta) -> str | None:
    """Why the index in ``path`` differs from its seal, or None (also when there is no seal)."""
    try:
        with open(os.path.join(path, SEAL)) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return f"its seal cannot be read ({e})"
    data = os.path.join(path, DATA)
    if not isinstance(doc, dict) or doc.get("format") != SEAL_FORMAT:
        return "its seal is not a kvbm_fs index seal"
    if doc.get("size") != os.path.getsize(data) or doc.get("txnid") != meta.txnid:
        return (
            f"size or txnid differ from the seal written at clean close ({doc.get('size')} B, txn {doc.get('txnid')})"
        )
    want = doc.get("xxh3_128")
    if want is not None and hash_file(data) != want:
        return "its xxh3-128 differs from the seal written at clean close"
    return None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_damaged(path: str, why: str) -> None:
    """Leave ``index/damaged`` so the next open rebuilds the index even if its meta pages look fine."""
    try:
        with open(os.path.join(path, DAMAGED), "w") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}: {why}\n")
    except OSError:
        pass


class IndexLock:
    """``root/.index.lock`` (flock): shared while a process opens the index and around each write
    transaction, exclusive while the index is rebuilt. Counted per object, since flock is per open file."""

    def __init__(self, root: str) -> None:
        self.fd = os.open(os.path.join(root, ".index.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        self._mu = threading.Lock()
        self._shared = 0

    def _try(self, op: int) -> bool:
        try:
            fcntl.flock(self.fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def acquire(self, exclusive: bool = False, wait: float | None = 0.0) -> bool:
        """Take the lock, polling for up to ``wait`` seconds (None: forever)."""
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        end = None if wait is None else time.monotonic() + wait
        delay = 0.001
        while True:
            with self._mu:
                if not exclusive and self._shared:
                    self._shared += 1
                    return True
                if self._try(op):
                    self._shared += not exclusive
                    return True
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def release(self) -> None:
        with self._mu:
            if self._shared > 1:
                self._shared -= 1
                return
            self._shared = 0
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)
