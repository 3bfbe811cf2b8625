"""Raising the share of hits served from host memory: first-sight placement and make-room promotion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import LAYOUT, tokens

from kvbm_fs import ConfigError, Store, mount
from kvbm_fs.cli import main
from kvbm_fs.keys import BlockKeys
from kvbm_fs.replay import ReplayConfig, TierSpec, replay_one
from kvbm_fs.testing import blocks_for
from kvbm_fs.testing.traces import multi_turn

NB = LAYOUT.block_nbytes
SLOT = 4096 + NB  # disk slot for 8 KiB blocks


def host_disk(tmp: Path, daemon: dict[str, object], host_blocks: int = 8) -> Store:
    urls = [f"host://?capacity={host_blocks * NB}", f"file://{tmp}/disk?capacity={64 * SLOT}"]
    store = mount(*urls, layout=LAYOUT, model="host-share", env={})
    d = store.start_daemon(daemon)
    d.stop()  # driven by hand: no timing in tests
    return store


def chain(store: Store, n: int, seed: int) -> tuple[BlockKeys, np.ndarray]:
    keys = store.keys(tokens(n, seed=seed))
    return keys, blocks_for(keys, NB)


def test_a_block_seen_once_lands_on_disk_and_its_second_reference_promotes_it(tmp_path: Path) -> None:
    store = host_disk(tmp_path, {"first_sight": "auto"})
    keys, data = chain(store, 4, seed=1)
    assert store.put(keys, data).all()
    assert len(store.tier("host")) == 0 and store.tier("disk").contains(keys).all()
    m = store.match(keys)
    assert m.runs == (("disk", 0, 4),)
    out = np.zeros_like(data)
    assert store.get(keys, out, m).all() and np.array_equal(out, data)
    assert store.daemon is not None
    store.daemon.run_once()
    assert store.match(keys).runs == (("host", 0, 4),)
    other, odata = chain(store, 2, seed=2)
    assert store.put(other, odata, tier="host").all()
    assert store.tier("host").contains(other).all()  # an explicit tier is obeyed
    store.daemon.detach()  # nothing would promote them any more: puts land in host again
    last, ldata = chain(store, 2, seed=8)
    assert store.put(last, ldata).all() and store.tier("host").contains(last).all()
    store.close(persist=False)


def test_promotion_makes_room_by_policy_and_the_host_tier_runs_full(tmp_path: Path) -> None:
    store = host_disk(tmp_path, {"make_room": True, "first_sight": "auto"}, host_blocks=4)
    d = store.daemon
    assert d is not None
    old, odata = chain(store, 4, seed=3)
    new, ndata = chain(store, 2, seed=4)
    store.put(old, odata)
    store.put(new, ndata)
    store.match(old)
    d.run_once()  # fills host exactly: no watermark drains it to 75%
    host = store.tier("host")
    assert host.contains(old).all() and host.used_bytes == host.capacity_bytes
    store.match(new)
    d.run_once()
    assert host.contains(new).all()
    # the two coldest of the old chain went down, leaf first, so what stays is still a prefix
    assert host.contains(old).tolist() == [True, True, False, False]
    s = d.stats()  # the disk kept its copy when they were promoted: demoting them is a drop
    assert s["dropped_blocks"] == 2 and s["demoted_blocks"] == 0 and host.used_bytes == host.capacity_bytes
    for keys, data in ((old, odata), (new, ndata)):  # nothing lost, every byte intact
        out = np.zeros_like(data)
        assert store.get(keys, out).all() and np.array_equal(out, data)
    store.close(persist=False)


def test_first_sight_needs_a_tier_below_the_first(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a tier below the first"):
        host_disk(tmp_path / "a", {"first_sight": "host"})
    with pytest.raises(ConfigError, match="not a tier below the first"):
        host_disk(tmp_path / "b", {"first_sight": "nvme"})
    store = mount(f"host://?capacity={8 * NB}", layout=LAYOUT, model="m", env={}, daemon={"first_sight": "auto"})
    assert store.placement is not None and store.placement.index == 0  # no disk tier: puts stay on top
    store.close(persist=False)


def test_replay_with_make_room_fills_host_and_keeps_the_hit_ratio() -> None:
    trace = multi_turn(scale=0.05)
    tiers = [TierSpec("host", 0.05), TierSpec("host", 0.2), TierSpec("host", 1.5)]  # fast, in memory
    base = replay_one(trace, ReplayConfig(tiers=tiers))
    full = replay_one(trace, ReplayConfig(tiers=tiers, daemon={"make_room": True}))
    cap = full["capacity_blocks"][0]
    assert full["hit_ratio"] == base["hit_ratio"]  # no block is lost either way
    assert full["tier_blocks"]["host0"] == cap > base["tier_blocks"]["host0"]
    assert full["first_tier_share_of_hits"] > base["first_tier_share_of_hits"]


def test_exclusive_promotion_leaves_the_disk_but_the_bottom_tier_keeps_its_copy(tmp_path: Path) -> None:
    urls = [f"host://?capacity={8 * NB}", f"file://{tmp_path}/disk?capacity={16 * SLOT}", f"remote+file://{tmp_path}/r"]
    store = mount(*urls, layout=LAYOUT, model="host-share", env={})
    d = store.start_daemon({"exclusive": True, "make_room": True})
    d.stop()
    on_disk, ddata = chain(store, 3, seed=5)
    remote, rdata = chain(store, 3, seed=6)
    store.put(on_disk, ddata, tier="disk")
    store.put(remote, rdata, tier=store.tiers[2].name)
    store.match(on_disk)
    store.match(remote)
    d.run_once()
    assert store.tier("host").contains(on_disk).all() and not store.tier("disk").contains(on_disk).any()
    assert store.tier("host").contains(remote).all() and store.tiers[2].contains(remote).all()
    for keys, data in ((on_disk, ddata), (remote, rdata)):
        out = np.zeros_like(data)
        assert store.get(keys, out).all() and np.array_equal(out, data)
    store.close(persist=False)


def test_cli_replay_daemon_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "trace.jsonl"
    p.write_text("".join(json.dumps({"hash_ids": r.tolist()}) + "\n" for r in multi_turn(scale=0.05).requests))
    args = ["replay", str(p), "--capacities", "0.05", "--policies", "parc", "--json",
            "--tiers", "host:0.05", "host:0.2", "host:1.5"]  # fmt: skip
    assert main([*args, "--daemon", "make_room=true"]) == 0
    r = json.loads(capsys.readouterr().out)["multi_tier"]["policies"]["parc"]
    assert r["tier_blocks"]["host0"] == r["capacity_blocks"][0]  # the fast tier ran full
    assert main([*args, "--daemon", "make_rooom=true"]) == 2
    assert "unknown daemon option" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("opts", "left"), [({"make_room": True}, 8), ({"make_room": True, "high": 0.5, "low": 0.25}, 2)]
)
def test_make_room_drops_the_targets_watermark_only_when_none_is_set(
    tmp_path: Path, opts: dict[str, object], left: int
) -> None:
    store = host_disk(tmp_path, opts)
    keys, data = chain(store, 8, seed=7)
    assert store.put(keys, data, tier="host").all()
    assert store.daemon is not None
    store.daemon.run_once()
    assert len(store.tier("host")) == left
    store.close(persist=False)
