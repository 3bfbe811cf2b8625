"""vLLM end to end: does loading a shared prefix from kvbm_fs beat recomputing it, on a real engine?

What it measures
    A random-weight Llama written locally (no download; default 8 layers, hidden 512, 8 heads, 4 KV
    heads of 64 dims, float32: 16 KiB of KV per token, 512 KiB per 32-token block) served by vLLM's CPU
    build in this process (V1 engine, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). ``--requests`` prompts
    (default 8) of ``--tokens`` tokens (default 1536) were served before ("prime" prompts, untimed);
    the timed requests share the first ``--shared`` (default 90 %, rounded down to whole blocks) of
    their tokens with one prime prompt each and end in a fresh random tail. Every timed batch asks
    for one token (``SamplingParams(max_tokens=1)``), so its wall time is the time to the first token
    of the whole batch; ``ttft_*`` are vLLM's own per-request first-token latencies
    (``RequestOutput.metrics.first_token_latency``, from arrival), median over the batch.

    Side by side in one run, each case with vLLM's own prefix cache reset before every timed batch
    (``llm.reset_prefix_cache()``), so a prefix is either recomputed or loaded from kvbm_fs:

    * ``recompute``: the connector off; vLLM prefills every token;
    * ``sync_host`` / ``async_host``: the KvbmFsConnector with a host tier over a disk tier, the prime
      prompts served by the same engine, so the shared blocks load from the host tier; ``sync``:
      ``async_load``/``async_save`` false (loads before the step's forward), ``async``: both true
      (the request waits off the step path while a background thread loads it);
    * ``sync_disk`` / ``async_disk``: a fresh engine on the disk tier the previous engine left behind
      (closing its store persisted the host tier there), so the shared blocks load from disk.

    Each timed round uses new tails (a tail is never a hit). ``*_s`` are medians over ``--rounds``
    rounds (default 3; ``recompute`` runs both the host and the disk rounds' batches);
    ``speedup_<case>`` is the recompute median over that case's median (above 1: loading is faster).
    ``hits`` holds the connector's own counters for each case's timed batches (tokens offered, blocks
    loaded, failed loads, requests loaded asynchronously) and where vLLM says its cached tokens came
    from. ``loadavg_*`` is ``os.getloadavg()`` before and after: the machine is
    small and shared, so read the ratios, not the seconds.

Why
    The connector's purpose is that prompts seen before stop being recomputed. A kvbm_fs block is read,
    verified (xxh3-128) and scattered into vLLM's KV cache; this says whether that, measured end to end
    through vLLM's scheduler, is faster than the prefill it replaces, from RAM and from disk, and what
    the async mode costs or saves on a machine whose every core also runs the forward.

Run ``python benchmarks/bench_vllm.py [--quick]`` where vLLM imports (``.ci/run-vllm`` builds
``.venv-vllm``: ``.venv-vllm/bin/python benchmarks/bench_vllm.py``); prints one JSON object and writes
it to ``benchmarks/results/bench_vllm.json`` (``bench_vllm.quick.json`` with ``--quick``: 4 layers,
4 requests of 512 tokens, 1 round). Without vLLM it prints ``{"skipped": ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    add_output_args,
    add_scratch_arg,
    emit,
    load_average,
    results_path,
    scratch_dir,
    scratch_parent,
    skip,
)

NAME = "bench_vllm"
BLOCK = 32  # vLLM's CPU block sizes are multiples of 32
MODEL: dict[str, Any] = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=4096,
    max_position_embeddings=4096,
    initializer_range=0.2,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
# --tiny: the vLLM tests' model (tests/test_vllm_e2e.py TINY_LLAMA: 2 layers, hidden 256, 4 heads, 2 KV heads)
TINY: dict[str, Any] = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
CASES = ("recompute", "sync_host", "async_host", "sync_disk", "async_disk")


def have_vllm() -> str | None:
    try:
        import vllm  # noqa: F401

        import kvbm_fs.integration.vllm  # noqa: F401
    except Exception as e:  # ImportError, or a vLLM build that does not match the installed torch
        return f"vLLM is not usable here ({type(e).__name__}: {e}); run it in .venv-vllm (.ci/run-vllm builds it)"
    return None


def write_model(d: Path, layers: int, tokens: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(**{**MODEL, "num_hidden_layers": layers, "max_position_embeddings": max(4096, tokens + 64)})
    ).float().save_pretrained(d, safe_serialization=True)
    return d


def prompts(n: int, tokens: int, shared: int, rounds: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    vocab = int(MODEL["vocab_size"])
    prime = [rng.integers(3, vocab, tokens).tolist() for _ in range(n)]

    def batch() -> list[list[int]]:
        return [p[:shared] + rng.integers(3, vocab, tokens - shared).tolist() for p in prime]

    warm = [rng.integers(3, vocab, tokens).tolist() for _ in range(n)]  # shares nothing with the others
    return {
        "prime": prime,
        "warm": warm,
        "host": [batch() for _ in range(rounds)],
        "disk": [batch() for _ in range(rounds)],
    }


class Engine:
    """One vLLM engine in this process, with or without the connector."""

    def __init__(
        self, model: Path, tokens: int, root: Path | None, mode: str | None, host_cap: str, warm: list[list[int]]
    ) -> None:
        from vllm import LLM

        kv = None
        if mode is not None:
            assert root is not None
            on = mode == "async"
            kv = {
                "kv_connector": "KvbmFsConnector",
                "kv_connector_module_path": "kvbm_fs.integration.vllm",
                "kv_role": "kv_both",
                "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {
                    "tiers": [f"host://?capacity={host_cap}", f"file://{root}?capacity=4GiB"],
                    "async_load": on,
                    "async_save": on,
                },
            }
        self.llm = LLM(
            model=str(model),
            skip_tokenizer_init=True,
            enforce_eager=True,
            block_size=BLOCK,
            max_model_len=tokens + 64,
            seed=0,
            dtype="float32",
            kv_transfer_config=kv,
            disable_log_stats=False,  # RequestOutput.metrics (first-token latency) and the hit sources
        )
        self.sched = self.worker = None
        if kv is not None:
            from kvbm_fs.integration import vllm as kvc

            eid = self.llm.llm_engine.vllm_config.kv_transfer_config.engine_id
            conns = {c.role.name: c for c in kvc.live_connectors() if c.engine_id == eid}
            self.sched, self.worker = conns["SCHEDULER"], conns["WORKER"]
        self.generate(warm)  # first-call overheads (kernels, allocations at full size) stay out of the timing

    def generate(self, batch: list[list[int]]) -> tuple[float, list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(max_tokens=1, temperature=0.0)
        t0 = time.perf_counter()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        ttft = [float(o.metrics.first_token_latency) for o in outs if o.metrics is not None]
        return wall, ttft

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in (self.sched, self.worker):
            if c is not None:
                for k, v in c.totals.data.items():
                    out[k] = out.get(k, 0) + v
        for m in self.llm.get_metrics():
            if m.name == "vllm:prompt_tokens_cached_by_source" and getattr(m, "value", 0):
                out[f"cached_tokens_{m.labels['source']}"] = float(m.value)
        return out

    def timed(self, batches: list[list[list[int]]]) -> dict[str, Any]:
        """Each batch after a prefix-cache reset; wall and median TTFT per round, and the counters' change."""
        before = self.counters()
        walls, ttfts = [], []
        for batch in batches:
            assert self.llm.reset_prefix_cache()
            wall, ttft = self.generate(batch)
            walls.append(wall)
            ttfts.append(statistics.median(ttft) if ttft else float("nan"))
        if self.worker is not None:
            self.worker.flush()
        after = self.counters()
        delta = {k: round(after[k] - before.get(k, 0), 6) for k in after if after[k] != before.get(k, 0)}
        return {"walls": walls, "ttfts": ttfts, "delta": delta}

    def stop(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()  # closes the connectors: the store persists to disk
        del self.llm
        self.sched = self.worker = None
        gc.collect()


HIT_KEYS = ("hit_tokens", "loaded_blocks", "load_failed_blocks", "async_load_requests", "saved_blocks")


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    shared = int(args.tokens * args.shared) // BLOCK * BLOCK
    ps = prompts(args.requests, args.tokens, shared, args.rounds)
    model = write_model(scratch / "model", args.layers, args.tokens)
    kv_per_block = 2 * args.layers * MODEL["num_key_value_heads"] * MODEL["head_dim"] * 4 * BLOCK
    # every prime and query block fits in the host tier, so the host cases never evict
    host_cap = f"{(args.requests * (args.tokens // BLOCK) * (2 + 2 * args.rounds) + 64) * kv_per_block}"
    res: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()

    e = Engine(model, args.tokens, None, None, host_cap, ps["warm"])
    try:
        res["recompute"] = e.timed(ps["host"] + ps["disk"])
    finally:
        e.stop()
    for mode in ("sync", "async"):
        root = scratch / f"disk-{mode}"
        e = Engine(model, args.tokens, root, mode, host_cap, ps["warm"])
        try:
            prime = e.timed([ps["prime"]])  # served before: stored into the host tier
            res[f"{mode}_host"] = e.timed(ps["host"])
            res[f"{mode}_host"]["prime"] = prime["delta"]
        finally:
            e.stop()  # persists the host tier into the disk tier
        e = Engine(model, args.tokens, root, mode, host_cap, ps["warm"])  # fresh: only the disk remembers
        try:
            res[f"{mode}_disk"] = e.timed(ps["disk"])
        finally:
            e.stop()

    med = {c: statistics.median(res[c]["walls"]) for c in CASES}
    ttft = {c: statistics.median(res[c]["ttfts"]) for c in CASES}
    out: dict[str, Any] = {}
    for c in CASES[1:]:
        out[f"speedup_{c}"] = round(med["recompute"] / med[c], 3)
    for c in CASES[1:]:
        out[f"ttft_speedup_{c}"] = round(ttft["recompute"] / ttft[c], 3)
    for c in CASES:
        out[f"{c}_s"] = round(med[c], 4)
        out[f"ttft_{c}_s"] = round(ttft[c], 4)
    out["rounds_s"] = {c: [round(w, 4) for w in res[c]["walls"]] for c in CASES}
    out["hits"] = {
        c: {k: v for k, v in res[c]["delta"].items() if k in HIT_KEYS or k.startswith("cached_tokens_")}
        for c in CASES[1:]
    }
    out["hits"]["prime_sync"] = {k: v for k, v in res["sync_host"]["prime"].items() if k in HIT_KEYS}
    out["load_s"] = {c: res[c]["delta"].get("load_s", 0.0) for c in CASES[1:]}
    out["model"] = {**{k: MODEL[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads")},
                    "layers": args.layers, "head_dim": MODEL["head_dim"], "dtype": "float32"}  # fmt: skip
    out["requests"], out["tokens"], out["shared_tokens"], out["rounds"] = (
        args.requests,
        args.tokens,
        shared,
        args.rounds,
    )
    out["block_tokens"], out["block_bytes"] = BLOCK, kv_per_block
    out["shared_bytes_per_batch"] = args.requests * (shared // BLOCK) * kv_per_block
    out["engines_and_runs_s"] = round(time.perf_counter() - t_start, 1)
    return out


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or NAME).splitlines()[0])
    ap.add_argument("--requests", type=int, default=8, help="requests per timed batch (default 8)")
    ap.add_argument("--tokens", type=int, default=1536, help="prompt tokens per request (default 1536)")
    ap.add_argument("--shared", type=float, default=0.9, help="fraction of a prompt shared with a prime prompt")
    ap.add_argument("--layers", type=int, default=8, help="model layers (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="timed batches per case (default 3)")
    ap.add_argument("--tiny", action="store_true", help="the vLLM tests' 2-layer hidden-256 model")
    add_scratch_arg(ap)
    add_output_args(ap, "small run: 4 layers, 4 requests of 512 tokens, 1 round")
    args = ap.parse_args(argv)
    args.out = args.out or results_path(NAME, args.quick)
    if args.quick:
        args.layers, args.requests, args.tokens, args.rounds = 4, 4, 512, 1
    if args.tiny:
        MODEL.update(TINY)
        args.layers = 2
    skipped = have_vllm()
    if skipped is not None:
        return skip(skipped)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process, one at a time
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
    parent = scratch_parent(args.dir)
    t0 = time.perf_counter()
    before, up0 = load_average(), uptime()
    with scratch_dir(parent, f"{NAME}-") as scratch:
        result = {"benchmark": NAME, **run(args, scratch)}
    result["loadavg_before"] = before
    result["loadavg_after"] = load_average()
    result["uptime_before"], result["uptime_after"] = up0, uptime()
    result["cpus"] = os.cpu_count()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    emit(result, args.out, one_line=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
