"""What crosses between vLLM's processes: the scheduler's plan for a step, the worker's events back, and
the counters both sides report. Plain data that pickles."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvbm_fs import EventKind


@dataclass
class Transfer:
    """Blocks of one request to move: chained keys (hash, parent) and the engine block ids they map to."""

    req_id: str
    hashes: np.ndarray
    parents: np.ndarray
    block_ids: list[int]
    background: bool = False  # an async load: the request waits off the step path, get_finished reports it
    tokens: np.ndarray | None = None  # a save's token ids (uint32, len(hashes) * block_size), for KV events
    group: int = 0  # the KV-cache group (hybrid models): its namespace, layers and block table


@dataclass
class KvbmFsMetadata(KVConnectorMetadata):
    """Scheduler -> worker plan for one step. Plain data: it pickles across processes."""

    ns_ids: tuple[int, ...] = ()
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


# block events a worker ships to the scheduler: (kind, tier, medium, shareable, namespace id, hashes);
# a scheduler in another process keeps tiers that are not shareable in its BlockDirectory (it opens the
# shareable ones itself)
ShippedEvent = tuple[str, str, str, bool, int, np.ndarray]
SHIPPED_KINDS = frozenset(
    {EventKind.STORED, EventKind.REMOVED, EventKind.EVICTED, EventKind.PROMOTED, EventKind.DEMOTED}
)


@dataclass
class KvbmFsWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: what the worker's store gained and lost."""

    events: list[ShippedEvent] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KvbmFsWorkerMeta:
        if isinstance(other, KvbmFsWorkerMeta):
            self.events.extend(other.events)
        return self


COUNTERS = (
    "lookups",  # requests matched
    "lookup_tokens",  # prompt tokens those requests asked about
    "hit_tokens",  # tokens the connector offered to load
    "refused",  # requests refused (multimodal / prompt embeddings)
    "loaded_blocks",
    "load_failed_blocks",
    "loaded_bytes",
    "saved_blocks",
    "save_skipped_blocks",  # already stored, or computed in a step whose load failed
    "saved_bytes",
    "save_failed_blocks",  # a put that raised (dropped: recomputed next time)
    "write_through_failed_blocks",  # saved, but a persistent tier (write_through) dropped them: dead, full
    "async_load_requests",  # requests whose blocks loaded in the background (load_kv_async)
    "layerwise_saved_layers",  # layer copies staged in save_kv_layer, during the forward
    "layerwise_loaded_layers",  # layers a sync load placed in wait_for_layer_load, during the forward
)
TIMERS = ("load_s", "save_s", "match_s")


@dataclass
class KvbmFsStats(KVConnectorStats):
    """Counters for one interval; worker and scheduler stats are summed by ``aggregate``."""

    def __post_init__(self) -> None:
        for k in (*COUNTERS, *TIMERS):
            self.data.setdefault(k, 0.0 if k in TIMERS else 0)

    def reset(self) -> None:
        self.data = dict[str, Any]()
        self.__post_init__()

    def aggregate(self, other: KVConnectorStats) -> KvbmFsStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self.data)
        looked = out.get("lookup_tokens", 0)
        out["hit_rate"] = round(out.get("hit_tokens", 0) / looked, 4) if looked else 0.0
        for k in TIMERS:
            out[k] = round(float(out.get(k, 0.0)), 6)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in COUNTERS)


class Counters:
    """This interval's stats (handed to vLLM and reset) and the totals since start-up, counted from
    the step thread and the load/save threads alike."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = KvbmFsStats()
        self.totals = KvbmFsStats()  # cumulative, for tests and introspection

    def count(self, **kv: float) -> None:
        with self._lock:
            for k, v in kv.items():
                self._stats.data[k] += v
                self.totals.data[k] += v

    def take(self) -> KvbmFsStats | None:
        """This interval's stats, or None when nothing was counted; the next interval starts empty."""
        with self._lock:
            if self._stats.is_empty():
                return None
            out, self._stats = self._stats, KvbmFsStats()
        return out


__all__ = [
    "COUNTERS",
    "SHIPPED_KINDS",
    "TIMERS",
    "Counters",
    "KvbmFsMetadata",
    "KvbmFsStats",
    "KvbmFsWorkerMeta",
    "ShippedEvent",
    "Transfer",
]
