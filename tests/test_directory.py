"""BlockDirectory (kvbm_fs.directory): which tier holds a block, kept from block events."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import LAYOUT, kv_blocks, tokens
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_fs import BlockKeys, EventKind, Store, mount
from kvbm_fs.directory import BlockDirectory
from kvbm_fs.engine import locate, tier_names
from kvbm_fs.tier import Medium


def _keys(ns: int, *hashes: int) -> BlockKeys:
    return BlockKeys(ns, np.asarray(hashes, np.uint64))


def test_stored_blocks_are_found_and_others_are_not() -> None:
    d = BlockDirectory()
    d.record(EventKind.STORED, "host", _keys(1, 10, 11, 12), "host")
    assert d.where(_keys(1, 10, 99, 12, 11)).tolist() == [0, -1, 0, 0]
    assert d.contains(_keys(1, 12, 13)).tolist() == [True, False]
    assert d.names(_keys(1, 11, 13)).tolist() == ["host", ""]
    assert d.tiers == ("host",) and d.medium("host") == "host" and d.medium("disk") is None
    assert len(d) == 3 and d.count("host") == 3 and d.count("disk") == 0
    assert d.where(_keys(1)).tolist() == [] and d.names(_keys(1)).tolist() == []


def test_removed_and_evicted_blocks_leave_only_their_tier() -> None:
    d = BlockDirectory()
    d.record(EventKind.STORED, "host", _keys(1, 1, 2, 3, 4), "host")
    d.record(EventKind.STORED, "disk", _keys(1, 3, 4), "disk")
    d.record(EventKind.REMOVED, "host", _keys(1, 1), "host")
    d.record("evicted", "host", _keys(1, 3, 4, 77), "host")  # the event's value works too; 77 was never there
    assert d.names(_keys(1, 1, 2, 3, 4)).tolist() == ["", "host", "disk", "disk"]
    assert d.count("host") == 1 and d.count("disk") == 2


def test_promoted_and_demoted_blocks_are_added_to_the_destination() -> None:
    d = BlockDirectory()
    d.record(EventKind.DEMOTED, "disk", _keys(1, 5), "disk")
    d.record(EventKind.PROMOTED, "host", _keys(1, 6), "host")
    assert d.names(_keys(1, 5, 6)).tolist() == ["disk", "host"]


def test_other_event_kinds_change_nothing() -> None:
    d = BlockDirectory()
    for kind in (EventKind.REFUSED, EventKind.LOAD_FAILED, EventKind.STORE_FAILED, EventKind.MATCHED):
        d.record(kind, "host", _keys(1, 5), "host")
    assert len(d) == 0 and d.tiers == ()


def test_the_fastest_medium_answers_whatever_order_tiers_were_heard_of() -> None:
    d = BlockDirectory()
    d.record(EventKind.STORED, "s3", _keys(1, 1, 2, 3), "remote")
    d.record(EventKind.STORED, "disk", _keys(1, 2, 3), "disk")
    d.record(EventKind.STORED, "mystery", _keys(1, 4), "")  # no medium: after every known one
    d.record(EventKind.STORED, "host", _keys(1, 3), "host")
    assert d.tiers == ("host", "disk", "s3", "mystery")
    assert d.names(_keys(1, 1, 2, 3, 4)).tolist() == ["s3", "disk", "host", "mystery"]
    assert d.where(_keys(1, 1, 2, 3, 4)).tolist() == [2, 1, 0, 3]
    d.record(EventKind.STORED, "mystery", _keys(1, 5), "gpu")  # a later event names its medium
    assert d.tiers[0] == "mystery"


def test_duplicate_and_repeated_stores_count_once() -> None:
    d = BlockDirectory()
    d.record(EventKind.STORED, "host", _keys(1, 7, 7, 8), "host")
    d.record(EventKind.STORED, "host", _keys(1, 8, 9), "host")
    assert d.count("host") == 3
    d.record(EventKind.REMOVED, "host", _keys(1, 7, 7), "host")
    assert d.names(_keys(1, 7, 8, 9)).tolist() == ["", "host", "host"]


def test_namespaces_are_kept_apart() -> None:
    d = BlockDirectory()
    d.record(EventKind.STORED, "host", _keys(1, 10, 11), "host")
    d.record(EventKind.STORED, "host", _keys(2, 11, 12), "host")  # rank 1's host tier has the same name
    assert d.contains(_keys(1, 10, 11, 12)).tolist() == [True, True, False]
    assert d.contains(_keys(2, 10, 11, 12)).tolist() == [False, True, True]
    d.record(EventKind.EVICTED, "host", _keys(2, 11), "host")
    assert d.contains(_keys(1, 11)).tolist() == [True] and d.contains(_keys(2, 11)).tolist() == [False]


def test_clear_forgets_a_tier_a_namespace_or_everything() -> None:
    d = BlockDirectory()
    for tier, medium in (("host", "host"), ("disk", "disk")):
        d.record(EventKind.STORED, tier, _keys(1, 1, 2), medium)
        d.record(EventKind.STORED, tier, _keys(2, 1, 2), medium)
    d.clear("host", ns=1)
    assert d.names(_keys(1, 1, 2)).tolist() == ["disk", "disk"]
    assert d.names(_keys(2, 1, 2)).tolist() == ["host", "host"]
    d.clear(ns=2)
    assert not d.contains(_keys(2, 1, 2)).any() and d.contains(_keys(1, 1, 2)).all()
    d.clear("disk")
    assert len(d) == 0
    d.record(EventKind.STORED, "host", _keys(1, 3), "host")  # a cleared tier keeps working
    assert d.names(_keys(1, 3)).tolist() == ["host"]
    d.clear()
    assert len(d) == 0 and d.tiers == ("host", "disk")  # tiers stay known, in their order
    d.clear("never-heard-of")


def test_large_batches_grow_the_index_and_stay_exact() -> None:
    rng = np.random.default_rng(0)
    hashes = np.unique(rng.integers(0, 2**63, 20_000, dtype=np.uint64))
    d = BlockDirectory()
    d.record(EventKind.STORED, "host", BlockKeys(3, hashes), "host")
    gone = hashes[::3]
    d.record(EventKind.EVICTED, "host", BlockKeys(3, gone), "host")
    probe = np.concatenate([hashes, hashes + np.uint64(1)])
    want = np.isin(probe, hashes) & ~np.isin(probe, gone)
    assert (d.contains(BlockKeys(3, probe)) == want).all()
    assert len(d) == hashes.size - gone.size


_ops = st.lists(
    st.tuples(
        st.sampled_from(["stored", "removed", "evicted", "promoted"]),
        st.sampled_from(["host", "disk"]),
        st.integers(1, 2),
        st.lists(st.integers(0, 15), max_size=6),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(_ops)
def test_agrees_with_a_set_per_tier_after_any_event_sequence(ops: list[tuple[str, str, int, list[int]]]) -> None:
    d = BlockDirectory()
    ref: dict[tuple[str, int], set[int]] = {}
    for kind, tier, ns, hs in ops:
        d.record(kind, tier, _keys(ns, *hs), tier)
        held = ref.setdefault((tier, ns), set())
        if kind in ("removed", "evicted"):
            held.difference_update(hs)
        else:
            held.update(hs)
    for ns in (1, 2):
        probe = list(range(16))
        want = [
            "host" if h in ref.get(("host", ns), ()) else "disk" if h in ref.get(("disk", ns), ()) else ""
            for h in probe
        ]
        assert d.names(_keys(ns, *probe)).tolist() == want


# ---- following a real store ------------------------------------------------------------------------------


@pytest.fixture
def tiered(tmp_path: Path) -> Iterator[Store]:
    s = mount(
        "host://?capacity=64KiB",  # 8 blocks of 8 KiB: the rest spill to disk
        f"file://{tmp_path}/d?capacity=1MiB",
        layout=LAYOUT,
        model="directory-model",
        env={},
    )
    yield s
    s.close(persist=False)


def _truth(store: Store, keys: BlockKeys) -> list[str]:
    names = [*tier_names(store), ""]
    return [names[i] for i in locate(store, keys).tolist()]


def test_locate_names_the_first_tier_holding_each_key(tiered: Store) -> None:
    keys = tiered.keys(tokens(4))
    assert tiered.put(keys[:1], kv_blocks(1), tier="host", spill=False).all()
    assert tiered.put(keys[1:3], kv_blocks(2), tier="disk", spill=False).all()
    assert tiered.put(keys[:1], kv_blocks(1), tier="disk", spill=False).all()  # in both: the host answers
    assert tier_names(tiered) == ["host", "disk"]
    assert locate(tiered, keys).tolist() == [0, 1, 1, -1]
    assert locate(tiered, keys, skip=(Medium.HOST,)).tolist() == [1, 1, 1, -1]
    assert locate(tiered, keys[:0]).tolist() == []


def test_following_a_store_agrees_with_its_tiers_through_spills_and_deletes(tiered: Store) -> None:
    d = BlockDirectory()
    stop = d.follow(tiered)
    keys = tiered.keys(tokens(20))
    assert tiered.put(keys, kv_blocks(20)).all()
    got = d.names(keys).tolist()
    assert got == _truth(tiered, keys)
    assert "host" in got and "disk" in got  # the host tier filled and evicted into the disk tier
    assert d.medium("host") == "host" and d.medium("disk") == "disk"
    assert tiered.delete(keys[:5]).all()
    assert d.names(keys).tolist() == _truth(tiered, keys) and not d.contains(keys[:5]).any()
    stop()
    assert tiered.put(keys[:5], kv_blocks(5)).all()
    assert not d.contains(keys[:5]).any()  # unsubscribed: nothing more is learnt


def test_follow_keeps_namespaces_of_one_store_apart(tiered: Store) -> None:
    from kvbm_fs import Namespace

    other = tiered.add_namespace(Namespace("directory-model", LAYOUT, 1, 2))
    d = BlockDirectory()
    d.follow(tiered)
    mine = tiered.keys(tokens(3))
    theirs = BlockKeys(other.id, mine.hashes, mine.parents)
    assert tiered.put(mine, kv_blocks(3)).all()
    assert d.contains(mine).all() and not d.contains(theirs).any()
