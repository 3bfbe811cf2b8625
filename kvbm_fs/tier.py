"""The one Tier interface every storage medium implements, and the slot-pool base for memory tiers.

Primitives are batch-first and take :class:`BlockKeys` plus 2-D uint8 row buffers
``[n, block_nbytes]`` (numpy or torch, any device).  A miss is a ``False`` in the
returned mask; misuse raises.  ``get`` writes into caller-owned rows and leaves
the rows of absent keys untouched; a block that was read but failed verification
is a miss too, and its row's content is then unspecified (disk tiers read straight
into the caller's buffer rather than pay a staging copy).  Tiers that keep bytes outside process memory
verify every block they read (see :mod:`kvbm_fs.codec`) and report failures as misses.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Iterable, Iterator
from enum import StrEnum
from typing import Any

import numpy as np

from .errors import ConfigError, IllegalTransitionError, LayoutMismatchError, TierClosedError
from .events import EventBus, EventKind
from .keys import BlockKey, BlockKeys, Namespace
from .lifecycle import SlotPool
from .policy import AdmissionPolicy, EvictionPolicy, admission_of
from .rows import copy_rows, is_torch


class Medium(StrEnum):
    GPU = "gpu"
    HOST = "host"
    DISK = "disk"
    REMOTE = "remote"
    PEER = "peer"


class Tier(abc.ABC):
    name: str
    medium: Medium
    persistent: bool = False
    # Other processes can open this tier at once and see the same blocks (persistent tiers, and
    # peers, whose blocks live in another process): a store neither persists it at close nor does a
    # vLLM scheduler track it in its BlockDirectory from its worker's events.
    shareable: bool = False
    block_nbytes: int
    events: EventBus
    # A full tier evicts by its policy to take a put. The placement daemon turns this off for every
    # tier but the last, so upper tiers refuse (and the store spills down) instead of dropping blocks
    # that may exist nowhere else; the daemon frees them by demotion.
    evict_on_put: bool = True

    # ---- primitives ------------------------------------------------------------------------
    @abc.abstractmethod
    def put(self, keys: BlockKeys, data: Any) -> np.ndarray:
        """Store rows of ``data``; mask of keys now present (False: refused, e.g. full of pinned blocks)."""

    @abc.abstractmethod
    def get(self, keys: BlockKeys, out: Any) -> np.ndarray:
        """Copy present blocks into ``out`` rows; mask of keys found and verified (False rows: recompute)."""

    @abc.abstractmethod
    def contains(self, keys: BlockKeys) -> np.ndarray: ...

    @abc.abstractmethod
    def delete(self, keys: BlockKeys) -> np.ndarray:
        """Remove keys; mask of those that were present. Pinned blocks raise PinnedError, nothing removed."""

    @abc.abstractmethod
    def iter_keys(self) -> Iterator[BlockKeys]:
        """All stored keys, one batch per namespace (or per chunk)."""

    @abc.abstractmethod
    def pin(self, keys: BlockKeys) -> np.ndarray:
        """Protect present keys from eviction (refcounted); mask of keys pinned."""

    @abc.abstractmethod
    def unpin(self, keys: BlockKeys) -> None: ...

    @property
    @abc.abstractmethod
    def capacity_bytes(self) -> int: ...

    @property
    @abc.abstractmethod
    def used_bytes(self) -> int: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...

    # ---- built on the primitives -----------------------------------------------------------
    def prefix_len(self, keys: BlockKeys) -> int:
        """Number of leading keys present (the longest matched prefix)."""
        miss = np.flatnonzero(~self.contains(keys))
        return int(miss[0]) if miss.size else len(keys)

    def pinned(self, keys: BlockKeys) -> np.ndarray:
        """Mask of keys pinned in this tier (tiers without pins: none)."""
        return np.zeros(len(keys), bool)

    def coldest(self, n: int) -> list[BlockKeys]:
        """Up to ``n`` unpinned blocks the policy would evict next, coldest first (for demotion).
        Tiers that cannot rank their blocks return none."""
        return []

    def bind_namespace(self, ns: Namespace) -> None:
        """Called once per namespace before use; persistent tiers check or record a manifest here."""
        if ns.block_nbytes != self.block_nbytes:
            raise LayoutMismatchError(
                f"tier {self.name!r} holds {self.block_nbytes}-byte blocks; namespace {ns.short_id} needs {ns.block_nbytes}"
            )

    def all_keys(self) -> Iterator[BlockKey]:
        for batch in self.iter_keys():
            yield from batch

    def usage(self) -> tuple[int, int] | None:
        """(blocks, used bytes) for metrics, or None where counting would be a full listing."""
        return len(self), self.used_bytes

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "medium": self.medium.value,
            "persistent": self.persistent,
            "blocks": len(self),
            "capacity_bytes": self.capacity_bytes,
            "used_bytes": self.used_bytes,
        }

    def moves_device_rows(self, rows: Any) -> bool:
        """Does this tier move ``rows`` (a tensor on some device) to and from its medium directly,
        so that a transfer between it and a GPU tier should stage on the GPU rather than the host?"""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; later calls raise TierClosedError."""

    def __enter__(self) -> Tier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_rows(self, keys: BlockKeys, rows: Any, what: str) -> None:
        if not (hasattr(rows, "shape") and hasattr(rows, "dtype")) or isinstance(rows, type):
            raise LayoutMismatchError(
                f"{self.name}.{what}: buffer is a {type(rows).__name__}; "
                f"need a numpy array or torch tensor of [>={len(keys)}, {self.block_nbytes}] uint8 rows"
            )
        shape = tuple(rows.shape)
        if len(shape) != 2 or shape[0] < len(keys) or shape[1] != self.block_nbytes:
            raise LayoutMismatchError(
                f"{self.name}.{what}: buffer shape {shape}, need [>={len(keys)}, {self.block_nbytes}] uint8 rows"
            )
        dt = str(rows.dtype).removeprefix("torch.")
        if dt != "uint8":
            raise LayoutMismatchError(f"{self.name}.{what}: buffer dtype {dt}, need uint8 rows")


class KeyPins(dict[tuple[int, int], int]):
    """Pin counts by (namespace, hash) for tiers whose blocks live outside this process (remote,
    Mooncake): the pins are this process's own, so its eviction skips them. Callers hold their lock."""

    def add(self, keys: BlockKeys, mask: np.ndarray) -> None:
        for h in keys.hashes[mask].tolist():
            self[(keys.ns, h)] = self.get((keys.ns, h), 0) + 1

    def release(self, keys: BlockKeys, tier: str) -> None:
        ks = [(keys.ns, h) for h in keys.hashes.tolist()]
        if any(k not in self for k in ks):
            raise IllegalTransitionError(f"{tier}: unpin of blocks that are not pinned")
        for k in ks:
            self[k] -= 1
            if not self[k]:
                del self[k]

    def mask(self, keys: BlockKeys) -> np.ndarray:
        return np.array([(keys.ns, h) in self for h in keys.hashes.tolist()], bool)


class KeyPinnedTier(Tier):
    """A tier whose blocks live outside this process and whose pins are this process's own
    (:class:`KeyPins` under the tier's ``_lock``): its eviction skips them, the server's does not."""

    _pins: KeyPins
    _lock: threading.Lock

    def pin(self, keys: BlockKeys) -> np.ndarray:
        have = self.contains(keys)
        with self._lock:
            self._pins.add(keys, have)
        return have

    def unpin(self, keys: BlockKeys) -> None:
        with self._lock:
            self._pins.release(keys, self.name)

    def pinned(self, keys: BlockKeys) -> np.ndarray:
        with self._lock:
            return self._pins.mask(keys)


class Admission:
    """A tier's admission filter (the ``+ADMISSION`` part of its policy spec), the one every tier uses:
    slot tiers, disk and remote. Why: a frequency filter keeps one-off prompts from taking room, and in
    front of a disk or a bucket from being written at all, which saves SSD wear and PUT requests, the
    write churn a write-through G3 suffers. Counts are per process (not shared with other processes of
    the tier)."""

    SKETCH_BLOCKS = 1 << 20  # sketch size cap for a large or unbounded tier

    def __init__(
        self, policy: EvictionPolicy, capacity_blocks: int | None, *, sketch_blocks: int | None = None
    ) -> None:
        """``sketch_blocks``: the sketch's exact size (slot pools size it by their slots); by default
        the capacity, capped at ``SKETCH_BLOCKS``."""
        self.filter: AdmissionPolicy | None = admission_of(policy)
        if self.filter is not None:
            if sketch_blocks is None:
                sketch_blocks = min(capacity_blocks or self.SKETCH_BLOCKS, self.SKETCH_BLOCKS)
            self.filter.bind(sketch_blocks)

    def seen(self, keys: BlockKeys) -> None:
        """One access (a read, or an offer to store) per key."""
        if self.filter is not None and len(keys):
            self.filter.record(keys)

    def trim(self, tier: Tier, keys: BlockKeys, todo: np.ndarray, free: int) -> np.ndarray:
        """The leading part of ``todo`` (indices into ``keys`` of blocks new to ``tier``, chain order)
        that the filter admits, ``free`` of them without displacing anything: a refused block ends
        the chain, since a child without its parent can never be matched."""
        if self.filter is None or todo.size == 0:
            return todo
        need = todo.size - max(0, free)
        victims = tier.coldest(need) if need > 0 and self.filter.needs_victims else []
        ok = self.filter.admit(keys[todo], max(0, free), victims)
        refused = np.flatnonzero(~ok)
        if refused.size == 0:
            return todo
        tier.events.publish(EventKind.REFUSED, tier.name, keys[todo[refused[0] :]], "admission")
        return todo[: refused[0]]


class SlotTier(Tier):
    """A tier whose blocks sit in rows of one preallocated 2-D buffer, tracked by a :class:`SlotPool`.

    Subclasses only allocate the buffer.  Bytes are copied outside the pool lock
    while the slots are pinned, so concurrent puts, gets and evictions never see
    a slot whose bytes are in flight.
    """

    def __init__(
        self,
        name: str,
        buf: Any,
        *,
        block_size: int | None = None,
        events: EventBus | None = None,
        policy: EvictionPolicy | str | None = None,
    ) -> None:
        self.name = name
        self.buf = buf
        self.block_nbytes = int(buf.shape[1])
        self.events = events or EventBus()
        self.pool = SlotPool(int(buf.shape[0]), block_size, name=name, events=self.events, policy=policy)
        # Admission ("lru+tinylfu"): new blocks the filter refuses are not stored here (put answers
        # False for them, and the store spills them to the next tier).
        self.admission = Admission(self.pool.policy, self.pool.num_slots, sketch_blocks=self.pool.num_slots)
        self._closed = False

    # ---- slot-level API, used by transfer handlers -----------------------------------------
    def reserve(self, n: int) -> np.ndarray | None:
        self._live()
        return self.pool.allocate(n, evict=self.evict_on_put)

    def publish(self, slots: np.ndarray, keys: BlockKeys) -> np.ndarray:
        """Bytes are in place: register the slots and drop the writer's pin. Returns final slots."""
        self.pool.complete(slots)
        final = self.pool.register(slots, keys)
        self.pool.release(final)
        return final

    def acquire(self, keys: BlockKeys) -> np.ndarray:
        self._live()
        return self.pool.acquire(keys)

    def release(self, slots: np.ndarray) -> None:
        self.pool.release(slots)

    def sync(self) -> None:
        """Wait for copies issued on this tier's buffer (GPU tiers override)."""

    # ---- Tier primitives -------------------------------------------------------------------
    def put(self, keys: BlockKeys, data: Any) -> np.ndarray:
        self._check_rows(keys, data, "put")
        self.admission.seen(keys)
        held = self.acquire(keys)  # pins what is already here, so making room cannot evict it
        try:
            out = held >= 0
            todo = self.admission.trim(self, keys, np.flatnonzero(~out), self.pool.num_free)
            if todo.size:
                out[todo] = self._write(keys[todo], data, todo)
            return out
        finally:
            self.pool.release(held)

    def _write(self, keys: BlockKeys, src: Any, src_rows: np.ndarray) -> np.ndarray:
        """Store as many leading keys as fit (a prefix is what matching can use); mask of those written."""
        done = np.zeros(len(keys), bool)
        slots = self.reserve(len(keys))
        if slots is None:
            room = self.pool.num_free + (self.pool.num_evictable if self.evict_on_put else 0)
            slots = self.reserve(min(len(keys), room))
        if slots is None or slots.size == 0:
            return done
        n = slots.size
        keys, src_rows = keys[:n], src_rows[:n]
        try:
            self.copy_rows(self.buf, slots, src, src_rows)
            self.sync()
        except BaseException:
            self.pool.release(slots)
            raise
        self.publish(slots, keys)
        done[:n] = True
        return done

    def copy_rows(self, dst: Any, dst_idx: np.ndarray, src: Any, src_idx: np.ndarray) -> None:
        copy_rows(dst, dst_idx, src, src_idx)

    def get(self, keys: BlockKeys, out: Any) -> np.ndarray:
        self._check_rows(keys, out, "get")
        self.admission.seen(keys)
        slots = self.acquire(keys)
        found = slots >= 0
        try:
            rows = np.flatnonzero(found)
            self.copy_rows(out, rows, self.buf, slots[found])
            self.sync()
            if is_torch(out) and out.is_cuda and not is_torch(self.buf):
                __import__("torch").cuda.current_stream(out.device).synchronize()
        finally:
            self.pool.release(slots)
        return found

    def contains(self, keys: BlockKeys) -> np.ndarray:
        self._live()
        return self.pool.lookup(keys) >= 0

    def pinned(self, keys: BlockKeys) -> np.ndarray:
        slots = self.pool.lookup(keys)
        return (slots >= 0) & (self.pool.refs[np.maximum(slots, 0)] > 0)

    def prefix_len(self, keys: BlockKeys) -> int:
        self._live()
        return self.pool.prefix_len(keys)

    def delete(self, keys: BlockKeys) -> np.ndarray:
        self._live()
        return self.pool.remove(keys)

    def iter_keys(self) -> Iterator[BlockKeys]:
        return iter(self.pool.registered_keys())

    def pin(self, keys: BlockKeys) -> np.ndarray:
        return self.acquire(keys) >= 0

    def unpin(self, keys: BlockKeys) -> None:
        slots = self.pool.lookup(keys)
        self.pool.release(slots)

    def coldest(self, n: int) -> list[BlockKeys]:
        """The next ``n`` eviction victims by policy (for demotion before eviction)."""
        return self.pool.coldest(n)

    def evict(self, n: int) -> int:
        """Evict exactly ``n`` inactive blocks by policy, or none."""
        return self.pool.evict(n)

    @property
    def capacity_bytes(self) -> int:
        return self.pool.num_slots * self.block_nbytes

    @property
    def used_bytes(self) -> int:
        return len(self.pool.index) * self.block_nbytes

    def __len__(self) -> int:
        return len(self.pool.index)

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s.update(
            slots=self.pool.num_slots,
            free_slots=self.pool.num_free,
            evictions=self.pool.evictions,
            policy=self.pool.policy.name,
        )
        order = getattr(self.pool.policy, "order", None)  # auto: the order evicting now
        if order is not None:
            s["policy_order"] = order
        return s

    def close(self) -> None:
        self._closed = True

    def _live(self) -> None:
        if self._closed:
            raise TierClosedError(f"tier {self.name!r} is closed")


DEFAULT_RETAIN_SHARE = 0.3  # of a tier's capacity that retained (prepopulated) blocks may keep


def check_share(share: Any) -> float:
    """A retain share: a number strictly between 0 and 1 (a share of 1 would leave new blocks no room)."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < float(share) < 1.0:
        raise ConfigError(f"retain share must be a number between 0 and 1 (exclusive), got {share!r}")
    return float(share)


def retain_budget(shares: Iterable[float], capacity_blocks: int) -> int:
    """How many retained blocks a tier of ``capacity_blocks`` keeps: the largest share among its marks."""
    return int(max(shares, default=0.0) * capacity_blocks)


def retention_victims(
    rank: np.ndarray, retained: np.ndarray, n: int, budget: int,
    evictable: np.ndarray | None = None, held: int | None = None,
) -> np.ndarray:  # fmt: skip
    """The retention rule every tier evicts by (docs/architecture.md 1.21): indices of up to ``n``
    victims among blocks ranked by ``rank`` (the tier's eviction order, lowest first; ties go in index
    order, so a caller lists its blocks in its tie-break order). Retained blocks go after every ordinary
    one while the tier holds (``held``, default ``retained.sum()``, pinned ones included) at most
    ``budget`` of them; past it the ``held - budget`` lowest-ranked retained ones go first. "Oldest
    retained" is thus the tier's own eviction order (a disk tier's policy rank, the write time on
    remote and Mooncake tiers), not mark time, which disk and Mooncake tiers do not keep per block.
    Fewer than ``n`` when only retained blocks within the budget (or unevictable ones) are left."""
    order = np.argsort(rank, kind="stable")
    if evictable is not None:
        order = order[evictable[order]]
    ret = retained[order]
    over = (int(retained.sum()) if held is None else held) - budget
    first = order[ret][: max(0, min(n, over))]
    return np.concatenate([first, order[~ret][: max(0, n - first.size)]])
