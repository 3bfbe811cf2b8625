"""Open a disk tier's index safely, and rebuild a damaged or lost one from the segment files.

Every slot of a segment carries the block's codec header (key echo, parent, payload length,
xxh3-128, header checksum), so the index is a cache of what the segments say. At open,
:func:`open_index` checks the index file (tiers/disk/seal.py) and, if it is damaged, lost, or
LMDB fails on it, moves it aside to ``index.damaged-<time>-<pid>/`` and rebuilds it
(:func:`rebuild_index`) under ``root/.index.lock`` held exclusively. Other processes respect
the lock: openers wait up to a bound and then serve misses until the rebuild is done, and
writers refuse their puts meanwhile. docs/architecture.md 1.6.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable
from typing import Any

import lmdb

from kvbm_fs import codec
from kvbm_fs.errors import ConfigError, CorruptBlockError, IndexCorruptError, KvbmError
from kvbm_fs.keys import Namespace
from kvbm_fs.tiers.disk.files import HEADER_PAGE, segment_path
from kvbm_fs.tiers.disk.index import DBS, KEY, SLOT, U64, DiskIndex, NullIndex, Record, _envs
from kvbm_fs.tiers.disk.seal import DAMAGED, DATA, SEAL, IndexLock, check_seal, fsync_dir, mark_damaged, read_meta, seal

log = logging.getLogger(__name__)
INDEX_WAIT_S = 10.0  # how long an opener waits for another process's rebuild before serving misses
BATCH = 65536  # entries per write transaction of a rebuild
KEEP_ASIDE = 2  # old indexes kept of each kind (index.damaged-*, index.old-*); older ones are deleted


# ---- namespace descriptions next to the data -------------------------------------------------
def namespace_path(root: str, ns_id: int) -> str:
    return os.path.join(root, "namespaces", f"{ns_id:016x}.json")


def write_namespace(root: str, ns: Namespace) -> None:
    """``root/namespaces/<id>.json``, written once and atomically: what operators list, and what
    a rebuild restores the index's ``ns/<id>`` entries from."""
    path = namespace_path(root, ns.id)
    if not os.path.exists(path):
        _write_json(path, dict(ns.to_dict(), id=ns.short_id), indent=1, sort_keys=True)


def _write_json(path: str, doc: dict[str, Any], **dump: Any) -> None:
    """``doc`` as JSON at ``path``, atomically (a temporary file, fsync, rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, **dump)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_namespaces(root: str) -> dict[int, Namespace]:
    """The namespace descriptions in ``root/namespaces``; unreadable files are skipped."""
    out: dict[int, Namespace] = {}
    folder = os.path.join(root, "namespaces")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                doc = json.load(f)
            ns = Namespace.from_dict(doc)  # checks the recorded id (16 hex digits) against the content
        except (OSError, ValueError, TypeError, AttributeError, KvbmError):
            continue
        out[ns.id] = ns
    return out


def retain_path(root: str, ns_id: int) -> str:
    return os.path.join(root, "namespaces", f"{ns_id:016x}.retain")


def write_retain(root: str, ns_id: int, share: float | None) -> None:
    """``namespaces/<id>.retain`` ({"share": ...}), or none (``share`` None): the retain mark kept
    beside the description (not in it: a build that does not know the field would skip the namespace),
    and what a reopened or rebuilt index takes its marks from."""
    path = retain_path(root, ns_id)
    if share is None:
        if os.path.exists(path):
            os.unlink(path)
        return
    _write_json(path, {"share": share})


def read_retains(root: str) -> dict[int, float]:
    """{namespace id: share} of the retain marks in ``root/namespaces``; unreadable ones are skipped."""
    out: dict[int, float] = {}
    folder = os.path.join(root, "namespaces")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".retain"):
            try:
                with open(os.path.join(folder, name)) as f:
                    out[int(name[:-7], 16)] = float(json.load(f)["share"])
            except (OSError, ValueError, TypeError, KeyError):
                continue
    return out


# ---- open ------------------------------------------------------------------------------------
def inspect(root: str) -> str | None:
    """Why the index of the tier at ``root`` must be rebuilt before it is opened, or None.
    O(1) but for the seal's hash (docs/spec.md 7.6)."""
    path = os.path.join(root, "index")
    marker = os.path.join(path, DAMAGED)
    if os.path.exists(marker):
        try:
            with open(marker) as f:
                return f"marked damaged: {f.read().strip()}"
        except OSError:
            return "marked damaged"
    data = os.path.join(path, DATA)
    if not os.path.exists(data) or os.path.getsize(data) == 0:
        has_data = os.path.exists(os.path.join(root, "seg", "0000", "000000.seg"))
        return "index lost (no index/data.mdb) but segments exist" if has_data else None
    try:
        meta = read_meta(data)
    except IndexCorruptError as e:
        return str(e)
    except OSError as e:
        return f"index/data.mdb cannot be read: {e}"
    return check_seal(path, meta)


def open_index(root: str, wait: float | None = INDEX_WAIT_S) -> DiskIndex:
    """The tier's index, checked, and rebuilt first if damaged. If another process holds the
    rebuild lock for longer than ``wait`` seconds, a NullIndex (misses) is returned instead."""
    path = os.path.join(root, "index")
    lock = IndexLock(root)
    try:
        for attempt in range(3):
            if not lock.acquire(wait=wait):
                return NullIndex("another process is rebuilding the index")
            try:
                why = None if _envs.is_open(path) else inspect(root)
                if why is None:
                    try:
                        return _probe(DiskIndex(path))
                    except (lmdb.Error, struct.error, IndexCorruptError) as e:
                        why = f"LMDB failed on it: {e}"
                        if not _envs.is_open(path):
                            mark_damaged(path, why)
            finally:
                lock.release()
            log.warning("disk tier index %s: %s; rebuilding it from the segments", path, why)
            try:
                report = rebuild_index(root, reason=why, _only_if_damaged=attempt == 0, _wait=wait)
            except IndexCorruptError as e:
                if e.errno == errno.EAGAIN:  # another process is rebuilding it: serve misses meanwhile
                    return NullIndex(str(e))
                raise
            log.warning("disk tier index %s rebuilt: %s", path, report)
        raise IndexCorruptError(errno.EUCLEAN, f"disk tier index {path} is still damaged after a rebuild")
    finally:
        lock.close()


def backfill_namespaces(root: str, ix: DiskIndex) -> None:
    """Write ``namespaces/<id>.json`` for namespaces an index bound before those files existed."""
    try:
        for doc in ix.namespace_docs():
            write_namespace(root, Namespace.from_dict(json.loads(doc)))
    except (OSError, ValueError, TypeError, KvbmError):
        pass  # a description that cannot be written now is written at the next bind


def _probe(ix: DiskIndex) -> DiskIndex:
    """Walk one root-to-leaf path of every table, so a damaged tree fails here, not in a get."""
    try:
        with ix.read() as txn:
            for db in (ix.blocks, ix.slots, ix.order, ix.free, ix.pending, ix.meta):
                txn.stat(db)
                cur = txn.cursor(db)
                for k, v in (cur.item() if cur.first() else (b"", b""), cur.item() if cur.last() else (b"", b"")):
                    if db is ix.blocks and k:
                        KEY.unpack(k)
                        Record.unpack(v)
        ix.write(ix.reclaim_pending)
    except BaseException:
        ix.close()
        raise
    return ix


# ---- rebuild ---------------------------------------------------------------------------------
def rebuild_index(
    root: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    deep: bool = False,
    reason: str = "requested",
    _only_if_damaged: bool = False,
    _wait: float | None = None,
) -> dict[str, Any]:
    """Rebuild ``root/index`` from the segment files' headers; the old index goes to
    ``root/index.damaged-<time>-<pid>/`` (``index.old-...`` when no damage was the reason). ``deep`` also checks every payload against its xxh3-128
    (else the reads that serve a block do). ``progress(slots done, slots total)`` is called per
    segment. Returns a report (counts, restored namespaces, where the old index went)."""
    root = os.path.abspath(root)
    geo = _geometry(root)
    lock = IndexLock(root)
    try:
        if not lock.acquire(exclusive=True, wait=_wait):
            raise IndexCorruptError(errno.EAGAIN, f"disk tier index in {root} is being rebuilt by another process")
        try:
            if _only_if_damaged and inspect(root) is None:  # another process rebuilt it while we waited
                return dict(reason=reason, skipped="rebuilt by another process")
            return _rebuild(root, geo, progress, deep, reason)
        finally:
            lock.release()
    finally:
        lock.close()


def _geometry(root: str) -> dict[str, int]:
    path = os.path.join(root, "kvbm_fs.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        return {k: int(meta[k]) for k in ("block_nbytes", "slot_bytes", "segment_slots", "num_slots")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{root} is not a kvbm_fs disk tier ({path}: {e})") from None


def _rebuild(
    root: str, geo: dict[str, int], progress: Callable[[int, int], None] | None, deep: bool, reason: str
) -> dict[str, Any]:
    t0 = time.monotonic()
    rep: dict[str, Any] = dict(reason=reason, deep=deep, slots_scanned=0, blocks=0, empty_slots=0,
                               bad_headers=0, bad_payloads=0, duplicates=0)  # fmt: skip
    found = _scan(root, geo, progress, deep, rep)
    for name in os.listdir(root):  # left by a rebuild that was killed (we hold the lock: none runs)
        if name.startswith("index.rebuild-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tmp = os.path.join(root, f"index.rebuild-{os.getpid()}")
    namespaces = read_namespaces(root)
    seen = {ns for ns, _ in found}
    ix = DiskIndex(tmp, gated=False)
    try:
        _fill(ix, found, {**namespaces, **dict.fromkeys(seen - set(namespaces))})
    finally:
        ix.close()
    seal(tmp)
    old = os.path.join(root, "index")
    rep["moved_aside"] = None
    if os.path.lexists(old):
        kind = "old" if reason == "requested" else "damaged"
        aside = f"{old}.{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        n, dest = 0, aside
        while os.path.lexists(dest):
            n += 1
            dest = f"{aside}-{n}"
        os.rename(old, dest)
        rep["moved_aside"] = dest
        rep["aside_removed"] = _prune_aside(root, kind, keep=dest)
    os.rename(tmp, old)
    fsync_dir(root)
    rep["blocks"] = len(found)
    rep["namespaces_restored"] = sorted(f"{i:016x}" for i in seen if i in namespaces)
    rep["namespaces_missing"] = sorted(f"{i:016x}" for i in seen if i not in namespaces)
    rep["seconds"] = round(time.monotonic() - t0, 3)
    return rep


def _prune_aside(root: str, kind: str, keep: str) -> list[str]:
    """Delete all but the newest KEEP_ASIDE indexes moved aside as ``index.<kind>-*`` (``keep`` is one)."""
    names = [n for n in os.listdir(root) if n.startswith(f"index.{kind}-")]
    paths = [os.path.join(root, n) for n in names if os.path.join(root, n) != keep]
    paths.sort(key=lambda p: (_aside_time(p), p), reverse=True)
    gone = paths[KEEP_ASIDE - 1 :]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _aside_time(path: str) -> float:
    try:
        return os.lstat(path).st_ctime  # a rename sets it: when the index was moved aside
    except OSError:
        return 0.0


def _scan(
    root: str, geo: dict[str, int], progress: Callable[[int, int], None] | None, deep: bool, rep: dict[str, Any]
) -> dict[tuple[int, int], tuple[int, codec.BlockHeader]]:
    """(ns, hash) -> (slot, header) for every slot whose header (and, ``deep``, payload) verifies."""
    nbytes, slot_bytes, seg_slots, num_slots = (
        geo[k] for k in ("block_nbytes", "slot_bytes", "segment_slots", "num_slots")
    )
    segs = [s for s in range((num_slots + seg_slots - 1) // seg_slots) if os.path.exists(segment_path(root, s))]
    total, done = len(segs) * seg_slots, 0
    found: dict[tuple[int, int], tuple[int, codec.BlockHeader]] = {}
    for seg in segs:
        with open(segment_path(root, seg), "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            n = min(seg_slots, num_slots - seg * seg_slots, size // slot_bytes)
            for i in range(n):
                slot = seg * seg_slots + i
                raw = os.pread(f.fileno(), codec.HEADER_SIZE, i * slot_bytes)
                rep["slots_scanned"] += 1
                if not any(raw):
                    rep["empty_slots"] += 1
                    continue
                try:
                    h = codec.decode_header(raw)
                    if h.payload_len != nbytes:
                        raise CorruptBlockError(f"payload length {h.payload_len}")
                except CorruptBlockError:
                    rep["bad_headers"] += 1
                    continue
                if deep:
                    body = os.pread(f.fileno(), nbytes, i * slot_bytes + HEADER_PAGE)
                    if len(body) < nbytes or codec.payload_checksum(body) != h.checksum:
                        rep["bad_payloads"] += 1
                        continue
                if (h.ns, h.seq_hash) in found:  # a stale copy in a freed slot: keep one
                    rep["duplicates"] += 1
                    continue
                found[(h.ns, h.seq_hash)] = (slot, h)
        done += seg_slots
        if progress is not None:
            progress(min(done, total), total)
    return found


def _fill(
    ix: DiskIndex, found: dict[tuple[int, int], tuple[int, codec.BlockHeader]], namespaces: dict[int, Namespace | None]
) -> None:
    """Write the entries. Their access history is gone: rank = slot, so they are evicted before any
    block written after the rebuild, oldest slot first. Slots below the high-water mark that hold
    no block are free."""
    items = sorted(found.items())
    used = {slot for slot, _ in found.values()}
    hwm = max(used) + 1 if used else 0
    for a in range(0, max(len(items), 1), BATCH):

        def put(txn: Any, part: list[Any] = items[a : a + BATCH]) -> None:
            for (ns, h), (slot, hd) in part:
                k = KEY.pack(ns, h)
                txn.put(k, Record(slot, hd.parent_hash, hd.checksum, slot, hd.payload_len, 0).pack(), db=ix.blocks)
                txn.put(SLOT.pack(slot), k, db=ix.slots)
                txn.put(KEY.pack(slot, slot), b"", db=ix.order)

        ix.write(put)

    def finish(txn: Any) -> None:
        for s in range(hwm):
            if s not in used:
                txn.put(SLOT.pack(s), b"", db=ix.free)
        txn.put(b"hwm", U64.pack(hwm), db=ix.meta)
        for i, ns in namespaces.items():
            if ns is not None:
                txn.put(b"ns/%016x" % i, ns.canonical_bytes(), db=ix.meta)

    ix.write(finish)


__all__ = [
    "DBS",
    "INDEX_WAIT_S",
    "SEAL",
    "inspect",
    "open_index",
    "read_namespaces",
    "read_retains",
    "rebuild_index",
    "write_namespace",
    "write_retain",
]
