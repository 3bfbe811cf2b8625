"""Trace replay: a Mooncake-format request trace through the real store, beside Belady's optimum.

Trace format (brief section 5): one JSON object a line with ``hash_ids``, the ids of the
request's prefix blocks (one per ``block_tokens`` = 512 tokens; equal ids are equal
content, and a request's ids form its chain), plus ``timestamp``, ``input_length`` and
``output_length``.

What one replay does, per request, through :func:`kvbm_fs.mount` and the real
``Store.match`` / ``Store.get`` / ``Store.put`` (the same tier, policy, admission and
daemon objects a server uses):

1. ``match`` the request's keys.  Its *hit* is the longest matched prefix: blocks after
   the first miss do not count even if present (an engine cannot use them).
2. ``get`` the matched prefix (loads touch the policy as in serving).
3. ``put`` the rest (recomputed by the engine, then offered to the store).
4. With a daemon, run one synchronous daemon round (promotion, prefetch, demotion), so the
   run is deterministic.

Bytes move for real but are tiny (1 KiB blocks) unless ``real_bytes`` is set, in which
case blocks have ``block_bytes`` bytes of data.  Hit ratio = hit blocks / referenced blocks.

The cost model estimates prefill time per request as *load the part of the hit worth
loading + recompute the rest*, with the store's :class:`~kvbm_fs.cost.CostModel` (per-tier
latency and bandwidth; defaults per medium, or ``--bandwidth``/``--latency``) and a
prefill rate (``prefill_tps``, default 10,000 tokens/s) over blocks of ``kv_bytes_per_token``
x 512 bytes (default 131,072 B/token: Llama-3-8B in fp16, 32 layers x 8 KV heads x 128 x
K,V x 2 B, so 64 MiB per 512-token block).  Without a cache every request recomputes.

Belady (:func:`belady`) runs on the same request stream with the same prefix-hit rule.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from .cost import DEFAULTS, CostModel
from .errors import ConfigError
from .keys import BlockKeys
from .layout import KVLayout
from .policy import SHIPPED
from .tier import Medium

BLOCK_TOKENS = 512
TINY_BLOCK_BYTES = 1024
KV_BYTES_PER_TOKEN = 131_072  # Llama-3-8B, fp16: 32 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes
PREFILL_TPS = 10_000.0
DEFAULT_CAPACITIES = (0.02, 0.05, 0.1, 0.2)
TIER_KINDS = ("gpu", "host", "peer", "disk", "remote")


# ---- trace ------------------------------------------------------------------------------------
@dataclass
class Trace:
    requests: list[np.ndarray]  # hash ids per request (uint64)
    input_lengths: list[int]
    name: str = "trace"
    arrivals: np.ndarray | None = None  # seconds, from every record's ``timestamp`` (ms); None if any lacks one

    @property
    def references(self) -> int:
        return int(sum(r.size for r in self.requests))

    @property
    def distinct(self) -> int:
        if not self.requests:
            return 0
        return int(np.unique(np.concatenate(self.requests)).size)

    def head(self, n: int) -> Trace:
        return Trace(
            self.requests[:n], self.input_lengths[:n], self.name, None if self.arrivals is None else self.arrivals[:n]
        )


def load_trace(path: str | os.PathLike[str], limit: int | None = None) -> Trace:
    """Read a Mooncake-format JSONL trace (``hash_ids`` per line; other fields optional)."""
    reqs: list[np.ndarray] = []
    lens: list[int] = []
    stamps: list[float] | None = []
    p = Path(path)
    try:
        fh = p.open()
    except OSError as e:
        raise ConfigError(f"cannot read trace {p}: {e.strerror}") from None
    with fh:
        for i, line in enumerate(fh):
            if limit is not None and len(reqs) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                ids = obj["hash_ids"]
                arr = np.asarray(ids, dtype=np.int64)
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{p}:{i + 1}: not a trace record with integer hash_ids ({e})") from None
            if arr.ndim != 1 or (arr.size and arr.min() < 0):
                raise ConfigError(f"{p}:{i + 1}: hash_ids must be a list of non-negative integers")
            reqs.append(arr.astype(np.uint64))
            lens.append(int(obj.get("input_length", arr.size * BLOCK_TOKENS)))
            ts = obj.get("timestamp")
            if stamps is not None and isinstance(ts, (int, float)):
                stamps.append(float(ts) / 1000.0)
            else:
                stamps = None
    if not reqs:
        raise ConfigError(f"trace {p} holds no requests")
    return Trace(reqs, lens, p.stem, None if stamps is None else np.asarray(stamps))


def trace_from_lists(requests: Iterable[Sequence[int]], name: str = "trace") -> Trace:
    reqs = [np.asarray(list(r), dtype=np.uint64) for r in requests]
    return Trace(reqs, [r.size * BLOCK_TOKENS for r in reqs], name)


# ---- Belady ------------------------------------------------------------------------------------
def belady(trace: Trace, capacity: int) -> float:
    """Hit ratio of Belady's MIN (with bypass) on the trace's block reference stream.

    Blocks are referenced in request order, each request's chain parent first.  At a miss
    the block is brought in unless it is never used again or is used later than every
    resident block (bypass); when full, the resident block whose next use is furthest goes,
    ties going to the deepest block.  A hit is counted only within a request's longest
    resident prefix, as in the replay.  Because a request that uses a block also uses all
    its ancestors, a parent's next use is never later than its child's, so MIN (with the
    depth tie-break) never keeps a child without its parent: the resident set stays
    prefix-closed and prefix hits equal block hits.  MIN maximises block hits over all
    demand policies, and every policy's prefix hits are at most its block hits, so this is
    an upper bound for any policy of this capacity on this stream.
    """
    if capacity <= 0:
        return 0.0
    flat = np.concatenate(trace.requests) if trace.requests else np.zeros(0, np.uint64)
    total = flat.size
    if total == 0:
        return 0.0
    never = total + 1
    # next use of each reference: sort by (id, position) and look at the neighbour
    order = np.lexsort((np.arange(total), flat))
    nxt = np.full(total, never, np.int64)
    same = flat[order[1:]] == flat[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    ids = flat.tolist()
    nxt_l = nxt.tolist()
    cache: dict[int, int] = {}  # id -> its next use
    heap: list[tuple[int, int, int]] = []  # (-next use, -depth, id); stale entries skipped
    hits = 0
    i = 0
    for req in trace.requests:
        prefix = True
        for d in range(req.size):
            h, nu = ids[i], nxt_l[i]
            i += 1
            if h in cache:
                hits += prefix
                cache[h] = nu
                heapq.heappush(heap, (-nu, -d, h))
                continue
            prefix = False
            if nu == never:
                continue
            if len(cache) >= capacity:
                while True:
                    a, b, x = heapq.heappop(heap)
                    if cache.get(x) == -a:
                        break
                if (-a, -b) < (nu, d):  # every resident block is needed sooner: bypass
                    heapq.heappush(heap, (a, b, x))
                    continue
                del cache[x]
            cache[h] = nu
            heapq.heappush(heap, (-nu, -d, h))
    return hits / total


def saved_seconds(
    hit_lengths: np.ndarray, cost: CostModel | None = None, block_nbytes: int = KV_BYTES_PER_TOKEN * BLOCK_TOKENS
) -> float:
    """Prefill seconds saved when each request's first ``hit_lengths[j]`` blocks load from host memory
    (one request latency, then bandwidth) instead of being recomputed at ``a + b*i`` each."""
    cost = cost or CostModel(PREFILL_TPS)
    k = np.asarray(hit_lengths, np.float64)
    a, b = cost.recompute_ab(BLOCK_TOKENS)
    lat, bw = DEFAULTS[Medium.HOST]
    recompute = a * k + b * k * (k - 1) / 2
    load = k * block_nbytes / bw + np.where(k > 0, lat, 0.0)
    return float(np.sum(recompute - load))


def infinite_hit_ratio(trace: Trace) -> float:
    return 1.0 - trace.distinct / max(1, trace.references)


# ---- one replay ---------------------------------------------------------------------------------
@dataclass
class TierSpec:
    kind: str
    fraction: float | None  # of the trace's distinct blocks; None: unbounded (remote only)

    @classmethod
    def parse(cls, s: str) -> TierSpec:
        kind, _, frac = s.partition(":")
        kind = kind.strip().lower()
        if kind not in TIER_KINDS:
            raise ConfigError(f"replay tier {s!r}: kind must be one of {TIER_KINDS} (as KIND[:FRACTION])")
        if not frac:
            if kind != "remote":
                raise ConfigError(f"replay tier {s!r}: {kind} needs a capacity, e.g. {kind}:0.05")
            return cls(kind, None)
        try:
            f = float(frac)
        except ValueError:
            raise ConfigError(f"replay tier {s!r}: capacity {frac!r} is not a fraction") from None
        if not f > 0:
            raise ConfigError(f"replay tier {s!r}: capacity must be > 0")
        return cls(kind, f)

    def label(self) -> str:
        return self.kind if self.fraction is None else f"{self.kind}:{self.fraction:g}"


@dataclass
class ReplayConfig:
    policy: str = "default"
    tiers: list[TierSpec] = field(default_factory=lambda: [TierSpec("host", 0.1)])
    real_bytes: bool = False
    block_bytes: int = 256 * 1024  # data per block with real_bytes
    kv_bytes_per_token: int = KV_BYTES_PER_TOKEN
    prefill_tps: float = PREFILL_TPS
    bandwidth: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    placement: str = "auto"  # daemon | spill | auto (daemon when there is more than one tier)
    recompute: dict[str, float] = field(default_factory=dict)  # CostModel recompute_a / recompute_b overrides
    daemon: dict[str, Any] = field(default_factory=dict)  # DaemonConfig options (placement.py), e.g. first_sight
    workdir: str | None = None


def _layout(block_bytes: int) -> KVLayout:
    if block_bytes % (2 * BLOCK_TOKENS):
        raise ConfigError(f"replay block size must be a multiple of {2 * BLOCK_TOKENS} bytes, got {block_bytes}")
    return KVLayout(1, 1, block_bytes // (2 * BLOCK_TOKENS), BLOCK_TOKENS, dtype="uint8")


def _slot_bytes(kind: str, nb: int) -> int:
    """Bytes of capacity one block takes in a tier of this kind (so capacities are exact in blocks)."""
    page = 4096
    if kind in ("host", "peer"):  # a peer serves a host tier
        return -(-nb // page) * page
    if kind == "disk":
        from .tiers.disk.blockio import ALIGN

        return ALIGN + -(-nb // ALIGN) * ALIGN
    return nb  # gpu rows are unpadded; remote objects are unbounded here


def _tier_urls(
    cfg: ReplayConfig, distinct: int, nb: int, tmp: str, servers: list[Any]
) -> tuple[list[str], list[int | None]]:
    """Tier URLs for ``cfg``; a ``peer`` tier is a host tier served in this process (its server is
    appended to ``servers``), read and written through NIXL UCX like another process's."""
    urls, caps = [], []
    for i, t in enumerate(cfg.tiers):
        blocks = None if t.fraction is None else max(1, round(t.fraction * distinct))
        name = f"{t.kind}{i}" if sum(x.kind == t.kind for x in cfg.tiers) > 1 else t.kind
        size = None if blocks is None else blocks * _slot_bytes(t.kind, nb)
        if t.kind == "host":
            url = f"host://?capacity={size}&name={name}"
        elif t.kind == "gpu":
            url = f"gpu://cpu?capacity={size}&name={name}"
        elif t.kind == "disk":
            url = f"file://{tmp}/{name}?capacity={size}&name={name}"
        elif t.kind == "peer":
            from .tiers.host import HostTier
            from .tiers.peer import PeerServer

            pol = cfg.policy.partition("+")[0]  # the served tier evicts by the replayed policy
            servers.append(PeerServer(HostTier(size or 0, nb, name=name, policy=pol)))
            url = f"{servers[-1].url}?name={name}"
        else:  # a shared-filesystem remote tier (fsspec's memory:// answers a missing key in O(all keys))
            url = f"remote+file://{tmp}/{name}?name={name}" + (f"&capacity={size}" if size else "")
        # the eviction policy runs in every tier; an admission filter guards the first one only
        # (what it refuses spills down), so lower tiers take whatever reaches them
        pol = cfg.policy if i == 0 else cfg.policy.partition("+")[0]
        url += ("&" if "?" in url else "?") + "policy=" + quote(pol, safe=":=,")
        urls.append(url)
        caps.append(blocks)
    return urls, caps


def replay_one(trace: Trace, cfg: ReplayConfig) -> dict[str, Any]:
    """Replay ``trace`` through a freshly mounted store; returns hit ratios, bytes moved and times."""
    from .mount import mount

    if cfg.placement not in ("auto", "daemon", "spill"):
        raise ConfigError(f"replay placement must be auto, daemon or spill, got {cfg.placement!r}")
    distinct = trace.distinct
    nb = cfg.block_bytes if cfg.real_bytes else TINY_BLOCK_BYTES
    layout = _layout(nb)
    real_nb = cfg.kv_bytes_per_token * BLOCK_TOKENS
    tmp = tempfile.mkdtemp(prefix="kvbm-replay-", dir=cfg.workdir)
    t0 = time.perf_counter()
    servers: list[Any] = []
    try:
        urls, caps = _tier_urls(cfg, distinct, nb, tmp, servers)
        store = mount(*urls, layout=layout, model=f"replay-{trace.name}", policy=cfg.policy, env={})
        try:
            out = _run(store, trace, cfg, nb, real_nb)
        finally:
            store.close(persist=False)
    finally:
        for srv in servers:
            srv.close()
            srv.tier.close()
        shutil.rmtree(tmp, ignore_errors=True)
    out.update(
        policy=cfg.policy,
        tiers=[t.label() for t in cfg.tiers],
        capacity_blocks=caps,
        block_nbytes=nb,
        wall_s=round(time.perf_counter() - t0, 2),
    )
    return out


def _run(store: Any, trace: Trace, cfg: ReplayConfig, nb: int, real_nb: int) -> dict[str, Any]:
    from .daemon import DaemonConfig, PlacementDaemon

    ns = store.default_namespace
    tiers = store.tiers
    daemon = None
    use_daemon = cfg.placement == "daemon" or (cfg.placement == "auto" and len(tiers) > 1)
    if use_daemon and len(tiers) > 1:
        daemon = PlacementDaemon(store, DaemonConfig.from_dict({"batch": 256, **cfg.daemon}))
        daemon.attach()  # as PlacementDaemon.start(), but rounds run here, between requests
        store.daemon = daemon
    cost = _cost(cfg)
    lat_bw = np.array([cost.tier_cost(t) for t in tiers])
    longest = max(r.size for r in trace.requests)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (longest, nb), dtype=np.uint8) if cfg.real_bytes else np.ones((longest, nb), np.uint8)
    buf = np.empty((longest, nb), np.uint8)
    by_tier = np.zeros(len(tiers), np.int64)
    refs = hits = worth_blocks = 0
    t_cache = t_none = 0.0
    for ids in trace.requests:
        n = ids.size
        if n == 0:
            continue
        keys = BlockKeys.chain(ns.id, ids + np.uint64(1))  # +1: hash 0 is the "no parent" marker
        length, w, t_req = serve(store, keys, cost, lat_bw, real_nb, buf, data, by_tier)
        refs += n
        hits += length
        worth_blocks += w
        t_cache += t_req
        t_none += float(cost.recompute_s(0, n, BLOCK_TOKENS).sum())
        if daemon is not None:
            daemon.run_once()
    res: dict[str, Any] = {
        "requests": len(trace.requests),
        "references": refs,
        "hit_blocks": hits,
        "hit_ratio": hits / max(1, refs),
        "tier_hit_ratio": {t.name: int(c) / max(1, refs) for t, c in zip(tiers, by_tier)},
        "first_tier_share_of_hits": int(by_tier[0]) / max(1, hits),  # what decides TTFT once hits are cheap
        "prefill_s_saved": round(t_none - t_cache, 3),
        "worth_loading_ratio": worth_blocks / max(1, refs),
        "est_prefill_s": round(t_cache, 3),
        "est_prefill_s_no_cache": round(t_none, 3),
        "est_speedup": round(t_none / t_cache, 4) if t_cache > 0 else None,
        "tier_blocks": {t.name: len(t) for t in tiers},
    }
    if daemon is not None:
        c = daemon.stats()
        scale = real_nb / nb  # bytes the same block moves would cost at the cost model's block size
        res["daemon"] = {k: v for k, v in c.items() if k != "running"}
        res["promoted_bytes_est"] = int(c["promoted_bytes"] * scale)
        res["demoted_bytes_est"] = int(c["demoted_bytes"] * scale)
        res["placement"] = "daemon"
    else:
        res["placement"] = "spill"
    return res


def serve(
    store: Any,
    keys: BlockKeys,
    cost: CostModel,
    lat_bw: np.ndarray,
    real_nb: int,
    buf: np.ndarray,
    data: np.ndarray,
    by_tier: np.ndarray,
) -> tuple[int, int, float]:
    """One replayed request: match, get the hit prefix, put the rest; counts hits per tier into ``by_tier``.
    Returns (hit blocks, blocks worth loading, the cost model's prefill seconds with the cache)."""
    n = len(keys)
    m = store.match(keys)
    length = m.length
    w = 0
    if length:
        where = m.where[:length]
        by_tier += np.bincount(where, minlength=by_tier.size)
        store.get(keys[:length], buf[:length], m)
        w = cost.worth(where, store.tiers, real_nb, BLOCK_TOKENS)
        t = _load_time(where[:w], lat_bw, real_nb)
    else:
        t = 0.0
    t += float(cost.recompute_s(w, n - w, BLOCK_TOKENS).sum())
    if length < n:
        store.put(keys[length:], data[: n - length])
    return length, w, t


def _cost(cfg: ReplayConfig) -> CostModel:
    r = cfg.recompute
    return CostModel(cfg.prefill_tps, dict(cfg.latency), dict(cfg.bandwidth),
                     recompute_a=r.get("recompute_a"), recompute_b=r.get("recompute_b"))  # fmt: skip


def _load_time(where: np.ndarray, lat_bw: np.ndarray, block_nbytes: int) -> float:
    if where.size == 0:
        return 0.0
    starts = np.concatenate(([True], where[1:] != where[:-1]))
    return float((block_nbytes / lat_bw[where, 1]).sum() + lat_bw[where[starts], 0].sum())


# ---- the comparison ------------------------------------------------------------------------------
def _job(args: tuple[Trace, ReplayConfig]) -> dict[str, Any]:
    return replay_one(*args)


def compare(
    trace: Trace,
    *,
    capacities: Sequence[float] = DEFAULT_CAPACITIES,
    policies: Sequence[str] = SHIPPED,
    base: ReplayConfig | None = None,
    tiers: Sequence[TierSpec] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Every policy at every capacity (one host tier of that size), plus Belady; and, when ``tiers``
    are given, a multi-tier replay of each policy over them (Belady at their total capacity)."""
    base = base or ReplayConfig()
    distinct = trace.distinct
    for c in capacities:
        if not c > 0:
            raise ConfigError(f"capacity fractions must be > 0, got {c}")
    from .policy import make_policy

    for p in policies:
        make_policy(p)  # bad specs fail before any replay starts
    work: list[tuple[Trace, ReplayConfig]] = []
    for c in capacities:
        for p in policies:
            cfg = ReplayConfig(**{**base.__dict__, "policy": p, "tiers": [TierSpec("host", c)], "placement": "spill"})
            work.append((trace, cfg))
    multi = list(tiers or [])
    if multi:
        for p in policies:
            work.append((trace, ReplayConfig(**{**base.__dict__, "policy": p, "tiers": multi})))
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as ex:
            results = list(ex.map(_job, work))
    else:
        results = [_job(w) for w in work]
    single = results[: len(capacities) * len(policies)]
    rows: list[dict[str, Any]] = []
    for i, c in enumerate(capacities):
        cap = max(1, round(c * distinct))
        b = belady(trace, cap)
        row: dict[str, Any] = {"capacity": c, "capacity_blocks": cap, "belady": b, "policies": {}}
        for j, p in enumerate(policies):
            r = single[i * len(policies) + j]
            r["ratio_to_belady"] = r["hit_ratio"] / b if b > 0 else None
            row["policies"][p] = r
        rows.append(row)
    out: dict[str, Any] = {
        "trace": trace.name,
        "requests": len(trace.requests),
        "references": trace.references,
        "distinct_blocks": distinct,
        "infinite_cache_hit_ratio": infinite_hit_ratio(trace),
        "block_tokens": BLOCK_TOKENS,
        "policies": list(policies),
        "single_tier": rows,
        "cost_model": {
            "prefill_tokens_per_s": base.prefill_tps,
            "recompute_a_b_s": list(_cost(base).recompute_ab(BLOCK_TOKENS)),
            "kv_bytes_per_token": base.kv_bytes_per_token,
            "block_bytes": base.kv_bytes_per_token * BLOCK_TOKENS,
            "latency_s_and_bandwidth_Bps": _cost_table(base),
        },
        "real_bytes": base.real_bytes,
    }
    if multi:
        bounded = [t.fraction for t in multi if t.fraction is not None]
        total = None if len(bounded) < len(multi) else max(1, round(sum(bounded) * distinct))
        mt: dict[str, Any] = {
            "tiers": [t.label() for t in multi],
            "belady": infinite_hit_ratio(trace) if total is None else belady(trace, total),
            "belady_capacity_blocks": total,
            "policies": {},
        }
        for p, r in zip(policies, results[len(single) :]):
            r["ratio_to_belady"] = r["hit_ratio"] / mt["belady"] if mt["belady"] > 0 else None
            mt["policies"][p] = r
        out["multi_tier"] = mt
    return out


def _cost_table(base: ReplayConfig) -> dict[str, list[float]]:
    from .cost import DEFAULTS

    return {
        m.value: [base.latency.get(m.value, lat), base.bandwidth.get(m.value, bw)] for m, (lat, bw) in DEFAULTS.items()
    }


# ---- output --------------------------------------------------------------------------------------
def format_table(res: dict[str, Any]) -> str:
    lines = [
        f"trace {res['trace']}: {res['requests']} requests, {res['references']} block references, "
        f"{res['distinct_blocks']} distinct blocks; infinite cache hits {res['infinite_cache_hit_ratio']:.3f}",
        "",
        "single tier (host), prefill seconds saved, hit ratio and [ratio to Belady]:",
    ]
    pols = res["policies"]
    w = max(22, *(len(p) for p in pols))
    head = f"{'capacity':>10} {'blocks':>7} {'belady':>7}  " + "  ".join(f"{p:>{w}}" for p in pols)
    lines += [head, "-" * len(head)]
    for row in res["single_tier"]:
        cells = []
        for p in pols:
            r = row["policies"][p]
            ratio = r["ratio_to_belady"]
            b = f"[{ratio:.2f}]" if ratio is not None else "[-]"
            cells.append(f"{r['prefill_s_saved']:.0f}s {r['hit_ratio']:.3f} {b}".rjust(w))
        lines.append(f"{row['capacity']:>10g} {row['capacity_blocks']:>7} {row['belady']:>7.3f}  " + "  ".join(cells))
    lines.append("")
    lines.append("estimated prefill time with the cache / without (cost model), per policy:")
    for row in res["single_tier"]:
        cells = [f"{p}={row['policies'][p]['est_speedup']}x" for p in pols]
        lines.append(f"  capacity {row['capacity']:g}: " + ", ".join(cells))
    mt = res.get("multi_tier")
    if mt:
        lines += ["", f"multi-tier {' / '.join(mt['tiers'])} (Belady at the total capacity: {mt['belady']:.3f}):"]
        for p, r in mt["policies"].items():
            per = ", ".join(f"{k} {v:.3f}" for k, v in r["tier_hit_ratio"].items())
            moved = ""
            if "promoted_bytes_est" in r:
                moved = (
                    f"; promoted {r['promoted_bytes_est'] / 1e9:.1f} GB, demoted {r['demoted_bytes_est'] / 1e9:.1f} GB"
                )
            lines.append(
                f"  {p:<{w}} saved {r['prefill_s_saved']:.0f}s, hit {r['hit_ratio']:.3f} [{r['ratio_to_belady']:.2f}] ({per}; "
                f"{r['first_tier_share_of_hits']:.0%} of hits from {next(iter(r['tier_hit_ratio']))}); "
                f"worth loading {r['worth_loading_ratio']:.3f}; est. speedup {r['est_speedup']}x{moved}"
            )
    return "\n".join(lines)


def plot(res: dict[str, Any], path: str | os.PathLike[str]) -> bool:
    """PNG of hit ratio against capacity per policy (and Belady). False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = res["single_tier"]
    xs = [r["capacity"] * 100 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [r["belady"] for r in rows], "k--", marker="o", label="Belady (MIN)")
    for p in res["policies"]:
        ax.plot(xs, [r["policies"][p]["hit_ratio"] for r in rows], marker="o", label=p)
    ax.axhline(res["infinite_cache_hit_ratio"], color="grey", lw=0.8, ls=":", label="infinite cache")
    ax.set_xlabel("capacity (% of the trace's distinct blocks)")
    ax.set_ylabel("hit ratio (prefix blocks)")
    ax.set_title(f"{res['trace']}: hit ratio vs capacity")
    if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 4:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_cli(
    trace_path: str,
    *,
    capacities: Sequence[float] | None,
    policies: Sequence[str] | None,
    tiers: Sequence[str] | None,
    real_bytes: bool,
    placement: str = "auto",
    block_bytes: int | None,
    prefill_tps: float,
    kv_bytes_per_token: int,
    bandwidth: Sequence[str] | None,
    latency: Sequence[str] | None,
    out_dir: str | None,
    limit: int | None,
    jobs: int,
    json_only: bool,
    recompute: Sequence[float] | None = None,
    daemon: Sequence[str] | None = None,
) -> int:
    trace = load_trace(trace_path, limit)
    base = cli_config(
        real_bytes=real_bytes,
        block_bytes=block_bytes,
        prefill_tps=prefill_tps,
        kv_bytes_per_token=kv_bytes_per_token,
        bandwidth=bandwidth,
        latency=latency,
        placement=placement,
        recompute=recompute,
        daemon=daemon,
    )
    _layout(base.block_bytes if real_bytes else TINY_BLOCK_BYTES)
    res = compare(
        trace,
        capacities=list(capacities or DEFAULT_CAPACITIES),
        policies=list(policies or SHIPPED),
        base=base,
        tiers=[TierSpec.parse(t) for t in tiers] if tiers else None,
        jobs=max(1, jobs),
    )
    text = json.dumps(res, indent=2)
    if out_dir:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "replay.json").write_text(text + "\n")
        res_png = d / "replay.png"
        plotted = plot(res, res_png)
        res["files"] = {"json": str(d / "replay.json"), "png": str(res_png) if plotted else None}
    if json_only:
        print(text)
    else:
        print(format_table(res))
        if out_dir:
            png = res["files"]["png"]
            print(
                f"\nwrote {res['files']['json']}"
                + (f" and {png}" if png else " (no plot: pip install 'kvbm-fs[replay]')")
            )
    return 0


def cli_config(
    *,
    real_bytes: bool,
    block_bytes: int | None,
    prefill_tps: float,
    kv_bytes_per_token: int,
    bandwidth: Sequence[str] | None,
    latency: Sequence[str] | None,
    placement: str,
    recompute: Sequence[float] | None,
    daemon: Sequence[str] | None,
) -> ReplayConfig:
    """The ReplayConfig the ``replay`` flags describe (also ``--instances``); bad values fail here, before any replay."""
    from .daemon import DaemonConfig

    if prefill_tps <= 0 or not math.isfinite(prefill_tps):
        raise ConfigError(f"--prefill-tps must be > 0, got {prefill_tps}")
    base = ReplayConfig(
        real_bytes=real_bytes,
        block_bytes=block_bytes or ReplayConfig.block_bytes,
        prefill_tps=prefill_tps,
        kv_bytes_per_token=kv_bytes_per_token,
        bandwidth=_pairs(bandwidth, "--bandwidth"),
        latency=_pairs(latency, "--latency"),
        placement=placement,
        recompute=dict(zip(("recompute_a", "recompute_b"), recompute)) if recompute else {},
        daemon=DaemonConfig.parse_options(daemon or ()),
    )
    _cost(base)  # bad --recompute values
    return base


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, float]:
    """``medium=value`` pairs (host=12e9) into {tier kind or name: value}."""
    out: dict[str, float] = {}
    for it in items or []:
        k, eq, v = it.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise ConfigError(f"{flag} {it!r}: expected NAME=NUMBER, e.g. host=12e9") from None
        if not eq or not out[k.strip()] > 0:
            raise ConfigError(f"{flag} {it!r}: expected NAME=NUMBER > 0")
    return out
