"""Time to first token with the prompt's prefix in kvbm_fs, against a full prefill (transformers path).

What it measures
    A 4,096-token prompt (``--tokens``) on a Llama with random weights built from a local config
    (nothing is downloaded), float32 on CPU, for each model size in ``MODELS`` (``tiny``: the vLLM
    test model, 2 layers x hidden 256; ``small``: 8 layers x hidden 768, 52M parameters, a closer
    stand-in for a real model's prefill cost per token):

    * ``full``: ``model.generate(ids, max_new_tokens=1)`` — the engine recomputes the whole prompt;
    * ``host``: :func:`kvbm_fs.integration.transformers.load_prefix` from a store with one host tier
      holding the prompt's blocks (stored beforehand by a prefill, untimed), then the same ``generate``
      continued from the restored ``DynamicCache`` (it computes only the last, partial block: the block
      holding the prompt's last token is never loaded);
    * ``disk``: the same from a store whose only tier is a disk tier (``file://``, O_DIRECT where the
      filesystem allows it, so reads come from the device, not the page cache), opened once;
    * ``peer`` (when NIXL is installed): the same from a store whose only tier is another process's
      DRAM (``kvbm-fs peer-serve``, over NIXL UCX on loopback), every block verified on arrival.

    TTFT is the wall time of one such call, load and cache rebuild included; cases run interleaved
    in rounds (order rotated), and ``*_speedup`` is the median of per-round ``full / case`` ratios.
    Each round also checks that the first token equals the full prefill's (``first_token_match``).
    The issue's target on CPU: host speedup >= 10.

Why
    This is the product's promise in one number: a prompt seen before costs a load, not a prefill.
    Absolute times on this small shared machine mean little; the paired ratio is what to read.

Run ``python benchmarks/bench_ttft.py [--quick] [--tokens N] [--models tiny small]``; prints one JSON
object and writes it to ``benchmarks/results/bench_ttft.json`` (``.quick.json`` with ``--quick``:
512 tokens, the tiny model, 2 rounds). Without transformers it prints ``{"skipped": ...}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np
from _common import (
    add_output_args,
    add_scratch_arg,
    emit,
    load_average,
    paired_ratio,
    results_path,
    scratch_dir,
    scratch_parent,
    skip,
)

MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2
    ),
    "small": dict(
        num_hidden_layers=8, hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4
    ),
}


def build(name: str, tokens: int) -> Any:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=1024, max_position_embeddings=tokens + 64, **MODELS[name])
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def first_token(model: Any, ids: Any, cache: Any = None) -> tuple[int, float]:
    import torch

    from kvbm_fs.integration.transformers import cache_kwarg

    t0 = time.perf_counter()
    kw: dict[str, Any] = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 1, "do_sample": False}
    if cache is not None:
        kw[cache_kwarg(model)] = cache
    with torch.inference_mode():
        out = model.generate(ids, **kw)
    return int(out[0, -1]), time.perf_counter() - t0


def cached_first_token(model: Any, store: Any, ids: Any) -> tuple[int, float, int]:
    from kvbm_fs.integration.transformers import load_prefix

    t0 = time.perf_counter()
    cache, loaded = load_prefix(store, ids)
    tok, _ = first_token(model, ids, cache)
    return tok, time.perf_counter() - t0, loaded


def one_model(name: str, tokens: int, rounds: int, root: str) -> dict[str, Any]:
    import torch

    from kvbm_fs.integration.transformers import mount_model, save_prefill

    model = build(name, tokens)
    ids = torch.as_tensor(np.random.default_rng(1).integers(3, 1000, tokens))[None]
    with torch.inference_mode():
        kv = model(input_ids=ids, use_cache=True)
    cache = getattr(kv, "cache", None) or kv.past_key_values
    urls = {"host": "host://?capacity=2GiB", "disk": f"file://{root}/{name}?capacity=4GiB"}
    stores = {k: mount_model(model, u, name=f"bench-{name}") for k, u in urls.items()}
    peer = None
    try:
        peer = _peer_for(stores["host"], tokens)
        if peer is not None:
            stores["peer"] = mount_model(model, peer[1], name=f"bench-{name}")
        for st in stores.values():
            save_prefill(st, ids, cache)
        want, _ = first_token(model, ids)  # warm-up (and the reference token)
        times: dict[str, list[float]] = {"full": [], **{k: [] for k in stores}}
        loaded: dict[str, int] = {}
        match = True
        cases = list(times)
        for r in range(rounds):
            k = r % len(cases)
            for case in cases[k:] + cases[:k]:
                if case == "full":
                    tok, dt = first_token(model, ids)
                else:
                    tok, dt, loaded[case] = cached_first_token(model, stores[case], ids)
                times[case].append(dt)
                match &= tok == want
        nbytes = stores["host"].default_namespace.block_nbytes  # type: ignore[union-attr]
    finally:
        for st in stores.values():
            st.close()
        if peer is not None:
            peer[0].send_signal(__import__("signal").SIGTERM)
            peer[0].wait(30)
    out: dict[str, Any] = {"layers": MODELS[name]["num_hidden_layers"], "hidden": MODELS[name]["hidden_size"]}
    out.update({f"{k}_ttft_ms": round(statistics.median(v) * 1000, 2) for k, v in times.items()})
    for case in [c for c in times if c != "full"]:
        out[f"{case}_speedup"] = round(paired_ratio(times[case], times["full"]), 2)
        out[f"{case}_loaded_tokens"] = loaded.get(case, 0)
    out["kv_bytes_loaded"] = loaded.get("host", 0) // 16 * nbytes
    out["first_token_match"] = bool(match)
    return out


def _peer_for(store: Any, tokens: int) -> tuple[Any, str] | None:
    """A ``kvbm-fs peer-serve`` process sized for the prompt's blocks, and its URL (None without NIXL)."""
    import json
    import subprocess

    from kvbm_fs.nixl_api import available

    if not available():
        return None
    ns = store.default_namespace
    capacity = (tokens // ns.layout.block_size + 4) * ns.block_nbytes
    cmd = [sys.executable, "-m", "kvbm_fs", "peer-serve", "--capacity", str(capacity), "--block-bytes",
           str(ns.block_nbytes)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, next(json.loads(line) for line in proc.stdout if line.startswith("{"))["url"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS))
    add_scratch_arg(ap)
    add_output_args(ap, "small run: 512 tokens, the tiny model, 2 rounds")
    a = ap.parse_args()
    try:
        import transformers  # noqa: F401
    except ImportError:
        skip("transformers is not installed", benchmark="bench_ttft")
        return 0
    import torch

    tokens = a.tokens or (512 if a.quick else 4096)
    rounds = a.rounds or (2 if a.quick else 5)
    models = a.models or (["tiny"] if a.quick else ["tiny", "small"])
    scratch = scratch_parent(a.dir)
    res: dict[str, Any] = {"benchmark": "bench_ttft", "quick": a.quick, "prompt_tokens": tokens, "rounds": rounds}
    res["torch_threads"] = torch.get_num_threads()
    with scratch_dir(scratch, "bench_ttft-") as root:
        for name in models:
            res[name] = one_model(name, tokens, rounds, str(root))
    first = res[models[0]]
    res["host_speedup"], res["disk_speedup"] = first["host_speedup"], first["disk_speedup"]
    if "peer_speedup" in first:
        res["peer_speedup"] = first["peer_speedup"]
    res["target_host_speedup"] = 10.0
    res["load_average"] = load_average()
    emit(res, a.out or results_path("bench_ttft", a.quick), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
