"""Prefix-chain block hashes, bit-compatible with Dynamo KVBM v1 (``lib/llm/src/tokens.rs``).

A block's name must be identical in every process, on every rank and after every
restart, so nothing here depends on Python's ``hash`` or on pickling.  Tokens are
packed once into one little-endian ``uint32`` buffer; each full block is then one
C call into xxh3, and the chain is one more call per block.  No Python object is
made per token.
"""

from __future__ import annotations

import array
import json
import struct
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import numpy as np
import xxhash

from .errors import ConfigError

MAX_BLOCK_SIZE = 1024
_U64 = (1 << 64) - 1
_xxh3_64 = xxhash.xxh3_64_intdigest
_pack_pair = struct.Struct("<QQ").pack


def salt_hash(cache_salt: str | None = None, lora_name: str | None = None) -> int:
    """xxh3_64 (seed 0) of the compact JSON ``{"salt":..,"lora_name":..}`` (absent fields left out)."""
    obj: dict[str, str] = {}
    if cache_salt is not None:
        obj["salt"] = cache_salt
    if lora_name is not None:
        obj["lora_name"] = lora_name
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return _xxh3_64(data, 0)


def check_block_size(block_size: int) -> int:
    """Engines page KV in power-of-two blocks; anything else is a config mistake."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise ConfigError(f"block_size must be an int, got {type(block_size).__name__}")
    bs = int(block_size)
    if bs < 1 or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
        raise ConfigError(f"block_size must be a power of two in [1, {MAX_BLOCK_SIZE}], got {bs}")
    return bs


def _check_seed(seed: int, what: str = "salt_hash") -> int:
    s = int(seed)
    if not 0 <= s <= _U64:
        raise ConfigError(f"{what} must be an unsigned 64-bit int, got {seed!r}")
    return s


def as_token_array(tokens: Any) -> np.ndarray:
    """Tokens (list, numpy array or torch tensor) as a contiguous little-endian uint32 array."""
    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):  # torch.Tensor, without importing torch
        tokens = tokens.detach().cpu().numpy()
    elif isinstance(tokens, (list, tuple)) and tokens and not isinstance(tokens[0], bool):
        try:  # 4x faster than np.asarray for a long list of Python ints
            return np.frombuffer(array.array("I", tokens), dtype=np.uint32).astype("<u4", copy=False)
        except OverflowError:
            raise ValueError("token ids must fit in uint32") from None
        except TypeError:
            pass
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == np.dtype("<u4"):
        return np.ascontiguousarray(arr)
    if arr.size == 0:
        return np.zeros(0, dtype="<u4")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF:
        raise ValueError("token ids must fit in uint32")
    return np.ascontiguousarray(arr, dtype="<u4")


def block_hash_array(
    tokens: Any,
    block_size: int,
    salt_hash: int,
    extra_hashes: Sequence[int | None] | np.ndarray | None = None,
) -> np.ndarray:
    """Per-block (unchained) hashes as uint64; ``extra_hashes[i]`` folds multimodal content into block i."""
    bs = check_block_size(block_size)
    seed = _check_seed(salt_hash)
    arr = as_token_array(tokens)
    n = arr.size // bs
    mv = memoryview(arr[: n * bs].data).cast("B")
    step = bs * 4
    out = np.fromiter((_xxh3_64(mv[i : i + step], seed) for i in range(0, n * step, step)), np.uint64, n)
    if extra_hashes is not None:
        _fold_extra(out, extra_hashes, seed)
    return out


def _fold_extra(out: np.ndarray, extra: Sequence[int | None] | np.ndarray, seed: int) -> None:
    if len(extra) < out.size:
        raise ValueError(f"extra_hashes has {len(extra)} entries for {out.size} blocks")
    for i in range(out.size):
        e = extra[i]
        if e is not None:
            out[i] = _xxh3_64(_pack_pair(int(out[i]), int(e) & _U64), seed)


def chain_hashes(block_hashes: np.ndarray, salt_hash: int, parent: int | None = None) -> np.ndarray:
    """Sequence hashes from block hashes; ``parent`` continues an existing chain."""
    seed = _check_seed(salt_hash)
    if parent is not None:
        parent = _check_seed(parent, "parent")
    bh = block_hashes.tolist()
    if not bh:
        return np.zeros(0, dtype=np.uint64)

    def step(prev: int, h: int) -> int:
        return _xxh3_64(_pack_pair(prev, h), seed)

    if parent is None:
        seq = accumulate(bh, step)
    else:
        seq = accumulate(bh, step, initial=parent)
        next(seq)
    return np.fromiter(seq, np.uint64, len(bh))


def sequence_hash_array(
    tokens: Any,
    block_size: int,
    salt_hash: int,
    parent: int | None = None,
    extra_hashes: Sequence[int | None] | np.ndarray | None = None,
) -> np.ndarray:
    return chain_hashes(block_hash_array(tokens, block_size, salt_hash, extra_hashes), salt_hash, parent)


def block_hashes(tokens: Any, block_size: int, salt_hash: int) -> list[int]:
    """Dynamo ``block_hash`` of every full block (partial tail blocks are not hashed)."""
    return [int(x) for x in block_hash_array(tokens, block_size, salt_hash).tolist()]


def sequence_hashes(tokens: Any, block_size: int, salt_hash: int) -> list[int]:
    """Dynamo ``sequence_hash`` of every full block: the prefix-chain name of the block."""
    return [int(x) for x in sequence_hash_array(tokens, block_size, salt_hash).tolist()]
