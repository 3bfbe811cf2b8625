"""SlotPool block lifecycle (KVBM v1 semantics, brief section 3), events, and the KeyIndex table."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_fs import events as events_mod
from kvbm_fs.errors import IllegalTransitionError, PinnedError
from kvbm_fs.events import BlockEvent, EventBus, EventKind
from kvbm_fs.index import KeyIndex
from kvbm_fs.keys import BlockKeys
from kvbm_fs.lifecycle import BlockState, SlotPool

BS = 4
NS = 0xABCDEF0123456789
R, P, C, G = (int(s) for s in BlockState)


def keys(*hashes: int, ns: int = NS) -> BlockKeys:
    return BlockKeys.chain(ns, list(hashes))


def arr(*slots: int) -> np.ndarray:
    return np.array(slots, dtype=np.int64)


class Recorder:
    def __init__(self, bus: EventBus) -> None:
        self.events: list[BlockEvent] = []
        bus.subscribe(self.events.append)

    def take(self) -> list[tuple[EventKind, str, int, list[int]]]:
        out = [(e.kind, e.tier, e.keys.ns, e.keys.hashes.tolist()) for e in self.events]
        self.events.clear()
        return out


def make_pool(n: int = 8, name: str = "g2") -> tuple[SlotPool, Recorder]:
    pool = SlotPool(n, BS, name=name, events=EventBus())
    return pool, Recorder(pool.events)


def snapshot(pool: SlotPool) -> dict[str, Any]:
    ns, hs, vs = pool.index.items()
    return {
        "state": pool.state.copy(),
        "refs": pool.refs.copy(),
        "tokens": pool.tokens.copy(),
        "slot_ns": pool.slot_ns.copy(),
        "slot_hash": pool.slot_hash.copy(),
        "slot_parent": pool.slot_parent.copy(),
        "num_free": pool.num_free,
        "free": sorted(pool._free[: pool.num_free].tolist()),
        "index": sorted(zip(ns.tolist(), hs.tolist(), vs.tolist())),
        "evictions": pool.evictions,
        "stamp": np.asarray(getattr(pool.policy, "stamp", np.zeros(0))).copy(),
    }


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def registered(pool: SlotPool, ks: BlockKeys) -> np.ndarray:
    """allocate -> complete -> register; returns the slots the keys live in (pinned once)."""
    s = pool.allocate(len(ks))
    assert s is not None
    pool.complete(s)
    return pool.register(s, ks)


# ======================================================================================
# happy paths
# ======================================================================================
def test_reset_partial_complete_registered() -> None:
    pool, rec = make_pool()
    s = pool.allocate(1)
    assert s is not None and s.shape == (1,)
    assert pool.state[s[0]] == R and pool.refs[s[0]] == 1 and pool.num_free == 7
    pool.fill(s, 1)
    assert pool.state[s[0]] == P and pool.tokens[s[0]] == 1
    pool.fill(s, 3)  # add tokens: Partial -> Partial
    assert pool.state[s[0]] == P and pool.tokens[s[0]] == 3
    with pytest.raises(IllegalTransitionError):
        pool.commit(s)  # not full yet
    pool.fill(s, BS)
    pool.commit(s)
    assert pool.state[s[0]] == C
    assert rec.take() == []
    ks = keys(111)
    out = pool.register(s, ks)
    assert out.tolist() == s.tolist()
    assert pool.state[s[0]] == G and pool.refs[s[0]] == 1
    assert pool.lookup(ks).tolist() == s.tolist()
    assert pool.num_registered == 1
    assert rec.take() == [(EventKind.STORED, "g2", NS, [111])]
    assert pool.slot_ns[s[0]] == NS and pool.slot_hash[s[0]] == 111 and pool.slot_parent[s[0]] == 0


def test_reset_to_complete_directly() -> None:
    pool, rec = make_pool()
    s = pool.allocate(3)
    assert s is not None
    pool.complete(s)
    assert (pool.state[s] == C).all() and (pool.tokens[s] == BS).all()
    ks = keys(1, 2, 3)
    assert pool.register(s, ks).tolist() == s.tolist()
    assert (pool.state[s] == G).all()
    assert pool.slot_parent[s].tolist() == [0, 1, 2]
    assert pool.prefix_len(ks) == 3
    assert pool.prefix_len(keys(1, 2, 9)) == 2
    assert pool.prefix_len(keys(9, 2, 3)) == 0
    assert rec.take() == [(EventKind.STORED, "g2", NS, [1, 2, 3])]


def test_pool_without_block_size() -> None:
    pool = SlotPool(2)
    s = pool.allocate(1)
    assert s is not None
    pool.fill(s, 1000)
    pool.commit(s)
    assert pool.state[s[0]] == C


def test_batch_fill_with_per_slot_counts() -> None:
    pool, _ = make_pool()
    s = pool.allocate(3)
    assert s is not None
    pool.fill(s, np.array([1, 2, 4]))
    assert pool.tokens[s].tolist() == [1, 2, 4]
    with pytest.raises(IllegalTransitionError):
        pool.commit(s)  # two of three are not full: nothing commits
    assert (pool.state[s] == P).all()
    pool.commit(s[2:])
    assert pool.state[s].tolist() == [P, P, C]


# ======================================================================================
# illegal transitions change nothing
# ======================================================================================
def _pool_in_every_state() -> tuple[SlotPool, dict[str, int]]:
    """A pool holding one slot in each interesting state."""
    pool, _ = make_pool(10)
    s = pool.allocate(7)
    assert s is not None
    owned, partial, full, comp, g_pinned, g_inactive, spare = s.tolist()
    pool.fill(arr(partial), 2)
    pool.fill(arr(full), BS)
    pool.complete(arr(comp, g_pinned, g_inactive))
    pool.register(arr(g_pinned, g_inactive), keys(500, 501))
    pool.release(arr(g_inactive, spare))
    free = int(pool._free[pool.num_free - 1])
    st_ = {
        "free": free,
        "owned": owned,
        "partial": partial,
        "full": full,
        "complete": comp,
        "reg_pinned": g_pinned,
        "reg_inactive": g_inactive,
    }
    assert pool.refs[free] == 0 and pool.state[free] == R
    assert pool.state[g_inactive] == G and pool.refs[g_inactive] == 0
    return pool, st_


_LEGAL = {
    "fill": {"owned", "partial", "full"},
    "commit": {"full"},
    "complete": {"owned"},
    "register": {"complete"},
}
_CASES = [(op, name) for op in _LEGAL for name in _pool_in_every_state()[1] if name not in _LEGAL[op]]


def _apply(pool: SlotPool, op: str, slots: np.ndarray, ntok: Any = 1) -> None:
    if op == "fill":
        pool.fill(slots, ntok)
    elif op == "commit":
        pool.commit(slots)
    elif op == "complete":
        pool.complete(slots)
    else:
        pool.register(slots, BlockKeys(NS, [900 + i for i in range(slots.size)]))


@pytest.mark.parametrize(("op", "state_name"), _CASES)
def test_illegal_transition_raises_and_changes_nothing(op: str, state_name: str) -> None:
    pool, sl = _pool_in_every_state()
    rec = Recorder(pool.events)
    before = snapshot(pool)
    with pytest.raises(IllegalTransitionError):
        _apply(pool, op, arr(sl[state_name]))
    assert_same(before, snapshot(pool))
    # mixed with a slot for which the op is legal: still all-or-nothing
    legal = next(iter(sorted(_LEGAL[op])))
    with pytest.raises(IllegalTransitionError):
        _apply(pool, op, arr(sl[legal], sl[state_name]), ntok=BS)
    assert_same(before, snapshot(pool))
    assert rec.take() == []


@pytest.mark.parametrize("ntok", [0, -1, BS + 1, 1000])
def test_fill_bad_token_count_illegal(ntok: int) -> None:
    pool, sl = _pool_in_every_state()
    before = snapshot(pool)
    with pytest.raises(IllegalTransitionError):
        pool.fill(arr(sl["owned"], sl["partial"]), ntok)
    assert_same(before, snapshot(pool))


def test_register_length_mismatch_changes_nothing() -> None:
    pool, sl = _pool_in_every_state()
    before = snapshot(pool)
    with pytest.raises(ValueError):
        pool.register(arr(sl["complete"]), keys(1, 2))
    assert_same(before, snapshot(pool))


def test_release_unpinned_raises_and_changes_nothing() -> None:
    pool, sl = _pool_in_every_state()
    before = snapshot(pool)
    for bad in (
        arr(sl["free"]),
        arr(sl["reg_inactive"]),
        arr(sl["owned"], sl["owned"]),
        arr(sl["partial"], sl["free"]),
    ):
        with pytest.raises(IllegalTransitionError):
            pool.release(bad)
        assert_same(before, snapshot(pool))
    pool.release(arr(-1, -1))  # misses are ignored
    pool.release(arr())
    assert_same(before, snapshot(pool))


# ======================================================================================
# release / match
# ======================================================================================
def test_release_unregistered_returns_to_free() -> None:
    pool, sl = _pool_in_every_state()
    nfree = pool.num_free
    pool.release(arr(sl["owned"], sl["partial"], sl["complete"]))
    assert pool.num_free == nfree + 3
    for name in ("owned", "partial", "complete"):
        assert pool.state[sl[name]] == R and pool.refs[sl[name]] == 0 and pool.tokens[sl[name]] == 0


def test_release_registered_is_inactive_but_matchable() -> None:
    pool, rec = make_pool()
    ks = keys(10, 20)
    s = registered(pool, ks)
    nfree = pool.num_free
    pool.release(s)
    assert (pool.state[s] == G).all() and (pool.refs[s] == 0).all()
    assert pool.num_free == nfree  # not freed
    assert pool.lookup(ks).tolist() == s.tolist()
    got = pool.acquire(ks)
    assert got.tolist() == s.tolist() and (pool.refs[s] == 1).all()
    assert pool.acquire(keys(10, 99)).tolist() == [s[0], -1]
    assert pool.refs[s].tolist() == [2, 1]
    assert rec.take() == [(EventKind.STORED, "g2", NS, [10, 20])]


def test_release_counts_repeated_slots() -> None:
    pool, _ = make_pool()
    s = registered(pool, keys(1))
    pool.acquire(keys(1))
    assert pool.refs[s[0]] == 2
    pool.release(arr(s[0], s[0]))
    assert pool.refs[s[0]] == 0 and pool.state[s[0]] == G


# ======================================================================================
# register dedup
# ======================================================================================
def test_register_dedups_already_registered_key() -> None:
    pool, rec = make_pool()
    a = registered(pool, keys(7))
    pool.release(a)
    rec.take()
    b = pool.allocate(1)
    assert b is not None and b[0] != a[0]
    pool.complete(b)
    nfree = pool.num_free
    out = pool.register(b, keys(7))
    assert out.tolist() == a.tolist()
    assert pool.refs[a[0]] == 1  # the caller's pin moved to the existing slot
    assert pool.state[b[0]] == R and pool.refs[b[0]] == 0
    assert pool.num_free == nfree + 1 and b[0] in pool._free[: pool.num_free]
    assert pool.num_registered == 1
    assert rec.take() == []  # nothing new was stored


def test_register_dedup_while_pinned_adds_a_pin() -> None:
    pool, _ = make_pool()
    a = registered(pool, keys(7))
    out = registered(pool, keys(7))
    assert out.tolist() == a.tolist() and pool.refs[a[0]] == 2


def test_register_dedups_within_one_batch() -> None:
    pool, rec = make_pool()
    s = pool.allocate(4)
    assert s is not None
    pool.complete(s)
    out = pool.register(s, BlockKeys(NS, [5, 5, 6, 5]))
    assert out.tolist() == [s[0], s[0], s[2], s[0]]
    assert pool.refs[s[0]] == 3 and pool.refs[s[2]] == 1
    assert pool.state[s].tolist() == [G, R, G, R]
    assert pool.num_registered == 2
    assert rec.take() == [(EventKind.STORED, "g2", NS, [5, 6])]
    pool.release(out)
    assert (pool.refs == 0).all()


def test_same_hash_other_namespace_is_not_a_duplicate() -> None:
    pool, rec = make_pool()
    a = registered(pool, keys(1, ns=1))
    b = registered(pool, keys(1, ns=2))
    assert a[0] != b[0] and pool.num_registered == 2
    assert [(ns, hs) for _, _, ns, hs in rec.take()] == [(1, [1]), (2, [1])]
    groups = {k.ns: k.hashes.tolist() for k in pool.registered_keys()}
    assert groups == {1: [1], 2: [1]}


# ======================================================================================
# eviction
# ======================================================================================
def test_evict_only_inactive_registered_unpinned() -> None:
    pool, sl = _pool_in_every_state()
    rec = Recorder(pool.events)
    before = snapshot(pool)
    assert pool.evict(2) == 0  # only one inactive block: all or nothing
    assert_same(before, snapshot(pool))
    assert pool.evict(1) == 1
    assert pool.state[sl["reg_inactive"]] == R
    assert pool.lookup(keys(500, 501)).tolist() == [sl["reg_pinned"], -1]
    for name in ("owned", "partial", "full", "complete", "reg_pinned"):
        assert pool.state[sl[name]] == before["state"][sl[name]]
    assert rec.take() == [(EventKind.EVICTED, "g2", NS, [501])]
    assert pool.evict(1) == 0
    assert pool.evictions == 1


def test_evict_lru_leaf_first_within_batch() -> None:
    pool, rec = make_pool(8)
    a = registered(pool, keys(1, 2, 3))  # one batch: chain a0 <- a1 <- a2
    b = registered(pool, keys(4, 5))
    pool.release(np.concatenate([a, b]))
    rec.take()
    order = []
    for _ in range(5):
        assert pool.evict(1) == 1
        (ev,) = rec.take()
        assert ev[0] == EventKind.EVICTED and ev[1] == "g2"
        order.extend(ev[3])
    assert order == [3, 2, 1, 5, 4]
    assert pool.evict(1) == 0
    assert pool.num_registered == 0 and pool.num_free == 8


def test_evict_lru_access_refreshes() -> None:
    pool, rec = make_pool(8)
    a = registered(pool, keys(1, 2, 3))
    b = registered(pool, keys(4, 5))
    pool.release(np.concatenate([a, b]))
    pool.release(pool.acquire(keys(1)))  # touch a0: now the most recent
    rec.take()
    assert pool.evict(2) == 2
    (ev,) = rec.take()
    assert sorted(ev[3]) == [2, 3]
    assert pool.evict(3) == 3
    assert sorted(rec.take()[0][3]) == [1, 4, 5]


def test_evict_n_exactly_or_nothing() -> None:
    pool, _ = make_pool(8)
    s = registered(pool, keys(1, 2, 3, 4))
    pool.release(s[:3])
    before = snapshot(pool)
    assert pool.evict(4) == 0
    assert_same(before, snapshot(pool))
    assert pool.evict(0) == 0
    assert_same(before, snapshot(pool))
    assert pool.evict(2) == 2
    assert pool.num_registered == 2 and pool.evictions == 2
    assert pool.lookup(keys(1, 2, 3, 4)).tolist()[3] == s[3]


def test_evict_negative_rejected() -> None:
    pool, _ = make_pool()
    pool.release(registered(pool, keys(1)))
    with pytest.raises(ValueError):
        pool.evict(-1)


# ======================================================================================
# allocation
# ======================================================================================
def test_allocate_returns_none_without_evicting() -> None:
    pool, rec = make_pool(4)
    s = registered(pool, keys(1, 2, 3))
    pool.release(s[:2])  # two inactive, one pinned, one free slot
    rec.take()
    before = snapshot(pool)
    assert pool.allocate(4) is None  # needs 3 evictions, only 2 possible
    assert pool.allocate(5) is None
    assert pool.allocate(2, evict=False) is None
    assert_same(before, snapshot(pool))
    assert rec.take() == []
    got = pool.allocate(2)  # one free + exactly one eviction (the LRU leaf of the inactive pair)
    assert got is not None and got.size == 2
    assert pool.num_registered == 2 and pool.evictions == 1
    assert rec.take() == [(EventKind.EVICTED, "g2", NS, [2])]
    assert (pool.refs[got] == 1).all() and (pool.state[got] == R).all()


def test_allocate_distinct_owned_slots() -> None:
    pool, _ = make_pool(6)
    a = pool.allocate(4)
    b = pool.allocate(2)
    assert a is not None and b is not None
    assert sorted(a.tolist() + b.tolist()) == list(range(6))
    assert pool.allocate(1) is None
    got = pool.allocate(0)
    assert got is not None and got.size == 0


def test_allocate_negative_rejected_and_free_list_intact() -> None:
    pool, _ = make_pool(4)
    held = pool.allocate(2)
    assert held is not None
    try:
        pool.allocate(-1)
    except ValueError:
        pass
    assert pool.num_free == 2
    nxt = pool.allocate(2)
    assert nxt is not None and not set(nxt.tolist()) & set(held.tolist())


# ======================================================================================
# removal
# ======================================================================================
def test_remove_pinned_raises_and_removes_nothing() -> None:
    pool, rec = make_pool()
    s = registered(pool, keys(1, 2, 3))
    pool.release(s[:2])
    rec.take()
    before = snapshot(pool)
    with pytest.raises(PinnedError) as ei:
        pool.remove(keys(1, 2, 3))
    assert isinstance(ei.value, IllegalTransitionError)
    assert_same(before, snapshot(pool))
    assert rec.take() == []


def test_remove_present_and_absent() -> None:
    pool, rec = make_pool()
    s = registered(pool, keys(1, 2, 3))
    pool.release(s)
    rec.take()
    found = pool.remove(BlockKeys(NS, [3, 99, 1, 3]))
    assert found.tolist() == [True, False, True, True]
    assert pool.lookup(keys(1, 2, 3)).tolist() == [-1, s[1], -1]
    assert pool.state[s].tolist() == [R, G, R]
    ((kind, tier, ns, hs),) = rec.take()
    assert (kind, tier, ns) == (EventKind.REMOVED, "g2", NS) and sorted(hs) == [1, 3]
    assert pool.remove(keys(42)).tolist() == [False]
    assert rec.take() == []


# ======================================================================================
# events
# ======================================================================================
def test_event_bus_no_subscribers_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    bus = EventBus()
    assert not bus.active

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("an event was built with nobody listening")

    monkeypatch.setattr(events_mod, "BlockEvent", boom)
    bus.publish(EventKind.STORED, "t", keys(1, 2))
    pool = SlotPool(4, BS, events=bus)
    pool.release(registered(pool, keys(1, 2)))
    assert pool.evict(1) == 1
    pool.remove(keys(1, 2))


def test_event_bus_subscribe_unsubscribe_and_empty_batches() -> None:
    bus = EventBus()
    got: list[BlockEvent] = []
    unsub = bus.subscribe(got.append)
    assert bus.active
    bus.publish(EventKind.PROMOTED, "g1", keys(1), detail="x")
    bus.publish(EventKind.STORED, "g1", keys())  # empty batch: no event
    assert len(got) == 1
    assert (got[0].kind, got[0].tier, got[0].keys, got[0].detail) == (EventKind.PROMOTED, "g1", keys(1), "x")
    unsub()
    assert not bus.active
    bus.publish(EventKind.STORED, "g1", keys(2))
    assert len(got) == 1


def test_raising_subscriber_does_not_break_pool(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()

    def bad(ev: BlockEvent) -> None:
        raise RuntimeError("subscriber bug")

    bus.subscribe(bad)
    rec = Recorder(bus)
    pool = SlotPool(4, BS, name="disk", events=bus)
    s = registered(pool, keys(1, 2))
    assert (pool.state[s] == G).all()
    pool.release(s)
    assert pool.evict(1) == 1
    pool.remove(keys(1))
    assert [(k, t) for k, t, _, _ in rec.take()] == [
        (EventKind.STORED, "disk"),
        (EventKind.EVICTED, "disk"),
        (EventKind.REMOVED, "disk"),
    ]
    assert pool.num_registered == 0 and pool.num_free == 4
    assert "subscriber" in caplog.text or any(r.exc_info for r in caplog.records)


def test_event_keys_carry_parents() -> None:
    pool, _ = make_pool()
    got: list[BlockEvent] = []
    pool.events.subscribe(got.append)
    s = registered(pool, BlockKeys.chain(NS, [10, 20, 30], root_parent=7))
    pool.release(s)
    assert got[0].keys.parents.tolist() == [7, 10, 20]
    pool.evict(3)
    assert sorted(zip(got[1].keys.hashes.tolist(), got[1].keys.parents.tolist())) == [(10, 7), (20, 10), (30, 20)]


# ======================================================================================
# KeyIndex vs a dict model
# ======================================================================================
U64 = (1 << 64) - 1
ns_st = st.sampled_from([0, 1, U64, 1 << 63, 0x9E3779B97F4A7C15])
hash_st = st.one_of(st.integers(0, 40), st.sampled_from([0, U64, 1 << 63, (1 << 63) - 1]), st.integers(0, U64))
op_st = st.tuples(
    st.sampled_from(["insert", "insert", "remove", "find"]),
    ns_st,
    st.lists(hash_st, max_size=30),
)


def _check_against_model(idx: KeyIndex, model: dict[tuple[int, int], int]) -> None:
    assert len(idx) == len(model)
    ns, hs, vs = idx.items()
    assert sorted(zip(ns.tolist(), hs.tolist(), vs.tolist())) == sorted((n, h, v) for (n, h), v in model.items())
    for n in {n for n, _ in model} | {0}:
        mine = [h for (m, h) in model if m == n]
        vals, where = idx.find(n, np.array(mine, dtype=np.uint64))
        assert vals.tolist() == [model[(n, h)] for h in mine]
        assert idx.k_hash[where].tolist() == mine
        assert (idx.k_ns[where] == np.uint64(n)).all()


@settings(max_examples=120, deadline=None)
@given(expected=st.integers(1, 40), ops=st.lists(op_st, max_size=40))
def test_key_index_matches_dict_model(expected: int, ops: list[tuple[str, int, list[int]]]) -> None:
    idx = KeyIndex(expected)
    model: dict[tuple[int, int], int] = {}
    counter = 0
    for op, ns, hs in ops:
        uniq = list(dict.fromkeys(hs))
        if op == "insert":
            new = [h for h in uniq if (ns, h) not in model]
            new_vals = list(range(counter, counter + len(new)))
            counter += len(new)
            idx.insert(ns, np.array(new, dtype=np.uint64), np.array(new_vals, dtype=np.int64))
            model.update({(ns, h): v for h, v in zip(new, new_vals)})
        elif op == "remove":
            _, where = idx.find(ns, np.array(uniq, dtype=np.uint64))
            assert (where >= 0).tolist() == [(ns, h) in model for h in uniq]
            idx.remove_at(where)
            for h in uniq:
                model.pop((ns, h), None)
        else:
            vals, _ = idx.find(ns, np.array(hs, dtype=np.uint64))
            assert vals.tolist() == [model.get((ns, h), -1) for h in hs]
        assert idx.used * 2 <= idx.cap  # load factor (live + tombstones) stays at most 1/2
        _check_against_model(idx, model)


def test_key_index_growth_and_tombstone_churn() -> None:
    idx = KeyIndex(1)
    model: dict[tuple[int, int], int] = {}
    rng = np.random.default_rng(7)
    for rnd in range(30):
        ns = int(rng.integers(0, 3)) * 0x1234567890ABCDEF
        hs = np.unique(rng.integers(0, 2**64 - 1, size=50, dtype=np.uint64, endpoint=True))
        hs = np.array([h for h in hs.tolist() if (ns, h) not in model], dtype=np.uint64)
        vals = np.arange(hs.size, dtype=np.int64) + rnd * 1000
        idx.insert(ns, hs, vals)
        model.update({(ns, h): int(v) for h, v in zip(hs.tolist(), vals.tolist())})
        # remove about half of everything, leaving tombstones behind
        victims = [k for i, k in enumerate(sorted(model)) if (i + rnd) % 2 == 0]
        for n in {n for n, _ in victims}:
            idx.remove_at(idx.find(n, np.array([h for m, h in victims if m == n], dtype=np.uint64))[1])
        for k in victims:
            del model[k]
        assert idx.used * 2 <= idx.cap
        _check_against_model(idx, model)
    # remove everything, then the table still answers misses and accepts new keys
    for n in {n for n, _ in model}:
        idx.remove_at(idx.find(n, np.array([h for m, h in model if m == n], dtype=np.uint64))[1])
    model.clear()
    _check_against_model(idx, model)
    assert idx.find(0, np.array([1, 2, 3], dtype=np.uint64))[0].tolist() == [-1, -1, -1]
    idx.insert(5, np.array([1, 2], dtype=np.uint64), np.array([8, 9], dtype=np.int64))
    assert idx.find(5, np.array([2, 1, 3], dtype=np.uint64))[0].tolist() == [9, 8, -1]


def test_key_index_same_hash_different_namespaces_do_not_alias() -> None:
    idx = KeyIndex(4)
    h = np.array([42, U64], dtype=np.uint64)
    idx.insert(1, h, np.array([1, 2], dtype=np.int64))
    idx.insert(U64, h, np.array([3, 4], dtype=np.int64))
    idx.insert(0, h, np.array([5, 6], dtype=np.int64))
    assert idx.find(1, h)[0].tolist() == [1, 2]
    assert idx.find(U64, h)[0].tolist() == [3, 4]
    assert idx.find(0, h)[0].tolist() == [5, 6]
    assert idx.find(2, h)[0].tolist() == [-1, -1]
    assert idx.find(1, np.zeros(0, np.uint64))[0].size == 0
