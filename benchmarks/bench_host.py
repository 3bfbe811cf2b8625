"""G2 host tier put/get throughput, as a fraction of a plain numpy memcpy on the same buffers.

What it measures
    ``HostTier.put`` and ``HostTier.get`` of one batch of 64 blocks x 2 MiB (128 MiB), in GB/s
    (1 GB = 1e9 bytes), next to ``np.copyto`` moving the same 128 MiB between the *same*
    buffers: the caller's source array -> the slab rows the put lands in, and the slab rows the
    get reads -> the caller's preallocated destination.  ``put_ratio`` / ``get_ratio`` are
    tier GB/s divided by that memcpy GB/s (target >= 0.9): everything the tier does besides
    moving bytes (index lookups, slot allocation, pinning, state changes) must be small next
    to the copy itself, and the copy must not go through an intermediate buffer.

    Puts store new keys every repetition: the batch is deleted between repetitions
    (``delete`` is outside the timed region), so each timed put allocates slots, copies and
    registers 64 fresh blocks.  A second variant (``put_evict_*``) uses fresh keys every
    repetition on a tier that is already full, so each timed put also evicts 64 blocks (LRU).

    Also reported: the same get (and put) through a torch CPU tensor (destination, source),
    against np.copyto into that tensor's memory and against torch's own (multi-threaded)
    ``Tensor.copy_``; the host slab allocation time for the capacity used and whether the slab
    was page-locked (only when CUDA is present); and a naive baseline, a dict of ``bytes``
    (``bytes(row)`` per put, ``np.frombuffer`` copied into the caller's row per get).

    Metrics and events (issue 13): ``Store.put``/``Store.get`` over a host tier with the Prometheus
    metrics on (so every event is built and counted) and off (nobody subscribed): ``metrics_put_ratio``
    / ``metrics_get_ratio`` are off-time / on-time (1.0: free; target >= 0.97), at the batch above and
    at small blocks (64 x 8 KiB, 50 calls per timing), where the fixed per-batch cost shows most.  They
    run after the cases above, in their own rounds (``--metrics-rounds``, 61): each round times off and
    on back to back (order alternating), so that the pair sees the same load; the ratio is the median
    of the pairs.  ``cpu_ratio`` is the same from the calling thread's CPU time, which a preempted
    timing does not inflate (all the metrics work runs in the calling thread).  ``--metrics-only``
    runs just these and writes ``bench_host.metrics.json``.

Why
    The host tier is the staging area for every offload and onboard; if it is slower than a
    memcpy the whole hierarchy is.  The machine this runs on is small and noisy, so absolute
    numbers mean little: every variant runs interleaved in the same rounds (order rotated per
    round), ratios are medians of per-round paired ratios, and nothing here passes or fails.

Run ``python benchmarks/bench_host.py [--quick]``; prints one JSON object and writes it to
``benchmarks/results/bench_host.json`` (``bench_host.quick.json`` with ``--quick``: 16 blocks, 5 rounds).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import _common
import numpy as np
from _common import add_output_args, emit, env, gbps_spread, interleave, paired_ratio, results_path

from kvbm_fs import KVLayout, Namespace, Store
from kvbm_fs.events import EventBus
from kvbm_fs.keys import BlockKeys
from kvbm_fs.tiers.host import HostTier

NAME = "bench_host"
MiB = 1 << 20


class Case(_common.Case):
    track_faults = True  # a temporary 128 MiB buffer shows up as ~32768 faults per call (4 KiB pages)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64, help="blocks per batch (default 64)")
    ap.add_argument("--block-mib", type=float, default=2.0, help="block size in MiB (default 2)")
    ap.add_argument("--rounds", type=int, default=21, help="timed rounds (default 21)")
    ap.add_argument("--metrics-rounds", type=int, default=61, help="rounds of the metrics on/off pairs (61)")
    ap.add_argument("--metrics-only", action="store_true", help="only the metrics on/off pairs")
    add_output_args(ap, "small run for smoke tests (16 blocks, 5 rounds)")
    args = ap.parse_args(argv)
    args.out = args.out or results_path(NAME + (".metrics" if args.metrics_only else ""), args.quick)
    if args.metrics_only:
        only = {"benchmark": NAME, "quick": bool(args.quick), **metrics_pairs(5 if args.quick else args.metrics_rounds)}
        only["env"] = env(numpy=np.__version__)
        emit(only, args.out)
        return only
    rounds = 5 if args.quick else args.rounds
    n, bnb = (16 if args.quick else args.blocks), int(args.block_mib * MiB)
    batch = n * bnb

    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (n, bnb), dtype=np.uint8)  # caller-owned source rows
    out = np.empty_like(src)  # caller-owned destination rows, preallocated once
    out.fill(1)

    # Tier A: room for two batches. Batch G stays resident for gets; batch P is put and deleted.
    tier = HostTier(2 * batch, bnb)
    keys_g = BlockKeys.chain(0xA, np.arange(1, n + 1, dtype=np.uint64))
    keys_p = BlockKeys.chain(0xA, np.arange(n + 1, 2 * n + 1, dtype=np.uint64))
    assert tier.put(keys_g, src).all()
    assert tier.put(keys_p, src).all()
    slab_g = _rows_view(tier, keys_g)  # the slab rows a get reads
    slab_p = _rows_view(tier, keys_p)  # the slab rows a put writes (reused after delete; checked below)
    tier.delete(keys_p)

    # Tier E: two batches of room, kept full; every put brings fresh keys and evicts a batch.
    tier_e = HostTier(2 * batch, bnb)
    fresh = iter(range(1 << 40, 1 << 62, n))

    def put_evict() -> None:
        k0 = next(fresh)
        ok = tier_e.put(BlockKeys.chain(0xE, np.arange(k0, k0 + n, dtype=np.uint64)), src)
        assert ok.all()

    put_evict()
    put_evict()  # now full: every later put evicts n blocks

    import torch

    t_src = torch.from_numpy(src)  # same memory as src
    t_out = torch.empty((n, bnb), dtype=torch.uint8)
    t_out_np = t_out.numpy()  # same memory as t_out
    t_slab_g = torch.from_numpy(slab_g)

    naive: dict[int, bytes] = {}
    hp = keys_p.hashes.tolist()
    for i, h in enumerate(keys_g.hashes.tolist()):
        naive[h] = bytes(src[i])
    hg = keys_g.hashes.tolist()

    def naive_put() -> None:
        for i, h in enumerate(hp):
            naive[h] = bytes(src[i])

    def naive_drop() -> None:
        for h in hp:
            del naive[h]

    def naive_get() -> None:
        for i, h in enumerate(hg):
            out[i] = np.frombuffer(naive[h], np.uint8)

    def tier_put(data: Any) -> Callable[[], None]:
        def f() -> None:
            assert tier.put(keys_p, data).all()

        return f

    def check_put_rows() -> None:  # the memcpy baseline must write the rows the tier writes
        assert np.shares_memory(_rows_view(tier, keys_p), slab_p), "put landed in other slots"
        tier.delete(keys_p)

    cases = [
        Case("memcpy_put", lambda: np.copyto(slab_p, src)),
        Case("memcpy_get", lambda: np.copyto(out, slab_g)),
        Case("put", tier_put(src), after=check_put_rows),
        Case("get", lambda: tier.get(keys_g, out)),
        Case("put_evict", put_evict),
        Case("torch_memcpy_get", lambda: np.copyto(t_out_np, slab_g)),
        Case("torch_copy_get", lambda: t_out.copy_(t_slab_g)),
        Case("torch_get", lambda: tier.get(keys_g, t_out)),
        Case("torch_put", tier_put(t_src), after=check_put_rows),
        Case("naive_put", naive_put, after=naive_drop),
        Case("naive_get", naive_get),
    ]
    by = {c.name: c for c in cases}
    t0 = time.perf_counter()
    interleave(cases, rounds)
    wall = time.perf_counter() - t0

    # sanity (untimed): the tier returned the bytes it was given
    out.fill(0)
    assert tier.get(keys_g, out).all() and np.array_equal(out, src), "host get returned wrong bytes"
    t_out.zero_()
    assert tier.get(keys_g, t_out).all() and np.array_equal(t_out_np, src), "host get (torch) returned wrong bytes"

    def gbps(name: str) -> float:
        return _common.gbps(batch, by[name].times)

    def ratio(a: str, b: str) -> float:
        return round(paired_ratio(by[a].times, by[b].times), 3)

    memcpy_all = by["memcpy_put"].times + by["memcpy_get"].times
    res: dict[str, Any] = {
        "benchmark": NAME,
        "quick": bool(args.quick),
        "put_gbps": gbps("put"),
        "get_gbps": gbps("get"),
        "memcpy_gbps": _common.gbps(batch, memcpy_all),
        "put_ratio": ratio("put", "memcpy_put"),
        "get_ratio": ratio("get", "memcpy_get"),
        "target_ratio": 0.9,
        "memcpy_put_gbps": gbps("memcpy_put"),
        "memcpy_get_gbps": gbps("memcpy_get"),
        "put_evict_gbps": gbps("put_evict"),
        "put_evict_ratio": ratio("put_evict", "memcpy_put"),
        "torch_get_gbps": gbps("torch_get"),
        "torch_get_ratio": ratio("torch_get", "torch_memcpy_get"),
        "torch_get_ratio_vs_torch_copy": ratio("torch_get", "torch_copy_get"),
        "torch_memcpy_get_gbps": gbps("torch_memcpy_get"),
        "torch_copy_get_gbps": gbps("torch_copy_get"),
        "torch_put_gbps": gbps("torch_put"),
        "torch_put_ratio": ratio("torch_put", "memcpy_put"),
        "naive_dict_put_gbps": gbps("naive_put"),
        "naive_dict_get_gbps": gbps("naive_get"),
        "naive_dict_put_ratio": ratio("naive_put", "memcpy_put"),
        "naive_dict_get_ratio": ratio("naive_get", "memcpy_get"),
        "host_alloc_seconds": round(tier.slab.alloc_seconds, 4),
        "host_alloc_seconds_evict_tier": round(tier_e.slab.alloc_seconds, 4),
        "host_capacity_bytes": tier.capacity_bytes,
        "pinned": bool(tier.slab.pinned),
        "put_keys": "same 64 keys each round, deleted between rounds (delete untimed); "
        "put_evict: fresh keys into a full tier (eviction timed)",
        "block_nbytes": bnb,
        "blocks_per_batch": n,
        "batch_bytes": batch,
        "rounds": rounds,
        "ratio_method": "median over rounds of paired (baseline time / case time), same round",
        "below_target": [],
        "wall_seconds": round(wall, 2),
        # per case: GB/s min/median/max over rounds, and median minor page faults per call
        # (a temporary 128 MiB buffer shows up as ~32768 faults per call with 4 KiB pages)
        "detail": {
            c.name: {
                **gbps_spread(batch, c.times, 2),
                "page_faults": int(statistics.median(c.faults)),
            }
            for c in cases
        },
        "env": env(
            numpy=np.__version__,
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            cuda=bool(torch.cuda.is_available()),
        ),
    }
    res["below_target"] = [
        k for k in ("put_ratio", "get_ratio", "torch_get_ratio", "torch_put_ratio") if res[k] < res["target_ratio"]
    ]
    tier.close()
    tier_e.close()
    res.update(metrics_pairs(5 if args.quick else args.metrics_rounds, src, out))
    emit(res, args.out)
    return res


def metrics_pairs(rounds: int, src: np.ndarray | None = None, out: np.ndarray | None = None) -> dict[str, Any]:
    """Store put/get with metrics+events off and on, timed back to back in each round (see the docstring)."""
    if src is None or out is None:
        src = np.random.default_rng(0).integers(0, 256, (64, 2 * MiB), dtype=np.uint8)
        out = np.empty_like(src)
    cases = {
        "store": metrics_cases(src, out, 1),
        "small": metrics_cases(np.ones((64, 8192), np.uint8), np.empty((64, 8192), np.uint8), 50),
    }
    pairs = [(f"{size}_{op}", fns[op]) for size, fns in cases.items() for op in ("put", "get")]
    wall: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in pairs}
    cpu: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in pairs}
    t0 = time.perf_counter()
    for r in range(1 + rounds):  # round 0 warms up
        k = r % len(pairs)
        for name, (off, on) in pairs[k:] + pairs[:k]:
            w, c = {}, {}
            for which, fn in ((0, off), (1, on)) if r % 2 else ((1, on), (0, off)):
                gc.disable()
                c0, w0 = time.thread_time(), time.perf_counter()
                fn()
                w[which], c[which] = time.perf_counter() - w0, time.thread_time() - c0
                gc.enable()
            if r:
                wall[name].append((w[0], w[1]))
                cpu[name].append((c[0], c[1]))
    m: dict[str, Any] = {}
    for name, _ in pairs:
        m[f"{name}_ratio"] = round(statistics.median(a / b for a, b in wall[name]), 3)
        m[f"{name}_cpu_ratio"] = round(statistics.median(a / b for a, b in cpu[name] if b > 0), 3)
        m[f"{name}_off_us"] = round(statistics.median(a for a, _ in wall[name]) * 1e6, 1)
        m[f"{name}_on_us"] = round(statistics.median(b for _, b in wall[name]) * 1e6, 1)
    m.update(target_ratio=0.97, rounds=rounds, small_batch="64 x 8 KiB, 50 calls per timing (us: per timing)",
             method="median over rounds of off time / on time, timed back to back (order alternating)",
             wall_seconds=round(time.perf_counter() - t0, 2))  # fmt: skip
    for fns in cases.values():
        for st in fns["stores"]:
            st.close(persist=False)
    return {"metrics": m, "metrics_put_ratio": m["store_put_ratio"], "metrics_get_ratio": m["store_get_ratio"]}


def metrics_cases(src: np.ndarray, out: np.ndarray, calls: int) -> dict[str, Any]:
    """Store put/get of ``src``'s rows, ``calls`` times per timing: {"put": (off, on), "get": (off, on)}."""
    n, bnb = src.shape
    ns = Namespace("bench", KVLayout(num_layers=1, num_kv_heads=1, head_dim=bnb // 32, block_size=16, dtype="uint8"))
    keys_g = ns.keys_for_tokens(np.arange(n * 16))
    keys_p = ns.keys_for_tokens(np.arange(n * 16) + 1_000_000)
    puts, gets, stores = [], [], []
    for on in (False, True):
        bus = EventBus()
        store = Store([HostTier(2 * n * bnb, bnb, events=bus)], ns, events=bus)
        if on:
            store.enable_metrics()
        assert store.put(keys_g, src).all()

        def put(store: Store = store) -> None:
            for _ in range(calls):
                store.put(keys_p, src)
                store.tiers[0].delete(keys_p)  # timed too, in both: a put of fresh keys every call

        def get(store: Store = store) -> None:
            for _ in range(calls):
                store.get(keys_g, out)

        puts.append(put)
        gets.append(get)
        stores.append(store)
    return {"put": tuple(puts), "get": tuple(gets), "stores": stores}


def _rows_view(tier: HostTier, keys: BlockKeys) -> np.ndarray:
    """The slab rows holding ``keys``, as one view (they must be consecutive slots)."""
    slots = tier.pool.lookup(keys)
    assert (slots >= 0).all() and (np.diff(slots) == 1).all(), f"slots not consecutive: {slots[:8]}"
    s0 = int(slots[0])
    return tier.buf[s0 : s0 + len(keys)]


if __name__ == "__main__":
    main(sys.argv[1:])
