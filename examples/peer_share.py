"""Two serving instances share a system prompt's KV through a third process's DRAM (a peer).

A memory-only peer (``kvbm-fs peer-serve``) lends host memory; instance A stores the KV of a prompt
into it over NIXL UCX, then exits; instance B, another process, matches and loads that prefix from
the peer instead of recomputing it.  Every block B loads is checked (key echo + xxh3) before use.

Run: .venv/bin/python examples/peer_share.py
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import torch

from kvbm_fs import KVLayout, mount

layout = KVLayout(num_layers=4, num_kv_heads=4, head_dim=64, block_size=16, dtype="bfloat16")
SYSTEM = np.arange(256)  # 16 full blocks shared by both instances' prompts


def instance(role: str, url: str) -> None:
    """One serving instance: a small host tier of its own, the peer below it."""
    with mount("host://?capacity=1MiB", url, layout=layout, model="peer-example") as store:
        if role == "A":
            keys = store.keys(np.concatenate([SYSTEM, np.arange(1000, 1032)]))
            kv = torch.randn((len(keys), *layout.block_shape), generator=torch.Generator().manual_seed(0))
            stored = store.put(keys, kv.to(torch.bfloat16), tier="peer")
            print(f"A stored {int(stored.sum())} blocks in the peer")
            return
        keys = store.keys(np.concatenate([SYSTEM, np.arange(5000, 5064)]))
        m = store.match(keys)
        out = torch.empty((m.length, *layout.block_shape), dtype=torch.bfloat16)
        got = store.get(keys[: m.length], out, m)
        want = torch.randn((18, *layout.block_shape), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        print(f"B matched {m.length} of {len(keys)} blocks, by tier {m.by_tier()}")
        print("B loaded A's KV:", bool(got.all() and torch.equal(out, want[: m.length])))


def main() -> None:
    if len(sys.argv) == 3:  # a child: python peer_share.py A|B URL
        instance(sys.argv[1], sys.argv[2])
        return
    block = layout.block_nbytes
    cmd = [sys.executable, "-m", "kvbm_fs", "peer-serve", "--capacity", str(64 * block), "--block-bytes", str(block)]
    peer = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout is not None
        url = next(json.loads(line) for line in peer.stdout if line.startswith("{"))["url"]
        print("peer serving at", url)
        for role in ("A", "B"):
            res = subprocess.run([sys.executable, __file__, role, url], capture_output=True, text=True, check=True)
            print(res.stdout, end="")
    finally:
        peer.send_signal(signal.SIGTERM)
        peer.wait(30)


if __name__ == "__main__":
    main()
