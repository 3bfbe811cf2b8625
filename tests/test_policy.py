"""Placement policies: leaf-first eviction, ARC adaptation, admission filters, atomic eviction, bad config."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_fs import ConfigError, KVLayout, mount
from kvbm_fs.keys import BlockKeys
from kvbm_fs.lifecycle import SlotPool
from kvbm_fs.policy import (
    DEFAULT_POLICY,
    LRU,
    PARC,
    SHIPPED,
    CountMinSketch,
    CountN,
    PrefixLRU,
    TinyLFU,
    admission_of,
    make_admission,
    make_policy,
    parse_part,
)
from kvbm_fs.tiers.host import HostTier

NS = 0x5151
EVICTION = ["lru", "prefix-lru", "parc", "lfu", "wlfu", "auto"]


def chain(*hashes: int, parent: int = 0) -> BlockKeys:
    return BlockKeys.chain(NS, list(hashes), root_parent=parent)


def pool_with(policy: str | Any, n: int) -> SlotPool:
    return SlotPool(n, None, policy=policy)


def store(pool: SlotPool, keys: BlockKeys) -> np.ndarray:
    """allocate (evicting by policy) -> complete -> register -> release, like a tier's put."""
    slots = pool.allocate(len(keys))
    assert slots is not None, "no room"
    pool.complete(slots)
    final = pool.register(slots, keys)
    pool.release(final)
    return final


def touch(pool: SlotPool, keys: BlockKeys) -> None:
    pool.release(pool.acquire(keys))


def present(pool: SlotPool, *hashes: int) -> list[bool]:
    return (pool.lookup(BlockKeys(NS, list(hashes))) >= 0).tolist()


# ---- prefix awareness --------------------------------------------------------------------------
def test_plain_lru_can_orphan_a_leaf_prefix_lru_takes_the_leaf() -> None:
    for policy, expect in (("lru", [True, False, True, True]), ("prefix-lru", [True, True, False, True])):
        pool = pool_with(policy, 4)
        store(pool, chain(1, 2, 3))
        touch(pool, BlockKeys(NS, [3]))  # only the leaf is recent (e.g. pinned by a reader a while)
        store(pool, chain(9))
        store(pool, chain(10))  # one eviction
        assert present(pool, 1, 2, 3, 9) == expect, policy


@pytest.mark.parametrize("policy", ["prefix-lru", "parc", "lfu", "wlfu", "auto"])
def test_shared_system_prompt_outlives_the_chains_below_it(policy: str) -> None:
    pool = pool_with(policy, 8)
    store(pool, chain(1, 2))  # system prompt: 2 blocks
    for conv in range(5):  # conversations hanging from it, each newer than the prompt itself
        store(pool, chain(100 + 10 * conv, 101 + 10 * conv, parent=2))
        # a new conversation only touches its own suffix here, so the prompt's own recency is old
    for _ in range(6):
        store(pool, chain(1000 + _))
    assert present(pool, 1, 2) == [True, True]
    # whatever else is left is a prefix-closed set: no cached block without its cached parent
    _assert_prefix_closed(pool)


def _assert_prefix_closed(pool: SlotPool) -> None:
    """Every cached block's parent is cached too (all parents in these tests were stored)."""
    _, hs, slots = pool.index.items()
    have = set(hs.tolist())
    for s in slots.tolist():
        p = int(pool.slot_parent[s])
        assert p == 0 or p in have, f"block {int(pool.slot_hash[s])} cached without its parent {p}"


@pytest.mark.parametrize("policy", ["prefix-lru", "parc", "lfu", "wlfu", "auto"])
def test_chains_are_trimmed_from_their_ends(policy: str) -> None:
    pool = pool_with(policy, 6)
    store(pool, chain(1, 2, 3, 4, 5, 6))
    touch(pool, chain(1, 2, 3, 4, 5, 6)[5:])  # the tail is the most recent block
    store(pool, chain(7, 8))  # two evictions: must be the deepest blocks, never the head
    assert present(pool, 1, 2, 3, 4, 5, 6) == [True, True, True, True, False, False]


@pytest.mark.parametrize("policy", ["prefix-lru", "parc", "lfu", "wlfu", "auto"])
def test_parent_of_a_pinned_child_goes_only_as_a_last_resort(policy: str) -> None:
    pool = pool_with(policy, 4)
    store(pool, chain(1, 2))
    store(pool, chain(3))
    pinned = pool.acquire(BlockKeys(NS, [2]))  # in use: not evictable
    assert pool.evict(1) == 1
    assert present(pool, 1, 2, 3) == [True, True, False]  # the unrelated block went first
    assert pool.evict(1) == 1  # then, to make room at all, the parent of the pinned block
    assert present(pool, 1, 2) == [False, True]
    pool.release(pinned)


def test_tree_forgets_children_of_a_removed_parent() -> None:
    pol = PrefixLRU()
    pool = pool_with(pol, 4)
    store(pool, chain(1, 2))
    s2 = int(pool.lookup(BlockKeys(NS, [2]))[0])
    pool.remove(BlockKeys(NS, [1]))
    assert pol.tree.parent[s2] == -1
    store(pool, chain(7, 8))  # slot of block 1 is reused: block 2 must not count as its child
    assert int(pol.tree.nchild.sum()) == 1


# ---- ARC ----------------------------------------------------------------------------------------
def test_parc_keeps_a_reused_block_through_a_scan_lru_does_not() -> None:
    for policy, survives in (("lru", False), ("parc", True)):
        pool = pool_with(policy, 8)
        hot = chain(1, 2)
        store(pool, hot)
        touch(pool, hot)  # seen twice: ARC's frequency list
        for i in range(30):  # a scan of one-off blocks
            store(pool, chain(100 + i))
        assert present(pool, 1, 2) == [survives, survives], policy


def ghost_key(h: int) -> int:
    """PARC's ghost key of block hash ``h`` in namespace NS (one int: the namespace mixed in)."""
    with np.errstate(over="ignore"):
        return int(np.uint64(h) ^ (np.uint64(NS) * np.uint64(0x9E3779B97F4A7C15)))


def test_parc_ghost_hit_enters_t2_and_moves_the_split() -> None:
    pol = PARC()
    pool = pool_with(pol, 2)
    store(pool, chain(1))
    store(pool, chain(2))
    store(pool, chain(3))  # evicts 1 from T1 into ghost list B1
    assert ghost_key(1) in pol.b1 and pol.p == 0
    store(pool, chain(1))  # back from B1: recency deserved more room
    assert pol.p > 0 and ghost_key(1) not in pol.b1
    assert bool(pol.in_t2[int(pool.lookup(BlockKeys(NS, [1]))[0])])
    assert len(pol.b1) + len(pol.b2) <= 2 * pool.num_slots


def test_parc_a_return_from_deeper_in_b1_than_t1_could_reach_leaves_the_split() -> None:
    """ARC's |T1| + |B1| <= c: a key that more than c - p blocks followed out of T1 enters T2 when it
    comes back, but does not grow p (no T1 of an allowed size would have kept it)."""
    pol = PARC()
    pool = pool_with(pol, 2)
    for h in (1, 2, 3, 4, 5):  # 1 leaves T1 first; 2, 3 and 4 follow it
        store(pool, chain(h))
    store(pool, chain(1))
    assert pol.p == 0 and bool(pol.in_t2[int(pool.lookup(BlockKeys(NS, [1]))[0])])


def test_parc_keeps_t2_within_c_minus_p_by_demoting_its_least_recent() -> None:
    """T2's overflow moves to T1 with its recency (LIRS's demotion); evicted from there, it goes to B2."""
    pol = PARC()
    pool = pool_with(pol, 4)
    for h in (1, 2, 3, 4):
        store(pool, chain(h))
    for h in (1, 2, 3, 4):
        touch(pool, chain(h))  # all four in T2
    pol.p = 2.0  # as if recency had earned two slots
    touch(pool, chain(4))
    slot = {h: int(pool.lookup(BlockKeys(NS, [h]))[0]) for h in (1, 2, 3, 4)}
    assert [bool(pol.in_t2[slot[h]]) for h in (1, 2, 3, 4)] == [False, False, True, True] and pol.n_t2 == 2
    for h in (5, 6, 7):  # new blocks: T1 goes in recency order, demoted blocks first
        store(pool, chain(h))
    assert present(pool, 1, 2, 3, 4, 5, 6, 7) == [False, False, True, True, False, True, True]
    assert ghost_key(1) in pol.b2 and ghost_key(2) in pol.b2 and ghost_key(5) in pol.b1


@pytest.mark.parametrize("ghost", [1, 2, 3])
def test_parc_remembers_ghost_times_its_capacity_of_evicted_keys(ghost: int) -> None:
    pol = make_policy(f"parc:ghost={ghost}")
    assert isinstance(pol, PARC)
    pool = pool_with(pol, 4)
    for i in range(40):  # one-off blocks: every one is evicted into B1 in turn
        store(pool, chain(1000 + i))
    assert len(pol.b1) + len(pol.b2) == ghost * 4
    assert list(pol.b1)[-1] == ghost_key(1000 + 40 - 4 - 1), "the most recently evicted key is kept"


@pytest.mark.parametrize("bad", ["0", "-1", "65", "'x'"])
def test_parc_refuses_a_bad_ghost_size(bad: str) -> None:
    with pytest.raises(ConfigError, match="ghost"):
        make_policy(f"parc:ghost={bad}")


def test_lfu_keeps_a_frequent_block_until_aging_catches_up() -> None:
    """LFU with dynamic aging: a block used 4 times outlives blocks used once, but the clock rises
    to each evicted block's priority, so once newcomers enter above it, it goes too."""
    pool = pool_with("lfu", 4)
    store(pool, chain(1))
    for _ in range(3):
        touch(pool, chain(1))
    for h in (2, 3, 4):
        store(pool, chain(h))
    store(pool, chain(5))  # evicts 2: frequency 1, least recent
    assert present(pool, 1, 2, 3, 4, 5) == [True, False, True, True, True]
    gone_at = next(h for h in range(6, 40) if (store(pool, chain(h)), not present(pool, 1)[0])[1])
    assert gone_at > 7  # it survived several rounds of newcomers
    assert pool.policy.clock >= 4  # type: ignore[attr-defined]


def test_lfu_state_is_arrays_and_forgets_removed_blocks() -> None:
    pool = pool_with("lfu", 3)
    s = store(pool, chain(1, 2))
    touch(pool, chain(1))
    pol: Any = pool.policy
    assert pol.freq[s].tolist() == [2, 1] and pol.prio[s].tolist() == [2, 1]
    assert pool.evict(1) == 1 and present(pool, 1, 2) == [True, False]  # the leaf, lower priority
    assert pol.freq[s[1]] == 0 and pol.clock == 1


@pytest.mark.parametrize("bad", ["-1", "'x'"])
def test_lfu_refuses_a_bad_boost(bad: str) -> None:
    with pytest.raises(ConfigError, match="lfu"):
        make_policy(f"lfu:boost_s={bad}")


def test_parc_t2_orders_by_recency() -> None:
    """Every block in T2: the least recent goes first (1, used 4 times but long ago)."""
    pool = pool_with("parc", 4)
    for h in (1, 2, 3, 4):
        store(pool, chain(h))
    for h in (1, 1, 1, 2, 3, 4):
        touch(pool, chain(h))
    assert pool.evict(1) == 1
    assert present(pool, 1, 2, 3, 4) == [False, True, True, True]


def test_parc_rank_prefers_blocks_that_were_hit() -> None:
    p = make_policy("parc:boost_s=10")
    assert p.rank(1_000, 0) == 1_000
    assert p.rank(1_000, 3) == 1_000 + 10_000_000
    assert p.rank(0, 0) >= 0


@pytest.mark.parametrize("spec", EVICTION)
def test_rank_is_ordered_by_last_access_for_equal_hits(spec: str) -> None:
    p = make_policy(spec)
    for hits in (0, 1, 7):
        assert p.rank(10, hits) < p.rank(20, hits)
        assert isinstance(p.rank(10, hits), int)


# ---- atomic eviction and side-effect-free queries ------------------------------------------------
def _state(pool: SlotPool) -> dict[str, Any]:
    pol = pool.policy
    out: dict[str, Any] = {
        "state": pool.state.copy(),
        "refs": pool.refs.copy(),
        "free": pool.num_free,
        "index": sorted(pool.index.items()[1].tolist()),
    }
    for attr in ("stamp", "in_t2", "freq", "prio", "clock"):
        if hasattr(pol, attr):
            out[attr] = np.copy(getattr(pol, attr))
    if hasattr(pol, "tree"):
        out["tree"] = (pol.tree.parent.copy(), pol.tree.nchild.copy())
    if isinstance(pol, PARC):
        out["ghosts"] = (list(pol.b1), list(pol.b2), pol.p)
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, tuple) and x and isinstance(x[0], np.ndarray):
            assert all(np.array_equal(i, j) for i, j in zip(x, y)), k
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y), k
        else:
            assert x == y, k


@pytest.mark.parametrize("spec", EVICTION)
def test_eviction_is_all_or_nothing(spec: str) -> None:
    pool = pool_with(spec, 6)
    store(pool, chain(1, 2, 3))
    store(pool, chain(4, 5))
    pinned = pool.acquire(BlockKeys(NS, [4, 5]))
    before = _state(pool)
    assert pool.evict(4) == 0  # only 3 evictable: nothing happens
    _same(before, _state(pool))
    assert pool.allocate(5) is None  # 1 free + 3 evictable < 5
    _same(before, _state(pool))
    assert pool.coldest(3) and pool.evict(3) == 3
    assert present(pool, 1, 2, 3, 4, 5) == [False, False, False, True, True]
    pool.release(pinned)


@pytest.mark.parametrize("spec", EVICTION)
def test_victims_and_coldest_change_nothing(spec: str) -> None:
    pool = pool_with(spec, 6)
    store(pool, chain(1, 2, 3))
    store(pool, chain(4, 5, 6))
    touch(pool, chain(1, 2))
    before = _state(pool)
    evictable = (pool.state == 3) & (pool.refs == 0)
    v1 = pool.policy.victims(evictable, 4)
    pool.coldest(4)
    v2 = pool.policy.victims(evictable, 4)
    assert v1.tolist() == v2.tolist() and len(set(v1.tolist())) == 4
    _same(before, _state(pool))


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(EVICTION),
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 11), st.integers(1, 4)), min_size=5, max_size=60),
)
def test_random_workload_keeps_invariants(spec: str, ops: list[tuple[int, int, int]]) -> None:
    """Random puts (chains branching off earlier blocks), loads, pins and evictions: evict() takes n
    or nothing; prefix-aware policies never leave a cached block whose parent they evicted
    while the child was evictable."""
    pool = pool_with(spec, 8)
    pins: list[np.ndarray] = []
    fresh = iter(range(1000, 10_000))
    for kind, a, b in ops:
        known = pool.index.items()[1].tolist()
        if kind == 0:  # put a chain of b new blocks under a known block (or a new root)
            parent = known[a % len(known)] if known and a % 3 else 0
            ks = BlockKeys.chain(NS, [next(fresh) for _ in range(b)], root_parent=parent)
            slots = pool.allocate(len(ks))
            if slots is not None:
                pool.complete(slots)
                pool.release(pool.register(slots, ks))
        elif kind == 1 and known:
            touch(pool, BlockKeys(NS, [known[a % len(known)]]))
        elif kind == 2 and known:
            if pins and a % 2:
                pool.release(pins.pop())
            else:
                pins.append(pool.acquire(BlockKeys(NS, [known[a % len(known)]])))
        else:
            evictable = int(((pool.state == 3) & (pool.refs == 0)).sum())
            before = pool.num_registered
            got = pool.evict(b)
            assert got in (0, b) and (got == b) == (b <= evictable)
            assert pool.num_registered == before - got
        if spec != "lru":
            _check_tree(pool)
    for p in pins:
        pool.release(p)


def _check_tree(pool: SlotPool) -> None:
    """The policy's parent links match the pool: each registered block whose parent is registered
    links to it (here parents are always stored before their children), and child counts agree."""
    tree = pool.policy.tree  # type: ignore[attr-defined]
    _, hs, slots = pool.index.items()
    where = dict(zip(hs.tolist(), slots.tolist()))
    kids = np.zeros(pool.num_slots, np.int64)
    for s in slots.tolist():
        par = int(pool.slot_parent[s])
        assert int(tree.parent[s]) == where.get(par, -1), "stale or missing parent link"
        if tree.parent[s] >= 0:
            kids[tree.parent[s]] += 1
    assert np.array_equal(kids[slots], tree.nchild[slots])


# ---- admission ----------------------------------------------------------------------------------
LAYOUT = KVLayout(1, 1, 4, 16, dtype="uint8")  # 128-byte blocks
NB = LAYOUT.block_nbytes


def host(policy: str, blocks: int) -> HostTier:
    return HostTier(blocks * 4096, NB, policy=policy)


def rows(n: int) -> np.ndarray:
    return np.arange(n * NB, dtype=np.int64).astype(np.uint8).reshape(n, NB)


def test_count2_refuses_a_first_sighting_and_admits_the_second() -> None:
    t = host("lru+count2", 8)
    k = chain(1, 2, 3)
    assert t.put(k, rows(3)).tolist() == [False, False, False]
    assert len(t) == 0
    assert t.put(k, rows(3)).all()
    assert len(t) == 3


def test_count2_refuses_the_rest_of_a_chain_after_a_refusal() -> None:
    t = host("lru+count2", 8)
    t.put(chain(1, 2), rows(2))  # seen once
    assert t.put(chain(1, 2, 3, 4), rows(4)).tolist() == [True, True, False, False]


def test_tinylfu_admits_into_free_room_then_only_more_frequent_blocks() -> None:
    t = host("lru+tinylfu", 4)
    hot = chain(1, 2, 3, 4)
    assert t.put(hot, rows(4)).all()  # free slots: no victim, admitted
    for _ in range(3):
        t.get(hot, np.empty((4, NB), np.uint8))
    assert t.put(chain(50), rows(1)).tolist() == [False]  # rarer than the coldest resident
    assert len(t) == 4 and t.contains(hot).all()
    for _ in range(6):  # becomes popular while being refused
        t.put(chain(50), rows(1))
    assert t.contains(chain(50)).all()


def test_refused_blocks_spill_to_the_next_tier() -> None:
    layout = KVLayout(1, 1, 4, 16, dtype="uint8")
    s = mount("host://?capacity=32KiB&name=fast", "host://?capacity=32KiB&name=slow&policy=lru", layout=layout,
              model="m", policy="lru+count2", env={})  # fmt: skip
    try:
        ks = s.keys(np.arange(16 * 3))
        assert s.put(ks, rows(3)).all()
        assert s.match(ks).by_tier() == {"slow": 3}  # first sighting: refused by the fast tier
        s.get(ks, np.empty((3, NB), np.uint8))
        assert not s.tier("fast").contains(ks).any()
        s.put(ks, rows(3))  # offered again: now admitted above
        assert s.tier("fast").contains(ks).all()
    finally:
        s.close(persist=False)


def test_count_min_sketch_overestimates_and_ages() -> None:
    cms = CountMinSketch(64, sample=1000)
    hs = np.arange(1, 41, dtype=np.uint64)
    for _ in range(3):
        cms.add(NS, hs)
    cms.add(NS, hs[:5])
    est = cms.estimate(NS, hs)
    assert (est[:5] >= 4).all() and (est[5:] >= 3).all()
    assert cms.estimate(NS, np.array([10**9], np.uint64))[0] <= 4  # unseen: small
    before = int(cms.estimate(NS, hs[:1])[0])
    cms.add(NS, np.full(900, 10**9 + 7, np.uint64))  # passes the sample size: everything halves
    assert cms.resets >= 1 and int(cms.estimate(NS, hs[:1])[0]) <= before // 2 + 1


def test_admission_objects_are_separate_and_named() -> None:
    p = make_policy("parc+tinylfu:sample=4")
    adm = admission_of(p)
    assert isinstance(p, PARC) and isinstance(adm, TinyLFU) and adm.sample == 4
    assert admission_of(make_policy("lru")) is None
    assert isinstance(make_admission("count2:min_count=3"), CountN)
    assert make_admission("all") is None and make_admission(None) is None
    assert isinstance(make_policy(None), LRU) and make_policy("default").name == DEFAULT_POLICY == "auto"
    assert parse_part("tinylfu:sample=2.5, x=true") == ("tinylfu", {"sample": 2.5, "x": True})
    for spec in SHIPPED:
        make_policy(spec)


# ---- bad config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("mru", ["unknown eviction policy", "'mru'"]),
        ("lru+bloom", ["unknown admission policy", "'bloom'"]),
        ("lru:size=3", ["bad options", "'lru'", "size"]),
        ("parc:boost_s=-1", ["'parc'", "boost_s"]),
        ("parc:boost_s=soon", ["'parc'", "boost_s"]),
        ("lru+tinylfu:sample=0", ["'tinylfu'", "sample"]),
        ("lru+tinylfu:window=2", ["'tinylfu'", "window"]),
        ("lru+count2:min_count=0", ["'count2'", "min_count"]),
        ("lru+count2:min_count=2.5", ["'count2'", "min_count"]),
        ("lru+", ["nothing after '+'"]),
        ("lru:sample", ["'lru'", "key=value"]),
        ("auto:z=-1", ["'auto'", "z"]),
        ("auto:shadow_slots=0", ["'auto'", "shadow_slots"]),
        ("auto:start=lfu", ["'auto'", "start"]),
        ("auto:size=3", ["bad options", "'auto'"]),
        ("wlfu:width=0", ["'wlfu'", "width"]),
        ("wlfu:window=x", ["'wlfu'", "window"]),
    ],
)
def test_bad_policy_config_names_the_policy_and_option(spec: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        make_policy(spec)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_policy_in_a_tier_url_or_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="tinylfu"):
        mount("host://?capacity=1MiB&policy=lru%2Btinylfu:sample=-2", layout=LAYOUT, model="m", env={})
    with pytest.raises(ConfigError, match="unknown eviction policy"):
        mount("host://?capacity=1MiB", layout=LAYOUT, model="m", policy="belady", env={})
