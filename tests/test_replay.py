"""Trace replay: Belady on hand-made traces, replay through the real store, multi-tier, the CLI."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from kvbm_fs import ConfigError
from kvbm_fs.cli import main
from kvbm_fs.replay import (
    ReplayConfig,
    TierSpec,
    Trace,
    belady,
    compare,
    infinite_hit_ratio,
    load_trace,
    replay_one,
    saved_seconds,
    trace_from_lists,
)
from kvbm_fs.testing.traces import SYNTHETIC


def synthetic(n_req: int = 150, seed: int = 0) -> Trace:
    """Documents with Zipf popularity, each request a document plus a short unique suffix."""
    rng = np.random.default_rng(seed)
    nxt = 0
    docs = []
    for _ in range(40):
        k = int(rng.integers(2, 9))
        docs.append(list(range(nxt, nxt + k)))
        nxt += k
    w = 1 / np.arange(1, 41) ** 1.0
    w /= w.sum()
    reqs = []
    for _ in range(n_req):
        tail = list(range(nxt, nxt + int(rng.integers(0, 3))))
        nxt += len(tail)
        reqs.append(docs[int(rng.choice(40, p=w))] + tail)
    return trace_from_lists(reqs, "synthetic")


def write_jsonl(path: Path, reqs: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"timestamp": i, "input_length": 512 * len(r), "hash_ids": r}) + "\n"
                            for i, r in enumerate(reqs)))  # fmt: skip
    return path


# ---- Belady -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reqs", "cap", "hits", "refs"),
    [
        ([[1], [2], [1], [2]], 1, 1, 4),  # keeps 1 (needed sooner), bypasses 2: one hit (LRU: none)
        ([[1, 2], [1, 2], [3], [1, 2]], 2, 4, 7),  # block 3 is never used again: bypassed
        ([[1, 2, 3], [1, 2, 3]], 2, 2, 6),  # keeps the prefix 1, 2; 3 would be used last
        ([[1, 2], [1, 2]], 1, 1, 4),  # a parent is never needed later than its child
        ([[1, 2], [1, 3], [1, 2], [1, 3]], 2, 4, 8),  # 1 stays; 2 (needed sooner) stays, 3 is bypassed
        ([[5, 6], [7], [5, 6], [7], [5, 6]], 2, 4, 8),  # 5, 6 reused more often than 7 fits beside them
        ([[1]], 0, 0, 1),
    ],
)
def test_belady_on_hand_made_traces(reqs: list[list[int]], cap: int, hits: int, refs: int) -> None:
    assert belady(trace_from_lists(reqs), cap) == pytest.approx(hits / refs)


def test_belady_counts_only_the_matched_prefix() -> None:
    # block 2 is evicted for 4 (used sooner), so the third request misses at 2: block 3, though
    # resident, is after the miss and does not count
    t = trace_from_lists([[1, 2, 3], [4], [4], [1, 2, 3]])
    assert belady(t, 3) == pytest.approx(3 / 8)  # hits: 4, then 1, 2, 3 (all resident again)
    assert belady(t, 2) == pytest.approx(2 / 8)  # keeps 1, 2; 3 and 4 bypassed: 4's hit lost


def test_belady_with_room_for_everything_is_the_infinite_cache() -> None:
    t = synthetic()
    assert belady(t, t.distinct) == pytest.approx(infinite_hit_ratio(t))
    assert belady(t, 10**9) == pytest.approx(infinite_hit_ratio(t))


def test_belady_bounds_every_policy_on_the_same_stream() -> None:
    t = synthetic(200, seed=3)
    res = compare(t, capacities=[0.1, 0.3], policies=["lru", "prefix-lru", "lru+count2", "parc"])
    for row in res["single_tier"]:
        assert row["belady"] >= max(r["hit_ratio"] for r in row["policies"].values()) - 1e-12
        assert 0 < row["belady"] <= res["infinite_cache_hit_ratio"] + 1e-12


# ---- replay through the store -------------------------------------------------------------------
def reference_lru(t: Trace, cap: int) -> float:
    """What the store's LRU must do on the replay's calls: get(prefix) touches the prefix, then
    put(suffix) touches the suffix blocks already present (pinned meanwhile), evicts the least
    recent for the missing ones and inserts them; within one call, later chain blocks count older."""
    lru: OrderedDict[int, None] = OrderedDict()
    hits = refs = 0
    for r in t.requests:
        ids = r.tolist()
        n = 0
        while n < len(ids) and ids[n] in lru:
            n += 1
        hits += n
        refs += len(ids)
        for h in reversed(ids[:n]):
            lru.move_to_end(h)
        rest = ids[n:]
        held = [h for h in rest if h in lru]
        for h in reversed(held):
            lru.move_to_end(h)
        new = [h for h in rest if h not in lru]
        while new and len(lru) + len(new) > cap:
            victim = next(h for h in lru if h not in held)
            del lru[victim]
        for h in reversed(new):
            lru[h] = None
    return hits / refs


def test_replay_through_the_store_matches_a_reference_lru() -> None:
    t = synthetic(200, seed=1)
    for frac in (0.1, 0.25):
        r = replay_one(t, ReplayConfig(policy="lru", tiers=[TierSpec("host", frac)]))
        cap = max(1, round(frac * t.distinct))
        assert r["capacity_blocks"] == [cap]
        assert r["hit_ratio"] == pytest.approx(reference_lru(t, cap))
        assert r["tier_hit_ratio"]["host"] == pytest.approx(r["hit_ratio"])


def test_replay_reports_costs_and_ratios() -> None:
    t = synthetic(120)
    res = compare(t, capacities=[0.2], policies=["lru", "parc"])
    (row,) = res["single_tier"]
    for p in ("lru", "parc"):
        r = row["policies"][p]
        assert r["ratio_to_belady"] == pytest.approx(r["hit_ratio"] / row["belady"])
        assert r["references"] == t.references and r["requests"] == len(t.requests)
        assert r["est_prefill_s"] <= r["est_prefill_s_no_cache"] and r["est_speedup"] >= 1
        assert r["worth_loading_ratio"] <= r["hit_ratio"] + 1e-12
    assert res["cost_model"]["prefill_tokens_per_s"] == 10_000


def test_replay_reports_prefill_seconds_saved_by_position() -> None:
    """Two identical 10-block requests, room for all: the second loads 10 blocks from host memory
    instead of recomputing them at a + b*i each (saved_seconds, the closed form)."""
    t = trace_from_lists([list(range(10)), list(range(10))])
    r = replay_one(t, ReplayConfig(policy="lru", tiers=[TierSpec("host", 1.0)]))
    assert r["hit_blocks"] == 10
    assert r["prefill_s_saved"] == pytest.approx(saved_seconds(np.array([0, 10])), abs=2e-3)
    assert r["prefill_s_saved"] == pytest.approx(r["est_prefill_s_no_cache"] - r["est_prefill_s"], abs=2e-3)
    flat = replay_one(t, ReplayConfig(policy="lru", tiers=[TierSpec("host", 1.0)], recompute={"recompute_b": 0.0}))
    assert 0 < flat["prefill_s_saved"] < r["prefill_s_saved"]  # deeper blocks are worth more


def test_cli_replay_recompute_flag_and_saved_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_jsonl(tmp_path / "trace.jsonl", [[1, 2, 3], [1, 2, 3]])
    assert main(["replay", str(p), "--capacities", "1", "--policies", "lru", "--recompute", "0.5", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["cost_model"]["recompute_a_b_s"] == [0.5, 0.0]
    r = res["single_tier"][0]["policies"]["lru"]
    assert r["prefill_s_saved"] == pytest.approx(3 * (0.5 - 64 * 2**20 / 12e9) - 10e-6, abs=2e-3)
    assert main(["replay", str(p), "--capacities", "1", "--policies", "lru"]) == 0
    assert "prefill seconds saved" in capsys.readouterr().out
    assert main(["replay", str(p), "--recompute", "-1", "0"]) == 2
    assert "recompute_a" in capsys.readouterr().err


def test_recompute_is_chosen_when_loading_is_slower() -> None:
    t = synthetic(80)
    fast = replay_one(t, ReplayConfig(policy="lru", tiers=[TierSpec("host", 0.5)]))
    slow = replay_one(t, ReplayConfig(policy="lru", tiers=[TierSpec("host", 0.5)], bandwidth={"host": 1e6}))
    assert fast["worth_loading_ratio"] == pytest.approx(fast["hit_ratio"])
    assert slow["worth_loading_ratio"] == 0 and slow["est_speedup"] == pytest.approx(1.0)


def test_real_bytes_replay_gives_the_same_hits() -> None:
    t = synthetic(60)
    cfg = ReplayConfig(policy="parc", tiers=[TierSpec("host", 0.2)])
    tiny = replay_one(t, cfg)
    real = replay_one(t, ReplayConfig(**{**cfg.__dict__, "real_bytes": True, "block_bytes": 16384}))
    assert real["block_nbytes"] == 16384 and tiny["block_nbytes"] == 1024
    assert real["hit_ratio"] == tiny["hit_ratio"]


def test_multi_tier_replay_with_the_daemon(tmp_path: Path) -> None:
    t = synthetic(120, seed=2)
    tiers = [TierSpec.parse("host:0.05"), TierSpec.parse("disk:0.15"), TierSpec.parse("remote")]
    res = compare(t, capacities=[0.05], policies=["lru", "parc"], tiers=tiers)
    mt = res["multi_tier"]
    assert mt["tiers"] == ["host:0.05", "disk:0.15", "remote"]
    assert mt["belady"] == pytest.approx(infinite_hit_ratio(t))  # an unbounded tier: everything fits
    for r in mt["policies"].values():
        assert r["placement"] == "daemon"
        assert sum(r["tier_hit_ratio"].values()) == pytest.approx(r["hit_ratio"])
        assert r["first_tier_share_of_hits"] == pytest.approx(r["tier_hit_ratio"]["host"] / r["hit_ratio"])
        assert r["hit_ratio"] == pytest.approx(infinite_hit_ratio(t))  # nothing is ever lost
        assert r["daemon"]["demoted_blocks"] > 0 and r["demoted_bytes_est"] > 0
        assert r["tier_blocks"]["host"] <= round(0.05 * t.distinct)


def test_multi_tier_replay_with_plain_spill() -> None:
    t = synthetic(80)
    cfg = ReplayConfig(policy="lru+count2", tiers=[TierSpec.parse("host:0.1"), TierSpec.parse("host:0.3")],
                       placement="spill")  # fmt: skip
    r = replay_one(t, cfg)
    assert r["placement"] == "spill" and "daemon" not in r
    assert r["tier_hit_ratio"]["host1"] > 0  # first sightings went below
    assert sum(r["tier_hit_ratio"].values()) == pytest.approx(r["hit_ratio"])


@pytest.mark.parametrize("bad", ["ssd:0.1", "host", "disk:x", "host:-1"])
def test_bad_tier_specs(bad: str) -> None:
    with pytest.raises(ConfigError):
        TierSpec.parse(bad)


# ---- trace files and the CLI --------------------------------------------------------------------
def test_load_trace(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "t.jsonl", [[0, 1, 2], [0, 1, 3], [4]])
    t = load_trace(p)
    assert [r.tolist() for r in t.requests] == [[0, 1, 2], [0, 1, 3], [4]]
    assert t.distinct == 5 and t.references == 7 and t.name == "t"
    assert len(load_trace(p, limit=2).requests) == 2
    (tmp_path / "bad.jsonl").write_text('{"hash_ids": [1]}\n{"hash_ids": "x"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2"):
        load_trace(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="cannot read"):
        load_trace(tmp_path / "missing.jsonl")


def test_cli_replay_writes_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = synthetic(100)
    p = write_jsonl(tmp_path / "trace.jsonl", [r.tolist() for r in t.requests])
    out = tmp_path / "out"
    rc = main(["replay", str(p), "--capacities", "0.1", "0.3", "--policies", "lru", "parc", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "belady" in text and "parc" in text and "ratio to Belady" in text
    res = json.loads((out / "replay.json").read_text())
    assert [r["capacity"] for r in res["single_tier"]] == [0.1, 0.3]
    assert set(res["single_tier"][0]["policies"]) == {"lru", "parc"}
    pytest.importorskip("matplotlib")
    assert (out / "replay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_replay_json_and_multi_tier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_jsonl(tmp_path / "trace.jsonl", [r.tolist() for r in synthetic(60).requests])
    rc = main(["replay", str(p), "--capacities", "0.2", "--policies", "parc", "--tiers", "host:0.05", "disk:0.2",
               "remote", "--json", "--limit", "40"])  # fmt: skip
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["requests"] == 40 and res["multi_tier"]["policies"]["parc"]["placement"] == "daemon"


def test_cli_replay_plain_spill(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_jsonl(tmp_path / "trace.jsonl", [r.tolist() for r in synthetic(40).requests])
    rc = main(["replay", str(p), "--capacities", "0.2", "--policies", "lru+count2", "--tiers", "host:0.05", "host:0.2",
               "--placement", "spill", "--json"])  # fmt: skip
    assert rc == 0
    r = json.loads(capsys.readouterr().out)["multi_tier"]["policies"]["lru+count2"]
    assert r["placement"] == "spill" and r["tier_hit_ratio"]["host1"] > 0


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--policies", "lru", "clairvoyant"], "unknown eviction policy"),
        (["--tiers", "tape:0.1"], "kind must be one of"),
        (["--capacities", "0"], "capacity fractions"),
        (["--prefill-tps", "0"], "--prefill-tps"),
        (["--bandwidth", "host"], "--bandwidth"),
    ],
)
def test_cli_replay_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], msg: str
) -> None:
    p = write_jsonl(tmp_path / "trace.jsonl", [[1, 2], [1, 2]])
    assert main(["replay", str(p), *args]) == 2
    assert msg in capsys.readouterr().err


# ---- synthetic traces: the default policy on workloads of known character ----------------------------
@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic_traces_are_deterministic_prefix_chains(name: str) -> None:
    a, b = SYNTHETIC[name](0.1), SYNTHETIC[name](0.1)
    assert [r.tolist() for r in a.requests] == [r.tolist() for r in b.requests]
    before: dict[int, tuple[int, ...]] = {}  # an id means one content at one place in one chain
    for r in a.requests:
        ids = r.tolist()
        for i, h in enumerate(ids):
            assert before.setdefault(h, tuple(ids[:i])) == tuple(ids[:i]), f"{name}: id {h} under two prefixes"
    assert a.distinct < a.references, "something is reused"


@pytest.mark.parametrize(("name", "factor"), [("scan_mix", 1.3), ("zipf_documents", 1.15), ("system_prompts", 1.1)])
def test_default_policy_keeps_reused_blocks_that_lru_lets_one_offs_flush(name: str, factor: float) -> None:
    """parc's reason to be the default: one-off blocks (scans, unique suffixes, unpopular documents)
    pass through without displacing what is reused.  LRU lets them flush it."""
    res = compare(SYNTHETIC[name](0.5), capacities=(0.05,), policies=("lru", "parc"))
    hits = {p: r["hit_ratio"] for p, r in res["single_tier"][0]["policies"].items()}
    assert hits["parc"] > factor * hits["lru"], hits


def test_a_peer_tier_replays_like_the_host_tier_it_serves() -> None:
    """``peer:F`` is a host tier of that size served in-process and reached over NIXL UCX: same
    policy, same hits, bytes moved by the peer protocol."""
    from kvbm_fs.testing import require_nixl

    require_nixl()
    t = synthetic(150, seed=3)
    for policy in ("lru", "parc"):
        host = replay_one(t, ReplayConfig(policy=policy, tiers=[TierSpec.parse("host:0.2")]))
        peer = replay_one(t, ReplayConfig(policy=policy, tiers=[TierSpec.parse("peer:0.2")]))
        assert peer["hit_ratio"] == pytest.approx(host["hit_ratio"]) and peer["hit_ratio"] > 0
        assert peer["tier_hit_ratio"] == {"peer": pytest.approx(host["tier_hit_ratio"]["host"])}
