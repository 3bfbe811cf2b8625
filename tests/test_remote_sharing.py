"""G4 remote tier shared between processes: one puts, another mount() of the same URL matches and reads.

Also: existence checks for a long prefix go out as concurrent HEADs and stop at the first miss, and
a writer killed in the middle of a put never leaves a partial object where readers look.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from remote_helpers import BN, REPO, run_python, write_config, writer_report

from kvbm_fs import KVLayout, Namespace, mount
from kvbm_fs.codec import HEADER_SIZE
from kvbm_fs.events import EventBus, EventKind
from kvbm_fs.testing import NS_A, blocks_for, chain
from kvbm_fs.testing.proxy import FaultProxy
from kvbm_fs.tiers.remote import RemoteTier

pytest.importorskip("s3fs")

N_SHARED = 12


def test_process_b_matches_and_reads_what_process_a_put(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    tier = {"url": f"s3://{s3_bucket}/shared-{uuid.uuid4().hex[:6]}", "storage_options": s3_server.storage_options()}
    _process_b_reads_process_a(tier, tmp_path)


def test_process_b_matches_and_reads_what_process_a_put_on_a_shared_filesystem(tmp_path: Path) -> None:
    _process_b_reads_process_a({"url": f"remote+file://{tmp_path}/shared"}, tmp_path)


def _process_b_reads_process_a(tier: dict[str, Any], tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "kvbm.toml", tier)
    seed = 7
    report = writer_report(cfg, N_SHARED, seed)
    assert report["stored"] == N_SHARED

    with mount(config=cfg, env={}) as b:  # process B: this one, its own mount of the same URL
        keys = b.keys(np.random.default_rng(seed).integers(0, 50_000, N_SHARED * 16))
        assert keys.hashes.tolist() == report["hashes"], "both processes derive the same keys"
        m = b.match(keys)
        assert m.length == N_SHARED and m.by_tier() == {"remote": N_SHARED}
        out = np.zeros((N_SHARED, BN), np.uint8)
        assert b.get(keys, out, m).all()
        want = np.random.default_rng(seed + 1).integers(0, 256, (N_SHARED, BN), dtype=np.uint8)
        assert np.array_equal(out, want), "bit-exact"
        tokens = np.random.default_rng(seed).integers(0, 50_000, N_SHARED * 16)
        longer = b.keys(np.concatenate([tokens, np.arange(4 * 16)]))  # the same prompt, continued
        assert b.match(longer).length == N_SHARED


# ---- batched existence checks ---------------------------------------------------------------------
def test_prefix_checks_are_concurrent_heads_that_stop_at_the_first_miss(s3_server: Any, s3_bucket: str) -> None:
    proxy = FaultProxy(s3_server.port, latency=0.02)  # like S3's time to first byte
    try:
        t = RemoteTier(f"s3://{s3_bucket}/batch-{uuid.uuid4().hex[:6]}", BN,
                       storage_options=s3_server.storage_options(proxy.endpoint))  # fmt: skip
        t.bind_namespace(NS_A)
        keys = chain(NS_A, 256)
        assert t.put(keys[:64], blocks_for(keys[:64], BN)).all()
        assert t.delete(keys[10:11]).all()  # the first miss of the chain is at 10

        proxy.reset_counts()
        assert t.contains(keys[:64]).sum() == 63
        assert dict(proxy.methods) == {"HEAD": 64}, "one HEAD per key, nothing else"
        assert proxy.max_in_flight >= 8, "the HEADs were in flight together, not one after another"

        proxy.reset_counts()
        assert t.prefix_len(keys) == 10
        assert proxy.requests < 256 and set(proxy.methods) == {"HEAD"}, "stops at the chunk holding the miss"

        proxy.reset_counts()
        out = np.zeros((10, BN), np.uint8)
        assert t.get(keys[:10], out).all() and np.array_equal(out, blocks_for(keys[:10], BN))
        assert dict(proxy.methods) == {"GET": 10}, "one GET per block (no size HEAD first)"
        assert proxy.max_in_flight >= 5
    finally:
        proxy.close()


def test_puts_are_one_whole_object_each(s3_server: Any, s3_bucket: str) -> None:
    """S3 PUTs are atomic: a reader sees a whole object or none; so each block is exactly one PUT
    (not a multipart upload, nor a write-then-rename that readers could catch half-way)."""
    proxy = FaultProxy(s3_server.port)
    try:
        t = RemoteTier(f"s3://{s3_bucket}/whole-{uuid.uuid4().hex[:6]}", BN,
                       storage_options=s3_server.storage_options(proxy.endpoint))  # fmt: skip
        keys = chain(NS_A, 16)
        proxy.reset_counts()
        assert t.put(keys, blocks_for(keys, BN)).all()
        assert dict(proxy.methods) == {"PUT": 16}  # unbounded: no existence check first
    finally:
        proxy.close()


def _signed_put_head(port: int, bucket: str, name: str, body: bytes) -> bytes:
    """The head of a PUT of ``body`` signed as the tier's user (SeaweedFS checks signatures)."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from kvbm_fs.testing.s3 import ACCESS_KEY, REGION, SECRET_KEY

    req = AWSRequest("PUT", f"http://127.0.0.1:{port}/{bucket}/{name}", data=body)
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", REGION).add_auth(req)
    fields = {"Host": f"127.0.0.1:{port}", "Content-Length": str(len(body)), **dict(req.headers.items())}
    return (
        f"PUT /{bucket}/{name} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    ).encode()


@pytest.mark.parametrize("via", ["direct", "proxy"])
def test_torn_s3_upload_is_never_visible(via: str, s3_server: Any, s3_bucket: str) -> None:
    """A client that dies half-way through a PUT body leaves no object at all (and the test proxy
    does not forward the torn request); the same request sent whole is stored."""
    import socket

    proxy = FaultProxy(s3_server.port)
    port = proxy.port if via == "proxy" else s3_server.port
    prefix = f"torn-{uuid.uuid4().hex[:6]}"
    events = EventBus()
    failed: list[Any] = []
    events.subscribe(lambda e: failed.append(e) if e.kind is EventKind.LOAD_FAILED else None)
    t = RemoteTier(f"s3://{s3_bucket}/{prefix}", BN, events=events, storage_options=s3_server.storage_options())
    t.bind_namespace(NS_A)
    keys = chain(NS_A, 2)
    names = [f"{prefix}/{NS_A.id:016x}/{h >> 56:02x}/{h:016x}" for h in keys.hashes.tolist()]
    body = b"\x00" * (HEADER_SIZE + BN)
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(_signed_put_head(port, s3_bucket, names[0], body))
            s.sendall(body[: BN // 2])
        assert s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix=names[0])["KeyCount"] == 0
        out = np.full((1, BN), 0xAB, np.uint8)
        assert not t.contains(keys[:1]).any() and not t.get(keys[:1], out).any() and (out == 0xAB).all()
        assert not failed
        assert proxy.requests == 0

        with socket.create_connection(("127.0.0.1", port)) as s:  # control: the whole request is accepted
            s.sendall(_signed_put_head(port, s3_bucket, names[1], body) + body)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        assert s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix=names[1])["KeyCount"] == 1
    finally:
        proxy.close()


# ---- shared filesystems: a killed writer never leaves a partial object at a final name ----------------
TORN_WRITER = """
import os, signal, sys
from kvbm_fs.testing import NS_A, blocks_for, chain
from kvbm_fs.tiers.remote import RemoteTier
t = RemoteTier(sys.argv[1], NS_A.block_nbytes)
t.bind_namespace(NS_A)
async def torn(path, data, **kw):  # write half the object, then die as a crash would
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
t.fs._pipe_file = torn
keys = chain(NS_A, 1, start=int(sys.argv[2]))
t.put(keys, blocks_for(keys, NS_A.block_nbytes))
"""


def _block_files(root: Path) -> list[Path]:
    """Files whose names are block names (16 hex digits), as a listing reader would take them."""
    return [p for p in root.rglob("*") if p.is_file() and len(p.name) == 16 and p.parent.parent.parent == root]


def test_writer_killed_mid_put_leaves_no_partial_object(tmp_path: Path) -> None:
    root = tmp_path / "nfs"
    url = f"file://{root}"
    w = run_python(TORN_WRITER, url, "5")
    assert w.returncode == -signal.SIGKILL, w.stderr[-3000:]
    keys = chain(NS_A, 1, start=5)
    h = int(keys.hashes[0])
    assert not (root / f"{NS_A.id:016x}" / f"{h >> 56:02x}" / f"{h:016x}").exists()
    tmp = [p for p in root.rglob("*.tmp-*")]
    assert tmp and tmp[0].stat().st_size < HEADER_SIZE + BN, "the crash did land mid-write (in a tmp file)"
    assert _block_files(root) == []

    events = EventBus()
    seen: list[Any] = []
    events.subscribe(seen.append)
    t = RemoteTier(url, BN, capacity=64 * (HEADER_SIZE + BN), events=events)
    t.bind_namespace(NS_A)
    assert len(t) == 0 and list(t.iter_keys()) == [], "tmp names are never listed as blocks"
    out = np.full((1, BN), 0xAB, np.uint8)
    assert not t.contains(keys).any() and not t.get(keys, out).any() and (out == 0xAB).all()
    assert not seen
    assert t.put(keys, blocks_for(keys, BN)).all(), "a leftover tmp file does not block a later put"
    assert t.get(keys, out).all() and np.array_equal(out[0], blocks_for(keys, BN)[0])


BIG = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16")  # 256 KiB blocks
NS_BIG = Namespace("atomic-writes", BIG)

LOOP_WRITER = """
import sys
import numpy as np
from kvbm_fs import KVLayout, Namespace
from kvbm_fs.keys import BlockKeys
from kvbm_fs.tiers.remote import RemoteTier
ns = Namespace("atomic-writes", KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16"))
t = RemoteTier(sys.argv[1], ns.block_nbytes, max_concurrency=8)
t.bind_namespace(ns)
rng, first = np.random.default_rng(int(sys.argv[2])), int(sys.argv[2]) * 1_000_000
for i in range(1_000_000):
    keys = BlockKeys(ns.id, (np.arange(4, dtype=np.uint64) + np.uint64(first + 4 * i + 1)) * np.uint64(0x9E3779B97F4A7C15))
    t.put(keys, rng.integers(0, 256, (4, ns.block_nbytes), dtype=np.uint8))
    print(i, flush=True)
"""


def test_writers_killed_at_random_leave_only_whole_objects(tmp_path: Path) -> None:
    root = tmp_path / "nfs"
    url = f"file://{root}"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rng = np.random.default_rng(0)
    for round_ in range(3):
        p = subprocess.Popen([sys.executable, "-c", LOOP_WRITER, url, str(round_ + 1)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert p.stdout is not None
        for _ in range(int(rng.integers(1, 4))):  # let it store a few batches, then kill it mid-stream
            assert p.stdout.readline(), p.stderr.read() if p.stderr else ""
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        p.stdout.close()
        if p.stderr:
            p.stderr.close()

    events = EventBus()
    failed: list[Any] = []
    events.subscribe(lambda e: failed.append(e) if e.kind is EventKind.LOAD_FAILED else None)
    t = RemoteTier(url, NS_BIG.block_nbytes, events=events)
    t.bind_namespace(NS_BIG)
    files = _block_files(root)
    assert len(files) >= 3 * 4
    assert all(f.stat().st_size == HEADER_SIZE + NS_BIG.block_nbytes for f in files)
    listed = [b for b in t.iter_keys() if b.ns == NS_BIG.id]
    assert sum(len(b) for b in listed) == len(files)
    for b in listed:
        assert t.get(b, np.zeros((len(b), NS_BIG.block_nbytes), np.uint8)).all()
    assert not failed, "every object a reader can find is whole and verifies"
