"""vLLM (0.32, V1 engine) KV connector: prompts seen before load their KV from kvbm_fs instead of recomputing it.

Load it with vLLM's own configuration::

    --kv-transfer-config '{"kv_connector": "KvbmFsConnector",
                           "kv_connector_module_path": "kvbm_fs.integration.vllm",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"tiers": ["host://?capacity=8GiB", "file:///var/cache/kvbm"]}}'

Split by role: ``connector`` (the class vLLM loads), ``scheduler`` (match and plan), ``worker`` (move
bytes), ``layout`` (probe the engine, name its blocks), ``stores``, ``metadata``, ``options``. Options,
behaviour and failure semantics: docs/vllm.md; design: docs/architecture.md 1.13.
"""

from __future__ import annotations

from .connector import KvbmFsConnector, live_connectors
from .layout import attention_backend, engine_layout, namespaces
from .metadata import COUNTERS, TIMERS, KvbmFsMetadata, KvbmFsStats, KvbmFsWorkerMeta, Transfer
from .options import store_config
from .stores import _stores as _stores  # the open stores, for tests that check none is left
from .stores import close_all, shareable

__all__ = [
    "COUNTERS",
    "TIMERS",
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
