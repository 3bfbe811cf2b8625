"""Verifying what a disk tier's slots hold: each read's checks, the offline check of the whole
index against the segments (``kvbm-fs check``, ``kvbm-fs verify``), and raw verified reads of a
block's canonical bytes (``kvbm://``, ``kvbm-fs verify``). docs/architecture.md 1.6, spec 7.3.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np

from kvbm_fs import codec, dsum
from kvbm_fs.errors import CorruptBlockError, IndexCorruptError, TruncatedBlockError
from kvbm_fs.keys import BlockKey, BlockKeys
from kvbm_fs.rows import aligned_rows
from kvbm_fs.tiers.disk.blockio import IoOp, aligned_buffer
from kvbm_fs.tiers.disk.files import HEADER_PAGE
from kvbm_fs.tiers.disk.index import KEY, OWNER, Record, owner_alive

if TYPE_CHECKING:
    from kvbm_fs.tiers.disk.tier import DiskTier

# progress(entries done, entries in all), called after each batch
Progress = Callable[[int, int], None]


def header_pages(n: int) -> np.ndarray:
    """``n`` page-aligned header pages (O_DIRECT destinations)."""
    return np.frombuffer(aligned_buffer(n * HEADER_PAGE), np.uint8).reshape(n, HEADER_PAGE)


def check_header(
    t: DiskTier, key: BlockKey, rec: Record, hdr: np.ndarray, n: int, op: IoOp | None
) -> tuple[str | None, codec.BlockHeader | None]:
    """The header half of a slot read's verification: (why not, None) or (None, the header)."""
    if op is None or n < 0:
        return f"read failed ({errno.errorcode.get(-n, n)})", None
    if n < op.nbytes:
        return f"short read ({n} of {op.nbytes} bytes: segment truncated?)", None
    try:
        h = codec.decode_header(hdr[: codec.HEADER_SIZE])
        codec.check_header(h, key, t.block_nbytes, t.block_size)
    except CorruptBlockError as e:
        return str(e), None
    if h.checksum != rec.checksum:
        return "header checksum differs from the index", None
    return None, h


def verify(
    t: DiskTier, key: BlockKey, rec: Record, hdr: np.ndarray, payload: np.ndarray, n: int, op: IoOp | None,
    deep: bool = False,
) -> str | None:  # fmt: skip
    """Why a slot read of ``key`` is not that block, or None. ``deep`` (the offline check) also holds
    the header's dsum128, what GPU loads verify, to the payload."""
    why, h = check_header(t, key, rec, hdr, n, op)
    if h is None:
        return why
    try:
        codec.verify_payload(h, payload)
    except CorruptBlockError as e:
        return str(e)
    if deep and h.dsum is not None and dsum.of(payload) != h.dsum:
        return "payload dsum128 mismatch"
    return None


# ---- the offline check -------------------------------------------------------------------------
def check(t: DiskTier, fix: bool, deep: bool, batch: int, progress: Progress | None) -> dict[str, Any]:
    """See :meth:`DiskTier.check`."""
    report: dict[str, Any] = dict(entries=0, ok=0, bad=0, bad_keys=[], stale_pending=0, fixed=0)
    todo: list[tuple[int, int, Record]] = []
    ix = t.index
    try:
        with ix.read() as txn:
            for k, v in txn.cursor(ix.blocks):
                ns, h = KEY.unpack(k)
                todo.append((ns, h, Record.unpack(v)))
            stale = [k for k, v in txn.cursor(ix.pending) if not owner_alive(OWNER.unpack(v))]
    except (lmdb.Error, struct.error) as e:
        raise IndexCorruptError(errno.EUCLEAN, f"disk tier index in {t.root} is damaged ({e}); "
                                "kvbm-fs check --rebuild-index rebuilds it") from None  # fmt: skip
    report["entries"] = len(todo)
    report["stale_pending"] = len(stale)
    for i in range(0, len(todo), batch):
        bad = _check_batch(t, todo[i : i + batch], deep)
        report["bad"] += len(bad)
        report["bad_keys"].extend((str(BlockKey(ns, h)), why) for ns, h, _, why in bad[: 100 - len(report["bad_keys"])])
        if fix and bad:
            report["fixed"] += _remove_bad(t, bad)
        if progress is not None:
            progress(min(i + batch, len(todo)), len(todo))
    report["ok"] = report["entries"] - report["bad"]
    if fix and stale:
        report["fixed"] += ix.write(ix.reclaim_pending)
    return report


def _remove_bad(t: DiskTier, bad: list[tuple[int, int, int, str]]) -> int:
    def fn(txn: Any) -> int:
        return sum(t.index.remove(txn, ns, h, slot) is not None for ns, h, slot, _ in bad)

    return t.index.write(fn)


def _check_batch(t: DiskTier, items: list[tuple[int, int, Record]], deep: bool) -> list[tuple[int, int, int, str]]:
    hdr = header_pages(len(items))
    body = np.empty((len(items), t.block_nbytes), np.uint8) if deep else None
    ops = [t._op(r.slot, hdr[j], body[j] if body is not None else hdr[j][:0]) for j, (_, _, r) in enumerate(items)]
    results = iter(t.io.read([op for op in ops if op is not None]))
    bad = []
    for j, ((ns, h, r), op) in enumerate(zip(items, ops)):
        n = next(results) if op is not None else -errno.ENOENT
        if body is not None:
            why = verify(t, BlockKey(ns, h), r, hdr[j], body[j], n, op, deep=True)
        else:
            why = check_header(t, BlockKey(ns, h), r, hdr[j], n, op)[0]
        if why is not None:
            bad.append((ns, h, r.slot, why))
    return bad


# ---- raw verified reads --------------------------------------------------------------------------
def read_canonical(t: DiskTier, keys: BlockKeys, block_size: int | None) -> list[Any]:
    """See :meth:`DiskTier.read_canonical`."""
    recs, held = t._records_pinned(keys)
    try:
        out: list[Any] = [FileNotFoundError(str(keys[i])) for i in range(len(keys))]
        idx = [i for i, r in enumerate(recs) if r is not None]
        if not idx:
            return out
        hdr, body = header_pages(len(idx)), aligned_rows(len(idx), t.block_nbytes)
        ops = [t._op(recs[i].slot, hdr[j], body[j]) for j, i in enumerate(idx)]  # type: ignore[union-attr]
        results = iter(t.io.read([op for op in ops if op is not None]))
        for j, (i, op) in enumerate(zip(idx, ops)):
            n = next(results) if op is not None else -errno.ENOENT
            out[i] = _canonical(t, keys, i, recs[i], hdr[j], body[j], n, op, block_size)  # type: ignore[arg-type]
        return out
    finally:
        t._unpin_slots(held)


def _canonical(
    t: DiskTier, keys: BlockKeys, i: int, rec: Record, hdr: np.ndarray, body: np.ndarray, n: int, op: IoOp | None,
    block_size: int | None,
) -> Any:  # fmt: skip
    if op is None or n < 0:
        code = errno.ENOENT if op is None else -n
        return OSError(code, f"{keys[i]}: slot {rec.slot} cannot be read: {errno.errorcode.get(code, code)}")
    if n < op.nbytes:
        return TruncatedBlockError(f"{keys[i]}: short read ({n} of {op.nbytes} bytes: segment truncated?)")
    raw = hdr[: codec.HEADER_SIZE].tobytes() + body.tobytes()
    try:
        codec.verify(raw, keys[i], t.block_nbytes, block_size)
    except CorruptBlockError as e:
        return type(e)(f"{keys[i]}: {e}")
    if codec.decode_header(raw).checksum != rec.checksum:
        return CorruptBlockError(f"{keys[i]}: header checksum differs from the index")
    return raw
