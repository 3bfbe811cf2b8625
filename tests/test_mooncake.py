"""The mooncake:// tier against a real mooncake_master on 127.0.0.1 (started here, on free ports).

Conformance, two processes sharing blocks through one master, a master killed and restarted, a
segment holder killed, damaged and foreign blocks, URL checks, and a clean exit with NIXL loaded.
"""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any
from unittest.mock import Mock

import numpy as np
import pytest

if importlib.util.find_spec("mooncake") is None:  # not imported here: the tier pins the host's rdma-core first
    pytest.skip("the mooncake extra is not installed", allow_module_level=True)

from kvbm_fs import codec
from kvbm_fs.errors import ConfigError, KvbmError, UnknownSchemeError
from kvbm_fs.events import VERIFY, EventBus, EventKind
from kvbm_fs.registry import open_tier
from kvbm_fs.testing import LAYOUT, NS_A, EventRecorder, TierTests, blocks_for, chain, keyset
from kvbm_fs.tiers.mooncake import MooncakeConfig, MooncakeMaster, MooncakeTier
from kvbm_fs.tiers.mooncake.client import key_strings

NB = LAYOUT.block_nbytes
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def master() -> Iterator[MooncakeMaster]:
    """One master for the module, and one tier held open on it: the tiers the tests open join the pool
    through the same client (leaving the pool takes Mooncake about 2 s, paid once here)."""
    with MooncakeMaster(lease_ms=200, extra=["--client_ttl=2"]) as m:
        keeper = open_mc(m)
        yield m
        keeper.close()


def open_mc(m: MooncakeMaster, events: EventBus | None = None, **opts: Any) -> MooncakeTier:
    """A tier on ``m`` under a prefix of its own (tests share the master, never each other's keys)."""
    q = {"prefix": f"t{next(_prefixes)}", "segment": "16MiB", "local_buffer": "4MiB", "staging": 16 * (NB + 128),
         "breaker_cooldown": "0.2", **opts}  # fmt: skip
    url = m.url + "".join(f"&{k}={v}" for k, v in q.items())
    t = open_tier(url, block_nbytes=NB, block_size=LAYOUT.block_size, events=events)
    assert isinstance(t, MooncakeTier)
    return t


class TestMooncakeConformance(TierTests):
    state_machine_examples = 10

    @pytest.fixture(autouse=True)
    def _master(self, master: MooncakeMaster) -> None:
        self.master = master

    def make_tier(self, capacity_blocks: int, block_nbytes: int, events: EventBus) -> MooncakeTier:
        assert block_nbytes == NB
        return open_mc(self.master, events, capacity=capacity_blocks * (block_nbytes + codec.HEADER_SIZE))


def test_keys_are_built_per_batch_and_parse_back() -> None:
    hs = np.array([0, 1, 0xFFFFFFFFFFFFFFFF], np.uint64)
    assert key_strings("p", 0xAB, hs) == [f"p/{0xAB:016x}/{h:016x}" for h in hs.tolist()]
    assert key_strings("p", 1, hs[:0]) == []


def test_urls_and_options_are_checked(master: MooncakeMaster) -> None:
    c = MooncakeConfig.parse("10.0.0.5", {})
    assert (c.master, c.metadata, c.admin, c.protocol, c.replicas) == (
        "10.0.0.5:50051", "http://10.0.0.5:8080/metadata", "10.0.0.5:9003", "tcp", 1)  # fmt: skip
    c = MooncakeConfig.parse(
        "h:1", {"protocol": "RDMA", "segment": "1GiB", "replicas": "2", "metadata": "P2PHANDSHAKE"}
    )
    assert (c.protocol, c.segment, c.replicas, c.metadata) == ("rdma", 1 << 30, 2, "P2PHANDSHAKE")
    for loc, opts in [("h:1", {"protocol": "udp"}), ("h:1", {"replicas": "0"}), ("h:1", {"replicas": "x"}),
                      ("h:1", {"segment": "lots"}), ("h:1", {"prefix": "a/b"}), ("h:1", {"bogus": "1"}),
                      ("h:99999", {}), ("", {}), ("h:1", {"metadata": "nowhere"})]:  # fmt: skip
        with pytest.raises(ConfigError):
            MooncakeConfig.parse(loc, opts)
    with pytest.raises(UnknownSchemeError):
        open_tier("mooncak://h:1", block_nbytes=NB)
    with pytest.raises(ConfigError):
        open_tier("mooncake://127.0.0.1:1?protocol=smoke", block_nbytes=NB)


def test_an_unreachable_master_is_a_typed_error_at_open() -> None:
    from kvbm_fs.tiers.mooncake.master import free_ports

    rpc, meta = free_ports(2)
    with pytest.raises(KvbmError) as e:
        open_tier(f"mooncake://127.0.0.1:{rpc}?metadata=http://127.0.0.1:{meta}/metadata&segment=0",
                  block_nbytes=NB)  # fmt: skip
    assert isinstance(e.value, ConnectionError)


def test_damaged_and_foreign_blocks_are_counted_misses(master: MooncakeMaster) -> None:
    rec = EventRecorder()
    t = open_mc(master, rec.bus)
    try:
        keys = chain(NS_A, 4)
        assert t.put(keys, blocks_for(keys, NB)).all()
        raw = t.client.store
        names = key_strings(t.cfg.prefix, keys.ns, keys.hashes)
        # block 1: a flipped payload byte; block 2: block 3's object under block 2's name; block 3: truncated
        obj = np.zeros(t.object_bytes, np.uint8)
        assert raw.get_into(names[1], obj.ctypes.data, obj.nbytes) == t.object_bytes
        obj[codec.HEADER_SIZE + 7] ^= 0xFF
        other = np.zeros(t.object_bytes, np.uint8)
        assert raw.get_into(names[3], other.ctypes.data, other.nbytes) == t.object_bytes
        assert raw.remove(names[1], True) == 0 and raw.put(names[1], obj.tobytes()) == 0
        assert raw.remove(names[2], True) == 0 and raw.put(names[2], other.tobytes()) == 0
        assert raw.remove(names[3], True) == 0 and raw.put(names[3], other[:1000].tobytes()) == 0
        out = np.full((4, NB), 0xAB, np.uint8)
        found = t.get(keys, out)
        assert found.tolist() == [True, False, False, False]
        assert (out[1:] == 0xAB).all()
        assert np.array_equal(out[0], blocks_for(keys[:1], NB)[0])
        failed = [e for e in rec.events if e.kind is EventKind.LOAD_FAILED and e.data == VERIFY]
        assert sum(len(e.keys) for e in failed) == 3
        assert t.stats()["load_failures"] == 3
        assert t.contains(keys).tolist() == [True, False, False, False]  # the damaged objects are removed
    finally:
        t.close()


def test_a_block_mooncake_dropped_is_a_miss_and_an_evicted_event(master: MooncakeMaster) -> None:
    rec = EventRecorder()
    t = open_mc(master, rec.bus)
    try:
        keys = chain(NS_A, 3)
        t.put(keys, blocks_for(keys, NB))
        t.client.store.remove(key_strings(t.cfg.prefix, keys.ns, keys.hashes[1:2])[0], True)  # as its eviction would
        out = np.zeros((3, NB), np.uint8)
        assert t.get(keys, out).tolist() == [True, False, True]
        assert rec.keys(EventKind.EVICTED) == keyset(keys[1:2])
    finally:
        t.close()


SHARER = textwrap.dedent(
    """
    import sys, numpy as np
    from kvbm_fs.nixl_api import available
    print("nixl", available(), flush=True)  # NIXL's UCX and Mooncake's libibverbs in one process
    from kvbm_fs.registry import open_tier
    from kvbm_fs.testing import LAYOUT, NS_A, blocks_for, chain
    t = open_tier(sys.argv[1], block_nbytes=LAYOUT.block_nbytes, block_size=LAYOUT.block_size)
    keys = chain(NS_A, 6, start=int(sys.argv[2]))
    if sys.argv[3] == "put":
        assert t.put(keys, blocks_for(keys, LAYOUT.block_nbytes)).all()
        print("stored", flush=True)
        sys.stdin.readline()  # hold the segment until told
    else:
        out = np.zeros((6, LAYOUT.block_nbytes), np.uint8)
        found = t.get(keys, out)
        assert found.all(), found
        assert np.array_equal(out, blocks_for(keys, LAYOUT.block_nbytes))
        print("loaded", flush=True)
        sys.exit(0)  # leaves the pool at exit, without close()
    t.close()
    """
)


def _url(m: MooncakeMaster, prefix: str) -> str:
    return m.url + f"&prefix={prefix}&segment=16MiB&local_buffer=4MiB&breaker_cooldown=0.2"


def test_two_processes_share_blocks_through_one_master(master: MooncakeMaster) -> None:
    """One process stores, another loads them bit-exact; both exit 0 with NIXL loaded beside Mooncake
    (the writer closes its tier, the reader just exits)."""
    url = _url(master, f"share{next(_prefixes)}")
    writer = subprocess.Popen([sys.executable, "-c", SHARER, url, "7", "put"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert writer.stdout is not None and writer.stdout.readline().startswith("nixl")
        assert writer.stdout.readline().strip() == "stored"
        reader = subprocess.run([sys.executable, "-c", SHARER, url, "7", "get"], capture_output=True, text=True,
                                timeout=180)  # fmt: skip
        assert reader.returncode == 0, reader.stderr[-2000:]
        assert "loaded" in reader.stdout and "nixl True" in reader.stdout
    finally:
        assert writer.stdin is not None
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.wait(60) == 0


def test_a_dead_segment_holder_gives_misses_not_errors() -> None:
    """A holder process stores 6 blocks while its segment is the pool's only one, so they live there; a
    second client joins; the holder is SIGKILLed. Its blocks are misses (failed transfers, then gone
    once the master drops the client after its TTL), never an exception; puts that Mooncake places on
    the dead segment meanwhile are refused (False); afterwards a put succeeds whole."""
    with MooncakeMaster(lease_ms=200, extra=["--client_ttl=2"]) as m:
        holder = subprocess.Popen([sys.executable, "-c", SHARER, _url(m, "seg"), "40", "put"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert holder.stdout is not None and holder.stdout.readline().startswith("nixl")
        assert holder.stdout.readline().strip() == "stored"
        t = open_mc(m, prefix="seg")
        try:
            keys = chain(NS_A, 6, start=40)
            out = np.zeros((6, NB), np.uint8)
            assert t.get(keys, out).all()  # the holder's segment serves them
            holder.kill()
            holder.wait()
            out[:] = 0xAB
            assert not t.get(keys, out).any()
            assert (out == 0xAB).all()
            deadline = time.monotonic() + 30
            n = 0
            while t.contains(keys).any():  # until the master drops the dead client (its TTL: 2 s here)
                assert time.monotonic() < deadline, f"the master still lists the dead holder's blocks: {t.stats()}"
                n += 1
                some = chain(NS_A, 4, start=1000 * n)
                t.put(some, blocks_for(some, NB))  # refused where Mooncake placed blocks on the dead segment
                time.sleep(0.2)
            mine = chain(NS_A, 4, start=900)
            assert t.put(mine, blocks_for(mine, NB)).all()
            assert t.get(mine, np.zeros((4, NB), np.uint8)).all()
            assert t.breaker.state == "closed"  # the master answered all along
        finally:
            t.close()


def test_a_killed_master_gives_misses_and_refused_puts_then_recovers() -> None:
    with MooncakeMaster(lease_ms=200) as m:
        rec = EventRecorder()
        t = open_mc(m, rec.bus, breaker_threshold=2)
        try:
            keys = chain(NS_A, 4)
            assert t.put(keys, blocks_for(keys, NB)).all()
            m.kill()
            out = np.full((4, NB), 0xAB, np.uint8)
            for _ in range(3):  # answered at once (RPC fails), and the breaker opens
                assert not t.get(keys, out).any()
                assert not t.contains(keys).any()
            assert (out == 0xAB).all()
            assert t.breaker.state != "closed"
            assert not t.put(keys, blocks_for(keys, NB)).any()  # refused without waiting on the master
            assert rec.keys(EventKind.STORE_FAILED) >= keyset(keys)
            m.start()
            deadline = time.monotonic() + 30
            again = chain(NS_A, 4, start=500)
            while time.monotonic() < deadline:
                if t.put(again, blocks_for(again, NB)).all():
                    break
                time.sleep(0.3)
            else:
                raise AssertionError(f"the tier did not recover: {t.stats()}")
            assert t.breaker.state == "closed"
            assert t.get(again, np.zeros((4, NB), np.uint8)).all()
            assert not t.get(keys, out).any()  # a restarted master holds nothing: misses
        finally:
            t.close()


def test_a_store_spills_into_mooncake_and_a_fresh_store_loads_from_it(master: MooncakeMaster) -> None:
    """Through ``mount``, with the tier as a config table (sizes as ints): a store saves a 10-block prompt
    into Mooncake (and a batch larger than its 4-block host tier spills there); a fresh store (its host
    tier empty) matches all 10 in Mooncake and loads them bit-exact."""
    from kvbm_fs import mount

    table = {"url": master.url, "prefix": f"store{next(_prefixes)}", "segment": 16 << 20, "local_buffer": 4 << 20}
    host = f"host://?capacity={4 * NB}"
    keys = chain(NS_A, 10)
    data = blocks_for(keys, NB)
    with mount(host, table, layout=LAYOUT, model=NS_A.model, tenant=NS_A.tenant, env={}) as one:
        assert one.default_namespace == NS_A
        assert [t.name for t in one.tiers] == ["host", "mooncake"]
        assert one.put(keys, data, tier="mooncake").all()
        more = chain(NS_A, 6, start=500)
        assert one.put(more, blocks_for(more, NB)).all()
        assert one.tier("mooncake").contains(more).any()  # what the host tier could not take
    with mount(host, table, layout=LAYOUT, model=NS_A.model, tenant=NS_A.tenant, env={}) as two:
        m = two.match(keys)
        assert m.length == 10 and m.runs == (("mooncake", 0, 10),)
        out = np.zeros_like(data)
        assert two.get(keys, out, m).all()
        assert np.array_equal(out, data)


def test_the_daemon_trims_a_bounded_mooncake_tier_above_another(
    master: MooncakeMaster, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``capacity=`` above another tier, the daemon attached (no eviction on put): ``coldest`` names what
    eviction would take next (oldest written first, never a pinned block) and the daemon demotes it,
    so the tier stays under its high watermark and keeps taking puts; every block stays readable."""
    from kvbm_fs import Store
    from kvbm_fs.daemon import DaemonConfig, PlacementDaemon
    from kvbm_fs.tiers.remote import RemoteTier

    cap = 20  # blocks; marks 0.90 / 0.75: 18 / 15
    upper = open_mc(master, capacity=cap * (NB + codec.HEADER_SIZE))
    lower = RemoteTier(f"file://{tmp_path}/lower", NB, name="lower")
    lower.bind_namespace(NS_A)
    keys = chain(NS_A, 3 * cap)
    data = blocks_for(keys, NB)
    for i in range(cap):  # one put each: block 0 is the oldest written
        assert upper.put(keys[i : i + 1], data[i : i + 1]).all()
    assert upper.pin(keys[1:2]).all()
    assert [h for b in upper.coldest(3) for h in b.hashes.tolist()] == keys.hashes[[0, 2, 3]].tolist()
    assert len(upper) == cap and upper.contains(keys[:cap]).all()  # nothing removed
    upper.unpin(keys[1:2])
    with monkeypatch.context() as patch:  # the admin server is down: no victims, and the count stands
        patch.setattr("kvbm_fs.tiers.mooncake.tier.list_keys", Mock(side_effect=OSError("down")))
        assert upper.coldest(3) == [] and len(upper) == cap and upper.counters["list_errors"] == 1
    store = Store([upper, lower], NS_A)
    daemon = PlacementDaemon(store, DaemonConfig.from_dict({"promote": False, "prefetch": False})).attach()
    try:
        for i in range(cap, len(keys)):
            assert store.put(keys[i : i + 1], data[i : i + 1]).all()
            daemon.run_once()
            assert len(upper) <= 0.9 * cap
        assert upper.contains(keys[-cap // 2 :]).all() and not upper.contains(keys[:cap]).any()
        assert lower.contains(keys[:cap]).all() and daemon.counters["kept_blocks"] == 0
        in_upper, in_lower = upper.contains(keys), lower.contains(keys)
        assert (in_upper | in_lower).all() and not (in_upper & in_lower).any()  # moved, not copied
        m = store.match(keys)
        out = np.zeros_like(data)
        assert m.length == len(keys) and store.get(keys, out, m).all() and np.array_equal(out, data)
    finally:
        for b in upper.iter_keys():
            upper.delete(b)
        store.close(persist=False)


def soft_pinned(m: MooncakeMaster) -> int:
    """How many keys the master holds soft-pinned (its metric)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{m.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return int(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("master_soft_pin_key_count")))


@pytest.fixture
def own_master() -> Iterator[MooncakeMaster]:
    """A master whose pool holds only this test's objects (the module's pool is fragmented by 8 KiB
    objects of the other tests, where Mooncake then refuses 256 KiB puts instead of evicting)."""
    with MooncakeMaster(lease_ms=200, extra=["--client_ttl=2"]) as m:
        yield m


def test_retained_blocks_are_soft_pinned_and_outlive_eviction_pressure(own_master: MooncakeMaster) -> None:
    """prepopulate --retain on Mooncake: blocks written back soft-pinned, which the master evicts only
    when nothing else can go (its default, --allow_evict_soft_pinned_objects=true); undo unpins them.
    256 KiB blocks, so that twice the 16 MiB pool is a few puts."""
    from kvbm_fs import KVLayout, Namespace

    master = own_master
    assert MooncakeConfig.parse("h:1", {"retain_ttl": "3600"}).retain_ttl == 3600.0
    for bad in ("0", "-1", "inf", "x"):
        with pytest.raises(ConfigError, match="retain_ttl"):
            MooncakeConfig.parse("h:1", {"retain_ttl": bad})
    big = Namespace("retain", KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16"))
    nb = big.block_nbytes
    url = master.url + f"&prefix=r&segment=16MiB&local_buffer=4MiB&staging={16 * (nb + 128)}"
    t = open_tier(url, block_nbytes=nb, block_size=16)
    assert isinstance(t, MooncakeTier)

    def churn(start: int) -> None:
        keys = chain(big, 128, start=start)  # 32 MiB of everyday traffic
        for a in range(0, 128, 16):
            t.put(keys[a : a + 16], blocks_for(keys[a : a + 16], nb))

    def listed(keys: Any) -> np.ndarray:
        return np.isin(keys.hashes, t._listed().get(big.id, np.zeros(0, np.uint64)))

    def bounded_tier() -> MooncakeTier:
        b = open_tier(url.replace("prefix=r", "prefix=rc") + f"&capacity={8 * (nb + codec.HEADER_SIZE)}",
                      block_nbytes=nb, block_size=16)  # fmt: skip
        assert isinstance(b, MooncakeTier)
        return b

    bounded = [bounded_tier(), bounded_tier()]
    try:
        warm, cold = chain(big, 6, start=1), chain(big, 6, start=100)
        assert t.put(warm, blocks_for(warm, nb)).all() and t.put(cold, blocks_for(cold, nb)).all()
        with pytest.raises(ConfigError, match="retain share"):
            t.retain(big.id, 1.5)
        assert t.retain(big.id, 0.25, warm.hashes[::-1]) == 6  # budget: 15 of the 63 blocks the segment holds
        assert t.retained() == {"marks": {big.id: 0.25}, "blocks": 6, "budget": 15}
        assert t._repin(big.id, cold.hashes, False).size == 6  # the control: read and written back, unpinned
        for r in range(10):  # 32 MiB a round through the 16 MiB pool, until Mooncake evicted the control
            churn(1000 + 200 * r)
            time.sleep(0.5)  # it evicts on its own schedule; a full pool refuses puts till then
            if not listed(cold).any():  # the master's key list: an existence check would count as a use
                break
        assert listed(warm).all() and not listed(cold).any()
        out = np.zeros((6, nb), np.uint8)
        assert t.get(warm, out).all() and np.array_equal(out, blocks_for(warm, nb))  # verified, intact
        assert soft_pinned(master) == 6 + 1  # and the namespace's mark
        assert t.retain(big.id, None) == 6  # undo: what the mark names, written back unpinned
        assert t.retained()["marks"] == {} and soft_pinned(master) == 0
        assert t.retain(big.id, 0.01, warm.hashes) == 0  # budget: 0 of 63
        t2 = open_tier(url + "&retain_ttl=200000", block_nbytes=nb, block_size=16)  # 55 h: over the master's cap
        assert isinstance(t2, MooncakeTier)
        with pytest.raises(ConfigError, match="max_kv_soft_pin_ttl"):
            t2.retain(big.id, 0.25, warm.hashes)
        t2.close()
        t.retain(big.id, None)
        for keys in t.iter_keys():
            t.delete(keys)

        # capacity=: the tier's own eviction spares them too, in another instance (the mark names them)
        w2 = chain(big, 4, start=500)
        for i in range(4):  # one put each: w2[0] is the oldest written
            assert bounded[0].put(w2[i : i + 1], blocks_for(w2[i : i + 1], nb)).all()
        assert bounded[0].retain(big.id, 0.5, w2.hashes) == 4  # budget: 4 of 8
        for a in range(0, 16, 4):
            keys = chain(big, 4, start=600 + a)
            assert bounded[1].put(keys, blocks_for(keys, nb)).all()
        assert bounded[1].contains(w2).all() and len(bounded[1]) == 8
        # a smaller share pins nothing more; past its budget (2 of 8) the oldest written retained go first
        assert bounded[0].retain(big.id, 0.25, w2.hashes) == 0
        new = chain(big, 6, start=700)
        for a, b in ((0, 4), (4, 6)):  # the second put finds the prefix over its capacity (12 + 2 of 8)
            assert bounded[0].put(new[a:b], blocks_for(new[a:b], nb)).all()
        assert bounded[0].contains(w2).tolist() == [False, False, True, True] and bounded[0].contains(new).all()
        assert len(bounded[0]) == 8
        assert bounded[1].retain(big.id, None) == 2
    finally:
        for tier in (t, *bounded):
            for keys in tier.iter_keys():
                tier.delete(keys)
            tier.close()
