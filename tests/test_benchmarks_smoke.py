"""The benchmarks run and print well-formed JSON (no timing is asserted here; speed lives in benchmarks/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvbm_fs.testing import require_nixl

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("script", "fields"),
    [
        ("bench_host.py", ["put_ratio", "get_ratio", "memcpy_gbps", "naive_dict_put_ratio"]),
        ("bench_hash_match.py", ["total_ms", "baseline_total_ms", "speedup"]),
        ("bench_disk_io.py", ["write_gbps_posix", "read_gbps_posix", "write_gbps_seq", "read_gbps_seq"]),
        ("bench_disk.py", ["write_ratio", "read_ratio", "naive_write_ratio", "lookup_hit_p50_us_per_key"]),
        ("bench_remote.py", ["get_speedup", "put_speedup"]),
        ("bench_peer.py", ["get_vs_tcp_batch", "get_fraction_of_raw_ucx", "put_fraction_of_raw_ucx"]),
        ("bench_mooncake.py", ["get_fraction_of_raw", "put_fraction_of_raw", "get_vs_pool", "put_vs_pool"]),
        ("bench_policies.py", ["default_ratio_5pct", "lru_ratio_5pct", "distinct_blocks"]),
        ("bench_policy_refs.py", ["distinct_blocks", "references"]),
        ("bench_policy_seeds.py", ["seed_cells"]),
        ("bench_policy_memory.py", ["slots", "warm_blocks"]),
        ("bench_sglang.py", []),  # {"skipped"} here; .ci/run-sglang has SGLang
        ("bench_ttft.py", ["host_speedup", "disk_speedup"]),
        ("bench_vllm.py", []),  # {"skipped"} here; .venv-vllm (.ci/run-vllm) has vLLM
        ("bench_prepopulate.py", []),  # {"skipped"} here, as bench_vllm
        ("bench_pd.py", []),  # {"skipped"} here, as bench_vllm
        ("bench_vllm_tiering.py", []),  # {"skipped"} here, as bench_vllm
        ("gpu_check.py", []),
        ("bench_gds.py", []),  # {"skipped"} without CUDA; test below runs its CPU dry run
    ],
)
def test_benchmark_quick_run_prints_json(script: str, fields: list[str], tmp_path: Path) -> None:
    args = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(tmp_path / "out.json")]
    if (
        script in ("bench_policies.py", "bench_policy_refs.py")
        and not (ROOT.parent / "shared" / "traces" / "synthetic_trace.jsonl").exists()
    ):
        args += ["--trace", str(_small_trace(tmp_path / "trace.jsonl"))]  # a checkout without ../shared
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(proc.stdout)
    for f in fields:
        assert isinstance(result[f], (int, float)) and result[f] > 0, f


def test_bench_gds_dry_run_on_cpu_reads_back_every_byte(tmp_path: Path) -> None:
    """bench_gds's CPU dry run: the same cases through NIXL POSIX; every get matched its source."""
    require_nixl()
    args = [sys.executable, str(ROOT / "benchmarks" / "bench_gds.py"), "--quick", "--device", "cpu",
            "--dir", str(tmp_path), "--out", str(tmp_path / "out.json")]  # fmt: skip
    result = json.loads(subprocess.run(args, capture_output=True, text=True, timeout=300, check=True).stdout)
    assert result["mismatches"] == [] and result["tier_stats"]["device_loads"] > 0
    for f in ("get_gds_vs_get_host", "put_dsum_vs_put_plain", "raw_gds_write_vs_raw_host_write"):
        assert result[f] > 0, f


def _small_trace(path: Path) -> Path:
    """A Mooncake-format trace: requests share system prompts and revisit earlier documents."""
    import random

    rng = random.Random(0)
    lines, next_id = [], 1000
    for i in range(400):
        prefix = list(range(rng.choice([0, 10, 20]), rng.choice([0, 10, 20]) + 4))
        doc = rng.randrange(50) * 10 if rng.random() < 0.6 else next_id
        next_id += 10
        ids = prefix + list(range(doc, doc + rng.randint(1, 6)))
        lines.append(json.dumps({"timestamp": i, "input_length": 512 * len(ids), "output_length": 4, "hash_ids": ids}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_policy_refs_every_simulated_policy_and_oracle_hint_stays_under_belady(tmp_path: Path) -> None:
    """Belady's MIN bounds every demand policy, the oracle-hinted ones included; a perfect
    one-hit-wonder filter in front of LRU never does worse than LRU itself (LRU's stack property)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_policy_refs as refs
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from kvbm_fs.replay import load_trace

    out = refs.run(load_trace(_small_trace(tmp_path / "trace.jsonl")))
    for frac, opt in out["belady"].items():
        for name, by_cap in out["hit_ratio"].items():
            assert by_cap[frac] <= opt + 1e-9, (name, frac)
        for name, by_cap in out["oracle_hints"].items():
            assert 0 < by_cap[frac]["hit_ratio"] <= opt + 1e-9, (name, frac)
        assert out["oracle_hints"]["lru_oracle_bypass"][frac]["hit_ratio"] >= out["hit_ratio"]["lru"][frac]
