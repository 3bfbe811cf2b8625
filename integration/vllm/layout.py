"""What vLLM's KV cache looks like, probed from its config, and the namespaces that name it per rank.

The attention backend decides a page's byte order, so it is part of every namespace; a layout pinned in
the config that the engine does not have is refused before any block is named.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from kvbm_fs import ConfigError, KVLayout, LayoutMismatchError, Namespace
from kvbm_fs.layout import dtype_name

from .options import store_config

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger("kvbm_fs.integration.vllm")

# Semantic axis order of one layer's page as each backend stores it (docs/vllm.md, Copying: the bytes
# are copied in the per-layer view's logical order, so only the backend's packing matters).
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
FP8_CACHE = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def loads_on_context(backend: str) -> bool:
    """Whether ``backend`` can prefill on top of KV it did not compute (else the engine only stores)."""
    return backend not in NO_CONTEXT_BACKENDS


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


__all__ = [
    "BACKEND_ORDER",
    "NO_CONTEXT_BACKENDS",
    "attention_backend",
    "engine_layout",
    "loads_on_context",
    "namespaces",
    "parallel_world",
    "worker_rank",
]
