"""Prometheus metrics: scraped over real HTTP on 127.0.0.1, parsed with prometheus_client.parser, after
known operations (puts, gets, evictions, admission refusals, a corrupted disk block, daemon moves)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import LAYOUT, tokens
from prometheus_client.parser import text_string_to_metric_families

from kvbm_fs import ConfigError, Namespace, Store, mount
from kvbm_fs.metrics import StoreMetrics
from kvbm_fs.testing import blocks_for

NB = LAYOUT.block_nbytes
SLOT = 4096 + NB  # a disk slot of an 8 KiB block
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(m: Samples, name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def port_of(store: Store) -> int:
    assert store.metrics is not None and store.metrics.port is not None
    return store.metrics.port


def chain(store: Store, n: int, seed: int) -> tuple[object, np.ndarray]:
    keys = store.keys(tokens(n, seed=seed))
    return keys, blocks_for(keys, NB)


def test_puts_gets_lookups_and_tier_gauges(tmp_path: Path) -> None:
    store = mount(f"host://?capacity={16 * NB}", f"file://{tmp_path}/d?capacity={64 * SLOT}",
                  layout=LAYOUT, model="m", env={}, metrics_port=0)  # fmt: skip
    keys, data = chain(store, 10, seed=1)
    assert store.put(keys[:8], data[:8]).all()  # type: ignore[index]
    m = store.match(keys)  # type: ignore[arg-type]
    assert m.length == 8
    out = np.zeros((5, NB), np.uint8)
    assert store.get(keys[:5], out, m).all()  # type: ignore[index]
    s = scrape(port_of(store))
    assert val(s, "kvbm_fs_written_bytes_total", tier="host") == 8 * NB
    assert val(s, "kvbm_fs_written_bytes_total", tier="disk") == 0
    assert val(s, "kvbm_fs_hits_total", tier="host", op="lookup") == 8
    assert val(s, "kvbm_fs_misses_total", tier="host", op="lookup") == 2
    assert val(s, "kvbm_fs_misses_total", tier="disk", op="lookup") == 2  # asked for the 2 the host lacks
    assert val(s, "kvbm_fs_hits_total", tier="host", op="get") == 5
    assert val(s, "kvbm_fs_misses_total", tier="host", op="get") == 0
    assert val(s, "kvbm_fs_read_bytes_total", tier="host") == 5 * NB
    assert val(s, "kvbm_fs_op_seconds_count", tier="host", op="get") == 1
    assert val(s, "kvbm_fs_op_seconds_count", tier="host", op="put") == 1
    assert val(s, "kvbm_fs_op_seconds_bucket", tier="host", op="get", le="+Inf") == 1
    assert val(s, "kvbm_fs_tier_blocks", tier="host") == 8
    assert val(s, "kvbm_fs_tier_used_bytes", tier="host") == 8 * NB
    assert val(s, "kvbm_fs_tier_capacity_bytes", tier="host") == 16 * NB
    assert val(s, "kvbm_fs_tier_capacity_bytes", tier="disk") == 64 * SLOT
    # a put straight to the disk tier, then a get served from it
    assert store.put(keys[8:], data[8:], tier="disk").all()  # type: ignore[index]
    out = np.zeros((10, NB), np.uint8)
    assert store.get(keys, out).all() and np.array_equal(out, data)  # type: ignore[arg-type]
    s = scrape(port_of(store))
    assert val(s, "kvbm_fs_written_bytes_total", tier="disk") == 2 * NB
    assert val(s, "kvbm_fs_hits_total", tier="disk", op="get") == 2
    assert val(s, "kvbm_fs_hits_total", tier="host", op="get") == 5 + 8
    assert val(s, "kvbm_fs_tier_blocks", tier="disk") == 2
    store.close(persist=False)


def test_evictions_and_admission_refusals(tmp_path: Path) -> None:
    store = mount(f"host://?capacity={4 * NB}", layout=LAYOUT, model="m", env={}, metrics_port=0)
    a, da = chain(store, 4, seed=2)
    b, db = chain(store, 4, seed=3)
    store.put(a, da)  # type: ignore[arg-type]
    store.put(b, db)  # type: ignore[arg-type]  # a full tier evicts the 4 of a
    s = scrape(port_of(store))
    assert val(s, "kvbm_fs_evicted_blocks_total", tier="host") == 4
    assert val(s, "kvbm_fs_written_bytes_total", tier="host") == 8 * NB
    store.close(persist=False)
    # TinyLFU in front of a full tier declines one-off newcomers against blocks read often
    store = mount(f"host://?capacity={4 * NB}&policy=lru%2Btinylfu", layout=LAYOUT, model="m", env={}, metrics_port=0)
    hot, dh = chain(store, 4, seed=4)
    store.put(hot, dh)  # type: ignore[arg-type]
    for _ in range(5):
        store.get(hot, np.zeros((4, NB), np.uint8))  # type: ignore[arg-type]
    cold, dc = chain(store, 4, seed=5)
    ok = store.put(cold, dc)  # type: ignore[arg-type]
    s = scrape(port_of(store))
    refused = val(s, "kvbm_fs_admission_refused_blocks_total", tier="host")
    assert refused == int((~ok).sum()) > 0
    store.close(persist=False)


def test_a_corrupted_disk_block_counts_as_a_verify_failure_and_a_get_miss(tmp_path: Path) -> None:
    store = mount(f"file://{tmp_path}/d?capacity={16 * SLOT}", layout=LAYOUT, model="m", env={}, metrics_port=0)
    keys, data = chain(store, 4, seed=6)
    assert store.put(keys, data).all()  # type: ignore[arg-type]
    t = store.tiers[0]
    rec = t.index.records(keys.ns, keys.hashes[2:3])[0]  # type: ignore[attr-defined]
    seg, off = t._locate(rec.slot)  # type: ignore[attr-defined]
    fd = os.open(t._segment_path(seg), os.O_RDWR)  # type: ignore[attr-defined]
    try:
        at = off + 4096 + 100  # a payload byte of block 2
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x5A]), at)
    finally:
        os.close(fd)
    got = store.get(keys, np.zeros((4, NB), np.uint8))  # type: ignore[arg-type]
    assert got.tolist() == [True, True, False, True]
    s = scrape(port_of(store))
    assert val(s, "kvbm_fs_verify_failed_blocks_total", tier="disk") == 1
    assert val(s, "kvbm_fs_misses_total", tier="disk", op="get") == 1
    assert val(s, "kvbm_fs_hits_total", tier="disk", op="get") == 3
    store.close(persist=False)


def test_daemon_demotions_promotions_and_prefetches(tmp_path: Path) -> None:
    store = mount(f"host://?capacity={8 * NB}", f"file://{tmp_path}/d?capacity={64 * SLOT}",
                  layout=LAYOUT, model="m", env={}, metrics_port=0)  # fmt: skip
    d = store.start_daemon({"high": 0.5, "low": 0.25})
    d.stop()  # rounds run here, one at a time
    keys, data = chain(store, 8, seed=7)
    assert store.put(keys, data).all()  # type: ignore[arg-type]
    d.run_once()
    demoted = d.stats()["demoted_blocks"]
    assert demoted == 6  # 8 held, down to 2 (the low watermark)
    s = scrape(port_of(store))
    assert val(s, "kvbm_fs_daemon_blocks_total", action="demote") == demoted
    assert val(s, "kvbm_fs_daemon_bytes_total", action="demote") == demoted * NB
    assert val(s, "kvbm_fs_written_bytes_total", tier="disk") == demoted * NB
    assert val(s, "kvbm_fs_read_bytes_total", tier="host") == demoted * NB
    assert val(s, "kvbm_fs_tier_blocks", tier="host") == 2
    # a get served from disk promotes what it read; the matched rest of the chain is prefetched
    m = store.match(keys)  # type: ignore[arg-type]
    on_disk = np.flatnonzero(m.where == 1)
    first = int(on_disk[0])
    assert store.get(keys[first : first + 1], np.zeros((1, NB), np.uint8)).all()  # type: ignore[index]
    d.run_once()
    st = d.stats()
    s = scrape(port_of(store))
    assert val(s, "kvbm_fs_daemon_blocks_total", action="promote") == st["promoted_blocks"]
    assert val(s, "kvbm_fs_daemon_blocks_total", action="prefetch") == st["prefetched_blocks"] > 0
    assert st["promoted_blocks"] + st["prefetched_blocks"] > 0
    moved_up = val(s, "kvbm_fs_daemon_bytes_total", action="promote") + val(
        s, "kvbm_fs_daemon_bytes_total", action="prefetch"
    )
    assert moved_up == st["promoted_bytes"]
    store.close(persist=False)


def test_breaker_state_of_a_remote_tier(tmp_path: Path) -> None:
    store = mount(f"host://?capacity={4 * NB}", f"remote+file://{tmp_path}/r?breaker_threshold=2&breaker_cooldown=600",
                  layout=LAYOUT, model="m", env={}, metrics_port=0)  # fmt: skip
    s = scrape(port_of(store))
    assert ("kvbm_fs_breaker_state", frozenset({("tier", "remote")})) in s
    assert val(s, "kvbm_fs_breaker_state", tier="remote") == 0
    assert ("kvbm_fs_breaker_state", frozenset({("tier", "host")})) not in s  # host tiers have none
    remote = store.tier("remote")
    remote.breaker.record(False)  # type: ignore[attr-defined]  # two failed requests in a row trip it
    remote.breaker.record(False)  # type: ignore[attr-defined]
    assert val(scrape(port_of(store)), "kvbm_fs_breaker_state", tier="remote") == 2
    store.close(persist=False)


def test_two_stores_in_one_process_keep_their_own_figures(tmp_path: Path) -> None:
    a = mount(f"host://?capacity={8 * NB}", layout=LAYOUT, model="a", env={}, metrics_port=0)
    b = mount(f"host://?capacity={8 * NB}", layout=LAYOUT, model="b", env={}, metrics_port=0)
    ka, da = chain(a, 3, seed=8)
    kb, db = chain(b, 5, seed=9)
    a.put(ka, da)  # type: ignore[arg-type]
    b.put(kb, db)  # type: ignore[arg-type]
    assert val(scrape(port_of(a)), "kvbm_fs_written_bytes_total", tier="host") == 3 * NB
    assert val(scrape(port_of(b)), "kvbm_fs_written_bytes_total", tier="host") == 5 * NB
    a.close(persist=False)
    b.close(persist=False)


def test_a_port_already_served_is_skipped_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    a = mount(f"host://?capacity={4 * NB}", layout=LAYOUT, model="m", env={}, metrics_port=0)
    port = port_of(a)
    with caplog.at_level(logging.INFO, logger="kvbm_fs.metrics"):
        b = mount(f"host://?capacity={4 * NB}", layout=LAYOUT, model="m", env={}, metrics_port=port)
    assert b.metrics is not None and b.metrics.port is None
    assert any("served by another process" in r.message for r in caplog.records)
    assert "kvbm_fs_tier_blocks" in b.metrics.text()  # still counted, only not served
    a.close(persist=False)
    b.close(persist=False)


def test_port_from_config_and_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "kvbm.toml"
    cfg.write_text(f'tiers = ["host://?capacity={4 * NB}"]\nmetrics_port = 0\n')
    with mount(layout=LAYOUT, config=cfg, env={}) as store:
        assert "kvbm_fs_tier_capacity_bytes" in str(scrape(port_of(store)))
    with mount(f"host://?capacity={4 * NB}", layout=LAYOUT, env={"KVBM_FS_METRICS_PORT": "0"}) as store:
        assert val(scrape(port_of(store)), "kvbm_fs_tier_capacity_bytes", tier="host") == 4 * NB
    with pytest.raises(ConfigError, match="METRICS_PORT"):
        mount(f"host://?capacity={4 * NB}", layout=LAYOUT, env={"KVBM_FS_METRICS_PORT": "x"})
    with mount(f"host://?capacity={4 * NB}", layout=LAYOUT, env={}) as store:
        assert store.metrics is None  # no port asked for: nothing subscribed, nothing served


def test_bare_tiers_as_peer_serve_has(tmp_path: Path) -> None:
    from kvbm_fs.tiers.host import HostTier

    t = HostTier(4 * NB, NB, name="peer-pool")
    m = StoreMetrics([t], t.events)
    port = m.serve(0)
    assert port is not None
    keys = Namespace("m", LAYOUT).keys_for_tokens(tokens(2, seed=10))
    t.put(keys, blocks_for(keys, NB))
    s = scrape(port)
    assert val(s, "kvbm_fs_tier_blocks", tier="peer-pool") == 2
    assert val(s, "kvbm_fs_written_bytes_total", tier="peer-pool") == 2 * NB
    m.close()
    t.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from kvbm_fs import KVLayout, mount
    from kvbm_fs.testing import blocks_for
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, block_size=16, dtype="float16")
    rank, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    store = mount("host://?capacity=1MiB", layout=layout, model="tp", rank=rank, world_size=2, env={},
                  metrics_port=port)
    keys = store.keys(np.arange(16 * n) + 1000 * rank)
    store.put(keys, blocks_for(keys, layout.block_nbytes))
    print(json.dumps({"serving": store.metrics.port is not None}), flush=True)
    sys.stdin.readline()  # hold the port until the test has scraped
    store.close(persist=False)
    """
)


def test_tp_workers_on_one_port_in_multiprocess_mode_sum_their_counters(tmp_path: Path) -> None:
    """Two processes (as vLLM's TP workers) given one port: the first serves it, the second logs and
    skips, and with PROMETHEUS_MULTIPROC_DIR the served counters sum both processes."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    port = _free_port()
    procs = []
    try:
        for rank, n in ((0, 3), (1, 5)):
            p = subprocess.Popen([sys.executable, "-c", WORKER, str(rank), str(port), str(n)], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
            procs.append(p)
            assert p.stdout is not None
            line = p.stdout.readline()
            assert json.loads(line)["serving"] is (rank == 0), line
        s = scrape(port)
        assert val(s, "kvbm_fs_written_bytes_total", tier="host") == 8 * NB
        caps = {dict(lab)["pid"]: v for (name, lab), v in s.items() if name == "kvbm_fs_tier_capacity_bytes"}
        assert sorted(caps) == sorted(str(p.pid) for p in procs)  # gauges: one series per live process
        assert set(caps.values()) == {float(1 << 20)}
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
            p.wait(30)


def _serve_cli(args: list[str]) -> tuple[subprocess.Popen[str], dict[str, object]]:
    p = subprocess.Popen([sys.executable, "-m", "kvbm_fs", *args], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    return p, json.loads(p.stdout.readline())


def _stop_cli(p: subprocess.Popen[str]) -> None:
    p.send_signal(2)  # SIGINT: both commands stop cleanly on it
    assert p.wait(30) == 0


def test_daemon_command_serves_metrics(tmp_path: Path) -> None:
    cfg = tmp_path / "kvbm.toml"
    cfg.write_text(
        f'model = "m"\ntiers = ["host://?capacity={4 * NB}", "file://{tmp_path}/d?capacity={16 * SLOT}"]\n'
        '[layout]\nnum_layers = 2\nnum_kv_heads = 2\nhead_dim = 32\nblock_size = 16\ndtype = "float16"\n'
    )
    p, info = _serve_cli(["daemon", "--config", str(cfg), "--metrics-port", "0"])
    try:
        s = scrape(int(info["metrics_port"]))  # type: ignore[call-overload]
        assert val(s, "kvbm_fs_tier_capacity_bytes", tier="disk") == 16 * SLOT
        assert val(s, "kvbm_fs_tier_capacity_bytes", tier="host") == 4 * NB
    finally:
        _stop_cli(p)


def test_peer_serve_command_serves_metrics() -> None:
    from kvbm_fs.testing import require_nixl

    require_nixl()
    p, info = _serve_cli(["peer-serve", "--capacity", f"{8 * NB}", "--block-bytes", str(NB), "--metrics-port", "0"])
    try:
        s = scrape(int(info["metrics_port"]))  # type: ignore[call-overload]
        assert val(s, "kvbm_fs_tier_capacity_bytes", tier="peer-pool") == 8 * NB
        assert val(s, "kvbm_fs_tier_blocks", tier="peer-pool") == 0
    finally:
        _stop_cli(p)


def test_latency_buckets_and_counts_match_prometheus_client() -> None:
    """The single-process sink counts in plain ints and exports at scrape time: its histogram must bucket
    exactly as prometheus-client's own Histogram (le inclusive, +Inf last), bounds and sums included."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from kvbm_fs.events import EventBus, EventKind, StoreOp
    from kvbm_fs.metrics import LATENCY_BUCKETS, LocalSink

    seconds = [0.0, 1e-6, *LATENCY_BUCKETS, 3e-4, 0.07, 11.0, 1e3]  # every bound exactly, between, past the last
    reg = CollectorRegistry()
    ref = Histogram("kvbm_fs_op_seconds", "ref", ["tier", "op"], registry=reg, buckets=LATENCY_BUCKETS)
    sink = LocalSink([("host", NB)])
    bus = EventBus()
    sink.subscribe(bus)
    keys = Namespace("m", LAYOUT).keys_for_tokens(tokens(1, seed=11))
    for s in seconds:
        ref.labels("host", "get").observe(s)
        op = StoreOp(("host",), np.zeros(1, np.int8), np.ones(1, bool), [s], [3], [2])
        bus.publish(EventKind.LOADED, "", keys, data=op)

    def samples(text: str) -> dict[tuple[str, str], float]:
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if fam.name == "kvbm_fs_op_seconds" and s.labels.get("op") == "get" and s.name != fam.name + "_created":
                    out[(s.name, s.labels.get("le", ""))] = s.value
        return out

    reg2 = CollectorRegistry()
    reg2.register(sink)
    got, want = samples(generate_latest(reg2).decode()), samples(generate_latest(reg).decode())
    assert got.keys() == want.keys() and len(got) == len(LATENCY_BUCKETS) + 3  # buckets, +Inf, count, sum
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k
    text = generate_latest(reg2).decode()
    hits = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "kvbm_fs_hits_total"]
    assert {s.labels["op"]: s.value for s in hits} == {"lookup": 0, "get": 2 * len(seconds)}
    misses = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "kvbm_fs_misses_total"]
    assert {s.labels["op"]: s.value for s in misses} == {"lookup": 0, "get": len(seconds)}


def test_counts_from_several_threads_are_exact() -> None:
    """Engines and the daemon publish from their own threads: no count may be lost or doubled, whether
    the sink folds its logged gets on the way (every FOLD_AT) or at the scrape."""
    import threading

    from kvbm_fs.metrics import FOLD_AT

    store = mount(f"host://?capacity={64 * NB}", layout=LAYOUT, model="m", env={})
    metrics = store.enable_metrics()
    keys = store.keys(tokens(4, seed=12))
    store.put(keys, blocks_for(keys, NB))
    calls, nthreads = FOLD_AT * 3 + 7, 4

    def work() -> None:
        out = np.zeros((4, NB), np.uint8)
        for _ in range(calls):
            store.get(keys, out)  # a match and a get: two events

    threads = [threading.Thread(target=work) for _ in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s: Samples = {}
    for fam in text_string_to_metric_families(metrics.text()):
        for smp in fam.samples:
            s[(smp.name, frozenset(smp.labels.items()))] = smp.value
    n = calls * nthreads
    assert val(s, "kvbm_fs_hits_total", tier="host", op="get") == 4 * n
    assert val(s, "kvbm_fs_hits_total", tier="host", op="lookup") == 4 * n
    assert val(s, "kvbm_fs_op_seconds_count", tier="host", op="get") == n
    assert val(s, "kvbm_fs_read_bytes_total", tier="host") == 4 * n * NB
    store.close(persist=False)
