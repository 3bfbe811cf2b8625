"""Prepopulation throughput: ``kvbm-fs prepopulate --engine vllm`` against the same engine's plain prefill.

What it measures
    A random-weight Llama written locally (bench_vllm's model: default 8 layers, hidden 512, float32,
    32-token blocks of 512 KiB) on vLLM's CPU build in this process. A corpus of ``--prompts`` prompts
    (default 24) of 256 to ``--tokens`` tokens (default 1024), half of them behind one of four shared 256-token system
    prompts. Two cases in one run, same corpus, same batch size (``--batch-size``, default 8), each a
    prefill with ``max_tokens=1``:

    * ``plain``: the engine without a connector, ``generate`` over the corpus batch by batch;
    * ``prepopulate``: the prepopulate driver (``kvbm_fs.prepopulate.run``) over the vLLM engine with the
      kvbm_fs connector writing through to a disk tier: match first, priority order, batches, and a
      check after every batch that the blocks are stored.

    Each engine first serves one untimed warm-up prompt. Each round starts cold: vLLM's prefix cache is reset and (prepopulate) the namespace's blocks are
    deleted, so every round prefills and stores the whole corpus. ``*_tokens_per_s`` are medians over
    ``--rounds`` (default 3) of corpus prompt tokens over wall time; ``ratio`` is prepopulate's over
    plain's (1.0: storing costs nothing), the median of per-round ratios: the rounds interleave (order alternating, a fresh warmed-up
    engine each time: two vLLM engines with a connector cannot live in one process), so each pair
    sees about the same machine load;
    ``loadavg_*`` says how busy the shared machine was.

Run ``.venv-vllm/bin/python benchmarks/bench_prepopulate.py [--quick]``; prints one JSON object and
writes it to ``benchmarks/results/bench_prepopulate[.quick].json``. Without vLLM: ``{"skipped": ...}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
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

NAME = "bench_prepopulate"
BS = 32
ENGINE = {"enforce_eager": True, "max_model_len": 4096, "seed": 0, "dtype": "float32", "block_size": BS}


def corpus(n: int, tokens: int) -> Any:
    from kvbm_fs.prepopulate import Corpus, Prompt

    rng = np.random.default_rng(0)
    systems = [rng.integers(3, 1000, 256) for _ in range(4)]
    out = Corpus()
    for i in range(n):
        tail = rng.integers(3, 1000, int(rng.integers(256, tokens + 1)))
        toks = np.concatenate([systems[i % 4], tail[: max(1, tail.size - 256)]]) if i % 2 else tail
        out.prompts.append(Prompt(toks.astype(np.int64), f"bench:{i}"))
    return out


class Plain:
    """The engine without a connector: ``generate`` over the corpus batch by batch."""

    def __init__(self, model: Path) -> None:
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=str(model), skip_tokenizer_init=True, **ENGINE)
        self.one = SamplingParams(max_tokens=1, temperature=0.0)
        self.prefill([np.arange(3, 3 + 2 * BS)])  # warm-up

    def prefill(self, batch: list[np.ndarray]) -> None:
        from vllm.inputs import TokensPrompt

        self.llm.generate([TokensPrompt(prompt_token_ids=p.tolist()) for p in batch], self.one, use_tqdm=False)

    def round(self, c: Any, batch: int) -> float:
        self.llm.reset_prefix_cache()
        prompts = [p.tokens for p in c.prompts]
        t0 = time.perf_counter()
        for a in range(0, len(prompts), batch):
            self.prefill(prompts[a : a + batch])
        return sum(p.size for p in prompts) / (time.perf_counter() - t0)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()


class Warm:
    """The prepopulate driver over the vLLM engine with the connector writing through to a disk tier."""

    def __init__(self, model: Path, root: Path) -> None:
        from kvbm_fs.integration.vllm_prepopulate import VllmEngine
        from kvbm_fs.prepopulate import configure_parser

        yaml = root.parent / "engine.yaml"
        yaml.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in ENGINE.items()))
        flags = ["--model", str(model), "--tiers", f"file://{root}?capacity=4GiB", "--engine-args", str(yaml)]
        self.eng = VllmEngine.from_args(configure_parser(argparse.ArgumentParser()).parse_args(flags))
        self.eng.prefill([np.arange(3, 3 + 2 * BS)])  # warm-up, as plain's
        self.last: dict[str, Any] = {}

    def round(self, c: Any, batch: int) -> float:
        from kvbm_fs.engine import delete_namespace
        from kvbm_fs.prepopulate import run

        self.eng.llm.reset_prefix_cache()
        for ns in self.eng.namespaces:
            delete_namespace(self.eng.store, ns)
        t0 = time.perf_counter()
        rep = run(self.eng, c, batch_size=batch)
        dt = time.perf_counter() - t0
        self.last = {k: getattr(rep, k) for k in ("prefilled", "blocks", "blocks_stored", "bytes_stored", "failures")}
        return sum(p.tokens.size for p in c.prompts) / dt

    def close(self) -> None:
        self.eng.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or NAME).splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=1024, help="longest prompt (default 1024)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    add_scratch_arg(ap)
    add_output_args(ap, "small run: 4 layers, 12 prompts of up to 512 tokens, 2 rounds")
    args = ap.parse_args(argv)
    args.out = args.out or results_path(NAME, args.quick)
    if args.quick:
        args.layers, args.prompts, args.tokens, args.rounds = 4, 12, 512, 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_vllm import have_vllm, write_model

    skipped = have_vllm()
    if skipped is not None:
        return skip(skipped)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    t0, before = time.perf_counter(), load_average()
    c = corpus(args.prompts, args.tokens)
    with scratch_dir(scratch_parent(args.dir), f"{NAME}-") as scratch:
        model = write_model(scratch / "model", args.layers, args.tokens)
        base: list[float] = []
        pre: list[float] = []
        ratios: list[float] = []
        last: dict[str, Any] = {}
        for r in range(args.rounds):  # order alternating; one engine alive at a time (vLLM's connector state
            for case in ("warm", "plain") if r % 2 else ("plain", "warm"):  # is per process), each warmed up
                eng: Plain | Warm = Plain(model) if case == "plain" else Warm(model, scratch / "kv")
                try:
                    (base if case == "plain" else pre).append(eng.round(c, args.batch_size))
                    last = getattr(eng, "last", last)
                finally:
                    eng.close()
            ratios.append(pre[-1] / base[-1])
    p, w = statistics.median(base), statistics.median(pre)
    result = {
        "benchmark": NAME,
        "prompts": args.prompts,
        "tokens": int(sum(x.tokens.size for x in c.prompts)),
        "layers": args.layers,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "plain_tokens_per_s": round(p, 1),
        "prepopulate_tokens_per_s": round(w, 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(x, 3) for x in ratios],
        "plain_rounds": [round(x, 1) for x in base],
        "prepopulate_rounds": [round(x, 1) for x in pre],
        "last_report": last,
        "loadavg_before": before,
        "loadavg_after": load_average(),
        "cpus": os.cpu_count(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    emit(result, args.out, one_line=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
