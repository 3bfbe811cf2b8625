"""Cluster replay (``kvbm-fs replay --instances N --router ...``): routers, the event-fed kv-aware view, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvbm_fs.cli import main
from kvbm_fs.cluster import ClusterConfig, EventFeed, KvIndexer, Router, check_tiers, replay_cluster
from kvbm_fs.cost import CostModel
from kvbm_fs.errors import ConfigError
from kvbm_fs.keys import BlockKeys
from kvbm_fs.kv_events import BlockRemoved, BlockStored, decoder
from kvbm_fs.mount import mount
from kvbm_fs.replay import ReplayConfig, TierSpec, _layout, replay_one, trace_from_lists
from kvbm_fs.testing import traces

HOST_ONLY = ReplayConfig(tiers=[TierSpec("host", 0.05)], placement="spill")
BLOCK = 64 << 20


def test_one_instance_equals_plain_replay_for_every_router() -> None:
    tr = traces.system_prompts(0.05)
    plain = replay_one(tr, HOST_ONLY)
    assert plain["hit_ratio"] > 0
    for rt in ("round-robin", "prefix-hash", "kv-aware"):
        r = replay_cluster(tr, HOST_ONLY, ClusterConfig(1, rt))
        assert r["hit_ratio"] == plain["hit_ratio"], rt
        assert r["prefill_s_saved"] == plain["prefill_s_saved"], rt
        assert r["own_host_share_of_hits"] == 1.0
        assert r["imbalance"] == {"requests": 1.0, "tokens": 1.0, "busy_s": 1.0}


def test_kv_aware_beats_round_robin_on_shared_prefixes() -> None:
    tr = traces.system_prompts(0.1)
    cfg = ReplayConfig(tiers=[TierSpec("host", 0.05), TierSpec("disk", 0.05)])
    rr = replay_cluster(tr, cfg, ClusterConfig(4, "round-robin"))
    kv = replay_cluster(tr, cfg, ClusterConfig(4, "kv-aware"))
    assert kv["hit_ratio"] >= rr["hit_ratio"]
    assert kv["own_host_share_of_hits"] > rr["own_host_share_of_hits"]
    assert kv["prefill_s_saved"] > rr["prefill_s_saved"]
    assert kv["router_events"] > 0 and rr["router_events"] is None
    assert sum(kv["per_instance"]["requests"]) == len(tr.requests)


def test_kv_aware_sends_each_request_to_the_instance_holding_its_prefix() -> None:
    # A, B, B+y, A+x on two instances: round-robin sends B+y to A's instance and A+x to B's, so nothing
    # hits; kv-aware sends each to the holder of its prefix, so exactly A's and B's blocks hit.
    a, b = list(range(1, 9)), list(range(100, 106))
    tr = trace_from_lists([a, b, [*b, 200], [*a, 300]], "tiny")
    cfg = ReplayConfig(tiers=[TierSpec("host", 1.0)], placement="spill")
    idle = np.arange(4) * 1e4  # far apart: no queue, so the load term is zero
    kv = replay_cluster(tr, cfg, ClusterConfig(2, "kv-aware", tie_break="fewest"), idle)
    rr = replay_cluster(tr, cfg, ClusterConfig(2, "round-robin"), idle)
    refs = tr.references
    assert kv["hit_ratio"] == (len(a) + len(b)) / refs
    assert rr["hit_ratio"] == 0.0
    assert kv["per_instance"]["requests"] == [2, 2]  # A and B, unknown anywhere, went to the emptier instance
    assert kv["own_host_share_of_hits"] == 1.0
    by_hash = replay_cluster(tr, cfg, ClusterConfig(2, "kv-aware", tie_break="hash"), idle)
    assert by_hash["hit_ratio"] == kv["hit_ratio"]


def test_load_term_spreads_requests_when_one_instance_is_queued() -> None:
    a = list(range(1, 9))
    tr = trace_from_lists([a] * 6, "same")
    cfg = ReplayConfig(tiers=[TierSpec("host", 1.0)], placement="spill")
    at_once = np.zeros(6)  # all arrive together: the holder's queue outweighs its prefix
    spread = replay_cluster(tr, cfg, ClusterConfig(2, "kv-aware"), at_once)
    assert min(spread["per_instance"]["requests"]) >= 2
    greedy = replay_cluster(tr, cfg, ClusterConfig(2, "kv-aware", load_weight=0.0), at_once)
    assert sorted(greedy["per_instance"]["requests"]) == [0, 6]  # without it, all go to the first holder


def test_router_view_comes_only_from_kv_events() -> None:
    store = mount("host://?capacity=16KiB&name=host", layout=_layout(1024), model="events", env={})
    try:
        feed = EventFeed(store)
        router = Router(ClusterConfig(1, "kv-aware"), CostModel(10_000.0), BLOCK)
        assert router.index is not None
        ns = store.default_namespace
        assert ns is not None
        first = BlockKeys.chain(ns.id, np.arange(1, 5, dtype=np.uint64))
        store.put(first, np.ones((4, ns.block_nbytes), np.uint8))
        frames = feed.drain()
        stored = [e for _, _, p in frames for e in decoder().decode(p).events]
        assert stored and all(isinstance(e, BlockStored) and e.medium == "CPU" for e in stored)
        assert router.scores(first)[0] == 0.0  # nothing applied yet: the router does not look at the store
        router.index.apply(0, frames)
        assert router.scores(first)[0] > 0
        # four more blocks evict the first four (capacity 4): BlockRemoved reaches the router
        store.put(BlockKeys.chain(ns.id, np.arange(50, 54, dtype=np.uint64)), np.ones((4, ns.block_nbytes), np.uint8))
        frames = feed.drain()
        removed = [e for _, _, p in frames for e in decoder().decode(p).events if isinstance(e, BlockRemoved)]
        assert {h for e in removed for h in e.block_hashes} == set(first.hashes.tolist())
        router.index.apply(0, frames)
        assert router.scores(first)[0] == 0.0
        assert not router.index.instances[0].contains(first).any()
        feed.close()
    finally:
        store.close(persist=False)


def test_indexer_keeps_the_pool_apart_from_instances() -> None:
    tr = traces.multi_turn(0.05)
    cfg = ReplayConfig(tiers=[TierSpec("host", 0.02), TierSpec("disk", 0.05), TierSpec("remote", None)])
    r = replay_cluster(tr, cfg, ClusterConfig(4, "kv-aware"))
    assert set(r["tier_hit_ratio"]) == {"host", "disk", "remote"}
    assert r["hit_ratio"] == pytest.approx(sum(r["tier_hit_ratio"].values()))
    assert 0 < r["own_host_share_of_hits"] < 1
    ix = KvIndexer(2)
    assert ix.instances[0].tiers == () and ix.pool.tiers == ()


def test_prefix_hash_is_deterministic_and_keeps_a_prefix_on_one_instance() -> None:
    tr = traces.system_prompts(0.05)
    one = replay_cluster(tr, HOST_ONLY, ClusterConfig(4, "prefix-hash"))
    two = replay_cluster(tr, HOST_ONLY, ClusterConfig(4, "prefix-hash"))
    assert one["per_instance"] == two["per_instance"]
    assert one["hit_ratio"] == two["hit_ratio"]
    r1, r2 = (Router(ClusterConfig(16, "prefix-hash"), CostModel(10_000.0), BLOCK) for _ in range(2))
    picks = set()
    for tail in range(20):
        keys = BlockKeys.chain(7, np.array([5, 6, 1000 + tail], np.uint64))
        i = r1.pick(keys, 0.0)
        assert r2.pick(keys, 0.0) == i
        picks.add(i)
    assert len(picks) == 1
    spread = {r1.pick(BlockKeys.chain(7, np.array([h], np.uint64)), 0.0) for h in range(1, 200)}
    assert len(spread) == 16


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="instances"):
        ClusterConfig(0).check()
    with pytest.raises(ConfigError, match="router"):
        ClusterConfig(2, "random").check()
    with pytest.raises(ConfigError, match="tie_break"):
        ClusterConfig(2, tie_break="random").check()
    with pytest.raises(ConfigError, match="load-weight"):
        ClusterConfig(2, load_weight=-1).check()
    with pytest.raises(ConfigError, match="first tier must be host"):
        check_tiers([TierSpec("disk", 0.1)])
    with pytest.raises(ConfigError, match="distinct kinds"):
        check_tiers([TierSpec("host", 0.1), TierSpec("disk", 0.1), TierSpec("disk", 0.2)])
    with pytest.raises(ConfigError, match="distinct kinds"):
        check_tiers([TierSpec("host", 0.1), TierSpec("gpu", 0.1)])


def _trace_file(tmp_path: Path) -> Path:
    p = tmp_path / "t.jsonl"
    tr = traces.system_prompts(0.03)
    p.write_text(
        "".join(json.dumps({"timestamp": 10 * i, "hash_ids": r.tolist()}) + "\n" for i, r in enumerate(tr.requests))
    )
    return p


def test_cli_prints_the_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _trace_file(tmp_path)
    args = [
        "replay",
        str(p),
        "--instances",
        "1",
        "2",
        "--router",
        "round-robin",
        "kv-aware",
        "--tiers",
        "host:0.05",
        "disk:0.1",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "own host" in out and "kv-aware" in out and "arrivals: trace timestamps" in out
    assert main([*args, "--json", "--out", str(tmp_path / "o"), "--daemon", "first_sight=auto"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["daemon"] == {"first_sight": "auto"}
    assert [(r["instances"], r["router"]) for r in res["results"]] == [
        (1, "round-robin"), (1, "kv-aware"), (2, "round-robin"), (2, "kv-aware"),
    ]  # fmt: skip
    assert res["results"][0]["hit_ratio"] == res["results"][1]["hit_ratio"]
    assert json.loads((tmp_path / "o" / "cluster.json").read_text())["tiers"] == ["host:0.05", "disk:0.1"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--instances", "0"], "--instances must be"),
        (["--instances", "2", "--capacities", "0.1"], "--capacities does not apply"),
        (["--instances", "2", "--tiers", "disk:0.1"], "first tier must be host"),
        (["--instances", "2", "--policies", "lru", "parc"], "one policy"),
        (["--instances", "2", "--daemon", "bogus=1"], "unknown daemon option"),
    ],
)
def test_cli_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    p = _trace_file(tmp_path)
    assert main(["replay", str(p), *extra]) != 0
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["replay", str(p), "--instances", "2", "--router", "random"])
