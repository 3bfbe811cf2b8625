"""Share of hits served from host memory in a deployed tier stack, before and after the daemon's placement options.

What it measures
    Each trace replayed (:func:`kvbm_fs.replay.replay_one`: ``mount`` -> ``Store.match`` / ``get`` /
    ``put``, one synchronous daemon round after every request) through host 2% / disk 10% / remote
    unbounded (``host://``, ``file://``, ``remote+file://`` in a temporary folder; fractions of the
    trace's distinct blocks), once per set of daemon options (``VARIANTS``):

    - ``before``: the daemon as it was (every put lands in host; host is kept between its watermarks,
      75% to 90% full; every hit from disk or remote is promoted);
    - ``make_room``: a promotion demotes the host tier's coldest blocks (by its policy) to fit, and host
      has no watermark of its own, so it runs full;
    - ``+first_sight``: puts land on disk, so host holds only blocks referenced twice;
    - ``+exclusive``: a promoted block leaves disk (remote keeps its copy), so disk holds no copy of
      what host holds;
    - ``all``: the three together.

    Per run: host share of hits (``first_tier_share_of_hits``: what decides time to first token once
    disk and remote make hit ratio nearly free), total hit ratio, prefill seconds saved (the replay's
    cost model: 64 MiB blocks from host at 12 GB/s, disk 1.5 GB/s, remote 0.3 GB/s + 30 ms, against
    recomputing block i in a + b*i), per-tier hit ratios and the bytes the daemon moved (scaled to
    64 MiB blocks).  Then each variant over ``before``, per trace (``over_before``).

    Traces: the shared Mooncake trace (``../shared/traces/synthetic_trace.jsonl``) with the default
    policy and LRU, and every generator of :mod:`kvbm_fs.testing.traces` at scale 1 with the default.

Why
    Issue 18, target 3.  Everything here is deterministic (hit counts, not seconds); nothing is timed.

Run ``python benchmarks/bench_host_share.py [--quick] [--jobs N]``; prints one JSON object and writes
``benchmarks/results/bench_host_share.json`` (``.quick.json``: 150 requests and one generator at scale
0.02, parc, ``before`` and ``make_room`` only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from _common import add_output_args, emit, results_path

from kvbm_fs.daemon import DaemonConfig
from kvbm_fs.policy import DEFAULT_POLICY
from kvbm_fs.replay import ReplayConfig, TierSpec, Trace, load_trace, replay_one
from kvbm_fs.testing.traces import SYNTHETIC

NAME = "bench_host_share"
ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "traces" / "synthetic_trace.jsonl"
TIERS = ("host:0.02", "disk:0.1", "remote")
OFF = {"make_room": False, "first_sight": None, "exclusive": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "before": OFF,
    "make_room": {**OFF, "make_room": True},
    "make_room+first_sight": {**OFF, "make_room": True, "first_sight": "auto"},
    "make_room+exclusive": {**OFF, "make_room": True, "exclusive": True},
    "all": {"make_room": True, "first_sight": "auto", "exclusive": True},
}


def _run(args: tuple[Trace, str, dict[str, Any]]) -> dict[str, Any]:
    trace, policy, opts = args
    cfg = ReplayConfig(policy=policy, tiers=[TierSpec.parse(t) for t in TIERS], daemon=opts)
    r = replay_one(trace, cfg)
    d = r["daemon"]
    return {
        "host_share_of_hits": round(r["first_tier_share_of_hits"], 4),
        "hit_ratio": round(r["hit_ratio"], 4),
        "prefill_s_saved": r["prefill_s_saved"],
        "tier_hit_ratio": {k: round(v, 4) for k, v in r["tier_hit_ratio"].items()},
        "daemon_moved_bytes_est": r["promoted_bytes_est"] + r["demoted_bytes_est"],
        "promoted_bytes_est": r["promoted_bytes_est"],
        "demoted_bytes_est": r["demoted_bytes_est"],
        "daemon": {k: d[k] for k in ("demoted_blocks", "dropped_blocks", "promoted_blocks", "prefetched_blocks")},
        "wall_s": r["wall_s"],
    }


def _over(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    b = runs["before"]
    out = {}
    for v, r in runs.items():
        if v == "before":
            continue
        out[v] = {
            k: round(r[k] / b[k], 4) if b[k] else float("inf")
            for k in ("host_share_of_hits", "hit_ratio", "prefill_s_saved", "daemon_moved_bytes_est")
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=TRACE, help=f"Mooncake-format JSONL (default {TRACE})")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel replays")
    add_output_args(ap, "150 requests of the trace, one generator at scale 0.02, parc, two variants")
    args = ap.parse_args(argv)
    args.out = args.out or results_path(NAME, args.quick)
    traces: list[tuple[Trace, list[str]]] = [
        (load_trace(args.trace, 150 if args.quick else None), [DEFAULT_POLICY] + ([] if args.quick else ["lru"]))
    ]
    traces[0][0].name = "mooncake"
    traces += [(make(0.02 if args.quick else 1.0), [DEFAULT_POLICY]) for make in SYNTHETIC.values()]
    variants = ["before", "make_room"] if args.quick else list(VARIANTS)
    if args.quick:
        traces = traces[:2]
    work = [(t, p, v) for t, pols in traces for p in pols for v in variants]
    work.sort(key=lambda w: w[1] != DEFAULT_POLICY)  # the default policy everywhere first, LRU last
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with ProcessPoolExecutor(max(1, args.jobs)) as ex:
        futs = {ex.submit(_run, (t, p, VARIANTS[v])): (t, p, v) for t, p, v in work}
        for f in as_completed(futs):
            t, p, v = futs[f]
            r = f.result()
            row = results.setdefault(t.name, {}).setdefault(p, {"references": t.references, "runs": {}})
            row["runs"][v] = r
            print(json.dumps({"trace": t.name, "policy": p, "variant": v, **r}), file=sys.stderr, flush=True)
    for by_pol in results.values():
        for row in by_pol.values():
            row["runs"] = {v: row["runs"][v] for v in variants if v in row["runs"]}
    for by_pol in results.values():
        for row in by_pol.values():
            row["over_before"] = _over(row["runs"])
    default = DaemonConfig()
    res: dict[str, Any] = {
        "benchmark": NAME,
        "quick": bool(args.quick),
        "tiers": list(TIERS),
        "variants": VARIANTS,
        "daemon_defaults": {k: getattr(default, k) for k in OFF},
        "results": results,
        "method": "replay through mount()/Store.match/get/put with 1 KiB stand-in blocks and one synchronous "
        "daemon round per request; host share = host hits / all hits; seconds saved by the replay's cost model",
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "env": {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count()},
    }
    emit(res, args.out)
    return res


if __name__ == "__main__":
    main()
