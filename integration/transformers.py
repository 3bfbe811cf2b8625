"""Hugging Face transformers: reuse the KV of prompt prefixes seen before, through kvbm_fs.

A transformers model keeps its KV in a ``DynamicCache`` (per layer ``[batch, kv_heads, tokens, head_dim]``).
This module turns the full 16-token (``block_size``) blocks of a prefill into kvbm_fs blocks and back::

    store = mount_model(model, "host://?capacity=8GiB", "file:///var/cache/kvbm")
    out = generate_with_cache(model, store, input_ids, max_new_tokens=32)   # loads, generates, saves
    out.loaded_tokens, out.computed_tokens

- Names: blocks are Dynamo KVBM v1 sequence hashes of the prompt's full blocks, in a
  :class:`~kvbm_fs.Namespace` whose model is ``"<name>@hf/<config fingerprint>"`` and whose layout is the
  model's (layers, KV heads, head dim, dtype, block size, axis order ``LKHTD``). Another config or dtype
  never matches; two checkpoints with one config need distinct names (or ``weights=True``).
- Bytes: a block is ``[layers, K|V, kv_heads, block_size, head_dim]``, HF's own per-layer axis order,
  so saving and loading are one strided copy per layer for all blocks at once.
- Loads: the longest stored prefix, never the whole prompt (the model must compute at least one token to
  produce logits); a block that fails verification cuts the prefix there and the rest is recomputed.
- Transformers is imported lazily (``importlib``), so ``kvbm-fs`` can import this module without it.
  Written against transformers 5.x (``cache=`` kwarg, ``cache.layers[i].keys``) and 4.5x
  (``past_key_values=``, ``key_cache``/``value_cache``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash

from kvbm_fs import ConfigError, KvbmError, KVLayout, LayoutMismatchError, Namespace, Store, mount
from kvbm_fs.engine import load, present, save
from kvbm_fs.layout import dtype_name, torch_dtype

ORDER = "LKHTD"  # one block: [layers, K|V, kv heads, tokens, head dim] -- HF's [H, T, D] per layer kept intact
DEFAULT_BLOCK_SIZE = 16
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")  # what an HF cache holds
# Config keys that do not change what a KV entry holds (runtime switches, bookkeeping, tokenizer ids).
UNFINGERPRINTED = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "transformers_version",
        "_commit_hash",
        "architectures",
        "dtype",
        "torch_dtype",
        "use_cache",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_experts_implementation",
        "attn_implementation",
        "id2label",
        "label2id",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "tokenizer_class",
        "task_specific_params",
        "problem_type",
        "prefix",
        "chunk_size_feed_forward",
        "tie_word_embeddings",
    }
)


class UnsupportedCacheError(KvbmError, ValueError):
    """A cache or prompt this integration cannot store: batch > 1, sliding-window or quantized layers."""


def _hf() -> Any:
    """The transformers module, imported on first use (an ``Any`` module: mypy does not walk transformers)."""
    try:
        return importlib.import_module("transformers")
    except ImportError as e:
        raise ImportError(f"kvbm_fs.integration.transformers needs transformers: pip install transformers ({e})") from e


# ---- namespace --------------------------------------------------------------------------------------------


def text_config(model_or_config: Any) -> Any:
    """The decoder's config (multimodal configs nest it), from a model or a config."""
    cfg = getattr(model_or_config, "config", model_or_config)
    get = getattr(cfg, "get_text_config", None)
    return get(decoder=True) if callable(get) else cfg


def config_fingerprint(model_or_config: Any) -> str:
    """16 hex digits over every config field that shapes the KV (all but runtime/bookkeeping keys).

    Uses the full ``to_dict()`` rather than the diff against defaults, so a default that changes between
    transformers versions changes the fingerprint too: at worst a miss, never a wrong hit.
    """
    cfg = getattr(model_or_config, "config", model_or_config)
    d = {k: v for k, v in cfg.to_dict().items() if k not in UNFINGERPRINTED}
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str).encode()
    return f"{xxhash.xxh3_64_intdigest(blob, 0):016x}"


def weights_fingerprint(model: Any) -> str:
    """16 hex digits over every parameter's name and bytes: tells apart checkpoints that share a config.

    Reads all weights once (seconds for a 7B model on CPU); pass ``weights=True`` to opt in.
    """
    h = xxhash.xxh3_64()
    for name, p in model.state_dict().items():
        t = p.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return f"{h.intdigest():016x}"


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    name = dtype_name(dtype)
    if name is None or name not in FLOAT_DTYPES:
        raise UnsupportedCacheError(f"KV dtype {dtype} is not supported; one of {list(FLOAT_DTYPES)}")
    return name


def _check_full_attention(cfg: Any) -> None:
    """Sliding-window and chunked layers keep only a window of the KV: their blocks are not the prefix's."""
    types = getattr(cfg, "layer_types", None)  # authoritative when set (Qwen2 keeps an unused sliding_window)
    if types is None:
        windowed = getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None)
        types = ["sliding_or_chunked_attention" if windowed else "full_attention"]
    other = sorted({t for t in types if t != "full_attention"})
    if other:
        raise UnsupportedCacheError(
            f"{getattr(cfg, 'model_type', 'this model')}: only full-attention KV can be stored (layer types {other})"
        )


def _config_dtype(cfg: Any) -> Any:
    """``dtype`` (transformers 5) or ``torch_dtype`` (4.x; reading it on 5.x only warns, so only when needed)."""
    return cfg.dtype if hasattr(cfg, "dtype") else getattr(cfg, "torch_dtype", None)


def model_layout(model_or_config: Any, block_size: int = DEFAULT_BLOCK_SIZE, dtype: Any = None) -> KVLayout:
    """The KVLayout of a model's KV cache. ``dtype`` defaults to the model's, else the config's, else float32."""
    cfg = text_config(model_or_config)
    _check_full_attention(cfg)
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads
    if dtype is None:
        dtype = getattr(model_or_config, "dtype", None) if hasattr(model_or_config, "config") else None
        dtype = dtype or _config_dtype(cfg) or torch.float32
    return KVLayout(
        num_layers=int(cfg.num_hidden_layers),
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        block_size=block_size,
        dtype=_dtype_name(dtype),
        order=ORDER,
    )


def model_name(model_or_config: Any, name: str | None = None, weights: bool = False) -> str:
    """``<name>@hf/<config fingerprint>[/<weights fingerprint>]``: what a namespace's model field holds."""
    cfg = getattr(model_or_config, "config", model_or_config)
    base = name or getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "") or "hf-model"
    out = f"{base}@hf/{config_fingerprint(cfg)}"
    if weights:
        if not hasattr(model_or_config, "state_dict"):
            raise ConfigError("weights=True needs the model itself, not its config")
        out += f"/{weights_fingerprint(model_or_config)}"
    return out


def model_namespace(
    model_or_config: Any,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    name: str | None = None,
    dtype: Any = None,
    tenant: str = "",
    weights: bool = False,
) -> Namespace:
    """The namespace a model's blocks live in: its name + config fingerprint, and its KV layout."""
    layout = model_layout(model_or_config, block_size, dtype)
    return Namespace(model_name(model_or_config, name, weights), layout, tenant=tenant)


def mount_model(
    model_or_config: Any,
    *tiers: Any,
    block_size: int = DEFAULT_BLOCK_SIZE,
    name: str | None = None,
    dtype: Any = None,
    weights: bool = False,
    **mount_kwargs: Any,
) -> Store:
    """``kvbm_fs.mount`` with the model's namespace as the store's default (other kwargs as for mount)."""
    ns = model_namespace(
        model_or_config,
        block_size,
        name=name,
        dtype=dtype,
        tenant=str(mount_kwargs.pop("tenant", "") or ""),
        weights=weights,
    )
    return mount(*tiers, layout=ns.layout, model=ns.model, tenant=ns.tenant, **mount_kwargs)


def _namespace(store: Store, namespace: Namespace | None) -> Namespace:
    if namespace is not None:
        return store.add_namespace(namespace)
    if store.default_namespace is None:
        raise ConfigError("the store has no default namespace: mount it with mount_model() or pass namespace=")
    return store.default_namespace


def check_model(model: Any, ns: Namespace) -> None:
    """Refuse a model whose KV cannot be the namespace's: another layout, dtype or config fingerprint."""
    want = model_layout(model, ns.layout.block_size)
    if want != ns.layout:
        raise LayoutMismatchError(
            f"the model's KV layout {want.to_dict()} does not match namespace {ns.short_id} ({ns.model}),"
            f" layout {ns.layout.to_dict()}: mount a store for this model (mount_model) instead"
        )
    _, sep, rest = ns.model.rpartition("@hf/")
    fp = config_fingerprint(model)
    if sep and rest.split("/")[0] != fp:
        raise LayoutMismatchError(
            f"namespace {ns.short_id} holds blocks of model config {rest.split('/')[0]} ({ns.model});"
            f" this model's config is {fp}"
        )


# ---- cache <-> blocks -------------------------------------------------------------------------------------


def token_ids(input_ids: Any) -> np.ndarray:
    """A prompt as a 1-D int64 array; a batch of more than one prompt is refused."""
    arr = input_ids.detach().to("cpu").numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise UnsupportedCacheError(f"input_ids of shape {tuple(arr.shape)}: one prompt ([T] or [1, T]) at a time")
    if arr.dtype.kind not in "iu":
        raise UnsupportedCacheError(f"input_ids must be integer token ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each ``[batch, kv_heads, tokens, head_dim]``, whatever the Cache API."""
    layers = getattr(cache, "layers", None)
    if layers is not None and all(hasattr(layer, "keys") for layer in layers):
        for layer in layers:
            if type(layer).__name__ != "DynamicLayer":
                raise UnsupportedCacheError(f"cache layer {type(layer).__name__}: only DynamicLayer KV is stored")
        return [(layer.keys, layer.values) for layer in layers]
    if hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):  # transformers < 4.56
        return list(zip(cache.key_cache, cache.value_cache))
    if isinstance(cache, (tuple, list)):  # legacy tuple of (k, v) per layer
        return [(kv[0], kv[1]) for kv in cache]
    raise UnsupportedCacheError(f"{type(cache).__name__} is not a KV cache this integration can read")


def _check_layers(pairs: Sequence[tuple[Any, Any]], layout: KVLayout) -> int:
    """Validate per-layer KV against the namespace layout; return the tokens every layer holds."""
    if len(pairs) != layout.num_layers or any(k is None for k, _ in pairs):
        raise LayoutMismatchError(f"the cache has {len(pairs)} KV layers; the namespace layout has {layout.num_layers}")
    k0 = pairs[0][0]
    if k0.ndim != 4 or k0.shape[0] != 1:
        raise UnsupportedCacheError(f"KV of shape {tuple(k0.shape)}: only batch size 1 ([1, H, T, D]) is stored")
    want = (1, layout.num_kv_heads, k0.shape[2], layout.head_dim)
    for i, (k, v) in enumerate(pairs):
        for t in (k, v):
            if tuple(t.shape) != want or dtype_name(t.dtype) != layout.dtype:
                raise LayoutMismatchError(
                    f"layer {i} KV is {tuple(t.shape)} {t.dtype}; the namespace layout needs {want} {layout.dtype}"
                    " (kv heads, head dim, dtype and equal lengths across layers must match)"
                )
    return int(k0.shape[2])


def _gather(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], layout: KVLayout, n: int, sel: Any) -> torch.Tensor:
    """Blocks ``sel`` (of the first ``n``) as ``[len(sel), *block_shape]`` on the host: one copy per layer."""
    bs = layout.block_size
    out = torch.empty((len(sel), *layout.block_shape), dtype=torch_dtype(layout.dtype))
    idx = None if len(sel) == n else torch.as_tensor(sel, dtype=torch.long)
    for li, (k, v) in enumerate(pairs):
        for kv, t in enumerate((k, v)):
            blocks = t[0, :, : n * bs].unflatten(1, (n, bs))  # [H, n, bs, D], a view
            if idx is not None:
                blocks = blocks.index_select(1, idx.to(blocks.device))
            out[:, li, kv].copy_(blocks.transpose(0, 1))
    return out


def save_prefill(store: Store, input_ids: Any, cache: Any, *, namespace: Namespace | None = None) -> int:
    """Store the KV of every full block of a prefill (all in one ``put``); return the blocks newly stored.

    ``cache`` is the ``DynamicCache`` (or legacy tuple) the model returned for ``input_ids``; it may hold
    more tokens (e.g. after ``generate``): only the blocks of ``input_ids`` it covers are stored. Blocks
    already in some tier are skipped (their bytes are the same prefix's).
    """
    ns = _namespace(store, namespace)
    ids = token_ids(input_ids)
    pairs = cache_layers(cache)
    held = _check_layers(pairs, ns.layout)
    keys = ns.keys_for_tokens(ids[: min(ids.size, held)])
    if not len(keys):
        return 0
    bs = ns.layout.block_size
    # only the blocks no tier holds are copied out; KV events for routers get their token ids
    res = save(store, keys, lambda sel: _gather(pairs, ns.layout, len(keys), sel), tokens=ids[: len(keys) * bs])
    return res.saved


def _cache_from_blocks(blocks: torch.Tensor, device: Any) -> Any:
    """A ``DynamicCache`` holding ``blocks`` (``[n, L, 2, H, bs, D]``) as one contiguous prefix."""
    n, num_layers, _, heads, bs, dim = blocks.shape
    cache = _hf().DynamicCache()
    for li in range(num_layers):
        k, v = (blocks[:, li, kv].transpose(0, 1).reshape(1, heads, n * bs, dim).to(device) for kv in (0, 1))
        cache.update(k, v, li)
    return cache


def load_prefix(
    store: Store, input_ids: Any, *, namespace: Namespace | None = None, device: Any = None
) -> tuple[Any | None, int]:
    """The longest stored, verified prefix of a prompt as ``(DynamicCache, tokens)``, or ``(None, 0)``.

    The block holding the prompt's last token is never loaded: the model must compute at least one token
    to produce logits. A block that fails verification (or vanished since the match) ends the prefix.
    """
    ns = _namespace(store, namespace)
    ids = token_ids(input_ids)
    keys = ns.keys_for_tokens(ids[: max(ids.size - 1, 0)])
    m = store.match(keys)
    if m.worth == 0:
        return None, 0
    out = torch.empty((m.worth, *ns.layout.block_shape), dtype=torch_dtype(ns.layout.dtype))
    n = load(store, keys[: m.worth], out, m).prefix
    if n == 0:
        return None, 0
    return _cache_from_blocks(out[:n], device if device is not None else "cpu"), n * ns.layout.block_size


# ---- generation -------------------------------------------------------------------------------------------


@dataclass
class CachedGeneration:
    """What :func:`generate_with_cache` did: the output, and how much of the prompt it loaded vs computed."""

    sequences: torch.Tensor
    output: Any
    prompt_tokens: int
    loaded_tokens: int
    saved_blocks: int
    seconds: float = field(default=0.0, repr=False)

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.loaded_tokens


def cache_kwarg(model: Any) -> str:
    """The name ``forward``/``generate`` take the KV cache by: ``cache`` (transformers 5.x) or ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _take_generate_args(model: Any, kwargs: dict[str, Any]) -> tuple[str, bool]:
    """Refuse what would fight the restored cache (a cache of the caller's, padding); pop what we override.

    Returns the cache kwarg's name and whether the caller asked for generate's dict output.
    """
    key = cache_kwarg(model)
    if key in kwargs or "past_key_values" in kwargs:
        raise ConfigError("generate_with_cache builds the KV cache itself; do not pass one")
    mask = kwargs.pop("attention_mask", None)
    if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
        raise UnsupportedCacheError("a padded prompt (attention_mask with zeros) cannot reuse stored blocks")
    return key, bool(kwargs.pop("return_dict_in_generate", False))


def generate_with_cache(
    model: Any, store: Store, input_ids: Any, *, namespace: Namespace | None = None, **generate_kwargs: Any
) -> CachedGeneration:
    """``model.generate`` continued from the stored prefix of the prompt; the prompt's new blocks are saved.

    Generate gets the whole prompt plus a cache holding its first ``loaded_tokens``: transformers then
    prefills only the rest (it slices ``input_ids`` by the cache length when the attention mask spans the
    whole prompt, which it does here). ``output`` is what generate returned (a tensor unless
    ``return_dict_in_generate=True`` was asked for).
    """
    t0 = time.perf_counter()
    ns = _namespace(store, namespace)
    check_model(model, ns)
    key, want_dict = _take_generate_args(model, generate_kwargs)
    ids = torch.as_tensor(token_ids(input_ids), device=model.device).unsqueeze(0)
    cache, loaded = load_prefix(store, ids, namespace=ns, device=model.device)
    kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(ids), "return_dict_in_generate": True}
    if cache is not None:
        kwargs[key] = cache
    out = model.generate(ids, **kwargs, **generate_kwargs)
    kv = _output_cache(out)
    saved = save_prefill(store, ids, kv, namespace=ns) if kv is not None else 0
    return CachedGeneration(
        out.sequences, out if want_dict else out.sequences, ids.shape[1], loaded, saved, time.perf_counter() - t0
    )


# ---- offline prepopulation ----------------------------------------------------------------------------------


@dataclass
class PrepopulateStats:
    prompts: int = 0
    prefilled: int = 0
    skipped: int = 0
    tokens: int = 0
    saved_blocks: int = 0
    seconds: float = 0.0


def _prefill(model: Any, batch: list[np.ndarray]) -> list[tuple[np.ndarray, Any]]:
    """One forward over right-padded prompts; each prompt's own (un-padded) KV as a legacy per-layer tuple.

    Right padding leaves every real token's KV what an unbatched prefill computes (causal attention, the
    same positions), up to float rounding.
    """
    width = max(p.size for p in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch):
        ids[i, : p.size] = torch.as_tensor(p)
        mask[i, : p.size] = 1
    with torch.no_grad():
        out = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=True)
    pairs = cache_layers(_output_cache(out))
    return [
        (p, [(k[i : i + 1, :, : p.size], v[i : i + 1, :, : p.size]) for k, v in pairs]) for i, p in enumerate(batch)
    ]


def prepopulate(
    model: Any,
    store: Store,
    prompts: Iterable[Any],
    *,
    batch_size: int = 1,
    namespace: Namespace | None = None,
) -> PrepopulateStats:
    """Warm a store offline: prefill each prompt (token id lists) and store its full blocks.

    Prompts whose full blocks are all stored already (or repeat an earlier prompt's) are skipped. ``batch_size`` > 1 prefills prompts of
    similar length together (right-padded).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    ns = _namespace(store, namespace)
    check_model(model, ns)
    st = PrepopulateStats()
    todo: list[np.ndarray] = []
    seen: set[int] = set()  # last block's chain hash: names every block of the prompt
    for p in prompts:
        ids = token_ids(p)
        st.prompts += 1
        keys = ns.keys_for_tokens(ids)
        if not len(keys) or int(keys.hashes[-1]) in seen or present(store, keys).all():
            st.skipped += 1
            continue
        seen.add(int(keys.hashes[-1]))
        todo.append(ids)
    todo.sort(key=lambda a: a.size)
    for a in range(0, len(todo), batch_size):
        for ids, kv in _prefill(model, todo[a : a + batch_size]):
            st.saved_blocks += save_prefill(store, ids, kv, namespace=ns)
            st.prefilled += 1
            st.tokens += int(ids.size)
    st.seconds = round(time.perf_counter() - t0, 3)
    return st


__all__ = [
    "CachedGeneration",
    "PrepopulateStats",
    "UnsupportedCacheError",
    "cache_kwarg",
    "cache_layers",
    "check_model",
    "config_fingerprint",
    "generate_with_cache",
    "load_prefix",
    "model_layout",
    "model_name",
    "model_namespace",
    "mount_model",
    "prepopulate",
    "save_prefill",
    "token_ids",
    "weights_fingerprint",
]
