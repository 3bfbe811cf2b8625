"""``wlfu`` (counts with a long memory) and ``auto`` (parc's order or wlfu's, chosen by shadow caches)."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvbm_fs.adaptive import Adaptive, WindowLFU
from kvbm_fs.keys import BlockKeys
from kvbm_fs.lifecycle import SlotPool
from kvbm_fs.tiers.host import HostTier

NS = 0x5151


def chain(*hashes: int) -> BlockKeys:
    return BlockKeys.chain(NS, list(hashes))


def store(pool: SlotPool, keys: BlockKeys) -> None:
    slots = pool.allocate(len(keys))
    assert slots is not None, "no room"
    pool.complete(slots)
    pool.release(pool.register(slots, keys))


def touch(pool: SlotPool, keys: BlockKeys) -> None:
    pool.release(pool.acquire(keys))


def present(pool: SlotPool, *hashes: int) -> list[bool]:
    return (pool.lookup(BlockKeys(NS, list(hashes))) >= 0).tolist()


def serve(pool: SlotPool, requests: list[list[int]]) -> float:
    """Replay semantics: each request's cached prefix is a hit, every block is then used or stored."""
    hits = refs = 0
    for r in requests:
        ks = BlockKeys.chain(NS, r)
        slots = pool.acquire(ks)
        have = slots >= 0
        hits += len(r) if have.all() else int(np.argmin(have))
        refs += len(r)
        miss = np.flatnonzero(~have)
        if miss.size:
            new = pool.allocate(miss.size)
            if new is not None:
                pool.complete(new)
                pool.release(pool.register(new, ks[miss]))
        pool.release(slots[have])
    return hits / refs


def sessions(n: int, turns: int = 6, live: int = 4, seed: int = 0) -> list[list[int]]:
    """Chats: ``live`` sessions at a time, each turn the whole conversation so far (4 blocks a turn);
    a finished session is never seen again, however often its blocks were used."""
    rng = np.random.default_rng(seed)
    active: list[list[int]] = []
    out, started = [], 0
    while started < n or active:
        while len(active) < live and started < n:
            active.append([1000 * (started + 1), 0])
            started += 1
        i = int(rng.integers(len(active)))
        active[i][1] += 1
        out.append(list(range(active[i][0], active[i][0] + 4 * active[i][1])))
        if active[i][1] >= turns:
            active.pop(i)
    return out


def documents(n: int, docs: int = 300, seed: int = 0) -> list[list[int]]:
    """Questions over documents of Zipf popularity: the document's 8 blocks and a one-off block."""
    rng = np.random.default_rng(seed)
    w = 1 / np.arange(1, docs + 1) ** 0.9
    pick = rng.choice(docs, n, p=w / w.sum())
    return [[100 * int(d) + j for j in range(8)] + [10**7 + i] for i, d in enumerate(pick)]


# ---- wlfu ---------------------------------------------------------------------------------------
def test_wlfu_remembers_counts_from_before_a_block_was_cached() -> None:
    """Block 1 was used 3 times, deleted, then stored again: the sketch still counts it, so the next
    eviction takes block 2 (seen once), where LRU would take 1, the least recent."""
    for policy, kept in (("wlfu", [True, False, True]), ("lru", [False, True, True])):
        pool = SlotPool(2, None, policy=policy)
        store(pool, chain(1))
        touch(pool, chain(1))
        touch(pool, chain(1))
        pool.remove(chain(1))
        store(pool, chain(1))
        store(pool, chain(2))
        store(pool, chain(3))
        assert present(pool, 1, 2, 3) == kept, policy


def test_wlfu_counts_age_with_the_sketch() -> None:
    """A block used often long ago keeps its count only while the sketch does: each halving of the
    sketch halves it, so blocks used twice lately overtake it (without aging they never do)."""

    def survives(spec: str) -> int:
        pool = SlotPool(4, None, policy=spec)
        store(pool, chain(1))
        for _ in range(6):
            touch(pool, chain(1))
        for h in range(2, 60):
            store(pool, chain(h))
            touch(pool, chain(h))
            if not present(pool, 1)[0]:
                return h
        return 0

    aged, kept = survives("wlfu:window=2"), survives("wlfu:window=2,age=false")
    assert aged > 3 and kept == 0, (aged, kept)


def test_wlfu_order_is_count_then_recency_and_leaves_first() -> None:
    pool = SlotPool(5, None, policy="wlfu")
    store(pool, chain(1, 2))  # a chain: 1 is 2's parent
    store(pool, chain(3))
    store(pool, chain(4))
    touch(pool, chain(3))
    touch(pool, chain(1, 2))
    pol: Any = pool.policy
    evictable = (pool.state == 3) & (pool.refs == 0)
    order = pool.slot_hash[pol.victims(evictable, 4)].tolist()
    assert order == [4, 3, 2, 1]  # 4 counted once; 3, 2, 1 twice: 3 least recent, then leaf 2 before 1


# ---- auto ---------------------------------------------------------------------------------------
def test_auto_moves_to_parc_on_chats_and_to_wlfu_on_documents() -> None:
    """The two workloads where the orders differ most, each order's own hit ratio measured beside it:
    auto ends on the better one and keeps most of the better one's hits."""
    for reqs, slots, best in ((sessions(120), 64, "parc"), (documents(900), 200, "wlfu")):
        ratio = {p: serve(SlotPool(slots, None, policy=p), reqs) for p in ("parc", "wlfu")}
        pool = SlotPool(slots, None, policy="auto")
        got = serve(pool, reqs)
        pol: Any = pool.policy
        assert max(ratio, key=ratio.get) == best, ratio  # type: ignore[arg-type]
        assert pol.order == best, (ratio, got)
        worse = min(ratio.values())
        assert got > worse + 0.5 * (ratio[best] - worse), (ratio, got)


def test_auto_stays_put_without_evidence() -> None:
    """Nothing is evicted, so the shadows never differ: no switch, whatever the start."""
    for start in ("parc", "wlfu"):
        pool = SlotPool(4096, None, policy=f"auto:start={start}")
        serve(pool, documents(200))
        pol: Any = pool.policy
        assert pol.order == start and pol.switches == 0 and pol.sums[2] == 0


def test_auto_samples_a_share_of_the_references_for_a_large_tier() -> None:
    pool = SlotPool(4000, None, policy="auto:shadow_slots=400")
    pol: Any = pool.policy
    assert [s.pool.num_slots for s in pol.shadows] == [400, 400]
    for i in range(20):
        store(pool, BlockKeys.chain(NS, list(range(1000 * i, 1000 * i + 150))))
    seen = pol.shadows[0].pool.num_registered
    assert seen == pol.shadows[1].pool.num_registered == pol.sampled  # both got the same keys, all new
    assert 0.05 * 3000 < seen < 0.15 * 3000  # about 10% of them (by hash)


def test_a_tier_reports_the_order_auto_evicts_by() -> None:
    tier = HostTier(64 * 128, 128, policy="auto:start=parc")
    assert tier.stats()["policy"] == "auto" and tier.stats()["policy_order"] == "parc"
    assert "policy_order" not in HostTier(64 * 128, 128, policy="lru").stats()


def test_auto_forwards_to_both_orders_and_ranks_as_parc() -> None:
    pool = SlotPool(8, None, policy="auto:boost_s=10")
    pol: Any = pool.policy
    store(pool, chain(1, 2, 3))
    touch(pool, chain(1))
    parc, wlfu = pol.orders
    assert isinstance(pol, Adaptive) and isinstance(wlfu, WindowLFU)
    assert parc.n_t2 == 1 and wlfu.count[pool.lookup(chain(1))[0]] == 2
    assert pol.rank(1_000, 3) == parc.rank(1_000, 3) == 1_000 + 10_000_000
    pool.remove(chain(1, 2, 3))
    assert parc.n_t2 == 0 and int(parc.tree.nchild.sum()) == int(wlfu.tree.nchild.sum()) == 0
