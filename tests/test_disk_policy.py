"""Disk-tier eviction goes through the policy interface: the policy's rank orders victims."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvbm_fs.policy import LRU
from kvbm_fs.testing import NS_A, blocks_for, chain
from kvbm_fs.tiers.disk import DiskTier

NB = NS_A.block_nbytes
SLOT = 4096 + -(-NB // 4096) * 4096


def _tier(path: Path, policy: object = None) -> DiskTier:
    t = DiskTier(path, NB, 3 * SLOT, policy=policy)  # type: ignore[arg-type]
    t.bind_namespace(NS_A)
    return t


def test_a_read_block_outlives_colder_ones(tmp_path: Path) -> None:
    t = _tier(tmp_path / "d")
    keys = chain(NS_A, 4)
    for i in range(3):
        t.put(keys[i : i + 1], blocks_for(keys[i : i + 1], NB))
    t.get(keys[0:1], np.empty((1, NB), np.uint8))  # block 0 becomes the most recently used
    t.put(keys[3:4], blocks_for(keys[3:4], NB))
    assert t.contains(keys).tolist() == [True, False, True, True]
    t.close()


def test_access_order_survives_reopen(tmp_path: Path) -> None:
    t = _tier(tmp_path / "d")
    keys = chain(NS_A, 4)
    for i in range(3):
        t.put(keys[i : i + 1], blocks_for(keys[i : i + 1], NB))
    t.get(keys[0:1], np.empty((1, NB), np.uint8))
    t.close()  # buffered access statistics are flushed to the index
    t = _tier(tmp_path / "d")
    t.put(keys[3:4], blocks_for(keys[3:4], NB))
    assert t.contains(keys).tolist() == [True, False, True, True]
    t.close()


class MostRecentlyUsed(LRU):
    name = "mru"

    def rank(self, last_access_us: int, hits: int) -> int:
        return (1 << 62) - last_access_us


def test_another_policy_changes_the_victims(tmp_path: Path) -> None:
    t = _tier(tmp_path / "d", MostRecentlyUsed())
    keys = chain(NS_A, 4)
    for i in range(3):
        t.put(keys[i : i + 1], blocks_for(keys[i : i + 1], NB))
    t.put(keys[3:4], blocks_for(keys[3:4], NB))
    assert t.contains(keys).tolist() == [True, True, False, True]
    assert t.stats()["evictions"] == 1
    t.close()
