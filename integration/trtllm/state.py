"""What the scheduler and the worker of one LLM share: the engine's store (one per ``llm_args`` in a
process, closed at exit), the metadata the scheduler sends the workers each step, and counters."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from kvbm_fs import KvbmError, KVLayout, LayoutMismatchError, Namespace, Store
from kvbm_fs.engine import Lease, Registry, close_store
from kvbm_fs.mount import build_store

from .layout import connector_options, namespaces, parallel_rank, store_config, tokens_per_block

log = logging.getLogger("kvbm_fs.integration.trtllm")


class KvLoadError(KvbmError, RuntimeError):
    """A block claimed for loading could not be delivered: the step must not run on its KV."""


# ---- per-process engine state shared by the scheduler and the worker of one LLM -------------------------


@dataclass
class _Engine:
    """What a scheduler and a worker built from the same ``llm_args`` in one process share: the store
    (opened when the worker registers the KV pool, whose layout names the blocks) and in-flight saves."""

    llm_args: Any
    options: dict[str, Any]
    store: Store | None = None
    namespaces: tuple[Namespace, ...] = ()
    pending_saves: dict[int, int] = field(default_factory=dict)  # request id -> save batches in flight
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, layout: KVLayout, rank: int, world: int) -> Namespace:
        """Open the store for ``layout`` (once); a second, different layout is refused."""
        with self.lock:
            if self.store is not None:
                if self.namespaces[0].layout != layout:
                    raise LayoutMismatchError(
                        f"kvbm_fs trtllm: this engine's store was opened for {self.namespaces[0].layout.to_dict()},"
                        f" now asked for {layout.to_dict()}"
                    )
                return self.store.add_namespace(self.namespaces[rank])
            cfg = store_config(self.options)
            model = str(self.options.get("model") or getattr(self.llm_args, "model", "") or "model")
            nss = namespaces(model, layout, world, str(cfg.tenant or ""))
            cfg.model, cfg.layout, cfg.rank, cfg.world_size = nss[rank].model, layout, rank, world
            self.store, self.namespaces = build_store(cfg), nss
            return nss[rank]

    def saves_in_flight(self, req_id: int) -> int:
        with self.lock:
            return self.pending_saves.get(req_id, 0)


def _close_engine(eng: _Engine) -> None:
    close_store(eng.store)  # persists host-tier blocks into the persistent tiers


# one _Engine per llm_args; TensorRT-LLM never tells a connector it is done, so the registry closes at exit
_engines: Registry[_Engine] = Registry(_close_engine, "kvbm_fs trtllm")
close_all = _engines.close_all


def _acquire(llm_args: Any, options: dict[str, Any]) -> Lease[_Engine]:
    return _engines.acquire(id(llm_args), lambda: _Engine(llm_args, options), lambda e: e.llm_args is llm_args)


# ---- metadata ---------------------------------------------------------------------------------------------


@dataclass
class Transfer:
    """Blocks of one request to move: chained keys and the engine block ids they map to.

    ``staged`` holds verified rows (uint8 ``[n, block_nbytes]``) of rank ``staged_rank``; it never
    pickles, so workers in other processes re-read and re-verify instead of receiving bytes over MPI."""

    req_id: int
    hashes: np.ndarray
    parents: np.ndarray
    block_ids: list[int]
    staged: torch.Tensor | None = None
    staged_rank: int = 0
    parked: bool = False  # an async load: the request is not in this step's batch
    tokens: np.ndarray | None = None  # a save's token ids (uint32, len(hashes) * block_size), for KV events

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["staged"] = None
        return state


@dataclass
class KvbmFsTrtllmMeta:
    """Scheduler -> workers, once per step (pickled by ``mpi_broadcast`` when there are several ranks)."""

    ns_ids: tuple[int, ...] = ()
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


class _Counters:
    def __init__(self, names: tuple[str, ...]) -> None:
        self._lock = threading.Lock()
        self.data: dict[str, float] = dict.fromkeys(names, 0)

    def add(self, **kv: float) -> None:
        with self._lock:
            for k, v in kv.items():
                self.data[k] = self.data.get(k, 0) + v

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.data)


class _Side:
    """What both sides take from ``llm_args`` and the options; ``config`` is for subclasses to set."""

    config: ClassVar[Mapping[str, Any]] = {}

    def _setup(self, llm_args: Any) -> None:
        self.options = connector_options(self.config)
        self.block_size = tokens_per_block(llm_args)
        self.rank, self.world = parallel_rank(llm_args)
        self._lease = _acquire(llm_args, self.options)
        self.engine = self._lease.value


__all__ = ["KvLoadError", "KvbmFsTrtllmMeta", "Transfer", "close_all"]
