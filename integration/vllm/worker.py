"""The worker's half of the connector: move blocks between vLLM's KV cache and the store.

Loads are read and verified off the step path (in the background for async loads, layer by layer
during the forward for sync ones) and scattered into the engine's blocks; saves are staged layer by
layer as attention writes them and put on a background thread. Whatever fails is recomputed by vLLM,
never raised into it. Block events of this worker's store ship back to the scheduler each step.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvbm_fs import BlockKeys, ConfigError, LayoutMismatchError, Namespace, Store
from kvbm_fs import engine as engine_kit
from kvbm_fs.events import BlockEvent
from kvbm_fs.tier import Medium

from .metadata import SHIPPED_KINDS, Counters, KvbmFsMetadata, KvbmFsWorkerMeta, ShippedEvent, Transfer
from .options import Options

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger("kvbm_fs.integration.vllm")
IDLE_WAIT_S = 0.02  # how long an idle step's get_finished waits for an async load to complete


@dataclass
class _Staged:
    """Blocks of a load that verified, staged ``[n, layers, page]``, with their engine block ids."""

    stage: torch.Tensor
    idx: torch.Tensor
    failed: list[int]  # engine block ids that did not load
    scattered: int = 0  # leading layers already in the KV cache
    group: int = 0  # the KV-cache group whose layers these are


@dataclass
class _SavePlan:
    """One step's saves, planned at the first ``save_kv_layer`` (or at ``wait_for_save``)."""

    keys: BlockKeys | None = None  # blocks to store, chain order
    ids: np.ndarray | None = None  # their engine block ids
    stage: torch.Tensor | None = None  # [n, layers, page] for the leading n blocks, filled layer by layer
    idx: torch.Tensor | None = None  # engine block ids of those n
    copied: set[int] = field(default_factory=set)  # layers already staged (the group's own indices)
    group: int = 0


class WorkerSide:
    """One worker rank: its KV layer views, its store, and the loads and saves in flight."""

    def __init__(
        self,
        namespace: Namespace,
        rank: int,
        layer_names: list[str],
        kv_cache_config: KVCacheConfig,
        store: Store,
        stats: Counters,
        options: Options,
        groups: list[tuple[Namespace, list[str]]] | None = None,
        state_groups: frozenset[int] = frozenset(),
    ) -> None:
        self.namespace, self.rank, self.layer_names = namespace, rank, layer_names
        self.state_groups = state_groups  # Mamba groups: a layer's block is its state's bytes (opaque)
        # KV-cache groups (hybrid models): each its namespace and layers; a plain model has one
        self.groups = groups or [(namespace, layer_names)]
        self.hybrid = len(self.groups) > 1
        self._group_layers: list[list[int]] = []  # per group: indices into self._layers
        self._failed_reqs: set[str] = set()  # hybrid: requests whose background load failed
        self.layout = namespace.layout
        self.block_size = self.layout.block_size
        self.store, self.stats, self.options = store, stats, options
        self.kv_cache_config = kv_cache_config
        self.meta: Any = None  # this step's KvbmFsMetadata, bound by the connector
        self._layers: list[tuple[str, torch.Tensor]] = []  # (name, view [num_blocks, *page])
        # per group: (page shape, dtype, staged row length); a Mamba row is longer than its state (zeros)
        self._gpage: list[tuple[tuple[int, ...], torch.dtype, int]] = []
        self._load_errors: set[int] = set()
        self._tainted: set[str] = set()  # requests whose load failed this step
        self._checked_ns = False
        self._lock = threading.Lock()
        self._shipping: list[ShippedEvent] = []
        self._chunk = max(1, options.stage_bytes // self.layout.block_nbytes)  # blocks staged per copy
        self._load_pool: ThreadPoolExecutor | None = None  # one thread each: order kept, no contention
        self._read_pool: ThreadPoolExecutor | None = None
        self._save_pool: ThreadPoolExecutor | None = None
        self._loading: dict[str, Future[list[int]]] = {}  # async loads in flight, by request
        self._saving: list[tuple[Future[None], int]] = []  # (put, staged bytes) in flight
        self._save_plan: list[_SavePlan] | None = None  # this step's saves (one plan a group), once planned
        self._layer_load: Future[_Staged] | None = None  # this step's sync load, placed layer by layer
        self._idle_step = False
        self._layer_staged: tuple[Future[_Staged], _Staged] | None = None
        self._layer_index: dict[str, int] = {}
        self._unsubscribe: Callable[[], None] | None = store.events.subscribe(self._on_event)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Check every KV layer against the namespace layout and keep a ``[num_blocks, *page]`` view of it."""
        num_blocks = int(self.kv_cache_config.num_blocks)
        if self.hybrid:
            names = [n for _, group in self.groups for n in group]
            missing = [n for n in names if n not in kv_caches]
            if missing:
                raise LayoutMismatchError(f"kvbm_fs: KV layers {missing} of the KV cache groups were not registered")
        else:
            names = [n for n in self.layer_names if n in kv_caches] or sorted(kv_caches, key=_natural)
        want = sum(ns.layout.num_layers for ns, _ in self.groups)
        if len(names) != want:
            raise LayoutMismatchError(f"kvbm_fs: {len(names)} KV layers registered, the namespace layouts have {want}")
        owner = [g for g, (ns, _) in enumerate(self.groups) for _ in range(ns.layout.num_layers)]
        layers: list[tuple[str, torch.Tensor]] = []
        self._gpage = []
        for name, g in zip(names, owner):
            layer_nbytes = self.groups[g][0].layout.layer_nbytes
            kv = kv_caches[name]
            if kv.shape[0] % num_blocks:
                raise LayoutMismatchError(
                    f"kvbm_fs: layer {name} has {kv.shape[0]} blocks on dim 0, not a multiple of {num_blocks}"
                )
            view = kv.unflatten(0, (num_blocks, kv.shape[0] // num_blocks))  # kernel blocks of one engine block
            nbytes = view[0].numel() * view.element_size()
            if g in self.state_groups:  # Mamba: the state's bytes (conv + ssm) of each block, padded when stored
                view = view.flatten(1).view(torch.uint8)
                ok = nbytes <= layer_nbytes
            else:
                ok = nbytes == layer_nbytes
            if not ok:
                raise LayoutMismatchError(
                    f"kvbm_fs: layer {name} holds {nbytes} bytes per block (shape {tuple(kv.shape)}, {kv.dtype});"
                    f" the namespace layout {self.groups[g][0].layout.to_dict()} needs {layer_nbytes}"
                )
            page = (tuple(view.shape[1:]), view.dtype, layer_nbytes // view.element_size())
            if len(self._gpage) <= g:
                self._gpage.append(page)
            elif page != self._gpage[g]:
                raise LayoutMismatchError(f"kvbm_fs: layer {name} differs in shape or dtype from its group's first")
            layers.append((name, view))
        first = next((g for g in range(len(self.groups)) if g not in self.state_groups), 0)
        shape, dtype, _ = self._gpage[first]  # for the log: the first attention group's page
        self._layers = layers
        self._layer_index = {name: i for i, (name, _) in enumerate(layers)}
        first = 0
        self._group_layers = []
        for ns, _ in self.groups:
            self._group_layers.append(list(range(first, first + ns.layout.num_layers)))
            first += ns.layout.num_layers
        self._layer_group = {gi: (g, j) for g, idx in enumerate(self._group_layers) for j, gi in enumerate(idx)}
        log.info(
            "kvbm_fs: registered %d KV layers, page %s %s (%d B per block)",
            len(layers),
            shape,
            dtype,
            self.layout.block_nbytes,
        )

    def _check_namespace(self, meta: KvbmFsMetadata) -> None:
        if self._checked_ns or not meta.ns_ids:
            return
        want = meta.ns_ids[self.rank] if self.rank < len(meta.ns_ids) else None
        if want != self.namespace.id:
            raise ConfigError(
                f"kvbm_fs: the scheduler keys blocks in namespace {want if want is None else f'{want:016x}'} but"
                f" worker rank {self.rank} computed {self.namespace.short_id} ({self.namespace.to_dict()});"
                " set the attention backend explicitly so that both sides agree"
            )
        self._checked_ns = True

    def _stage(self, n: int, group: int = 0) -> torch.Tensor:
        _, dtype, row = self._gpage[group]
        make = torch.zeros if group in self.state_groups else torch.empty  # a Mamba row's tail is padding
        return make((n, len(self._group_layers[group]), row), dtype=dtype)

    def _pages(self, stage: torch.Tensor, group: int, li: int) -> torch.Tensor:
        """Layer ``li`` of staged rows, shaped as the engine's pages of that group."""
        shape = self._gpage[group][0]
        return stage[:, li, : int(np.prod(shape))].view(stage.shape[0], *shape)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self.meta
        self._layer_load = None
        # a step without a forward (every request waits for its KV): get_finished may block on the loads
        self._idle_step = getattr(forward_context, "attn_metadata", None) is None
        if not isinstance(meta, KvbmFsMetadata):
            return
        self._check_namespace(meta)
        if not meta.loads or not self._layers:
            return
        if self._load_pool is None:  # one thread each: a sync read never queues behind async loads
            self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="kvbm-fs-load")
            self._read_pool = ThreadPoolExecutor(1, thread_name_prefix="kvbm-fs-read")
        by_req: dict[str, list[Transfer]] = {}
        for t in meta.loads:  # one job a request (all its groups), so each is reported once its blocks are in
            if t.background:
                by_req.setdefault(t.req_id, []).append(t)
        for rid, ts in by_req.items():
            self._loading[rid] = self._load_pool.submit(self._load, ts)
        now = [t for t in meta.loads if not t.background]
        if not now:
            return
        if not self.hybrid and sum(len(t.block_ids) for t in now) <= self._chunk:
            # layer-wise: read and verify in the background while the forward starts; each layer's pages
            # go into the KV cache in wait_for_layer_load, just before that layer's attention needs them
            assert self._read_pool is not None
            self._layer_load = self._read_pool.submit(self._read_all, now)
            return
        self._note_failed(meta, self._load(now))  # more than one staging buffer: all before the forward

    def _note_failed(self, meta: KvbmFsMetadata, failed: list[int]) -> None:
        if failed:
            bad = set(failed)
            self._load_errors |= bad
            self._tainted = {t.req_id for t in meta.loads if bad.intersection(t.block_ids)}

    def _load(self, transfers: list[Transfer]) -> list[int]:
        """Read, verify and scatter the transfers' blocks into the engine's KV cache, one staging buffer
        at a time; returns the engine block ids that failed (missing or failed verification)."""
        failed: list[int] = []
        for g in sorted({t.group for t in transfers}):
            t0 = time.perf_counter()
            keys, ids = self._transfer_keys([t for t in transfers if t.group == g])
            gfailed: list[int] = []
            for a in range(0, len(ids), self._chunk):  # bounded staging memory
                st = self._read(keys[a : a + self._chunk], ids[a : a + self._chunk], g)
                self._scatter(st, len(self._group_layers[g]))
                gfailed += st.failed
            self._account_load(len(ids), gfailed, t0, self.groups[g][0].layout.block_nbytes)
            failed += gfailed
        return failed

    def _read_all(self, transfers: list[Transfer]) -> _Staged:
        t0 = time.perf_counter()
        keys, ids = self._transfer_keys(transfers)
        st = self._read(keys, ids)
        self._account_load(len(ids), st.failed, t0, self.layout.block_nbytes)
        return st

    def _transfer_keys(self, transfers: list[Transfer]) -> tuple[BlockKeys, np.ndarray]:
        hashes = np.concatenate([t.hashes for t in transfers])
        parents = np.concatenate([t.parents for t in transfers])
        ids = np.concatenate([np.asarray(t.block_ids, np.int64) for t in transfers])
        return BlockKeys(self.groups[transfers[0].group][0].id, hashes, parents), ids

    def _read(self, keys: BlockKeys, ids: np.ndarray, group: int = 0) -> _Staged:
        """One staging buffer's worth: read and verify, keep only the blocks that verified."""
        stage = self._stage(len(ids), group)
        # recover: a read that raises is a miss of every block, never an error in the engine
        got = engine_kit.load(self.store, keys, _u8_rows(stage), recover=True).got
        ok = np.flatnonzero(got)
        if ok.size != len(ids):
            stage = stage[torch.from_numpy(ok)]
        return _Staged(stage, torch.from_numpy(ids[ok]), ids[~got].tolist(), group=group)

    def _scatter(self, st: _Staged, upto: int) -> None:
        """Put layers ``[st.scattered, upto)`` of the verified blocks into the engine's KV cache."""
        n = st.idx.numel()
        for li in range(st.scattered, upto):
            view = self._layers[self._group_layers[st.group][li]][1]
            if n:
                view[st.idx.to(view.device)] = self._pages(st.stage, st.group, li).to(view.device)
        st.scattered = max(st.scattered, upto)

    def _account_load(self, n: int, failed: list[int], t0: float, block_nbytes: int) -> None:
        if failed:
            log.warning(
                "kvbm_fs: %d of %d blocks failed to load (missing or failed verification); vLLM recomputes them",
                len(failed),
                n,
            )
        ok = n - len(failed)
        self.stats.count(
            loaded_blocks=ok,
            load_failed_blocks=len(failed),
            loaded_bytes=ok * block_nbytes,
            load_s=time.perf_counter() - t0,
        )

    def wait_for_layer_load(self, layer_name: str) -> None:
        """A sync load's pages of this layer (and any earlier one not yet placed) into the KV cache."""
        li = self._layer_index.get(layer_name)
        if self._layer_load is None or li is None:
            return
        st = self._staged()
        before = st.scattered
        self._scatter(st, li + 1)
        if st.scattered > before:
            self.stats.count(layerwise_loaded_layers=st.scattered - before)

    def _staged(self) -> _Staged:
        """The sync layer-wise load of this step, waited for once; its failures are noted then."""
        assert self._layer_load is not None
        first = self._layer_staged is None or self._layer_staged[0] is not self._layer_load
        if first:
            st = self._layer_load.result()
            meta = self.meta
            if isinstance(meta, KvbmFsMetadata):
                self._note_failed(meta, st.failed)
            self._layer_staged = (self._layer_load, st)
        assert self._layer_staged is not None
        return self._layer_staged[1]

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """Stage this layer's pages of the step's new blocks as soon as its attention has written them,
        so the copy-out is spread over the forward (on a GPU, overlapped with the next layers' compute)
        instead of all landing in ``wait_for_save``."""
        gi = self._layer_index.get(layer_name)
        if gi is None:
            return
        plans = self._save_plan if self._save_plan is not None else self._plan_saves()
        g, li = self._layer_group[gi]
        plan = plans[g]
        if plan.stage is None or li in plan.copied:
            return
        self._stage_layer(plan, li)
        self.stats.count(layerwise_saved_layers=1)

    def _plan_saves(self) -> list[_SavePlan]:
        """This step's blocks to save, one plan a KV-cache group: those not stored yet, minus requests
        whose load failed (their KV attended to garbage). The leading ones (up to
        ``max_inflight_save_bytes``) get a staging buffer that ``save_kv_layer`` fills layer by layer."""
        meta = self.meta
        if self._layer_load is not None:
            self._staged()  # this step's failed loads taint their requests' saves
        plans = [_SavePlan(group=g) for g in range(len(self.groups))]
        self._save_plan = plans
        if not isinstance(meta, KvbmFsMetadata) or not meta.saves or not self._layers:
            return plans
        t0 = time.perf_counter()
        todo_all = [t for t in meta.saves if t.req_id not in self._tainted]
        skipped = sum(len(t.block_ids) for t in meta.saves) - sum(len(t.block_ids) for t in todo_all)
        for g, plan in enumerate(plans):
            todo = [t for t in todo_all if t.group == g]
            if not todo:
                continue
            ns = self.groups[g][0]
            keys = BlockKeys(
                ns.id,
                np.concatenate([t.hashes for t in todo]),
                np.concatenate([t.parents for t in todo]),
            )
            ids = np.asarray([b for t in todo for b in t.block_ids], dtype=np.int64)
            # local tiers only: this runs inside the forward, and a remote HEAD round trip there would
            # stall it (PUTs are idempotent)
            present = engine_kit.present(self.store, keys, skip=(Medium.REMOTE,))
            new = np.flatnonzero(~present)
            skipped += int(present.sum())
            plan.keys, plan.ids = keys[new], ids[new]
            if new.size and self.store.events.active and all(t.tokens is not None for t in todo):
                # before the put: the KV-event publisher fills these blocks' token_ids from it
                toks = np.concatenate([t.tokens for t in todo if t.tokens is not None])
                self.store.note_tokens(plan.keys, toks.reshape(len(keys), self.block_size)[new])
            n = min(new.size, max(1, self.options.max_inflight_save_bytes // ns.layout.block_nbytes))
            if n:
                plan.stage = self._stage(n, g)
                plan.idx = torch.as_tensor(plan.ids[:n], dtype=torch.long)
        self.stats.count(save_skipped_blocks=skipped, save_s=time.perf_counter() - t0)
        return plans

    def _stage_layer(self, plan: _SavePlan, li: int) -> None:
        assert plan.stage is not None and plan.idx is not None
        view = self._layers[self._group_layers[plan.group][li]][1]
        self._pages(plan.stage, plan.group, li).copy_(view[plan.idx.to(view.device)])
        plan.copied.add(li)

    def wait_for_save(self) -> None:
        self._drain_saves()  # the previous step's puts: their events ship with this step
        if self._layer_load is not None:  # layers the engine never waited for still go into the cache
            self._scatter(self._staged(), len(self._layers))
        plans = self._save_plan if self._save_plan is not None else self._plan_saves()
        self._save_plan, self._tainted = None, set()
        for plan in plans:
            self._save_group(plan)

    def _save_group(self, plan: _SavePlan) -> None:
        if plan.keys is None or not len(plan.keys):
            return
        layers = self._group_layers[plan.group]
        nbytes = self.groups[plan.group][0].layout.block_nbytes
        staged = 0
        if plan.stage is not None:  # layers the engine did not hand to save_kv_layer are copied now
            for li in range(len(layers)):
                if li not in plan.copied:
                    self._stage_layer(plan, li)
            staged = plan.stage.shape[0]
            self._submit_save(plan.keys[:staged], _u8_rows(plan.stage), nbytes)
        ids = plan.ids
        assert ids is not None
        for a in range(staged, len(plan.keys), self._chunk):  # the rest: bounded staging, chunk by chunk
            b = min(len(plan.keys), a + self._chunk)
            idx = torch.as_tensor(ids[a:b], dtype=torch.long)
            stage = self._stage(b - a, plan.group)
            for li, gi in enumerate(layers):
                view = self._layers[gi][1]
                self._pages(stage, plan.group, li).copy_(view[idx.to(view.device)])
            self._submit_save(plan.keys[a:b], _u8_rows(stage), nbytes)

    def _submit_save(self, keys: BlockKeys, rows: torch.Tensor, block_nbytes: int) -> None:
        """Hand staged rows to the save thread; the engine's own blocks are free to change from here on."""
        nbytes = int(rows.numel())
        if not self.options.async_save:
            self._put(keys, rows, block_nbytes)
            return
        while self._saving and sum(n for _, n in self._saving) + nbytes > self.options.max_inflight_save_bytes:
            fut, _ = self._saving.pop(0)
            fut.result()
        if self._save_pool is None:
            self._save_pool = ThreadPoolExecutor(1, thread_name_prefix="kvbm-fs-save")
        self._saving.append((self._save_pool.submit(self._put, keys, rows, block_nbytes), nbytes))

    def _put(self, keys: BlockKeys, rows: torch.Tensor, block_nbytes: int) -> None:
        t0 = time.perf_counter()
        # planned as new in _plan_saves; a dead or full write-through tier drops blocks (counted), and a
        # put that raises only costs a future recompute (recover): never an error in the engine
        res = engine_kit.save(
            self.store, keys, rows, write_through=self.options.write_through, skip_present=False, recover=True
        )
        if res.error is not None:
            self.stats.count(save_failed_blocks=len(keys))
            return
        self.stats.count(
            saved_blocks=res.saved,
            saved_bytes=res.saved * block_nbytes,
            write_through_failed_blocks=res.dropped,
            save_s=time.perf_counter() - t0,
        )

    def _drain_saves(self) -> None:
        pending, self._saving = self._saving, []
        for fut, _ in pending:
            fut.result()

    def flush(self) -> None:
        """Wait for every background load and save: their blocks, stats and events are then final."""
        self._drain_saves()
        for fut in list(self._loading.values()):
            fut.result()

    def _on_event(self, ev: BlockEvent) -> None:
        if ev.kind not in SHIPPED_KINDS:
            return
        tier = self.store.tier(ev.tier)
        item = (ev.kind.value, ev.tier, tier.medium.value, tier.shareable, ev.keys.ns, ev.keys.hashes.copy())
        with self._lock:
            self._shipping.append(item)

    def build_connector_worker_meta(self) -> KvbmFsWorkerMeta | None:
        with self._lock:
            if not self._shipping:
                return None
            events, self._shipping = self._shipping, []
        return KvbmFsWorkerMeta(events)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Async loads that completed; their failed blocks go out with them (vLLM's rule). Saves never
        hold engine blocks (they are staged), so nothing is reported as finished sending."""
        if self._idle_step and self._loading:
            # Nothing else runs this step: without this the engine loop spins through empty steps and,
            # holding the GIL, starves the load thread (measured: a 4k-token host load 7x slower).
            wait_futures(list(self._loading.values()), timeout=IDLE_WAIT_S, return_when=FIRST_COMPLETED)
        done = [rid for rid, fut in self._loading.items() if fut.done()]
        for rid in done:
            failed = self._loading.pop(rid).result()
            if self.hybrid and failed:  # vLLM takes a multi-group request's failure only as a whole
                self._failed_reqs.add(rid)
            else:
                self._load_errors.update(failed)
        if done:
            self.stats.count(async_load_requests=len(done))
        return None, set(done) or None

    def take_failed_requests(self) -> set[str]:
        """Requests whose background load failed (hybrid models): vLLM recomputes each whole."""
        out, self._failed_reqs = self._failed_reqs, set()
        return out

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    # ---- lifecycle -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish every load and save, stop the threads and the event subscription (the store stays:
        the connector releases it)."""
        try:
            self.flush()
        finally:
            for pool in (self._load_pool, self._read_pool, self._save_pool):
                if pool is not None:
                    pool.shutdown(wait=True)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


def _u8_rows(stage: torch.Tensor) -> torch.Tensor:
    return stage.view(torch.uint8).view(stage.shape[0], -1)


def _natural(name: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


__all__ = ["WorkerSide"]
