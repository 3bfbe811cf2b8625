"""Retained blocks on a size-bounded remote tier (moto and SeaweedFS): a prepopulation's objects
outlive everyday traffic within a share of the capacity, for every instance on the bucket."""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Any

import numpy as np
import pytest
from remote_helpers import BN, FAST

from kvbm_fs import ConfigError, mount
from kvbm_fs import prepopulate as pp
from kvbm_fs.catalog import Catalog
from kvbm_fs.codec import HEADER_SIZE
from kvbm_fs.keys import BlockKeys, Namespace
from kvbm_fs.testing import NS_A, NS_B, blocks_for, chain
from kvbm_fs.tiers.remote import RemoteTier

pytest.importorskip("s3fs")
SLOTS = 12


@pytest.fixture
def url(s3_bucket: str) -> str:
    """A fresh prefix on each S3 server (moto, SeaweedFS): what the marks rely on, plain objects."""
    return f"s3://{s3_bucket}/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def moto_url(bucket: str) -> str:
    """A fresh prefix on moto: the rest is the tier's own logic, the same on any server."""
    return f"s3://{bucket}/{uuid.uuid4().hex[:8]}"


def _open(s3: Any, url: str, slots: int | None = SLOTS, **kw: Any) -> RemoteTier:
    cap = None if slots is None else slots * (HEADER_SIZE + BN)
    t = RemoteTier(url, BN, cap, storage_options=s3.storage_options(), **{**FAST, **kw})
    t.bind_namespace(NS_A)
    t.bind_namespace(NS_B)
    return t


def _put(t: RemoteTier, keys: BlockKeys) -> np.ndarray:
    return t.put(keys, blocks_for(keys, BN))


def _churn(t: RemoteTier, n: int = 2 * SLOTS, ns: Namespace = NS_A, seed: int = 1) -> BlockKeys:
    """Everyday traffic: ``n`` blocks, two a put; the tier must take every one."""
    keys = chain(ns, n, start=1000 * seed)
    for a in range(0, n, 2):
        assert _put(t, keys[a : a + 2]).all()
    return keys


def test_retained_objects_survive_churn_by_another_instance(s3_server: Any, url: str) -> None:
    a = _open(s3_server, url)
    warm = chain(NS_B, 6)
    assert _put(a, warm).all()
    assert a.retain(NS_B.id, 0.5, warm.hashes[:5]) == 5  # budget: 6 of 12 objects
    assert a.retain(NS_B.id, 0.5, warm.hashes[:5]) == 0  # a rerun marks nothing twice
    time.sleep(1.1)  # S3 keeps write times to the second: everyday traffic comes later
    b = _open(s3_server, url)  # another instance (or a restart): the marks live in the bucket
    everyday = _churn(b, ns=NS_B)  # the warmed model's own traffic is everyday traffic too
    assert b.contains(warm).tolist() == [True] * 5 + [False]  # the unmarked block was ordinary
    assert len(b) == SLOTS and b.contains(everyday).sum() == SLOTS - 5  # the rest serves everyday traffic
    assert b.retained() == {"marks": {NS_B.id: 0.5}, "blocks": 5, "budget": 6}
    a.close()
    b.close()


def test_beyond_the_share_the_oldest_retained_go_first(s3_server: Any, url: str) -> None:
    t = _open(s3_server, url)
    warm = chain(NS_B, 10)
    assert _put(t, warm[:4]).all()
    time.sleep(1.1)  # S3 keeps write times to the second: these four are older
    assert _put(t, warm[4:]).all()
    assert t.retain(NS_B.id, 0.5) == 10  # 10 retained, 6 allowed
    _churn(t)
    assert t.contains(warm).tolist() == [False] * 4 + [True] * 6
    assert t.retained()["blocks"] == 6
    t.close()


def test_undo_with_no_retain_and_with_rm(moto_s3: Any, moto_url: str) -> None:
    s3_server, url = moto_s3, moto_url
    t = _open(s3_server, url)
    warm = chain(NS_B, 5)
    _put(t, warm)
    t.retain(NS_B.id, 0.4)
    assert t.retain(NS_B.id, None) == 5
    assert t.retained()["marks"] == {}
    time.sleep(1.1)
    _churn(t)
    assert not t.contains(warm).any()  # ordinary again: the oldest went first

    _put(t, warm)
    t.retain(NS_B.id, 0.4)
    so = s3_server.storage_options()
    q = f"?endpoint_url={so['endpoint_url']}&key={so['key']}&secret={so['secret']}"
    with Catalog.open(url + q) as cat:
        row = next(r for r in cat.ls() if r["namespace"] == f"{NS_B.id:016x}")
        assert list(row["retained"].values()) == [0.4]  # what `kvbm-fs ls` shows
        assert cat.remove(cat.select(NS_B.short_id, None, None))["removed"] == 5
    assert _open(s3_server, url).retained()["marks"] == {}  # rm of the namespace took its marks
    t.close()


def test_marks_are_objects_beside_the_blocks(moto_s3: Any, moto_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s3_server, url = moto_s3, moto_url
    import kvbm_fs.tiers.remote.tier as rt

    t = _open(s3_server, url, slots=None)  # unbounded: marks kept, nothing to evict
    warm = chain(NS_B, 5)
    _put(t, warm)
    monkeypatch.setattr(rt, "CHUNK", 2)
    assert t.retain(NS_B.id, 0.3) == 5
    marks = [p for p in t.fs.find(t.root) if p.endswith(".retain")]
    assert len(marks) == 3  # millions of blocks: several objects, CHUNK hashes each
    assert len(t) == 5 and sorted(h for _, h, _ in t.list_blocks()) == sorted(warm.hashes.tolist())
    assert t.retained() == {"marks": {NS_B.id: 0.3}, "blocks": 5, "budget": None}
    t.fs.pipe(f"{t.root}/{NS_B.id:016x}/retain/0-junk.retain", b"not a mark")  # ignored, with a warning
    assert t.retain(NS_B.id, 0.2) == 0 and _open(s3_server, url).retained()["marks"] == {NS_B.id: 0.2}
    t.close()


def test_an_object_that_is_not_a_mark_is_read_once_until_it_changes(
    moto_s3: Any, moto_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every eviction lists the marks; a malformed one is fetched and warned about once per version
    (ETag, size, time as listed), not at every listing, and read again once it is rewritten."""
    from kvbm_fs.tiers.remote.retain import encode

    t = _open(moto_s3, moto_url)
    junk = f"{t.root}/{NS_B.id:016x}/retain/0-junk.retain"
    t.fs.pipe(junk, b"not a mark")
    reads: list[str] = []
    listings: list[int] = []
    read, scan = t._read_object, t._scan

    async def counted_read(path: str) -> Any:
        reads.append(path)
        return await read(path)

    def counted_scan() -> Any:
        listings.append(1)
        return scan()

    monkeypatch.setattr(t, "_read_object", counted_read)
    monkeypatch.setattr(t, "_scan", counted_scan)
    with caplog.at_level(logging.WARNING, logger="kvbm_fs.tiers.remote.tier"):
        _churn(t)  # 24 blocks into 12 slots: an eviction listing at each of the last 6 puts
        assert len(listings) >= 6 and t.counters["evictions"] == SLOTS
        assert reads.count(junk) == 1
        assert sum("0-junk.retain is not a retain mark" in r.getMessage() for r in caplog.records) == 1
        t.fs.pipe(junk, b"rewritten, still not a mark")
        _churn(t, seed=2)
        assert reads.count(junk) == 2
        assert sum("0-junk.retain is not a retain mark" in r.getMessage() for r in caplog.records) == 2
    t.fs.pipe(junk, encode(0.25, np.zeros(0, np.uint64)))  # rewritten as a mark: read and taken
    assert t.retained()["marks"] == {NS_B.id: 0.25} and reads.count(junk) == 3
    t.close()


def test_bad_shares_are_config_errors(moto_s3: Any, bucket: str) -> None:
    t = _open(moto_s3, f"s3://{bucket}/{uuid.uuid4().hex[:8]}")
    for share in (0, 1, 1.5, -0.1, math.nan, True, "0.3"):
        with pytest.raises(ConfigError, match="retain share"):
            t.retain(NS_B.id, share)  # type: ignore[arg-type]
    assert t.retained()["marks"] == {}
    t.close()


def test_prepopulate_retain_on_a_remote_tier(moto_s3: Any, bucket: str) -> None:
    from test_prepopulate import LAYOUT, FakeEngine, corpus

    so = moto_s3.storage_options()
    u = (f"s3://{bucket}/{uuid.uuid4().hex[:8]}?capacity=64KiB&endpoint_url={so['endpoint_url']}"
         f"&key={so['key']}&secret={so['secret']}")  # fmt: skip
    eng = FakeEngine(mount(u, layout=LAYOUT, model="fake", env={}))
    rep = pp.run(eng, corpus(list(range(40))), retain=True, retain_share=0.2)
    remote = eng.store.tiers[-1]
    assert isinstance(remote, RemoteTier)
    ns = eng.namespaces[0]
    assert rep.retained == {remote.name: 10} and remote.retained()["marks"] == {ns.id: 0.2}
    assert pp.run(eng, corpus(list(range(40))), retain=False).retained == {remote.name: 10}
    assert remote.retained()["marks"] == {}
    eng.close()


def test_retain_with_nixl_data_path(moto_s3: Any, bucket: str) -> None:
    """io=nixl moves block objects through NIXL OBJ; marks, listing and eviction stay on s3fs."""
    from kvbm_fs.testing import require_nixl

    require_nixl()
    url = f"s3://{bucket}/{uuid.uuid4().hex[:8]}"
    t = _open(moto_s3, url, io="nixl")
    warm = chain(NS_B, 4)
    assert _put(t, warm).all()
    assert t.retain(NS_B.id, 0.5) == 4
    _churn(t)
    assert t.contains(warm).all() and len(t) == SLOTS
    t.close()
