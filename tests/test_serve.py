"""``kvbm-fs serve``, the node sidecar, as a deployment runs it: a real sidecar process, real engine
processes mounting its host tier as ``peer://`` (NIXL UCX on loopback) and the shared disk tier, one
of them killed with SIGKILL under load, a fresh one loading what the sidecar acknowledged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm_fs import mount
from kvbm_fs.config import resolve
from kvbm_fs.errors import ConfigError
from kvbm_fs.keys import Namespace
from kvbm_fs.testing import LAYOUT, blocks_for, require_nixl

require_nixl()

ROOT = Path(__file__).resolve().parent.parent
LAYOUT_JSON = json.dumps(LAYOUT.to_dict())  # 8 KiB blocks
BATCH = 8  # blocks per put

# An engine: mounts its own host tier, the sidecar's (peer://) and the node's disk. "write" puts
# batch b both into the sidecar (printing what it acknowledged) and, under other keys, into its own
# host tier only, until killed; "load" reports, per batch, what it finds and whether the bytes match.
ENGINE = r"""
import json, sys
import numpy as np
from kvbm_fs import mount
from kvbm_fs.testing import blocks_for

mode, peer, disk, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = mount("host://?capacity=4MiB", peer, disk, model="engine-model")
bn = store.default_namespace.block_nbytes
side = next(t.name for t in store.tiers if t.medium.value == "peer")

def keys(b, local=False):
    base = (10**7 if local else 0) + b * 1000
    return store.keys(np.arange(base, base + 16 * BATCH, dtype=np.int64))

print(json.dumps({"up": True}), flush=True)
if mode == "write":
    for b in range(n):
        k = keys(b)
        ok = store.put(k, blocks_for(k, bn), tier=side, spill=False)
        print(json.dumps({"b": b, "ack": ok.tolist()}), flush=True)
        kl = keys(b, local=True)
        store.put(kl, blocks_for(kl, bn), tier="host", spill=False)
else:
    by_tier = {}
    for b in range(n):
        k = keys(b)
        m = store.match(k)
        for name, cnt in m.by_tier().items():
            by_tier[name] = by_tier.get(name, 0) + cnt
        out = np.zeros((len(k), bn), np.uint8)
        got = store.get(k, out)  # every block present, also past a gap in the chain
        same = [bool(g) and bool((out[i] == blocks_for(k[i : i + 1], bn)[0]).all()) for i, g in enumerate(got)]
        local = int(store.match(keys(b, local=True)).length)
        print(json.dumps({"b": b, "loaded": same, "local_found": local}), flush=True)
    print(json.dumps({"by_tier": by_tier}), flush=True)
    store.close(persist=False)
""".replace("BATCH", str(BATCH))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_FS_")}
    env["KVBM_FS_LAYOUT"] = LAYOUT_JSON
    env["KVBM_FS_PEER_TOKEN"] = "s3cret-node-token"  # both sides: the engine must present it
    return env


def _line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        assert line, f"process ended (rc={proc.poll()}) before its next line"
        if line.startswith("{"):
            doc: dict[str, Any] = json.loads(line)
            return doc


def _healthz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _tokens(b: int) -> np.ndarray:
    return np.arange(b * 1000, b * 1000 + 16 * BATCH, dtype=np.int64)


def _stored_events(replay_endpoint: str) -> list[Any]:
    """The BlockStored events the sidecar's publisher still holds (its replay buffer)."""
    import zmq

    from kvbm_fs.kv_events import BlockStored, decoder, replay

    ctx = zmq.Context()
    try:
        evs = [e for _, payload in replay(ctx, replay_endpoint, 0) for e in decoder().decode(payload).events]
    finally:
        ctx.destroy(linger=0)
    return [e for e in evs if isinstance(e, BlockStored) and e.ownership == "kvbm_fs:host"]


def _kvbm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvbm_fs", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_engine_killed_under_load_a_fresh_engine_loads_every_block_the_sidecar_acknowledged(tmp_path: Path) -> None:
    disk = f"file://{tmp_path / 'nvme'}?capacity=64MiB"
    events = json.dumps({"endpoint": "tcp://127.0.0.1:0", "bind": True, "replay_endpoint": "tcp://127.0.0.1:0"})
    cmd = [sys.executable, "-m", "kvbm_fs", "serve", "--tiers", "host://?capacity=512KiB", disk,  # 64 blocks
           "--peer-port", "0", "--metrics-port", "0", "--events", events]  # fmt: skip
    sidecar = subprocess.Popen(cmd, cwd=ROOT, env={**_env(), "KVBM_FS_MODEL": "sidecar"}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    engines: list[subprocess.Popen[str]] = []
    try:
        ready = _line(sidecar)
        assert ready["ready"] is True and ready["peer"].startswith("peer://127.0.0.1:")
        assert ready["events_endpoint"].startswith("tcp://127.0.0.1:")
        code, health = _healthz(ready["health"])
        assert code == 200 and health["ok"] and health["peer"]["ok"] and health["daemon"]["ok"], health
        assert _kvbm("health", "--url", ready["health"]).returncode == 0

        def engine(mode: str, n: int) -> subprocess.Popen[str]:
            p = subprocess.Popen([sys.executable, "-c", ENGINE, mode, ready["peer"], disk, str(n)], cwd=ROOT,
                                 env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
            engines.append(p)
            assert _line(p) == {"up": True}
            return p

        # the writer puts 64 blocks more than the sidecar's host tier holds before it is killed, so the
        # sidecar's daemon must have demoted to the disk while the engine wrote
        writer = engine("write", 5000)
        acked: dict[int, list[bool]] = {}
        while sum(map(sum, acked.values())) < 64 + 64:
            doc = _line(writer)
            acked[doc["b"]] = doc["ack"]
        writer.send_signal(signal.SIGKILL)  # mid-put, most likely: it never stops putting
        rest, _ = writer.communicate(timeout=60)
        for line in rest.splitlines():  # printed before the kill: each put had returned
            if line.startswith("{") and line.endswith("}"):
                doc = json.loads(line)
                acked[doc["b"]] = doc["ack"]
        assert writer.returncode == -signal.SIGKILL

        n = max(acked) + 1
        loader = engine("load", n)
        out, err = loader.communicate(timeout=300)
        assert loader.returncode == 0, err[-3000:]
        docs = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        for doc in docs[:-1]:
            want = acked.get(doc["b"], [False] * BATCH)
            assert all(got for got, ack in zip(doc["loaded"], want) if ack), (doc, want)  # bit-exact
            assert doc["local_found"] == 0  # the dead engine's own host tier died with it
        by_tier = docs[-1]["by_tier"]
        assert by_tier.get("disk", 0) > 0, by_tier  # demoted by the sidecar's daemon, loaded from the disk
        assert _healthz(ready["health"])[0] == 200  # the sidecar outlived an engine and served another
        # its /metrics counts what its daemon demoted to make room for the engine's puts
        metrics = _scrape(ready["health"].replace("/healthz", "/metrics"))
        assert metrics[("kvbm_fs_daemon_blocks_total", (("action", "demote"),))] > 0
        assert ("kvbm_fs_tier_blocks", (("tier", "host"),)) in metrics
        # its KV events announce the engine's blocks, with the engine's block size (its namespace joined)
        ns = Namespace("engine-model", LAYOUT)
        written = {h for b in range(n) for h in ns.keys_for_tokens(_tokens(b)).hashes.tolist()}
        stored = _stored_events(ready["replay_endpoint"])
        assert stored and all(e.block_size == 16 and set(e.block_hashes) <= written for e in stored)

        sidecar.send_signal(signal.SIGTERM)
        out, err = sidecar.communicate(timeout=120)
        assert sidecar.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]  # nothing failed in its threads, the daemon's included
        stopped = json.loads(out.strip().splitlines()[-1])
        assert stopped["stopped"] is True and stopped["persisted_blocks"] > 0
    finally:
        for p in [*engines, sidecar]:
            if p.poll() is None:
                p.kill()
                p.communicate()

    # after SIGTERM every acknowledged block is on the node's disk: the host tier was persisted, in the
    # engine's namespace, which the sidecar learned when the engine bound it
    with mount(disk, layout=LAYOUT, model="engine-model", env={}) as store:
        for b, ack in acked.items():
            k = store.keys(_tokens(b))
            idx = np.flatnonzero(ack)
            rows = np.zeros((idx.size, LAYOUT.block_nbytes), np.uint8)
            assert store.get(k[idx], rows).all()
            assert (rows == blocks_for(k[idx], LAYOUT.block_nbytes)).all()


def test_health_fails_when_nothing_serves(tmp_path: Path) -> None:
    # a port nothing listens on: the probe fails instead of hanging or passing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _kvbm("health", "--url", f"http://127.0.0.1:{port}/healthz", "--timeout", "5")
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False


def test_serve_needs_a_host_tier_to_serve(tmp_path: Path) -> None:
    from kvbm_fs.serve import Sidecar

    cfg = resolve(tiers=[f"file://{tmp_path}"], layout=LAYOUT, metrics_port=0, env={})
    with pytest.raises(ConfigError, match="no host tier"):
        Sidecar(cfg, peer_port=0)


def test_a_restarted_sidecar_knows_the_engine_namespaces_its_disk_holds(tmp_path: Path) -> None:
    from kvbm_fs.serve import Sidecar

    disk = f"file://{tmp_path}/nvme"
    with mount(disk, layout=LAYOUT, model="engine-x", env={}) as engine:  # an engine served before the restart
        k = engine.keys(_tokens(0))
        assert engine.put(k, blocks_for(k, LAYOUT.block_nbytes)).all()
        ns = engine.default_namespace
    assert ns is not None
    cfg = resolve(tiers=["host://?capacity=1MiB", disk], layout=LAYOUT, model="sidecar", metrics_port=0, env={})
    node = Sidecar(cfg, peer_port=0)
    try:
        assert ns.id in node.store.namespaces  # so its daemon, persist and events handle those blocks
        ok, doc = node.health()
        assert ok and doc["peer"]["ok"] and doc["peer"]["capacity_bytes"] == 1 << 20
    finally:
        node.close()
    assert node.health()[0] is False  # stopping (and its peer port closed)
    assert node.close() == node.persisted == 0  # twice is fine; nothing was in its host tier
