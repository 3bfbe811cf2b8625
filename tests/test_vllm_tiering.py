"""kvbm_fs as a secondary tier of vLLM 0.32's native offloading, driven through vLLM's real classes.

Real: ``OffloadingSpecFactory`` building ``TieringOffloadingSpec`` from the ``kv_connector_extra_config``
a user writes (docs/vllm.md), its ``get_manager()`` with the ``SharedOffloadRegion`` mmap,
``CPUPrimaryTierOffloadingManager`` and ``TieringOffloadingManager`` (tiering/manager.py), ``SecondaryTierFactory`` loading
``KvbmFsSecondaryTier`` out of tree by ``module_path``, vLLM's ``AsyncLookupManager``, and the kvbm_fs
store with a real disk tier. Stand-in: :class:`Engine`, for the ``OffloadingConnector`` scheduler and
its ``CPUOffloadingWorker`` (which needs CUDA): it calls the manager in the connector's order
(on_new_request, prepare_store / the worker's GPU->CPU copy / complete_store, the maximal-prefix
lookup loop that retries on RETRY and HIT_PENDING, prepare_load / the CPU->GPU copy / complete_load,
on_request_finished, on_schedule_end once per step), and its "copies" are numpy reads and writes of the
primary tier's rows, which is what the CUDA worker copies from and to.
"""

from __future__ import annotations

import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
pytest.importorskip("vllm.v1.kv_offload.tiering.manager", reason="vLLM 0.32 is not installed here (.ci/run-vllm)")

from vllm.v1.kv_offload.base import LookupResult, ReqContext, ScheduleEndContext, make_offload_key
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.factory import OffloadingSpecFactory
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory
from vllm.v1.kv_offload.tiering.manager import TieringOffloadingManager
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

from kvbm_fs import Namespace
from kvbm_fs.integration.vllm_tiering import KvbmFsSecondaryTier, chunk_keys

MODULE = "kvbm_fs.integration.vllm_tiering"
CHUNK = 8192  # bytes of KV per chunk (one 16-token block of a tiny model)
DISK_CAP = "16MiB"


def tier_config(root: Path, **opts: Any) -> dict[str, Any]:
    """The tier table a user writes under ``secondary_tiers`` (docs/vllm.md)."""
    return {
        "type": "KvbmFsSecondaryTier",
        "module_path": MODULE,
        "tiers": [f"file://{root}?capacity={DISK_CAP}"],
        **opts,
    }


def offloading_config(
    tier: dict[str, Any], primary_chunks: int, events: bool = False, chunk: int = CHUNK, tokens: int = 16
) -> OffloadingConfig:
    """What vLLM's OffloadingConnector hands its spec for a one-group, single-rank engine."""
    return OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=tokens, layer_names=("layers.0", "layers.1"), group_id=0),),
        worker_kv_bytes_per_block=chunk,
        enable_kv_cache_events=events,
        extra_config={
            "spec_name": "TieringOffloadingSpec",
            "cpu_bytes_to_use": primary_chunks * chunk,
            "secondary_tiers": [tier],
        },
        engine_id=f"kvbmfs-test-{uuid.uuid4().hex[:8]}",
        model=OffloadingModelConfig(name="tiny-llama", dtype="float16"),
        cache=OffloadingCacheConfig(tokens_per_hash=tokens, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(
            rank=0,
            world_size=1,
            tp_size=1,
            pp_size=1,
            pcp_size=1,
            dcp_size=1,
            data_parallel_index=0,
            data_parallel_size=1,
            data_parallel_rank_local=None,
            is_parallelism_agnostic=True,
        ),
    )


class Engine:
    """The connector's scheduler and CUDA worker, stood in for (see the module docstring)."""

    def __init__(self, tier: dict[str, Any], primary_chunks: int = 4, events: bool = False, **cfg: Any) -> None:
        spec = OffloadingSpecFactory.create_spec(offloading_config(tier, primary_chunks, events, **cfg))
        assert isinstance(spec, TieringOffloadingSpec)  # what spec_name picks, as in the user's config
        self.spec = spec
        mgr = self.spec.get_manager()
        assert isinstance(mgr, TieringOffloadingManager)
        self.mgr = mgr
        (t,) = mgr.secondary_tiers
        assert isinstance(t, KvbmFsSecondaryTier)
        self.tier = t
        self.steps = 0

    def rows(self) -> np.ndarray:
        return np.asarray(self.mgr.primary_tier.get_kv_memoryview()).view(np.uint8)

    def step(self) -> None:
        self.mgr.on_schedule_end(ScheduleEndContext(new_req_ids=(), preempted_req_ids=()))
        self.steps += 1

    def settle(self, timeout: float = 30.0) -> None:
        """Step until no transfer is in flight (an idle engine keeps stepping while has_pending_work)."""
        end = time.monotonic() + timeout
        while self.mgr.has_pending_work():
            assert time.monotonic() < end, "jobs did not finish"
            self.step()
            time.sleep(0.002)

    def store(self, req: str, keys: list[bytes], data: np.ndarray) -> list[bytes]:
        """A request's computed chunks: prepare_store, the GPU->CPU copy, complete_store (which cascades)."""
        ctx = ReqContext(req)
        self.mgr.on_new_request(ctx)
        out = self.mgr.prepare_store(keys, ctx)
        assert out is not None, "the primary tier refused the store"
        if out.keys_to_store:
            pos = [keys.index(k) for k in out.keys_to_store]
            rows = self.rows()
            rows[out.store_spec.chunk_ids] = data[pos]
            del rows
            self.mgr.complete_store(out.keys_to_store, ctx)
        self.mgr.on_request_finished(ctx)
        self.step()
        return list(out.keys_to_store)

    def lookup_prefix(self, keys: list[bytes], ctx: ReqContext, trace: list[str]) -> int | None:
        """The connector's maximal-prefix lookup: None while a lookup is deferred."""
        hits, defer = 0, False
        for key in keys:
            r = self.mgr.lookup(key, ctx)
            trace.append(r.name)
            if r is LookupResult.MISS:
                break
            if r is LookupResult.RETRY:
                defer = True
                continue
            hits += 1
            defer |= r is LookupResult.HIT_PENDING
        return None if defer else hits

    def restore(
        self, req: str, keys: list[bytes], max_steps: int = 200, pause: float = 0.002
    ) -> tuple[np.ndarray, list[str]]:
        """Look the prefix up step by step until it resolves, then the CPU->GPU copy of its hits."""
        ctx = ReqContext(req)
        self.mgr.on_new_request(ctx)
        trace: list[str] = []
        for _ in range(max_steps):
            n = self.lookup_prefix(keys, ctx, trace)
            if n is not None:
                break
            self.step()
            time.sleep(pause)
        else:
            raise AssertionError(f"lookups never resolved: {trace[-10:]}")
        got = np.empty((n, self.tier.block_size_bytes), np.uint8)
        if n:
            spec = self.mgr.prepare_load(keys[:n], ctx)
            rows = self.rows()
            got[:] = rows[spec.chunk_ids]
            del rows
            self.mgr.complete_load(keys[:n], ctx)
        self.mgr.on_request_finished(ctx)
        self.step()
        return got, trace

    def close(self) -> None:
        self.settle()
        self.mgr.shutdown()


def chunks(n: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = [make_offload_key(rng.bytes(32), 0) for _ in range(n)]
    return keys, rng.integers(0, 256, (n, CHUNK), np.uint8)


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for e in made:
        if e.tier._lease is not None:
            e.close()


def start(engines: list[Engine], tier: dict[str, Any], **kw: Any) -> Engine:
    e = Engine(tier, **kw)
    engines.append(e)
    return e


def store_all(e: Engine, keys: list[bytes], data: np.ndarray, batch: int = 2) -> None:
    for i in range(0, len(keys), batch):
        e.store(f"w{i}", keys[i : i + batch], data[i : i + batch])
        e.settle()


def test_factory_loads_the_tier_out_of_tree(tmp_path: Path) -> None:
    cls = SecondaryTierFactory.get_tier_class(tier_config(tmp_path))
    assert cls is KvbmFsSecondaryTier


def test_stores_cascade_into_kvbm_fs_and_evicted_chunks_load_back(tmp_path: Path, engines: list[Engine]) -> None:
    tier = tier_config(tmp_path, enable_kv_events=True, metrics_port=0)  # the store serves /metrics
    e = start(engines, tier, primary_chunks=4, events=True)
    keys, data = chunks(8, 1)
    store_all(e, keys, data)
    st, ns = e.tier.store, e.tier.namespace
    assert st.match(chunk_keys(ns, keys)).length == 8  # every chunk cascaded into the disk tier
    assert e.tier.counters["stored_chunks"] == 8
    assert st.metrics is not None and st.metrics.port
    with urllib.request.urlopen(f"http://127.0.0.1:{st.metrics.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    written = [ln for ln in text.splitlines() if ln.startswith('kvbm_fs_written_bytes_total{tier="disk"}')]
    assert written and float(written[0].split()[-1]) == 8 * CHUNK
    stored_events = [k for ev in e.mgr.take_events() if not ev.removed and ev.medium.name == "STORAGE" for k in ev.keys]
    assert sorted(stored_events) == sorted(keys)
    # the primary holds 4 chunks: the first 4 were evicted there and come back from kvbm_fs
    got, trace = e.restore("r1", keys[:4])
    assert np.array_equal(got, data[:4]), "restored chunks differ from what was stored"
    assert "RETRY" in trace and "HIT_PENDING" in trace  # the async probe, then the promotion
    assert e.tier.counters["loaded_chunks"] >= 4 and e.tier.counters["failed_chunks"] == 0
    # an unknown chunk is a miss that ends the prefix
    other, _ = chunks(1, 99)
    got, _ = e.restore("r2", keys[:2] + other + keys[2:3])
    assert np.array_equal(got, data[:2])


def test_namespace_says_vllm_offloading_chunk_and_never_matches_the_connectors(
    tmp_path: Path, engines: list[Engine]
) -> None:
    e = start(engines, tier_config(tmp_path))
    ns = e.tier.namespace
    assert "@vllm-offload/" in ns.model and ns.hash_scheme == "vllm" and ns.block_nbytes == CHUNK
    connector_ns = Namespace("tiny-llama@vllm/CPU_ATTN", ns.layout)  # how integration/vllm names its blocks
    assert connector_ns.id != ns.id
    keys, data = chunks(2, 2)
    store_all(e, keys, data)
    st = e.tier.store
    assert st.match(chunk_keys(ns, keys)).length == 2
    st.add_namespace(connector_ns)
    assert st.match(chunk_keys(connector_ns, keys)).length == 0
    # another engine config (here the KV dtype) is another namespace: its chunks never match these
    other = Engine(tier_config(tmp_path / "o"))
    engines.append(other)
    assert other.tier.namespace.id == ns.id  # same config, same names
    cfg = offloading_config(tier_config(tmp_path / "p"), 4)
    from dataclasses import replace

    cfg = replace(cfg, model=OffloadingModelConfig(name="tiny-llama", dtype="bfloat16"))
    from kvbm_fs.integration.vllm_tiering import offload_namespace

    assert offload_namespace(TieringOffloadingSpec(cfg), CHUNK).id != ns.id


@pytest.mark.parametrize("medium", ["disk", "remote"])
def test_a_restarted_engine_finds_the_chunks(tmp_path: Path, engines: list[Engine], medium: str) -> None:
    tier = tier_config(tmp_path)
    if medium == "remote":  # any kvbm_fs tier list: here a remote tier over a shared filesystem
        tier["tiers"] = [f"remote+file://{tmp_path}/objects"]
    e = start(engines, tier, primary_chunks=16)
    keys, data = chunks(10, 3)
    store_all(e, keys, data, batch=5)
    e.close()
    # a new manager, new primary tier (empty) and new store on the same tiers
    e2 = start(engines, tier, primary_chunks=16)
    got, trace = e2.restore("again", keys)
    assert np.array_equal(got, data)
    assert trace[0] == "RETRY" and trace[-1] == "HIT"
    assert e2.tier.counters["loaded_chunks"] == 10


def test_corrupted_chunks_on_disk_are_misses_not_data(tmp_path: Path, engines: list[Engine]) -> None:
    from kvbm_fs.tiers.disk import HEADER_PAGE, DiskTier

    tier = tier_config(tmp_path)
    e = start(engines, tier, primary_chunks=16)
    keys, data = chunks(6, 4)
    store_all(e, keys, data, batch=6)
    ns = e.tier.namespace
    e.close()
    disk = DiskTier(tmp_path, CHUNK, DISK_CAP)
    try:
        (rec,) = disk.index.records(ns.id, chunk_keys(ns, keys[3:4]).hashes)
        assert rec is not None
        seg, off = disk._locate(rec.slot)
        fd = os.open(disk._segment_path(seg), os.O_RDWR)
        try:
            for pos in (0, 100, CHUNK - 1):
                old = os.pread(fd, 1, off + HEADER_PAGE + pos)[0]
                os.pwrite(fd, bytes([old ^ 0x5A]), off + HEADER_PAGE + pos)
        finally:
            os.close(fd)
    finally:
        disk.close()

    e2 = start(engines, tier, primary_chunks=16)
    # the corrupt chunk fails verification in the load job: the promotion reports it failed, vLLM frees
    # its slot, and the next lookup is a MISS there (no livelock re-promoting it): the prefix is 3 chunks
    got, _ = e2.restore("bad", keys)
    assert len(got) == 3 and np.array_equal(got, data[:3])
    assert e2.tier.counters["failed_chunks"] == 1
    assert e2.tier.counters["loaded_chunks"] == 5  # the chunks after it loaded fine (they were asked together)
    assert e2.tier.store.match(chunk_keys(ns, keys)).length == 3  # the disk tier dropped the corrupt block
    # recomputed and stored again, the chunk is whole again for the next request
    e2.store("recompute", keys[3:4], data[3:4])
    e2.settle()
    assert e2.tier.store.match(chunk_keys(ns, keys)).length == 6


def test_backpressure_retry_while_storing_drop_beyond_the_bound(tmp_path: Path, engines: list[Engine]) -> None:
    import threading

    # a bound of 2 chunks in flight; the store thread held busy so jobs stay in flight
    e = start(engines, tier_config(tmp_path, max_inflight_mib=2 * CHUNK / (1 << 20)), primary_chunks=16)
    gate = threading.Event()
    e.tier._stores.submit(gate.wait)
    keys, data = chunks(4, 5)
    e.store("a", keys[:2], data[:2])  # in flight (queued behind the gate)
    e.store("b", keys[2:4], data[2:4])  # beyond the bound: dropped at once
    assert e.tier.counters["dropped_chunks"] == 2
    ctx = ReqContext("probe")
    e.tier.on_new_request(ctx)
    assert e.tier.lookup(keys[0], ctx) is LookupResult.RETRY  # on its way into the tier
    assert e.tier.has_pending_work()
    gate.set()
    e.settle()
    e.tier.on_request_finished(ctx)
    st, ns = e.tier.store, e.tier.namespace
    assert st.match(chunk_keys(ns, keys[:2])).length == 2
    assert not st.match(chunk_keys(ns, keys[2:])).length  # the dropped store never reached kvbm_fs
    e.close()
    # loads at the bound: lookups wait (RETRY) instead of queueing more promotions
    e2 = start(engines, tier_config(tmp_path, max_inflight_mib=2 * CHUNK / (1 << 20)), primary_chunks=16)
    lgate = threading.Event()
    e2.tier._loads.submit(lgate.wait)
    a, trace = ReqContext("a"), list[str]()
    e2.mgr.on_new_request(a)
    for _ in range(200):  # RETRY (probe), HIT_PENDING (promotion queued), then the step submits the load
        e2.lookup_prefix(keys[:2], a, trace)
        e2.step()
        if e2.tier._jobs:
            break
        time.sleep(0.002)
    assert trace[:2] == ["RETRY", "RETRY"] and "HIT_PENDING" in trace
    b = ReqContext("b")
    e2.mgr.on_new_request(b)
    assert e2.mgr.lookup(keys[2], b) is LookupResult.RETRY  # two chunks loading: the bound
    lgate.set()
    e2.settle()
    assert e2.mgr.lookup(keys[2], b) is LookupResult.RETRY  # now the probe (a miss once it answers)
    assert e2.lookup_prefix(keys[:2], a, trace) == 2  # a's chunks arrived in the primary tier
    e2.mgr.on_request_finished(a)
    e2.mgr.on_request_finished(b)
