"""The benchmarks run and print well-formed JSON (no timing is asserted here; speed lives in benchmarks/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("script", "fields"),
    [
        ("bench_host.py", ["put_ratio", "get_ratio", "memcpy_gbps", "naive_dict_put_ratio"]),
        ("bench_hash_match.py", ["total_ms", "baseline_total_ms", "speedup"]),
        ("bench_disk_io.py", ["write_gbps_posix", "read_gbps_posix", "write_gbps_seq", "read_gbps_seq"]),
        ("bench_disk.py", ["write_ratio", "read_ratio", "naive_write_ratio", "lookup_hit_p50_us_per_key"]),
        ("bench_remote.py", ["get_speedup", "put_speedup"]),
        ("bench_policies.py", ["default_ratio_5pct", "lru_ratio_5pct", "distinct_blocks"]),
        ("gpu_check.py", []),
    ],
)
def test_benchmark_quick_run_prints_json(script: str, fields: list[str], tmp_path: Path) -> None:
    args = [sys.executable, str(ROOT / "benchmarks" / script), "--quick"]
    if script != "gpu_check.py":
        args += ["--out", str(tmp_path / "out.json")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(proc.stdout)
    for f in fields:
        assert isinstance(result[f], (int, float)) and result[f] > 0, f
