"""KV events for routers: real ZMQ sockets on 127.0.0.1, decoded with kvbm_fs's own vLLM-format structs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from conftest import LAYOUT, tokens

from kvbm_fs import ConfigError, EventKind, LayoutMismatchError, Namespace, Store, kv_events, mount
from kvbm_fs.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventPublisher,
    decoder,
    publisher_of,
    replay,
)

NB = LAYOUT.block_nbytes
EP = {"endpoint": "tcp://127.0.0.1:0", "bind": True}  # any free port, bound on loopback only
DEC = decoder()


def open_store(*urls: str, events: dict[str, Any] | None = None, **kw: Any) -> tuple[Store, KVEventPublisher]:
    store = mount(*(urls or ("host://?capacity=512KiB",)), layout=LAYOUT, model="ev", env={}, events=events or EP, **kw)
    pub = publisher_of(store)
    assert pub is not None
    return store, pub


@pytest.fixture
def ctx() -> Iterator[Any]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def subscribe(ctx: Any, pub: KVEventPublisher, topic: str = "", n: int = 1) -> Any:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(pub.endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    assert pub.wait_subscribed(n), "the subscription never reached the publisher"
    return sub


def recv(sub: Any) -> tuple[str, int, KVEventBatch]:
    assert sub.poll(10_000), "no KV event batch arrived"
    topic, seq, payload = sub.recv_multipart()
    assert len(seq) == 8
    return topic.decode(), int.from_bytes(seq, "big"), DEC.decode(payload)


def received(sub: Any, pub: KVEventPublisher, flush: bool = True) -> list[tuple[str, int, KVEventBatch]]:
    """Everything published so far: the publisher flushes (unless it is closed), then batches are read
    until its last one arrived (sequence numbers count its batches), not until the socket stays quiet
    for a while, which a busy machine breaks."""
    if flush:
        assert pub.flush()
    last = int(pub.stats()["batches"]) - 1
    out: list[tuple[str, int, KVEventBatch]] = []
    while last >= 0 and not (out and out[-1][1] >= last):
        out.append(recv(sub))
    return out


def put(store: Store, n: int, seed: int, tier: str | None = None) -> Any:
    keys = store.keys(tokens(n, seed=seed))
    assert store.put(keys, np.zeros((n, NB), np.uint8), tier=tier).all()
    return keys


def test_put_delete_and_close_publish_stored_removed_and_cleared_in_sequence(ctx: Any) -> None:
    store, pub = open_store()
    ns = store.default_namespace
    assert ns is not None
    sub = subscribe(ctx, pub)
    keys = store.keys(tokens(6, seed=1))
    store.put(keys[:4], np.zeros((4, NB), np.uint8))
    store.put(keys[4:], np.zeros((2, NB), np.uint8))  # continues the chain: its parent is block 3
    store.delete(keys[:2])
    got = received(sub, pub)
    store.close()
    got += [recv(sub)]
    assert [seq for _, seq, _ in got] == list(range(len(got)))  # events in one drain share a batch
    assert {topic for topic, _, _ in got} == {f"kvbm_fs.{ns.short_id}"}
    a, b, c, d = (e for _, _, batch in got for e in batch.events)
    assert isinstance(a, BlockStored) and isinstance(b, BlockStored)
    assert a.block_hashes == keys.hashes[:4].tolist() and a.parent_block_hash is None  # Dynamo v1 sequence hashes
    assert b.block_hashes == keys.hashes[4:].tolist() and b.parent_block_hash == int(keys.hashes[3])
    assert (a.medium, a.locality, a.ownership, a.block_size, a.token_ids) == ("CPU", "LOCAL", "kvbm_fs:host", 16, [])
    assert isinstance(c, BlockRemoved) and c.block_hashes == keys.hashes[:2].tolist() and c.medium == "CPU"
    assert isinstance(d, AllBlocksCleared)  # the instance is gone: routers forget what it held
    assert all(batch.data_parallel_rank == 0 for _, _, batch in got)


def test_evictions_are_removals_and_tiers_map_to_vllm_media(ctx: Any, tmp_path: Path) -> None:
    store, pub = open_store(
        f"gpu://cpu?capacity={4 * NB}", f"file://{tmp_path}/disk", f"remote+file://{tmp_path}/remote"
    )
    sub = subscribe(ctx, pub)
    put(store, 4, seed=2, tier="gpu")
    evicting = put(store, 2, seed=3, tier="gpu")  # the gpu tier is full: two older blocks are evicted
    put(store, 2, seed=4, tier="disk")
    put(store, 2, seed=5, tier="remote")
    evs = [e for _, _, b in received(sub, pub) for e in b.events]
    stored = {(e.medium, e.locality, e.ownership) for e in evs if isinstance(e, BlockStored)}
    assert stored == {
        ("GPU", "LOCAL", "kvbm_fs:gpu"),
        ("STORAGE", "LOCAL", "kvbm_fs:disk"),
        ("STORAGE", "REMOTE", "kvbm_fs:remote"),
    }
    removed = [e for e in evs if isinstance(e, BlockRemoved)]
    assert sum(len(e.block_hashes) for e in removed) == 2 and all(e.medium == "GPU" for e in removed)
    assert not set(evicting.hashes.tolist()) & {h for e in removed for h in e.block_hashes}
    store.close(persist=False)


def test_a_host_to_disk_demotion_is_stored_on_storage_and_removed_from_cpu(ctx: Any, tmp_path: Path) -> None:
    store, pub = open_store(
        f"host://?capacity={8 * NB}", f"file://{tmp_path}/disk", daemon={"high": 0.5, "low": 0.25, "batch": 8}
    )
    assert store.daemon is not None
    store.stop_daemon()  # demote on our call, not the thread's
    sub = subscribe(ctx, pub)
    keys = put(store, 8, seed=6)
    assert store.daemon.run_once() > 0
    evs = [e for _, _, b in received(sub, pub) for e in b.events]
    on_storage = {h for e in evs if isinstance(e, BlockStored) and e.medium == "STORAGE" for h in e.block_hashes}
    left_cpu = {h for e in evs if isinstance(e, BlockRemoved) and e.medium == "CPU" for h in e.block_hashes}
    still_host = set(keys.hashes[store.tier("host").contains(keys)].tolist())
    assert left_cpu and left_cpu <= on_storage
    assert left_cpu == set(keys.hashes.tolist()) - still_host  # exactly the blocks that left the host tier
    store.close(persist=False)


def test_replay_returns_batches_a_subscriber_missed(ctx: Any) -> None:
    store, pub = open_store(events={**EP, "replay_endpoint": "tcp://127.0.0.1:0"})
    assert pub.replay_endpoint is not None
    batches = []
    for i in range(3):  # published before anyone subscribed: lost to SUB sockets
        batches.append(put(store, 2, seed=10 + i))
        assert pub.flush()  # one batch each (events that wait together share a batch)
    got = replay(ctx, pub.replay_endpoint, 1)
    assert [seq for seq, _ in got] == [1, 2]
    for (_, payload), keys in zip(got, batches[1:]):
        (ev,) = DEC.decode(payload).events
        assert isinstance(ev, BlockStored) and ev.block_hashes == keys.hashes.tolist()
    assert replay(ctx, pub.replay_endpoint, 3) == []  # nothing newer: only the end marker
    store.close(persist=False)


def test_topics_carry_the_namespace_and_subscribers_filter_by_it(ctx: Any) -> None:
    store, pub = open_store(events={**EP, "topic": "cluster-a"})
    ns = store.default_namespace
    assert ns is not None
    other = store.add_namespace(Namespace("ev", LAYOUT, tenant="other"))
    only_other = subscribe(ctx, pub, f"cluster-a.{other.short_id}", n=1)
    everything = subscribe(ctx, pub, "cluster-a", n=2)
    mine = put(store, 2, seed=20)
    theirs = other.keys_for_tokens(tokens(3, seed=21))
    assert store.put(theirs, np.zeros((3, NB), np.uint8)).all()
    filtered = received(only_other, pub)
    assert [(t, b.events[0].block_hashes) for t, _, b in filtered] == [  # type: ignore[union-attr]
        (f"cluster-a.{other.short_id}", theirs.hashes.tolist())
    ]
    assert [t for t, _, _ in received(everything, pub)] == [f"cluster-a.{ns.short_id}", f"cluster-a.{other.short_id}"]
    assert len(mine) == 2
    store.close(persist=False)


def test_a_stalled_publisher_or_a_reader_that_never_reads_never_blocks_puts(ctx: Any) -> None:
    store = mount("host://?capacity=1MiB", layout=LAYOUT, model="ev", env={})
    pub = KVEventPublisher(store, {**EP, "max_queue_size": 4, "replay_endpoint": "tcp://127.0.0.1:0"}, start=False)
    for i in range(20):  # the thread is not running: 4 batches queue up, 16 are dropped and counted
        put(store, 1, seed=30 + i)
    assert pub.stats()["dropped_events"] == 16
    pub.start()
    assert pub.flush() and pub.replay_endpoint is not None
    # what was queued before the overflow is void: one AllBlocksCleared stands for it (a lost removal
    # must not leave routers a block that is gone)
    (only,) = replay(ctx, pub.replay_endpoint, 0)
    assert [type(e) for e in DEC.decode(only[1]).events] == [AllBlocksCleared]
    deaf = ctx.socket(zmq.SUB)  # subscribes, then never reads: PUB drops at its high-water mark
    deaf.setsockopt(zmq.RCVHWM, 1)
    deaf.connect(pub.endpoint)
    deaf.setsockopt(zmq.SUBSCRIBE, b"")
    assert pub.wait_subscribed()
    for i in range(200):
        put(store, 1, seed=100 + i)
    assert pub.flush()
    assert pub.stats()["batches"] >= 2
    pub.close()
    store.close(persist=False)


def test_config_table_file_and_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "kvbm.json"  # the same [events] table as in TOML or YAML
    events = {"endpoint": "tcp://127.0.0.1:0", "bind": True, "topic": "t"}
    cfg.write_text(
        json.dumps({"model": "ev", "tiers": ["host://?capacity=1MiB"], "layout": LAYOUT.to_dict(), "events": events})
    )
    store = mount(config=cfg, env={})
    pub = publisher_of(store)
    assert pub is not None and pub.endpoint.startswith("tcp://127.0.0.1:") and pub.config.topic == "t"
    with pytest.raises(ConfigError, match="cannot bind"):  # the port is taken
        mount(
            "host://?capacity=1MiB", layout=LAYOUT, model="ev", env={}, events={"endpoint": pub.endpoint, "bind": True}
        )
    store.close()
    with pytest.raises(ConfigError, match="unknown \\[events\\] option"):
        mount(
            "host://?capacity=1MiB",
            layout=LAYOUT,
            model="ev",
            env={},
            events={"endpoint": "tcp://127.0.0.1:0", "port": 1},
        )
    with pytest.raises(ConfigError, match="config events must be a table"):
        mount("host://?capacity=1MiB", layout=LAYOUT, model="ev", env={}, events=5)  # type: ignore[arg-type]
    assert kv_events.offset_endpoint("tcp://*:5557", 2) == "tcp://*:5559"  # TP ranks publish on their own ports
    assert kv_events.offset_endpoint("tcp://*:0", 2) == "tcp://*:0"


@pytest.mark.parametrize("by", ["store", "publisher"])
def test_noted_tokens_fill_token_ids_on_every_tier_the_blocks_reach(ctx: Any, tmp_path: Path, by: str) -> None:
    store, pub = open_store("host://?capacity=1MiB", f"file://{tmp_path}/disk")
    sub = subscribe(ctx, pub)
    toks = tokens(3, seed=40)
    keys = store.keys(toks)
    # as a connector does before saving what it computed: Store.note_tokens is the core way (a TOKENS
    # event on the store's stream, no optional dependency), the publisher's own method the direct one
    (store.note_tokens if by == "store" else pub.note_tokens)(keys, np.concatenate([toks, [5, 6]]))  # + a tail
    assert store.put(keys, np.zeros((3, NB), np.uint8)).all()
    store.copy(keys, "host", "disk")
    unknown = put(store, 2, seed=41)  # nobody noted these: token_ids stay empty
    stored = [e for _, _, b in received(sub, pub) for e in b.events if isinstance(e, BlockStored)]
    per_block: dict[tuple[str | None, Any], list[int]] = {}
    for e in stored:  # one event per chain run (the disk tier may announce a chain block by block)
        assert len(e.token_ids) in (0, len(e.block_hashes) * e.block_size)
        for j, h in enumerate(e.block_hashes):
            per_block[e.medium, h] = e.token_ids[j * e.block_size : (j + 1) * e.block_size]
    for medium in ("CPU", "STORAGE"):
        assert [t for h in keys.hashes.tolist() for t in per_block[medium, h]] == toks.tolist()
    assert [e.token_ids for e in stored if e.block_hashes[0] == int(unknown.hashes[0])] == [[]]
    store.close(persist=False)


def test_note_tokens_checks_its_input_only_when_someone_listens_and_metrics_ignore_it() -> None:
    quiet = mount("host://?capacity=1MiB", layout=LAYOUT, model="ev", env={})
    keys = quiet.keys(tokens(2, seed=42))
    quiet.note_tokens(keys, [])  # nobody subscribes: one attribute check, nothing else (not even this misuse)
    metrics = quiet.enable_metrics()
    before = metrics.text()
    with pytest.raises(LayoutMismatchError, match="need 32 integer token ids, got 16"):
        quiet.note_tokens(keys, tokens(1, seed=42))
    with pytest.raises(ValueError, match="integer token ids"):
        quiet.note_tokens(keys, np.zeros(32, np.float32))
    seen: list[Any] = []
    quiet.events.subscribe(seen.append)
    quiet.note_tokens(keys, tokens(2, seed=42))
    ((kind, data),) = [(e.kind, e.data) for e in seen]
    assert kind is EventKind.TOKENS and data.tolist() == tokens(2, seed=42).tolist()
    assert metrics.text() == before  # the metrics subscriber counts no TOKENS event
    quiet.close()


def persisted_at_close(ctx: Any, tmp_path: Path, clear: bool | str) -> tuple[Any, list[Any]]:
    store, pub = open_store("host://?capacity=1MiB", f"file://{tmp_path}/disk", events={**EP, "clear_on_close": clear})
    sub = subscribe(ctx, pub)
    toks = tokens(4, seed=43)
    keys = store.keys(toks)
    store.note_tokens(keys, toks)
    assert store.put(keys, np.zeros((4, NB), np.uint8)).all()  # on the host tier only
    assert pub.flush()
    store.close()  # persist writes the 4 blocks to disk, then the publisher announces them and closes
    evs = [e for _, _, b in received(sub, pub, flush=False) for e in b.events]
    return keys, evs


def test_blocks_persist_writes_at_close_are_announced_before_the_clear(ctx: Any, tmp_path: Path) -> None:
    keys, evs = persisted_at_close(ctx, tmp_path, True)
    assert [type(e) for e in evs][-1] is AllBlocksCleared and sum(isinstance(e, AllBlocksCleared) for e in evs) == 1
    storage = [e for e in evs if isinstance(e, BlockStored) and e.medium == "STORAGE"]
    per_block = {h: e.token_ids[j * 16 : (j + 1) * 16] for e in storage for j, h in enumerate(e.block_hashes)}
    assert sorted(per_block) == sorted(keys.hashes.tolist())  # persist's order is the host tier's, not the chain's
    toks = tokens(4, seed=43).tolist()
    assert [t for h in keys.hashes.tolist() for t in per_block[h]] == toks  # the noted tokens follow the blocks


def test_clear_on_close_volatile_removes_only_this_processs_memory_blocks(ctx: Any, tmp_path: Path) -> None:
    keys, evs = persisted_at_close(ctx, tmp_path, "volatile")
    assert not any(isinstance(e, AllBlocksCleared) for e in evs)
    kinds = [(type(e).__name__, e.medium) for e in evs if not isinstance(e, AllBlocksCleared)]
    assert kinds.index(("BlockRemoved", "CPU")) > kinds.index(("BlockStored", "STORAGE"))  # persisted, then gone
    removed = {h for e in evs if isinstance(e, BlockRemoved) for h in e.block_hashes}
    assert removed == set(keys.hashes.tolist())
    assert all(e.medium == "CPU" for e in evs if isinstance(e, BlockRemoved))  # the disk copies stay announced
    with pytest.raises(ConfigError, match="clear_on_close"):
        kv_events.EventsConfig.from_any({"clear_on_close": "storage"})


def test_daemon_command_publishes_its_moves_with_events(ctx: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "kvbm.json"
    slot = 4096 + NB  # a disk slot of one block
    tiers = [f"file://{tmp_path}/a?capacity={8 * slot}&name=a", f"file://{tmp_path}/b?name=b"]
    cfg.write_text(
        json.dumps({"model": "ev", "tiers": tiers, "layout": LAYOUT.to_dict(), "daemon": {"high": 0.5, "low": 0.25}})
    )
    with mount(*tiers, layout=LAYOUT, model="ev", env={}) as store:  # a over its high mark: the daemon demotes
        keys = put(store, 6, seed=50, tier="a")
    table = {"endpoint": "tcp://127.0.0.1:0", "bind": True, "replay_endpoint": "tcp://127.0.0.1:0"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_FS_")}
    cmd = [sys.executable, "-m", "kvbm_fs", "daemon", "--config", str(cfg), "--events", json.dumps(table)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout is not None
        ready = json.loads(p.stdout.readline())
        assert ready["events_endpoint"].startswith("tcp://127.0.0.1:")
        on_b: set[Any] = set()
        deadline = time.monotonic() + 60
        while not on_b and time.monotonic() < deadline:  # the daemon's first round runs at start
            for _, payload in replay(ctx, ready["replay_endpoint"], 0):
                evs = DEC.decode(payload).events
                on_b |= {
                    h for e in evs if isinstance(e, BlockStored) and e.ownership == "kvbm_fs:b" for h in e.block_hashes
                }
        assert on_b and on_b <= set(keys.hashes.tolist())
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 0
