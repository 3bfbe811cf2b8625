"""``kvbm_fs.mount``: build a tiered store from URLs, a config file or the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .config import StoreConfig, resolve
from .cost import CostModel
from .errors import ConfigError
from .events import EventBus
from .keys import Namespace
from .layout import KVLayout
from .registry import TierSpec, open_tier
from .store import Store
from .tier import Tier


def mount(
    *tiers: str | Mapping[str, Any],
    layout: KVLayout | Mapping[str, Any] | None = None,
    model: str | None = None,
    tenant: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    policy: str | None = None,
    hash_scheme: str | None = None,
    daemon: bool | Mapping[str, Any] | None = None,
    cost: Mapping[str, Any] | None = None,
    metrics_port: int | None = None,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    events: str | Mapping[str, Any] | None = None,
) -> Store:
    """Open a store.  ``mount("gpu://cpu?capacity=256MiB", "host://?capacity=8GiB", layout=...)``.

    Tiers are listed fastest first.  Any argument left out comes from ``config``
    (a TOML/YAML/JSON path or a mapping), then ``KVBM_FS_*`` variables, then defaults.
    ``metrics_port`` (or ``KVBM_FS_METRICS_PORT``) serves Prometheus ``/metrics`` on 127.0.0.1 (:mod:`kvbm_fs.metrics`).
    ``events={"endpoint": "tcp://*:5557", ...}`` publishes KV events for routers (:mod:`kvbm_fs.kv_events`).
    """
    cfg = resolve(
        config=config,
        env=env,
        tiers=list(tiers) or None,
        layout=layout,
        model=model,
        tenant=tenant,
        rank=rank,
        world_size=world_size,
        policy=policy,
        hash_scheme=hash_scheme,
        daemon=daemon,
        cost=cost,
        metrics_port=metrics_port,
        events=events,
    )
    return build_store(cfg)


def build_store(cfg: StoreConfig) -> Store:
    ns = cfg.namespace()
    events = EventBus()
    opened: list[Tier] = []
    try:
        for i, t in enumerate(cfg.tiers):
            spec = _spec(t)
            spec.options.setdefault("policy", cfg.policy)
            if "name" not in spec.options and any(_spec(o).scheme == spec.scheme for o in cfg.tiers[:i]):
                spec.options["name"] = f"{spec.scheme}{i}"
            opened.append(open_tier(spec, block_nbytes=ns.block_nbytes, block_size=ns.layout.block_size, events=events))
        store = Store(opened, ns, events, _cost(cfg.cost))
        if cfg.metrics_port is not None:  # before the daemon starts, so that its first moves are counted
            store.enable_metrics(cfg.metrics_port, cfg.metrics_host)
        if cfg.events:  # before the daemon starts, so that its first moves are published too
            from .kv_events import attach

            attach(store, cfg.events)
        if cfg.daemon:
            store.start_daemon(dict(cfg.daemon) if isinstance(cfg.daemon, Mapping) else None)
        return store
    except BaseException:
        for t in opened:
            t.close()
        raise


def _cost(d: Mapping[str, Any]) -> CostModel:
    try:
        return CostModel(**dict(d))
    except TypeError as e:
        raise ConfigError(f"bad [cost] option: {e}") from None


def _spec(t: str | Mapping[str, Any]) -> TierSpec:
    if isinstance(t, str):
        return TierSpec.parse(t)
    opts = dict(t)
    url = opts.pop("url", None)
    if not isinstance(url, str):
        raise ConfigError(f"a tier table (keys {sorted(t)}) needs a 'url'")
    return TierSpec.parse(url, **opts)


__all__ = ["mount", "build_store", "Namespace"]
