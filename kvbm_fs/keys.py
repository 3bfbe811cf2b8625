"""Typed block keys.

A key is (namespace id, sequence hash).  Batches of keys are numpy uint64 arrays
under one namespace (:class:`BlockKeys`), so hot paths never build a Python object
per block; :class:`BlockKey` is the scalar form for APIs that take one key.
Engine-native hashes (vLLM bytes, SGLang hex) enter through :func:`engine_hash_to_u64`
and live in a namespace whose ``hash_scheme`` names their origin, so they can never
collide with Dynamo-compatible hashes of other namespaces.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import xxhash

from . import hashing
from .errors import ConfigError
from .layout import KVLayout

_U64 = (1 << 64) - 1
HASH_SCHEMES = ("kvbm-v1", "vllm", "sglang", "external")
NS_FORMAT = "kvbm_fs.namespace.v1"


@dataclass(frozen=True, slots=True, order=True)
class BlockKey:
    ns: int
    seq_hash: int

    def __str__(self) -> str:
        return f"{self.ns:016x}/{self.seq_hash:016x}"


class BlockKeys:
    """A batch of keys under one namespace, in chain order when built from tokens."""

    __slots__ = ("hashes", "ns", "parents")

    def __init__(self, ns: int, hashes: Any, parents: Any = None) -> None:
        self.ns = int(ns) & _U64
        self.hashes = _u64_array(hashes)
        if parents is None:
            self.parents = np.zeros(self.hashes.size, dtype=np.uint64)
        else:
            self.parents = _u64_array(parents)
            if self.parents.shape != self.hashes.shape:
                raise ValueError("parents and hashes differ in length")

    @classmethod
    def chain(cls, ns: int, hashes: Any, root_parent: int = 0) -> BlockKeys:
        """Keys of a prefix chain: each block's parent is the previous block."""
        h = _u64_array(hashes)
        parents = np.empty_like(h)
        if h.size:
            parents[0] = root_parent
            parents[1:] = h[:-1]
        return cls(ns, h, parents)

    @classmethod
    def of(cls, keys: Iterable[BlockKey]) -> BlockKeys:
        ks = list(keys)
        nss = {k.ns for k in ks}
        if len(nss) > 1:
            raise ValueError("a BlockKeys batch holds one namespace; split the keys by namespace")
        return cls(nss.pop() if nss else 0, [k.seq_hash for k in ks])

    def __len__(self) -> int:
        return int(self.hashes.size)

    @overload
    def __getitem__(self, i: int) -> BlockKey: ...
    @overload
    def __getitem__(self, i: slice | np.ndarray) -> BlockKeys: ...
    def __getitem__(self, i: int | slice | np.ndarray) -> BlockKey | BlockKeys:
        if isinstance(i, (int, np.integer)):
            return BlockKey(self.ns, int(self.hashes[i]))
        return BlockKeys(self.ns, self.hashes[i], self.parents[i])

    def __iter__(self) -> Iterator[BlockKey]:
        ns = self.ns
        return (BlockKey(ns, h) for h in self.hashes.tolist())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockKeys) and self.ns == other.ns and np.array_equal(self.hashes, other.hashes)

    def __hash__(self) -> int:
        return hash((self.ns, self.hashes.tobytes()))

    def __repr__(self) -> str:
        return f"BlockKeys(ns={self.ns:016x}, n={len(self)})"


def _u64_array(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray) and x.dtype == np.uint64 and x.ndim == 1:
        return x
    if isinstance(x, np.ndarray) and x.dtype.kind == "i":
        return x.astype(np.uint64)
    arr = np.asarray([int(v) & _U64 for v in x] if not isinstance(x, np.ndarray) else x, dtype=np.uint64)
    return arr.reshape(-1)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def engine_hash_to_u64(h: bytes | str | int) -> int:
    """Map one engine-native block hash onto the 64-bit key space.

    Exactly 8 bytes are read as a little-endian u64; any other length (vLLM's
    32-byte sha256 or 16-byte xxh3_128 digests, SGLang's 64-hex pages) is folded
    with xxh3_64 (seed 0) so every bit counts.  Ints are taken modulo 2**64.
    """
    if isinstance(h, bool):
        raise TypeError("engine hash must be bytes, hex str or int, not bool")
    if isinstance(h, (int, np.integer)):
        return int(h) & _U64
    if isinstance(h, str):
        try:
            h = bytes.fromhex(h)
        except ValueError:
            raise ValueError(f"engine hash {h[:16]!r}... is not hex") from None
    if not isinstance(h, (bytes, bytearray, memoryview)):
        raise TypeError(f"engine hash must be bytes, hex str or int, got {type(h).__name__}")
    b = bytes(h)
    if len(b) == 8:
        return int.from_bytes(b, "little")
    return xxhash.xxh3_64_intdigest(b, 0)


@dataclass(frozen=True)
class Namespace:
    """Everything that must match for two blocks with equal hashes to be interchangeable."""

    model: str
    layout: KVLayout
    rank: int = 0
    world_size: int = 1
    tenant: str = ""
    hash_scheme: str = "kvbm-v1"
    id: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("Namespace.model must be a non-empty string")
        if not (_is_int(self.world_size) and self.world_size >= 1):
            raise ConfigError(f"Namespace.world_size must be an int >= 1, got {self.world_size!r}")
        if not isinstance(self.tenant, str):
            raise ConfigError(f"Namespace.tenant must be a string, got {self.tenant!r}")
        if not isinstance(self.layout, KVLayout):
            raise ConfigError(f"Namespace.layout must be a KVLayout, got {type(self.layout).__name__}")
        if not (_is_int(self.rank) and 0 <= self.rank < self.world_size):
            raise ConfigError(f"Namespace.rank must be in [0, world_size={self.world_size}), got {self.rank!r}")
        if self.hash_scheme not in HASH_SCHEMES:
            raise ConfigError(f"Namespace.hash_scheme must be one of {HASH_SCHEMES}, got {self.hash_scheme!r}")
        object.__setattr__(self, "id", xxhash.xxh3_64_intdigest(self.canonical_bytes(), 0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": NS_FORMAT,
            "model": self.model,
            "layout": self.layout.to_dict(),
            "rank": self.rank,
            "world_size": self.world_size,
            "tenant": self.tenant,
            "hash_scheme": self.hash_scheme,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Namespace:
        """Inverse of :meth:`to_dict` (plus an optional ``id``, which must then match)."""
        d = dict(d)
        fmt = d.pop("format", None)
        if fmt != NS_FORMAT:
            raise ConfigError(f"namespace record has format {fmt!r}; this build reads {NS_FORMAT!r}")
        want_id = d.pop("id", None)
        layout = d.pop("layout", None)
        if not isinstance(layout, (dict, KVLayout)):
            raise ConfigError("namespace record has no layout table")
        try:
            ns = cls(layout=layout if isinstance(layout, KVLayout) else KVLayout.from_dict(layout), **d)
        except TypeError as e:
            raise ConfigError(f"bad namespace record: {e}") from None
        if want_id is not None:  # the integer, or the short id (16 hex digits) as files record it
            try:
                got = int(want_id, 16) if isinstance(want_id, str) else int(want_id)
            except (TypeError, ValueError):
                raise ConfigError(f"namespace record id {want_id!r} is neither an integer nor 16 hex digits") from None
            if got != ns.id:
                raise ConfigError(f"namespace record id {got:016x} does not match its content ({ns.short_id})")
        return ns

    def canonical_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def short_id(self) -> str:
        return f"{self.id:016x}"

    @property
    def block_nbytes(self) -> int:
        return self.layout.block_nbytes

    def keys_for_tokens(
        self,
        tokens: Any,
        cache_salt: str | None = None,
        lora_name: str | None = None,
        extra_hashes: Sequence[int | None] | None = None,
    ) -> BlockKeys:
        """Dynamo-compatible keys of every full block of ``tokens``."""
        if self.hash_scheme != "kvbm-v1":
            raise ConfigError(f"namespace hashes with {self.hash_scheme!r}; use keys_from_engine()")
        salt = hashing.salt_hash(cache_salt, lora_name)
        seq = hashing.sequence_hash_array(tokens, self.layout.block_size, salt, extra_hashes=extra_hashes)
        return BlockKeys.chain(self.id, seq)

    def keys_from_engine(self, hashes: Sequence[bytes | str | int]) -> BlockKeys:
        """Keys for an engine's own chained block hashes (vLLM ``request.block_hashes``, SGLang hex)."""
        return BlockKeys.chain(self.id, np.fromiter((engine_hash_to_u64(h) for h in hashes), np.uint64, len(hashes)))
