"""The connector's options, and what names its blocks: the KV pool's layout and one namespace per TP rank."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from kvbm_fs import ConfigError, KVLayout, LayoutMismatchError, Namespace
from kvbm_fs.config import StoreConfig, resolve
from kvbm_fs.layout import dtype_name

ENV_OPTIONS = "KVBM_FS_TRTLLM_CONFIG"
STORE_KEYS = ("tiers", "tenant", "policy", "daemon", "cost", "layout", "events")
OPTION_KEYS = frozenset({*STORE_KEYS, "config", "model", "write_through", "async_load", "async_save"})


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
