"""parc's ghost history in numpy arrays (kvbm_fs.ghost): the same answers as ARC's two OrderedDicts, bounded memory."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from kvbm_fs.ghost import GhostLists
from kvbm_fs.keys import BlockKeys
from kvbm_fs.lifecycle import SlotPool
from kvbm_fs.policy import PARC

NS = 7


def _model_trim(b: list[OrderedDict[int, None]], limit: int) -> None:
    while len(b[0]) + len(b[1]) > limit:  # ARC: drop from B1 when it is at least as long as B2
        (b[0] if len(b[0]) >= len(b[1]) else b[1]).popitem(last=False)


@pytest.mark.parametrize("limit", [1, 5, 64])
def test_ghost_lists_answer_as_two_ordered_dicts(limit: int) -> None:
    rng = np.random.default_rng(limit)
    g, b = GhostLists(limit), [OrderedDict[int, None](), OrderedDict[int, None]()]
    universe = rng.integers(1, 4 * limit + 8, size=8 * limit + 40).astype(np.uint64) << np.uint64(33)
    for _ in range(400):  # enough appends to compact the buffer and rebuild the table several times
        keys = np.unique(rng.choice(universe, size=int(rng.integers(1, 12))))
        rng.shuffle(keys)
        if rng.random() < 0.5:
            lst = rng.integers(0, 2, keys.size).astype(np.int8)
            for k, li in zip(keys.tolist(), lst.tolist()):
                b[0].pop(k, None), b[1].pop(k, None)
                b[li][k] = None
            g.push(keys, lst)
            _model_trim(b, limit)
            g.trim(limit)
        else:
            lst, pos = g.find(keys)
            assert lst.tolist() == [0 if k in b[0] else 1 if k in b[1] else -1 for k in keys.tolist()]
            hit = lst >= 0
            g.pop(pos[hit])
            for k, li in zip(keys[hit].tolist(), lst[hit].tolist()):
                del b[li][k]
        assert g.n == [len(b[0]), len(b[1])]
        assert [g.keys_of(0), g.keys_of(1)] == [list(b[0]), list(b[1])]  # same keys, same order
    assert g.keys.size <= limit + limit // 2 + 64, "the buffer never grows past its bound"


def test_parc_ghost_history_is_arrays_of_bounded_size() -> None:
    """A long stream of one-off blocks through a small pool: the history stays ``ghost`` x capacity keys,
    held in fixed numpy arrays (no Python object per key), and still remembers the newest."""
    pol = PARC(ghost=2)
    pool = SlotPool(16, None, policy=pol)
    sizes = None
    for i in range(600):
        keys = BlockKeys.chain(NS, np.array([i + 1], np.uint64))
        slots = pool.allocate(1)
        assert slots is not None
        pool.complete(slots)
        pool.release(pool.register(slots, keys))
        if i == 100:
            sizes = (pol.ghosts.keys.size, pol.ghosts.table.size)
    assert len(pol.ghosts) == 32 and pol.ghosts.n == [32, 0]  # all evicted from T1 into B1
    assert (pol.ghosts.keys.size, pol.ghosts.table.size) == sizes, "no growth after warm-up"
    newest = BlockKeys.chain(NS, np.array([600 - 16], np.uint64))  # the last block evicted
    lst, _ = pol.ghosts.find(_mixed(newest))
    assert lst.tolist() == [0]


def _mixed(keys: BlockKeys) -> np.ndarray:
    with np.errstate(over="ignore"):
        return keys.hashes ^ (np.uint64(keys.ns) * np.uint64(0x9E3779B97F4A7C15))
