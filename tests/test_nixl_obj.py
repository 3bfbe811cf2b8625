"""NIXL OBJ data path (tiers/remote/nixl_obj.py) against a real S3 protocol server (moto on 127.0.0.1).

Round trips, missing objects, short objects, and endpoints that refuse or stall: every call
returns within its deadline, and no secret shows up in repr, stats or errors.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kvbm_fs.testing import require_nixl
from kvbm_fs.testing.s3 import ACCESS_KEY, REGION, SECRET_KEY, free_port


def _client(endpoint: str, bucket: str, **kw: Any) -> Any:
    require_nixl()
    from kvbm_fs.tiers.remote.nixl_obj import NixlObjClient

    try:
        return NixlObjClient(bucket, endpoint=endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                             region=REGION, num_threads=8, **kw)  # fmt: skip
    except RuntimeError as e:  # no OBJ plugin in this NIXL build
        pytest.skip(str(e))


@pytest.fixture
def bucket(moto_s3: Any) -> str:
    return str(moto_s3.create_bucket(f"nixl-{uuid.uuid4().hex[:8]}"))


@pytest.fixture
def client(moto_s3: Any, bucket: str) -> Iterator[Any]:
    c = _client(moto_s3.endpoint, bucket, timeout=10.0)
    yield c
    c.close()


def test_roundtrip_batch(client: Any, moto_s3: Any, bucket: str) -> None:
    rng = np.random.default_rng(1)
    blobs = [rng.integers(0, 256, n, dtype=np.uint8) for n in (1, 4096, 3 << 20, 12345)]
    items = [(f"a/{i:02x}/obj", b if i % 2 else b.tobytes()) for i, b in enumerate(blobs)]
    assert client.put(items) == [None] * len(items)
    # the objects are ordinary S3 objects: another client sees exactly these bytes
    s3 = moto_s3.client()
    for (key, _), b in zip(items, blobs):
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b.tobytes()
    got = client.get([(k, len(b)) for (k, _), b in zip(items, blobs)])
    for g, b in zip(got, blobs):
        assert isinstance(g, np.ndarray) and np.array_equal(g, b)
    # ranged read, and reads into caller buffers
    part = client.get([(items[2][0], 1000)], offset=5000)[0]
    assert np.array_equal(part, blobs[2][5000:6000])
    dst = [np.empty(len(b), np.uint8) for b in blobs]
    assert client.get_into([(k, d) for (k, _), d in zip(items, dst)]) == [None] * len(items)
    assert all(np.array_equal(d, b) for d, b in zip(dst, blobs))
    # overwrite is whole-object
    assert client.put([(items[0][0], b"xyz")]) == [None]
    assert bytes(client.get([(items[0][0], 3)])[0]) == b"xyz"
    assert client.stats()["puts"] == 5


def test_missing_key_is_file_not_found(client: Any) -> None:
    assert client.put([("here", b"hello")]) == [None]
    got = client.get([("here", 5), ("not/here", 5), ("here", 5)])
    assert bytes(got[0]) == b"hello" and bytes(got[2]) == b"hello"
    assert isinstance(got[1], FileNotFoundError)
    assert client.exists(["here", "not/here"]) == [True, False]
    assert client.counters["missing"] == 1 and client.counters["get_errors"] == 0


def test_short_object_leaves_tail_zero(client: Any) -> None:
    """S3 answers a range past the end with what exists; the rest of the buffer stays zero (verify reads)."""
    assert client.put([("short", b"\x07" * 100)]) == [None]
    (got,) = client.get([("short", 200)])
    assert isinstance(got, np.ndarray) and (got[:100] == 7).all() and not got[100:].any()


def test_empty_and_bad_inputs(client: Any) -> None:
    (err,) = client.put([("empty", b"")])
    assert isinstance(err, ValueError)
    with pytest.raises(ValueError):
        client.get([("x", 1)], offset=-1)
    with pytest.raises(ValueError):
        client.get_into([("x", b"read-only")])
    assert client.get([]) == [] and client.put([]) == [] and client.exists([]) == []


def test_refused_endpoint_fails_fast(bucket: str) -> None:
    c = _client(f"http://127.0.0.1:{free_port()}", bucket, timeout=10.0)
    (perr,) = c.put([("k", b"data")])
    got = c.get([("k", 4)])
    there = c.exists(["k"])
    c.close()
    # a refusal is answered at once, not by waiting out the 10 s timeouts (counted, not clocked: a
    # busy machine makes a clock bound flaky)
    assert c.counters["timeouts"] == 0 and c.counters["query_timeouts"] == 0, c.counters
    assert isinstance(perr, OSError) and not isinstance(perr, TimeoutError)
    assert isinstance(got[0], OSError) and not isinstance(got[0], (FileNotFoundError, TimeoutError))  # unknown
    assert there == [None]


def test_stalled_endpoint_never_hangs(moto_s3: Any, bucket: str) -> None:
    from kvbm_fs.testing.proxy import FaultProxy

    proxy = FaultProxy(moto_s3.port, stall_seconds=60)  # ends at once on proxy.close()
    try:
        c = _client(proxy.endpoint, bucket, timeout=0.5, min_rate=1e12)
        proxy.fail_always("stall")
        got = c.get([("k", 4096), ("k2", 4096)])
        (perr,) = c.put([("k3", b"x" * 4096)])
        there = c.exists(["k"])
        c.close()
        # each call gave up on its own timeout while the proxy still held its request (2 GETs, the
        # PUT, the HEAD): a call that waited for the proxy to end a stall would find it counted
        assert proxy.stalls_waited_out == 0 and proxy.stalled == proxy.injected["stall"] == 4, proxy.methods
        assert all(isinstance(g, TimeoutError) for g in got)
        assert isinstance(perr, TimeoutError)
        assert there == [None]
        assert c.counters["timeouts"] == 3
        assert isinstance(c.get([("k", 1)])[0], OSError)  # closed: refuses at once
    finally:
        proxy.fail_always(None)
        proxy.close()


def test_secrets_stay_out(client: Any) -> None:
    got = client.get([("nope", 3)])
    text = " ".join([repr(client), str(client.stats()), str(got[0]), repr(got[0])])
    assert SECRET_KEY not in text and ACCESS_KEY not in text
