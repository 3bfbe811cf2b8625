"""Peer tier: another process's host tier over NIXL UCX (real agents, real UCX transfers on loopback).

The conformance suite runs unchanged against a PeerTier whose peer is a HostTier served in this
process (two NIXL agents, UCX between them); the cross-process tests put the peer in a child
process, as a deployment would.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm_fs.errors import ConfigError, IllegalTransitionError, LayoutMismatchError
from kvbm_fs.events import EventBus, EventKind
from kvbm_fs.testing import NS_A, EventRecorder, TierTests, blocks_for, chain, require_nixl
from kvbm_fs.tier import Tier

require_nixl()

from kvbm_fs.tiers.host import HostTier  # noqa: E402
from kvbm_fs.tiers.peer import PeerServer, PeerTier, PeerUnavailableError  # noqa: E402

BN = NS_A.block_nbytes
ROOT = Path(__file__).resolve().parent.parent


class _ServedPeerTier(PeerTier):
    """A PeerTier that owns the in-process peer it talks to (closed together)."""

    server: PeerServer

    def close(self) -> None:
        super().close()
        self.server.close()
        self.server.tier.close()


def served(capacity_blocks: int = 16, events: EventBus | None = None, **kw: Any) -> _ServedPeerTier:
    server = PeerServer(HostTier(capacity_blocks * BN, BN, name="exported"))
    try:
        t = _ServedPeerTier(server.url, BN, events=events, **kw)
    except BaseException:
        server.close()
        raise
    t.server = server
    return t


class TestPeerTier(TierTests):
    def make_tier(self, capacity_blocks: int, block_nbytes: int, events: EventBus) -> Tier:
        assert block_nbytes == BN
        return served(capacity_blocks, events)


@pytest.fixture
def peer() -> Any:
    t = served(32, breaker_cooldown=0.2, timeout=2.0)
    t.bind_namespace(NS_A)
    yield t
    t.close()


def test_blocks_put_by_a_peer_are_matchable_and_readable_on_the_serving_side(peer: _ServedPeerTier) -> None:
    keys = chain(NS_A, 6)
    assert peer.put(keys, blocks_for(keys, BN)).all()
    local = peer.server.tier
    assert local.prefix_len(keys) == 6
    out = np.zeros((6, BN), np.uint8)
    assert local.get(keys, out).all() and np.array_equal(out, blocks_for(keys, BN))


def test_blocks_stored_by_the_serving_process_are_read_by_peers_and_verified(peer: _ServedPeerTier) -> None:
    keys = chain(NS_A, 5, start=100)
    peer.server.tier.put(keys, blocks_for(keys, BN))
    out = np.zeros((5, BN), np.uint8)
    assert peer.get(keys, out).all() and np.array_equal(out, blocks_for(keys, BN))
    assert peer.server.counters["headers_made"] == 5  # made at first lookup...
    peer.get(keys, out)
    assert peer.server.counters["headers_made"] == 5  # ...and kept for the next
    assert peer.stats()["bytes_read"] > 5 * BN


@pytest.mark.parametrize("rows", ["host", "staged"])
def test_a_block_damaged_in_the_peers_memory_is_a_miss(peer: _ServedPeerTier, rows: str) -> None:
    """Host rows are read into directly (a failed row's content is then unspecified, as on disk);
    rows NIXL can't address (here column-major) go through staging, and a failed row stays as it was."""
    rec = EventRecorder(peer.events)
    keys = chain(NS_A, 4, start=200)
    assert peer.put(keys, blocks_for(keys, BN)).all()
    slot = int(peer.server.tier.pool.lookup(keys[2:3])[0])
    peer.server.tier.buf[slot, 77] ^= 0x10  # a bit flips in the peer's DRAM after the commit
    out = np.full((4, BN), 0xAB, np.uint8, order="C" if rows == "host" else "F")
    found = peer.get(keys, out)
    assert found.tolist() == [True, True, False, True]
    assert np.array_equal(out[[0, 1, 3]], blocks_for(keys, BN)[[0, 1, 3]])
    if rows == "staged":
        assert (out[2] == 0xAB).all()
    assert peer.stats()["load_failures"] == 1 and rec.keys(EventKind.LOAD_FAILED) == {(NS_A.id, int(keys.hashes[2]))}


def test_puts_from_rows_nixl_cannot_address_are_staged(peer: _ServedPeerTier) -> None:
    keys = chain(NS_A, 3, start=250)
    data = np.asfortranarray(blocks_for(keys, BN))
    assert peer.put(keys, data).all()
    out = np.zeros((3, BN), np.uint8)
    assert peer.server.tier.get(keys, out).all() and np.array_equal(out, data)


def test_a_header_made_for_another_key_is_not_served_for_this_one(peer: _ServedPeerTier) -> None:
    """Key echo: a slot whose header row names another block fails the check, however its payload looks."""
    keys = chain(NS_A, 2, start=300)
    assert peer.put(keys, blocks_for(keys, BN)).all()
    s0, s1 = (int(s) for s in peer.server.tier.pool.lookup(keys))
    srv = peer.server
    srv.hdr[s1] = srv.hdr[s0]  # row 1's header now echoes block 0 (and its checksum)
    srv.tier.buf[s1] = srv.tier.buf[s0]  # and the payload matches that checksum
    out = np.zeros((2, BN), np.uint8)
    assert peer.get(keys, out).tolist() == [True, False]


def test_a_torn_write_is_never_registered(peer: _ServedPeerTier, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvbm_fs.tiers.peer.client as mod  # PeerTier.put hashes what it sends

    rec = EventRecorder(peer.events)
    keys = chain(NS_A, 3, start=400)
    real = mod._xxh128
    monkeypatch.setattr(mod, "_xxh128", lambda row: (real(row)[0] ^ 1, real(row)[1]))  # what arrived != what was sent
    assert not peer.put(keys, blocks_for(keys, BN)).any()
    assert not peer.server.tier.contains(keys).any() and peer.server.counters["commit_rejected"] == 3
    assert peer.server.tier.pool.num_free == peer.server.tier.pool.num_slots  # reservations went back
    assert rec.keys(EventKind.STORE_FAILED) == {(NS_A.id, int(h)) for h in keys.hashes.tolist()}


def test_leases_of_a_client_that_goes_away_are_dropped(peer: _ServedPeerTier) -> None:
    keys = chain(NS_A, 3, start=500)
    assert peer.put(keys, blocks_for(keys, BN)).all()
    assert peer.pin(keys).all() and peer.server.tier.pinned(keys).all()
    peer._disconnect()  # the client process dies with its pins
    deadline = time.monotonic() + 5
    while peer.server.tier.pinned(keys).any() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not peer.server.tier.pinned(keys).any()


def test_unpin_of_what_this_client_did_not_pin_is_misuse_even_if_another_did(peer: _ServedPeerTier) -> None:
    keys = chain(NS_A, 2, start=600)
    assert peer.put(keys, blocks_for(keys, BN)).all()
    peer.server.tier.pin(keys)  # pinned by the serving process, not by this client
    with pytest.raises(IllegalTransitionError):
        peer.unpin(keys)
    assert peer.server.tier.pinned(keys).all()


def test_a_dead_peer_is_misses_and_dropped_puts_then_the_breaker_probes_a_restarted_one() -> None:
    from remote_helpers import cool_down

    t = served(16, breaker_threshold=2, breaker_cooldown=600, timeout=2.0)  # open until cool_down()
    t.bind_namespace(NS_A)
    rec = EventRecorder(t.events)
    keys = chain(NS_A, 4, start=700)
    try:
        assert t.put(keys, blocks_for(keys, BN)).all()
        port, tier = t.server.port, t.server.tier
        t.server.close()  # the peer process dies
        out = np.full((4, BN), 0xAB, np.uint8)
        for _ in range(3):
            assert not t.get(keys, out).any() and not t.put(keys, blocks_for(keys, BN)).any()
            assert not t.contains(keys).any() and t.prefix_len(keys) == 0
        assert (out == 0xAB).all() and t.breaker.state == "open" and t.stats()["skipped_open_breaker"] > 0
        assert rec.keys(EventKind.STORE_FAILED)
        t.server = PeerServer(tier, port=port)  # it comes back on the same port, with new NIXL metadata
        cool_down(t.breaker)
        assert t.get(keys, out).all() and np.array_equal(out, blocks_for(keys, BN))
        assert t.stats()["reconnects"] >= 1 and t.breaker.state == "closed"
    finally:
        t.close()


def test_bad_addresses_and_layouts_are_refused_clearly() -> None:
    for bad in ("peer://nohost", "peer://h:0", "peer://h:99999", "peer://:80", "h:x"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            PeerTier(bad, BN)
    from kvbm_fs.testing.s3 import free_port

    with pytest.raises(PeerUnavailableError, match="cannot reach"):
        PeerTier(f"peer://127.0.0.1:{free_port()}", BN, timeout=1.0)
    with PeerServer(HostTier(4 * BN, BN)) as srv, pytest.raises(LayoutMismatchError, match=f"{BN}-byte"):
        PeerTier(srv.url, BN * 2)
    srv.tier.close()
    with pytest.raises(ConfigError, match="host-memory"):
        PeerServer(__import__("kvbm_fs.tiers.gpu", fromlist=["GpuTier"]).GpuTier(4 * BN, BN, device="cpu"))


def test_peer_url_opens_through_the_registry() -> None:
    from kvbm_fs.registry import open_tier

    with PeerServer(HostTier(4 * BN, BN)) as srv:
        t = open_tier(srv.url + "?timeout=3&name=p1", block_nbytes=BN)
        try:
            assert isinstance(t, PeerTier) and t.name == "p1" and t.timeout == 3.0
            assert t.capacity_bytes == 4 * BN
        finally:
            t.close()
        srv.tier.close()
    with pytest.raises(ConfigError, match="timeout"):
        open_tier("peer://127.0.0.1:1?timeout=soon", block_nbytes=BN)


PEER_PROCESS = textwrap.dedent(
    """
    import sys
    from kvbm_fs.tiers.peer import serve_host_memory
    srv = serve_host_memory(int(sys.argv[1]), int(sys.argv[2]))
    print("URL", srv.url, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    srv.close()
    srv.tier.close()
    """
)


def test_two_processes_share_blocks_through_a_peer_process(tmp_path: Path) -> None:
    """A memory-only peer process; this process puts, a second client process reads and verifies."""
    proc = subprocess.Popen([sys.executable, "-c", PEER_PROCESS, str(64 * BN), str(BN)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = _read_url(proc)
        keys = chain(NS_A, 8, start=900)
        with PeerTier(url, BN) as t:
            t.bind_namespace(NS_A)
            assert t.put(keys, blocks_for(keys, BN)).all()
        reader = textwrap.dedent(
            f"""
            import numpy as np
            from kvbm_fs.testing import NS_A, blocks_for, chain
            from kvbm_fs.tiers.peer import PeerTier
            keys = chain(NS_A, 8, start=900)
            t = PeerTier({url!r}, {BN})
            t.bind_namespace(NS_A)
            out = np.zeros((9, {BN}), np.uint8)
            found = t.get(chain(NS_A, 9, start=900), out)
            ok = found[:8].all() and not found[8] and np.array_equal(out[:8], blocks_for(keys, {BN}))
            print("OK" if ok else "BAD", t.prefix_len(keys), flush=True)
            t.close()
            """
        )
        res = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, timeout=120)
        assert "OK 8" in res.stdout and res.returncode == 0, res.stdout + res.stderr
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        rc = proc.wait(30)
    assert rc == 0  # UCX processes exit cleanly on rdma-core hosts too (kvbm_fs.nixl_api.pin_system_rdma)


def _read_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("URL "):
            return line.split()[1]
    raise AssertionError("peer process did not start")


def test_a_store_exports_its_host_tier_and_another_store_mounts_it_as_a_peer() -> None:
    from kvbm_fs.mount import mount

    layout = NS_A.layout
    with mount("host://?capacity=1MiB", layout=layout, model=NS_A.model, tenant=NS_A.tenant) as s1:
        keys = chain(NS_A, 6, start=1000)
        assert s1.put(keys, blocks_for(keys, BN)).all()
        srv = s1.export_peer()
        with mount("host://?capacity=64KiB", srv.url, layout=layout, model=NS_A.model, tenant=NS_A.tenant) as s2:
            m = s2.match(keys)
            assert m.by_tier() == {"peer": 6}
            out = np.zeros((6, BN), np.uint8)
            assert s2.get(keys, out, m).all() and np.array_equal(out, blocks_for(keys, BN))
            more = chain(NS_A, 3, start=2000)
            assert s2.put(more, blocks_for(more, BN), tier="peer").all()
        assert s1.match(more).by_tier() == {"host": 3}  # what the peer wrote is matchable at home
    assert srv._stop.is_set()  # closed with its store
    with mount("gpu://cpu?capacity=64KiB", layout=layout, model=NS_A.model) as s3, pytest.raises(ConfigError):
        s3.export_peer()


def test_peer_serve_command_lends_dram_until_stopped() -> None:
    import json
    import signal

    cmd = [sys.executable, "-m", "kvbm_fs", "peer-serve", "--capacity", "1MiB", "--block-bytes", str(BN)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = next(json.loads(line) for line in proc.stdout if line.startswith("{"))
        assert info["block_bytes"] == BN and info["slots"] == (1 << 20) // BN
        with PeerTier(info["url"], BN) as t:
            t.bind_namespace(NS_A)
            keys = chain(NS_A, 4, start=3000)
            assert t.put(keys, blocks_for(keys, BN)).all() and t.prefix_len(keys) == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    res = subprocess.run([sys.executable, "-m", "kvbm_fs", "peer-serve"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--block-bytes" in res.stderr


CHURN_CLIENT = textwrap.dedent(
    """
    import sys, numpy as np
    from kvbm_fs.testing import NS_A, blocks_for, chain
    from kvbm_fs.tiers.peer import PeerTier
    url, seed, bn = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(seed)
    t = PeerTier(url, bn)
    t.bind_namespace(NS_A)
    served = wrong = 0
    for _ in range(150):
        start = int(rng.integers(0, 40)) * 8
        keys = chain(NS_A, 8, start=start)
        if rng.random() < 0.5:
            t.put(keys, blocks_for(keys, bn))
        else:
            out = np.zeros((8, bn), np.uint8)
            found = t.get(keys, out)
            want = blocks_for(keys, bn)
            served += int(found.sum())
            wrong += sum(not np.array_equal(out[i], want[i]) for i in np.flatnonzero(found))
    print("RESULT", served, wrong, flush=True)
    t.close()
    """
)


def test_three_processes_churning_a_small_peer_never_serve_wrong_bytes() -> None:
    """Two client processes put and get overlapping chains through a peer 8x too small for them,
    so slots are evicted and reused all the time; every block they are served is exact."""
    proc = subprocess.Popen([sys.executable, "-c", PEER_PROCESS, str(40 * BN), str(BN)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = _read_url(proc)
        clients = [
            subprocess.Popen(
                [sys.executable, "-c", CHURN_CLIENT, url, str(seed), str(BN)], stdout=subprocess.PIPE, text=True
            )
            for seed in (1, 2)
        ]
        results = [c.communicate(timeout=180)[0] for c in clients]
        for out in results:
            line = next(x for x in out.splitlines() if x.startswith("RESULT"))
            served, wrong = (int(v) for v in line.split()[1:])
            assert served > 0 and wrong == 0, out
        assert [c.returncode for c in clients] == [0, 0]
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(30)


def test_a_token_guards_everything_and_never_shows() -> None:
    import socket

    from kvbm_fs.registry import open_tier
    from kvbm_fs.tiers.peer.wire import PeerAuthError, _recv, _send

    with PeerServer(HostTier(4 * BN, BN), token="s3cret-T0k3n") as srv:
        for token in (None, "wrong"):
            with pytest.raises(PeerAuthError, match="refused") as err:
                PeerTier(srv.url, BN, token=token)
            assert "s3cret" not in str(err.value)
        with socket.create_connection((srv.host, srv.port)) as sock:  # skipping hello gets nothing
            _send(sock, {"op": "stats"})
            assert _recv(sock)[0]["error"] == "PeerAuthError"
            _send(sock, {"op": "hello", "protocol": 1})
            reply, md = _recv(sock)
            assert reply["error"] == "PeerAuthError" and not md
        t = open_tier(srv.url + "?token=s3cret-T0k3n", block_nbytes=BN)
        try:
            t.bind_namespace(NS_A)
            keys = chain(NS_A, 2)
            assert t.put(keys, blocks_for(keys, BN)).all()
            assert "s3cret" not in repr(t) + str(t.stats())
        finally:
            t.close()
        srv.tier.close()


def test_the_token_comes_from_the_environment_on_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvbm_fs.tiers.peer.wire import TOKEN_ENV, PeerAuthError

    monkeypatch.setenv(TOKEN_ENV, "from-env")
    with PeerServer(HostTier(4 * BN, BN)) as srv:
        PeerTier(srv.url, BN).close()
        with pytest.raises(PeerAuthError):
            PeerTier(srv.url, BN, token="other")
        srv.tier.close()


def test_the_daemon_demotes_cold_host_blocks_into_a_peer_and_promotes_them_back() -> None:
    """A far-memory setup: a small local host tier over a peer's bigger one; watermarks hold and
    nothing is lost, and a block served from the peer comes back up."""
    from kvbm_fs.mount import mount

    with PeerServer(HostTier(64 * BN, BN, name="pool")) as srv:
        store = mount(f"host://?capacity={8 * BN}", srv.url, layout=NS_A.layout, model=NS_A.model,
                      tenant=NS_A.tenant, env={}, daemon={"high": 0.75, "low": 0.5, "batch": 4})  # fmt: skip
        try:
            batches = []
            for r in range(6):
                keys = chain(NS_A, 4, start=5000 + 100 * r)
                assert store.put(keys, blocks_for(keys, BN)).all()
                batches.append(keys)
            assert store.daemon is not None
            store.stop_daemon()
            store.daemon.run_once()
            host = store.tier("host")
            assert host.used_bytes <= 0.75 * host.capacity_bytes
            assert store.daemon.stats()["demoted_blocks"] > 0 and len(srv.tier) > 0
            for keys in batches:
                m = store.match(keys)
                out = np.zeros((4, BN), np.uint8)
                assert m.length == 4 and store.get(keys, out, m).all() and np.array_equal(out, blocks_for(keys, BN))
            store.daemon.run_once()  # serve the queued promotions and prefetches
            st = store.daemon.stats()
            assert st["promoted_blocks"] + st["prefetched_blocks"] > 0
            assert "host" in store.match(batches[0]).by_tier()  # the oldest chain came back up
        finally:
            store.close(persist=False)
        srv.tier.close()


def test_garbage_on_the_control_port_is_refused_and_the_peer_keeps_serving(peer: _ServedPeerTier) -> None:
    import socket
    import struct

    srv = peer.server
    frames = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not our protocol
        struct.pack("!II", 1 << 30, 0),  # a frame too large
        struct.pack("!II", 2, 1 << 20) + b"{}",  # a big blob before hello: refused unread
        struct.pack("!II", 5, 0) + b"nope!",  # not JSON
        struct.pack("!II", 2, 0) + b"[]",  # JSON, not an object
    ]
    for junk in frames:
        with socket.create_connection((srv.host, srv.port), timeout=5) as sock:
            try:
                sock.sendall(junk)
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(1 << 16) == b""  # the peer hung up on it, answering nothing...
            except OSError:
                pass  # ...or already reset the connection, with our bytes unread
    from kvbm_fs.tiers.peer.wire import _recv, _send

    with socket.create_connection((srv.host, srv.port), timeout=5) as sock:
        _send(sock, {"op": "hello", "protocol": 1})
        _recv(sock)
        for bad in ({"op": "nope"}, {"op": "lookup", "ns": 1, "n": 5}, {"op": "commit", "lease": 99}):
            _send(sock, bad)
            assert "error" in _recv(sock)[0]
    keys = chain(NS_A, 3, start=7000)
    assert peer.put(keys, blocks_for(keys, BN)).all() and peer.prefix_len(keys) == 3


class _ServedPool:
    """Build a PeerPool over ``n`` in-process peers that it owns (closed together)."""

    @staticmethod
    def make(n: int, capacity_blocks: int, events: EventBus | None = None, **kw: Any) -> Any:
        from kvbm_fs.tiers.peer import PeerPool

        servers = [PeerServer(HostTier(max(1, capacity_blocks // n) * BN, BN, name=f"m{i}")) for i in range(n)]
        pool = PeerPool([s.url for s in servers], BN, events=events, **kw)
        real_close = pool.close

        def close() -> None:
            real_close()
            for s in servers:
                s.close()
                s.tier.close()

        pool.close = close  # type: ignore[method-assign]
        pool.servers = servers  # type: ignore[attr-defined]
        return pool


class TestPeerPool(TierTests):
    def make_tier(self, capacity_blocks: int, block_nbytes: int, events: EventBus) -> Tier:
        tier: Tier = _ServedPool.make(2, capacity_blocks, events)
        return tier


def test_a_pool_spreads_a_chain_over_its_peers_and_serves_on_when_one_dies() -> None:
    from kvbm_fs.registry import open_tier

    pool = _ServedPool.make(3, 96, breaker_threshold=1, breaker_cooldown=30.0, timeout=2.0)
    try:
        pool.bind_namespace(NS_A)
        keys = chain(NS_A, 60, start=8000)
        assert pool.put(keys, blocks_for(keys, BN)).all()
        share = [len(s.tier) for s in pool.servers]
        assert sum(share) == 60 and min(share) >= 5, share  # rendezvous hashing spreads the chain
        owner = pool.shard(keys)
        assert all(pool.servers[o].tier.contains(keys[i : i + 1])[0] for i, o in enumerate(owner.tolist()))
        pool.servers[1].close()  # one machine goes away
        out = np.zeros((60, BN), np.uint8)
        found = pool.get(keys, out)
        assert found.tolist() == (owner != 1).tolist()
        assert np.array_equal(out[found], blocks_for(keys, BN)[found])
        assert pool.prefix_len(keys) == int(np.argmax(owner == 1))
    finally:
        pool.close()
    urls = ",".join(f"127.0.0.1:{p}" for p in (1, 1))
    with pytest.raises(ConfigError, match="distinct"):
        open_tier(f"peer://{urls}", block_nbytes=BN)


def test_a_pool_opens_with_some_peers_down_but_not_with_all() -> None:
    from kvbm_fs.registry import open_tier
    from kvbm_fs.testing.s3 import free_port

    dead = f"127.0.0.1:{free_port()}"
    with PeerServer(HostTier(8 * BN, BN)) as srv:
        pool = open_tier(f"peer://{srv.host}:{srv.port},{dead}?timeout=1", block_nbytes=BN)
        try:
            pool.bind_namespace(NS_A)
            keys = chain(NS_A, 8, start=9000)
            done = pool.put(keys, blocks_for(keys, BN))
            assert done.any() and not done.all()  # the dead member's share is dropped, not raised
            assert pool.capacity_bytes == 8 * BN
        finally:
            pool.close()
        srv.tier.close()
    with pytest.raises(PeerUnavailableError, match="none of 2"):
        open_tier(f"peer://{dead},127.0.0.1:{free_port()}?timeout=1", block_nbytes=BN)


def test_rendezvous_hashing_balances_and_moves_only_a_removed_members_keys() -> None:
    from kvbm_fs.tiers.peer.pool import rendezvous

    seeds = np.array([11, 22, 33, 44], np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    hashes = chain(NS_A, 8000).hashes
    owner = rendezvous(hashes, seeds)
    counts = np.bincount(owner, minlength=4)
    assert counts.min() > 0.9 * 2000 and counts.max() < 1.1 * 2000, counts
    kept = np.array([0, 1, 3])  # member 2 leaves
    again = kept[rendezvous(hashes, seeds[kept])]
    assert (again[owner != 2] == owner[owner != 2]).all()  # nobody else's keys move


@pytest.mark.parametrize("op", ["get", "put"])
def test_a_peer_killed_mid_operation_is_a_miss_not_a_hang(monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    """The peer process dies after the control round trip, before the UCX transfer (NIXL raises
    nixlRemoteDisconnectError there): a miss or a dropped put, ended by NIXL's error rather than
    by waiting out the tier's timeout."""
    import os
    import signal

    proc = subprocess.Popen([sys.executable, "-c", PEER_PROCESS, str(16 * BN), str(BN)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    t = PeerTier(_read_url(proc), BN, timeout=3.0)
    try:
        t.bind_namespace(NS_A)
        keys = chain(NS_A, 4, start=9500)
        assert t.put(keys, blocks_for(keys, BN)).all()
        real = t._transfer

        def kill_first(op: str, local: Any, remote: Any) -> None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            real(op, local, remote)

        why: list[str] = []  # how each failed transfer ended, as the tier tells it
        failed = t._transfer_failed

        def note(reason: str) -> None:
            why.append(reason)
            failed(reason)

        monkeypatch.setattr(t, "_transfer", kill_first)
        monkeypatch.setattr(t, "_transfer_failed", note)
        out = np.full((4, BN), 0xAB, np.uint8)
        if op == "get":
            assert not t.get(keys, out).any()
        else:
            more = chain(NS_A, 4, start=9600)
            assert not t.put(more, blocks_for(more, BN)).any() and t.stats()["dropped_puts"] == 4
        assert t.stats()["transfer_errors"] == 1
        # NIXL reported the dead peer: the tier did not poll the transfer to its deadline ("timed out")
        assert len(why) == 1 and "timed out" not in why[0], why
    finally:
        t.close()
        if proc.poll() is None:
            proc.kill()


def test_a_peer_whose_tier_was_closed_under_it_is_a_miss_for_its_clients(peer: _ServedPeerTier) -> None:
    keys = chain(NS_A, 2, start=9900)
    assert peer.put(keys, blocks_for(keys, BN)).all()
    peer.server.tier.close()  # the serving process shuts its tier before its server
    out = np.zeros((2, BN), np.uint8)
    assert not peer.get(keys, out).any() and not peer.put(keys, blocks_for(keys, BN)).any()
    assert not peer.contains(keys).any()


def test_a_peer_restarted_with_another_token_is_a_miss_not_an_exception() -> None:
    t = served(8, breaker_threshold=1, breaker_cooldown=0.1, timeout=2.0)
    t.bind_namespace(NS_A)
    keys = chain(NS_A, 2, start=9950)
    try:
        assert t.put(keys, blocks_for(keys, BN)).all()
        port, tier = t.server.port, t.server.tier
        t.server.close()
        t.server = PeerServer(tier, port=port, token="rotated")
        out = np.zeros((2, BN), np.uint8)
        for _ in range(3):
            time.sleep(0.15)
            assert not t.get(keys, out).any() and not t.contains(keys).any()
        assert t._sock is None  # no half-open connection is kept after a refused handshake
    finally:
        t.close()


def test_closing_a_store_persists_its_own_blocks_but_not_a_shared_peers(tmp_path: Path) -> None:
    from kvbm_fs.mount import mount

    with PeerServer(HostTier(32 * BN, BN)) as srv:
        theirs = chain(NS_A, 5, start=11000)  # another instance's blocks, in the shared peer
        other = PeerTier(srv.url, BN)
        other.bind_namespace(NS_A)
        assert other.put(theirs, blocks_for(theirs, BN)).all()
        other.close()
        urls = ("host://?capacity=1MiB", srv.url, f"file://{tmp_path}/disk?capacity=4MiB")
        mine = chain(NS_A, 3, start=12000)
        with mount(*urls, layout=NS_A.layout, model=NS_A.model, tenant=NS_A.tenant, env={}) as store:
            assert store.put(mine, blocks_for(mine, BN)).all()
        with mount(urls[2], layout=NS_A.layout, model=NS_A.model, tenant=NS_A.tenant, env={}) as disk:
            assert disk.match(mine).length == 3 and disk.match(theirs).length == 0
        assert srv.tier.contains(theirs).all()
        srv.tier.close()


def test_the_peer_watches_its_clients_connections_with_tcp_keepalive(peer: _ServedPeerTier) -> None:
    import socket

    conns = list(peer.server._conns)
    assert conns
    for c in conns:
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert c.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30


def test_a_server_listening_on_every_interface_advertises_this_hosts_name() -> None:
    import socket

    with PeerServer(HostTier(4 * BN, BN), host="0.0.0.0") as srv:
        assert srv.url == f"peer://{socket.gethostname()}:{srv.port}"
        t = PeerTier(f"peer://127.0.0.1:{srv.port}", BN)  # and it is reachable on loopback too
        t.close()
        srv.tier.close()


def test_the_served_tiers_admission_filter_decides_a_peers_put() -> None:
    server = PeerServer(HostTier(16 * BN, BN, name="exported", policy="lru+count2"))
    t = PeerTier(server.url, BN)
    try:
        keys = chain(NS_A, 3)
        t.bind_namespace(NS_A)
        assert not t.put(keys, blocks_for(keys, BN)).any()  # first offer: refused, as a local put would be
        assert t.put(keys, blocks_for(keys, BN)).all() and server.tier.contains(keys).all()
    finally:
        t.close()
        server.close()
        server.tier.close()
