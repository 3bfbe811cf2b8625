"""The one byte path: every move of block bytes between two tiers, or from caller rows into tiers.

``put_rows`` (``Store.put``, its spill, and write-through) hands caller rows to tiers; ``transfer``
(``Store.copy``, ``Store.persist``, the daemon's demotions, promotions and prefetches) and ``move``
(one staged batch; ``kvbm-fs cp``) copy between tiers. Tiers only store and fetch.

Routing is by what the two tiers are, not by a (medium, medium) table: two slot tiers copy once
between their buffers; any other pair goes through staging rows, with the source's ``get`` (which
verifies) and the destination's ``put``. The medium table this replaced sent all its entries to the
slot copy and still had to check for slot tiers, since a medium does not say how a tier holds its
bytes (a peer's blocks sit in a remote slot pool). See docs/architecture.md 1.9.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from .keys import BlockKeys
from .rows import aligned_rows
from .tier import Medium, SlotTier, Tier


class Placed(NamedTuple):
    """What ``put_rows`` did, per key and per tier of the chain (the ``StoreOp`` of a SAVED event)."""

    ok: np.ndarray  # bool per key: stored by some tier
    where: np.ndarray  # int8 per key: index of the tier that took it; -1: none
    seconds: list[float]  # time in each tier's put; -1.0: not called
    asked: list[int]  # blocks offered to each tier
    took: list[int]  # blocks each tier took


def put_rows(keys: BlockKeys, rows: Any, tiers: Sequence[Tier], first: int = 0, spill: bool = True) -> Placed:
    """Store caller ``rows`` (uint8 ``[n, block_nbytes]``, any device) into ``tiers[first]``; with
    ``spill``, what a tier refuses (full of pinned blocks, admission, a batch larger than the tier)
    is offered to the next one down. The tiers read the caller's rows directly (no staging)."""
    n = len(tiers)
    ok = np.zeros(len(keys), bool)
    where = np.full(len(keys), -1, np.int8)
    secs, asked, took_n = [-1.0] * n, [0] * n, [0] * n
    for i in range(first, n if spill else min(n, first + 1)):
        todo = np.flatnonzero(~ok)
        if todo.size == 0:
            break
        whole = todo.size == len(keys)
        t0 = time.perf_counter()
        took = tiers[i].put(keys if whole else keys[todo], rows if whole else rows[todo])
        secs[i] = time.perf_counter() - t0
        ok[todo] = took
        where[todo[took]] = i
        asked[i], took_n[i] = todo.size, int(np.count_nonzero(took))
    return Placed(ok, where, secs, asked, took_n)


def transfer(keys: BlockKeys, src: Tier, dst: Tier, have: np.ndarray | None = None) -> np.ndarray:
    """Copy ``keys`` from ``src`` into ``dst``; mask of keys now in ``dst``. The source keeps its copy.
    ``have``: what ``dst`` holds of ``keys`` when the caller has just asked it (not asked again: a
    remote tier answers with a HEAD per block)."""
    if len(keys) == 0:
        return np.zeros(0, bool)
    if isinstance(src, SlotTier) and isinstance(dst, SlotTier):
        return slot_to_slot(keys, src, dst)  # pins what dst holds as it looks: no separate question
    return staged(keys, src, dst, have=have)


def slot_to_slot(keys: BlockKeys, src: SlotTier, dst: SlotTier) -> np.ndarray:
    """One gather/scatter between two slot buffers (G1 <-> G2, no staging); both sides pinned while bytes move."""
    held = dst.acquire(keys)  # what dst already has stays put while we make room
    s_slots = src.acquire(keys)
    try:
        todo = np.flatnonzero((s_slots >= 0) & (held < 0))
        copier = dst if dst.medium is Medium.GPU else src  # the GPU side owns the copy stream
        d_slots = dst.reserve(todo.size) if todo.size else None
        if d_slots is None:
            return held >= 0
        try:
            copier.copy_rows(dst.buf, d_slots, src.buf, s_slots[todo])
            src.sync()
            dst.sync()
        except BaseException:
            dst.release(d_slots)
            raise
        dst.publish(d_slots, keys[todo])
        out = held >= 0
        out[todo] = True
        return out
    finally:
        src.release(s_slots)
        dst.release(held)


def staged(keys: BlockKeys, src: Tier, dst: Tier, batch: int = 64, have: np.ndarray | None = None) -> np.ndarray:
    """Any other pair: batches of ``batch`` blocks the destination lacks (``have``, else asked of it),
    each ``move``d through one reusable staging buffer. The rows are on the GPU when one side is a GPU
    tier and the other moves GPU rows itself (the disk tier through GDS), so G3 <-> G1 never bounces
    through host memory twice."""
    have = dst.contains(keys) if have is None else np.array(have, bool)  # a copy: the caller's stays as given
    todo = np.flatnonzero(~have)
    if todo.size == 0:
        return have
    stage = _stage(min(batch, todo.size), src, dst)
    for i in range(0, todo.size, batch):
        idx = todo[i : i + batch]
        _, stored = move(keys[idx], src, dst, stage[: idx.size])
        have[idx[stored]] = True
    return have


def move(keys: BlockKeys, src: Tier, dst: Tier, rows: Any) -> tuple[np.ndarray, np.ndarray]:
    """One batch through staging ``rows`` (``[>= len(keys), block_nbytes]``): ``src.get`` (verified),
    then ``dst.put`` of the blocks read. Returns (read, stored), masks over ``keys``: a block that failed
    to read is a miss, one read but not stored was refused (full, or by admission)."""
    got = np.asarray(src.get(keys, rows[: len(keys)]), bool)
    stored = np.zeros(len(keys), bool)
    ok = np.flatnonzero(got)
    if ok.size:
        part = rows[: len(keys)] if ok.size == len(keys) else rows[_index(rows, ok)]
        stored[ok[dst.put(keys[ok], part)]] = True
    return got, stored


def _stage(n: int, src: Tier, dst: Tier) -> Any:
    for gpu, other in ((src, dst), (dst, src)):
        if gpu.medium is Medium.GPU and isinstance(gpu, SlotTier) and other.moves_device_rows(gpu.buf):
            return gpu.buf.new_empty((n, gpu.block_nbytes))  # same device and dtype as the pool
    return aligned_rows(n, src.block_nbytes)


def _index(rows: Any, ok: np.ndarray) -> Any:
    if isinstance(rows, np.ndarray):
        return ok
    import torch

    return torch.as_tensor(ok, device=rows.device)
