"""The retention rule every persistent tier evicts by (``kvbm_fs.tier.retention_victims``), on hand-made arrays,
and the placement daemon demoting by it from a tier that no longer evicts on put."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from kvbm_fs import Store
from kvbm_fs.codec import HEADER_SIZE
from kvbm_fs.daemon import DaemonConfig, PlacementDaemon
from kvbm_fs.testing import NS_A, NS_B, blocks_for, chain
from kvbm_fs.tier import retain_budget, retention_victims
from kvbm_fs.tiers.disk import DiskTier
from kvbm_fs.tiers.remote import RemoteTier

# eight blocks: ranks (eviction order, lowest first) and which are retained
RANK = np.array([50, 10, 70, 20, 60, 30, 80, 40])
RET = np.array([True, False, True, False, True, False, True, False])  # retained ranks: 50 60 70 80


def victims(n: int, budget: int) -> list[int]:
    return retention_victims(RANK, RET, n, budget).tolist()


def test_within_the_budget_retained_blocks_go_after_every_ordinary_one() -> None:
    assert victims(3, 4) == [1, 3, 5]  # ordinary, lowest rank first
    assert victims(6, 4) == [1, 3, 5, 7]  # only four ordinary blocks: fewer than asked
    assert victims(6, 10) == [1, 3, 5, 7]  # a budget above everything retained protects them all


def test_past_the_budget_the_lowest_ranked_retained_go_first() -> None:
    assert victims(3, 2) == [0, 4, 1]  # two over: ranks 50 and 60 first, then ordinary
    assert victims(1, 2) == [0]  # never more than asked
    assert victims(8, 2) == [0, 4, 1, 3, 5, 7]  # the two the budget keeps stay
    assert victims(8, 0) == [0, 4, 2, 6, 1, 3, 5, 7]  # budget 0: every retained block goes first


def test_held_counts_unevictable_retained_blocks() -> None:
    free = np.array([False, True, True, True, True, True, True, True])  # block 0 (retained, rank 50) pinned
    assert retention_victims(RANK, RET, 3, 2, free).tolist() == [4, 2, 1]  # over by 2: the next two retained
    assert retention_victims(RANK, RET, 3, 3, free).tolist() == [4, 1, 3]
    assert retention_victims(RANK, RET, 3, 4, free).tolist() == [1, 3, 5]  # pinned or not, it counts
    # a caller that sees only a window of its blocks passes how many retained ones it holds in all
    assert retention_victims(RANK, RET, 3, 4, held=6).tolist() == [0, 4, 1]


def test_ties_go_in_index_order() -> None:
    rank = np.array([5, 5, 5, 5, 1])
    ret = np.array([True, False, True, False, True])
    assert retention_victims(rank, ret, 2, 0).tolist() == [4, 0]  # retained rank 1, then the first of the tie
    assert retention_victims(rank, ret, 2, 3).tolist() == [1, 3]
    assert retention_victims(rank, ret, 5, 1).tolist() == [4, 0, 1, 3]  # held 3 - budget 1: two retained go


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.float64])
def test_empty_and_dtypes(dtype: type) -> None:
    assert retention_victims(np.zeros(0, dtype), np.zeros(0, bool), 4, 0).size == 0
    assert retention_victims(np.array([3, 1, 2], dtype), np.zeros(3, bool), 0, 0).size == 0
    assert retention_victims(np.array([3, 1, 2], dtype), np.zeros(3, bool), 2, 0).tolist() == [1, 2]


def test_budget_is_the_largest_share_of_the_capacity() -> None:
    assert retain_budget([], 100) == 0
    assert retain_budget([0.1, 0.25], 63) == 15  # rounded down
    assert retain_budget(iter([0.5]), 8) == 4


def _disk(tmp_path: Path, nb: int, slots: int) -> DiskTier:
    return DiskTier(tmp_path / "upper", nb, slots * (4096 + -(-nb // 4096) * 4096), name="upper")


def _remote(tmp_path: Path, nb: int, slots: int) -> RemoteTier:
    return RemoteTier(f"file://{tmp_path}/upper", nb, slots * (nb + HEADER_SIZE), name="upper")


@pytest.mark.parametrize("make_upper", [_disk, _remote], ids=["disk", "remote"])
def test_the_daemon_demotes_retained_blocks_past_the_share_oldest_first(
    tmp_path: Path, make_upper: Callable[[Path, int, int], DiskTier | RemoteTier]
) -> None:
    """With a daemon attached a disk or bounded remote tier above another refuses puts rather than
    evict, so demotion (its ``coldest``, its eviction's victim choice) is the only way blocks leave
    it: it takes retained blocks past their share first, oldest first (by rank on disk, by write time
    remote), then ordinary ones, and moves them down whole; within the share it keeps them."""
    nb = NS_A.block_nbytes
    slots = 20
    upper = make_upper(tmp_path, nb, slots)
    lower = RemoteTier(f"file://{tmp_path}/lower", nb, name="lower")
    for t in (upper, lower):
        t.bind_namespace(NS_A)
        t.bind_namespace(NS_B)
    store = Store([upper, lower], NS_A)
    store.add_namespace(NS_B)
    daemon = PlacementDaemon(store, DaemonConfig.from_dict({"promote": False, "prefetch": False})).attach()
    assert not upper.evict_on_put  # marks 0.90 / 0.75: 18 / 15 blocks
    warm = chain(NS_B, 10)
    warm_data = blocks_for(warm, nb)
    for i in range(10):  # in chain order: block 0 is the oldest
        assert upper.put(warm[i : i + 1], warm_data[i : i + 1]).all()
    assert upper.retain(NS_B.id, 0.3) == 10  # budget: 6 of 20 blocks, 4 over
    everyday = chain(NS_A, 3 * slots, start=1000)
    every_data = blocks_for(everyday, nb)
    for i in range(len(everyday)):  # everyday traffic, the daemon running after each put
        assert store.put(everyday[i : i + 1], every_data[i : i + 1]).all()
        daemon.run_once()
        assert len(upper) <= 18
    assert upper.contains(warm).tolist() == [False] * 4 + [True] * 6  # what eviction on put keeps too
    assert upper.retained()["blocks"] == 6 and upper.contains(everyday[-9:]).all()
    assert lower.contains(warm[:4]).all()  # moved down, not lost, each once:
    assert daemon.counters["demoted_blocks"] == 4 + int((~upper.contains(everyday)).sum())
    for keys, data in ((warm, warm_data), (everyday, every_data)):
        m = store.match(keys)
        out = np.zeros_like(data)
        assert m.length == len(keys) and store.get(keys, out, m).all() and np.array_equal(out, data)
    store.close(persist=False)
