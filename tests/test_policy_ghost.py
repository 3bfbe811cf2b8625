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


def _model_trim(b: OrderedDict[int, tuple[int, int]], limit: int) -> None:
    while len(b) > limit:  # one history: the oldest eviction goes first, whichever list it is in
        b.popitem(last=False)


@pytest.mark.parametrize("limit", [1, 5, 64])
def test_ghost_lists_answer_as_one_ordered_dict(limit: int) -> None:
    """Against a model: one OrderedDict key -> (list, seq) in eviction order, trimmed from the oldest."""
    rng = np.random.default_rng(limit)
    g, b = GhostLists(limit), OrderedDict[int, tuple[int, int]]()
    universe = rng.integers(1, 4 * limit + 8, size=8 * limit + 40).astype(np.uint64) << np.uint64(33)
    seq = 0
    for _ in range(400):  # enough appends to compact the buffer and rebuild the table several times
        keys = np.unique(rng.choice(universe, size=int(rng.integers(1, 12))))
        rng.shuffle(keys)
        if rng.random() < 0.5:
            lst = rng.integers(0, 2, keys.size).astype(np.int8)
            seqs = np.arange(seq, seq + keys.size, dtype=np.uint32)
            seq += keys.size
            for k, li, sq in zip(keys.tolist(), lst.tolist(), seqs.tolist()):
                b.pop(k, None)
                b[k] = (li, sq)
            g.push(keys, lst, seqs)
            _model_trim(b, limit)
            g.trim(limit)
        else:
            lst, pos = g.find(keys)
            want = [b.get(k, (-1, 0)) for k in keys.tolist()]
            assert lst.tolist() == [w[0] for w in want]
            hit = lst >= 0
            kept = [w[1] for w, h in zip(want, hit.tolist()) if h]
            assert g.seq[pos[hit]].tolist() == kept  # through compactions
            g.pop(pos[hit])
            for k in keys[hit].tolist():
                del b[k]
        assert g.n == [sum(v[0] == i for v in b.values()) for i in (0, 1)]
        assert [g.keys_of(0), g.keys_of(1)] == [[k for k, v in b.items() if v[0] == i] for i in (0, 1)]
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
