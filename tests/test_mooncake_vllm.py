"""A real vLLM engine stores into Mooncake, and a fresh engine in another process loads from it.

One ``mooncake://`` tier in the connector's public config. Engine 1 runs in this process and computes
every prompt (the pool is empty); engine 2 runs in vLLM's default mode in a new process (its worker
apart from its scheduler, which opens the tier itself). The pool's memory is a holder process's
segment, so blocks outlive the engine that stored them; the engines join with no segment.
Run by ``.ci/run-vllm``; skipped without vLLM or Mooncake.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/run-vllm runs this")
if importlib.util.find_spec("mooncake") is None:  # not imported here: the tier pins the host's rdma-core first
    pytest.skip("the mooncake extra is not installed", allow_module_level=True)

from test_vllm_e2e import BLOCK, ENGINE2, ENGINE2_ALL_BLOCKS, generate, kv_config, model, new_engine, run_child, stop

from kvbm_fs.tiers.mooncake import MooncakeMaster

__all__ = ["model"]  # the module-scoped tiny random-weight Llama, a fixture of test_vllm_e2e

pytestmark = pytest.mark.slow

HOLDER = textwrap.dedent(
    """
    import sys
    from kvbm_fs.registry import open_tier
    t = open_tier(sys.argv[1] + "&segment=128MiB", block_nbytes=4096)
    print("holding", flush=True)
    sys.stdin.read()
    t.close()
    """
)


@pytest.fixture
def pool() -> Iterator[str]:
    """A master and a holder process lending 128 MiB; yields the URL engines mount (no segment of their own)."""
    with MooncakeMaster() as m:
        url = m.url + "&prefix=vllm"
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
            yield url + "&segment=0&local_buffer=16MiB"
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            assert holder.wait(60) == 0


def test_an_engine_stores_into_mooncake_and_a_fresh_engine_process_loads_it(
    model: Path, tmp_path: Path, pool: str
) -> None:
    kv: dict[str, Any] = kv_config(tmp_path)
    kv["kv_connector_extra_config"] = {"tiers": [pool]}
    llm = new_engine(model, kv)
    computed = generate(llm, ENGINE2)  # nothing in the pool yet: every prompt computed, and stored
    stop(llm)
    two = run_child(tmp_path, model, tmp_path, phase=2, kv=kv)  # a new engine process: only Mooncake remembers
    assert two["engine2"] == computed
    assert sum(two["cached"].values()) == ENGINE2_ALL_BLOCKS * BLOCK, two["cached"]  # every usable block loaded
