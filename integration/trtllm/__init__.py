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

The package splits by role: ``api`` (TensorRT-LLM's base classes or stand-ins), ``layout`` (options,
KV pool layout, namespaces), ``state`` (the engine's shared store, step metadata), ``scheduler`` and
``worker``. TensorRT-LLM loads the classes from this module path, so it re-exports them.
"""

from __future__ import annotations

from .api import (
    HAVE_TRTLLM,
    RequestData,
    SchedulerBase,
    SchedulerOutput,
    StandInRequestData,
    StandInScheduler,
    StandInSchedulerOutput,
    StandInWorker,
    WorkerBase,
)
from .layout import (
    ENV_OPTIONS,
    OPTION_KEYS,
    STORE_KEYS,
    connector_options,
    namespaces,
    parallel_rank,
    pool_layout,
    store_config,
    tokens_per_block,
)
from .scheduler import REFUSED_ATTRS, SCHEDULER_STATS, KvbmFsTrtllmScheduler
from .state import KvbmFsTrtllmMeta, KvLoadError, Transfer, close_all
from .worker import WORKER_STATS, KvbmFsTrtllmWorker

__all__ = [
    "ENV_OPTIONS",
    "HAVE_TRTLLM",
    "KvLoadError",
    "KvbmFsTrtllmMeta",
    "KvbmFsTrtllmScheduler",
    "KvbmFsTrtllmWorker",
    "OPTION_KEYS",
    "REFUSED_ATTRS",
    "RequestData",
    "SCHEDULER_STATS",
    "STORE_KEYS",
    "SchedulerBase",
    "SchedulerOutput",
    "StandInRequestData",
    "StandInScheduler",
    "StandInSchedulerOutput",
    "StandInWorker",
    "Transfer",
    "WORKER_STATS",
    "WorkerBase",
    "close_all",
    "connector_options",
    "namespaces",
    "parallel_rank",
    "pool_layout",
    "store_config",
    "tokens_per_block",
]
