"""The main job on embedded defaults: a simulated engine serving chat requests through kvbm_fs.

Requests share a system prompt and continue earlier conversations.  For each one
the engine matches its prefix, onboards the matched blocks (checking every byte
against what prefill would have computed), "computes" the rest, and offloads the
new blocks into G1; the placement daemon (run after each request) moves the coldest
blocks of a tier over its high watermark down a tier (G1 -> G2 -> G3 disk), and copies
hits from slow tiers up.  Then the "server" restarts: a fresh store on the same disk
directory serves the same conversations again, and their prefixes load from disk.

Last, a real model: a tiny Llama with random weights (transformers, built from a config:
nothing is downloaded) prefills prompts that share a system prompt offline, the store
restarts, and a new prompt loads its prefix from disk; greedy generation equals a full
prefill token for token.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch

from .daemon import DaemonConfig, PlacementDaemon
from .keys import BlockKeys
from .layout import KVLayout
from .mount import mount
from .store import Store
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


class Engine:
    """Counts what a serving engine would: blocks loaded per tier, computed, and any wrong byte."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.loaded = self.computed = self.wrong = self.demoted = self.promoted = 0

    def serve(self, store: Store, tokens: np.ndarray, daemon: PlacementDaemon) -> None:
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
        store.put(keys[todo], fresh[torch.from_numpy(todo)])  # a full tier refuses; the put spills down
        before = daemon.counters["demoted_blocks"]
        daemon.run_once()  # a background thread in a server; here after each request, to be repeatable
        self.demoted += daemon.counters["demoted_blocks"] - before
        self.promoted = daemon.counters["promoted_blocks"] + daemon.counters["prefetched_blocks"]

    def summary(self) -> dict[str, Any]:
        return dict(blocks_loaded=self.loaded, blocks_computed=self.computed, loaded_blocks_bit_exact=self.wrong == 0,
                    hits_by_tier=self.hits, blocks_demoted=self.demoted, blocks_promoted=self.promoted)  # fmt: skip


def run_demo(
    requests: int = 8,
    tiers: list[str] | None = None,
    json_only: bool = False,
    model_dir: str | None = None,
    model: bool = True,
) -> int:
    t0 = time.perf_counter()
    urls = tiers or default_tiers()
    reqs = workload(requests)
    phases: dict[str, Any] = {}
    for phase in ("serve", "after_restart"):
        eng = Engine()
        with mount(*urls, layout=LAYOUT, model="demo-llama-8l") as store:
            daemon = store.daemon = PlacementDaemon(store, DaemonConfig(batch=16)).attach()
            for tokens in reqs:
                eng.serve(store, tokens, daemon)
            phases[phase] = {**eng.summary(), "store": store.stats()}
    summary = {"requests": requests, "block_bytes": LAYOUT.block_nbytes, "tiers": urls, **phases}
    summary["model"] = model_demo(model_dir or os.path.join(DEMO_DIR, "hf")) if model else {"skipped": "--no-model"}
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    if not json_only:
        _print_table(summary)
    print(json.dumps(summary, indent=None if not json_only else 2, default=str))
    ok = all(p["loaded_blocks_bit_exact"] for p in phases.values())
    return 0 if ok and summary["model"].get("outputs_match_full_prefill", True) else 1


def model_demo(root: str, block_size: int = 16) -> dict[str, Any]:
    """Offline prepopulation, a restart, then a prompt served from disk by a real (tiny) transformers model."""
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not installed (pip install 'kvbm-fs[transformers]')"}
    from .integration.transformers import generate_with_cache, mount_model, prepopulate

    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    llm = transformers.LlamaForCausalLM(config).eval()
    rng = np.random.default_rng(0)
    system = rng.integers(3, 256, 150)  # 9 full blocks shared by every prompt
    warm = [np.concatenate([system, rng.integers(3, 256, n)]).tolist() for n in (20, 45, 70)]
    prompt = np.concatenate([system, rng.integers(3, 256, 30)])
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(dir=root)  # a fresh tier each run: the numbers below are the same every time
    try:
        tier_urls = ("host://?capacity=16MiB", f"file://{work}/disk?capacity=64MiB")
        with mount_model(llm, *tier_urls, name="demo-tiny-llama", block_size=block_size) as store:
            pre = prepopulate(llm, store, warm)
        with mount_model(llm, *tier_urls, name="demo-tiny-llama", block_size=block_size) as store:  # restart
            out = generate_with_cache(llm, store, prompt, max_new_tokens=16, do_sample=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ids = torch.as_tensor(prompt)[None]
    full = llm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    return {
        "prepopulated_prompts": pre.prefilled,
        "prepopulated_blocks": pre.saved_blocks,
        "prompt_tokens": out.prompt_tokens,
        "loaded_tokens": out.loaded_tokens,
        "computed_tokens": out.computed_tokens,
        "outputs_match_full_prefill": bool(torch.equal(out.sequences, full)),
    }


def _print_table(s: dict[str, Any]) -> None:
    print(f"kvbm_fs demo: {s['requests']} requests, {fmt_size(s['block_bytes'])} blocks, tiers {s['tiers']}")
    for phase in ("serve", "after_restart"):
        p = s[phase]
        print(f"  {phase}: loaded {p['blocks_loaded']} blocks (bit-exact: {p['loaded_blocks_bit_exact']}), "
              f"computed {p['blocks_computed']}, hits by tier {p['hits_by_tier']}, demoted {p['blocks_demoted']}, "
              f"promoted {p['blocks_promoted']}")  # fmt: skip
        for t in p["store"]["tiers"]:
            print(f"    {t['name']:>6} [{t['medium']}] {t['blocks']:4d} blocks, "
                  f"{fmt_size(t['used_bytes'])} / {fmt_size(t['capacity_bytes'])}")  # fmt: skip
    m = s["model"]
    if "skipped" in m:
        print(f"  model: skipped ({m['skipped']})")
        return
    print(f"  model (tiny Llama, transformers): prepopulated {m['prepopulated_prompts']} prompts offline, restarted;"
          f" a new prompt of {m['prompt_tokens']} tokens loaded {m['loaded_tokens']} from disk, computed"
          f" {m['computed_tokens']}; outputs match a full prefill: {m['outputs_match_full_prefill']}")  # fmt: skip
