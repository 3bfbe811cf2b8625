"""A real vLLM engine stores into Mooncake, and a fresh engine in another process loads from it.

vLLM's default mode (each engine in its own process, its worker apart from its scheduler), with one
``mooncake://`` tier in the connector's public config. The pool's memory is a holder process's
segment, so blocks outlive the engine that stored them; the engines join with no segment.
Run by ``.ci/run-vllm``; skipped without vLLM or Mooncake.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/run-vllm runs this")
pytest.importorskip("mooncake.store", reason="the mooncake extra is not installed")

from test_vllm_e2e import BLOCK, ENGINE1, ENGINE2, ENGINE2_ALL_BLOCKS, kv_config, model, run_child

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
    one = run_child(tmp_path, model, tmp_path, phase=1, kv=kv)  # computes, stores into Mooncake
    two = run_child(tmp_path, model, tmp_path, phase=2, kv=kv)  # a new engine process: only Mooncake remembers
    assert two["engine2"] == one["engine2"]
    # prompts engine 1 computed from scratch (B; A salted with tenant-x) come out identical when loaded
    assert ENGINE2[1] == ENGINE1[1] and ENGINE2[3] == ENGINE1[2]
    assert two["engine2"][1] == one["engine1"][1] and two["engine2"][3] == one["engine1"][2]
    assert sum(two["cached"].values()) == ENGINE2_ALL_BLOCKS * BLOCK, two["cached"]  # every usable block loaded
