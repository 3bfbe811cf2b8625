"""Hybrid models through the KvbmFsConnector (SupportsHMA): a tiny Gemma-3-style model (3 sliding-window
layers, 1 global) under real vllm-cpu 0.32 keeps vLLM's hybrid KV-cache manager on with the connector,
stores each KV-cache group in its own namespace (sliding-window groups: only the window before the
prompt's end), and a fresh engine loads it from disk with greedy outputs identical to connector-off.
Mamba groups without vLLM's Mamba prefix caching are refused at start-up (a real Mamba hybrid:
tests/test_vllm_mamba.py). Run with ``.ci/run-vllm``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/run-vllm runs these tests in .venv-vllm")

from test_vllm_e2e import BLOCK, DISK_CAP, connectors, generate, kv_config, new_engine, stop

from kvbm_fs import ConfigError, Namespace
from kvbm_fs.integration.vllm import layout as kvc_layout

pytestmark = pytest.mark.slow

WINDOW = 128  # tokens; prompts are longer
TINY_GEMMA3: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    layer_types=["sliding_attention"] * 3 + ["full_attention"],
    sliding_window=WINDOW,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    query_pre_attn_scalar=64,
    vocab_size=1000,
    max_position_embeddings=2048,
    initializer_range=0.2,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
WINDOW_BLOCKS = -(-(WINDOW - 1) // BLOCK)  # blocks vLLM needs before a prefix's end: 4

_rng = np.random.default_rng(4321)
P: list[int] = _rng.integers(3, 1000, 600).tolist()  # 18 full blocks, 18 usable
Q: list[int] = _rng.integers(3, 1000, 400).tolist()  # 12 full blocks, 12 usable
TAIL: list[int] = _rng.integers(3, 1000, 50).tolist()
ENGINE1: list[tuple[list[int], str | None]] = [(P, None), (Q, None)]
ENGINE2: list[tuple[list[int], str | None]] = [(P + TAIL, None), (Q, None), (P, None)]
HIT_BLOCKS = 18 + 12 + 18  # per group; a windowed group loads only its last WINDOW_BLOCKS of each


def _layer_block_bytes() -> int:
    c = TINY_GEMMA3
    return BLOCK * 2 * c["num_key_value_heads"] * c["head_dim"] * 4  # K and V, float32


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    d = tmp_path_factory.mktemp("tiny-gemma3")
    torch.manual_seed(0)
    Gemma3ForCausalLM(Gemma3TextConfig(**TINY_GEMMA3)).float().save_pretrained(d, safe_serialization=True)
    return d


def _hybrid_on(llm: Any) -> int:
    """The number of KV-cache groups vLLM runs with; asserts the hybrid manager stayed on."""
    cfg = llm.llm_engine.vllm_config
    assert not cfg.scheduler_config.disable_hybrid_kv_cache_manager, "vLLM turned the hybrid KV manager off"
    return len(connectors(llm)["SCHEDULER"].groups) if cfg.kv_transfer_config else 0


@pytest.fixture(scope="module")
def runs(gemma: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Connector off (the reference), then engine 1 stores through kvbm_fs and shuts down."""
    llm = new_engine(gemma)
    try:
        assert not llm.llm_engine.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
        ref = {"engine1": generate(llm, ENGINE1), "engine2": generate(llm, ENGINE2)}
    finally:
        stop(llm)
    root = tmp_path_factory.mktemp("kvbm-hma") / "disk"
    llm = new_engine(gemma, kv_config(root))
    try:
        groups = _hybrid_on(llm)
        outs = generate(llm, ENGINE1)
        c = connectors(llm)
        c["WORKER"].flush()
        sched = c["SCHEDULER"]
        spec = [(g.kind, g.window, g.window_blocks, len(g.layer_names)) for g in sched.groups]
        assert sched.scheduler is not None
        ns = [sched.scheduler.groups[g][1][0] for g in range(groups)]  # rank 0 of each group
        w = dict(c["WORKER"].totals.reduce())
    finally:
        stop(llm)
    return {"ref": ref, "outs": outs, "root": root, "groups": groups, "spec": spec, "ns": ns, "worker": w}


def test_hybrid_manager_stays_on_and_each_group_is_stored_in_its_own_namespace(runs: dict[str, Any]) -> None:
    assert runs["outs"] == runs["ref"]["engine1"]
    assert runs["groups"] > 1
    kinds = [k for k, *_ in runs["spec"]]
    assert "full" in kinds and "swa" in kinds
    assert all(win == WINDOW and wb == WINDOW_BLOCKS for k, win, wb, _ in runs["spec"] if k == "swa")
    ns: list[Namespace] = runs["ns"]
    assert len({n.id for n in ns}) == len(ns)  # a group's blocks never match another group's
    assert all(f"/swa{WINDOW}" in n.model or n.model.endswith("/full") for n in ns)
    # bytes stored: every full-attention block, only the window before the prompt's end of a windowed group
    layers = {k: sum(n for kk, _, _, n in runs["spec"] if kk == k) for k in ("full", "swa")}
    blocks = [len(t) // BLOCK for t, _ in ENGINE1]
    usable = [(len(t) - 1) // BLOCK for t, _ in ENGINE1]
    want = sum(layers["full"] * b + layers["swa"] * (b - max(0, u - WINDOW_BLOCKS)) for b, u in zip(blocks, usable))
    stored = runs["worker"]["saved_bytes"]
    full_kv = sum(blocks) * TINY_GEMMA3["num_hidden_layers"] * _layer_block_bytes()
    assert stored == want * _layer_block_bytes()
    assert stored < full_kv
    print(f"\nGemma-3-style: stored {stored} B for {len(ENGINE1)} prompts; full-length KV would be {full_kv} B")


def _engine2(gemma: Path, root: Path) -> tuple[list[list[int]], dict[str, Any], dict[str, Any]]:
    llm = new_engine(gemma, kv_config(root))
    try:
        assert _hybrid_on(llm) > 1
        outs = generate(llm, ENGINE2)
        c = connectors(llm)
        c["WORKER"].flush()
        return outs, dict(c["SCHEDULER"].totals.reduce()), dict(c["WORKER"].totals.reduce())
    finally:
        stop(llm)


def test_fresh_engine_loads_each_groups_blocks_from_disk(runs: dict[str, Any], gemma: Path, tmp_path: Path) -> None:
    root = tmp_path / "disk"
    shutil.copytree(runs["root"], root)
    outs, s, w = _engine2(gemma, root)
    assert outs == runs["ref"]["engine2"], "loaded hybrid KV changed the greedy outputs"
    assert s["hit_tokens"] == HIT_BLOCKS * BLOCK
    layers = {k: sum(n for kk, _, _, n in runs["spec"] if kk == k) for k in ("full", "swa")}
    per_group = {k: sum(1 for kk, *_ in runs["spec"] if kk == k) for k in ("full", "swa")}
    want = per_group["full"] * HIT_BLOCKS + per_group["swa"] * 3 * WINDOW_BLOCKS
    assert w["loaded_blocks"] == want and w["load_failed_blocks"] == 0
    assert w["loaded_bytes"] == (layers["full"] * HIT_BLOCKS + layers["swa"] * 3 * WINDOW_BLOCKS) * _layer_block_bytes()
    assert w["async_load_requests"] == 3  # a hybrid load runs in the background: vLLM can then fail it whole


def test_corrupt_windowed_blocks_are_recomputed(runs: dict[str, Any], gemma: Path, tmp_path: Path) -> None:
    from kvbm_fs.tiers.disk import HEADER_PAGE, DiskTier

    root = tmp_path / "disk"
    shutil.copytree(runs["root"], root)
    swa = next(i for i, (k, *_) in enumerate(runs["spec"]) if k == "swa")
    ns: Namespace = runs["ns"][swa]
    keys = ns.keys_for_tokens(np.asarray(Q))[-2:-1]  # inside the window before Q's end
    tier = DiskTier(root, ns.block_nbytes, DISK_CAP)
    try:
        (rec,) = tier.index.records(keys.ns, keys.hashes)
        assert rec is not None
        seg, off = tier._locate(rec.slot)
        fd = os.open(tier._segment_path(seg), os.O_RDWR)
        try:
            for pos in np.random.default_rng(7).integers(0, ns.block_nbytes, 4).tolist():
                at = off + HEADER_PAGE + int(pos)
                os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x5A]), at)
        finally:
            os.close(fd)
    finally:
        tier.close()
    outs, s, w = _engine2(gemma, root)
    assert outs == runs["ref"]["engine2"], "a corrupt windowed block was served instead of recomputed"
    assert w["load_failed_blocks"] == 1, w
    assert s["hit_tokens"] == HIT_BLOCKS * BLOCK  # offered once; Q was then recomputed whole


def test_an_engine_in_vllms_multiprocess_mode_loads_the_hybrid_prefixes(
    runs: dict[str, Any], gemma: Path, tmp_path: Path
) -> None:
    """vLLM's default mode (VLLM_ENABLE_V1_MULTIPROCESSING=1) in a new process: the scheduler, apart
    from its worker, matches every group against the disk tier it opens itself."""
    import json
    import subprocess
    import sys

    from test_vllm_e2e import CHILD, SAMPLING

    root = tmp_path / "disk"
    shutil.copytree(runs["root"], root)
    script, args, out = tmp_path / "child.py", tmp_path / "args.json", tmp_path / "out.json"
    script.write_text(CHILD)
    spec = {"engine1": [], "engine2": ENGINE2, "max_tokens": SAMPLING.max_tokens, "block": BLOCK}
    args.write_text(json.dumps({**spec, "model": str(gemma), "kv": kv_config(root), "phase": 2, "out": str(out)}))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(args)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["engine2"] == runs["ref"]["engine2"]
    assert got["cached"] == {"disk": HIT_BLOCKS * BLOCK}, got["cached"]


def _fake_config(spec: Any) -> Any:
    return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec, layer_names=["model.layers.0"])])


def test_mamba_groups_are_stored_only_under_vllms_mamba_prefix_caching() -> None:
    """vLLM's real Mamba spec: per-request state (mamba_cache_mode 'none') and speculative state blocks
    are refused; under 'align' the group stores one state block at a prefix's end (tests/test_vllm_mamba.py
    runs a real Mamba hybrid)."""
    import torch
    from vllm.v1.kv_cache_interface import MambaSpec

    spec = MambaSpec(block_size=BLOCK, shapes=((4, 8),), dtypes=(torch.float32,))
    with pytest.raises(ConfigError, match=r"Mamba / linear-attention.*enable_prefix_caching=True"):
        kvc_layout.kv_groups(SimpleNamespace(), _fake_config(spec), "CPU_ATTN")
    spec = MambaSpec(block_size=BLOCK, shapes=((4, 8),), dtypes=(torch.float32,), mamba_cache_mode="align")
    (g,) = kvc_layout.kv_groups(SimpleNamespace(), _fake_config(spec), "CPU_ATTN")
    assert (g.kind, g.window_blocks, g.state_nbytes, g.layout.block_nbytes) == ("mamba", 1, 128, 128)
    assert g.tag.startswith("g0/mamba-")
    spec = MambaSpec(
        block_size=BLOCK, shapes=((4, 8),), dtypes=(torch.float32,), mamba_cache_mode="align", num_speculative_blocks=1
    )
    with pytest.raises(ConfigError, match="speculative"):
        kvc_layout.kv_groups(SimpleNamespace(), _fake_config(spec), "CPU_ATTN")
    # vLLM raises a hybrid's block until the attention page holds the state: not always a power of two
    spec = MambaSpec(block_size=3 * BLOCK, shapes=((4, 8),), dtypes=(torch.float32,), mamba_cache_mode="align")
    with pytest.raises(ConfigError, match=f"96-token blocks.*block_size={4 * BLOCK}"):
        kvc_layout.kv_groups(SimpleNamespace(), _fake_config(spec), "CPU_ATTN")


def test_scheduler_publishes_the_events_of_the_group_the_connector_names_the_engine_by(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model with no full-attention group whose group 0 is Mamba: the connector names the engine by
    its sliding-window group (layout.primary_group), and the scheduler publishes that group's blocks
    as vLLM KV events, not the Mamba group's (vLLM's real spec classes, no engine)."""
    import torch
    from vllm.distributed.kv_events import BlockRemoved
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, MambaSpec, SlidingWindowSpec

    from kvbm_fs import EventKind
    from kvbm_fs.integration.vllm import connector as kvc_connector
    from kvbm_fs.integration.vllm.metadata import KvbmFsWorkerMeta

    mamba = MambaSpec(block_size=BLOCK, shapes=((8, 8),), dtypes=(torch.float32,), mamba_cache_mode="align")
    swa = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32, sliding_window=64)
    kcc = KVCacheConfig(
        num_blocks=8,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["l0"], mamba), KVCacheGroupSpec(["l1"], swa)],
    )
    tc = SimpleNamespace(
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        engine_id="primary-group-test",
        kv_connector_extra_config={"tiers": ["host://?capacity=1MiB"], "model": "tiny-mamba-swa"},
    )
    cfg = SimpleNamespace(
        kv_transfer_config=tc,
        cache_config=SimpleNamespace(cache_dtype="auto"),
        model_config=SimpleNamespace(model="tiny-mamba-swa"),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
    )
    monkeypatch.setattr(kvc_connector, "attention_backend", lambda *a, **k: "CPU_ATTN")
    conn = kvc_connector.KvbmFsConnector(cfg, KVConnectorRole.SCHEDULER, kcc)
    try:
        assert [g.kind for g in conn.groups] == ["mamba", "swa"]
        assert kvc_layout.primary_group(conn.groups) == 1 and "#g1/swa64" in conn.namespace.model
        sched = conn.scheduler
        assert sched is not None
        ids = [nss[0].id for _, nss in sched.groups]
        removed = EventKind.REMOVED.value
        events = [(removed, "host", "host", False, ids[g], np.array([10 + g], np.uint64)) for g in (0, 1)]
        conn.update_connector_output(
            SimpleNamespace(kv_connector_worker_meta=KvbmFsWorkerMeta(events=events), invalid_block_ids=set())
        )
        published = list(conn.take_events())
        assert [type(e) for e in published] == [BlockRemoved]
        assert published[0].block_hashes == [11], "the sliding-window group's block, not the Mamba state's"
    finally:
        conn.shutdown()
