"""Issue 18's target 1 over many seeds: the default policy against the best classic baseline on each
synthetic generator run with several seeds (and on any Mooncake-format traces given).

What it measures
    For every generator of :mod:`kvbm_fs.testing.traces` and ``--seeds`` seeds (its default seed, then
    +10, +20, ...), at 5% and 10% of the trace's distinct blocks: the hit ratio of each policy given
    (default: the default policy), replayed through the real store (:func:`kvbm_fs.replay.compare`),
    over the best of the reference baselines of ``bench_policy_refs.py`` (LRU, LRU-2, ARC, LIRS,
    S3-FIFO, W-TinyLFU, LFU with aging, with their variants) simulated on the same trace.  Per cell:
    every seed's ratio, their mean and minimum, and how many seeds fall below 0.99.  ``--trace`` adds
    Mooncake-format JSONL files (one seed each; e.g. the public Mooncake FAST'25 conversation trace).

Why
    ``bench_policies`` judges the default on one seed per generator.  Session 9 found that on the
    multi-turn generator a change of seed, or a small change to a policy, moves a cell by 2-5%
    (``docs/architecture.md`` 1.12): a single seed cannot tell a better policy from a lucky one, and a
    constant tuned to pass it is tuned to that seed.  The mean over seeds is the number to improve.
    Hit ratios are deterministic; nothing is timed and nothing passes or fails here.

Run ``python benchmarks/bench_policy_seeds.py [--quick] [--seeds N] [--policies P ...] [--trace PATH ...]``;
prints one JSON object and writes it to ``benchmarks/results/bench_policy_seeds.json``
(``--quick``: two seeds at scale 0.05).  A few minutes.
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
from pathlib import Path
from typing import Any

import bench_policy_refs as refs
import numpy as np
from _common import add_output_args, emit, results_path

from kvbm_fs.policy import DEFAULT_POLICY
from kvbm_fs.replay import Trace, compare, load_trace
from kvbm_fs.testing.traces import SYNTHETIC

NAME = "bench_policy_seeds"
CAPACITIES = refs.CAPACITIES
SHARE = 0.99  # issue 18, target 1


def baselines(trace: Trace) -> dict[str, dict[str, float]]:
    """Each reference policy's hit ratio per capacity: ``bench_policy_refs.run`` without Belady and the
    oracles, which this check does not use (same numbers, 0.85x the time)."""
    requests = [r.tolist() for r in trace.requests]
    out: dict[str, dict[str, float]] = {}
    for frac in CAPACITIES:
        cap = max(1, round(trace.distinct * frac))  # as the replay sizes its tier
        for name, make in refs.POLICIES.items():
            out.setdefault(name, {})[str(frac)] = round(refs.hit_ratio(requests, make(cap)), 4)
    return out


def cells(trace: Trace, policies: list[str], jobs: int) -> dict[str, Any]:
    """One trace: each policy's hit ratio over the best baseline's, per capacity."""
    base = baselines(trace)
    res = compare(trace, capacities=CAPACITIES, policies=policies, jobs=jobs)
    out: dict[str, Any] = {}
    for row in res["single_tier"]:
        cap = f"{row['capacity']:g}"
        best = max(base, key=lambda p: base[p][cap])
        for p in policies:
            hit = row["policies"][p]["hit_ratio"]
            out.setdefault(p, {})[cap] = {
                "hit_ratio": round(hit, 4),
                "best_baseline": best,
                "baseline_hit_ratio": base[best][cap],
                "ratio": round(hit / base[best][cap], 4) if base[best][cap] else float("inf"),
            }
    return out


def summarise(per_seed: list[dict[str, Any]], policies: list[str]) -> dict[str, Any]:
    """Per policy and capacity: the seeds' ratios, mean, min and how many are below SHARE."""
    out: dict[str, Any] = {}
    for p in policies:
        for cap in (f"{c:g}" for c in CAPACITIES):
            r = np.array([s[p][cap]["ratio"] for s in per_seed])
            out.setdefault(p, {})[cap] = {
                "ratios": r.round(4).tolist(),
                "mean": round(float(r.mean()), 4),
                "min": round(float(r.min()), 4),
                "seeds_behind": int((r < SHARE).sum()),
            }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or NAME).splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds per generator (default 5)")
    ap.add_argument("--policies", nargs="+", default=[DEFAULT_POLICY], help="policy specs (default: the default)")
    ap.add_argument("--trace", type=Path, nargs="*", default=[], help="Mooncake-format JSONL traces to add")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel replays")
    add_output_args(ap, "two seeds at scale 0.05 (smoke tests)")
    args = ap.parse_args(argv)
    args.out = args.out or results_path(NAME, args.quick)
    seeds, scale = (2, 0.05) if args.quick else (args.seeds, 1.0)
    if seeds < 1:
        ap.error("--seeds must be >= 1")
    t0 = time.perf_counter()
    traces: dict[str, Any] = {}
    for name, make in SYNTHETIC.items():
        first = int(inspect.signature(make).parameters["seed"].default)
        used = [first + 10 * k for k in range(seeds)]
        per_seed = [cells(make(scale, seed=s), args.policies, args.jobs) for s in used]  # type: ignore[call-arg]
        traces[name] = {"seeds": used, "summary": summarise(per_seed, args.policies)}
    for path in args.trace:
        one = cells(load_trace(path, 400 if args.quick else None), args.policies, args.jobs)
        traces[path.stem] = {"seeds": [None], "summary": summarise([one], args.policies)}
    behind = {
        p: [f"{t}@{c}" for t, v in traces.items() for c, s in v["summary"][p].items() if s["mean"] < SHARE]
        for p in args.policies
    }
    res: dict[str, Any] = {
        "benchmark": NAME,
        "quick": bool(args.quick),
        "scale": scale,
        "policies": args.policies,
        "baseline_share": SHARE,
        "traces": traces,
        "cells_behind_on_mean": behind,
        "seed_cells_behind": {
            p: sum(s["seeds_behind"] for v in traces.values() for s in v["summary"][p].values()) for p in args.policies
        },
        "seed_cells": sum(len(v["seeds"]) for v in traces.values()) * len(CAPACITIES),
        "method": "replay (kvbm_fs.replay.compare, one host tier) over the best bench_policy_refs baseline on the "
        "same trace; hit = longest resident prefix",
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    emit(res, args.out)
    return res


if __name__ == "__main__":
    main()
