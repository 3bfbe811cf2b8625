"""One event stream: every store operation, every tier's (shared ones too) and every daemon move is
published on the store's EventBus, one event per batch, and the daemon learns of gets and matches
from that stream like any other subscriber."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import LAYOUT, tokens

from kvbm_fs import BlockEvent, EventKind, Store, mount
from kvbm_fs.events import Move, StoreOp
from kvbm_fs.testing import blocks_for

NB = LAYOUT.block_nbytes
SLOT = 4096 + NB


def three_tiers(tmp: Path) -> Store:
    return mount(f"host://?capacity={8 * NB}", f"file://{tmp}/d?capacity={64 * SLOT}", f"remote+file://{tmp}/r",
                 layout=LAYOUT, model="ev", env={})  # fmt: skip


def record(store: Store) -> list[BlockEvent]:
    seen: list[BlockEvent] = []
    store.events.subscribe(seen.append)
    return seen


def of(seen: list[BlockEvent], kind: EventKind, tier: str | None = None) -> list[BlockEvent]:
    return [e for e in seen if e.kind is kind and (tier is None or e.tier == tier)]


def hashes(evs: list[BlockEvent]) -> set[int]:
    return {h for e in evs for h in e.keys.hashes.tolist()}


def test_store_operations_on_every_tier_publish_one_event_per_batch(tmp_path: Path) -> None:
    store = three_tiers(tmp_path)
    seen = record(store)
    keys = store.keys(tokens(12, seed=1))
    data = blocks_for(keys, NB)
    for tier, part in (("host", slice(0, 4)), ("disk", slice(4, 8)), ("remote", slice(8, 12))):
        seen.clear()
        assert store.put(keys[part], data[part], tier=tier).all()
        stored = of(seen, EventKind.STORED)
        assert [(e.tier, len(e.keys)) for e in stored] == [(tier, 4)], "one STORED event for the batch"
        (saved,) = of(seen, EventKind.SAVED)
        op = saved.data
        assert isinstance(op, StoreOp) and op.done.all() and (op.where == op.tiers.index(tier)).all()
        assert op.seconds[op.tiers.index(tier)] >= 0
    seen.clear()
    m = store.match(keys)
    (matched,) = of(seen, EventKind.MATCHED)
    assert matched.data is m and m.by_tier() == {"host": 4, "disk": 4, "remote": 4}
    out = np.zeros_like(data)
    assert store.get(keys, out, m).all() and np.array_equal(out, data)
    (loaded,) = of(seen, EventKind.LOADED)
    assert loaded.data.done.all() and [s >= 0 for s in loaded.data.seconds] == [True, True, True]
    seen.clear()
    assert store.delete(keys).all()
    removed = of(seen, EventKind.REMOVED)
    assert sorted((e.tier, len(e.keys)) for e in removed) == [("disk", 4), ("host", 4), ("remote", 4)]
    store.close(persist=False)


def test_daemon_moves_are_published_as_stored_below_plus_removed_above(tmp_path: Path) -> None:
    store = three_tiers(tmp_path)
    d = store.start_daemon({"high": 0.5, "low": 0.25})
    d.stop()
    seen = record(store)
    keys = store.keys(tokens(8, seed=2))
    assert store.put(keys, blocks_for(keys, NB)).all()
    seen.clear()
    d.run_once()
    demoted = of(seen, EventKind.DEMOTED, "disk")
    assert demoted and all(isinstance(e.data, Move) and e.data.action == "demote" for e in demoted)
    assert all(e.data.src == "host" and e.data.nbytes == len(e.keys) * NB for e in demoted)
    moved = hashes(demoted)
    assert len(moved) == d.stats()["demoted_blocks"] == 6
    assert hashes(of(seen, EventKind.STORED, "disk")) == moved  # the copy below...
    assert hashes(of(seen, EventKind.REMOVED, "host")) == moved  # ...and where it left
    # a get served by the disk tier promotes what it read
    d.config.prefetch = False
    on_disk = np.flatnonzero(store.match(keys).where == 1)
    first = int(on_disk[0])
    seen.clear()
    assert store.get(keys[first : first + 1], np.zeros((1, NB), np.uint8)).all()
    d.run_once()
    promoted = of(seen, EventKind.PROMOTED, "host")
    assert [(e.data.action, e.data.src) for e in promoted] == [("promote", "disk")]
    assert hashes(promoted) == {int(keys.hashes[first])} == hashes(of(seen, EventKind.STORED, "host"))
    # a match prefetches the rest of the chain that lives below
    d.config.prefetch = True
    seen.clear()
    store.match(keys)
    d.run_once()
    prefetched = of(seen, EventKind.PROMOTED, "host")
    assert {e.data.action for e in prefetched} == {"prefetch"}
    assert hashes(prefetched) == set(keys.hashes[on_disk[1:]].tolist())
    store.close(persist=False)


def test_the_daemon_hears_gets_and_matches_only_through_the_stream(tmp_path: Path) -> None:
    store = three_tiers(tmp_path)
    keys = store.keys(tokens(4, seed=3))
    assert store.put(keys, blocks_for(keys, NB), tier="disk").all()
    d = store.start_daemon()
    d.stop()
    d.detach()  # no longer subscribed: a get from the disk tier queues no promotion
    assert store.get(keys, np.zeros((4, NB), np.uint8)).all()
    assert d.stats()["queued"] == 0
    d.run_once()
    assert store.match(keys).by_tier() == {"disk": 4}
    d2 = store.daemon = type(d)(store, d.config)  # a subscribed daemon over the same store
    assert store.get(keys, np.zeros((4, NB), np.uint8)).all()
    assert d2.stats()["queued"] > 0
    d2.run_once()
    assert store.match(keys).by_tier() == {"host": 4}
    store.close(persist=False)


def test_nothing_is_built_for_events_when_nobody_listens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = three_tiers(tmp_path)

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("a StoreOp was built with no subscriber")

    monkeypatch.setattr("kvbm_fs.store.StoreOp", boom)
    keys = store.keys(tokens(4, seed=4))
    assert store.put(keys, blocks_for(keys, NB)).all()
    assert store.get(keys, np.zeros((4, NB), np.uint8)).all()
    with pytest.raises(AssertionError, match="StoreOp"):
        record(store)
        store.get(keys, np.zeros((4, NB), np.uint8))
    store.close(persist=False)


def test_a_peer_tier_publishes_its_stores_and_removals() -> None:
    from kvbm_fs.testing import require_nixl

    require_nixl()
    with mount("host://?capacity=1MiB", layout=LAYOUT, model="ev", env={}) as home:
        srv = home.export_peer()
        with mount(f"host://?capacity={4 * NB}", srv.url, layout=LAYOUT, model="ev", env={}) as s:
            seen = record(s)
            keys = s.keys(tokens(3, seed=5))
            assert s.put(keys, blocks_for(keys, NB), tier="peer").all()
            assert [(e.tier, len(e.keys)) for e in of(seen, EventKind.STORED)] == [("peer", 3)]
            assert s.get(keys, np.zeros((3, NB), np.uint8)).all()
            assert of(seen, EventKind.LOADED)[0].data.where.tolist() == [1, 1, 1]
            s.delete(keys)
            assert [(e.tier, len(e.keys)) for e in of(seen, EventKind.REMOVED)] == [("peer", 3)]
