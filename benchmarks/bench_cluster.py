"""Cluster replay: what sharing and routing buy at N = 1, 4, 16 and 64 instances, on the shared Mooncake trace.

What it measures
    ``kvbm-fs replay --instances N --router R`` semantics (:mod:`kvbm_fs.cluster`): N real stores, each
    with its own host tier of 2% of the trace's distinct blocks, sharing a 10% pool (disk medium in the
    cost model) and an unbounded S3-like tier (remote medium), the placement daemon run after every
    request on the instance that served it.  Requests arrive at the trace's timestamps.  For each N and
    each router (round-robin, prefix-hash, kv-aware, all in one run, on the same trace): cluster hit
    ratio, prefill seconds saved, the share of hits from the serving instance's own host tier, load
    imbalance (max/mean requests, tokens and busy seconds per instance) and the mean estimated TTFT
    (queue wait + prefill, each instance serving its requests one at a time).  Then the routers side
    by side: kv-aware and prefix-hash over round-robin, per N.

Why
    A deployment chooses N and a router before it has the hardware; this is the evidence.  Results are
    deterministic (the cost model, not timers); ``wall_s`` per run only shows the replay is fast enough.

Run ``python benchmarks/bench_cluster.py [--quick] [--trace PATH] [--jobs J]``; prints one JSON object and
writes it to ``benchmarks/results/bench_cluster.json`` (``bench_cluster.quick.json`` with ``--quick``: the
first 300 requests, N = 1 and 4).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from _common import add_output_args, emit, results_path

from kvbm_fs.cluster import DEFAULT_TIERS, ROUTERS, ClusterConfig, compare_cluster, format_table
from kvbm_fs.replay import ReplayConfig, TierSpec, load_trace

NAME = "bench_cluster"
ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "traces" / "synthetic_trace.jsonl"
INSTANCES = (1, 4, 16, 64)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def side_by_side(res: dict[str, Any]) -> dict[str, Any]:
    """Per N: each router's saved seconds, hit ratio and own-host share over round-robin's."""
    by = {(r["instances"], r["router"]): r for r in res["results"]}
    out: dict[str, Any] = {}
    for n in res["instances"]:
        rr = by[(n, "round-robin")]
        row: dict[str, Any] = {}
        for rt in ("prefix-hash", "kv-aware"):
            r = by[(n, rt)]
            row[rt] = {
                "saved_over_round_robin": _ratio(r["prefill_s_saved"], rr["prefill_s_saved"]),
                "hit_ratio_over_round_robin": _ratio(r["hit_ratio"], rr["hit_ratio"]),
                "own_host_share_over_round_robin": _ratio(r["own_host_share_of_hits"], rr["own_host_share_of_hits"]),
                "mean_ttft_over_round_robin": _ratio(r["mean_ttft_s"], rr["mean_ttft_s"]),
            }
        out[str(n)] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=TRACE, help=f"Mooncake-format JSONL (default {TRACE})")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel replays")
    add_output_args(ap, "the first 300 requests, N = 1 and 4")
    args = ap.parse_args()
    args.out = args.out or results_path(NAME, args.quick)
    limit = 300 if args.quick else None
    instances = (1, 4) if args.quick else INSTANCES
    trace = load_trace(args.trace, limit)
    base = ReplayConfig(tiers=[TierSpec.parse(t) for t in DEFAULT_TIERS])
    t0 = time.perf_counter()
    res = compare_cluster(trace, base, instances, ROUTERS, ClusterConfig(), trace.arrivals, args.jobs)
    wall = time.perf_counter() - t0
    print(format_table(res), file=sys.stderr)
    sbs = side_by_side(res)
    top = str(instances[-1])
    by = {(r["instances"], r["router"]): r for r in res["results"]}
    out = {
        "benchmark": NAME,
        "quick": args.quick,
        "trace_path": str(args.trace),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "jobs": args.jobs,
        "wall_s": round(wall, 1),
        f"kv_aware_saved_over_round_robin_n{top}": sbs[top]["kv-aware"]["saved_over_round_robin"],
        f"prefix_hash_saved_over_round_robin_n{top}": sbs[top]["prefix-hash"]["saved_over_round_robin"],
        f"kv_aware_wall_s_n{top}": by[(instances[-1], "kv-aware")]["wall_s"],
        "side_by_side": sbs,
        **res,
    }
    emit(out, args.out)


if __name__ == "__main__":
    main()
