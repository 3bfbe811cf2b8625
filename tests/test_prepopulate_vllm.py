"""``kvbm-fs prepopulate --engine vllm`` with a real vLLM engine (vllm-cpu 0.32) on a tiny random-weight
Llama: a run SIGKILLed mid-way and resumed prefills only what was not stored; a fresh engine in another
process then loads every full block but the last token's, with greedy outputs equal to connector-off;
and serving with another block size gets zero hits and is told why. Run with ``.ci/run-vllm``."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/run-vllm runs these tests in .venv-vllm")

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from kvbm_fs import Namespace, mount
from kvbm_fs.catalog import Catalog
from kvbm_fs.engine import layout_siblings, warn_layout_siblings
from kvbm_fs.integration import vllm as kvc

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BS = 32
TINY_LLAMA: dict[str, Any] = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=64, vocab_size=1000, max_position_embeddings=2048,
                                  initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
_rng = np.random.default_rng(5)
SYSTEM = _rng.integers(3, 1000, 2 * BS + 5).tolist()  # shared by 15 prompts: 2 full blocks and a bit
PROMPTS = [SYSTEM + _rng.integers(3, 1000, int(n)).tolist() for n in _rng.integers(10, 160, 15)]
PROMPTS += [_rng.integers(3, 1000, int(n)).tolist() for n in _rng.integers(40, 200, 5)]
ENGINE = {"enforce_eager": True, "max_model_len": 1024, "seed": 0}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    import transformers

    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).float().save_pretrained(d)
    return d


def command(model: Path, work: Path, *more: str) -> list[str]:
    corpus, args = work / "corpus.jsonl", work / "engine.yaml"
    if not corpus.exists():
        corpus.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in PROMPTS))
        args.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in ENGINE.items()))
    return [sys.executable, "-m", "kvbm_fs", "prepopulate", str(corpus), "--engine", "vllm", "--model", str(model),
            "--engine-args", str(args), "--dtype", "float32", "--block-size", str(BS), "--json", *more]  # fmt: skip


def tier(work: Path) -> str:
    return f"file://{work}/kv?capacity=64MiB"


def offline(work: Path) -> tuple[Catalog, Namespace]:
    cat = Catalog.open(tier(work))
    (ns,) = (n for n in (cat.namespace(i) for i in cat.namespace_ids()) if n is not None)
    return cat, ns


def stored_blocks(work: Path) -> list[int]:
    """Leading blocks of each prompt the disk tier holds, read offline."""
    cat, ns = offline(work)
    try:
        with mount(tier(work), layout=ns.layout, model=ns.model, env={}) as store:
            return [store.match(ns.keys_for_tokens(np.asarray(p))).length for p in PROMPTS]
    finally:
        cat.close()


@pytest.fixture(scope="module")
def prepopulated(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run 1 is SIGKILLed once 8 prompts are stored; run 2 resumes it on the same disk tier."""
    work = tmp_path_factory.mktemp("prepop")
    cmd = command(model, work, "--tiers", tier(work), "--batch-size", "4")
    run1 = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert run1.stdout is not None
    seen = []
    for line in run1.stdout:
        if line.startswith("{"):
            seen.append(json.loads(line))
            if seen[-1].get("done", 0) >= 8:
                run1.send_signal(signal.SIGKILL)
                break
    assert run1.wait(60) == -signal.SIGKILL and seen[-1]["event"] == "progress" and seen[-1]["total"] == 20
    before = stored_blocks(work)
    run2 = subprocess.run([*cmd, "--verify"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run2.returncode == 0, run2.stderr[-3000:]
    lines = [json.loads(x) for x in run2.stdout.splitlines()]  # stdout holds nothing but --json lines
    report = lines[-1]
    assert [x["event"] for x in lines] == ["progress"] * (len(lines) - 1) + ["report"]
    return {"work": work, "before": before, "report": report, "killed_at": seen[-1]}


def test_a_killed_run_resumes_without_prefilling_twice(prepopulated: dict[str, Any]) -> None:
    rep, before = prepopulated["report"], prepopulated["before"]
    full = [len(p) // BS for p in PROMPTS]
    whole = sum(b == f for b, f in zip(before, full))
    assert whole >= prepopulated["killed_at"]["done"] >= 8 and whole < 20  # killed mid-way
    assert rep["event"] == "report" and rep["failures"] == [] and rep["prompts"] == 20
    assert rep["already_present"] == whole and rep["prefilled"] == 20 - whole  # only what was not stored
    distinct = 2 + sum(f - 2 for f in full[:15]) + sum(full[15:])
    assert rep["blocks"] == distinct and rep["blocks_stored"] == distinct - rep["blocks_already_present"]
    assert rep["blocks_already_present"] >= sum(before[15:]) + max(before[:15]) > 0  # what run 1 left
    c = rep["engine_counters"]  # the connector saved exactly the missing blocks: none twice
    assert c["saved_blocks"] == rep["blocks_stored"] == rep["tiers"]["disk"]["blocks"] and c["save_failed_blocks"] == 0
    assert rep["verified"] == {"disk": {"blocks": rep["blocks_stored"], "failed": 0}}  # read back from disk
    # prompts half-stored by run 1 (the SIGKILL can land between a batch's saves) loaded their stored prefix
    # (SYSTEM's 2 blocks count once: a batch's other prompts find them in vLLM's own prefix cache)
    usable = [min(b, (len(p) - 1) // BS) for b, f, p in zip(before, full, PROMPTS)]
    half = [i for i, (b, f) in enumerate(zip(before, full)) if 0 < b < f]
    shared = max([min(usable[i], 2) for i in half if i < 15], default=0)
    assert c["loaded_blocks"] >= shared + sum(usable[i] - min(usable[i], 2) * (i < 15) for i in half)
    assert stored_blocks(prepopulated["work"]) == full  # everything present at the end
    cat, _ = offline(prepopulated["work"])
    with cat:
        assert cat.verify()["bad"] == 0  # and verified


def engine(model: Path, kv: dict[str, Any] | None = None, **more: Any) -> LLM:
    args = {**ENGINE, "block_size": BS, "dtype": "float32", **more}
    return LLM(model=str(model), skip_tokenizer_init=True, kv_transfer_config=kv, **args)


def kv(work: Path) -> dict[str, Any]:
    return {"kv_connector": "KvbmFsConnector", "kv_connector_module_path": "kvbm_fs.integration.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"tiers": [tier(work)]}}  # fmt: skip


def serve(llm: LLM) -> tuple[list[list[int]], list[int]]:
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [int(o.num_cached_tokens or 0) for o in outs]


GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def stop(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def connectors(llm: LLM) -> dict[str, Any]:
    engine_id = llm.llm_engine.vllm_config.kv_transfer_config.engine_id
    return {c.role.name: c for c in kvc.live_connectors() if c.engine_id == engine_id}


def test_a_fresh_engine_loads_every_prepopulated_block(prepopulated: dict[str, Any], model: Path) -> None:
    llm = engine(model)
    try:
        want, _ = serve(llm)
    finally:
        stop(llm)
    # another process than the prepopulation's; no vLLM prefix cache, so each prompt's hits are kvbm_fs's
    llm = engine(model, kv(prepopulated["work"]), enable_prefix_caching=False)
    try:
        got, cached = serve(llm)
        c = connectors(llm)
        hits = dict(c["SCHEDULER"].totals.reduce())["hit_tokens"]
        loaded = dict(c["WORKER"].totals.reduce())["loaded_blocks"]
    finally:
        stop(llm)
    usable = [(len(p) - 1) // BS for p in PROMPTS]  # every full block but the one holding the last token
    assert cached == [u * BS for u in usable] and hits == sum(usable) * BS and loaded == sum(usable)
    assert got == want


def test_serving_with_another_block_size_gets_no_hits_and_is_told_why(
    prepopulated: dict[str, Any], model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 64-token bfloat16 blocks have the bytes of 32-token float32 ones, so the disk tier opens (another
    # byte size is refused at start-up outright); the layouts differ, so nothing may match
    with caplog.at_level("WARNING", logger="kvbm_fs"):  # the connector warns at start-up
        llm = engine(model, kv(prepopulated["work"]), block_size=2 * BS, dtype="bfloat16", enable_prefix_caching=False)
    try:
        assert "kvbm_fs connector: the tiers hold model" in caplog.text
        assert "block_size 32 != 64" in caplog.text and "dtype float32 != bfloat16" in caplog.text
        _, cached = serve(llm)
        sched = connectors(llm)["SCHEDULER"]
        assert cached == [0] * len(PROMPTS) and dict(sched.totals.reduce())["hit_tokens"] == 0
        sib = warn_layout_siblings(sched.store, sched.namespace, "kvbm_fs connector")
        assert [s.short_id for s in sib] == [prepopulated["report"]["namespace"]]
        assert layout_siblings(sched.store, sib[0]) == [sched.namespace]  # and the other way round
    finally:
        stop(llm)
