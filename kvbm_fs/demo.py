"""The main job on embedded defaults: a simulated engine serving chat requests through kvbm_fs.

Requests share a system prompt and continue earlier conversations.  For each one
the engine matches its prefix, onboards the matched blocks (checking every byte
against what prefill would have computed), "computes" the rest, and offloads the
new blocks into G1; before G1 overflows, its coldest blocks move down a tier
(G1 -> G2 -> G3 disk).  Then the "server" restarts: a fresh store on the same disk
directory serves the same conversations again, and their prefixes load from disk.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import torch

from .keys import BlockKeys
from .layout import KVLayout
from .mount import mount
from .store import Store
from .tier import SlotTier
from .units import fmt_size

LAYOUT = KVLayout(num_layers=8, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")  # 512 KiB blocks
DEMO_DIR = os.path.abspath(os.environ.get("KVBM_FS_DEMO_DIR", ".kvbm_fs-demo"))


def default_tiers(root: str = DEMO_DIR) -> list[str]:
    return ["gpu://?capacity=8MiB", "host://?capacity=16MiB", f"file://{root}/disk?capacity=256MiB"]


def prefill_kv(keys: BlockKeys) -> torch.Tensor:
    """Deterministic stand-in for prefill: a block's KV is a function of its prefix-chain key."""
    out = torch.empty((len(keys), *LAYOUT.block_shape), dtype=torch.bfloat16)
    for i, h in enumerate(keys.hashes.tolist()):
        g = torch.Generator().manual_seed(h & 0x7FFF_FFFF_FFFF_FFFF)
        out[i] = torch.randn(LAYOUT.block_shape, generator=g).to(torch.bfloat16)
    return out


def workload(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    system = rng.integers(0, 32000, 256)
    convs = [rng.integers(0, 32000, 128) for _ in range(max(1, n // 3))]
    reqs = []
    for i in range(n):
        c = i % len(convs)
        convs[c] = np.concatenate([convs[c], rng.integers(0, 32000, 64)])  # the conversation grows
        reqs.append(np.concatenate([system, convs[c]]))
    return reqs


def make_room(store: Store, incoming: int) -> int:
    """Until the daemon lands (issue 5): before a put, move the coldest blocks of each full tier one tier down."""
    moved = 0
    for upper, lower in zip(store.tiers, store.tiers[1:]):
        free = (upper.capacity_bytes - upper.used_bytes) // upper.block_nbytes
        if free >= incoming or not isinstance(upper, SlotTier):
            continue
        for cold in upper.coldest(incoming - free):
            store.copy(cold, upper.name, lower.name)
            upper.delete(cold)
            moved += len(cold)
        incoming = moved  # the next tier down must now take these
    return moved


class Engine:
    """Counts what a serving engine would: blocks loaded per tier, computed, and any wrong byte."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.loaded = self.computed = self.wrong = self.demoted = 0

    def serve(self, store: Store, tokens: np.ndarray) -> None:
        keys = store.keys(tokens)
        m = store.match(keys)
        for name, n in m.by_tier().items():
            self.hits[name] = self.hits.get(name, 0) + n
        kv = torch.empty((len(keys), *LAYOUT.block_shape), dtype=torch.bfloat16)
        got = np.zeros(len(keys), bool)
        got[: m.length] = store.get(keys[: m.length], kv[: m.length], m)
        fresh = prefill_kv(keys)
        ok = torch.from_numpy(got)
        self.wrong += int((~torch.eq(kv[ok], fresh[ok]).flatten(1).all(1)).sum())
        self.loaded += int(got.sum())
        todo = np.flatnonzero(~got)
        self.computed += todo.size
        self.demoted += make_room(store, todo.size)
        store.put(keys[todo], fresh[torch.from_numpy(todo)])

    def summary(self) -> dict[str, Any]:
        return dict(blocks_loaded=self.loaded, blocks_computed=self.computed, loaded_blocks_bit_exact=self.wrong == 0,
                    hits_by_tier=self.hits, blocks_demoted=self.demoted)  # fmt: skip


def run_demo(requests: int = 8, tiers: list[str] | None = None, json_only: bool = False) -> int:
    t0 = time.perf_counter()
    urls = tiers or default_tiers()
    reqs = workload(requests)
    phases: dict[str, Any] = {}
    for phase in ("serve", "after_restart"):
        eng = Engine()
        with mount(*urls, layout=LAYOUT, model="demo-llama-8l") as store:
            for tokens in reqs:
                eng.serve(store, tokens)
            phases[phase] = {**eng.summary(), "store": store.stats()}
    summary = {"requests": requests, "block_bytes": LAYOUT.block_nbytes, "tiers": urls, **phases,
               "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    if not json_only:
        _print_table(summary)
    print(json.dumps(summary, indent=None if not json_only else 2, default=str))
    return 0 if all(p["loaded_blocks_bit_exact"] for p in phases.values()) else 1


def _print_table(s: dict[str, Any]) -> None:
    print(f"kvbm_fs demo: {s['requests']} requests, {fmt_size(s['block_bytes'])} blocks, tiers {s['tiers']}")
    for phase in ("serve", "after_restart"):
        p = s[phase]
        print(f"  {phase}: loaded {p['blocks_loaded']} blocks (bit-exact: {p['loaded_blocks_bit_exact']}), "
              f"computed {p['blocks_computed']}, hits by tier {p['hits_by_tier']}, demoted {p['blocks_demoted']}")  # fmt: skip
        for t in p["store"]["tiers"]:
            print(f"    {t['name']:>6} [{t['medium']}] {t['blocks']:4d} blocks, "
                  f"{fmt_size(t['used_bytes'])} / {fmt_size(t['capacity_bytes'])}")  # fmt: skip
