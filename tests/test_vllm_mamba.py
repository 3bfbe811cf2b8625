"""Mamba hybrids through the KvbmFsConnector: a tiny Granite-4-style model (one Mamba2 layer, one
attention layer, real random weights) under real vllm-cpu 0.32 with vLLM's Mamba prefix caching
("align": the state kept at block boundaries). The connector stores the state vLLM hands off at a
boundary next to the attention blocks, each group in its own namespace; an engine in another process
loads both from disk with greedy outputs identical to connector-off; a corrupt state block is
recomputed; a state swapped for another prompt's changes the outputs (the loaded state is used).
A tiny Qwen3-Next (gated delta net + attention, bfloat16: vllm-cpu's GDN needs it) loads its state
too. Run with ``.ci/run-vllm``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/run-vllm runs these tests in .venv-vllm")

from test_vllm_e2e import DISK_CAP, connectors, generate, kv_config, new_engine, random_model, stop

from kvbm_fs import Namespace
from kvbm_fs.mount import mount

pytestmark = pytest.mark.slow

BLOCK = 64  # vLLM raises a Granite hybrid's attention block to 64 so that its page holds the Mamba state
# vllm-cpu's Mamba2 prefill cannot export a boundary state from inside a chunk (docs/vllm.md, Mamba):
# chunks of one block, as the connector's start-up warning says
ENGINE: dict[str, Any] = dict(enable_prefix_caching=True, max_num_batched_tokens=BLOCK, block_size=BLOCK)
TINY_GRANITE: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    layer_types=["mamba", "attention"],
    num_local_experts=0,
    shared_intermediate_size=512,
    mamba_n_heads=8,
    mamba_d_head=64,
    mamba_n_groups=1,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_expand=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=2048,
    initializer_range=0.2,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
PAGE = BLOCK * 2 * 2 * 64 * 4  # one layer-block of the attention group (K and V, 2 heads of 64, fp32)
STATE = (3 * 544 + 8 * 64 * 16) * 4  # the Mamba layer's conv + ssm state, fp32 (vLLM pads it to PAGE)

_rng = np.random.default_rng(77)
P: list[int] = _rng.integers(3, 1000, 200).tolist()  # 3 full blocks; vLLM keeps the state at 192
Q: list[int] = _rng.integers(3, 1000, 150).tolist()  # 2 full blocks; the state at 128
TAIL: list[int] = _rng.integers(3, 1000, 40).tolist()
ENGINE1: list[tuple[list[int], str | None]] = [(P, None), (Q, None)]
ENGINE2: list[tuple[list[int], str | None]] = [(P + TAIL, None), (Q, None), (P, None)]
HIT_TOKENS = (3 + 2 + 3) * BLOCK


@pytest.fixture(scope="module")
def granite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model(tmp_path_factory.mktemp("tiny-granite-hybrid"), "GraniteMoeHybrid", TINY_GRANITE)


@pytest.fixture(scope="module")
def runs(granite: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Connector and prefix caching off (the reference: every prompt computed whole), then engine 1 stores."""
    llm = new_engine(granite, **{**ENGINE, "enable_prefix_caching": False})
    try:
        ref = {"engine1": generate(llm, ENGINE1), "engine2": generate(llm, ENGINE2)}
    finally:
        stop(llm)
    root = tmp_path_factory.mktemp("kvbm-mamba") / "disk"
    llm = new_engine(granite, kv_config(root), **ENGINE)
    try:
        assert llm.llm_engine.vllm_config.cache_config.mamba_cache_mode == "align"
        assert not llm.llm_engine.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
        outs = generate(llm, ENGINE1)
        c = connectors(llm)
        c["WORKER"].flush()
        sched = c["SCHEDULER"]
        assert sched.scheduler is not None
        spec = [(g.kind, g.window_blocks, g.layout.block_nbytes) for g in sched.groups]
        ns = [sched.scheduler.groups[g][1][0] for g in range(len(spec))]
        w = dict(c["WORKER"].totals.reduce())
    finally:
        stop(llm)
    return {"ref": ref, "outs": outs, "root": root, "spec": spec, "ns": ns, "worker": w}


def test_state_at_block_boundaries_is_stored_beside_the_attention_blocks(runs: dict[str, Any]) -> None:
    assert runs["outs"] == runs["ref"]["engine1"]
    assert sorted(k for k, *_ in runs["spec"]) == ["full", "mamba"]
    assert all(wb == 1 and nb == PAGE for k, wb, nb in runs["spec"] if k == "mamba")
    ns: list[Namespace] = runs["ns"]
    assert len({n.id for n in ns}) == 2  # the state never matches an attention block
    assert any("/mamba-" in n.model for n in ns) and any(n.model.endswith("/full") for n in ns)
    # per prompt: every full attention block, and the one state vLLM keeps (at the last block boundary
    # before the prompt's last token), stored padded to the attention page
    per_prompt = [len(t) // BLOCK * PAGE + PAGE for t, _ in ENGINE1]
    assert runs["worker"]["saved_blocks"] == 3 + 1 + 2 + 1
    assert runs["worker"]["saved_bytes"] == sum(per_prompt)
    print(f"\nGranite-4-style: stored {per_prompt} B per prompt (state {STATE} B of each {PAGE} B state block)")


CHILD = r"""
import json, sys

def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    a = json.load(open(sys.argv[1]))
    llm = LLM(model=a["model"], skip_tokenizer_init=True, enforce_eager=True, max_model_len=1024, seed=0,
              dtype="float32", kv_transfer_config=a["kv"], disable_log_stats=False, **a["engine"])
    ps = [TokensPrompt(prompt_token_ids=t) for t, _ in a["prompts"]]
    outs = llm.generate(ps, SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False)
    cached = {m.labels["source"]: m.value for m in llm.get_metrics()
              if m.name == "vllm:prompt_tokens_cached_by_source" and m.value}
    llm.llm_engine.engine_core.shutdown()
    json.dump({"outs": [list(o.outputs[0].token_ids) for o in outs], "cached": cached}, open(a["out"], "w"))


if __name__ == "__main__":  # vLLM spawns its engine core, which imports this module again
    main()
"""


def test_an_engine_in_another_process_loads_state_and_attention_from_disk(
    runs: dict[str, Any], granite: Path, tmp_path: Path
) -> None:
    """vLLM's default multiprocess mode in a new process: its scheduler matches both groups against
    the disk tier it opens itself, its worker loads them."""
    root = tmp_path / "disk"
    shutil.copytree(runs["root"], root)
    script, args, out = tmp_path / "child.py", tmp_path / "args.json", tmp_path / "out.json"
    script.write_text(CHILD)
    spec = {"model": str(granite), "kv": kv_config(root), "engine": ENGINE, "prompts": ENGINE2, "out": str(out)}
    args.write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(args)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["outs"] == runs["ref"]["engine2"], "loaded Mamba state changed the greedy outputs"
    # P+TAIL's and Q's hits come from disk; P's from disk, or from vLLM's own cache if P+TAIL filled it first
    assert sum(got["cached"].values()) == HIT_TOKENS and got["cached"].get("disk", 0) >= 5 * BLOCK, got["cached"]


def _mamba_ns(runs: dict[str, Any]) -> Namespace:
    return next(n for n, (k, *_) in zip(runs["ns"], runs["spec"]) if k == "mamba")


def test_corrupt_state_is_recomputed_and_a_swapped_state_changes_the_outputs(
    runs: dict[str, Any], granite: Path, tmp_path: Path
) -> None:
    """On one copy of the store: Q's state block has flipped bytes (fails verification: Q is recomputed,
    identical outputs), and P's state is replaced by Q's, stored properly (it verifies and loads, and
    P's outputs change: the state a hit loads is the state the model continues from)."""
    from kvbm_fs.tiers.disk import HEADER_PAGE, DiskTier

    root = tmp_path / "disk"
    shutil.copytree(runs["root"], root)
    ns = _mamba_ns(runs)
    p_key = ns.keys_for_tokens(np.asarray(P))[2:3]
    q_key = ns.keys_for_tokens(np.asarray(Q))[1:2]
    store = mount(f"file://{root}?capacity={DISK_CAP}", layout=ns.layout, model=ns.model, env={})
    try:
        q_state = np.zeros((1, ns.block_nbytes), np.uint8)
        assert store.get(q_key, q_state).all()
        assert q_state[0, STATE:].max() == 0 and q_state[0, :STATE].any()  # the state, then zero padding
        store.delete(p_key)
        assert store.put(p_key, q_state).all()
    finally:
        store.close()
    tier = DiskTier(root, ns.block_nbytes, DISK_CAP)
    try:
        (rec,) = tier.index.records(q_key.ns, q_key.hashes)
        assert rec is not None
        seg, off = tier._locate(rec.slot)
        fd = os.open(tier._segment_path(seg), os.O_RDWR)
        try:
            for pos in np.random.default_rng(5).integers(0, STATE, 4).tolist():
                at = off + HEADER_PAGE + int(pos)
                os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x5A]), at)
        finally:
            os.close(fd)
    finally:
        tier.close()
    llm = new_engine(granite, kv_config(root), **ENGINE)
    try:
        outs = generate(llm, ENGINE2)
        c = connectors(llm)
        c["WORKER"].flush()
        w = dict(c["WORKER"].totals.reduce())
    finally:
        stop(llm)
    ref = runs["ref"]["engine2"]
    assert outs[1] == ref[1], "a corrupt Mamba state was served instead of recomputed"
    assert w["load_failed_blocks"] == 1, w
    assert outs[0] != ref[0] and outs[2] != ref[2], "P's outputs ignore the Mamba state its hit loaded"


def test_mamba_without_vllms_mamba_prefix_caching_is_refused_at_start_up(granite: Path, tmp_path: Path) -> None:
    from test_vllm_e2e import _cleanup_failed_engine

    from kvbm_fs import ConfigError

    with pytest.raises(ConfigError, match=r"mamba_cache_mode='none'.*enable_prefix_caching=True"):
        new_engine(granite, kv_config(tmp_path / "disk"), enable_prefix_caching=False, block_size=BLOCK)
    _cleanup_failed_engine()


# A tiny Qwen3-Next: one gated-delta-net layer, one attention layer. vllm-cpu's GDN runs in bfloat16
# only; vLLM raises the block to 128 tokens so that the attention page holds the GDN state.
TINY_QWEN3_NEXT: dict[str, Any] = dict(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    layer_types=["linear_attention", "full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=128,
    max_position_embeddings=2048,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
QWEN_BLOCK = 128


def test_qwen3_next_gated_delta_net_state_loads_with_identical_outputs(tmp_path: Path) -> None:
    """One engine stores, forgets (vLLM's own cache reset), and loads its prompts' GDN state and
    attention blocks back through kvbm_fs; greedy outputs equal an engine with prefix caching off.
    GDN prefills across block boundaries on CPU: no chunk limit."""
    import torch
    import transformers

    d = tmp_path / "tiny-qwen3-next"
    torch.manual_seed(0)
    cfg = transformers.Qwen3NextConfig(**TINY_QWEN3_NEXT)
    transformers.Qwen3NextForCausalLM(cfg).bfloat16().save_pretrained(d, safe_serialization=True)
    rng = np.random.default_rng(3)
    p, q, tail = (rng.integers(3, 1000, n).tolist() for n in (300, 200, 40))
    first: list[tuple[list[int], str | None]] = [(p, None), (q, None)]
    second: list[tuple[list[int], str | None]] = [(p + tail, None), (q, None)]
    kw: dict[str, Any] = dict(dtype="bfloat16", block_size=QWEN_BLOCK)
    llm = new_engine(d, enable_prefix_caching=False, **kw)
    try:
        ref = generate(llm, second)
    finally:
        stop(llm)
    llm = new_engine(d, kv_config(tmp_path / "disk"), enable_prefix_caching=True, **kw)
    try:
        cc = llm.llm_engine.vllm_config.cache_config
        assert (cc.mamba_cache_mode, cc.block_size) == ("align", QWEN_BLOCK)
        generate(llm, first)
        c = connectors(llm)
        c["WORKER"].flush()
        saved = dict(c["WORKER"].totals.reduce())
        assert llm.reset_prefix_cache()  # vLLM forgets: the hits below come from kvbm_fs
        outs = generate(llm, second)
        c["WORKER"].flush()
        s, w = dict(c["SCHEDULER"].totals.reduce()), dict(c["WORKER"].totals.reduce())
        kinds = sorted(g.kind for g in c["SCHEDULER"].groups)
    finally:
        stop(llm)
    assert kinds == ["full", "mamba"]
    assert saved["saved_blocks"] == (2 + 1) + (1 + 1)  # full attention blocks + the state at the last boundary
    assert outs == ref, "loaded GDN state changed the greedy outputs"
    assert s["hit_tokens"] == (2 + 1) * QWEN_BLOCK
    assert w["loaded_blocks"] == (2 + 1) + 2 and w["load_failed_blocks"] == 0
