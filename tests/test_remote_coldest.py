"""``coldest`` of a size-bounded remote tier, the blocks its eviction on put takes next: what the placement
daemon demotes from it above another tier (where it no longer evicts on put, so demotion is the only way
blocks leave it), and what a TinyLFU admission filter weighs a new block against."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvbm_fs import Store
from kvbm_fs.codec import HEADER_SIZE
from kvbm_fs.daemon import DaemonConfig, PlacementDaemon
from kvbm_fs.testing import NS_A, blocks_for, chain
from kvbm_fs.tiers.remote import RemoteTier

NB = NS_A.block_nbytes
CAP = 20  # blocks the upper tier holds; marks 0.90 / 0.75: 18 / 15 blocks


def _tiers(tmp_path: Path) -> tuple[RemoteTier, RemoteTier]:
    upper = RemoteTier(f"file://{tmp_path}/upper", NB, CAP * (NB + HEADER_SIZE), name="upper")
    lower = RemoteTier(f"file://{tmp_path}/lower", NB, name="lower")
    for t in (upper, lower):
        t.bind_namespace(NS_A)
    return upper, lower


def test_coldest_is_what_eviction_takes_next(tmp_path: Path) -> None:
    """``coldest(n)`` names the blocks a put's eviction would remove, in its order (oldest written first,
    never a pinned one), and removes nothing itself."""
    upper, _ = _tiers(tmp_path)
    keys = chain(NS_A, CAP)
    data = blocks_for(keys, NB)
    for i in range(CAP):  # one put each: block 0 is the oldest written
        assert upper.put(keys[i : i + 1], data[i : i + 1]).all()
    assert upper.pin(keys[1:2]).all()
    cold = upper.coldest(3)
    assert [(b.ns, h) for b in cold for h in b.hashes.tolist()] == [(NS_A.id, int(h)) for h in keys.hashes[[0, 2, 3]]]
    assert len(upper) == CAP and upper.contains(keys).all()  # nothing removed
    assert upper.coldest(0) == [] and sum(len(b) for b in upper.coldest(10 * CAP)) == CAP - 1
    more = chain(NS_A, 3, start=500)
    assert upper.put(more, blocks_for(more, NB)).all()  # eviction on put takes exactly those three
    assert upper.contains(keys).tolist() == [False, True, False, False] + [True] * (CAP - 4)
    upper.unpin(keys[1:2])
    unbounded = RemoteTier(f"file://{tmp_path}/lower", NB, name="u")
    assert unbounded.coldest(5) == []  # never over a watermark, and counting would be a full listing


def test_the_daemon_trims_a_bounded_remote_tier_above_another(tmp_path: Path) -> None:
    """Everyday traffic into a bounded remote tier above an unbounded one: each daemon round demotes the
    oldest blocks (copied down, then deleted), so the tier stays under its high watermark and keeps
    taking puts; every block stays readable with its own bytes."""
    upper, lower = _tiers(tmp_path)
    store = Store([upper, lower], NS_A)
    daemon = PlacementDaemon(store, DaemonConfig.from_dict({"promote": False, "prefetch": False})).attach()
    assert not upper.evict_on_put and lower.evict_on_put
    keys = chain(NS_A, 3 * CAP)
    data = blocks_for(keys, NB)
    for i in range(len(keys)):  # one block per put, the daemon running after each
        assert store.put(keys[i : i + 1], data[i : i + 1]).all()
        daemon.run_once()
        assert len(upper) <= 0.9 * CAP  # back under its high watermark after every round
    assert upper.contains(keys[-CAP // 2 :]).all()  # the newest stay (every put landed here: none spilled)
    assert not upper.contains(keys[:CAP]).any()  # the oldest were demoted
    assert daemon.counters["demoted_blocks"] >= 2 * CAP and daemon.counters["kept_blocks"] == 0
    assert lower.contains(keys[:CAP]).all()
    in_upper, in_lower = upper.contains(keys), lower.contains(keys)
    assert (in_upper | in_lower).all() and not (in_upper & in_lower).any()  # moved, not copied
    m = store.match(keys)
    out = np.zeros_like(data)
    assert m.length == len(keys) and store.get(keys, out, m).all() and np.array_equal(out, data)
    assert len(upper) == len(upper.list_blocks())  # the count the daemon reads is what the bucket holds
    store.close(persist=False)


def test_tinylfu_on_a_full_bounded_remote_tier_weighs_new_blocks_against_its_coldest(tmp_path: Path) -> None:
    """A block offered more often than the coldest stored one displaces it; a one-off one does not."""
    t = RemoteTier(f"file://{tmp_path}/r", NB, 4 * (NB + HEADER_SIZE), policy="lru+tinylfu")
    t.bind_namespace(NS_A)
    old = chain(NS_A, 4)
    for i in range(4):  # one put each: block 0 is the oldest written (one put writes them concurrently)
        assert t.put(old[i : i + 1], blocks_for(old[i : i + 1], NB)).all()
    new = chain(NS_A, 2, start=100)
    assert not t.put(new, blocks_for(new, NB)).any()  # seen once, as the two coldest were
    scan, listings = t._scan, []

    def counted() -> tuple[list[tuple[int, int, float]], dict[str, str]]:
        listings.append(1)
        return scan()

    t._scan = counted  # type: ignore[method-assign]
    assert t.put(new, blocks_for(new, NB)).all()  # seen twice: it takes their place
    assert t.contains(old).tolist() == [False, False, True, True] and len(t) == 4
    assert len(listings) == 1  # the filter weighed the very victims eviction took: one listing
    t.evict_on_put = False  # as under a daemon: a put takes free room only, so no victims to weigh
    newer = chain(NS_A, 2, start=200)
    for _ in range(2):
        assert not t.put(newer, blocks_for(newer, NB)).any()
    assert len(listings) == 1 and t.contains(new).all()
