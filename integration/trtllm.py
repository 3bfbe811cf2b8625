"""TensorRT-LLM (PyTorch backend) KV cache connector: prompts seen before load their KV from kvbm_fs.

Configure it with TensorRT-LLM's own option::

    LLM(model, backend="pytorch", kv_connector_config=KvCacheConnectorConfig(
        connector_module="kvbm_fs.integration.trtllm",
        connector_scheduler_class="KvbmFsTrtllmScheduler",
        connector_worker_class="KvbmFsTrtllmWorker"))

Its connector API cannot take back claimed tokens, so the scheduler verifies blocks before claiming
them. Where ``tensorrt_llm`` does not import (no CUDA), :class:`StandInScheduler` / :class:`StandInWorker`
carry the real base classes' signatures. Options, call order and behaviour: docs/trtllm.md; design:
docs/architecture.md 1.13.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from kvbm_fs import BlockKeys, ConfigError, KvbmError, KVLayout, LayoutMismatchError, Namespace, Store
from kvbm_fs import engine as engine_kit
from kvbm_fs.config import StoreConfig, resolve
from kvbm_fs.engine import Lease, Registry, close_store
from kvbm_fs.layout import dtype_name
from kvbm_fs.mount import build_store

log = logging.getLogger(__name__)

ENV_OPTIONS = "KVBM_FS_TRTLLM_CONFIG"
STORE_KEYS = ("tiers", "tenant", "policy", "daemon", "cost", "layout", "events")
OPTION_KEYS = frozenset({*STORE_KEYS, "config", "model", "write_through", "async_load", "async_save"})
REFUSED_ATTRS = ("multimodal_hashes", "multimodal_positions", "prompt_embedding_table")


class KvLoadError(KvbmError, RuntimeError):
    """A block claimed for loading could not be delivered: the step must not run on its KV."""


# ---- TensorRT-LLM base classes ----------------------------------------------------------------------
# Stand-ins with the exact signatures of NVIDIA/TensorRT-LLM tensorrt_llm/_torch/pyexecutor/
# kv_cache_connector.py (commit 00fdcbff5ad82a6438b3e0c9dbc5480b6ee52bdc; unchanged in 3277953654b9 and in
# connectors/kv_cache_connector.py at 035ab91cad04). Used only where tensorrt_llm does not import.


class StandInWorker(ABC):
    """``KvCacheConnectorWorker`` as TensorRT-LLM defines it (signatures only, plus its metadata slot)."""

    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args
        self._metadata: object = None
        super().__init__()

    def bind_connector_meta(self, metadata: object) -> None:
        self._metadata = metadata

    def get_connector_meta(self) -> object:
        return self._metadata

    def _clear_connector_meta(self) -> None:
        self._metadata = None

    def register_forward_pass_callable(self) -> Callable[..., Any] | None:
        """Called at the end of the forward pass when a connector returns a callable; the base returns None."""
        return None

    @abstractmethod
    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None: ...

    @abstractmethod
    def start_load_kv(self, stream: Any) -> None: ...

    @abstractmethod
    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None: ...

    @abstractmethod
    def save_kv_layer(self, layer_idx: int, stream: Any) -> None: ...

    @abstractmethod
    def wait_for_save(self, stream: Any) -> None: ...

    @abstractmethod
    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]: ...


class StandInScheduler(ABC):
    """``KvCacheConnectorScheduler`` as TensorRT-LLM defines it (signatures only)."""

    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args
        super().__init__()

    @abstractmethod
    def build_connector_meta(self, scheduler_output: Any) -> Any: ...

    @abstractmethod
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]: ...

    @abstractmethod
    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool: ...

    @abstractmethod
    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None: ...


@dataclass
class StandInRequestData:
    """``RequestData``: one inflight request in a ``SchedulerOutput`` (the fields every version has)."""

    request_id: int
    new_tokens: list[int]
    new_block_ids: list[int]
    computed_position: int
    num_scheduled_tokens: int


@dataclass
class StandInSchedulerOutput:
    """``SchedulerOutput``: requests scheduled this step, first-timers in ``new_requests``."""

    new_requests: list[Any] = field(default_factory=list)
    cached_requests: list[Any] = field(default_factory=list)


def _trtllm_api() -> tuple[Any, Any, Any, Any, bool]:
    """The real bases where tensorrt_llm imports (newer layout first), else the stand-ins."""
    for name in (
        "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector",
        "tensorrt_llm._torch.pyexecutor.kv_cache_connector",
    ):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        return mod.KvCacheConnectorScheduler, mod.KvCacheConnectorWorker, mod.RequestData, mod.SchedulerOutput, True
    return StandInScheduler, StandInWorker, StandInRequestData, StandInSchedulerOutput, False


SchedulerBase: Any
WorkerBase: Any
RequestData: Any
SchedulerOutput: Any
SchedulerBase, WorkerBase, RequestData, SchedulerOutput, HAVE_TRTLLM = _trtllm_api()


# ---- options, layout, namespaces ---------------------------------------------------------------------


def connector_options(defaults: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Connector options: the class's ``config``, then ``KVBM_FS_TRTLLM_CONFIG`` (JSON) over it."""
    env = os.environ if env is None else env
    out = dict(defaults)
    raw = env.get(ENV_OPTIONS)
    if raw:
        try:
            extra = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"{ENV_OPTIONS} must be a JSON object: {e}") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"{ENV_OPTIONS} must be a JSON object, got {type(extra).__name__}")
        out.update(extra)
    unknown = set(out) - OPTION_KEYS
    if unknown:
        raise ConfigError(f"kvbm_fs trtllm: unknown option(s) {sorted(unknown)}; known: {sorted(OPTION_KEYS)}")
    return out


def store_config(options: Mapping[str, Any]) -> StoreConfig:
    """The kvbm_fs StoreConfig: options, then their ``config`` file, then ``KVBM_FS_*``."""
    explicit = {k: options[k] for k in STORE_KEYS if k in options}
    return resolve(config=options.get("config"), **explicit)


def tokens_per_block(llm_args: Any) -> int:
    """TensorRT-LLM's KV block size: ``llm_args.kv_cache_config.tokens_per_block``."""
    value = getattr(getattr(llm_args, "kv_cache_config", None), "tokens_per_block", None)
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"kvbm_fs trtllm: llm_args.kv_cache_config.tokens_per_block is {value!r}")
    return value


def parallel_rank(llm_args: Any) -> tuple[int, int]:
    """(tensor-parallel rank, size) from ``llm_args.parallel_config.to_mapping()``; PP is refused as TRT-LLM does."""
    try:
        mapping = llm_args.parallel_config.to_mapping()
    except AttributeError:
        return 0, int(getattr(llm_args, "tensor_parallel_size", 1) or 1)
    if int(getattr(mapping, "pp_size", 1) or 1) > 1:
        raise ConfigError("kvbm_fs trtllm: pipeline parallelism is not supported (nor by TensorRT-LLM's connector)")
    rank = getattr(mapping, "tp_rank", None)
    size = getattr(mapping, "tp_size", None)
    rank = int(mapping.rank if rank is None else rank)
    size = int(mapping.world_size if size is None else size)
    return rank, size


def pool_layout(kv: torch.Tensor, block_size: int, pinned: KVLayout | None) -> KVLayout:
    """The KVLayout of TensorRT-LLM's pool ``[blocks, layers, 2, tokens * heads * head_dim]``.

    A pinned layout must describe the same bytes (layers, block size, dtype, elements per token);
    otherwise heads and head dim are folded into one axis, since the pool does not separate them."""
    if kv.dim() != 4 or kv.shape[2] != 2:
        raise LayoutMismatchError(
            f"kvbm_fs trtllm: KV pool of shape {tuple(kv.shape)} is not [blocks, layers, 2, elements]"
            " (K-only / MLA caches are not supported)"
        )
    dtype = dtype_name(kv.dtype)
    if dtype is None:
        raise ConfigError(f"kvbm_fs trtllm: KV pool dtype {kv.dtype} is not supported")
    layers, elems = int(kv.shape[1]), int(kv.shape[3])
    if elems % block_size:
        raise LayoutMismatchError(f"kvbm_fs trtllm: {elems} elements per block do not split into {block_size} tokens")
    derived = KVLayout(layers, 1, elems // block_size, block_size, dtype, order="LKTHD")
    if pinned is None:
        return derived
    same = (
        pinned.num_layers == layers
        and pinned.block_size == block_size
        and pinned.dtype == dtype
        and pinned.num_kv_heads * pinned.head_dim == elems // block_size
        and not pinned.mla
    )
    if not same:
        raise LayoutMismatchError(
            f"kvbm_fs trtllm: the configured layout {pinned.to_dict()} does not match this engine's KV pool"
            f" (shape {tuple(kv.shape)}, {kv.dtype}, {block_size} tokens per block)"
        )
    return pinned


def namespaces(model: str, layout: KVLayout, world: int, tenant: str) -> tuple[Namespace, ...]:
    """One namespace per tensor-parallel rank: each rank holds its own heads' KV."""
    return tuple(Namespace(f"{model}@trtllm", layout, r, world, tenant) for r in range(world))


# ---- per-process engine state shared by the scheduler and the worker of one LLM -------------------------


@dataclass
class _Engine:
    """What a scheduler and a worker built from the same ``llm_args`` in one process share: the store
    (opened when the worker registers the KV pool, whose layout names the blocks) and in-flight saves."""

    llm_args: Any
    options: dict[str, Any]
    store: Store | None = None
    namespaces: tuple[Namespace, ...] = ()
    pending_saves: dict[int, int] = field(default_factory=dict)  # request id -> save batches in flight
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, layout: KVLayout, rank: int, world: int) -> Namespace:
        """Open the store for ``layout`` (once); a second, different layout is refused."""
        with self.lock:
            if self.store is not None:
                if self.namespaces[0].layout != layout:
                    raise LayoutMismatchError(
                        f"kvbm_fs trtllm: this engine's store was opened for {self.namespaces[0].layout.to_dict()},"
                        f" now asked for {layout.to_dict()}"
                    )
                return self.store.add_namespace(self.namespaces[rank])
            cfg = store_config(self.options)
            model = str(self.options.get("model") or getattr(self.llm_args, "model", "") or "model")
            nss = namespaces(model, layout, world, str(cfg.tenant or ""))
            cfg.model, cfg.layout, cfg.rank, cfg.world_size = nss[rank].model, layout, rank, world
            self.store, self.namespaces = build_store(cfg), nss
            return nss[rank]

    def saves_in_flight(self, req_id: int) -> int:
        with self.lock:
            return self.pending_saves.get(req_id, 0)


def _close_engine(eng: _Engine) -> None:
    close_store(eng.store)  # persists host-tier blocks into the persistent tiers


# one _Engine per llm_args; TensorRT-LLM never tells a connector it is done, so the registry closes at exit
_engines: Registry[_Engine] = Registry(_close_engine, "kvbm_fs trtllm")
close_all = _engines.close_all


def _acquire(llm_args: Any, options: dict[str, Any]) -> Lease[_Engine]:
    return _engines.acquire(id(llm_args), lambda: _Engine(llm_args, options), lambda e: e.llm_args is llm_args)


# ---- metadata ---------------------------------------------------------------------------------------------


@dataclass
class Transfer:
    """Blocks of one request to move: chained keys and the engine block ids they map to.

    ``staged`` holds verified rows (uint8 ``[n, block_nbytes]``) of rank ``staged_rank``; it never
    pickles, so workers in other processes re-read and re-verify instead of receiving bytes over MPI."""

    req_id: int
    hashes: np.ndarray
    parents: np.ndarray
    block_ids: list[int]
    staged: torch.Tensor | None = None
    staged_rank: int = 0
    parked: bool = False  # an async load: the request is not in this step's batch
    tokens: np.ndarray | None = None  # a save's token ids (uint32, len(hashes) * block_size), for KV events

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["staged"] = None
        return state


@dataclass
class KvbmFsTrtllmMeta:
    """Scheduler -> workers, once per step (pickled by ``mpi_broadcast`` when there are several ranks)."""

    ns_ids: tuple[int, ...] = ()
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


class _Counters:
    def __init__(self, names: tuple[str, ...]) -> None:
        self._lock = threading.Lock()
        self.data: dict[str, float] = dict.fromkeys(names, 0)

    def add(self, **kv: float) -> None:
        with self._lock:
            for k, v in kv.items():
                self.data[k] = self.data.get(k, 0) + v

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.data)


SCHEDULER_STATS = (
    "lookups",
    "lookup_tokens",
    "hits",
    "misses",
    "hit_tokens",
    "unverified_blocks",
    "refused",
    "match_s",
)
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


def _present(v: Any) -> bool:
    if v is None:
        return False
    try:
        return len(v) > 0
    except TypeError:
        return True


# ---- scheduler ------------------------------------------------------------------------------------------


@dataclass
class _Req:
    request: Any
    hashes: np.ndarray
    parents: np.ndarray
    prompt_len: int
    stored: int = 0  # leading blocks known to be in the store (not saved again)
    done: int = 0  # tokens computed or loaded once the first step has run
    block_ids: list[int] = field(default_factory=list)
    seen_ids: list[int] = field(default_factory=list)  # cumulative RequestData.new_block_ids
    load: Transfer | None = None  # claimed in get_num_new_matched_tokens, block ids filled at alloc
    load_start: int = 0
    saves: int = 0


class _Side:
    """What both sides take from ``llm_args`` and the options; ``config`` is for subclasses to set."""

    config: ClassVar[Mapping[str, Any]] = {}

    def _setup(self, llm_args: Any) -> None:
        self.options = connector_options(self.config)
        self.block_size = tokens_per_block(llm_args)
        self.rank, self.world = parallel_rank(llm_args)
        self._lease = _acquire(llm_args, self.options)
        self.engine = self._lease.value


class KvbmFsTrtllmScheduler(SchedulerBase, _Side):
    """Scheduler side (rank 0): matches and verifies prompts' blocks, plans loads and saves."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self._setup(llm_args)
        self.async_load = bool(self.options.get("async_load", False)) and self.world == 1
        if self.options.get("async_load") and self.world > 1:
            log.warning("kvbm_fs trtllm: async_load needs every rank's bytes staged; with TP>1 loads stay synchronous")
        self.async_save = bool(self.options.get("async_save", True))
        self._save_tokens = store_config(self.options).events is not None  # saves carry their token ids
        self._reqs: dict[int, _Req] = {}
        self._loads: list[Transfer] = []
        self._counters = _Counters(SCHEDULER_STATS)
        self._bound = False
        self._closed = False

    def stats(self) -> dict[str, float]:
        """Cumulative lookup counters of this scheduler."""
        return self._counters.snapshot()

    def _store(self) -> tuple[Store, tuple[Namespace, ...]]:
        eng = self.engine
        if eng.store is None:
            pinned = store_config(self.options).layout
            if pinned is None:
                raise ConfigError(
                    "kvbm_fs trtllm: no store yet: the worker registers the KV pool (naming its layout) before"
                    " the first request; pin a `layout` to use the scheduler without a worker in this process"
                )
            eng.open(pinned, 0, self.world)
        assert eng.store is not None
        if not self._bound:
            for ns in eng.namespaces:  # the scheduler matches every rank's blocks
                eng.store.add_namespace(ns)
            self._bound = True
        return eng.store, eng.namespaces

    def _state(self, request: Any) -> _Req | None:
        rid = int(request.request_id)
        st = self._reqs.get(rid)
        if st is not None:
            return st
        why = next((a for a in REFUSED_ATTRS if _present(getattr(request, a, None))), None)
        if why is not None:
            self._counters.add(refused=1)
            log.warning("kvbm_fs trtllm: request %s refused (%s): not matched, not saved", rid, why)
            return None
        _, nss = self._store()
        tokens = list(request.get_tokens(0))
        prompt = tokens[: int(getattr(request, "prompt_len", 0) or 0) or len(tokens)]
        salt = getattr(request, "cache_salt", None)
        lora = getattr(request, "lora_task_id", None)
        keys = nss[0].keys_for_tokens(
            np.asarray(prompt, dtype=np.int64),
            cache_salt=None if salt is None else str(salt),
            lora_name=None if lora is None else f"lora-task-{lora}",
        )
        st = self._reqs[rid] = _Req(request, keys.hashes, keys.parents, len(prompt))
        return st

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        st = self._state(request)
        if st is None:
            return 0, False
        st.load, st.done = None, num_computed_tokens
        usable = (st.prompt_len - 1) // self.block_size  # never the block of the prompt's last token
        if num_computed_tokens % self.block_size or num_computed_tokens >= usable * self.block_size:
            return 0, False  # nothing past the device prefix, or it ends inside a block
        t0 = time.perf_counter()
        start = num_computed_tokens // self.block_size
        stop, staged = self._verified(st, start, usable)
        self._counters.add(lookups=1, lookup_tokens=st.prompt_len, match_s=time.perf_counter() - t0)
        if stop <= start:
            self._counters.add(misses=1)
            return 0, False
        ids_unknown: list[int] = []
        st.load = Transfer(int(request.request_id), st.hashes[start:stop], st.parents[start:stop], ids_unknown, staged)
        st.load.parked, st.load_start = self.async_load, start
        tokens = (stop - start) * self.block_size
        st.done = num_computed_tokens + tokens
        self._counters.add(hits=1, hit_tokens=tokens)
        return tokens, self.async_load

    def _verified(self, st: _Req, start: int, usable: int) -> tuple[int, torch.Tensor | None]:
        """End of the leading run of blocks from ``start`` that every rank holds and that pass verification
        (read now, so that nothing is claimed that cannot be served), and rank 0's verified rows."""
        store, nss = self._store()
        m = store.match(BlockKeys(nss[0].id, st.hashes[:usable], st.parents[:usable]))
        want = min(m.length, m.worth)  # the cost model may say the tail is faster to recompute
        stop, staged = want, None
        for r, ns in enumerate(nss):
            if stop <= start:
                break
            keys = BlockKeys(ns.id, st.hashes[start:stop], st.parents[start:stop])
            rows = torch.empty((len(keys), ns.block_nbytes), dtype=torch.uint8)
            res = engine_kit.load(store, keys, rows)
            lead = res.prefix
            self._counters.add(unverified_blocks=res.failed)
            stop = start + lead
            if r == 0:
                staged = rows[:lead]
        st.stored = m.length if stop >= want else stop  # blocks that failed are gone: save them again
        return stop, staged

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        st = self._reqs.get(int(request.request_id))
        if st is None:
            return
        st.block_ids = list(block_ids)
        t, st.load = st.load, None
        if t is None:
            return
        a = st.load_start
        t.block_ids = st.block_ids[a : a + len(t.hashes)]
        if len(t.block_ids) == len(t.hashes):
            self._loads.append(t)
        else:
            log.warning("kvbm_fs trtllm: request %s got %d blocks, fewer than planned", t.req_id, len(block_ids))

    def build_connector_meta(self, scheduler_output: Any) -> KvbmFsTrtllmMeta:
        _, nss = self._store()
        meta = KvbmFsTrtllmMeta(ns_ids=tuple(ns.id for ns in nss), loads=self._loads)
        self._loads = []
        for rd in scheduler_output.new_requests:
            self._plan_save(rd, True, meta)
        for rd in scheduler_output.cached_requests:
            self._plan_save(rd, False, meta)
        return meta

    def _plan_save(self, rd: Any, new: bool, meta: KvbmFsTrtllmMeta) -> None:
        """Save the prompt blocks this step completes (and any earlier ones the store lacks)."""
        st = self._reqs.get(int(rd.request_id))
        if st is None:
            return
        st.seen_ids.extend(rd.new_block_ids)
        # a new request's computed_position leaves out the tokens the connector loads: count them back in
        before = max(int(rd.computed_position), st.done) if new else int(rd.computed_position)
        hi = min((before + int(rd.num_scheduled_tokens)) // self.block_size, len(st.hashes))
        ids = st.seen_ids if len(st.seen_ids) >= len(st.block_ids) else st.block_ids
        lo = st.stored
        if hi <= lo or len(ids) < hi:
            return
        toks = None
        if self._save_tokens:  # the store publishes KV events: they carry the saved blocks' tokens
            toks = np.asarray(list(st.request.get_tokens(0))[lo * self.block_size : hi * self.block_size], np.uint32)
        meta.saves.append(
            Transfer(int(rd.request_id), st.hashes[lo:hi], st.parents[lo:hi], list(ids[lo:hi]), tokens=toks)
        )
        st.stored, st.saves = hi, st.saves + 1

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        st = self._reqs.pop(int(request.request_id), None)
        if st is None or st.saves == 0 or not self.async_save:
            return False
        # hold the blocks until get_finished reports the saves done on every rank; with one rank (the
        # worker in this process) only while they are still in flight
        return self.world > 1 or self.engine.saves_in_flight(int(request.request_id)) > 0

    def shutdown(self) -> None:
        """Drop this scheduler's hold on the engine's store (closed when the worker lets go too)."""
        if not self._closed:
            self._closed = True
            _engines.release(self._lease)


# ---- worker -------------------------------------------------------------------------------------------------


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
            [t.name for t in self.store.tiers],
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


__all__ = [
    "HAVE_TRTLLM",
    "KvLoadError",
    "KvbmFsTrtllmMeta",
    "KvbmFsTrtllmScheduler",
    "KvbmFsTrtllmWorker",
    "RequestData",
    "SchedulerOutput",
    "StandInScheduler",
    "StandInWorker",
    "Transfer",
    "close_all",
    "connector_options",
    "namespaces",
    "pool_layout",
]
