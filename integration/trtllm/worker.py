"""Worker side (every rank): moves verified blocks between kvbm_fs and TensorRT-LLM's KV pool."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import numpy as np
import torch

from kvbm_fs import BlockKeys, ConfigError, Namespace, Store
from kvbm_fs import engine as engine_kit

from .api import WorkerBase
from .layout import pool_layout, store_config
from .state import KvbmFsTrtllmMeta, KvLoadError, Transfer, _Counters, _engines, _Side

log = logging.getLogger("kvbm_fs.integration.trtllm")

WORKER_STATS = (
    "loaded_blocks",
    "loaded_bytes",
    "load_failed_blocks",
    "saved_blocks",
    "saved_bytes",
    "save_skipped_blocks",
    "save_failed_blocks",
    "write_through_failed_blocks",  # saved, but a persistent tier dropped them (dead, full)
    "load_s",
    "save_s",
)


class _LoadJob:
    """One step's loads on the background thread: layer ``i`` is ready once ``ready[i]`` is set."""

    def __init__(self, layers: int, transfers: list[Transfer], cuda: bool) -> None:
        self.transfers = transfers
        self.ready = [threading.Event() for _ in range(layers)]
        self.events: list[Any] = [None] * layers
        self.failed: list[int] = []  # engine block ids not delivered
        self.error: BaseException | None = None
        self.cuda = cuda

    def finish(self) -> None:
        for e in self.ready:
            e.set()


class KvbmFsTrtllmWorker(WorkerBase, _Side):
    """Worker side (every rank): moves blocks between kvbm_fs and TensorRT-LLM's KV pool."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self._setup(llm_args)
        self.write_through = bool(self.options.get("write_through", False))
        self.async_save = bool(self.options.get("async_save", True))
        self.kv: torch.Tensor | None = None
        self.namespace: Namespace | None = None
        self._counters = _Counters(WORKER_STATS)
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvbm-trtllm-load")
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="kvbm-trtllm-save")
        self._futures: list[Future[Any]] = []
        self._step: _LoadJob | None = None  # this step's synchronous loads
        self._loading: set[int] = set()  # parked requests whose loads are running
        self._await_save: set[int] = set()
        self._await_load: set[int] = set()
        self._load_stream: Any = None
        self._save_stream: Any = None
        self._closed = False

    def stats(self) -> dict[str, float]:
        """Cumulative transfer counters of this worker."""
        return self._counters.snapshot()

    @property
    def store(self) -> Store:
        if self.engine.store is None or self.namespace is None:
            raise ConfigError("kvbm_fs trtllm: register_kv_caches has not been called")
        return self.engine.store

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        """Name the pool's layout and open the store for it; a pinned layout it does not match is refused."""
        layout = pool_layout(kv_cache_tensor, self.block_size, store_config(self.options).layout)
        self.namespace = self.engine.open(layout, self.rank, self.world)
        self.kv = kv_cache_tensor
        if kv_cache_tensor.is_cuda:
            self._load_stream = torch.cuda.Stream(device=kv_cache_tensor.device)
            self._save_stream = torch.cuda.Stream(device=kv_cache_tensor.device)
        log.info(
            "kvbm_fs trtllm: rank %d registered KV pool %s %s, namespace %s, tiers %s",
            self.rank,
            tuple(kv_cache_tensor.shape),
            kv_cache_tensor.dtype,
            self.namespace.short_id,
            engine_kit.tier_names(self.store),
        )

    def _meta(self) -> KvbmFsTrtllmMeta | None:
        meta = self.get_connector_meta()
        if not isinstance(meta, KvbmFsTrtllmMeta) or self.kv is None:
            return None
        if meta.ns_ids and self.namespace is not None and meta.ns_ids[self.rank] != self.namespace.id:
            raise ConfigError(
                f"kvbm_fs trtllm: the scheduler keys rank {self.rank} in namespace {meta.ns_ids[self.rank]:016x},"
                f" this worker computed {self.namespace.short_id} ({self.namespace.to_dict()})"
            )
        return meta

    # ---- loads ----------------------------------------------------------------------------------------
    def start_load_kv(self, stream: Any) -> None:
        self._finish_step_load()
        meta = self._meta()
        if meta is None or not meta.loads:
            return
        assert self.kv is not None
        now = [t for t in meta.loads if not t.parked]
        parked = [t for t in meta.loads if t.parked]
        if now:
            job = self._step = _LoadJob(int(self.kv.shape[1]), now, self.kv.is_cuda)
            self._submit(self._loader, self._run_load, job)
        if parked:
            with self._lock:
                self._loading.update(t.req_id for t in parked)
            job = _LoadJob(int(self.kv.shape[1]), parked, self.kv.is_cuda)
            self._submit(self._loader, self._run_parked, job)

    def _fetch(self, t: Transfer) -> tuple[torch.Tensor, np.ndarray]:
        """Verified rows of ``t``: the scheduler's (same process, same rank) or read again from the store."""
        if t.staged is not None and t.staged_rank == self.rank and len(t.staged) == len(t.block_ids):
            return t.staged, np.ones(len(t.block_ids), bool)
        ns = self.namespace
        assert ns is not None
        rows = torch.empty((len(t.block_ids), ns.block_nbytes), dtype=torch.uint8, pin_memory=self._pinned())
        return rows, engine_kit.load(self.store, BlockKeys(ns.id, t.hashes, t.parents), rows).got

    def _pinned(self) -> bool:
        return self.kv is not None and self.kv.is_cuda

    def _run_load(self, job: _LoadJob) -> None:
        t0 = time.perf_counter()
        try:
            rows, ids = self._gather_rows(job)
            self._copy_layers(job, rows, ids)
        except BaseException as e:  # never leave the forward waiting
            job.error = e
            log.exception("kvbm_fs trtllm: load failed")
        finally:
            job.finish()
            self._counters.add(load_s=time.perf_counter() - t0)

    def _gather_rows(self, job: _LoadJob) -> tuple[list[torch.Tensor], list[int]]:
        parts: list[torch.Tensor] = []
        ids: list[int] = []
        for t in job.transfers:
            rows, got = self._fetch(t)
            ok = np.flatnonzero(got)
            if ok.size:
                parts.append(rows if ok.size == len(got) else rows[torch.as_tensor(ok)])
                ids += [t.block_ids[i] for i in ok.tolist()]
            job.failed += [t.block_ids[i] for i in np.flatnonzero(~got).tolist()]
        ns = self.namespace
        assert ns is not None
        self._counters.add(
            loaded_blocks=len(ids), loaded_bytes=len(ids) * ns.block_nbytes, load_failed_blocks=len(job.failed)
        )
        return parts, ids

    def _copy_layers(self, job: _LoadJob, parts: list[torch.Tensor], ids: list[int]) -> None:
        """Copy layer by layer so the forward can start on layer 0 while later layers still copy."""
        kv = self.kv
        assert kv is not None
        if not ids:
            return
        src = torch.cat(parts).view(kv.dtype).view(len(ids), *kv.shape[1:])
        idx = torch.as_tensor(ids, dtype=torch.long, device=kv.device)
        for li in range(int(kv.shape[1])):
            if job.cuda:
                with torch.cuda.stream(self._load_stream):
                    kv[idx, li] = src[:, li].to(kv.device, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(self._load_stream)
                    job.events[li] = ev
            else:
                kv[idx, li] = src[:, li]
            job.ready[li].set()

    def _run_parked(self, job: _LoadJob) -> None:
        self._run_load(job)
        if job.cuda and job.events and job.events[-1] is not None:
            job.events[-1].synchronize()
        if job.failed or job.error is not None:
            # cannot happen with rows the scheduler verified and staged (the only case it parks requests);
            # TensorRT-LLM has no way to fail an async load, so the request stays parked, never served
            log.error("kvbm_fs trtllm: a parked load failed; its requests are held, not served: %s", job.failed)
            return
        with self._lock:
            self._loading.difference_update(t.req_id for t in job.transfers)

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        job = self._step
        if job is None or layer_idx >= len(job.ready):
            return
        job.ready[layer_idx].wait()
        if job.error is not None or job.failed:
            raise KvLoadError(
                f"kvbm_fs trtllm: {len(job.failed)} claimed block(s) could not be loaded (evicted or corrupted"
                f" since verification); failing the step instead of computing on missing KV: {job.error or ''}"
            )
        ev = job.events[layer_idx]
        if ev is not None:
            (stream if stream is not None else torch.cuda.current_stream()).wait_event(ev)

    def _finish_step_load(self) -> None:
        job, self._step = self._step, None
        if job is not None:
            for e in job.ready:
                e.wait()

    # ---- saves ----------------------------------------------------------------------------------------
    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        return  # whole blocks are snapshotted at wait_for_save, once every layer of the step is written

    def wait_for_save(self, stream: Any) -> None:
        self._finish_step_load()
        meta = self._meta()
        if meta is None or not meta.saves:
            return
        ns, kv = self.namespace, self.kv
        assert ns is not None and kv is not None
        keys = BlockKeys(
            ns.id, np.concatenate([t.hashes for t in meta.saves]), np.concatenate([t.parents for t in meta.saves])
        )
        ids = [b for t in meta.saves for b in t.block_ids]
        if all(t.tokens is not None for t in meta.saves):  # before the put: KV events get the blocks' tokens
            self.store.note_tokens(keys, np.concatenate([t.tokens for t in meta.saves if t.tokens is not None]))
        rows, ev = self._snapshot(ids, stream)
        req_ids = [t.req_id for t in meta.saves]
        with self.engine.lock:
            for r in req_ids:
                self.engine.pending_saves[r] = self.engine.pending_saves.get(r, 0) + 1
        if self.async_save:
            self._submit(self._saver, self._run_save, keys, rows, ev, req_ids)
        else:
            self._run_save(keys, rows, ev, req_ids)

    def _snapshot(self, ids: list[int], stream: Any) -> tuple[torch.Tensor, Any]:
        """Copy the blocks out now: on CUDA on a side stream the forward stream then waits for, so no later
        kernel can overwrite them first; the host never blocks."""
        kv = self.kv
        assert kv is not None
        idx = torch.as_tensor(ids, dtype=torch.long, device=kv.device)
        if not kv.is_cuda:
            return kv[idx].contiguous(), None
        main = stream if stream is not None else torch.cuda.current_stream(kv.device)
        side = self._save_stream
        side.wait_stream(main)
        with torch.cuda.stream(side):
            host = torch.empty((len(ids), *kv.shape[1:]), dtype=kv.dtype, pin_memory=True)
            host.copy_(kv[idx], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(side)
        main.wait_stream(side)
        return host, ev

    def _run_save(self, keys: BlockKeys, rows: torch.Tensor, ev: Any, req_ids: list[int]) -> None:
        t0 = time.perf_counter()
        try:
            if ev is not None:
                ev.synchronize()
            self._store_rows(keys, rows.view(torch.uint8).view(len(keys), -1))
        except Exception:
            self._counters.add(save_failed_blocks=len(keys))
            log.exception("kvbm_fs trtllm: saving %d blocks failed", len(keys))
        finally:
            with self.engine.lock:
                for r in req_ids:
                    left = self.engine.pending_saves.get(r, 1) - 1
                    if left > 0:
                        self.engine.pending_saves[r] = left
                    else:
                        self.engine.pending_saves.pop(r, None)
            self._counters.add(save_s=time.perf_counter() - t0)

    def _store_rows(self, keys: BlockKeys, rows: torch.Tensor) -> None:
        res = engine_kit.save(self.store, keys, rows, write_through=self.write_through)
        assert self.namespace is not None
        self._counters.add(
            saved_blocks=res.saved,
            saved_bytes=res.saved * self.namespace.block_nbytes,
            save_skipped_blocks=res.skipped,
            save_failed_blocks=res.failed,
            write_through_failed_blocks=res.dropped,
        )

    # ---- completion -----------------------------------------------------------------------------------
    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        with self._lock:
            self._await_save.update(finished_gen_req_ids)
            self._await_load.update(started_loading_req_ids)
            saved = [r for r in self._await_save if self.engine.saves_in_flight(r) == 0]
            loaded = [r for r in self._await_load if r not in self._loading]
            self._await_save.difference_update(saved)
            self._await_load.difference_update(loaded)
        return saved, loaded

    def _submit(self, pool: ThreadPoolExecutor, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            self._futures = [f for f in self._futures if not f.done()]
            self._futures.append(pool.submit(fn, *args))

    def flush(self) -> None:
        """Wait for every load and save submitted so far (shutdown, tests)."""
        with self._lock:
            futures = list(self._futures)
        wait_futures(futures)

    def shutdown(self) -> None:
        """Finish in-flight transfers and drop this worker's hold on the store (closed, persisting host
        tiers, once the scheduler lets go too; ``close_all`` at exit otherwise)."""
        if self._closed:
            return
        self._closed = True
        self.flush()
        self._loader.shutdown()
        self._saver.shutdown()
        _engines.release(self._lease)


__all__ = ["KvbmFsTrtllmWorker"]
