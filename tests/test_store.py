"""The tiered store: put/match/get across G1 and G2, pins, deletes, transfers, events, threads."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LAYOUT, kv_blocks, tokens

from kvbm_fs import (
    BlockEvent,
    ConfigError,
    EventKind,
    KVLayout,
    LayoutMismatchError,
    Namespace,
    PinnedError,
    Store,
    TierClosedError,
    mount,
)


def test_put_match_get_roundtrip(store: Store) -> None:
    keys = store.keys(tokens(6))
    data = kv_blocks(6)
    assert store.put(keys, data).all()
    m = store.match(keys)
    assert m.length == 6 and m.runs == (("gpu", 0, 6),) and m.num_tokens == 96
    out = torch.empty_like(data)
    assert store.get(keys, out, m).all()
    assert torch.equal(out, data)


def test_match_reports_runs_per_tier_and_stops_at_first_gap(store: Store) -> None:
    keys = store.keys(tokens(8))
    data = kv_blocks(8)
    store.put(keys[:3], data[:3], tier="host")
    store.put(keys[3:5], data[3:5], tier="gpu")
    store.put(keys[6:], data[6:], tier="gpu")
    m = store.match(keys)
    assert m.length == 5
    assert m.runs == (("host", 0, 3), ("gpu", 3, 5))
    assert m.by_tier() == {"host": 3, "gpu": 2}
    out = torch.zeros_like(data)
    got = store.get(keys, out)
    assert got.tolist() == [True] * 5 + [False] + [True] * 2
    assert torch.equal(out[:5], data[:5]) and torch.equal(out[6:], data[6:])
    assert (out[5] == 0).all()


def test_a_block_in_several_tiers_is_read_from_the_fastest(store: Store) -> None:
    keys = store.keys(tokens(2))
    store.put(keys, kv_blocks(2), tier="host")
    store.copy(keys, "host", "gpu")
    assert store.match(keys).runs == (("gpu", 0, 2),)


def test_copy_between_tiers_publishes_promoted_and_demoted(store: Store) -> None:
    seen: list[BlockEvent] = []
    store.events.subscribe(seen.append)
    keys = store.keys(tokens(3))
    data = kv_blocks(3)
    store.put(keys, data, tier="gpu")
    assert store.copy(keys, "gpu", "host").all()
    store.tier("gpu").delete(keys)
    assert store.copy(keys[:2], "host", "gpu").all()
    kinds = [(e.kind, e.tier, len(e.keys)) for e in seen]
    assert (EventKind.DEMOTED, "host", 3) in kinds
    assert (EventKind.PROMOTED, "gpu", 2) in kinds
    assert (EventKind.REMOVED, "gpu", 3) in kinds
    out = torch.empty_like(data)
    assert store.get(keys, out).all() and torch.equal(out, data)


def test_full_tier_evicts_lru_and_keeps_data_intact() -> None:
    store = mount("gpu://cpu?capacity=128KiB", "host://?capacity=512KiB", layout=LAYOUT, policy="lru", env={})
    gpu = store.tier("gpu")
    cap = gpu.capacity_bytes // gpu.block_nbytes
    keys = store.keys(tokens(cap + 4))
    data = kv_blocks(cap + 4)
    for i in range(0, cap + 4, 4):
        store.put(keys[i : i + 4], data[i : i + 4])
    assert len(gpu) == cap
    present = gpu.contains(keys)
    assert not present[:4].any() and present[4:].all()  # oldest batch went first
    out = torch.zeros_like(data)
    got = store.get(keys, out)
    assert torch.equal(out[got], data[torch.from_numpy(got)])


def test_pinned_blocks_survive_and_cannot_be_deleted(store: Store) -> None:
    gpu = store.tier("gpu")
    cap = gpu.capacity_bytes // gpu.block_nbytes
    hot = store.keys(tokens(2, seed=1))
    store.put(hot, kv_blocks(2, seed=1))
    with store.pin(hot) as pins:
        assert pins.mask.all()
        store.put(store.keys(tokens(cap * 2, seed=2)), kv_blocks(cap * 2, seed=2))
        assert gpu.contains(hot).all()
        with pytest.raises(PinnedError):
            store.delete(hot)
        assert gpu.contains(hot).all()
    assert store.delete(hot).all()
    assert store.match(hot).length == 0


def test_gpu_tier_refuses_when_everything_is_pinned(store: Store) -> None:
    gpu = store.tier("gpu")
    cap = gpu.capacity_bytes // gpu.block_nbytes
    keys = store.keys(tokens(cap, seed=3))
    store.put(keys, kv_blocks(cap, seed=3))
    pins = store.pin(keys)
    more = store.keys(tokens(2, seed=4))
    assert not store.put(more, kv_blocks(2, seed=4), spill=False).any()
    assert gpu.contains(keys).all()
    assert store.put(more, kv_blocks(2, seed=4)).all()  # spilled to the next tier down
    assert store.match(more).runs == (("host", 0, 2),)
    pins.release()
    assert store.put(more, kv_blocks(2, seed=4), tier="gpu", spill=False).all()


def test_wrong_layout_data_is_refused_and_nothing_is_lost(store: Store) -> None:
    keys = store.keys(tokens(2))
    data = kv_blocks(2)
    store.put(keys, data)
    with pytest.raises(LayoutMismatchError, match="float16"):
        store.put(keys, data.float())
    with pytest.raises(LayoutMismatchError, match=r"\[n, 2, 2, 16, 2, 32\]"):
        store.put(keys, data.reshape(2, 2, 2, 32, 2, 16))
    with pytest.raises(LayoutMismatchError, match="2 keys but 1 blocks"):
        store.put(keys, data[:1])
    with pytest.raises(LayoutMismatchError, match="contiguous"):
        store.get(keys, torch.empty((*LAYOUT.block_shape, 2), dtype=torch.float16).movedim(-1, 0))
    out = torch.empty_like(data)
    assert store.get(keys, out).all() and torch.equal(out, data)


def test_raw_uint8_rows_are_accepted(store: Store) -> None:
    keys = store.keys(tokens(2))
    raw = np.random.default_rng(0).integers(0, 256, (2, LAYOUT.block_nbytes), dtype=np.uint8)
    assert store.put(keys, raw).all()
    out = np.zeros_like(raw)
    assert store.get(keys, out).all() and np.array_equal(out, raw)


def test_unknown_namespace_is_refused(store: Store) -> None:
    other = Namespace("other-model", LAYOUT)
    keys = other.keys_for_tokens(tokens(1))
    with pytest.raises(ConfigError, match="not known"):
        store.put(keys, kv_blocks(1))
    store.add_namespace(other)
    assert store.put(keys, kv_blocks(1)).all()


def test_tenants_and_salts_never_match_each_other(store: Store, ns: Namespace) -> None:
    t = tokens(3)
    base = store.keys(t)
    store.put(base, kv_blocks(3))
    assert store.match(store.keys(t, cache_salt="tenant-b")).length == 0
    assert store.match(store.keys(t, lora_name="adapter")).length == 0
    other = store.add_namespace(Namespace(ns.model, ns.layout, tenant="b"))
    assert store.match(other.keys_for_tokens(t)).length == 0


def test_namespace_with_another_block_size_is_refused(store: Store) -> None:
    big = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, block_size=16, dtype="float16")
    with pytest.raises(LayoutMismatchError, match="holds 8192-byte blocks"):
        store.add_namespace(Namespace("m", big))


def test_engine_hashes_map_into_the_same_key_type(store: Store, layout: KVLayout) -> None:
    vllm_ns = store.add_namespace(Namespace("test-model", layout, hash_scheme="vllm"))
    hashes = [bytes([i]) * 32 for i in range(3)]
    keys = vllm_ns.keys_from_engine(hashes)
    store.put(keys, kv_blocks(3))
    assert store.match(vllm_ns.keys_from_engine(hashes)).length == 3
    assert store.match(store.keys(tokens(3))).length == 0


def test_closed_store_raises(store: Store) -> None:
    store.close()
    with pytest.raises(TierClosedError):
        store.match(store.keys(tokens(1)))


def test_stats_count_what_happened(store: Store) -> None:
    keys = store.keys(tokens(4))
    store.put(keys, kv_blocks(4))
    store.get(keys, torch.empty((4, *LAYOUT.block_shape), dtype=torch.float16))
    s = store.stats()
    assert s["put_blocks"] == 4 and s["get_blocks"] == 4 and s["get_misses"] == 0
    assert [t["name"] for t in s["tiers"]] == ["gpu", "host"]
    assert s["tiers"][0]["blocks"] == 4


def test_concurrent_engines_share_one_store(store: Store) -> None:
    errors: list[BaseException] = []
    shared = tokens(3, seed=99)

    def engine(seed: int) -> None:
        try:
            for r in range(5):
                t = np.concatenate([shared, tokens(2, seed=seed * 100 + r)])
                keys = store.keys(t)
                data = kv_blocks(len(keys), seed=0)
                m = store.match(keys)
                out = torch.zeros_like(data)
                got = store.get(keys[: m.length], out[: m.length], m)
                store.put(keys[int(got.sum()) :], data[int(got.sum()) :])
                store.copy(keys, "gpu", "host")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=engine, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for tier in store.tiers:
        assert tier.used_bytes <= tier.capacity_bytes


def test_a_block_lost_between_match_and_get_is_a_miss_with_load_failed(store: Store) -> None:
    seen: list[BlockEvent] = []
    store.events.subscribe(seen.append)
    keys = store.keys(tokens(3))
    data = kv_blocks(3)
    store.put(keys, data, tier="host")
    m = store.match(keys)
    store.tier("host").delete(keys[1:2])  # another thread evicts it in between
    out = torch.zeros_like(data)
    got = store.get(keys, out, m)
    assert got.tolist() == [True, False, True]
    assert (out[1] == 0).all()
    failed = [e for e in seen if e.kind is EventKind.LOAD_FAILED]
    assert len(failed) == 1 and failed[0].tier == "host" and list(failed[0].keys) == [keys[1]]
    assert store.stats()["get_misses"] == 1


def test_a_batch_larger_than_a_tier_keeps_its_prefix_there_and_spills_the_rest(store: Store) -> None:
    gpu = store.tier("gpu")
    cap = gpu.capacity_bytes // gpu.block_nbytes
    keys = store.keys(tokens(cap + 3))
    data = kv_blocks(cap + 3)
    assert store.put(keys, data).all()
    m = store.match(keys)
    assert m.length == cap + 3 and m.runs == (("gpu", 0, cap), ("host", cap, cap + 3))
    out = torch.empty_like(data)
    assert store.get(keys, out, m).all() and torch.equal(out, data)


def test_close_persists_volatile_blocks_to_the_disk_tier(tmp_path: Path) -> None:
    urls = ["gpu://cpu?capacity=64KiB", "host://?capacity=64KiB", f"file://{tmp_path}/d?capacity=1MiB"]
    with mount(*urls, layout=LAYOUT, model="m", env={}) as s:
        keys = s.keys(tokens(6))
        s.put(keys, kv_blocks(6))
        s.copy(keys[:2], "gpu", "host")
        assert len(s.tier("disk")) == 0
    with mount(*urls, layout=LAYOUT, model="m", env={}) as s:
        assert s.match(keys).runs == (("disk", 0, 6),)
        out = torch.empty((6, *LAYOUT.block_shape), dtype=torch.float16)
        assert s.get(keys, out).all() and torch.equal(out, kv_blocks(6))
    s2 = mount(*urls, layout=LAYOUT, model="m", env={})
    s2.put(s2.keys(tokens(2, seed=7)), kv_blocks(2, seed=7))
    s2.close(persist=False)
    with mount(*urls, layout=LAYOUT, model="m", env={}) as s:
        assert s.match(s.keys(tokens(2, seed=7))).length == 0


def test_a_failing_close_hook_still_closes_every_tier(tmp_path: Path) -> None:
    from kvbm_fs import mount
    from kvbm_fs.testing import LAYOUT

    store = mount("host://?capacity=64KiB", f"file://{tmp_path}/d?capacity=1MiB", layout=LAYOUT, model="m", env={})
    calls: list[str] = []

    def bad() -> None:
        calls.append("bad")
        raise RuntimeError("observer broke")

    store.on_close += [bad, lambda: calls.append("next")]
    store.close()
    assert calls == ["bad", "next"]
    assert all(t._closed for t in store.tiers)  # type: ignore[attr-defined]
