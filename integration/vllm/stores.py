"""One store per engine and role in a process, shared, closed (and so persisted) by the last user or at exit.

The worker opens the engine's store with every configured tier. A scheduler in the same process (one
worker run by the engine-core process: vLLM builds the worker first) shares it and matches exactly
what the worker holds. Otherwise (the CPU platform runs its worker in a process of its own unless
VLLM_ENABLE_V1_MULTIPROCESSING=0; TP/PP > 1) the scheduler opens only the tiers processes share
(persistent ones: disk, remote) and keeps the workers' process-local tiers (host, gpu) in a
``kvbm_fs.directory.BlockDirectory`` fed by the block events each worker ships back every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvbm_fs import Namespace, Store
from kvbm_fs.engine import Lease, Registry, close_store
from kvbm_fs.mount import build_store

from .options import store_config

# (engine id, "worker"|"scheduler") -> Store | None; whatever is still open closes at exit (persisting host tiers)
_stores: Registry[Store | None] = Registry(close_store)
close_all = _stores.close_all


def shareable(tier: Any) -> bool:
    """Whether a tier (URL or table) can be opened by several processes at once (``Tier.shareable``)."""
    from kvbm_fs.registry import TierSpec, tier_class

    url = tier if isinstance(tier, str) else tier.get("url")
    cls = tier_class(TierSpec.parse(str(url)).scheme)
    return bool(getattr(cls, "shareable", True))  # remote tiers come from a factory: shared by nature


def acquire_store(
    engine_id: str, role: str, extra: Mapping[str, Any], nss: list[Namespace]
) -> tuple[Store | None, Lease[Store | None]]:
    """The store for ``role``: the worker's full store; for the scheduler, the worker's when it lives
    in this process, else a store of the shareable tiers only (None when there are none)."""

    def make() -> Store | None:
        cfg = store_config(extra)
        cfg.model, cfg.layout, cfg.tenant = nss[0].model, nss[0].layout, nss[0].tenant
        cfg.rank, cfg.world_size = nss[0].rank, nss[0].world_size
        if key[1] == "scheduler":
            cfg.tiers = [t for t in cfg.tiers if shareable(t)]
            cfg.daemon = False  # placement runs where the data is: in the worker's store
            cfg.events = None  # so do KV events: the worker's store publishes them (one PUB per port)
        return build_store(cfg) if cfg.tiers else None

    with _stores.lock:
        key = (engine_id, "worker")
        if role == "scheduler" and key not in _stores:
            key = (engine_id, "scheduler")
        lease = _stores.acquire(key, make)
    store = lease.value
    if store is not None:
        for ns in nss:
            store.add_namespace(ns)
    return store, lease


def release_store(lease: Lease[Store | None]) -> None:
    _stores.release(lease)


__all__ = ["acquire_store", "close_all", "release_store", "shareable"]
