"""The class vLLM loads: it probes the engine, opens the store, and hands each call to its role's half.

vLLM builds one connector per role (scheduler, worker) from the same class; each gets a SchedulerSide
or a WorkerSide and answers the other role's calls with nothing, as vLLM's base class does.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from kvbm_fs import Store
from kvbm_fs import engine as engine_kit

from . import layout as vllm_layout
from .layout import attention_backend, group_namespaces, worker_rank
from .metadata import Counters, KvbmFsMetadata, KvbmFsStats, KvbmFsWorkerMeta
from .options import Options, store_config
from .scheduler import SchedulerSide
from .stores import acquire_store, release_store
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvbm_fs.integration.vllm")

_live: weakref.WeakSet[KvbmFsConnector] = weakref.WeakSet()


def live_connectors() -> list[KvbmFsConnector]:
    """The connectors alive in this process (for tests and introspection)."""
    return list(_live)


def _is_state(spec: Any) -> bool:
    from vllm.v1.kv_cache_interface import MambaSpec

    return isinstance(spec, MambaSpec)


class KvbmFsConnector(KVConnectorBase_V1, SupportsHMA):
    """kvbm_fs as a vLLM V1 KV connector (kv_both; kv_consumer only loads, kv_producer only saves).

    SupportsHMA: a hybrid model (full + sliding-window attention, or + Mamba under vLLM's Mamba prefix
    caching) keeps vLLM's hybrid KV-cache manager; each KV-cache group is stored in its own namespace
    (docs/vllm.md, Hybrid models)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        tc = self._kv_transfer_config
        self.extra: dict[str, Any] = dict(tc.kv_connector_extra_config or {})
        self.loads_enabled = tc.kv_role in ("kv_both", "kv_consumer")
        self.saves_enabled = tc.kv_role in ("kv_both", "kv_producer")
        self.options = Options.parse(self.extra, producer=tc.kv_role == "kv_producer")
        if self.loads_enabled and tc.kv_load_failure_policy != "recompute":
            log.warning(
                "kvbm_fs: kv_load_failure_policy=%r: a block that fails verification fails its request;"
                " set kv_load_failure_policy='recompute' to recompute it instead",
                tc.kv_load_failure_policy,
            )
        vllm_layout.refuse_state_groups(kv_cache_config)
        self.layer_names: list[str] = [n for g in kv_cache_config.kv_cache_groups for n in g.layer_names]
        kv_layers = [
            n for g in kv_cache_config.kv_cache_groups if not _is_state(g.kv_cache_spec) for n in g.layer_names
        ]
        self.backend = attention_backend(vllm_config, kv_layers or self.layer_names)  # Mamba layers have their own
        if self.loads_enabled and not vllm_layout.loads_on_context(self.backend):
            log.warning(
                "kvbm_fs: the %s attention backend cannot prefill on top of loaded KV (vLLM turns prefix caching"
                " off for it); this engine stores its blocks but never loads any",
                self.backend,
            )
            self.loads_enabled = False
        self.groups, group_ns = group_namespaces(vllm_config, kv_cache_config, self.extra, self.backend)
        vllm_layout.warn_cpu_mamba_chunks(vllm_config, self.groups)
        primary = vllm_layout.primary_group(self.groups)
        self.namespaces = group_ns[primary]
        order = [primary] + [g for g in range(len(group_ns)) if g != primary]  # the store opens with the primary
        self.layout = self.namespaces[0].layout
        self.block_size = self.layout.block_size
        # Mamba groups: the state at block boundaries, saved from vLLM's exact hand-offs, not block tables
        self.state_groups = frozenset(g.index for g in self.groups if g.kind == "mamba")
        is_worker = role == KVConnectorRole.WORKER
        self.rank = worker_rank(vllm_config) if is_worker else 0
        self.namespace = self.namespaces[self.rank]
        self.engine_id = str(tc.engine_id)
        store, self._store_lease = acquire_store(
            self.engine_id,
            "worker" if is_worker else "scheduler",
            self.extra,
            [group_ns[g][self.rank] for g in order] if is_worker else [ns for g in order for ns in group_ns[g]],
        )
        self.store: Store | None = store
        if not is_worker and self.loads_enabled and store is not None:
            # a prepopulation under another block size or dtype would otherwise show up only as zero hits
            engine_kit.warn_layout_siblings(store, self.namespace, "kvbm_fs connector")
        # the scheduler sees the worker's own store (same process), or keeps a directory of its process-local tiers
        self.shared = is_worker or self._store_lease.key == (self.engine_id, "worker")
        self._closed = False
        self.stats = Counters()
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        if is_worker:
            assert store is not None
            self.worker = WorkerSide(
                self.namespace,
                self.rank,
                self.layer_names,
                kv_cache_config,
                store,
                self.stats,
                self.options,
                groups=[(nss[self.rank], list(g.layer_names)) for g, nss in zip(self.groups, group_ns)],
                state_groups=self.state_groups,
            )
        else:
            self.scheduler = SchedulerSide(
                self.namespaces,
                store,
                self.shared,
                self.stats,
                loads=self.loads_enabled,
                saves=self.saves_enabled,
                async_load=self.options.async_load,
                save_tokens=store_config(self.extra).events is not None,
                groups=[(g.window_blocks, nss) for g, nss in zip(self.groups, group_ns)],
                state_groups=self.state_groups,
                primary=primary,
            )
        _live.add(self)
        log.info(
            "kvbm_fs connector (%s) namespace %s: %s, tiers %s%s",
            role.name,
            self.namespace.short_id,
            self.namespace.model,
            engine_kit.tier_names(store) if store is not None else [],
            "" if self.shared else " (+ the workers' process-local tiers, kept from their events)",
        )

    @property
    def totals(self) -> KvbmFsStats:
        """Counters since start-up (for tests and introspection)."""
        return self.stats.totals

    # ---- stats ---------------------------------------------------------------------------------------
    def get_kv_connector_stats(self) -> KvbmFsStats | None:
        return self.stats.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvbmFsStats:
        return KvbmFsStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: Any, labelnames: Any, per_engine: Any) -> Any:
        """kvbm_fs counters on vLLM's own /metrics (integration/vllm_metrics.py)."""
        from kvbm_fs.integration.vllm_metrics import KvbmFsPromMetrics

        return KvbmFsPromMetrics(vllm_config, metric_types, labelnames, per_engine)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        return None  # any physical layout: blocks are copied through the layer tensors' strides

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss

    # ---- scheduler side ------------------------------------------------------------------------------
    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self.scheduler is not None:
            self.scheduler.kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.scheduler is None:
            return 0, False
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        if self.scheduler is None:
            return {}
        return self.scheduler.get_external_cache_hit_sources(request, num_external_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if self.scheduler is not None:
            self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvbmFsMetadata:
        if self.scheduler is None:
            return KvbmFsMetadata(ns_ids=tuple(ns.id for ns in self.namespaces))
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self.scheduler is not None:
            self.scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.scheduler is None:
            return False, None
        return self.scheduler.request_finished(request, block_ids)

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        if self.scheduler is None:
            return False, None
        return self.scheduler.request_finished_all_groups(request, block_ids)

    def take_events(self) -> Iterable[Any]:
        return () if self.scheduler is None else self.scheduler.take_events()

    # ---- worker side ---------------------------------------------------------------------------------
    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None:
            self.worker.meta = connector_metadata

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        if self.worker is not None:
            self.worker.meta = None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.worker is not None:
            self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.worker is not None:
            self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        if self.worker is not None:
            self.worker.save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self) -> None:
        if self.worker is not None:
            self.worker.wait_for_save()

    def build_connector_worker_meta(self) -> KvbmFsWorkerMeta | None:
        return None if self.worker is None else self.worker.build_connector_worker_meta()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.worker is None:
            return None, None
        return self.worker.get_finished(finished_req_ids)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        out = super().get_transfer_results(finished_req_ids)
        if self.worker is not None:  # a hybrid model's failed loads: vLLM recomputes the whole request
            out.failed_recving = self.worker.take_failed_requests()
        return out

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set() if self.worker is None else self.worker.get_block_ids_with_load_errors()

    def flush(self) -> None:
        """Wait for every background load and save: their blocks, stats and events are then final."""
        if self.worker is not None:
            self.worker.flush()

    # ---- lifecycle -----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.worker is not None:
            self.worker.close()
        release_store(self._store_lease)


__all__ = ["KvbmFsConnector", "live_connectors"]
