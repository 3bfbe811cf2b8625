"""Placement policies on the shared Mooncake trace: hit ratio of each, and its ratio to Belady's optimum.

What it measures
    The trace (``../shared/traces/synthetic_trace.jsonl``: 3,993 requests, 121,877 block
    references, 43,924 distinct 512-token blocks) replayed through the real store
    (:mod:`kvbm_fs.replay`: ``mount`` -> ``Store.match`` / ``get`` / ``put``) with one host tier
    holding 5% and 10% of the distinct blocks, for every shipped policy (``lru``,
    ``prefix-lru``, ``lru+tinylfu``, ``lru+count2``, ``lfu`` and the default ``parc``): hit ratio,
    prefill seconds saved (the replay's cost model: block i recomputes in a + b*i) and ratio to Belady.  A request's hit
    is its longest matched prefix; hit ratio = hit blocks / referenced blocks.  Beside each:
    Belady's MIN at the same capacity, on the same stream with the same prefix rule
    (:func:`kvbm_fs.replay.belady`), and each policy's ratio to it.

    Then the same on four synthetic traces of known character (:mod:`kvbm_fs.testing.traces`:
    shared system prompts, interleaved multi-turn chats, Zipf document QA, a hot set under scans),
    because the issue judges the default on other traces too: each policy's ratio to Belady, and
    the default's hits over LRU's (``synthetic``).

    Then a multi-tier replay, 2% host / 10% disk / unbounded remote (``remote+file://`` in a
    temporary folder), with the placement daemon run synchronously after every request:
    per-tier hit ratios, bytes promoted and demoted (scaled to 64 MiB blocks, Llama-3-8B at 512
    tokens), and the cost model's estimated prefill time against recomputing everything.

    Last, the check: ``default_over_best_baseline``, the default's hit ratio over the best reference
    policy of ``bench_policy_refs.json`` (LRU, LRU-2, ARC, LIRS, S3-FIFO, W-TinyLFU, LFU with aging)
    on each trace and capacity; issue 18's target 1 is >= 0.99 everywhere, and
    ``cells_behind_baselines`` lists the cells that miss it.  (The ratios to Belady are kept for
    orientation; issue 5's 0.8-of-Belady target is withdrawn.)

Why
    Placement decides whether a tiered cache helps at all.  Hit ratios are
    deterministic: nothing here is timed, and nothing passes or fails.

Run ``python benchmarks/bench_policies.py [--quick] [--trace PATH]``; prints one JSON object and
writes it to ``benchmarks/results/bench_policies.json`` (``bench_policies.quick.json`` with
``--quick``: the first 400 requests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import add_output_args, emit, results_path

from kvbm_fs.policy import DEFAULT_POLICY, SHIPPED
from kvbm_fs.replay import TierSpec, compare, load_trace
from kvbm_fs.testing.traces import SYNTHETIC

NAME = "bench_policies"
ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "traces" / "synthetic_trace.jsonl"
REFS = ROOT / "benchmarks" / "results" / "bench_policy_refs.json"
CAPACITIES = (0.05, 0.1)
MULTI = ("host:0.02", "disk:0.1", "remote")
MULTI_POLICIES = ("lru", DEFAULT_POLICY)
BASELINE_SHARE = 0.99  # issue 18, target 1: the default's hit ratio >= 0.99 x the best baseline's


def _per_cap(rows: list[dict[str, Any]], value: Any, digits: int = 3) -> dict[str, float]:
    return {f"{r['capacity']:g}": round(float(value(r)), digits) for r in rows}


def against_baselines(res: dict[str, Any], refs_path: Path = REFS) -> dict[str, Any]:
    """The issue's target: the default's hit ratio over the best reference policy's
    (``bench_policy_refs.json``, same traces and capacities), per trace and capacity; >= 0.99 passes."""
    if not refs_path.exists():
        return {"skipped": f"no {refs_path.name}: run bench_policy_refs.py first"}
    refs = json.loads(refs_path.read_text())
    base = {
        "mooncake": refs["hit_ratio"],
        **{n: t["hit_ratio"] for n, t in refs.get("synthetic", {}).get("traces", {}).items()},
    }
    ours = {"mooncake": res["hit_ratio"], **{n: t["hit_ratio"] for n, t in res["synthetic"]["traces"].items()}}
    out: dict[str, Any] = {}
    for trace, by_pol in base.items():
        if trace not in ours:
            continue
        for cap, mine in ours[trace][DEFAULT_POLICY].items():
            best = max(by_pol, key=lambda p: by_pol[p].get(cap, 0.0))
            ratio = mine / by_pol[best][cap] if by_pol[best][cap] else float("inf")
            meets = ratio >= BASELINE_SHARE
            out.setdefault(trace, {})[cap] = {"best_baseline": best, "ratio": round(ratio, 4), "meets": meets}
    return out


def behind(check: dict[str, Any]) -> list[str]:
    """The ``trace@capacity`` cells where the default misses the check (empty: target 1 is met)."""
    return [f"{t}@{c}" for t, caps in check.items() if isinstance(caps, dict) for c, v in caps.items()
            if isinstance(v, dict) and not v["meets"]]  # fmt: skip


def _over(a: dict[str, Any], b: dict[str, Any]) -> float:
    return float(a["hit_ratio"] / b["hit_ratio"]) if b["hit_ratio"] > 0 else float("inf")


def synthetic_section(scale: float, jobs: int) -> dict[str, Any]:
    """Every shipped policy on the synthetic traces of :mod:`kvbm_fs.testing.traces` (one host tier of
    5% and 10% of each trace's distinct blocks): ratio to Belady, and the default's hits over LRU's."""
    out: dict[str, Any] = {"scale": scale, "traces": {}}
    for name, make in SYNTHETIC.items():
        trace = make(scale)
        res = compare(trace, capacities=CAPACITIES, policies=SHIPPED, jobs=jobs)
        rows = res["single_tier"]
        out["traces"][name] = {
            "references": res["references"],
            "distinct_blocks": res["distinct_blocks"],
            "belady": {f"{r['capacity']:g}": round(r["belady"], 4) for r in rows},
            "ratio_to_belady": {p: _per_cap(rows, lambda r, p=p: r["policies"][p]["ratio_to_belady"]) for p in SHIPPED},
            "hit_ratio": {p: _per_cap(rows, lambda r, p=p: r["policies"][p]["hit_ratio"], 4) for p in SHIPPED},
            "prefill_s_saved": {
                p: _per_cap(rows, lambda r, p=p: r["policies"][p]["prefill_s_saved"], 1) for p in SHIPPED
            },
            "default_over_lru": _per_cap(rows, lambda r: _over(r["policies"][DEFAULT_POLICY], r["policies"]["lru"])),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=TRACE, help=f"Mooncake-format JSONL (default {TRACE})")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel replays")
    add_output_args(ap, "first 400 requests only (smoke tests)")
    args = ap.parse_args(argv)
    args.out = args.out or results_path(NAME, args.quick)
    trace = load_trace(args.trace, 400 if args.quick else None)
    t0 = time.perf_counter()
    single = compare(trace, capacities=CAPACITIES, policies=SHIPPED, jobs=args.jobs)
    multi = compare(trace, capacities=(), policies=MULTI_POLICIES, tiers=[TierSpec.parse(t) for t in MULTI],
                    jobs=args.jobs)["multi_tier"]  # fmt: skip
    synthetic = synthetic_section(0.05 if args.quick else 1.0, args.jobs)
    wall = time.perf_counter() - t0

    def cap_key(c: float) -> str:
        return f"{c:g}"

    hit = {p: {cap_key(r["capacity"]): round(r["policies"][p]["hit_ratio"], 4) for r in single["single_tier"]}
           for p in SHIPPED}  # fmt: skip
    ratio = {p: {cap_key(r["capacity"]): round(r["policies"][p]["ratio_to_belady"], 4) for r in single["single_tier"]}
             for p in SHIPPED}  # fmt: skip
    best_other = {c: max(ratio[p][c] for p in SHIPPED if p != DEFAULT_POLICY) for c in ratio[DEFAULT_POLICY]}
    res: dict[str, Any] = {
        "benchmark": NAME,
        "quick": bool(args.quick),
        "trace": str(args.trace.name),
        "requests": single["requests"],
        "references": single["references"],
        "distinct_blocks": single["distinct_blocks"],
        "infinite_cache_hit_ratio": round(single["infinite_cache_hit_ratio"], 4),
        "capacity_blocks": {cap_key(r["capacity"]): r["capacity_blocks"] for r in single["single_tier"]},
        "belady": {cap_key(r["capacity"]): round(r["belady"], 4) for r in single["single_tier"]},
        "hit_ratio": hit,
        "ratio_to_belady": ratio,
        "default_policy": DEFAULT_POLICY,
        "default_ratio_5pct": ratio[DEFAULT_POLICY]["0.05"],
        "default_ratio_10pct": ratio[DEFAULT_POLICY]["0.1"],
        "lru_ratio_5pct": ratio["lru"]["0.05"],
        "lru_ratio_10pct": ratio["lru"]["0.1"],
        "default_beats_every_other_policy": all(ratio[DEFAULT_POLICY][c] >= best_other[c] for c in best_other),
        "prefill_s_saved": {
            p: {cap_key(r["capacity"]): r["policies"][p]["prefill_s_saved"] for r in single["single_tier"]}
            for p in SHIPPED
        },
        "est_speedup": {
            p: {cap_key(r["capacity"]): r["policies"][p]["est_speedup"] for r in single["single_tier"]} for p in SHIPPED
        },
        "multi_tier": {
            "tiers": list(MULTI),
            "belady_unbounded": round(multi["belady"], 4),
            "policies": {
                p: {
                    "hit_ratio": round(r["hit_ratio"], 4),
                    "tier_hit_ratio": {k: round(v, 4) for k, v in r["tier_hit_ratio"].items()},
                    "host_share_of_hits": round(r["first_tier_share_of_hits"], 4),
                    "prefill_s_saved": r["prefill_s_saved"],
                    "worth_loading_ratio": round(r["worth_loading_ratio"], 4),
                    "est_speedup": r["est_speedup"],
                    "promoted_bytes_est": r.get("promoted_bytes_est", 0),
                    "demoted_bytes_est": r.get("demoted_bytes_est", 0),
                    "daemon": r.get("daemon", {}),
                    "tier_blocks_at_end": r["tier_blocks"],
                    "wall_s": r["wall_s"],
                }
                for p, r in multi["policies"].items()
            },
        },
        "synthetic": synthetic,
        "cost_model": single["cost_model"],
        "method": "replay through mount()/Store.match/get/put with 1 KiB stand-in blocks; hit = longest matched "
        "prefix; Belady = MIN with bypass on the same stream (kvbm_fs.replay.belady)",
        "wall_seconds": round(wall, 2),
        "env": {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count()},
    }
    check = {"skipped": "quick run"} if args.quick else against_baselines(res)
    res["default_over_best_baseline"] = check  # the check (issue 18, target 1): every cell >= BASELINE_SHARE
    res["baseline_share"] = BASELINE_SHARE
    res["cells_behind_baselines"] = behind(check)
    emit(res, args.out)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
