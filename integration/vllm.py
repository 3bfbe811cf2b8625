"""vLLM (0.32, V1 engine) KV connector: prompts seen before load their KV from kvbm_fs instead of recomputing it.

Load it with vLLM's own configuration::

    --kv-transfer-config '{"kv_connector": "KvbmFsConnector",
                           "kv_connector_module_path": "kvbm_fs.integration.vllm",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"tiers": ["host://?capacity=8GiB", "file:///var/cache/kvbm"]}}'

The worker owns the store and moves bytes (layer-wise, verified, in the background); the scheduler
matches prompts against it, or against its shareable tiers plus a mirror of the workers' process-local
tiers when it runs in a process of its own. Options, behaviour and failure semantics: docs/vllm.md;
design: docs/architecture.md 1.13.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvbm_fs import BlockKeys, ConfigError, EventKind, KVLayout, LayoutMismatchError, Namespace, Store
from kvbm_fs import engine as engine_kit
from kvbm_fs.config import resolve
from kvbm_fs.engine import Lease, Registry, close_store
from kvbm_fs.events import BlockEvent
from kvbm_fs.layout import dtype_name
from kvbm_fs.mount import build_store
from kvbm_fs.tier import Medium

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

EXTRA_KEYS = frozenset(
    {
        "tiers",
        "config",
        "model",
        "tenant",
        "policy",
        "daemon",
        "cost",
        "layout",
        "write_through",
        "async_load",
        "async_save",
        "max_inflight_save_bytes",
        "events",
    }
)

# Semantic axis order of one layer's page as each backend stores it (see the class docstring: the
# bytes are copied in the per-layer view's logical order, so only the backend's packing matters).
# CPU_ATTN: [H, N, 2*D] read as [H, 2*N, D] by the kernel, i.e. per head all K rows, then all V rows.
BACKEND_ORDER = {"CPU_ATTN": "LHKTD"}
DEFAULT_ORDER = "LHTKD"  # [H, N, (K|V)*D]; unknown backends are told apart by name in the namespace anyway
MLA_ORDER = "LTD"  # an MLA layer's block: [tokens, latent dim]
# Backends that cannot compute a prefill on top of context they did not compute themselves. vLLM's CPU
# platform turns prefix caching and chunked prefill off for MLA without AMX (platforms/cpu.py): a prefill
# on cached context drifts from a full one there (logprobs 3e-4 off at once, a different token by the
# fourth), for vLLM's own cache hits and for loaded blocks alike (bit-identical to each other), so a
# load would serve results a full prefill would not give.
NO_CONTEXT_BACKENDS = frozenset({"CPU_MLA"})

STAGE_BYTES = 256 << 20  # host staging buffer per load/save batch
IDLE_WAIT_S = 0.02  # how long an idle step's get_finished waits for an async load to complete
MEDIUM_RANK = {"gpu": 0, "host": 1, "peer": 2, "disk": 3, "remote": 4}
FP8_CACHE = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


# ---- namespace ------------------------------------------------------------------------------------


def attention_backend(vllm_config: VllmConfig, layer_names: Iterable[str] = ()) -> str:
    """Name of the attention backend of the KV layers (``CPU_ATTN``, ``FLASH_ATTN``, ...).

    Read from the model's attention layers where this process built the model (every worker, and the
    scheduler when it shares the worker's process); otherwise asked of vLLM's backend selector with the
    model's head size and dtypes, as the layers asked it. The worker checks, on the first step, that
    the scheduler's namespace is its own, so a disagreement is refused rather than mis-keyed."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, list(layer_names) or None)
    names = {layer.get_attn_backend().get_name() for layer in layers.values()}
    if len(names) > 1:
        raise ConfigError(f"kvbm_fs: the KV layers use several attention backends {sorted(names)}; it needs one")
    if names:
        return str(names.pop())
    try:
        from vllm.config import set_current_vllm_config
        from vllm.v1.attention.selector import get_attn_backend

        mc = vllm_config.model_config
        with set_current_vllm_config(vllm_config):
            cls = get_attn_backend(
                mc.get_head_size(),
                mc.dtype,
                vllm_config.cache_config.cache_dtype,
                num_heads=mc.get_num_attention_heads(vllm_config.parallel_config),
            )
        return str(cls.get_name())
    except Exception as e:  # an exotic model the selector cannot be asked about out of context
        log.warning("kvbm_fs: could not resolve the attention backend here (%s); keying by the configured one", e)
    configured = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    if configured is not None:
        return str(getattr(configured, "name", configured))
    from vllm.platforms import current_platform

    return f"auto-{current_platform.device_type}"


def engine_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, backend: str) -> KVLayout:
    """The KVLayout of the engine's KV cache, from the scheduler's own KV cache spec."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError(
            f"kvbm_fs: the engine has {len(groups)} KV cache groups (a hybrid model); this connector supports one"
        )
    spec = groups[0].kv_cache_spec
    if not isinstance(spec, FullAttentionSpec):
        raise ConfigError(f"kvbm_fs: KV cache spec {type(spec).__name__} is not supported (full attention only)")
    mla = isinstance(spec, MLAAttentionSpec)  # one latent vector per token (kv_lora_rank + rope dims), no K/V split
    if getattr(spec, "sliding_window", None) or getattr(spec, "attention_chunk_size", None):
        raise ConfigError("kvbm_fs: sliding-window / chunked attention KV is not supported")
    if not mla and spec.head_size_v not in (None, spec.head_size):
        raise ConfigError(f"kvbm_fs: K head size {spec.head_size} != V head size {spec.head_size_v} is not supported")
    if int(getattr(spec, "kv_quant_mode", 0) or 0):
        raise ConfigError(f"kvbm_fs: quantized KV ({spec.kv_quant_mode}) is not supported")
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    dtype = FP8_CACHE.get(cache_dtype) or dtype_name(spec.dtype)
    if dtype is None:
        raise ConfigError(f"kvbm_fs: KV cache dtype {spec.dtype} (cache_dtype={cache_dtype!r}) is not supported")
    return KVLayout(
        num_layers=len(groups[0].layer_names),
        num_kv_heads=1 if mla else int(spec.num_kv_heads),
        head_dim=int(spec.head_size),
        block_size=int(spec.block_size),
        dtype=dtype,
        order=MLA_ORDER if mla else BACKEND_ORDER.get(backend, DEFAULT_ORDER),
        mla=mla,
    )


def parallel_world(vllm_config: VllmConfig) -> int:
    pc = vllm_config.parallel_config
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if int(getattr(pc, name, 1) or 1) > 1:
            raise ConfigError(f"kvbm_fs: {name} > 1 is not supported")
    return int(pc.tensor_parallel_size) * int(pc.pipeline_parallel_size)


def worker_rank(vllm_config: VllmConfig) -> int:
    """This worker's rank among TP x PP workers (pp_rank * tp_size + tp_rank)."""
    tp = int(vllm_config.parallel_config.tensor_parallel_size)
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        return int(get_pp_group().rank_in_group) * tp + int(get_tensor_model_parallel_rank())
    except (ImportError, AssertionError, AttributeError):
        return int(vllm_config.parallel_config.rank)


def namespaces(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, extra: Mapping[str, Any], backend: str
) -> tuple[Namespace, ...]:
    """One namespace per worker rank: model, engine KV layout, rank, tenant. A ``layout`` pinned in the
    connector config (or its config file) that the engine does not have is refused here."""
    layout = engine_layout(vllm_config, kv_cache_config, backend)
    cfg = store_config(extra)
    pinned = cfg.layout
    if pinned is not None and pinned != layout:
        raise LayoutMismatchError(
            f"kvbm_fs: the configured layout {pinned.to_dict()} does not match this engine's KV cache "
            f"{layout.to_dict()} (dtype, heads, head dim, block size and layer count must all match)"
        )
    model = str(extra.get("model") or vllm_config.model_config.model)
    tenant = str(cfg.tenant or "")
    world = parallel_world(vllm_config)
    if layout.mla and int(vllm_config.parallel_config.tensor_parallel_size) > 1:
        # every TP rank holds the same latent KV: keying it per TP rank would store it TP times, and one
        # writer per block needs the per-process (host) tiers of the other ranks filled some other way
        raise ConfigError("kvbm_fs: MLA models with tensor parallelism > 1 are not supported yet (TP=1, any PP)")
    return tuple(Namespace(f"{model}@vllm/{backend}", layout, r, world, tenant) for r in range(world))


def store_config(extra: Mapping[str, Any]) -> Any:
    """The kvbm_fs StoreConfig for this connector: extra config, then its ``config`` file, then env."""
    unknown = set(extra) - EXTRA_KEYS
    if unknown:
        raise ConfigError(
            f"kvbm_fs: unknown kv_connector_extra_config key(s) {sorted(unknown)}; known: {sorted(EXTRA_KEYS)}"
        )
    explicit = {k: extra[k] for k in ("tiers", "tenant", "policy", "daemon", "cost", "layout", "events") if k in extra}
    return resolve(config=extra.get("config"), **explicit)


# ---- stores --------------------------------------------------------------------------------------------
# The worker-side connector opens the engine's store with every configured tier. The scheduler-side
# connector shares that Store when it runs in the same process (an engine with one worker whose
# executor runs it in the engine-core process: vLLM builds the worker first), and then matches against
# exactly what the worker holds. Otherwise (the CPU platform runs its worker in a process of its own
# unless VLLM_ENABLE_V1_MULTIPROCESSING=0; TP/PP > 1) the scheduler opens only the tiers that processes share
# (persistent ones: disk, remote) and mirrors the workers' process-local tiers (host, gpu) from the
# block events each worker ships back with every step (``build_connector_worker_meta``).

# (engine id, "worker"|"scheduler") -> Store | None; whatever is still open closes at exit (persisting host tiers)
_stores: Registry[Store | None] = Registry(close_store)
close_all = _stores.close_all


def shareable(tier: Any) -> bool:
    """Whether a tier (URL or table) can be opened by several processes at once (``Tier.shareable``)."""
    from kvbm_fs.registry import TierSpec, tier_class

    url = tier if isinstance(tier, str) else tier.get("url")
    cls = tier_class(TierSpec.parse(str(url)).scheme)
    return bool(getattr(cls, "shareable", True))  # remote tiers come from a factory: shared by nature


def _acquire_store(
    engine_id: str, role: str, extra: Mapping[str, Any], nss: list[Namespace]
) -> tuple[Store | None, Lease[Store | None]]:
    """The store for ``role``: the worker's full store; for the scheduler, the worker's when it lives
    in this process, else a store of the shareable tiers only (None when there are none)."""

    def make() -> Store | None:
        cfg = store_config(extra)
        cfg.model, cfg.layout, cfg.tenant = nss[0].model, nss[0].layout, nss[0].tenant
        cfg.rank, cfg.world_size = nss[0].rank, nss[0].world_size
        if key[1] == "scheduler":
            cfg.tiers = [t for t in cfg.tiers if shareable(t)]
            cfg.daemon = False  # placement runs where the data is: in the worker's store
            cfg.events = None  # so do KV events: the worker's store publishes them (one PUB per port)
        return build_store(cfg) if cfg.tiers else None

    with _stores.lock:
        key = (engine_id, "worker")
        if role == "scheduler" and key not in _stores:
            key = (engine_id, "scheduler")
        lease = _stores.acquire(key, make)
    store = lease.value
    if store is not None:
        for ns in nss:
            store.add_namespace(ns)
    return store, lease


_live: weakref.WeakSet[KvbmFsConnector] = weakref.WeakSet()


def live_connectors() -> list[KvbmFsConnector]:
    """The connectors alive in this process (for tests and introspection)."""
    return list(_live)


# ---- metadata and stats -----------------------------------------------------------------------------


@dataclass
class Transfer:
    """Blocks of one request to move: chained keys (hash, parent) and the engine block ids they map to."""

    req_id: str
    hashes: np.ndarray
    parents: np.ndarray
    block_ids: list[int]
    background: bool = False  # an async load: the request waits off the step path, get_finished reports it
    tokens: np.ndarray | None = None  # a save's token ids (uint32, len(hashes) * block_size), for KV events


@dataclass
class KvbmFsMetadata(KVConnectorMetadata):
    """Scheduler -> worker plan for one step. Plain data: it pickles across processes."""

    ns_ids: tuple[int, ...] = ()
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


# block events a worker ships to the scheduler: (kind, tier, medium, shareable, namespace id, hashes);
# the scheduler mirrors only tiers that are not shareable (it opens the shareable ones itself)
ShippedEvent = tuple[str, str, str, bool, int, np.ndarray]
SHIPPED_KINDS = frozenset(
    {EventKind.STORED, EventKind.REMOVED, EventKind.EVICTED, EventKind.PROMOTED, EventKind.DEMOTED}
)


@dataclass
class KvbmFsWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: what the worker's store gained and lost."""

    events: list[ShippedEvent] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KvbmFsWorkerMeta:
        if isinstance(other, KvbmFsWorkerMeta):
            self.events.extend(other.events)
        return self


COUNTERS = (
    "lookups",  # requests matched
    "lookup_tokens",  # prompt tokens those requests asked about
    "hit_tokens",  # tokens the connector offered to load
    "refused",  # requests refused (multimodal / prompt embeddings)
    "loaded_blocks",
    "load_failed_blocks",
    "loaded_bytes",
    "saved_blocks",
    "save_skipped_blocks",  # already stored, or computed in a step whose load failed
    "saved_bytes",
    "save_failed_blocks",  # a put that raised (dropped: recomputed next time)
    "write_through_failed_blocks",  # saved, but a persistent tier (write_through) dropped them: dead, full
    "async_load_requests",  # requests whose blocks loaded in the background (load_kv_async)
    "layerwise_saved_layers",  # layer copies staged in save_kv_layer, during the forward
    "layerwise_loaded_layers",  # layers a sync load placed in wait_for_layer_load, during the forward
)
TIMERS = ("load_s", "save_s", "match_s")


@dataclass
class KvbmFsStats(KVConnectorStats):
    """Counters for one interval; worker and scheduler stats are summed by ``aggregate``."""

    def __post_init__(self) -> None:
        for k in (*COUNTERS, *TIMERS):
            self.data.setdefault(k, 0.0 if k in TIMERS else 0)

    def reset(self) -> None:
        self.data = dict[str, Any]()
        self.__post_init__()

    def aggregate(self, other: KVConnectorStats) -> KvbmFsStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self.data)
        looked = out.get("lookup_tokens", 0)
        out["hit_rate"] = round(out.get("hit_tokens", 0) / looked, 4) if looked else 0.0
        for k in TIMERS:
            out[k] = round(float(out.get(k, 0.0)), 6)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in COUNTERS)


# ---- the connector -----------------------------------------------------------------------------------


@dataclass
class _Staged:
    """Blocks of a load that verified, staged ``[n, layers, page]``, with their engine block ids."""

    stage: torch.Tensor
    idx: torch.Tensor
    failed: list[int]  # engine block ids that did not load
    scattered: int = 0  # leading layers already in the KV cache


@dataclass
class _SavePlan:
    """One step's saves, planned at the first ``save_kv_layer`` (or at ``wait_for_save``)."""

    keys: BlockKeys | None = None  # blocks to store, chain order
    ids: np.ndarray | None = None  # their engine block ids
    stage: torch.Tensor | None = None  # [n, layers, page] for the leading n blocks, filled layer by layer
    idx: torch.Tensor | None = None  # engine block ids of those n
    copied: set[int] = field(default_factory=set)  # layers already staged


@dataclass
class _Req:
    request: Any
    hashes: np.ndarray  # Dynamo sequence hashes of the prompt's full blocks
    parents: np.ndarray
    stored: int = 0  # leading blocks known to be in the store (not saved again)
    load: tuple[int, int] | None = None  # block range planned for loading in the next step
    load_start: int = 0
    load_cap: int | None = None  # leading blocks it may still load: capped at its first failed load
    load_ids: list[int] = field(default_factory=list)  # engine blocks of the last load
    load_async: bool = False  # the planned load runs in the background (load_kv_async)
    by_tier: dict[str, int] = field(default_factory=dict)


class KvbmFsConnector(KVConnectorBase_V1):
    """kvbm_fs as a vLLM V1 KV connector (kv_both; kv_consumer only loads, kv_producer only saves)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        tc = self._kv_transfer_config
        self.extra: dict[str, Any] = dict(tc.kv_connector_extra_config or {})
        self.loads_enabled = tc.kv_role in ("kv_both", "kv_consumer")
        self.saves_enabled = tc.kv_role in ("kv_both", "kv_producer")
        self.write_through = bool(self.extra.get("write_through", False))
        self.async_load = _auto_flag(self.extra, "async_load")
        self.async_save = _flag(self.extra, "async_save", True)
        self.max_inflight_save_bytes = _size(self.extra, "max_inflight_save_bytes", STAGE_BYTES)
        if self.loads_enabled and tc.kv_load_failure_policy != "recompute":
            log.warning(
                "kvbm_fs: kv_load_failure_policy=%r: a block that fails verification fails its request;"
                " set kv_load_failure_policy='recompute' to recompute it instead",
                tc.kv_load_failure_policy,
            )
        group = kv_cache_config.kv_cache_groups[0] if kv_cache_config.kv_cache_groups else None
        self.layer_names: list[str] = list(group.layer_names) if group is not None else []
        self.backend = attention_backend(vllm_config, self.layer_names)
        if self.loads_enabled and self.backend in NO_CONTEXT_BACKENDS:
            log.warning(
                "kvbm_fs: the %s attention backend cannot prefill on top of loaded KV (vLLM turns prefix caching"
                " off for it); this engine stores its blocks but never loads any",
                self.backend,
            )
            self.loads_enabled = False
        self.namespaces = namespaces(vllm_config, kv_cache_config, self.extra, self.backend)
        self.layout = self.namespaces[0].layout
        self.block_size = self.layout.block_size
        is_worker = role == KVConnectorRole.WORKER
        self.rank = worker_rank(vllm_config) if is_worker else 0
        self.namespace = self.namespaces[self.rank]
        self.engine_id = str(tc.engine_id)
        store, self._store_lease = _acquire_store(
            self.engine_id,
            "worker" if is_worker else "scheduler",
            self.extra,
            [self.namespace] if is_worker else list(self.namespaces),
        )
        self.store: Store | None = store
        # the scheduler sees the worker's own store (same process), or mirrors its process-local tiers
        self.shared = is_worker or self._store_lease.key == (self.engine_id, "worker")
        self._closed = False
        self._stats = KvbmFsStats()
        self.totals = KvbmFsStats()  # cumulative, for tests and introspection
        self._lock = threading.Lock()
        self._unsubscribe: Any = None
        # scheduler side
        self._reqs: dict[str, _Req] = {}
        self._refused: set[str] = set()
        self._mirror: dict[str, tuple[str, dict[int, set[int]]]] = {}  # tier -> (medium, ns id -> hashes)
        self._events: list[ShippedEvent] = []  # for take_events
        self._event_tokens: dict[int, tuple[list[int], int | None, str | None]] = {}
        self._save_tokens = store_config(self.extra).events is not None  # saves carry their token ids
        # worker side
        self._layers: list[tuple[str, torch.Tensor]] = []  # (name, view [num_blocks, *page])
        self._page_shape: tuple[int, ...] = ()
        self._kv_dtype: torch.dtype | None = None
        self._load_errors: set[int] = set()
        self._tainted: set[str] = set()  # requests whose load failed this step
        self._checked_ns = False
        self._shipping: list[ShippedEvent] = []
        self._chunk = max(1, STAGE_BYTES // self.layout.block_nbytes)  # blocks staged per copy
        self._load_pool: ThreadPoolExecutor | None = None  # one thread each: order kept, no contention
        self._read_pool: ThreadPoolExecutor | None = None
        self._save_pool: ThreadPoolExecutor | None = None
        self._loading: dict[str, Future[list[int]]] = {}  # async loads in flight, by request
        self._saving: list[tuple[Future[None], int]] = []  # (put, staged bytes) in flight
        self._save_plan: _SavePlan | None = None  # this step's saves, once planned
        self._layer_load: Future[_Staged] | None = None  # this step's sync load, placed layer by layer
        self._idle_step = False
        self._layer_staged: tuple[Future[_Staged], _Staged] | None = None
        self._layer_index: dict[str, int] = {}
        if is_worker:
            assert self.store is not None
            self._unsubscribe = self.store.events.subscribe(self._on_worker_event)
        _live.add(self)
        log.info(
            "kvbm_fs connector (%s) namespace %s: %s, tiers %s%s",
            role.name,
            self.namespace.short_id,
            self.namespace.model,
            [t.name for t in self.store.tiers] if self.store is not None else [],
            "" if self.shared else " (+ the workers' process-local tiers, mirrored from their events)",
        )

    # ==== stats ==========================================================================================
    def _count(self, **kv: float) -> None:
        with self._lock:
            for k, v in kv.items():
                self._stats.data[k] += v
                self.totals.data[k] += v

    def get_kv_connector_stats(self) -> KvbmFsStats | None:
        with self._lock:
            if self._stats.is_empty():
                return None
            out, self._stats = self._stats, KvbmFsStats()
        return out

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

    # ==== scheduler side =================================================================================
    def _keys(self, req: Request) -> _Req | None:
        st = self._reqs.get(req.request_id)
        if st is not None and st.request is req:
            return st
        why = None
        if getattr(req, "mm_features", None):
            why = "multimodal inputs (their blocks are not named by token ids alone)"
        elif req.prompt_token_ids is None or getattr(req, "prompt_embeds", None) is not None:
            why = "prompt embeddings"
        if why is not None:
            if req.request_id not in self._refused:
                self._refused.add(req.request_id)
                self._count(refused=1)
                log.warning("kvbm_fs: request %s refused (%s): not matched, not saved", req.request_id, why)
            return None
        lora = getattr(req, "lora_request", None)
        keys = self.namespaces[0].keys_for_tokens(
            np.asarray(req.prompt_token_ids, dtype=np.int64),
            cache_salt=getattr(req, "cache_salt", None),
            lora_name=getattr(lora, "lora_name", None) if lora is not None else None,
        )
        st = self._reqs[req.request_id] = _Req(req, keys.hashes, keys.parents)
        return st

    def _locate(self, st: _Req, n: int) -> tuple[int, list[str]]:
        """Leading blocks of ``st`` (at most ``n``) present for every rank, and the tier of each (rank 0)."""
        length, names0 = n, [""] * n
        for r, ns in enumerate(self.namespaces):
            keys = BlockKeys(ns.id, st.hashes[:length], st.parents[:length])
            if self.shared and self.store is not None:
                m = self.store.match(keys)
                found = min(m.length, m.worth)  # the cost model may say the tail is faster to recompute
                names = [""] * len(keys)
                for name, a, b in m.runs:
                    names[a:b] = [name] * (b - a)
            else:
                names = self._where_mirrored(keys)
                found = next((i for i, nm in enumerate(names) if not nm), len(names))
            length = min(length, found)
            if r == 0:
                names0 = names
            if length == 0:
                break
        return length, names0[:length]

    def _where_mirrored(self, keys: BlockKeys) -> list[str]:
        names = [""] * len(keys)
        hs = keys.hashes.tolist()
        for tier, (_, per_ns) in sorted(self._mirror.items(), key=lambda kv: MEDIUM_RANK.get(kv[1][0], 9)):
            have = per_ns.get(keys.ns)
            if have:
                for i, h in enumerate(hs):
                    if not names[i] and h in have:
                        names[i] = tier
        todo = np.asarray([i for i, nm in enumerate(names) if not nm], dtype=np.int64)
        if self.store is not None and todo.size:
            for t in self.store.tiers:
                hit = todo[t.contains(keys[todo])]
                for i in hit.tolist():
                    names[i] = t.name
                todo = np.setdiff1d(todo, hit)
                if not todo.size:
                    break
        return names

    def _medium(self, tier: str) -> str:
        if tier in self._mirror:
            return self._mirror[tier][0]
        if self.store is not None:
            try:
                return str(self.store.tier(tier).medium.value)
            except KeyError:
                pass
        return "disk"

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._keys(request)
        if st is None or not self.loads_enabled:
            return 0, False
        st.load, st.by_tier = None, {}
        usable = (len(request.prompt_token_ids) - 1) // self.block_size  # never the block of the last token
        if usable <= 0 or num_computed_tokens >= usable * self.block_size:
            return 0, False
        t0 = time.perf_counter()
        # a block that failed to load for this request is recomputed, not offered again: a tier that
        # matches but cannot deliver (a remote dying between HEAD and GET) would otherwise reschedule
        # the request into the same failing load forever
        limit = usable if st.load_cap is None else min(usable, st.load_cap)
        n, names = self._locate(st, limit) if limit > 0 else (0, [])
        st.stored = max(st.stored, n)
        start = num_computed_tokens // self.block_size
        ext = max(0, n * self.block_size - num_computed_tokens)
        self._count(lookups=1, lookup_tokens=len(request.prompt_token_ids), match_s=time.perf_counter() - t0)
        if ext == 0:
            return 0, False
        st.load = (start, n)
        for name in names[start:n]:
            st.by_tier[name] = st.by_tier.get(name, 0) + 1
        slow = any(self._medium(name) in ("peer", "disk", "remote") for name in st.by_tier)
        st.load_async = self.async_load is True or (self.async_load == "auto" and slow)
        return ext, st.load_async

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        if num_external_tokens == 0:
            return {}
        st = self._reqs.get(request.request_id)
        out: dict[Any, int] = {}
        if st is not None and st.by_tier:
            for name, blocks in st.by_tier.items():
                medium = self._medium(name)
                src = (
                    CacheHitSource.HOST
                    if medium in ("gpu", "host")
                    else CacheHitSource.P2P
                    if medium == "peer"
                    else CacheHitSource.DISK
                )
                out[src] = out.get(src, 0) + blocks * self.block_size
        if sum(out.values()) != num_external_tokens:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        return out

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens <= 0 or st.load is None:
            st.load = None
            return
        # vLLM loads whole blocks counted back from the end of the planned range (a local sub-block
        # tail it keeps is rewritten with identical bytes)
        stop = st.load[1]
        start = max(0, stop - -(-num_external_tokens // self.block_size))
        ids = blocks.get_block_ids()[0]
        st.load, st.load_start = (start, stop), start
        st.load_ids = list(ids[start:stop])
        self._count(hit_tokens=num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvbmFsMetadata:
        meta = KvbmFsMetadata(ns_ids=tuple(ns.id for ns in self.namespaces))
        for p in self._reqs.values():
            if p.load is not None and p.load_ids:
                a, b = p.load
                t = Transfer(p.request.request_id, p.hashes[a:b], p.parents[a:b], list(p.load_ids), p.load_async)
                meta.loads.append(t)
                p.load = None
        if not self.saves_enabled:
            return meta
        sched = scheduler_output.num_scheduled_tokens
        steps = [(r.req_id, r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        steps += list(zip(cached.req_ids, cached.num_computed_tokens))
        for rid, before in steps:
            st = self._reqs.get(rid)
            if st is None:
                continue
            after = before + int(sched.get(rid, 0))
            lo = max(before // self.block_size, st.stored)
            hi = min(after // self.block_size, len(st.hashes))
            if hi <= lo:
                continue
            ids = self._block_ids(rid)
            if ids is None or len(ids) < hi:
                continue
            toks = None
            if self._save_tokens:  # the worker's store publishes KV events: they carry the blocks' tokens
                toks = np.asarray(st.request.prompt_token_ids[lo * self.block_size : hi * self.block_size], np.uint32)
            meta.saves.append(Transfer(rid, st.hashes[lo:hi], st.parents[lo:hi], list(ids[lo:hi]), tokens=toks))
            st.stored = hi
            self._remember_tokens(st, lo, hi)
        return meta

    def _block_ids(self, req_id: str) -> list[int] | None:
        mgr = self._kv_cache_manager
        if mgr is None:
            return None
        return list(mgr.get_block_ids(req_id)[0])

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        shipped = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(shipped, KvbmFsWorkerMeta) and shipped.events:
            self._apply_worker_events(shipped.events)
        bad = connector_output.invalid_block_ids
        if bad:
            for st in self._reqs.values():  # blocks that failed to load are recomputed: save them again then
                for i, bid in enumerate(st.load_ids):
                    if bid in bad:
                        st.stored = min(st.stored, st.load_start + i)
                        cap = st.load_start + i
                        st.load_cap = cap if st.load_cap is None else min(st.load_cap, cap)
                        break

    def _apply_worker_events(self, events: list[ShippedEvent]) -> None:
        for kind, tier, medium, shareable_tier, ns_id, hashes in events:
            if not self.shared and not shareable_tier:
                _, per_ns = self._mirror.setdefault(tier, (medium, {}))
                have = per_ns.setdefault(ns_id, set())
                if kind in (EventKind.REMOVED.value, EventKind.EVICTED.value):
                    have.difference_update(hashes.tolist())
                else:
                    have.update(hashes.tolist())
        with self._lock:
            self._events.extend(e for e in events if e[4] == self.namespaces[0].id)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        self._refused.discard(request.request_id)
        return False, None  # saves complete inside the step that computes the blocks: nothing in flight

    # ---- events ----------------------------------------------------------------------------------------
    def _remember_tokens(self, st: _Req, lo: int, hi: int) -> None:
        if len(self._event_tokens) > 65536:
            self._event_tokens.clear()
        toks = st.request.prompt_token_ids
        lora = getattr(st.request, "lora_request", None)
        lora_name = getattr(lora, "lora_name", None) if lora is not None else None
        for i in range(lo, hi):
            parent = int(st.parents[i]) if i else None
            self._event_tokens[int(st.hashes[i])] = (
                list(toks[i * self.block_size : (i + 1) * self.block_size]),
                parent,
                lora_name,
            )

    def take_events(self) -> Iterable[Any]:
        """vLLM KV events for kvbm_fs blocks: BlockStored (blocks this scheduler planned, so with their
        tokens) and BlockRemoved, with medium GPU/CPU/STORAGE and ownership ``kvbm_fs:<tier>``."""
        with self._lock:
            evs, self._events = self._events, []
        if not evs:
            return ()
        from vllm.distributed.kv_events import MEDIUM_CPU, MEDIUM_GPU, MEDIUM_STORAGE, BlockRemoved, BlockStored

        media = {"gpu": MEDIUM_GPU, "host": MEDIUM_CPU}
        out: list[Any] = []
        for kind, tier, medium, _, _, hashes in evs:
            where, owner = media.get(medium, MEDIUM_STORAGE), f"kvbm_fs:{tier}"
            if kind in (EventKind.REMOVED.value, EventKind.EVICTED.value):
                out.append(BlockRemoved(block_hashes=[int(h) for h in hashes.tolist()], medium=where, ownership=owner))
                continue
            for h in hashes.tolist():
                known = self._event_tokens.get(int(h))
                if known is not None:
                    toks, parent, lora_name = known
                    out.append(
                        BlockStored(
                            block_hashes=[int(h)],
                            parent_block_hash=parent,
                            token_ids=toks,
                            block_size=self.block_size,
                            lora_id=None,
                            medium=where,
                            lora_name=lora_name,
                            ownership=owner,
                        )
                    )
        return out

    # ==== worker side ====================================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Check every KV layer against the namespace layout and keep a ``[num_blocks, *page]`` view of it."""
        num_blocks = int(self._kv_cache_config.num_blocks)
        names = [n for n in self.layer_names if n in kv_caches] or sorted(kv_caches, key=_natural)
        if len(names) != self.layout.num_layers:
            raise LayoutMismatchError(
                f"kvbm_fs: {len(names)} KV layers registered, the namespace layout has {self.layout.num_layers}"
            )
        layers: list[tuple[str, torch.Tensor]] = []
        shape = None
        for name in names:
            kv = kv_caches[name]
            if kv.shape[0] % num_blocks:
                raise LayoutMismatchError(
                    f"kvbm_fs: layer {name} has {kv.shape[0]} blocks on dim 0, not a multiple of {num_blocks}"
                )
            view = kv.unflatten(0, (num_blocks, kv.shape[0] // num_blocks))  # kernel blocks of one engine block
            nbytes = view[0].numel() * view.element_size()
            if nbytes != self.layout.layer_nbytes:
                raise LayoutMismatchError(
                    f"kvbm_fs: layer {name} holds {nbytes} bytes per block (shape {tuple(kv.shape)}, {kv.dtype});"
                    f" the namespace layout {self.layout.to_dict()} needs {self.layout.layer_nbytes}"
                )
            if shape is not None and (tuple(view.shape[1:]) != shape or view.dtype != self._kv_dtype):
                raise LayoutMismatchError(f"kvbm_fs: layer {name} differs in shape or dtype from the first KV layer")
            shape, self._kv_dtype = tuple(view.shape[1:]), view.dtype
            layers.append((name, view))
        self._layers, self._page_shape = layers, shape or ()
        self._layer_index = {name: i for i, (name, _) in enumerate(layers)}
        log.info(
            "kvbm_fs: registered %d KV layers, page %s %s (%d B per block)",
            len(layers),
            self._page_shape,
            self._kv_dtype,
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

    def _stage(self, n: int) -> torch.Tensor:
        assert self._kv_dtype is not None
        page = int(np.prod(self._page_shape))
        return torch.empty((n, len(self._layers), page), dtype=self._kv_dtype)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
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
        for t in meta.loads:  # one job a request, so each request is reported as soon as its blocks are in
            if t.background:
                self._loading[t.req_id] = self._load_pool.submit(self._load, [t])
        now = [t for t in meta.loads if not t.background]
        if not now:
            return
        if sum(len(t.block_ids) for t in now) <= self._chunk:
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
        t0 = time.perf_counter()
        keys, ids = self._transfer_keys(transfers)
        failed: list[int] = []
        for a in range(0, len(ids), self._chunk):  # bounded staging memory
            st = self._read(keys[a : a + self._chunk], ids[a : a + self._chunk])
            self._scatter(st, len(self._layers))
            failed += st.failed
        self._account_load(len(ids), failed, t0)
        return failed

    def _read_all(self, transfers: list[Transfer]) -> _Staged:
        t0 = time.perf_counter()
        keys, ids = self._transfer_keys(transfers)
        st = self._read(keys, ids)
        self._account_load(len(ids), st.failed, t0)
        return st

    def _transfer_keys(self, transfers: list[Transfer]) -> tuple[BlockKeys, np.ndarray]:
        hashes = np.concatenate([t.hashes for t in transfers])
        parents = np.concatenate([t.parents for t in transfers])
        ids = np.concatenate([np.asarray(t.block_ids, np.int64) for t in transfers])
        return BlockKeys(self.namespace.id, hashes, parents), ids

    def _read(self, keys: BlockKeys, ids: np.ndarray) -> _Staged:
        """One staging buffer's worth: read and verify, keep only the blocks that verified."""
        assert self.store is not None
        stage = self._stage(len(ids))
        try:
            got = np.asarray(self.store.get(keys, _u8_rows(stage)), bool)
        except Exception:  # never into the engine: whatever did not load is recomputed
            log.exception("kvbm_fs: load failed; vLLM recomputes the blocks")
            got = np.zeros(len(ids), bool)
        ok = np.flatnonzero(got)
        if ok.size != len(ids):
            stage = stage[torch.from_numpy(ok)]
        return _Staged(stage, torch.from_numpy(ids[ok]), ids[~got].tolist())

    def _scatter(self, st: _Staged, upto: int) -> None:
        """Put layers ``[st.scattered, upto)`` of the verified blocks into the engine's KV cache."""
        n = st.idx.numel()
        for li in range(st.scattered, upto):
            view = self._layers[li][1]
            if n:
                view[st.idx.to(view.device)] = st.stage[:, li].reshape(n, *self._page_shape).to(view.device)
        st.scattered = max(st.scattered, upto)

    def _account_load(self, n: int, failed: list[int], t0: float) -> None:
        if failed:
            log.warning(
                "kvbm_fs: %d of %d blocks failed to load (missing or failed verification); vLLM recomputes them",
                len(failed),
                n,
            )
        ok = n - len(failed)
        self._count(
            loaded_blocks=ok,
            load_failed_blocks=len(failed),
            loaded_bytes=ok * self.layout.block_nbytes,
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
            self._count(layerwise_loaded_layers=st.scattered - before)

    def _staged(self) -> _Staged:
        """The sync layer-wise load of this step, waited for once; its failures are noted then."""
        assert self._layer_load is not None
        first = self._layer_staged is None or self._layer_staged[0] is not self._layer_load
        if first:
            st = self._layer_load.result()
            meta = self._connector_metadata
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
        li = self._layer_index.get(layer_name)
        if li is None:
            return
        plan = self._save_plan if self._save_plan is not None else self._plan_saves()
        if plan.stage is None or li in plan.copied:
            return
        self._stage_layer(plan, li)
        self._count(layerwise_saved_layers=1)

    def _plan_saves(self) -> _SavePlan:
        """This step's blocks to save: those not stored yet, minus requests whose load failed (their KV
        attended to garbage). The leading ones (up to ``max_inflight_save_bytes``) get a staging buffer
        that ``save_kv_layer`` fills layer by layer."""
        meta = self._connector_metadata
        if self._layer_load is not None:
            self._staged()  # this step's failed loads taint their requests' saves
        plan = _SavePlan()
        self._save_plan = plan
        if not isinstance(meta, KvbmFsMetadata) or not meta.saves or not self._layers:
            return plan
        t0 = time.perf_counter()
        todo = [t for t in meta.saves if t.req_id not in self._tainted]
        skipped = sum(len(t.block_ids) for t in meta.saves) - sum(len(t.block_ids) for t in todo)
        if todo:
            keys = BlockKeys(
                self.namespace.id,
                np.concatenate([t.hashes for t in todo]),
                np.concatenate([t.parents for t in todo]),
            )
            ids = np.asarray([b for t in todo for b in t.block_ids], dtype=np.int64)
            assert self.store is not None
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
            n = min(new.size, max(1, self.max_inflight_save_bytes // self.layout.block_nbytes))
            if n:
                plan.stage = self._stage(n)
                plan.idx = torch.as_tensor(plan.ids[:n], dtype=torch.long)
        self._count(save_skipped_blocks=skipped, save_s=time.perf_counter() - t0)
        return plan

    def _stage_layer(self, plan: _SavePlan, li: int) -> None:
        assert plan.stage is not None and plan.idx is not None
        view = self._layers[li][1]
        n = plan.stage.shape[0]
        plan.stage[:, li].view(n, *self._page_shape).copy_(view[plan.idx.to(view.device)])
        plan.copied.add(li)

    def wait_for_save(self) -> None:
        self._drain_saves()  # the previous step's puts: their events ship with this step
        if self._layer_load is not None:  # layers the engine never waited for still go into the cache
            self._scatter(self._staged(), len(self._layers))
        plan = self._save_plan if self._save_plan is not None else self._plan_saves()
        self._save_plan, self._tainted = None, set()
        if plan.keys is None or not len(plan.keys):
            return
        staged = 0
        if plan.stage is not None:  # layers the engine did not hand to save_kv_layer are copied now
            for li in range(len(self._layers)):
                if li not in plan.copied:
                    self._stage_layer(plan, li)
            staged = plan.stage.shape[0]
            self._submit_save(plan.keys[:staged], _u8_rows(plan.stage))
        ids = plan.ids
        assert ids is not None
        for a in range(staged, len(plan.keys), self._chunk):  # the rest: bounded staging, chunk by chunk
            b = min(len(plan.keys), a + self._chunk)
            idx = torch.as_tensor(ids[a:b], dtype=torch.long)
            stage = self._stage(b - a)
            for li, (_, view) in enumerate(self._layers):
                stage[:, li].view(b - a, *self._page_shape).copy_(view[idx.to(view.device)])
            self._submit_save(plan.keys[a:b], _u8_rows(stage))

    def _submit_save(self, keys: BlockKeys, rows: torch.Tensor) -> None:
        """Hand staged rows to the save thread; the engine's own blocks are free to change from here on."""
        nbytes = int(rows.numel())
        if not self.async_save:
            self._put(keys, rows)
            return
        while self._saving and sum(n for _, n in self._saving) + nbytes > self.max_inflight_save_bytes:
            fut, _ = self._saving.pop(0)
            fut.result()
        if self._save_pool is None:
            self._save_pool = ThreadPoolExecutor(1, thread_name_prefix="kvbm-fs-save")
        self._saving.append((self._save_pool.submit(self._put, keys, rows), nbytes))

    def _put(self, keys: BlockKeys, rows: torch.Tensor) -> None:
        t0 = time.perf_counter()
        assert self.store is not None
        dropped = 0
        try:
            saved = int(np.asarray(self.store.put(keys, rows)).sum())
            if self.write_through:  # a dead or full tier drops blocks (counted) instead of raising
                dropped = engine_kit.write_through(self.store, keys, rows)
        except Exception:  # a dropped save only costs a future recompute; never fail the engine
            log.exception("kvbm_fs: saving %d blocks failed; they are dropped", len(keys))
            self._count(save_failed_blocks=len(keys))
            return
        self._count(
            saved_blocks=saved,
            saved_bytes=saved * self.layout.block_nbytes,
            write_through_failed_blocks=dropped,
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

    def _on_worker_event(self, ev: BlockEvent) -> None:
        if ev.kind not in SHIPPED_KINDS or self.store is None:
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
            self._load_errors.update(self._loading.pop(rid).result())
        if done:
            self._count(async_load_requests=len(done))
        return None, set(done) or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    # ==== lifecycle ======================================================================================
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            for pool in (self._load_pool, self._read_pool, self._save_pool):
                if pool is not None:
                    pool.shutdown(wait=True)
        if self._unsubscribe is not None:
            self._unsubscribe()
        _stores.release(self._store_lease)


def _auto_flag(extra: Mapping[str, Any], key: str) -> bool | str:
    """``"auto"`` (the default) or a boolean."""
    v = extra.get(key, "auto")
    return "auto" if isinstance(v, str) and v.lower() == "auto" else _flag(extra, key, True)


def _flag(extra: Mapping[str, Any], key: str, default: bool) -> bool:
    v = extra.get(key, default)
    if isinstance(v, str) and v.lower() in ("0", "1", "true", "false"):
        return v.lower() in ("1", "true")
    if not isinstance(v, bool):
        raise ConfigError(f"kvbm_fs: kv_connector_extra_config.{key} must be true or false, not {v!r}")
    return v


def _size(extra: Mapping[str, Any], key: str, default: int) -> int:
    from kvbm_fs.units import parse_size

    v = extra.get(key, default)
    try:
        n = parse_size(v)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"kvbm_fs: kv_connector_extra_config.{key}: {e}") from None
    if n < 0:
        raise ConfigError(f"kvbm_fs: kv_connector_extra_config.{key} must not be negative")
    return n


def _u8_rows(stage: torch.Tensor) -> torch.Tensor:
    return stage.view(torch.uint8).view(stage.shape[0], -1)


def _natural(name: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


__all__ = [
    "KvbmFsConnector",
    "KvbmFsMetadata",
    "KvbmFsStats",
    "KvbmFsWorkerMeta",
    "Transfer",
    "attention_backend",
    "close_all",
    "engine_layout",
    "live_connectors",
    "namespaces",
    "shareable",
    "store_config",
]
