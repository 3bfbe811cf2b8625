"""The main job on embedded defaults: a simulated engine serving chat requests through kvbm_fs.

Requests share a system prompt and continue earlier conversations.  For each one
the engine matches its prefix, onboards the matched blocks (checking every byte
against what prefill would have computed), "computes" the rest, and offloads the
new blocks into G1; when G1 passes its watermark the coldest blocks are demoted
down the tiers.  The summary shows where every hit came from.
"""

from __future__ import annotations

import json
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
DEFAULT_TIERS = ["gpu://?capacity=16MiB", "host://?capacity=64MiB"]


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
        incoming = 0  # what moved down is now the lower tier's to place
    return moved


def run_demo(requests: int = 8, tiers: list[str] | None = None, json_only: bool = False) -> int:
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"requests": requests, "block_bytes": LAYOUT.block_nbytes}
    hits: dict[str, int] = {}
    computed = loaded = bad = demoted = 0
    with mount(*(tiers or DEFAULT_TIERS), layout=LAYOUT, model="demo-llama-8l") as store:
        for tokens in workload(requests):
            keys = store.keys(tokens)
            m = store.match(keys)
            for name, n in m.by_tier().items():
                hits[name] = hits.get(name, 0) + n
            kv = torch.empty((len(keys), *LAYOUT.block_shape), dtype=torch.bfloat16)
            got = store.get(keys[: m.length], kv[: m.length], m)
            loaded += int(got.sum())
            fresh = prefill_kv(keys)
            bad += int(
                (
                    ~torch.eq(kv[: m.length][torch.from_numpy(got)], fresh[: m.length][torch.from_numpy(got)])
                    .flatten(1)
                    .all(1)
                ).sum()
            )
            todo = np.flatnonzero(~np.pad(got, (0, len(keys) - m.length)))
            computed += todo.size
            demoted += make_room(store, todo.size)
            store.put(keys[todo], fresh[torch.from_numpy(todo)])
        summary.update(
            blocks_loaded=loaded,
            blocks_computed=computed,
            loaded_blocks_bit_exact=bad == 0,
            hits_by_tier=hits,
            blocks_demoted=demoted,
            seconds=round(time.perf_counter() - t0, 3),
            store=store.stats(),
        )
    if not json_only:
        _print_table(summary)
    print(json.dumps(summary, indent=None if not json_only else 2, default=str))
    return 0 if bad == 0 else 1


def _print_table(s: dict[str, Any]) -> None:
    print(f"kvbm_fs demo: {s['requests']} requests, {fmt_size(s['block_bytes'])} blocks")
    print(
        f"  loaded {s['blocks_loaded']} blocks (bit-exact: {s['loaded_blocks_bit_exact']}), computed {s['blocks_computed']}"
    )
    print(f"  hits by tier: {s['hits_by_tier']}   demoted: {s['blocks_demoted']}")
    for t in s["store"]["tiers"]:
        print(
            f"  {t['name']:>6} [{t['medium']}] {t['blocks']:4d} blocks, {fmt_size(t['used_bytes'])} / {fmt_size(t['capacity_bytes'])}"
        )
