"""G4 remote tier with NIXL OBJ as its S3 data path (``io=nixl``), against a real S3 protocol server.

Block objects move through NIXL's OBJ backend; manifests, listing, HEADs and deletes stay on s3fs.
The same tier must pass the conformance suite, share a bucket with an ``io=s3fs`` tier in another
process, turn every proxy fault into misses and dropped writes, detect and remove damaged objects,
and refuse bad configuration at open time.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from remote_helpers import BN, DAMAGE, FAST, cool_down, object_name, untouched_misses, write_config, writer_report

from kvbm_fs import mount
from kvbm_fs.codec import HEADER_SIZE
from kvbm_fs.errors import ConfigError
from kvbm_fs.events import EventBus, EventKind
from kvbm_fs.testing import LAYOUT, NS_A, EventRecorder, TierTests, blocks_for, chain, keyset, require_nixl
from kvbm_fs.testing.proxy import FAULTS, FaultProxy
from kvbm_fs.tier import Tier
from kvbm_fs.tiers.remote import RemoteTier

pytest.importorskip("s3fs")
require_nixl()


# ---- helpers ---------------------------------------------------------------------------------------
def open_nixl(
    moto_s3: Any, url: str, endpoint: str | None = None, events: EventBus | None = None, **kw: Any
) -> RemoteTier:
    so = moto_s3.storage_options(endpoint)
    t = RemoteTier(url, BN, events=events, storage_options=so, io="nixl", **{**FAST, **kw})
    t.bind_namespace(NS_A)
    return t


# ---- conformance -------------------------------------------------------------------------------------
class TestRemoteTierS3Nixl(TierTests):
    """The core suite, unchanged, with block objects moved by NIXL OBJ."""

    state_machine_examples = 10
    bucket = ""

    @pytest.fixture(autouse=True)
    def _s3(self, moto_s3: Any) -> None:
        self.s3 = moto_s3
        if not type(self).bucket:
            type(self).bucket = moto_s3.create_bucket(f"conf-nixl-{uuid.uuid4().hex[:8]}")

    def make_tier(self, capacity_blocks: int, block_nbytes: int, events: EventBus) -> Tier:
        self.url = f"s3://{self.bucket}/t{uuid.uuid4().hex[:8]}"
        return RemoteTier(self.url, block_nbytes, capacity_blocks * (HEADER_SIZE + block_nbytes), events=events,
                          storage_options=self.s3.storage_options(), io="nixl")  # fmt: skip

    def reopen(self, tier: Tier) -> Tier | None:
        assert isinstance(tier, RemoteTier) and tier.io == "nixl"
        tier.close()
        return RemoteTier(self.url, tier.block_nbytes, tier.capacity_bytes, storage_options=self.s3.storage_options(),
                          io="nixl")  # fmt: skip


def test_block_objects_go_through_nixl_and_stats_say_so(moto_s3: Any, bucket: str, prefix: str) -> None:
    t = open_nixl(moto_s3, f"s3://{bucket}/{prefix}")
    keys = chain(NS_A, 6)
    assert t.put(keys, blocks_for(keys, BN)).all()
    assert untouched_misses(t, keys).all()
    nixl = t._nixl.counters
    assert nixl["puts"] == 6 and nixl["gets"] == 6, "the bytes moved through NIXL, not s3fs"
    s = t.stats()
    assert s["io"] == "nixl" and s["get_errors"] == s["put_errors"] == 0
    assert "io='nixl'" in repr(t)
    # the objects are ordinary S3 objects in the documented layout
    body = moto_s3.client().get_object(Bucket=bucket, Key=object_name(prefix, keys, 2))["Body"].read()
    assert len(body) == HEADER_SIZE + BN and body[HEADER_SIZE:] == blocks_for(keys, BN)[2].tobytes()
    t.close()


def test_a_missed_read_is_a_clean_miss(moto_s3: Any, bucket: str, prefix: str) -> None:
    rec = EventRecorder()
    t = open_nixl(moto_s3, f"s3://{bucket}/{prefix}", events=rec.bus)
    keys = chain(NS_A, 8)
    assert t.put(keys[::2], blocks_for(keys[::2], BN)).all()
    assert untouched_misses(t, keys).tolist() == [True, False] * 4
    s = t.stats()
    assert s["get_errors"] == 0 and s["retries"] == 0 and s["load_failures"] == 0
    assert not rec.keys(EventKind.LOAD_FAILED) and t.breaker.state == "closed"
    t.close()


# ---- sharing with io=s3fs, across processes ----------------------------------------------------------
@pytest.mark.parametrize("writer_io, reader_io", [("nixl", "s3fs"), ("s3fs", "nixl")])
def test_writer_and_reader_on_different_data_paths_share_the_bucket(
    writer_io: str, reader_io: str, moto_s3: Any, bucket: str, tmp_path: Path
) -> None:
    n, seed = 12, 11
    url = f"s3://{bucket}/shared-{uuid.uuid4().hex[:6]}"
    so = moto_s3.storage_options()
    cfg_w = write_config(tmp_path / "writer.toml", {"url": url, "io": writer_io, "storage_options": so})
    report = writer_report(cfg_w, n, seed)
    assert report["stored"] == n and report["io"] == writer_io

    with mount({"url": f"{url}?io={reader_io}", "storage_options": so}, layout=LAYOUT, model="shared-model",
               env={}) as b:  # fmt: skip
        assert b.stats()["tiers"][0]["io"] == reader_io
        tokens = np.random.default_rng(seed).integers(0, 50_000, n * 16)
        keys = b.keys(tokens)
        m = b.match(keys)
        assert m.length == n
        out = np.zeros((n, BN), np.uint8)
        assert b.get(keys, out, m).all()
        want = np.random.default_rng(seed + 1).integers(0, 256, (n, BN), dtype=np.uint8)
        assert np.array_equal(out, want), "bit-exact across data paths"


# ---- faults through the proxy ------------------------------------------------------------------------
@pytest.mark.parametrize("fault", FAULTS)
def test_transient_fault_is_absorbed_by_retries(
    fault: str, moto_s3: Any, bucket: str, prefix: str, proxy: FaultProxy
) -> None:
    rec = EventRecorder()
    t = open_nixl(moto_s3, f"s3://{bucket}/{prefix}", proxy.endpoint, rec.bus, timeout=1.0 if fault == "stall" else 5)
    keys = chain(NS_A, 4)
    proxy.inject(fault, 2, method="PUT")
    assert t.put(keys, blocks_for(keys, BN)).all()
    proxy.inject(fault, 2, method="GET")
    assert untouched_misses(t, keys).all()
    assert proxy.injected[fault] == 4, "every planned fault hit a request"
    assert not rec.keys(EventKind.LOAD_FAILED) and not rec.keys(EventKind.STORE_FAILED)
    s = t.stats()
    assert s["get_errors"] == s["put_errors"] == 0 and s["retries"] >= 2
    assert s["breaker"] == "closed" and s["breaker_trips"] == 0
    t.close()


@pytest.mark.parametrize("fault", FAULTS)
def test_persistent_fault_gives_misses_and_dropped_puts(
    fault: str, moto_s3: Any, bucket: str, prefix: str, proxy: FaultProxy
) -> None:
    rec = EventRecorder()
    t = open_nixl(moto_s3, f"s3://{bucket}/{prefix}", proxy.endpoint, rec.bus, timeout=0.3, retries=1)
    stored, new = chain(NS_A, 3), chain(NS_A, 2, start=100)
    assert t.put(stored, blocks_for(stored, BN)).all()

    proxy.stall_seconds = 120  # far past the tier's 0.3 s timeouts; proxy.close() ends it at once
    proxy.fail_always(fault)
    proxy.reset_counts()
    assert not untouched_misses(t, stored).any()
    assert not t.put(new, blocks_for(new, BN)).any()
    assert not t.contains(stored).any() and t.prefix_len(stored) == 0
    assert not t.delete(new).any()  # nothing raised into the caller anywhere above
    # bounded by timeouts and retries: every stalled request was still held when the calls returned
    # (a call that waited for the proxy to end a stall would find it counted)
    assert proxy.stalls_waited_out == 0 and proxy.stalled == proxy.injected["stall"]
    if fault != "reset":  # (a reset connection may be resent by the HTTP client)
        assert proxy.count("GET", 3 * 2) == 3 * 2, "1 + retries tries per block, no more"

    s = t.stats()
    assert s["get_errors"] == 3 and s["put_errors"] == 2
    assert rec.keys(EventKind.LOAD_FAILED) == keyset(stored)
    assert rec.keys(EventKind.STORE_FAILED) == keyset(new)
    if fault == "stall":
        assert s["nixl_timeouts"] > 0 and proxy.stalled > 0

    proxy.fail_always(None)  # the endpoint is back: what was stored is intact, what was dropped is absent
    assert untouched_misses(t, stored).all()
    assert not t.contains(new).any()
    t.close()


@pytest.mark.parametrize("fault", ["503", "stall"])
def test_breaker_opens_stops_requests_probes_and_closes(
    fault: str, moto_s3: Any, bucket: str, prefix: str, proxy: FaultProxy
) -> None:
    cooldown = 600.0  # "open" holds however slow the machine is; cool_down() ends it where the test says
    # a stall must time out; 2 s leaves a loaded 2-core box room for the calls that should pass
    timeout = 2.0 if fault == "stall" else 5
    t = open_nixl(moto_s3, f"s3://{bucket}/{prefix}", proxy.endpoint, retries=0, breaker_threshold=3,
                  breaker_cooldown=cooldown, timeout=timeout)  # fmt: skip
    keys = chain(NS_A, 8)
    assert t.put(keys, blocks_for(keys, BN)).all()

    proxy.fail_always(fault)
    for _ in range(3):
        assert not untouched_misses(t, keys[:1]).any()
    assert t.breaker.state == "open" and t.stats()["breaker_trips"] == 1

    proxy.reset_counts()  # open: nothing is sent
    assert not untouched_misses(t, keys).any()
    assert not t.put(chain(NS_A, 2, start=50), blocks_for(chain(NS_A, 2, start=50), BN)).any()
    assert proxy.requests == 0
    assert t.stats()["skipped_open_breaker"] >= 8 + 2

    cool_down(t.breaker)
    proxy.reset_counts()
    assert not untouched_misses(t, keys).any()
    # one probe: its GET, and (when the GET failed without a timeout) the HEAD that asks whether it was a 404
    assert proxy.methods["GET"] == 1 and proxy.requests <= 2
    assert t.breaker.state == "open"

    proxy.fail_always(None)
    cool_down(t.breaker)
    proxy.reset_counts()
    assert untouched_misses(t, keys).tolist() == [True] + [False] * 7
    assert proxy.requests == 1 and t.breaker.state == "closed"
    assert untouched_misses(t, keys).all()
    t.close()


# ---- corruption --------------------------------------------------------------------------------------
def test_damaged_or_swapped_objects_are_detected_missed_and_removed(moto_s3: Any, bucket: str, prefix: str) -> None:
    rec = EventRecorder()
    c = moto_s3.client()
    t = open_nixl(moto_s3, f"s3://{bucket}/{prefix}", events=rec.bus)
    n_bad = len(DAMAGE) + 1  # every kind of damage, plus one object holding another key's block
    keys = chain(NS_A, n_bad + 1)
    assert t.put(keys, blocks_for(keys, BN)).all()
    names = [object_name(prefix, keys, i) for i in range(len(keys))]

    def read(name: str) -> bytes:
        return bytes(c.get_object(Bucket=bucket, Key=name)["Body"].read())

    def exists(name: str) -> bool:
        return bool(c.list_objects_v2(Bucket=bucket, Prefix=name)["KeyCount"])

    for name, damage in zip(names, DAMAGE.values()):
        c.put_object(Bucket=bucket, Key=name, Body=damage(read(name)))
    c.put_object(Bucket=bucket, Key=names[n_bad - 1], Body=read(names[n_bad]))

    assert untouched_misses(t, keys).tolist() == [False] * n_bad + [True]
    assert rec.keys(EventKind.LOAD_FAILED) == keyset(keys[:n_bad])
    s = t.stats()
    assert s["load_failures"] == n_bad and s["corrupt_removed"] == n_bad and s["get_errors"] == 0
    assert [exists(n) for n in names] == [False] * n_bad + [True], "bad objects are removed, the good one kept"

    rec.events.clear()
    assert untouched_misses(t, keys).tolist() == [False] * n_bad + [True]
    assert not rec.keys(EventKind.LOAD_FAILED), "once removed they are plain misses"
    t.close()


# ---- configuration -----------------------------------------------------------------------------------
def test_io_is_chosen_by_url_query_and_config_table(moto_s3: Any, bucket: str, prefix: str, tmp_path: Path) -> None:
    so = moto_s3.storage_options()
    url = f"s3://{bucket}/{prefix}"
    for tier, want in [
        ({"url": f"{url}?io=nixl", "storage_options": so}, "nixl"),
        ({"url": url, "io": "nixl", "storage_options": so}, "nixl"),
        ({"url": url, "storage_options": so}, "s3fs"),
        ({"url": url, "io": "s3fs", "storage_options": so}, "s3fs"),
        ({"url": url, "io": "auto", "storage_options": so}, "s3fs"),  # auto is s3fs (docs/architecture.md 1.9)
    ]:
        with mount(tier, layout=LAYOUT, model="io-choice", env={}) as s:
            assert s.stats()["tiers"][0]["io"] == want, tier
    cfg = write_config(tmp_path / "kvbm.toml", {"url": url, "io": "nixl", "storage_options": so})
    with mount(config=cfg, env={}) as s:
        assert s.stats()["tiers"][0]["io"] == "nixl"


@pytest.mark.parametrize(
    "tier, named",
    [
        ({"url": "s3://bucket/p?io=fast"}, "io must be one of"),
        ({"url": "s3://bucket/p", "io": "NIXL2"}, "io must be one of"),
        ({"url": "s3://bucket/p", "io": 3}, "io must be one of"),
        ({"url": "memory://kv?io=nixl"}, "needs an s3:// tier URL"),
        ({"url": "remote+file:///tmp/kvbm-nixl-x?io=nixl"}, "needs an s3:// tier URL"),
    ],
)
def test_bad_io_is_a_config_error_at_open(tier: dict[str, Any], named: str) -> None:
    tier = {**tier, "storage_options": {"endpoint_url": "http://127.0.0.1:9"}} if tier["url"].startswith("s3") else tier
    with pytest.raises(ConfigError, match=named):
        mount(tier, layout=LAYOUT, env={})
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        mount(tier, layout=LAYOUT, env={})


def test_nixl_not_installed_is_a_config_error(moto_s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for pkg in ("nixl_cu12", "nixl_cu13", "nixl_cu12._api", "nixl_cu13._api"):
        monkeypatch.setitem(sys.modules, pkg, None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="NIXL is not installed"):
        RemoteTier(f"s3://{bucket}/x", BN, storage_options=moto_s3.storage_options(), io="nixl", **FAST)


def test_anonymous_access_with_nixl_is_a_config_error(moto_s3: Any, bucket: str) -> None:
    with pytest.raises(ConfigError, match="anonymous"):
        RemoteTier(f"s3://{bucket}/x", BN, storage_options={"anon": True, "endpoint_url": moto_s3.endpoint},
                   io="nixl", **FAST)  # fmt: skip


def test_credentials_come_from_the_environment_as_for_s3fs(
    moto_s3: Any, bucket: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No key in the config: NIXL gets what botocore resolved for s3fs (here: AWS_* variables)."""
    from kvbm_fs.testing.s3 import ACCESS_KEY, SECRET_KEY

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    t = RemoteTier(f"s3://{bucket}/{prefix}", BN, storage_options={"endpoint_url": moto_s3.endpoint}, io="nixl",
                   **FAST)  # fmt: skip
    t.bind_namespace(NS_A)
    keys = chain(NS_A, 3)
    assert t.put(keys, blocks_for(keys, BN)).all() and untouched_misses(t, keys).all()
    assert t._nixl.counters["puts"] == 3
    t.close()
