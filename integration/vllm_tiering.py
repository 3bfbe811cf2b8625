"""kvbm_fs as a secondary tier of vLLM 0.32's own KV offloading (``vllm/v1/kv_offload/tiering``).

vLLM keeps GPU <-> CPU (its ``OffloadingConnector`` and CPU primary tier); this tier keeps the primary's
chunks in a kvbm_fs store (disk, S3, Mooncake, peers: any tier list ``mount`` takes), verified, persistent
and with the store's daemon, metrics and KV events. vLLM loads it out of tree from the tier config::

    {"type": "KvbmFsSecondaryTier", "module_path": "kvbm_fs.integration.vllm_tiering",
     "tiers": ["file:///var/cache/kvbm?capacity=200GiB"]}

Every method runs in vLLM's scheduler and returns at once: stores and loads are jobs on two small
thread pools (loads never queue behind stores), reported through ``get_finished_jobs``; lookups are
answered by vLLM's own ``AsyncLookupManager`` (RETRY until the background probe answers), a chunk this
tier is still storing is RETRY, and in-flight bytes are bounded (stores beyond the bound are dropped,
lookups wait while loads are at it). A chunk that fails verification is a failed load, which vLLM
recomputes; it is never data. See docs/vllm.md ("vLLM offloading tier").
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import queue
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, ClassVar

import numpy as np
import xxhash
from vllm.v1.kv_offload.base import (
    Locality,
    LookupResult,
    OffloadingEvent,
    OffloadingSpec,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
)
from vllm.v1.kv_offload.base import Medium as VllmMedium
from vllm.v1.kv_offload.file_mapper import FileMapper
from vllm.v1.kv_offload.tiering.async_lookup import AsyncLookupManager, LookupPhase
from vllm.v1.kv_offload.tiering.backpressure import BackpressureDetector
from vllm.v1.kv_offload.tiering.base import JobId, JobResult, SecondaryTierManager, TransferJob

from .. import engine
from ..keys import BlockKeys, Namespace
from ..layout import KVLayout
from ..mount import mount
from ..store import Store

log = logging.getLogger("kvbm_fs.vllm_tiering")

MODEL_SUFFIX = "@vllm-offload/"  # a namespace's model names what its blocks are: vLLM offloading chunks
_MiB = 1 << 20


def offload_namespace(spec: OffloadingSpec, chunk_nbytes: int, model: str | None = None, tenant: str = "") -> Namespace:
    """The namespace of this engine's offloading chunks. Its model is ``<model>@vllm-offload/<digest>``,
    the digest over what vLLM's own fs tier names its folder by (model, dtype, tokens per hash, blocks
    per chunk, KV groups, parallelism unless agnostic, canonical format), and its hash scheme is
    ``vllm``: the connector's blocks (``<model>@vllm/<backend>``, ``kvbm-v1``) can never match. A block
    is one primary-tier row of ``chunk_nbytes`` opaque bytes."""
    fields = FileMapper.from_offloading_spec("", spec, spec.blocks_per_chunk, parallel_agnostic=True).fields
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    tokens = max(spec.tokens_per_block or (1,)) * spec.blocks_per_chunk
    if tokens & (tokens - 1) or chunk_nbytes % (2 * tokens):  # the layout needs a power of two dividing the row
        tokens = 1
    layout = KVLayout(
        num_layers=1, num_kv_heads=1, head_dim=chunk_nbytes // (2 * tokens), block_size=tokens, dtype="uint8"
    )
    name = model or str(fields["model_name"])
    return Namespace(f"{name}{MODEL_SUFFIX}{digest}", layout, tenant=tenant, hash_scheme="vllm")


def chunk_keys(ns: Namespace, keys: Sequence[OffloadKey]) -> BlockKeys:
    """kvbm_fs keys of vLLM offload keys (block hash + 4-byte group index), folded with xxh3-64 as
    ``engine_hash_to_u64`` folds any engine hash that is not 8 bytes long."""
    h = xxhash.xxh3_64_intdigest
    return BlockKeys(ns.id, np.fromiter((h(k, 0) for k in keys), np.uint64, len(keys)))


class _Lookups(AsyncLookupManager):
    """vLLM's background existence probe, asking the store (every tier, fastest first)."""

    def __init__(self, tier: KvbmFsSecondaryTier) -> None:
        super().__init__(tier_type=tier.tier_type)
        self._tier = tier

    def batch_lookup(self, keys: list[OffloadKey], req_context: ReqContext) -> Iterable[bool]:
        t = self._tier
        return engine.present(t.store, chunk_keys(t.namespace, keys)).tolist()

    def mark_hit(self, keys: Collection[OffloadKey]) -> None:
        """A store just completed: a cached "absent" verdict for these keys is stale."""
        for key in keys:
            state = self._lookup_state.get(key)
            if state is not None and state.phase is LookupPhase.RESOLVED:
                state.result = True


class KvbmFsSecondaryTier(SecondaryTierManager):
    """A vLLM ``SecondaryTierManager`` over a kvbm_fs store. Options (the tier config's other keys):
    ``tiers`` (kvbm_fs tier URLs or tables, fastest first) and/or ``config`` (a kvbm_fs config file);
    ``policy``, ``daemon``, ``metrics_port``, ``events``, ``cost`` as for ``mount``; ``model``/``tenant``
    for the namespace; ``write_through`` (default true: a save reaches every persistent tier at once);
    ``load_threads``/``store_threads``; ``max_inflight_mib``/``max_inflight_jobs`` (the bound);
    ``enable_kv_events``/``locality`` as vLLM's fs tier."""

    medium: ClassVar[VllmMedium] = VllmMedium.STORAGE

    def __init__(
        self,
        offloading_spec: OffloadingSpec,
        primary_kv_view: memoryview,
        tier_type: str,
        tiers: Sequence[str | Mapping[str, Any]] = (),
        config: str | Mapping[str, Any] | None = None,
        model: str | None = None,
        tenant: str = "",
        write_through: bool = True,
        load_threads: int = 1,
        store_threads: int = 1,
        max_inflight_mib: float = 256,
        max_inflight_jobs: int = 64,
        enable_kv_events: bool = False,
        locality: str | None = None,
        backpressure_detector: BackpressureDetector | None = None,
        **mount_options: Any,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        self.locality = Locality(locality) if locality is not None else None
        stride = self.block_size_bytes
        self._rows = np.asarray(primary_kv_view).view(np.uint8).reshape(len(primary_kv_view), -1)[:, :stride]
        self.namespace = offload_namespace(offloading_spec, stride, model, tenant)
        self.store: Store = mount(
            *tiers,
            layout=self.namespace.layout,
            model=self.namespace.model,
            tenant=tenant,
            rank=0,  # the scheduler's primary row holds every worker's bytes, in rank order
            world_size=1,
            hash_scheme="vllm",
            config=config,
            **mount_options,
        )
        self._lease: engine.Lease[Store] | None = _STORES.acquire(next(_SERIAL), lambda: self.store)
        engine.warn_layout_siblings(self.store, self.namespace, "vllm_tiering")
        self._write_through = bool(write_through)
        self._max_bytes = int(max_inflight_mib * _MiB)
        self._max_jobs = int(max_inflight_jobs)
        self._loads = ThreadPoolExecutor(max(1, load_threads), "kvbm_fs_tier_load")
        self._stores = ThreadPoolExecutor(max(1, store_threads), "kvbm_fs_tier_store")
        self._done: queue.SimpleQueue[JobResult] = queue.SimpleQueue()  # written by the pools
        self._dropped: list[JobResult] = []  # stores refused by the bound, reported at the next poll
        self._jobs: dict[JobId, tuple[bool, list[OffloadKey], int, Future[None]]] = {}  # load?, keys, bytes
        self._inflight = [0, 0]  # bytes in flight: [stores, loads]
        self._storing: dict[OffloadKey, int] = {}  # keys of in-flight stores (lookup says RETRY)
        self.counters = {"stored_chunks": 0, "loaded_chunks": 0, "failed_chunks": 0, "dropped_chunks": 0}
        self.events: list[OffloadingEvent] | None = None
        if enable_kv_events and offloading_spec.kv_events_config.enable_kv_cache_events:
            self.events = []
        self._lookup = _Lookups(self)
        log.info(
            "vllm_tiering: tier %s over kvbm_fs tiers %s, namespace %s, %d-byte chunks",
            tier_type,
            engine.tier_names(self.store),
            self.namespace.short_id,
            stride,
        )

    # ---- scheduler-side API (never blocks) ------------------------------------------------------------
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        if key in self._storing or (self._inflight[1] >= self._max_bytes and self._inflight[1]):
            return LookupResult.RETRY  # on its way in, or loads are at the bound: ask again next step
        found = self._lookup.lookup(key, req_context)
        if found is None:
            return LookupResult.RETRY
        return LookupResult.HIT if found else LookupResult.MISS

    def submit_store(self, job_metadata: TransferJob) -> None:
        keys = list(job_metadata.keys)
        nbytes = len(keys) * self.block_size_bytes
        busy = self._inflight[0] + nbytes > self._max_bytes or len(self._jobs) >= self._max_jobs
        if busy and (self._inflight[0] or self._jobs):  # one job alone always goes, however large
            self.counters["dropped_chunks"] += len(keys)
            self._dropped.append(JobResult(job_metadata.job_id, False, transfer_bytes=0))
            return
        ids = np.asarray(job_metadata.chunk_ids, np.int64).copy()
        for k in keys:
            self._storing[k] = self._storing.get(k, 0) + 1
        self._inflight[0] += nbytes
        fut = self._stores.submit(self._store_job, job_metadata.job_id, keys, ids)
        self._jobs[job_metadata.job_id] = (False, keys, nbytes, fut)

    def submit_load(self, job_metadata: TransferJob) -> None:
        keys = list(job_metadata.keys)
        nbytes = len(keys) * self.block_size_bytes
        ids = np.asarray(job_metadata.chunk_ids, np.int64).copy()
        self._inflight[1] += nbytes
        fut = self._loads.submit(self._load_job, job_metadata.job_id, keys, ids)
        self._jobs[job_metadata.job_id] = (True, keys, nbytes, fut)

    def get_finished_jobs(self) -> Iterable[JobResult]:
        out, self._dropped = self._dropped, []
        while True:
            try:
                res = self._done.get_nowait()
            except queue.Empty:
                break
            is_load, keys, nbytes, _ = self._jobs.pop(res.job_id)
            self._inflight[is_load] -= nbytes
            if is_load:
                n = len(keys) if res.success else len(res.successful_keys or ())
                self.counters["loaded_chunks"] += n
                self.counters["failed_chunks"] += len(keys) - n
                if not res.success:  # vLLM recomputes these; the probe must not send it back to them
                    good = set(res.successful_keys or ())
                    self._lookup.mark_miss([k for k in keys if k not in good])
            else:
                self.counters["stored_chunks"] += (res.transfer_bytes or 0) // self.block_size_bytes
                for k in keys:
                    left = self._storing.pop(k) - 1
                    if left:
                        self._storing[k] = left
                if res.success:
                    self._lookup.mark_hit(keys)
                    if self.events is not None:
                        self.events.append(OffloadingEvent(keys, self.medium, False, self.locality))
            out.append(res)
        return out

    def has_pending_work(self) -> bool:
        return bool(self._jobs or self._dropped)

    def take_events(self) -> Iterable[OffloadingEvent]:
        if self.events:
            out, self.events = self.events, []
            yield from out

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._lookup.cleanup(req_context.req_id)

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self._lookup.flush()

    def drain_jobs(self) -> None:
        """Wait for every submitted job (none is cancelled: a half-done copy would corrupt a row)."""
        wait_futures([j[3] for j in self._jobs.values()])

    def shutdown(self) -> None:
        """Finish the jobs, stop the threads, and close the store (which persists its volatile tiers)."""
        self._lookup.shutdown()
        self.drain_jobs()
        self._loads.shutdown(wait=True)
        self._stores.shutdown(wait=True)
        self._rows = np.zeros((0, 0), np.uint8)  # vLLM releases the primary memoryview next: no export may remain
        lease, self._lease = self._lease, None
        if lease is not None:
            _STORES.release(lease)

    # ---- the jobs (pool threads) ------------------------------------------------------------------------
    def _store_job(self, job_id: JobId, keys: list[OffloadKey], ids: np.ndarray) -> None:
        t0 = time.perf_counter()
        try:
            res = engine.save(
                self.store,
                chunk_keys(self.namespace, keys),
                lambda idx: self._rows[ids[idx]],  # copies only the chunks the store lacks
                write_through=self._write_through,
                recover=True,
                what="vllm_tiering",
            )
            ok, saved = res.failed == 0, res.saved
        except Exception:  # never let a job vanish: vLLM waits for every job it submitted
            log.exception("vllm_tiering: store job %d failed", job_id)
            ok, saved = False, 0
        dt = time.perf_counter() - t0
        self._done.put(JobResult(job_id, ok, transfer_time=dt, transfer_bytes=saved * self.block_size_bytes))

    def _load_job(self, job_id: JobId, keys: list[OffloadKey], ids: np.ndarray) -> None:
        t0 = time.perf_counter()
        got = np.zeros(len(keys), bool)
        try:
            bk = chunk_keys(self.namespace, keys)
            if ids.size and np.array_equal(ids, np.arange(ids[0], ids[0] + ids.size)):
                got = engine.load(self.store, bk, self._rows[ids[0] : ids[0] + ids.size], recover=True).got
            else:  # scattered slots: load into a staging buffer, copy the verified rows
                buf = np.empty((len(keys), self.block_size_bytes), np.uint8)
                got = engine.load(self.store, bk, buf, recover=True).got
                self._rows[ids[got]] = buf[got]
        except Exception:
            log.exception("vllm_tiering: load job %d failed", job_id)
        n = int(got.sum())
        if n < len(keys):
            log.warning("vllm_tiering: %d of %d chunks failed to load; vLLM recomputes them", len(keys) - n, len(keys))
        ok = n == len(keys)
        good = None if ok else tuple(k for k, g in zip(keys, got.tolist()) if g) or None
        dt = time.perf_counter() - t0
        self._done.put(JobResult(job_id, ok, good, transfer_time=dt, transfer_bytes=n * self.block_size_bytes))


_STORES: engine.Registry[Store] = engine.Registry(engine.close_store, "vllm_tiering")  # closes at exit too
_SERIAL = itertools.count()  # one lease per tier object (an id() can be reused once its owner is gone)

__all__ = ["MODEL_SUFFIX", "KvbmFsSecondaryTier", "chunk_keys", "offload_namespace"]
