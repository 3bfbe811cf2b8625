"""Store the KV of one prompt, then match and load it for a second prompt that shares its prefix.

Run: .venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

import numpy as np
import torch

from kvbm_fs import KVLayout, mount

layout = KVLayout(num_layers=4, num_kv_heads=4, head_dim=64, block_size=16, dtype="bfloat16")

with mount("gpu://cpu?capacity=8MiB", "host://?capacity=64MiB", layout=layout, model="quickstart") as store:
    system_prompt = np.arange(128)  # 8 full blocks
    first = np.concatenate([system_prompt, np.arange(1000, 1040)])
    keys = store.keys(first)  # 10 full blocks; the 8 trailing tokens are not a full block
    kv = torch.randn((len(keys), *layout.block_shape)).to(torch.bfloat16)  # what prefill produced
    store.put(keys, kv)
    store.copy(keys, "gpu", "host")  # offload down a tier as well

    second = np.concatenate([system_prompt, np.arange(2000, 2100)])
    keys2 = store.keys(second)
    m = store.match(keys2)
    out = torch.empty((m.length, *layout.block_shape), dtype=torch.bfloat16)
    got = store.get(keys2[: m.length], out, m)
    print(f"matched {m.length} of {len(keys2)} blocks ({m.num_tokens} tokens) in runs {m.runs}")
    print("loaded KV equals the stored KV:", bool(got.all() and torch.equal(out, kv[: m.length])))
