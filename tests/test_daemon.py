"""The placement daemon: watermarks under load, demotion without loss, promotion, prefetch, stop/restart."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import LAYOUT, tokens

from kvbm_fs import BlockEvent, ConfigError, EventKind, KVLayout, Store, mount
from kvbm_fs.cost import CostModel
from kvbm_fs.daemon import DaemonConfig, Watermarks
from kvbm_fs.testing import blocks_for

NB = LAYOUT.block_nbytes
SLOT = 4096 + NB  # disk slot for 8 KiB blocks


def four_tiers(tmp: Path, **kw: object) -> Store:
    urls = [f"gpu://cpu?capacity={8 * NB}", f"host://?capacity={16 * NB}", f"file://{tmp}/disk?capacity={24 * SLOT}",
            f"remote+file://{tmp}/remote"]  # fmt: skip
    return mount(*urls, layout=LAYOUT, model="daemon-test", env={}, **kw)  # type: ignore[arg-type]


def put_chain(store: Store, n: int, seed: int) -> tuple[object, np.ndarray]:
    keys = store.keys(tokens(n, seed=seed))
    data = blocks_for(keys, NB)
    assert store.put(keys, data, tier="gpu").all()
    return keys, data


def assert_all_loadable(store: Store, batches: list[tuple[object, np.ndarray]]) -> None:
    for keys, data in batches:
        m = store.match(keys)  # type: ignore[arg-type]
        assert m.length == len(keys), "a block was lost"  # type: ignore[arg-type]
        out = np.zeros_like(data)
        assert store.get(keys, out, m).all() and np.array_equal(out, data)  # type: ignore[arg-type]


def test_watermarks_hold_under_sustained_puts_and_nothing_is_lost(tmp_path: Path) -> None:
    store = four_tiers(tmp_path, daemon={"high": 0.8, "low": 0.5, "batch": 4})
    written = []
    for r in range(30):  # far more than G1+G2+G3 hold: the rest must reach the unbounded remote tier
        written.append(put_chain(store, 3, seed=r))
    assert store.daemon is not None
    store.stop_daemon()
    store.daemon.run_once()  # settle what the thread had not reached yet
    for t in store.tiers[:3]:
        assert t.used_bytes <= 0.8 * t.capacity_bytes, t.stats()
    assert_all_loadable(store, written)
    s = store.daemon.stats()
    assert s["demoted_blocks"] > 0 and s["rounds"] > 0
    store.close(persist=False)


def test_demotion_drops_blocks_the_next_tier_already_holds(tmp_path: Path) -> None:
    store = four_tiers(tmp_path)
    keys, data = put_chain(store, 8, seed=1)
    store.copy(keys, "gpu", "host")  # type: ignore[arg-type]
    d = store.start_daemon({"high": 0.5, "low": 0.25})
    d.stop()
    d.run_once()
    assert d.stats()["dropped_blocks"] >= 6 and d.stats()["demoted_blocks"] == 0
    assert_all_loadable(store, [(keys, data)])
    store.close(persist=False)


def test_a_full_lower_tier_keeps_blocks_where_they_are(tmp_path: Path) -> None:
    urls = [f"gpu://cpu?capacity={4 * NB}", f"host://?capacity={4 * NB}"]
    store = mount(*urls, layout=LAYOUT, model="m", env={})
    keys = store.keys(tokens(8, seed=2))
    data = blocks_for(keys, NB)
    store.put(keys[:4], data[:4], tier="gpu")
    store.put(keys[4:], data[4:], tier="host")
    with store.pin(keys[4:]):  # the host tier cannot make room
        d = store.start_daemon({"high": 0.5, "low": 0.25})
        d.stop()
        d.run_once()
        assert d.stats()["demoted_blocks"] == 0
        assert store.match(keys).length == 8, "a block that had nowhere to go was lost"
    store.close()


def test_promotion_on_hit_and_prefetch_of_the_matched_chain(tmp_path: Path) -> None:
    store = four_tiers(tmp_path)
    seen: list[BlockEvent] = []
    store.events.subscribe(seen.append)
    keys = store.keys(tokens(6, seed=3))
    data = blocks_for(keys, NB)
    store.put(keys, data, tier="disk")
    d = store.start_daemon()
    d.stop()  # drive it by hand: no timing in tests
    m = store.match(keys)
    assert m.runs == (("disk", 0, 6),)
    d.run_once()  # prefetch pulled the chain up to G1 ahead of the load
    assert store.match(keys).runs == (("gpu", 0, 6),)
    assert d.stats()["prefetched_blocks"] == 6
    store.tier("gpu").delete(keys)
    d2 = store.daemon
    assert d2 is not None
    d2.config.prefetch = False
    out = np.zeros_like(data)
    assert store.get(keys, out).all() and np.array_equal(out, data)  # served from disk ...
    d2.run_once()  # ... then promoted for the next use
    assert store.match(keys).runs == (("gpu", 0, 6),)
    assert d2.stats()["promoted_blocks"] == 6
    assert any(e.kind is EventKind.PROMOTED and e.tier == "gpu" for e in seen)
    store.close(persist=False)


def test_stop_in_the_middle_leaves_every_block_whole_and_restart_continues(tmp_path: Path) -> None:
    store = four_tiers(tmp_path)
    written = [put_chain(store, 2, seed=100 + r) for r in range(4)]  # fills G1 exactly
    d = store.start_daemon({"high": 0.1, "low": 0.05, "batch": 1})
    stopper = threading.Timer(0.01, d.stop)
    stopper.start()
    stopper.join()
    d.stop()
    assert not d.running
    assert_all_loadable(store, written)
    d.start()
    assert d.running
    d.stop()
    d.run_once()
    assert store.tier("gpu").used_bytes <= 0.1 * store.tier("gpu").capacity_bytes
    assert_all_loadable(store, written)
    store.close(persist=False)


def test_daemon_config_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="low <= high"):
        DaemonConfig.from_dict({"high": 0.5, "low": 0.9})
    with pytest.raises(ConfigError, match="unknown daemon option"):
        DaemonConfig.from_dict({"hgih": 0.5})
    with pytest.raises(ConfigError, match="batch must be >= 1"):
        DaemonConfig.from_dict({"batch": 0})
    with pytest.raises(ConfigError, match="unknown tier"):
        four_tiers(tmp_path, daemon={"watermarks": {"nvme": {"high": 0.9, "low": 0.5}}})
    with pytest.raises(ConfigError, match="config daemon must be"):
        four_tiers(tmp_path, daemon="yes")
    assert DaemonConfig.from_dict({"watermarks": {"gpu": {"high": 0.7, "low": 0.6}}}).marks("gpu") == Watermarks(
        0.7, 0.6
    )


def test_cost_model_loads_only_what_beats_recompute(tmp_path: Path) -> None:
    lay = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")  # 2 MiB blocks
    urls = ["host://?capacity=64MiB", f"remote+file://{tmp_path}/r"]
    keys_tokens = tokens(8, seed=5)
    with mount(*urls, layout=lay, model="m", env={}) as s:
        keys = s.keys(keys_tokens)
        s.put(keys[:4], np.zeros((4, lay.block_nbytes), np.uint8), tier="host")
        s.put(keys[4:], np.zeros((4, lay.block_nbytes), np.uint8), tier="remote")
        assert s.match(keys).worth == 8  # no prefill rate known: loading always wins
        # a fast engine: 16 tokens recompute in 16 us, a 2 MiB host load takes ~175 us: not worth it
        s.cost = CostModel(prefill_tokens_per_s=1e6)
        assert s.match(keys).worth == 0
        # a slow engine (1k tokens/s): host blocks are worth it, and so are remote ones at 0.3 GB/s
        s.cost = CostModel(prefill_tokens_per_s=1e3)
        m = s.match(keys)
        assert m.worth == 8 and m.tokens_worth_loading == 128
        # medium engine: host blocks pay off, the remote ones do not
        s.cost = CostModel(prefill_tokens_per_s=2e4)
        assert s.match(keys).worth == 4
    with pytest.raises(ConfigError, match="prefill_tokens_per_s"):
        CostModel(prefill_tokens_per_s=0)
    with pytest.raises(ConfigError, match="bad \\[cost\\] option"):
        mount(*urls, layout=lay, model="m", env={}, cost={"prefil": 1})


def test_measured_bandwidth_moves_the_cost_model() -> None:
    store = mount("host://?capacity=64MiB", layout=LAYOUT, env={})
    host = store.tier("host")
    before = store.cost.tier_cost(host)[1]
    store.cost.observe(host, 64 << 20, 1.0)  # a slow measured read: 64 MiB/s
    assert store.cost.tier_cost(host)[1] < before
    store.close()


def test_standalone_daemon_command_demotes_a_shared_disk_tier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from kvbm_fs.cli import main

    disk = f"file://{tmp_path}/disk?capacity={8 * SLOT}"
    remote = f"remote+file://{tmp_path}/remote"
    layout = "\n".join(f"{k} = {json.dumps(v)}" for k, v in LAYOUT.to_dict().items())
    cfg = tmp_path / "kvbm.toml"
    cfg.write_text(
        f'model = "m"\ntiers = ["{disk}", "{remote}"]\n[daemon]\nhigh = 0.5\nlow = 0.25\n[layout]\n{layout}\n'
    )
    with mount(disk, remote, layout=LAYOUT, model="m", env={}) as engine:  # an engine filled the disk tier
        keys = engine.keys(tokens(8, seed=9))
        engine.put(keys, blocks_for(keys, NB), tier="disk")
    assert main(["daemon", "--config", str(cfg), "--once"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["daemon"]["demoted_blocks"] >= 6
    with mount(disk, remote, layout=LAYOUT, model="m", env={}) as engine:
        assert engine.tier("disk").used_bytes <= 0.5 * engine.tier("disk").capacity_bytes
        assert engine.match(keys).length == 8


def test_demotion_and_promotion_ask_the_other_tier_once_per_block(tmp_path: Path) -> None:
    """A batch asks the tier it moves blocks into what it holds once (transfer asked again: a HEAD per
    block on a remote tier); blocks that tier already holds are dropped, not written again."""
    from test_transfer import _asking

    from kvbm_fs.daemon import PlacementDaemon
    from kvbm_fs.testing import NS_A, chain
    from kvbm_fs.tiers.disk import DiskTier
    from kvbm_fs.tiers.host import HostTier
    from kvbm_fs.tiers.remote import RemoteTier

    nb = NS_A.block_nbytes
    host, remote = HostTier(8 * nb, nb, name="host"), RemoteTier(f"file://{tmp_path}/r", nb, name="remote")
    remote.bind_namespace(NS_A)
    store = Store([host, remote], NS_A)
    keys = chain(NS_A, 8)
    data = blocks_for(keys, nb)
    assert host.put(keys, data).all() and remote.put(keys[::2], data[::2]).all()
    asked, written = _asking(remote)
    d = PlacementDaemon(store, DaemonConfig.from_dict({"high": 0.5, "low": 0.25, "promote": False}))
    d.run_once()
    s = d.stats()
    assert s["demoted_blocks"] + s["dropped_blocks"] == 6 and s["dropped_blocks"] > 0 and len(host) == 2
    assert sorted(asked) == sorted(set(asked)) and len(asked) == 6  # once per block
    assert written and not set(written) & set(keys.hashes[::2].tolist())  # held ones not written again
    # promotion into a tier that is not a slot buffer (disk, promote_to): once per block too
    disk = DiskTier(tmp_path / "disk", nb, "4MiB", name="disk")
    store2 = Store([disk, remote], NS_A)
    d2 = PlacementDaemon(store2, DaemonConfig.from_dict({"promote": True, "prefetch": False}))
    asked2, _ = _asking(disk)
    held = keys[::2]
    d2.on_get(held, np.ones(len(held), np.int64), np.ones(len(held), bool))  # served by tier 1 (remote)
    d2.run_once()
    assert d2.stats()["promoted_blocks"] == len(held) and sorted(asked2) == sorted(held.hashes.tolist())
    store2.close(persist=False)
    store.close(persist=False)
