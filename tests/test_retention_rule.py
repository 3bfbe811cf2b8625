"""The retention rule every persistent tier evicts by (``kvbm_fs.tier.retention_victims``), on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from kvbm_fs.tier import retain_budget, retention_victims

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
