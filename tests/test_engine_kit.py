"""The connector kit (kvbm_fs.engine): containment, write-through, namespace deletion, the store registry,
verified loads and reported saves."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import LAYOUT, kv_blocks, tokens
from disk_helpers import corrupt_payload

from kvbm_fs import BlockKeys, Namespace, Store, mount
from kvbm_fs.engine import (
    Registry,
    close_store,
    delete_namespace,
    fill,
    leading,
    load,
    present,
    save,
    write_targets,
    write_through,
)
from kvbm_fs.events import VERIFY, BlockEvent, EventKind
from kvbm_fs.tier import Medium
from kvbm_fs.tiers.disk import DiskTier


@pytest.fixture
def tiered(tmp_path: Path) -> Iterator[Store]:
    s = mount(
        "gpu://cpu?capacity=128KiB",
        "host://?capacity=512KiB",
        f"file://{tmp_path}/a?capacity=1MiB&name=disk_a",
        f"file://{tmp_path}/b?capacity=1MiB&name=disk_b",
        layout=LAYOUT,
        model="kit-model",
        env={},
    )
    yield s
    s.close(persist=False)


def _refuse_all(keys: BlockKeys, rows: Any) -> np.ndarray:
    return np.zeros(len(keys), bool)


def test_present_counts_every_tier_unless_its_medium_is_skipped(tiered: Store) -> None:
    keys = tiered.keys(tokens(4))
    data = kv_blocks(4)
    assert tiered.put(keys[:1], data[:1], tier="gpu", spill=False).all()
    assert tiered.put(keys[1:3], data[1:3], tier="disk_b", spill=False).all()
    assert present(tiered, keys).tolist() == [True, True, True, False]
    assert present(tiered, keys, skip=(Medium.DISK,)).tolist() == [True, False, False, False]
    assert present(tiered, keys[:0]).tolist() == []


def test_present_stops_asking_once_every_key_is_found(tiered: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tiered.keys(tokens(3))
    assert tiered.put(keys, kv_blocks(3), tier="gpu", spill=False).all()

    def boom(_: BlockKeys) -> np.ndarray:
        raise AssertionError("a slower tier was asked about blocks a faster tier holds")

    for name in ("host", "disk_a", "disk_b"):
        monkeypatch.setattr(tiered.tier(name), "contains", boom)
    assert present(tiered, keys).all()


def test_write_through_fills_the_persistent_tiers_and_counts_a_dead_tiers_drops(
    tiered: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert [t.name for t in write_targets(tiered, False)] == ["gpu"]
    assert [t.name for t in write_targets(tiered, True)] == ["gpu", "disk_a", "disk_b"]  # host is not persistent
    keys = tiered.keys(tokens(5))
    data = kv_blocks(5)
    assert write_through(tiered, keys, data) == 0
    assert tiered.tier("disk_a").contains(keys).all() and tiered.tier("disk_b").contains(keys).all()
    assert not tiered.tier("host").contains(keys).any() and not tiered.tier("gpu").contains(keys).any()

    more = tiered.keys(tokens(3, seed=1))
    monkeypatch.setattr(tiered.tier("disk_b"), "put", _refuse_all)  # a dead tier: its puts return False
    assert write_through(tiered, more, kv_blocks(3, seed=1)) == 3
    assert tiered.tier("disk_a").contains(more).all()  # the live tier still got them, and nothing spilled
    assert not tiered.tier("disk_b").contains(more).any()


def test_delete_namespace_removes_only_that_namespace_from_every_tier(tiered: Store) -> None:
    ns = tiered.default_namespace
    assert ns is not None
    other = tiered.add_namespace(Namespace(ns.model, ns.layout, tenant="other"))
    mine, theirs = ns.keys_for_tokens(tokens(4)), other.keys_for_tokens(tokens(4))
    for tier in ("gpu", "host", "disk_a"):
        assert tiered.put(mine, kv_blocks(4), tier=tier, spill=False).all()
        assert tiered.put(theirs, kv_blocks(4), tier=tier, spill=False).all()
    assert delete_namespace(tiered, ns) == 4  # blocks, each gone from every tier that held it
    assert not present(tiered, mine).any()
    for tier in ("gpu", "host", "disk_a"):
        assert tiered.tier(tier).contains(theirs).all()
    assert delete_namespace(tiered, ns) == 0


def test_registry_shares_by_key_and_the_last_release_closes_once() -> None:
    closed: list[str] = []
    reg: Registry[str] = Registry(closed.append)
    a = reg.acquire("k", lambda: "first")
    b = reg.acquire("k", lambda: "second")
    assert a is b and a.value == "first" and a.refs == 2 and "k" in reg and len(reg) == 1
    c = reg.acquire("k", lambda: "fresh", current=lambda v: v != "first")  # a stale entry is replaced
    assert c.value == "fresh" and len(reg) == 1
    reg.release(a)
    assert closed == []
    reg.release(b)  # the stale entry's last holder still closes it
    assert closed == ["first"]
    reg.close_all()
    assert closed == ["first", "fresh"] and not reg
    reg.release(c)  # after close_all: nothing closes twice
    assert closed == ["first", "fresh"]
    reg.close_all()
    assert closed == ["first", "fresh"]


def test_registry_closes_a_shared_store_at_exit_persisting_host_blocks(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import LAYOUT, kv_blocks, tokens
        from kvbm_fs import mount
        from kvbm_fs.engine import Registry, close_store

        made = []
        def make():
            made.append(1)
            return mount("host://?capacity=512KiB", "file://{tmp_path}/d?capacity=1MiB",
                         layout=LAYOUT, model="kit-model", env={{}})
        reg = Registry(close_store)
        a = reg.acquire(("engine", "worker"), make)
        b = reg.acquire(("engine", "worker"), make)
        assert a is b and len(made) == 1
        store = a.value
        store.on_close.append(lambda: print("closed", flush=True))
        # a batch: the disk tier's I/O pool refuses work once interpreter shutdown began, and the
        # tier must then write serially rather than lose the blocks
        keys = store.keys(tokens(6))
        assert store.put(keys, kv_blocks(6)).all()
        assert not store.tier("disk").contains(keys).any()
        # exits without releasing: the registry's atexit hook closes the store
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["closed"], proc.stdout
    with mount(f"file://{tmp_path}/d?capacity=1MiB", layout=LAYOUT, model="kit-model", env={}) as s:
        assert s.match(s.keys(tokens(6))).length == 6  # persisted into the disk tier at exit


def test_close_store_accepts_none() -> None:
    close_store(None)


# ---- load and save --------------------------------------------------------------------------------------


def test_leading_is_the_run_of_true_before_the_first_false() -> None:
    assert leading(np.array([True, True, False, True])) == 2
    assert leading([True, True]) == 2 and leading([False, True]) == 0 and leading(np.zeros(0, bool)) == 0


def test_load_of_a_corrupted_block_is_a_counted_miss_and_cuts_the_prefix(
    tiered: Store, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    keys = tiered.keys(tokens(5))
    data = kv_blocks(5)
    assert tiered.put(keys, data, tier="disk_a", spill=False).all()
    disk = tiered.tier("disk_a")
    assert isinstance(disk, DiskTier)
    corrupt_payload(disk, keys[2:3])
    seen: list[BlockEvent] = []
    tiered.events.subscribe(seen.append)
    out = torch.zeros_like(data)
    with caplog.at_level(logging.WARNING, logger="kvbm_fs"):
        res = load(tiered, keys, out, what="kit-test")
    assert res.got.tolist() == [True, True, False, True, True]
    assert (res.loaded, res.failed, res.prefix, res.error) == (4, 1, 2, None)
    assert torch.equal(out[:2], data[:2]) and torch.equal(out[3:], data[3:])
    bad = [e for e in seen if e.kind is EventKind.LOAD_FAILED and e.data == VERIFY]
    assert [k.seq_hash for e in bad for k in e.keys] == [keys[2:3].hashes[0]]
    assert "kit-test: 1 of 5 blocks failed to load" in caplog.text


def test_load_recovers_from_a_read_that_raises_only_when_asked(
    tiered: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    keys = tiered.keys(tokens(3))
    assert tiered.put(keys, kv_blocks(3), tier="host", spill=False).all()

    def broken(keys: BlockKeys, rows: Any) -> np.ndarray:
        raise OSError("device gone")

    monkeypatch.setattr(tiered.tier("host"), "get", broken)
    out = torch.zeros((3, *LAYOUT.block_shape), dtype=torch.float16)
    with pytest.raises(OSError, match="device gone"):
        load(tiered, keys, out)
    with caplog.at_level(logging.ERROR, logger="kvbm_fs"):
        res = load(tiered, keys, out, recover=True, what="kit-test")
    assert res.got.tolist() == [False] * 3 and (res.loaded, res.failed, res.prefix) == (0, 3, 0)
    assert isinstance(res.error, OSError) and "kit-test: loading 3 blocks failed" in caplog.text
    assert not out.any()


def test_save_puts_only_missing_blocks_and_copies_out_only_those(tiered: Store) -> None:
    keys = tiered.keys(tokens(4))
    data = kv_blocks(4)
    assert tiered.put(keys[1:2], data[1:2], tier="disk_b", spill=False).all()
    asked: list[list[int]] = []

    def rows(idx: np.ndarray) -> Any:
        asked.append(idx.tolist())
        return data[idx]

    res = save(tiered, keys, rows)
    assert asked == [[0, 2, 3]]  # the held block is neither copied out nor written again
    assert (res.skipped, res.saved, res.failed, res.dropped, res.ok) == (1, 3, 0, 0, True)
    assert res.stored.all() and tiered.tier("gpu").contains(keys).tolist() == [True, False, True, True]
    again = save(tiered, keys, rows)
    assert asked == [[0, 2, 3]] and (again.skipped, again.saved) == (4, 0)
    every = save(tiered, keys, data, skip_present=False)  # asked not to look: every block is put again
    assert (every.skipped, every.saved) == (0, 4)
    assert save(tiered, keys[:0], data[:0]).stored.tolist() == []


def test_save_skips_only_blocks_held_by_media_it_asks(tiered: Store) -> None:
    keys = tiered.keys(tokens(2))
    data = kv_blocks(2)
    assert tiered.put(keys, data, tier="disk_a", spill=False).all()
    res = save(tiered, keys, data, skip=(Medium.DISK,))
    assert (res.skipped, res.saved) == (0, 2) and tiered.tier("gpu").contains(keys).all()


def test_save_reports_blocks_no_tier_took_and_a_dead_write_through_tier(
    tiered: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tiered.keys(tokens(3))
    data = kv_blocks(3)
    monkeypatch.setattr(tiered.tier("disk_b"), "put", _refuse_all)
    res = save(tiered, keys, data, write_through=True)
    assert (res.saved, res.failed, res.dropped, res.ok) == (3, 0, 3, False)
    assert tiered.tier("disk_a").contains(keys).all()  # the live persistent tier still got them
    more = tiered.keys(tokens(2, seed=1))
    for name in ("gpu", "host", "disk_a"):
        monkeypatch.setattr(tiered.tier(name), "put", _refuse_all)
    with caplog.at_level(logging.WARNING, logger="kvbm_fs"):
        res = save(tiered, more, kv_blocks(2, seed=1), what="kit-test")
    assert (res.saved, res.failed, res.stored.tolist()) == (0, 2, [False, False])
    assert "kit-test: 2 of 2 new blocks were not saved" in caplog.text


def test_save_recovers_from_a_put_that_raises_only_when_asked(
    tiered: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tiered.keys(tokens(3))
    data = kv_blocks(3)
    assert tiered.put(keys[:1], data[:1]).all()

    def broken(keys: BlockKeys, rows: Any) -> np.ndarray:
        raise OSError("disk full of errors")

    monkeypatch.setattr(tiered.tier("gpu"), "put", broken)
    with pytest.raises(OSError, match="disk full of errors"):
        save(tiered, keys, data)
    with caplog.at_level(logging.ERROR, logger="kvbm_fs"):
        res = save(tiered, keys, data, recover=True, what="kit-test")
    assert (res.skipped, res.saved, res.failed, res.stored.tolist()) == (1, 0, 2, [True, False, False])
    assert isinstance(res.error, OSError) and "kit-test: saving 2 blocks failed" in caplog.text


def test_save_notes_the_new_blocks_tokens_before_their_put(tiered: Store) -> None:
    keys = tiered.keys(tokens(3))
    toks = tokens(3).reshape(3, -1)
    data = kv_blocks(3)
    assert tiered.put(keys[:1], data[:1]).all()
    seen: list[BlockEvent] = []
    tiered.events.subscribe(seen.append)
    save(tiered, keys, data, tokens=toks)
    kinds = [e.kind for e in seen if e.kind in (EventKind.TOKENS, EventKind.SAVED)]
    assert kinds == [EventKind.TOKENS, EventKind.SAVED]
    (noted,) = [e for e in seen if e.kind is EventKind.TOKENS]
    assert noted.keys == keys[1:] and np.array_equal(noted.data, toks[1:].reshape(-1))


def test_fill_puts_into_each_target_what_it_lacks_and_spills_only_without_write_through(
    tiered: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tiered.keys(tokens(4))
    data = kv_blocks(4)
    assert tiered.put(keys[:1], data[:1], tier="gpu", spill=False).all()  # in the first tier only
    assert tiered.put(keys[1:2], data[1:2], tier="disk_a", spill=False).all()  # on one disk only
    for name in ("gpu", "disk_a", "disk_b"):
        assert tiered.put(keys[2:3], data[2:3], tier=name, spill=False).all()  # in every target
    asked: list[list[int]] = []

    def rows(idx: np.ndarray) -> Any:
        asked.append(idx.tolist())
        return data[idx]

    res = fill(tiered, keys, rows, write_through=True)
    assert asked == [[0, 1, 3]]  # block 2 is in every target: not copied out
    for name in ("gpu", "disk_a", "disk_b"):  # every target holds every block now
        assert tiered.tier(name).contains(keys).all(), name
    assert (res.skipped, res.saved, res.failed, res.dropped, res.stored.all()) == (1, 3, 0, 0, True)

    more = tiered.keys(tokens(3, seed=1))
    monkeypatch.setattr(tiered.tier("gpu"), "put", _refuse_all)
    res = fill(tiered, more, kv_blocks(3, seed=1))  # no write-through: the first tier refuses, host takes them
    assert res.stored.all() and tiered.tier("host").contains(more).all() and res.saved == 3
    monkeypatch.setattr(tiered.tier("disk_b"), "put", _refuse_all)
    last = tiered.keys(tokens(2, seed=2))
    res = fill(tiered, last, kv_blocks(2, seed=2), write_through=True)  # no spill: gpu and disk_b refuse
    assert res.stored.all() and (res.saved, res.failed, res.dropped) == (2, 0, 2)
    assert tiered.tier("disk_a").contains(last).all() and not tiered.tier("host").contains(last).any()
