"""Offload KV blocks from GPU memory to a local disk tier, restart, and load them back into GPU memory.

On a machine with CUDA, cuFile and NIXL, the load goes file -> GPU by GPUDirect Storage and each
block is verified on the GPU (dsum128); elsewhere the same calls take the host path.  Without a
GPU, ``--stand-in`` runs the device path's code on CPU tensors through NIXL's POSIX backend.
``kvbm-fs gds DIR`` says which path a folder would get, and why.

Run: .venv/bin/python examples/gpu_disk.py [--dir /var/cache/kvbm] [--stand-in]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from kvbm_fs import KVLayout, mount

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--dir", default=None, help="disk tier folder (default: a temporary one)")
ap.add_argument("--stand-in", action="store_true", help="no GPU: run the device path on CPU tensors")
a = ap.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
gds = "posix" if a.stand_in and device == "cpu" else "auto"
root = a.dir or tempfile.mkdtemp(prefix="kvbm-gpu-disk-")
layout = KVLayout(num_layers=8, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")  # 512 KiB blocks
tiers = [f"gpu://{device}?capacity=64MiB", f"file://{root}?capacity=1GiB&gds={gds}"]

prompt = torch.arange(64 * 16).numpy()  # 64 full blocks
with mount(*tiers, layout=layout, model="gpu-disk-example") as store:
    keys = store.keys(prompt)
    kv = torch.randn((len(keys), *layout.block_shape), device=device).to(torch.bfloat16)
    store.put(keys, kv, tier="disk")  # offload straight from GPU memory: dsum128 recorded on the GPU

with mount(*tiers, layout=layout, model="gpu-disk-example") as store:  # a restart: G1 is empty, G3 persists
    m = store.match(store.keys(prompt))
    out = torch.empty((m.length, *layout.block_shape), dtype=torch.bfloat16, device=device)
    disk = store.tier("disk")
    if hasattr(disk, "register_device_memory"):
        disk.register_device_memory(out)  # an engine registers its KV cache once
    got = store.get(keys[: m.length], out, m)
    s = disk.stats()
    print(
        f"matched {m.length} of {len(keys)} blocks in {m.runs}; loaded == stored: {bool(got.all() and torch.equal(out, kv))}"
    )
    print(json.dumps({k: s[k] for k in ("gds", "gds_fd", "device_loads", "device_host_loads")}))
