"""G4 remote tier under faults, corruption, foreign manifests, bad config, and with secrets to keep.

Faults go through :class:`~kvbm_fs.testing.proxy.FaultProxy`, a real TCP proxy between s3fs and a real
S3 protocol server (moto on 127.0.0.1).  Tier options use short timeouts and cool-downs so that each
test takes a second or two; nothing here asserts on elapsed time.
"""

from __future__ import annotations

import json
import logging
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from remote_helpers import BN, DAMAGE, FAST, cool_down, object_name, untouched_misses

from kvbm_fs import KVLayout, mount
from kvbm_fs.errors import ConfigError, FormatVersionError, LayoutMismatchError, UnknownSchemeError
from kvbm_fs.events import EventBus, EventKind
from kvbm_fs.testing import LAYOUT, NS_A, NS_B, EventRecorder, blocks_for, chain, keyset, require_nixl
from kvbm_fs.testing.proxy import FAULTS, FaultProxy
from kvbm_fs.testing.s3 import free_port
from kvbm_fs.tiers.remote import RemoteTier

pytest.importorskip("s3fs")


# ---- helpers ---------------------------------------------------------------------------------------
def fault_timeout(fault: str, stalled: float) -> float:
    """A short timeout only where the fault is a stall (a stalled request costs it); FAST's otherwise."""
    return stalled if fault == "stall" else float(FAST["timeout"])


def open_s3(moto_s3: Any, url: str, endpoint: str, events: EventBus | None = None, **kw: Any) -> RemoteTier:
    t = RemoteTier(url, BN, events=events, storage_options=moto_s3.storage_options(endpoint), **{**FAST, **kw})
    t.bind_namespace(NS_A)
    return t


# ---- transient and persistent faults ---------------------------------------------------------------
@pytest.mark.parametrize("fault", FAULTS)
def test_transient_fault_is_absorbed_by_retries(
    fault: str, s3_server: Any, s3_bucket: str, prefix: str, s3_proxy: FaultProxy
) -> None:
    rec = EventRecorder()
    t = open_s3(s3_server, f"s3://{s3_bucket}/{prefix}", s3_proxy.endpoint, rec.bus, timeout=fault_timeout(fault, 1.0))
    keys = chain(NS_A, 4)
    s3_proxy.inject(fault, 2, method="PUT")
    assert t.put(keys, blocks_for(keys, BN)).all()
    s3_proxy.inject(fault, 2, method="GET")
    assert untouched_misses(t, keys).all()
    s3_proxy.inject(fault, 2, method="HEAD")
    held = t.contains(keys)
    # a timed-out existence check is final (the scheduler waits on it): two misses, not two retries
    assert held.sum() == (2 if fault == "stall" else 4)
    assert s3_proxy.injected[fault] == 6, "every planned fault hit a request"
    assert not rec.keys(EventKind.LOAD_FAILED) and not rec.keys(EventKind.STORE_FAILED)
    s = t.stats()
    assert s["get_errors"] == s["put_errors"] == 0 and s["head_errors"] == (2 if fault == "stall" else 0)
    assert s["breaker"] == "closed" and s["breaker_trips"] == 0, "absorbed faults must not trip the breaker"


@pytest.mark.parametrize("fault", FAULTS)
def test_persistent_fault_gives_misses_and_dropped_puts(
    fault: str, s3_server: Any, s3_bucket: str, prefix: str, s3_proxy: FaultProxy
) -> None:
    rec = EventRecorder()
    # the breaker has its own test; here it must not open and turn the last reads into skips
    t = open_s3(s3_server, f"s3://{s3_bucket}/{prefix}", s3_proxy.endpoint, rec.bus, timeout=fault_timeout(fault, 0.3),
                retries=1, breaker_threshold=1000)  # fmt: skip
    stored, new = chain(NS_A, 3), chain(NS_A, 2, start=100)
    assert t.put(stored, blocks_for(stored, BN)).all()

    s3_proxy.fail_always(fault)
    s3_proxy.reset_counts()
    assert not untouched_misses(t, stored).any()
    if fault != "reset":  # (aiohttp itself resends once on a reset connection)
        assert s3_proxy.count("GET", 3 * 2) == 3 * 2, "one layer of retries: 1 + retries tries per block, no more"
    assert not t.put(new, blocks_for(new, BN)).any()
    assert not t.contains(stored).any()
    assert t.prefix_len(stored) == 0
    assert not t.delete(new).any()  # nothing raised into the caller anywhere above

    s = t.stats()
    assert s["get_errors"] == 3 and s["put_errors"] == 2 and s["head_errors"] >= 3 + 2
    assert rec.keys(EventKind.LOAD_FAILED) == keyset(stored)
    assert rec.keys(EventKind.STORE_FAILED) == keyset(new)

    s3_proxy.fail_always(None)  # the endpoint is back: what was stored is intact, what was dropped is absent
    assert untouched_misses(t, stored).all()
    assert not t.contains(new).any()


def test_a_stalled_endpoint_costs_existence_checks_and_probes_one_try(
    s3_server: Any, s3_bucket: str, prefix: str, s3_proxy: FaultProxy
) -> None:
    """The scheduler waits on existence checks, and a caller on a probe: neither retries a stall."""
    t = open_s3(s3_server, f"s3://{s3_bucket}/{prefix}", s3_proxy.endpoint, retries=2, breaker_threshold=4,
                breaker_cooldown=600)  # fmt: skip  # ended by cool_down(): "open" holds on a busy box
    keys = chain(NS_A, 4)
    assert t.put(keys, blocks_for(keys, BN)).all()
    t.timeout = t.head_timeout = 0.3  # only now: on a busy box healthy requests may take longer
    s3_proxy.fail_always("stall")
    s3_proxy.reset_counts()
    assert not t.contains(keys).any()
    assert s3_proxy.count("HEAD", 4) == 4, "one try per key, no retries of a timeout"
    assert t.breaker.state == "open"

    cool_down(t.breaker)
    s3_proxy.reset_counts()
    assert not untouched_misses(t, keys).any()
    assert s3_proxy.requests == 1, "the half-open probe is one request, not 1 + retries"
    s3_proxy.fail_always(None)
    t.timeout = t.head_timeout = float(FAST["timeout"])  # the recovery probe must not time out on a busy box
    cool_down(t.breaker)
    assert untouched_misses(t, keys)[0] and t.breaker.state == "closed"


def test_existence_checks_give_up_after_head_timeout_while_reads_keep_the_long_timeout(
    s3_server: Any, s3_bucket: str, prefix: str
) -> None:
    """``head_timeout`` bounds what the scheduler waits on a stalled endpoint.  The proxy holds
    each request 30 s and the tier's ``timeout`` is 20 s, so only ``head_timeout`` can end
    ``contains`` while the proxy still holds its HEADs (beyond the test's own 5 s limit otherwise)."""
    proxy = FaultProxy(s3_server.port, stall_seconds=30)
    try:
        t = open_s3(s3_server, f"s3://{s3_bucket}/{prefix}", proxy.endpoint, timeout=20, head_timeout=0.3)
        keys = chain(NS_A, 3)
        assert t.put(keys, blocks_for(keys, BN)).all()
        proxy.fail_always("stall")
        assert not t.contains(keys).any()
        assert proxy.in_flight == 3, "the HEADs are still stalled: the tier gave up on its own"
        assert t.stats()["head_errors"] == 3
    finally:
        proxy.close()


@pytest.mark.parametrize("fault", ["503", "stall"])
def test_breaker_opens_stops_requests_probes_and_closes(
    fault: str, s3_server: Any, s3_bucket: str, prefix: str, s3_proxy: FaultProxy
) -> None:
    cooldown = 600.0  # "open" holds however slow the machine is; cool_down() ends it where meant
    t = open_s3(s3_server, f"s3://{s3_bucket}/{prefix}", s3_proxy.endpoint, retries=0, breaker_threshold=3,
                breaker_cooldown=cooldown, timeout=fault_timeout(fault, 2.0))  # fmt: skip
    keys = chain(NS_A, 8)
    assert t.put(keys, blocks_for(keys, BN)).all()

    s3_proxy.fail_always(fault)
    for _ in range(3):  # three final failures in a row
        assert not untouched_misses(t, keys[:1]).any()
    assert t.breaker.state == "open" and t.stats()["breaker_trips"] == 1

    s3_proxy.reset_counts()  # open: nothing is sent, everything is a miss or a dropped put
    assert not untouched_misses(t, keys).any()
    assert not t.contains(keys).any() and t.prefix_len(keys) == 0
    assert not t.put(chain(NS_A, 2, start=50), blocks_for(chain(NS_A, 2, start=50), BN)).any()
    assert s3_proxy.requests == 0
    assert t.stats()["skipped_open_breaker"] >= 8 + 8 + 2

    cool_down(t.breaker)
    assert t.breaker.state == "half-open"
    s3_proxy.reset_counts()
    assert not untouched_misses(t, keys).any()
    assert s3_proxy.requests == 1, "after the cool-down exactly one probe goes out"
    assert t.breaker.state == "open", "a failed probe re-opens for another cool-down"

    s3_proxy.fail_always(None)
    cool_down(t.breaker)
    s3_proxy.reset_counts()
    assert untouched_misses(t, keys).tolist() == [True] + [False] * 7  # the probe itself is served
    assert s3_proxy.requests == 1
    assert t.breaker.state == "closed"
    assert untouched_misses(t, keys).all()


def test_dead_endpoint_at_open_is_a_clear_config_error(s3_server: Any, s3_bucket: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ConfigError) as ei:
        RemoteTier(f"s3://{s3_bucket}/x", BN, storage_options=s3_server.storage_options(dead), **{**FAST, "retries": 0})
    msg = str(ei.value)
    assert f"s3://{s3_bucket}/x" in msg and "endpoint" in msg


def test_endpoint_dying_after_open_gives_misses_through_the_store(s3_server: Any, s3_bucket: str, prefix: str) -> None:
    proxy = FaultProxy(s3_server.port)
    so = s3_server.storage_options(proxy.endpoint)
    # a refused connection fails at once: no short timeout needed (one would fail healthy HEADs on a busy box)
    tier = {"url": f"s3://{s3_bucket}/{prefix}", "storage_options": so, "timeout": FAST["timeout"], "retries": 1,
            "backoff": 0.01, "breaker_threshold": 4, "breaker_cooldown": 60}  # fmt: skip
    store = mount(tier, layout=LAYOUT, model="conformance-model", tenant="a", env={})
    try:
        keys = chain(NS_A, 6)
        assert store.put(keys, blocks_for(keys, BN)).all()
        assert store.match(keys).length == 6

        proxy.close()  # the port now refuses connections
        assert store.match(keys).length == 0
        out = np.full((6, BN), 0xAB, np.uint8)
        assert not store.get(keys, out).any() and (out == 0xAB).all()
        assert not store.put(chain(NS_A, 2, start=70), blocks_for(chain(NS_A, 2, start=70), BN)).any()
        assert not store.delete(keys).any()
        s = store.stats()["tiers"][0]
        assert s["breaker"] == "open" and s["head_errors"] > 0
    finally:
        store.close()
        proxy.close()


# ---- corruption -----------------------------------------------------------------------------------
class S3Objects:
    def __init__(self, moto_s3: Any, bucket: str, prefix: str) -> None:
        self.c, self.bucket, self.root = moto_s3.client(), bucket, prefix

    def read(self, name: str) -> bytes:
        return bytes(self.c.get_object(Bucket=self.bucket, Key=name)["Body"].read())

    def write(self, name: str, data: bytes) -> None:
        self.c.put_object(Bucket=self.bucket, Key=name, Body=data)

    def exists(self, name: str) -> bool:
        return bool(self.c.list_objects_v2(Bucket=self.bucket, Prefix=name)["KeyCount"])


class FileObjects:
    def __init__(self, root: Path) -> None:
        self.root = str(root)

    def read(self, name: str) -> bytes:
        return Path(name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        Path(name).write_bytes(data)

    def exists(self, name: str) -> bool:
        return Path(name).exists()


def test_damaged_or_swapped_objects_are_detected_missed_and_removed(
    s3_server: Any, s3_bucket: str, prefix: str
) -> None:
    rec = EventRecorder()
    t = open_s3(s3_server, f"s3://{s3_bucket}/{prefix}", s3_server.endpoint, rec.bus)
    _damaged_objects_are_missed_and_removed(t, S3Objects(s3_server, s3_bucket, prefix), rec)


def test_damaged_or_swapped_files_are_detected_missed_and_removed(tmp_path: Path) -> None:
    rec = EventRecorder()
    objs = FileObjects(tmp_path / "remote")
    t = RemoteTier(f"file://{objs.root}", BN, events=rec.bus, **FAST)
    t.bind_namespace(NS_A)
    _damaged_objects_are_missed_and_removed(t, objs, rec)


def _damaged_objects_are_missed_and_removed(t: RemoteTier, objs: S3Objects | FileObjects, rec: EventRecorder) -> None:
    n_bad = len(DAMAGE) + 1  # every kind of damage, plus one object holding another key's block
    keys = chain(NS_A, n_bad + 1)
    assert t.put(keys, blocks_for(keys, BN)).all()
    names = [object_name(objs.root, keys, i) for i in range(len(keys))]
    assert all(objs.exists(n) for n in names), "objects sit where the documented layout says"

    for name, damage in zip(names, DAMAGE.values()):
        objs.write(name, damage(objs.read(name)))
    objs.write(names[n_bad - 1], objs.read(names[n_bad]))  # a whole, valid block, but for the next key

    assert untouched_misses(t, keys).tolist() == [False] * n_bad + [True]
    assert rec.keys(EventKind.LOAD_FAILED) == keyset(keys[:n_bad])
    s = t.stats()
    assert s["load_failures"] == n_bad and s["corrupt_removed"] == n_bad
    assert [objs.exists(n) for n in names] == [False] * n_bad + [True], "bad objects are removed, the good one kept"
    assert t.contains(keys).tolist() == [False] * n_bad + [True]

    rec.events.clear()
    assert untouched_misses(t, keys).tolist() == [False] * n_bad + [True]
    assert not rec.keys(EventKind.LOAD_FAILED), "once removed they are plain misses"


@pytest.mark.parametrize("io", ["s3fs", "nixl"])
def test_an_upload_damaged_in_flight_is_never_served(
    io: str, s3_server: Any, s3_bucket: str, prefix: str, s3_proxy: FaultProxy
) -> None:
    """Neither data path sends a SHA-256 of the body; s3fs still sends a CRC32 header, NIXL none.
    SeaweedFS (like S3) checks that CRC32 and refuses the damaged PUT: a dropped block, stored whole
    by the retry.  moto does not check it and NIXL sends none, so there the damaged body is stored and
    the block's own checksum catches it at the first read: a miss, the object removed, the rest intact."""
    if io == "nixl":
        require_nixl()
    refused = s3_server.checks_request_checksum and io == "s3fs"
    rec = EventRecorder()
    t = RemoteTier(f"s3://{s3_bucket}/{prefix}", BN, events=rec.bus, io=io,
                   storage_options=s3_server.storage_options(s3_proxy.endpoint), **{**FAST, "retries": 0})  # fmt: skip
    t.bind_namespace(NS_A)
    keys = chain(NS_A, 3)
    s3_proxy.inject("flip", method="PUT")
    stored = t.put(keys, blocks_for(keys, BN))
    assert s3_proxy.injected["flip"] == 1
    assert stored.sum() == (2 if refused else 3)
    found = untouched_misses(t, keys)
    assert found.sum() == 2, "the damaged block is a miss, the other two read whole"
    if refused:
        assert found.tolist() == stored.tolist() and t.stats()["put_errors"] == 1
        assert rec.keys(EventKind.STORE_FAILED) == keyset(keys[~found]) and not rec.keys(EventKind.LOAD_FAILED)
        retried = RemoteTier(f"s3://{s3_bucket}/{prefix}", BN, storage_options=s3_server.storage_options(s3_proxy.endpoint),
                             **{**FAST, "retries": 1})  # fmt: skip
        s3_proxy.inject("flip", method="PUT")
        assert retried.put(keys, blocks_for(keys, BN)).all() and retried.stats()["retries"] == 1
        assert untouched_misses(t, keys).all(), "the retry sent the block whole"
        retried.close()
    else:
        assert rec.keys(EventKind.LOAD_FAILED) == keyset(keys[~found])
        assert t.stats()["corrupt_removed"] == 1 and t.contains(keys).tolist() == found.tolist()
    t.close()


def test_puts_skip_payload_signing_unless_the_config_asks_for_it(s3_server: Any, s3_bucket: str, prefix: str) -> None:
    seen: list[dict[str, str]] = []

    def capture(request: Any, **_: Any) -> None:
        seen.append({k.lower(): v.decode() if isinstance(v, bytes) else str(v) for k, v in request.headers.items()})

    cases: list[tuple[dict[str, Any], bool]] = [
        ({}, False),
        ({"config_kwargs": {"s3": {"payload_signing_enabled": True}}}, True),
        # another s3 setting (path-style addressing, as MinIO and SeaweedFS guides set) keeps the default
        ({"config_kwargs": {"s3": {"addressing_style": "path"}}}, False),
    ]
    for n, (so, signed) in enumerate(cases):
        t = RemoteTier(f"s3://{s3_bucket}/{prefix}", BN, storage_options={**s3_server.storage_options(), **so}, **FAST)
        t.bind_namespace(NS_A)
        t.fs.s3.meta.events.register("before-send.s3.PutObject", capture)
        keys = chain(NS_A, 1, start=10 + n)
        assert t.put(keys, blocks_for(keys, BN)).all()
        head = seen[-1]
        assert (head["x-amz-content-sha256"] != "UNSIGNED-PAYLOAD") == signed
        assert "x-amz-checksum-crc32" in head, "the request checksum stays either way"
        asked = so.get("config_kwargs", {}).get("s3", {})
        assert {k: t.fs.s3.meta.config.s3.get(k) for k in asked} == asked, "the caller's s3 settings apply"
        t.close()


# ---- manifests ------------------------------------------------------------------------------------
def test_tier_written_for_another_block_size_is_refused(s3_server: Any, s3_bucket: str, prefix: str) -> None:
    url, so = f"s3://{s3_bucket}/{prefix}", s3_server.storage_options()
    RemoteTier(url, BN, storage_options=so, **FAST).close()
    with pytest.raises(LayoutMismatchError, match=f"{BN}-byte"):
        RemoteTier(url, BN // 2, storage_options=so, **FAST)
    other = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, block_size=16, dtype="float16")
    with pytest.raises(LayoutMismatchError):
        mount({"url": url, "storage_options": so}, layout=other, model="m", env={})
    mount({"url": url, "storage_options": so}, layout=LAYOUT, model="m", env={}).close()  # the right one opens


@pytest.mark.parametrize(
    "doc",
    [
        json.dumps({"format": "someone-elses.v9", "block_nbytes": BN}).encode(),
        json.dumps({"block_nbytes": BN}).encode(),
        b"not json {",
        b"[1, 2, 3]",
        b"\xff\xfe\x00",
    ],
    ids=["other-format", "no-format", "not-json", "json-list", "binary"],
)
def test_foreign_tier_manifest_is_refused(doc: bytes, s3_server: Any, s3_bucket: str, prefix: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key=f"{prefix}/kvbm_fs.remote.json", Body=doc)
    with pytest.raises(FormatVersionError):
        RemoteTier(f"s3://{s3_bucket}/{prefix}", BN, storage_options=s3_server.storage_options(), **FAST)


def test_conflicting_or_foreign_namespace_manifest_is_refused(s3_server: Any, s3_bucket: str, prefix: str) -> None:
    t = RemoteTier(f"s3://{s3_bucket}/{prefix}", BN, storage_options=s3_server.storage_options(), **FAST)
    c, name = s3_server.client(), f"{prefix}/{NS_A.short_id}/manifest.json"
    c.put_object(Bucket=s3_bucket, Key=name, Body=json.dumps(NS_B.to_dict()).encode())  # another namespace's record
    with pytest.raises(LayoutMismatchError, match=NS_A.short_id):
        t.bind_namespace(NS_A)
    for junk in (b'{"format": "not-a-namespace"}', b"<xml/>"):
        c.put_object(Bucket=s3_bucket, Key=name, Body=junk)
        with pytest.raises(FormatVersionError):
            t.bind_namespace(NS_A)
    c.put_object(Bucket=s3_bucket, Key=name, Body=json.dumps(NS_A.to_dict()).encode())
    t.bind_namespace(NS_A)  # its own record is accepted


# ---- bad configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "query, named",
    [
        ("timeout=soon", "timeout"),
        ("retries=many", "retries"),
        ("backoff=1e", "backoff"),
        ("max_concurrency=0", "max_concurrency"),
        ("timeout=-1", "timeout"),
        ("head_timeout=0", "head_timeout"),
        ("head_timeout=later", "head_timeout"),
        ("breaker_cooldown=nan", "breaker_cooldown"),
        ("colour=red", "colour"),
    ],
)
def test_bad_url_option_is_a_config_error_naming_it(query: str, named: str) -> None:
    url = f"s3://bucket/p?endpoint_url=http://127.0.0.1:9&{query}"
    with pytest.raises(ConfigError, match=named):
        mount(url, layout=LAYOUT, env={})


def test_unknown_storage_option_or_protocol_is_a_config_error() -> None:
    bad = {"url": "s3://bucket/p", "storage_options": {"endpoint_url": "http://127.0.0.1:9", "colour_depth": 3}}
    with pytest.raises(ConfigError, match="colour_depth"):
        mount(bad, layout=LAYOUT, env={})
    with pytest.raises(ConfigError, match="nosuchfs"):
        mount("remote+nosuchfs://somewhere/kv", layout=LAYOUT, env={})
    with pytest.raises(UnknownSchemeError, match="nosuchfs"):
        mount("nosuchfs://somewhere/kv", layout=LAYOUT, env={})


def test_storage_options_of_the_callers_config_are_not_modified(tmp_path: Path) -> None:
    so: dict[str, Any] = {}
    mount({"url": f"remote+file://{tmp_path}/kv", "storage_options": so}, layout=LAYOUT, env={}).close()
    assert so == {}


# ---- credentials never leak -----------------------------------------------------------------------
SECRET = f"kvbm-canary-{uuid.uuid4().hex}"


@contextmanager
def moto_checks_signatures() -> Iterator[None]:
    """Turn on moto's request authentication (off by default) for the in-process server."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    old = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    ActionAuthenticatorMixin.request_count = 0
    try:
        yield
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = old


def _exception_texts(e: BaseException) -> list[str]:
    """str and repr of the exception and of everything chained to it, and the formatted traceback."""
    out, seen = ["".join(traceback.format_exception(e))], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out += [str(cur), repr(cur), *map(repr, cur.args)]
        cur = cur.__cause__ or cur.__context__
    return out


def as_query(options: dict[str, Any]) -> str:
    return "&".join(f"{k}={v}" for k, v in options.items())


def _toml(tiers_url: str, so: dict[str, Any], path: Path, io: str = "s3fs") -> Path:
    lines = ["model = 'leak-check'", "[layout]", *(f"{k} = {json.dumps(v)}" for k, v in LAYOUT.to_dict().items())]
    lines += ["[[tiers]]", f"url = '{tiers_url}'", f"io = '{io}'", "timeout = 0.5", "retries = 0"]
    lines += ["[tiers.storage_options]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in so.items() if not isinstance(v, dict)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("io", ["s3fs", "nixl"])
def test_secrets_never_appear_in_errors_stats_repr_or_logs(
    io: str,
    moto_s3: Any,
    bucket: str,
    prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Through s3fs, and with block objects through NIXL OBJ (io=nixl: its native logs on stderr too)."""
    if io == "nixl":
        require_nixl()
    caplog.set_level(logging.DEBUG)
    import boto3

    iam = boto3.client("iam", endpoint_url=moto_s3.endpoint, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x")  # fmt: skip
    iam.create_user(UserName=f"kv-{prefix}")
    key_id = iam.create_access_key(UserName=f"kv-{prefix}")["AccessKey"]["AccessKeyId"]
    url = f"s3://{bucket}/{prefix}"
    wrong = {"key": key_id, "secret": SECRET, "endpoint_url": moto_s3.endpoint}  # a real key id, a wrong secret
    dead = {**wrong, "endpoint_url": f"http://127.0.0.1:{free_port()}"}
    texts: list[str] = []
    errors: list[str] = []

    def fails(fn: Callable[[], Any]) -> None:
        with pytest.raises(ConfigError) as ei:
            fn()
        errors.append(str(ei.value))
        texts.extend(_exception_texts(ei.value))

    # opened while moto accepts anything; every request fails (403) once it checks signatures
    rec = EventRecorder()
    t = RemoteTier(url, BN, events=rec.bus, storage_options=wrong, io=io, **{**FAST, "breaker_threshold": 3})
    t.bind_namespace(NS_A)
    store = mount({"url": url, "storage_options": wrong, "io": io, **FAST}, layout=LAYOUT, model="leak-check", env={})
    keys = chain(NS_A, 3)
    with moto_checks_signatures():
        assert not t.put(keys, blocks_for(keys, BN)).any()
        assert not untouched_misses(t, keys).any() and not t.contains(keys).any()
        skeys = store.keys(np.arange(48))
        assert not store.put(skeys, np.zeros((3, BN), np.uint8)).any() and store.match(skeys).length == 0
        fails(lambda: RemoteTier(url, BN, storage_options=wrong, io=io, **FAST))
        fails(lambda: mount(f"{url}?{as_query(wrong)}&timeout=0.5&retries=0&io={io}", layout=LAYOUT, env={}))
        fails(lambda: mount(config=_toml(url, wrong, tmp_path / "kvbm.toml", io), env={}))
    assert t.stats()["put_errors"] == 3 and t.stats()["get_errors"] == 3
    assert all("PermissionError" in e for e in errors) and len(errors) == 3, errors
    # a dead endpoint, a malformed endpoint, an unknown option next to the secret
    fails(lambda: RemoteTier(url, BN, storage_options=dead, io=io, **{**FAST, "retries": 0}))
    fails(lambda: mount(f"{url}?{as_query(dead)}&timeout=0.3&retries=0&io={io}", layout=LAYOUT, env={}))
    fails(lambda: RemoteTier(url, BN, storage_options={**wrong, "endpoint_url": "not a url"}, io=io, **FAST))
    fails(lambda: RemoteTier(url, BN, storage_options={**wrong, "colour_depth": SECRET}, io=io, **FAST))

    assert "colour_depth" in errors[-1] and "endpoint" in errors[3], errors
    texts += [str(t), repr(t), json.dumps(t.stats(), default=str), json.dumps(store.stats(), default=str)]
    texts += [repr(e) for e in rec.events]
    texts += [caplog.text, *(r.getMessage() for r in caplog.records)]
    if io == "nixl":
        assert t.stats()["io"] == "nixl" and t._nixl.counters["put_errors"] > 0, "NIXL did send the requests"
        texts += [repr(t._nixl), json.dumps(t._nixl.stats(), default=str)]
    store.close()
    texts += list(capfd.readouterr())  # native code (NIXL, the AWS SDK) writes to the fds, not to logging
    assert texts and all(SECRET not in s for s in texts)
    assert any(r.levelname == "DEBUG" for r in caplog.records), "debug logging was captured"


def test_malformed_tier_url_does_not_echo_its_secret() -> None:
    with pytest.raises(ConfigError) as ei:
        mount(f"s3:/bucket/p?secret={SECRET}", layout=LAYOUT, env={})
    assert SECRET not in str(ei.value)
