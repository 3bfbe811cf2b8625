"""Cluster replay: N serving instances behind a router, each with its own host tier, sharing a pool and an S3-like tier.

``kvbm-fs replay --instances N --router round-robin|prefix-hash|kv-aware`` shows what sharing and routing
buy before a deployment: cluster hit ratio, prefill seconds saved, the share of hits served from the
serving instance's own host memory, and load imbalance.  Every instance is a real :class:`~kvbm_fs.Store`
(policy, admission, placement daemon) over its own host tier plus the *same* shared tier objects.  The
shared tiers hold their blocks in this process's memory and are charged the cost model's latency and
bandwidth of their medium (disk/peer: a disk or Mooncake pool; remote: S3), because real disk and
remote tiers write files and would make N = 64 take hours on two cores.

The kv-aware router knows nothing but the KV events the stores publish: each instance's store (and the
pool) feeds an :class:`EventFeed`, the KV-event publisher with a list for a socket (the same conversion and
msgpack ``KVEventBatch`` frames), and :class:`KvIndexer` decodes them into one BlockDirectory per source,
as llm-d's and Dynamo's indexers do.  docs/architecture.md 1.12 ("Cluster scale") has the model and numbers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import numpy as np

from .cost import DEFAULTS, CostModel
from .directory import BlockDirectory
from .errors import ConfigError
from .events import EventBus, EventKind
from .keys import BlockKeys, Namespace
from .kv_events import (
    LOCAL,
    REMOTE,
    AllBlocksCleared,
    BlockStored,
    EventsConfig,
    KVEventBatch,
    KVEventPublisher,
    decoder,
)
from .registry import open_tier
from .replay import (
    BLOCK_TOKENS,
    TINY_BLOCK_BYTES,
    ReplayConfig,
    TierSpec,
    Trace,
    _cost,
    _layout,
    _slot_bytes,
    cli_config,
    load_trace,
    serve,
)
from .store import Store
from .tier import Medium
from .tiers.host import HostTier

ROUTERS = ("round-robin", "prefix-hash", "kv-aware")
DEFAULT_TIERS = ("host:0.02", "disk:0.1", "remote")
SHARED_KINDS = {"disk": Medium.DISK, "peer": Medium.PEER, "remote": Medium.REMOTE}
BLOCK_KINDS = (EventKind.STORED, EventKind.REMOVED, EventKind.EVICTED)
# (vLLM medium, locality) of an event -> kvbm_fs medium, for the directory's fastest-first order
MEDIA: dict[tuple[str | None, str | None], str] = {
    ("GPU", LOCAL): "gpu",
    ("CPU", LOCAL): "host",
    ("STORAGE", LOCAL): "disk",
    ("STORAGE", REMOTE): "remote",
}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class ClusterConfig:
    instances: int = 4
    router: str = "kv-aware"
    load_weight: float = 1.0  # kv-aware: a second of queued prefill weighs as much as a second saved
    hash_blocks: int = 1  # prefix-hash: the leading blocks whose chained hash picks the instance
    utilisation: float = 0.8  # traces without timestamps: arrivals load the cluster this much (no cache)
    tie_break: str = "hash"  # kv-aware, equal scores: "hash" (prefix-hash among them) or "fewest" requests

    def check(self) -> None:
        if isinstance(self.instances, bool) or not isinstance(self.instances, int) or self.instances < 1:
            raise ConfigError(f"--instances must be integers >= 1, got {self.instances!r}")
        if self.router not in ROUTERS:
            raise ConfigError(f"--router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if not self.load_weight >= 0:
            raise ConfigError(f"--load-weight must be >= 0, got {self.load_weight}")
        if not (isinstance(self.hash_blocks, int) and self.hash_blocks >= 1):
            raise ConfigError(f"--hash-blocks must be an integer >= 1, got {self.hash_blocks!r}")
        if self.tie_break not in ("hash", "fewest"):
            raise ConfigError(f"tie_break must be hash or fewest, got {self.tie_break!r}")
        if not self.utilisation > 0:
            raise ConfigError(f"utilisation must be > 0, got {self.utilisation}")


def check_tiers(tiers: Sequence[TierSpec]) -> None:
    """The first tier is each instance's own host tier; the others (at most one of a kind) are shared."""
    if not tiers or tiers[0].kind != "host" or tiers[0].fraction is None:
        raise ConfigError("cluster replay: the first tier must be host:FRACTION (each instance's own host memory)")
    rest = [t.kind for t in tiers[1:]]
    bad = [k for k in rest if k not in SHARED_KINDS]
    if bad or len(set(rest)) != len(rest):
        raise ConfigError(
            f"cluster replay: shared tiers must be distinct kinds among {sorted(SHARED_KINDS)}, got {rest}"
        )


class PoolTier(HostTier):
    """A shared tier held in this process's memory, standing in for a disk or Mooncake pool or an S3 bucket:
    the cost model charges it its ``medium``'s latency and bandwidth, and its events say that medium."""

    shareable = True

    def __init__(self, medium: Medium, capacity: int, block_nbytes: int, **kw: Any) -> None:
        super().__init__(capacity, block_nbytes, **kw)
        self.medium = medium


class EventFeed(KVEventPublisher):
    """A KV-event publisher whose socket is a list: the same BlockStored/BlockRemoved conversion and the same
    ``(topic, sequence, msgpack KVEventBatch)`` frames, delivered in process, in order, with no thread."""

    def __init__(self, store: Store, topic: str = "kvbm_fs") -> None:  # no sockets: super().__init__ is skipped
        self.store = store
        self.config = EventsConfig(topic=topic)
        self._tokens: dict[int, np.ndarray] = {}
        self._enc = msgspec.msgpack.Encoder()
        self._seq = 0
        self.clock = 0.0  # the batch timestamp: simulated seconds
        self.frames: list[tuple[bytes, bytes, bytes]] = []
        self._unsubscribe = store.events.subscribe(self._publish, BLOCK_KINDS)

    def _publish(self, ev: Any) -> None:
        out = self._convert(ev)
        if out:
            topic = f"{self.config.topic}.{ev.keys.ns:016x}".encode()
            payload = self._enc.encode(KVEventBatch(ts=self.clock, events=out, data_parallel_rank=0))
            self.frames.append((topic, self._seq.to_bytes(8, "big"), payload))
            self._seq += 1

    def drain(self) -> list[tuple[bytes, bytes, bytes]]:
        frames, self.frames = self.frames, []
        return frames

    def close(self) -> None:
        self._unsubscribe()


class KvIndexer:
    """Where blocks live, per instance and in the shared pool, learnt only from KV event frames."""

    def __init__(self, instances: int) -> None:
        self.instances = [BlockDirectory() for _ in range(instances)]
        self.pool = BlockDirectory()
        self._dec = decoder()
        self.events = 0

    def apply(self, source: int | None, frames: Sequence[tuple[bytes, bytes, bytes]]) -> None:
        """Apply frames from instance ``source`` (None: the shared pool's publisher)."""
        d = self.pool if source is None else self.instances[source]
        for topic, _seq, payload in frames:
            ns = int(topic.rsplit(b".", 1)[-1], 16)
            for ev in self._dec.decode(payload).events:
                self.events += 1
                if isinstance(ev, AllBlocksCleared):
                    d.clear()
                    continue
                medium = MEDIA.get((ev.medium, ev.locality), "remote")
                kind = EventKind.STORED if isinstance(ev, BlockStored) else EventKind.REMOVED
                keys = BlockKeys(ns, np.asarray(ev.block_hashes, np.uint64))
                d.record(kind, ev.ownership or f"{ev.medium}/{ev.locality}", keys, medium)


class Router:
    """Picks an instance per request: round-robin, prefix-hash (rendezvous hash of the first blocks' chained
    hash: consistent as N changes) or kv-aware (seconds of prefill the instance's known prefix saves, host
    blocks best, minus ``load_weight`` x the prefill seconds the router has queued on it; among equals, the
    instance prefix-hash would pick, so a prefix nobody holds yet still lands where its next request will)."""

    def __init__(self, cfg: ClusterConfig, cost: CostModel, block_nbytes: int) -> None:
        self.cfg = cfg
        self.n = cfg.instances
        self.cost = cost
        self.nb = block_nbytes
        self.index = KvIndexer(self.n) if cfg.router == "kv-aware" else None
        self.routed = np.zeros(self.n, np.int64)
        self.busy_until = np.zeros(self.n)  # the router's own estimate of each instance's queue
        self._salt = np.arange(self.n, dtype=np.uint64) * _GOLDEN

    def pick(self, keys: BlockKeys, now: float) -> int:
        if self.cfg.router == "round-robin":
            i = int(self.routed.sum() % self.n)
        elif self.cfg.router == "prefix-hash":
            h = keys.hashes[min(self.cfg.hash_blocks, len(keys)) - 1]
            i = int(np.argmax(_mix(self._salt ^ h)))
        else:
            rec = self.cost.recompute_s(0, len(keys), BLOCK_TOKENS)
            saved = self.scores(keys)
            value = saved - self.cfg.load_weight * np.maximum(0.0, self.busy_until - now)
            best = np.flatnonzero(value >= value.max() - 1e-9)
            if self.cfg.tie_break == "hash":  # ties (no instance known to hold more, none busier): prefix affinity
                i = int(best[np.argmax(_mix(self._salt[best] ^ keys.hashes[min(self.cfg.hash_blocks, len(keys)) - 1]))])
            else:
                i = int(best[np.argmin(self.routed[best])])  # ties: the instance given fewest requests
            self.busy_until[i] = max(self.busy_until[i], now) + float(rec.sum()) - float(saved[i])
        self.routed[i] += 1
        return i

    def scores(self, keys: BlockKeys) -> np.ndarray:
        """Per instance, the prefill seconds its known prefix saves (best loadable prefix, as Match.worth)."""
        assert self.index is not None
        n = len(keys)
        rec = self.cost.recompute_s(0, n, BLOCK_TOKENS)
        pool = self._saving(self.index.pool, keys, rec)
        best = np.empty((self.n, n))
        for i, d in enumerate(self.index.instances):
            best[i] = np.maximum(self._saving(d, keys, rec), pool) if d.tiers else pool
        prefix = np.logical_and.accumulate(best > -np.inf, axis=1)
        cum = np.cumsum(np.where(prefix, best, 0.0), axis=1)
        return np.asarray(np.maximum(0.0, cum.max(axis=1)))

    def _saving(self, d: BlockDirectory, keys: BlockKeys, rec: np.ndarray) -> np.ndarray:
        if not d.tiers:
            return np.full(rec.size, -np.inf)
        load = np.array([self._load_s(d.medium(t) or "remote") for t in d.tiers] + [np.inf])
        return rec - load[d.where(keys)]  # -1 (held nowhere) picks inf: -inf saving

    def _load_s(self, medium: str) -> float:
        m = Medium(medium)
        lat, bw = DEFAULTS[m]
        lat, bw = self.cost.latency.get(m.value, lat), self.cost.bandwidth.get(m.value, bw)
        return lat + self.nb / bw


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (a fixed, well-spread hash of uint64s)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return np.asarray(x ^ (x >> np.uint64(31)))


# ---- one cluster replay ---------------------------------------------------------------------------------
def replay_cluster(
    trace: Trace, cfg: ReplayConfig, cluster: ClusterConfig, arrivals: np.ndarray | None = None
) -> dict[str, Any]:
    """Replay ``trace`` over ``cluster.instances`` stores behind ``cluster.router``; ``arrivals`` in seconds
    (default: evenly spaced at ``cluster.utilisation`` of the cluster's no-cache prefill capacity)."""
    cluster.check()
    check_tiers(cfg.tiers)
    t0 = time.perf_counter()
    nb = TINY_BLOCK_BYTES
    layout = _layout(nb)
    ns = Namespace(f"replay-{trace.name}", layout)
    distinct = trace.distinct
    real_nb = cfg.kv_bytes_per_token * BLOCK_TOKENS
    cost = _cost(cfg)
    n = cluster.instances
    caps: list[int | None] = []
    base_pol = cfg.policy.partition("+")[0]
    pool_store: Store | None = None
    shared: list[PoolTier] = []
    stores: list[Store] = []
    feeds: list[EventFeed] = []
    try:
        pool_bus = EventBus()  # the pool's own publisher (as a Mooncake master or a shared-storage indexer runs)
        for t in cfg.tiers[1:]:
            blocks = distinct if t.fraction is None else max(1, round(t.fraction * distinct))
            caps.append(None if t.fraction is None else blocks)
            size = blocks * _slot_bytes("host", nb)
            kind = SHARED_KINDS[t.kind]
            shared.append(
                PoolTier(kind, size, nb, name=t.kind, block_size=BLOCK_TOKENS, events=pool_bus, policy=base_pol)
            )
        if shared:
            pool_store = Store(list(shared), ns, pool_bus, cost)
        host_blocks = max(1, round((cfg.tiers[0].fraction or 0) * distinct))
        size = host_blocks * _slot_bytes("host", nb)
        url = f"host://?capacity={size}&name=host&policy=" + quote(cfg.policy, safe=":=,")
        for _ in range(n):
            bus = EventBus()
            host = open_tier(url, block_nbytes=nb, block_size=BLOCK_TOKENS, events=bus)
            stores.append(Store([host, *shared], ns, bus, cost))
        listen = cluster.router == "kv-aware"  # only it reads events (they change nothing in the stores)
        feeds = [EventFeed(st) for st in stores] if listen else []
        pool_feed = EventFeed(pool_store) if listen and pool_store is not None else None
        out = _simulate(trace, cfg, cluster, stores, feeds, pool_feed, cost, real_nb, arrivals)
        for f in [*feeds, *([pool_feed] if pool_feed else [])]:
            f.close()
    finally:
        for st in stores:
            st.stop_daemon()
            st.tiers[0].close()
        for pt in shared:
            pt.close()
    out.update(
        instances=n,
        router=cluster.router,
        policy=cfg.policy,
        tiers=[t.label() for t in cfg.tiers],
        host_blocks_per_instance=host_blocks,
        shared_capacity_blocks=caps,
        wall_s=round(time.perf_counter() - t0, 2),
    )
    return out


def _simulate(
    trace: Trace,
    cfg: ReplayConfig,
    cluster: ClusterConfig,
    stores: list[Store],
    feeds: list[EventFeed],
    pool_feed: EventFeed | None,
    cost: CostModel,
    real_nb: int,
    arrivals: np.ndarray | None,
) -> dict[str, Any]:
    from .daemon import DaemonConfig, PlacementDaemon

    if cfg.placement not in ("auto", "daemon", "spill"):
        raise ConfigError(f"replay placement must be auto, daemon or spill, got {cfg.placement!r}")
    n = len(stores)
    ns = stores[0].default_namespace
    assert ns is not None
    tiers = stores[0].tiers
    daemons: list[PlacementDaemon] = []
    if len(tiers) > 1 and cfg.placement != "spill":
        for st in stores:  # as replay: rounds run here, between requests, so the run is deterministic
            daemons.append(PlacementDaemon(st, DaemonConfig.from_dict({"batch": 256, **cfg.daemon})).attach())
            st.daemon = daemons[-1]
    router = Router(cluster, cost, real_nb)
    nocache = np.array([float(cost.recompute_s(0, r.size, BLOCK_TOKENS).sum()) for r in trace.requests])
    if arrivals is None:  # evenly spaced: the no-cache prefill work keeps the cluster this busy
        span = nocache.sum() / (n * cluster.utilisation)
        arrivals = np.arange(len(trace.requests)) * (span / max(1, len(trace.requests)))
    lat_bw = np.array([cost.tier_cost(t) for t in tiers])
    nb = tiers[0].block_nbytes
    longest = max(r.size for r in trace.requests)
    data = np.ones((longest, nb), np.uint8)
    buf = np.empty((longest, nb), np.uint8)
    by_tier = np.zeros(len(tiers), np.int64)
    reqs, toks = np.zeros(n, np.int64), np.zeros(n, np.int64)
    busy, busy_until = np.zeros(n), np.zeros(n)
    wait_s = ttft_s = 0.0
    refs = hits = 0
    t_cache = 0.0
    for r, ids in enumerate(trace.requests):
        k = ids.size
        if k == 0:
            continue
        now = float(arrivals[r])
        keys = BlockKeys.chain(ns.id, ids + np.uint64(1))  # +1: hash 0 is the "no parent" marker (as replay)
        i = router.pick(keys, now)
        length, _, t_req = serve(stores[i], keys, cost, lat_bw, real_nb, buf, data, by_tier)
        refs += k
        hits += length
        t_cache += t_req
        if daemons:
            daemons[i].run_once()
        if router.index is not None:  # the router hears what the stores published, before the next request
            for j, f in enumerate(feeds):
                if f.frames:
                    router.index.apply(j, f.drain())
            if pool_feed is not None and pool_feed.frames:
                router.index.apply(None, pool_feed.drain())
        wait = max(0.0, busy_until[i] - now)
        busy_until[i] = now + wait + t_req
        wait_s += wait
        ttft_s += wait + t_req
        reqs[i] += 1
        toks[i] += trace.input_lengths[r]
        busy[i] += t_req
    t_none = float(nocache.sum())
    served = max(1, int(reqs.sum()))
    return {
        "requests": len(trace.requests),
        "references": refs,
        "hit_ratio": hits / max(1, refs),
        "prefill_s_saved": round(t_none - t_cache, 3),
        "own_host_share_of_hits": int(by_tier[0]) / max(1, hits),
        "tier_hit_ratio": {t.name: int(c) / max(1, refs) for t, c in zip(tiers, by_tier)},
        "imbalance": {
            "requests": _imbalance(reqs),
            "tokens": _imbalance(toks),
            "busy_s": _imbalance(busy),
        },
        "mean_wait_s": round(wait_s / served, 4),
        "mean_ttft_s": round(ttft_s / served, 4),
        "est_prefill_s": round(t_cache, 3),
        "est_prefill_s_no_cache": round(t_none, 3),
        "router_events": router.index.events if router.index is not None else None,
        "per_instance": {"requests": reqs.tolist(), "tokens": toks.tolist(), "busy_s": np.round(busy, 2).tolist()},
        "placement": "daemon" if daemons else "spill",
    }


def _imbalance(x: np.ndarray) -> float:
    """max / mean across instances (1.0: perfectly even)."""
    mean = float(np.mean(x))
    return round(float(np.max(x)) / mean, 3) if mean > 0 else 1.0


# ---- N x routers, the CLI ---------------------------------------------------------------------------------
def _job(args: tuple[Trace, ReplayConfig, ClusterConfig, np.ndarray | None]) -> dict[str, Any]:
    return replay_cluster(*args)


def compare_cluster(
    trace: Trace,
    base: ReplayConfig,
    instances: Sequence[int],
    routers: Sequence[str] = ROUTERS,
    cluster: ClusterConfig | None = None,
    arrivals: np.ndarray | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Every router at every instance count, on the same trace, tiers and policy."""
    cluster = cluster or ClusterConfig()
    check_tiers(base.tiers)
    from .policy import make_policy

    make_policy(base.policy)
    work = []
    for n in instances:
        for rt in routers:
            c = replace(cluster, instances=n, router=rt)
            c.check()
            work.append((trace, base, c, arrivals))
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as ex:
            results = list(ex.map(_job, work))
    else:
        results = [_job(w) for w in work]
    return {
        "trace": trace.name,
        "requests": len(trace.requests),
        "references": trace.references,
        "distinct_blocks": trace.distinct,
        "policy": base.policy,
        "tiers": [t.label() for t in base.tiers],
        "arrivals": "trace timestamps" if arrivals is not None else f"even, utilisation {cluster.utilisation:g}",
        "load_weight": cluster.load_weight,
        "hash_blocks": cluster.hash_blocks,
        "tie_break": cluster.tie_break,
        "daemon": dict(base.daemon),
        "instances": list(instances),
        "routers": list(routers),
        "cost_model": {
            "recompute_a_b_s": list(_cost(base).recompute_ab(BLOCK_TOKENS)),
            "block_bytes": base.kv_bytes_per_token * BLOCK_TOKENS,
        },
        "results": results,
    }


def format_table(res: dict[str, Any]) -> str:
    tiers = res["tiers"]
    shared = " + ".join(tiers[1:]) or "nothing"
    lines = [
        f"cluster replay of {res['trace']}: {res['requests']} requests, {res['references']} block references, "
        f"{res['distinct_blocks']} distinct blocks; policy {res['policy']}",
        f"each instance: {tiers[0]} of its own; shared: {shared}; arrivals: {res['arrivals']}",
        "",
    ]
    head = (
        f"{'instances':>9}  {'router':<12} {'saved s':>9} {'hit':>6} {'own host':>8} "
        f"{'req max/mean':>12} {'tok max/mean':>12} {'busy max/mean':>13} {'mean TTFT s':>11}"
    )
    lines += [head, "-" * len(head)]
    for r in res["results"]:
        im = r["imbalance"]
        lines.append(
            f"{r['instances']:>9}  {r['router']:<12} {r['prefill_s_saved']:>9.0f} {r['hit_ratio']:>6.3f} "
            f"{r['own_host_share_of_hits']:>8.1%} {im['requests']:>12.2f} {im['tokens']:>12.2f} "
            f"{im['busy_s']:>13.2f} {r['mean_ttft_s']:>11.2f}"
        )
    lines += [
        "",
        "saved s: prefill seconds saved (cost model); own host: share of hits from the serving instance's host tier",
    ]
    return "\n".join(lines)


def run_cli(
    trace_path: str,
    *,
    instances: Sequence[int],
    routers: Sequence[str] | None,
    tiers: Sequence[str] | None,
    policies: Sequence[str] | None,
    base: ReplayConfig,
    load_weight: float,
    hash_blocks: int,
    limit: int | None,
    jobs: int,
    json_only: bool,
    out_dir: str | None,
) -> int:
    if policies and len(policies) > 1:
        raise ConfigError(f"--instances replays one policy at a time, got --policies {' '.join(policies)}")
    if base.real_bytes:
        raise ConfigError("--instances moves 1 KiB stand-in blocks; --real-bytes does not apply")
    cfg = replace(base, policy=policies[0] if policies else base.policy,
                  tiers=[TierSpec.parse(t) for t in (tiers or DEFAULT_TIERS)])  # fmt: skip
    check_tiers(cfg.tiers)
    cluster = ClusterConfig(load_weight=load_weight, hash_blocks=hash_blocks)
    for n in instances:
        replace(cluster, instances=n).check()
    for rt in routers or ROUTERS:
        replace(cluster, router=rt).check()
    trace = load_trace(trace_path, limit)
    res = compare_cluster(trace, cfg, list(instances), list(routers or ROUTERS), cluster, trace.arrivals, jobs)
    text = json.dumps(res, indent=2)
    if out_dir:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "cluster.json").write_text(text + "\n")
    print(text if json_only else format_table(res))
    return 0


def cli_main(args: Any) -> int:
    """``kvbm-fs replay --instances ...`` (the parsed arguments of the replay command)."""
    if args.capacities:
        raise ConfigError("--capacities does not apply with --instances: give the host fraction as --tiers host:F ...")
    base = cli_config(
        real_bytes=args.real_bytes,
        block_bytes=None,
        prefill_tps=args.prefill_tps,
        kv_bytes_per_token=args.kv_bytes_per_token,
        bandwidth=args.bandwidth,
        latency=args.latency,
        placement=args.placement,
        recompute=args.recompute,
        daemon=args.daemon,
    )
    return run_cli(
        args.trace,
        instances=args.instances,
        routers=args.router,
        tiers=args.tiers,
        policies=args.policies,
        base=base,
        load_weight=args.load_weight,
        hash_blocks=args.hash_blocks,
        limit=args.limit,
        jobs=max(1, args.jobs),
        json_only=args.json,
        out_dir=args.out,
    )
