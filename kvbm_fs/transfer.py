"""Worker-side byte movers between tiers, chosen by (source medium, destination medium).

Slot tiers on both sides (G1 <-> G2) copy straight between their buffers with one
batched gather/scatter, no staging.  Anything else goes through a reusable staging
buffer with the tiers' own ``get``/``put`` (which verify what they read).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .keys import BlockKeys
from .rows import aligned_rows
from .tier import Medium, SlotTier, Tier

Handler = Callable[[BlockKeys, Tier, Tier], np.ndarray]
HANDLERS: dict[tuple[Medium, Medium], Handler] = {}


def transfer(keys: BlockKeys, src: Tier, dst: Tier) -> np.ndarray:
    """Copy ``keys`` from ``src`` into ``dst``; mask of keys now in ``dst``. The source keeps its copy."""
    if len(keys) == 0:
        return np.zeros(0, bool)
    fn = HANDLERS.get((src.medium, dst.medium))
    if fn is not None and isinstance(src, SlotTier) and isinstance(dst, SlotTier):
        return fn(keys, src, dst)
    return staged(keys, src, dst)


def slot_to_slot(keys: BlockKeys, src: Tier, dst: Tier) -> np.ndarray:
    """One gather/scatter between two slot buffers; both sides pinned while bytes move."""
    assert isinstance(src, SlotTier) and isinstance(dst, SlotTier)
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


for _a, _b in (
    (Medium.GPU, Medium.HOST),
    (Medium.HOST, Medium.GPU),
    (Medium.HOST, Medium.HOST),
    (Medium.GPU, Medium.GPU),
):
    HANDLERS[(_a, _b)] = slot_to_slot


def staged(keys: BlockKeys, src: Tier, dst: Tier, batch: int = 64) -> np.ndarray:
    """Generic path: read a batch into staging rows (verified by ``src.get``), then ``dst.put``.
    The rows are on the GPU when one side is a GPU tier and the other moves GPU rows itself (the
    disk tier through GDS), so G3 <-> G1 never bounces through host memory twice."""
    have = dst.contains(keys)
    todo = np.flatnonzero(~have)
    if todo.size == 0:
        return have
    stage = _stage(min(batch, todo.size), src, dst)
    for i in range(0, todo.size, batch):
        idx = todo[i : i + batch]
        sub = keys[idx]
        rows = stage[: idx.size]
        got = src.get(sub, rows)
        ok = np.flatnonzero(got)
        if ok.size:
            stored = dst.put(sub[ok], rows if ok.size == idx.size else rows[_index(rows, ok)])
            have[idx[ok[stored]]] = True
    return have


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
