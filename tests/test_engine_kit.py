"""The connector kit (kvbm_fs.engine): containment, write-through, namespace deletion, the store registry."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import LAYOUT, kv_blocks, tokens

from kvbm_fs import BlockKeys, Namespace, Store, mount
from kvbm_fs.engine import Registry, close_store, delete_namespace, present, write_targets, write_through
from kvbm_fs.tier import Medium


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
