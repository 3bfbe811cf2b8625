"""Prefill->decode disaggregation on real vLLM servers: time to first token and per output token.

What it measures
    A random-weight Llama written locally (bench_vllm's model: 8 layers, hidden 512, 4 KV heads of 64
    dims, float32, 512 KiB per 32-token block) served by vLLM's CPU build as OpenAI-compatible servers,
    each in its own processes, side by side in one run:

    * ``single``: one plain engine (no connector) answering each request itself;
    * ``pd``: ``kvbm-fs pd-proxy`` in front of a prefill engine (``kv_producer``, ``async_save``
      false) and a decode engine (``kv_consumer``), the KV handed over through a ``kvbm-fs peer-serve``
      peer over NIXL UCX, or with ``--via mooncake`` through Mooncake Store (examples/pd_proxy.py
      starts them all).

    Each round sends ``--requests`` fresh prompts of ``--tokens`` tokens (never seen before by any
    engine) one at a time, streamed, asking for ``--output`` tokens (``ignore_eos``). ``ttft_s``: from
    sending to the first token's chunk (for ``pd``: the prefill request, then the decode engine's load
    and first token); ``tpot_s``: (last token - first token) / (tokens - 1). Medians over every
    request of every round; ``*_ratio`` = pd / single, paired within a round (median over rounds):
    above 1 means P/D is slower. Cases alternate first each round. ``decode`` holds the decode
    engine's counters over the timed rounds (blocks loaded from the peer, prompt tokens it computed).

Why
    P/D moves the prompt's KV between engines instead of computing it where it decodes; this says
    what that hand-over costs in first-token latency and whether decode steps get cheaper. On one
    small CPU machine P/D cannot isolate decode from prefill as separate GPUs do. Threads are bound
    explicitly (``VLLM_CPU_OMP_THREADS_BIND``; vLLM would otherwise reserve a core for a connector
    and give the plain engine one core fewer than the P/D engines): with
    ``--cores split`` (default) the prefill and decode engines on half the cores each and the single
    engine on all of them, as a P/D deployment splits its hardware; with ``--cores shared`` every
    engine on every core, where three engines' OpenMP threads contend for the same cores and slow
    everything several-fold (results/bench_pd_shared.json), so read it as a stress case.

Run ``.venv-vllm/bin/python benchmarks/bench_pd.py [--quick]``; prints one JSON object and writes it to
``benchmarks/results/bench_pd.json`` (``bench_pd.quick.json`` with ``--quick``: the tests' 2-layer model,
2 requests of 256 tokens, 1 round). Without vLLM or NIXL it prints ``{"skipped": ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import urllib.request
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

NAME = "bench_pd"
ROOT = Path(__file__).resolve().parents[1]


def example() -> Any:
    """examples/pd_proxy.py, whose helpers start the peer, the engines and the proxy."""
    spec = importlib.util.spec_from_file_location("pd_example", ROOT / "examples" / "pd_proxy.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pd_example"] = mod
    spec.loader.exec_module(mod)
    return mod


def unusable() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed here; run it in .venv-vllm (.ci/run-vllm builds it)"
    from kvbm_fs.nixl_api import available

    return None if available() else "NIXL is not installed here (the peer tier needs it)"


def stream(url: str, prompt: list[int], output: int) -> tuple[float, float, int]:
    """One streamed greedy completion: (seconds to the first token, seconds per later token, tokens)."""
    body = {"prompt": prompt, "max_tokens": output, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}  # fmt: skip
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    stamps: list[float] = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            n = len(json.loads(line[6:])["choices"][0].get("token_ids") or [])
            stamps += [time.perf_counter()] * n
    if len(stamps) != output:
        raise RuntimeError(f"asked for {output} tokens, got {len(stamps)}")
    return stamps[0] - t0, (stamps[-1] - stamps[0]) / max(1, output - 1), len(stamps)


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    import numpy as np

    ex = example()
    if args.quick:
        model = ex.tiny_model(scratch / "model")
    else:
        from bench_vllm import write_model

        model = write_model(scratch / "model", args.layers, args.tokens + args.output)
    rng = np.random.default_rng(0)
    cases = ("single", "pd")
    prompts = {c: [[rng.integers(3, 1000, args.tokens).tolist() for _ in range(args.requests)]
                   for _ in range(args.rounds + 1)] for c in cases}  # fmt: skip
    blocks = (args.rounds + 1) * args.requests * (args.tokens // ex.BLOCK + 1) + 16
    # vLLM reserves a core for a KV connector, so left to itself the plain engine would compute on one
    # core and the P/D engines on all: bind threads explicitly. "shared": every engine on every core;
    # "split" (default): the cores halved between prefill and decode, the single engine on all of them
    last = (os.cpu_count() or 2) - 1
    every = f"0-{last}"
    half = last // 2
    binds = {"single": every, "prefill": every, "decode": every}
    if args.cores == "split":
        binds.update(prefill=f"0-{half}", decode=f"{half + 1}-{last}")
    procs: dict[str, Any] = {}
    store = None
    t_start = time.perf_counter()
    try:
        store, tiers = ex.start_store(args.via, ex.block_nbytes(model), blocks)
        for name, kv in (("single", None), ("prefill", ex.kv_config("prefill", tiers["prefill"])),
                         ("decode", ex.kv_config("decode", tiers["decode"]))):  # fmt: skip
            with open(scratch / f"{name}.log", "w") as log:
                procs[name] = ex.start_engine(model, kv, log, env={"VLLM_CPU_OMP_THREADS_BIND": binds[name]})
        ex.wait_ready({k: procs[k] for k in ("single", "prefill", "decode")})
        procs["proxy"] = ex.start_proxy([procs["prefill"][1]], [procs["decode"][1]])
        started_s = time.perf_counter() - t_start
        target = {"single": procs["single"][1], "pd": procs["proxy"][1]}
        ttft: dict[str, list[list[float]]] = {c: [] for c in cases}
        tpot: dict[str, list[list[float]]] = {c: [] for c in cases}
        before: dict[str, float] = {}
        for r in range(args.rounds + 1):  # round 0 warms both paths up, untimed
            if r == 1:
                before = ex.metrics(procs["decode"][1])
            for c in cases if r % 2 else cases[::-1]:
                got = [stream(target[c], p, args.output) for p in prompts[c][r]]
                if r:
                    ttft[c].append([g[0] for g in got])
                    tpot[c].append([g[1] for g in got])
        after = ex.metrics(procs["decode"][1])
    finally:
        exits = {k: ex.stop(p) for k, (p, _) in reversed(procs.items())}
        if store is not None:
            exits[args.via] = ex.stop_store(store)

    def med(xs: list[list[float]]) -> float:
        return round(statistics.median(x for row in xs for x in row), 4)

    def ratio(xs: dict[str, list[list[float]]]) -> float:
        return round(statistics.median(statistics.median(p) / statistics.median(s)
                                       for p, s in zip(xs["pd"], xs["single"])), 3)  # fmt: skip

    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    return {
        "ttft_s": {c: med(ttft[c]) for c in cases},
        "tpot_s": {c: med(tpot[c]) for c in cases},
        "ttft_ratio": ratio(ttft),
        "tpot_ratio": ratio(tpot),
        "decode": {
            "loaded_blocks": d("vllm:kvbm_fs_loaded_blocks_total"),
            "load_failed_blocks": d("vllm:kvbm_fs_load_failed_blocks_total"),
            "prompt_tokens_computed": d("vllm:prompt_tokens_by_source_total[local_compute]"),
            "prompt_tokens_loaded": d("vllm:prompt_tokens_by_source_total[external_kv_transfer]"),
            "prompt_tokens": d("vllm:prompt_tokens_total"),
        },
        "via": args.via,
        "cores": binds,
        "config": {
            "requests": args.requests,
            "tokens": args.tokens,
            "output": args.output,
            "rounds": args.rounds,
            "layers": 2 if args.quick else args.layers,
            "block_bytes": ex.block_nbytes(model),
        },
        "servers_start_s": round(started_s, 1),
        "exit_codes": exits,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or NAME).splitlines()[0])
    ap.add_argument("--requests", type=int, default=4, help="requests per round (default 4)")
    ap.add_argument(
        "--tokens", type=int, default=960, help="prompt tokens per request (default 960; with --output, at most 1024)"
    )
    ap.add_argument("--output", type=int, default=32, help="output tokens per request (default 32)")
    ap.add_argument("--layers", type=int, default=8, help="model layers (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    ap.add_argument("--via", choices=("peer", "mooncake"), default="peer", help="the hand-over store (default peer)")
    ap.add_argument(
        "--cores",
        choices=("split", "shared"),
        default="split",
        help="engines' cores: prefill and decode on half each (default), or every engine on all",
    )
    add_scratch_arg(ap)
    add_output_args(ap, "small run: the tests' 2-layer model, 2 requests of 256 tokens, 1 round")
    args = ap.parse_args(argv)
    if args.tokens + args.output > 1024:  # the engines' --max-model-len (examples/pd_proxy.py ENGINE_ARGS)
        ap.error("--tokens + --output must be at most 1024")
    suffix = ("" if args.via == "peer" else f"_{args.via}") + ("" if args.cores == "split" else f"_{args.cores}")
    args.out = args.out or results_path(NAME, args.quick, suffix)
    if args.quick:
        args.requests, args.tokens, args.output, args.rounds = 2, 256, 8, 1
    why = unusable()
    if why is not None:
        return skip(why, benchmark=NAME)
    t0, before = time.perf_counter(), load_average()
    with scratch_dir(scratch_parent(args.dir), f"{NAME}-") as scratch:
        result = {"benchmark": NAME, **run(args, scratch)}
    result.update(loadavg_before=before, loadavg_after=load_average(), cpus=os.cpu_count())
    result["seconds"] = round(time.perf_counter() - t0, 1)
    emit(result, args.out, one_line=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
