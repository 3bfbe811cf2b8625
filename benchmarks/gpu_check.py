"""GPU path check for G1/G2 (run on a CUDA machine; prints {"skipped": ...} elsewhere).

Measured side by side in one run, 2 MiB blocks in batches of 64:
- host slab allocation: parallel first-touch + cudaHostRegister vs one ``pin_memory=True`` allocation;
- H2D / D2H through the tiers (pinned slab) vs the same copies from pageable memory;
- G1 <-> G2 transfers through ``kvbm_fs.transfer`` vs a raw ``tensor.copy_`` of the same bytes;
- correctness: every block that comes back equals what went in.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import emit, results_path, skip

from kvbm_fs.keys import BlockKeys
from kvbm_fs.tiers.gpu import GpuTier
from kvbm_fs.tiers.host import HostTier
from kvbm_fs.transfer import transfer

MiB = 1 << 20


def timed(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(block: int, batch: int, reps: int, slab_gib: float) -> dict[str, Any]:
    nbytes = block * batch
    t0 = time.perf_counter()
    ref = torch.empty(int(slab_gib * (1 << 30)), dtype=torch.uint8, pin_memory=True)
    pin_alloc = time.perf_counter() - t0
    del ref
    host = HostTier(int(slab_gib * (1 << 30)), block, pin=True)
    gpu = GpuTier(4 * nbytes, block, device="cuda")
    keys = BlockKeys.chain(1, np.arange(1, batch + 1, dtype=np.uint64))
    src = torch.randint(0, 256, (batch, block), dtype=torch.uint8)
    host.put(keys, src)
    dev = torch.empty((batch, block), dtype=torch.uint8, device="cuda")
    pageable = torch.empty((batch, block), dtype=torch.uint8)
    pinned_raw = torch.empty((batch, block), dtype=torch.uint8, pin_memory=True)

    def g2_to_g1() -> None:
        gpu.delete(keys)
        transfer(keys, host, gpu)

    def g1_to_g2() -> None:
        host.delete(keys)
        transfer(keys, gpu, host)

    res = {
        "block_bytes": block,
        "batch": batch,
        "pinned_slab": host.slab.pinned,
        "alloc_s_first_touch_register": round(host.slab.alloc_seconds, 3),
        "alloc_s_pin_memory_true": round(pin_alloc, 3),
        "h2d_gbps_tier_get_into_gpu": nbytes / timed(lambda: host.get(keys, dev), reps) / 1e9,
        "h2d_gbps_raw_pinned": nbytes / timed(lambda: dev.copy_(pinned_raw, non_blocking=True), reps) / 1e9,
        "h2d_gbps_raw_pageable": nbytes / timed(lambda: dev.copy_(pageable), reps) / 1e9,
        "g2_to_g1_gbps": nbytes / timed(g2_to_g1, reps) / 1e9,
        "g1_to_g2_gbps": nbytes / timed(g1_to_g2, reps) / 1e9,
        "d2h_gbps_raw_pinned": nbytes / timed(lambda: pinned_raw.copy_(dev, non_blocking=True), reps) / 1e9,
        "d2h_gbps_raw_pageable": nbytes / timed(lambda: pageable.copy_(dev), reps) / 1e9,
    }
    out = torch.empty((batch, block), dtype=torch.uint8)
    gpu.get(keys, out)
    host.get(keys, pageable)
    res["correct"] = bool(torch.equal(out, src) and torch.equal(pageable, src))
    res["h2d_ratio_vs_raw_pinned"] = res["h2d_gbps_tier_get_into_gpu"] / res["h2d_gbps_raw_pinned"]
    res["g2_to_g1_ratio_vs_raw_pinned"] = res["g2_to_g1_gbps"] / res["h2d_gbps_raw_pinned"]
    res["g1_to_g2_ratio_vs_raw_pinned"] = res["g1_to_g2_gbps"] / res["d2h_gbps_raw_pinned"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--slab-gib", type=float, default=8.0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    if not torch.cuda.is_available():
        skip("no CUDA device")
        return
    result = run(2 * MiB, 64, 3 if a.quick else 10, 1.0 if a.quick else a.slab_gib)
    result["device"] = torch.cuda.get_device_name()
    emit(result, a.out or results_path("gpu_check", a.quick))


if __name__ == "__main__":
    main()
