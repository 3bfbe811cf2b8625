"""The runnable examples run and print what they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kvbm_fs.testing import require_nixl

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    ).stdout


def test_quickstart_loads_what_it_stored() -> None:
    assert "loaded KV equals the stored KV: True" in _run("examples/quickstart.py")


def test_gpu_disk_example_restarts_and_loads_through_the_device_path(tmp_path: Path) -> None:
    require_nixl()
    out = _run("examples/gpu_disk.py", "--stand-in", "--dir", str(tmp_path))
    assert "matched 64 of 64 blocks" in out and "loaded == stored: True" in out
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["device_loads"] == 64 and stats["device_host_loads"] == 0


def test_peer_example_shares_a_prefix_between_two_processes_through_a_third() -> None:
    require_nixl()
    out = _run("examples/peer_share.py")
    assert "A stored 18 blocks in the peer" in out
    assert "B matched 16 of 20 blocks, by tier {'peer': 16}" in out and "B loaded A's KV: True" in out


def test_router_index_finds_the_longest_prefix_from_kv_events_alone() -> None:
    out = _run("examples/router_index.py")
    assert "after A demoted to disk: ('A', 8" in out and "'STORAGE'" in out
    assert "after A shut down: ('B', 4" in out
